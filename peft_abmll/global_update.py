"""The global (outer) update of meta-learning as pure functions of the factors: directions, not gradients.

Each function returns, for every global factor, a *direction* ``d`` such that the update
``global -= eps * d`` is the method's step with step size ``eps`` (`MetaTrainingArguments.outer_step_size`):

- `reptile_direction`: ``global - local``, so the step is Reptile's interpolation
  ``global += eps * (local - global)``.
- `abmll_direction`: the natural-gradient step of ABMLL's outer objective
  ``KL(q_local || p_global) - w * log p(global)`` (see ``docs/method.md``, "The global update"):

  * the **mean** factors move like Reptile's, ``global_mean += eps * (local_mean - global_mean)`` (to first
    order in the inner-loop displacement this is the weight-space step ``mu += eps * (mu_local - mu)``, which
    is the natural gradient of the KL in the mean: its ``1 / sigma**2`` weighting cancels), plus the Normal
    hyperprior's shrinkage;
  * the **scale** factors move so that every entry's variance goes a fraction ``eps`` of the way to
    ``(var_local + (mu_local - mu)**2 + 2 w b0) / (1 + 2 w (a0 - 1))``: the adapted posterior's own
    variance plus how far its mean landed from the global one, with the Gamma hyperprior as ``2 (a0 - 1)``
    pseudo-observations of variance ``b0 / (a0 - 1)``. The per-entry step (dense, computed in row blocks of
    ``Delta W`` like `peft_abmll.fused`) is mapped onto the low-rank scale factors by a least-squares
    (scaled-gradient) projection, ``d_B = d W A^T (A A^T)^-1 / 2``, ``d_A = (B^T B)^-1 B^T d W / 2``.

Neither depends on ``beta``, on the size of the sum over entries, or on ``1 / sigma**2``: those scale the
gradient, not the natural step. Shapes: a posterior is ``(mean_A, mean_B, scale_A, scale_B)`` with
``A: (r, d_in)`` and ``B: (d_out, r)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .fused import (
    ScaleSpec,
    _block_moments,
    _blocks,
    _difference_factors,
    _mean_difference,
    _Moments,
    _prescaled,
)

__all__ = ["GlobalUpdateStats", "HyperPrior", "abmll_direction", "reptile_direction"]

STAT_KEYS = (
    "entries",
    "kl",
    "neg_log_prior",
    "global_var",
    "target_var",
    "spread",
    "global_mean_sq",
    "var_step_kl",
    "var_step_prior",
)


@dataclass(frozen=True)
class HyperPrior:
    """The hyperprior ``N(0, mean_std**2)`` on global means and ``Gamma(a0, rate=b0)`` on global precisions.

    ``weight`` is its weight per task in the outer objective (``1 / number of training tasks``: the
    hyperprior counts once per sweep over the tasks, as in ABML's minibatch objective).
    """

    weight: float
    a0: float
    b0: float
    mean_std: float


GlobalUpdateStats = dict[str, float]


def reptile_direction(global_: Sequence[torch.Tensor], local: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``global - local`` for every parameter: ``global -= eps * d`` is Reptile's interpolation."""
    return [(g.detach() - l.detach()).to(g.dtype) for g, l in zip(global_, local)]


@torch.no_grad()
def abmll_direction(
    global_: Sequence[torch.Tensor],
    local: Sequence[torch.Tensor],
    spec: ScaleSpec,
    prior: HyperPrior,
    *,
    damping: float = 1e-3,
    max_relative_step: float = 1.0,
) -> tuple[list[torch.Tensor], GlobalUpdateStats]:
    """Directions for the four global factors of one layer, and sums of per-entry statistics for logging.

    Args:
        global_: ``(mean_A, mean_B, scale_A, scale_B)`` of the global posterior.
        local: the same four factors of the adapted local posterior.
        spec: how factors become moments (`peft_abmll.fused.ScaleSpec`).
        prior: the hyperprior and its weight per task.
        damping: Tikhonov damping of the projection, relative to the mean eigenvalue of ``A A^T`` / ``B^T B``.
        max_relative_step: per entry, ``|d sigma| <= max_relative_step * |sigma|`` (a trust region: at
            ``eps = 1`` a standard deviation at most doubles or vanishes in one update).

    Returns:
        ``(directions, stats)``: directions in the factors' shapes and dtypes; ``stats`` holds sums over the
        layer's entries of ``STAT_KEYS`` (``entries`` is the count), for per-entry logging.
    """
    g, q = _at_least_float32(global_), _at_least_float32(local)
    stats = dict.fromkeys(STAT_KEYS, 0.0)
    g_scaled, q_scaled = _prescaled(g, spec), _prescaled(q, spec)
    scale_A, scale_B = g[2], g[3]
    grad_scale_A = torch.zeros_like(scale_A)
    grad_scale_B = torch.zeros_like(scale_B)
    difference = _difference_factors(q_scaled, g_scaled)
    gain = 1.0 + 2.0 * prior.weight * (prior.a0 - 1.0)
    for rows in _blocks(scale_B.shape[0], scale_A.shape[1]):
        mp, mq = _block_moments(g_scaled, rows, spec, mean=False), _block_moments(q_scaled, rows, spec, mean=False)
        diff = _mean_difference(difference, rows)
        target = torch.addcmul(mq["var"], diff, diff)  # var_q + diff**2: the variance the KL pulls var_p toward
        # = bayes.global_variance_direction(var_p, var_q, diff, ...), from the shared `target`
        direction_var = torch.add(target, 2.0 * prior.weight * prior.b0).sub_(mp["var"], alpha=gain).neg_()
        sigma = mp["sigma"]
        limit = sigma.abs().mul_(max_relative_step)
        per_sigma = direction_var.div_(sigma).mul_(0.5).nan_to_num_(nan=0.0)  # a linear sigma may be exactly 0
        direction_sigma = torch.minimum(per_sigma, limit, out=per_sigma)
        direction_sigma = torch.maximum(direction_sigma, limit.neg_(), out=direction_sigma)
        if mp["dsigma"] is None:
            direction_raw = direction_sigma.div_(spec.scaling)
        else:
            direction_raw = direction_sigma.div_(mp["dsigma"].clamp_min_(1e-12))
        grad_scale_B[rows] = direction_raw @ scale_A.T
        grad_scale_A.addmm_(scale_B[rows].T, direction_raw)
        _add_stats(stats, mp, mq, diff, target, prior)
    mean_sq = float(((g_scaled[1].T @ g_scaled[1]) * (g_scaled[0] @ g_scaled[0].T)).sum())  # ||B A||_F^2, low rank
    stats["global_mean_sq"] = mean_sq
    stats["neg_log_prior"] += mean_sq / (2 * prior.mean_std**2)
    directions = [
        g[0] - q[0],
        g[1] - q[1] + (prior.weight * stats["global_var"] / max(stats["entries"], 1) / prior.mean_std**2) * g[1],
        0.5 * _solve_left(scale_B, grad_scale_A, damping),
        0.5 * _solve_right(scale_A, grad_scale_B, damping),
    ]
    return [d.to(t.dtype) for d, t in zip(directions, global_)], stats


def _at_least_float32(factors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Detached factors in float32, or float64 when given (the update math never runs in half precision)."""
    return tuple(t.detach().to(torch.promote_types(t.dtype, torch.float32)) for t in factors)


def _add_stats(
    stats: GlobalUpdateStats,
    mp: _Moments,
    mq: _Moments,
    diff: torch.Tensor,
    target: torch.Tensor,
    prior: HyperPrior,
) -> None:
    """Accumulate the per-entry sums of one block (KL, -log hyperprior without the mean's term, variances, spread).

    Every sum is assembled from a few shared dense sums (``sum var_p``, ``sum log var_p``, ``sum 1 / var_p``,
    ``sum target / var_p`` with ``target = var_q + diff**2`` ...) instead of one dense expression per statistic:
    the same numbers as the element-wise formulas of `peft_abmll.bayes` (tested), in fewer passes over the block.
    The hyperprior's ``sum mean**2 / (2 mean_std**2)`` is added once per layer from the low-rank factors.
    """
    var_p, var_q, n = mp["var"], mq["var"], diff.numel()
    inv_p = var_p.reciprocal()
    sum_log_var_p = float(var_p.log().sum())
    spread = float(torch.dot(diff.reshape(-1), diff.reshape(-1)))
    sum_var_q = float(var_q.sum())
    # 2 KL = sum (var_q + diff**2) / var_p - sum log var_q + sum log var_p - n
    kl = 0.5 * (float(torch.dot(target.reshape(-1), inv_p.reshape(-1))) - float(var_q.log().sum()) + sum_log_var_p - n)
    # -(log N(mean; 0, s**2) + log Gamma(1 / var; a0, b0)) summed, but for the mean**2 term
    neg_log_prior = 0.5 * n * math.log(2 * math.pi * prior.mean_std**2)
    neg_log_prior -= n * (prior.a0 * math.log(prior.b0) - math.lgamma(prior.a0))
    neg_log_prior += (prior.a0 - 1.0) * sum_log_var_p + prior.b0 * float(inv_p.sum())
    stats["entries"] += float(n)
    stats["kl"] += kl
    stats["neg_log_prior"] += neg_log_prior
    stats["global_var"] += float(var_p.sum())
    stats["target_var"] += sum_var_q + spread
    stats["spread"] += spread
    # the two parts of the variance step (variance units): the KL's pull and the hyperprior's
    stats["var_step_kl"] += float(inv_p.copy_(var_p).sub_(target).abs_().sum())  # inv_p's memory is free now
    step_prior = var_p.mul(prior.a0 - 1.0).sub_(prior.b0).abs_().sum()
    stats["var_step_prior"] += float(2 * abs(prior.weight) * step_prior)


def _solve_right(A: torch.Tensor, G: torch.Tensor, damping: float) -> torch.Tensor:
    """``G (A A^T + lambda I)^-1`` for ``A: (r, d_in)``, ``G: (d_out, r)``."""
    gram = A @ A.T
    return torch.linalg.solve(_damped(gram, damping), G.T).T


def _solve_left(B: torch.Tensor, G: torch.Tensor, damping: float) -> torch.Tensor:
    """``(B^T B + lambda I)^-1 G`` for ``B: (d_out, r)``, ``G: (r, d_in)``."""
    return torch.linalg.solve(_damped(B.T @ B, damping), G)


def _damped(gram: torch.Tensor, damping: float) -> torch.Tensor:
    r = gram.shape[0]
    lam = damping * gram.diagonal().sum() / r + torch.finfo(gram.dtype).tiny
    return gram + lam * torch.eye(r, dtype=gram.dtype, device=gram.device)
