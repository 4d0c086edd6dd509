"""Fused, memory-light KL and log-hyperprior over low-rank factors (value and gradient in one dense pass).

The reference math is `peft_abmll.bayes` (tested against `torch.distributions`); these functions give the
same values and gradients (tested against autograd through the reference) while

- never holding more than one block of rows of a ``d_out x d_in`` matrix (memory ~ the factors), and
- computing the factor gradients analytically in the forward pass, so backward is a multiply.

A posterior is four factors ``(mean_A, mean_B, scale_A, scale_B)`` with ``A: (r, d_in)``, ``B: (d_out, r)``;
per entry ``mean = s * B_m @ A_m`` and ``sigma = s * B_s @ A_s + c`` (linear, variance ``sigma**2 + c**2``)
or ``sigma = softplus(B_s @ A_s + rho0) + c`` (softplus, variance ``sigma**2``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
import torch.nn.functional as F

BLOCK_ENTRIES = 1 << 17  # entries of Delta W processed at once (a block of temporaries stays in cache)


@dataclass(frozen=True)
class ScaleSpec:
    """How factors become moments: ``scale_type``, LoRA ``scaling`` s, ``scale_floor`` c, softplus ``rho0``."""

    scale_type: str
    scaling: float
    scale_floor: float
    rho0: float = 0.0


class _Moments(TypedDict):
    mean: torch.Tensor
    sigma: torch.Tensor
    var: torch.Tensor
    dsigma: torch.Tensor | None  # None for ``linear``: d(sigma)/d(raw) is the constant ``scaling``


def _prescaled(factors: tuple[torch.Tensor, ...], spec: ScaleSpec) -> tuple[torch.Tensor, ...]:
    """The factors with ``scaling`` folded into the small ``A`` matrices, so no dense pass multiplies by it."""
    mean_A, mean_B, scale_A, scale_B = factors
    return (mean_A * spec.scaling, mean_B, scale_A * spec.scaling if spec.scale_type == "linear" else scale_A, scale_B)


def _block_moments(scaled: tuple[torch.Tensor, ...], rows: slice, spec: ScaleSpec, mean: bool = True) -> _Moments:
    """mean, sigma, variance and d(sigma)/d(raw) of the entries in `rows`, from `_prescaled` factors.

    Every returned dense tensor is freshly allocated, so callers may overwrite them in place. ``mean=False``
    skips the mean (an empty tensor), for callers that only need `_mean_difference`.
    """
    mean_A, mean_B, scale_A, scale_B = scaled
    moments = _scale_moments(scale_A, scale_B, rows, spec)
    if mean:
        moments["mean"] = mean_B[rows] @ mean_A
    return moments


def _scale_moments(scale_A: torch.Tensor, scale_B: torch.Tensor, rows: slice, spec: ScaleSpec) -> _Moments:
    """sigma, variance and d(sigma)/d(raw) of the entries in `rows` (``mean`` left for the caller)."""
    if spec.scale_type == "linear":
        sigma = (scale_B[rows] @ scale_A).add_(spec.scale_floor)
        floor_sq = torch.tensor(spec.scale_floor**2, device=sigma.device, dtype=sigma.dtype)
        var = torch.addcmul(floor_sq, sigma, sigma)
        return {"mean": sigma.new_empty(0), "sigma": sigma, "var": var, "dsigma": None}
    raw = (scale_B[rows] @ scale_A).add_(spec.rho0)
    sigma = F.softplus(raw).add_(spec.scale_floor)
    return {"mean": sigma.new_empty(0), "sigma": sigma, "var": sigma.square(), "dsigma": raw.sigmoid_()}


def _difference_factors(
    q_scaled: tuple[torch.Tensor, ...], p_scaled: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of rank ``2 r`` with ``B[rows] @ A = mean_q - mean_p`` (one matmul per block instead of two)."""
    return torch.cat([q_scaled[1], -p_scaled[1]], dim=1), torch.cat([q_scaled[0], p_scaled[0]], dim=0)


def _mean_difference(difference: tuple[torch.Tensor, torch.Tensor], rows: slice) -> torch.Tensor:
    """``mean_q - mean_p`` of the entries in `rows`, from `_difference_factors`."""
    return difference[0][rows] @ difference[1]


def _accumulate(
    grads: list[torch.Tensor],
    factors: tuple[torch.Tensor, ...],
    rows: slice,
    g_mean: torch.Tensor,
    g_sigma: torch.Tensor,
    dsigma: torch.Tensor | None,
    mean_sign: float = 1.0,
) -> None:
    """Chain the entry gradients of one block into the four factor gradients (in place; `_finish` scales them).

    `g_sigma` may be overwritten. `mean_sign` multiplies `g_mean` (saves a dense negation).
    """
    mean_A, mean_B, scale_A, scale_B = factors
    g_raw = g_sigma if dsigma is None else g_sigma.mul_(dsigma)
    grads[0].addmm_(mean_B[rows].T, g_mean, alpha=mean_sign)
    grads[1][rows].addmm_(g_mean, mean_A.T, alpha=mean_sign)
    grads[2].addmm_(scale_B[rows].T, g_raw)
    grads[3][rows].addmm_(g_raw, scale_A.T)


def _finish(grads: list[torch.Tensor], spec: ScaleSpec) -> None:
    """Apply the chain-rule factor ``scaling`` that `_accumulate` leaves out (on the small factor gradients)."""
    if not grads:
        return
    for i in (0, 1, 2, 3) if spec.scale_type == "linear" else (0, 1):
        grads[i].mul_(spec.scaling)


def _blocks(d_out: int, d_in: int) -> list[slice]:
    step = max(1, BLOCK_ENTRIES // max(d_in, 1))
    return [slice(i, min(i + step, d_out)) for i in range(0, d_out, step)]


def _zeros(factors: tuple[torch.Tensor, ...], wanted: bool) -> list[torch.Tensor]:
    return [torch.zeros_like(f) for f in factors] if wanted else []


def _saved(grads: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """What to save for backward: the four factor gradients, or four ``None`` when none were wanted."""
    return list(grads) if grads else [None] * 4


def _kl_blocks(
    q: tuple[torch.Tensor, ...],
    p: tuple[torch.Tensor, ...],
    spec: ScaleSpec,
    grads_q: list[torch.Tensor],
    grads_p: list[torch.Tensor],
) -> torch.Tensor:
    """``sum KL(q || p)`` over all entries, accumulating the wanted factor gradients (empty list: not wanted).

    Per entry, with ``ratio = var_q / var_p`` and ``diff = mean_q - mean_p``:
    ``2 KL = ratio - log(ratio) - 1 + diff**2 / var_p``;
    ``d KL / d mean_q = diff / var_p``, ``d KL / d sigma_q = (1/var_p - 1/var_q) sigma_q``,
    ``d KL / d sigma_p = (1 - (var_q + diff**2) / var_p) sigma_p / var_p``.
    """
    total = torch.zeros((), device=q[0].device)
    if all(torch.equal(a, b) for a, b in zip(q, p)):  # equal laws (e.g. right after a reset): KL and grads are 0
        return total
    q_scaled, p_scaled = _prescaled(q, spec), _prescaled(p, spec)
    difference = _difference_factors(q_scaled, p_scaled)
    for rows in _blocks(q[1].shape[0], q[0].shape[1]):
        mq, mp = _block_moments(q_scaled, rows, spec, mean=False), _block_moments(p_scaled, rows, spec, mean=False)
        diff = _mean_difference(difference, rows)
        inv_p = mp["var"].reciprocal_()
        ratio = mq["var"] * inv_p  # exactly 1 for equal laws, so the KL is exactly 0 there
        g_mean = diff * inv_p
        total += ratio.sum() + torch.dot(g_mean.view(-1), diff.view(-1)) - diff.numel()
        if grads_p:
            g_sigma = torch.addcmul(ratio, diff, g_mean).neg_().add_(1.0).mul_(inv_p).mul_(mp["sigma"])
            _accumulate(grads_p, p, rows, g_mean, g_sigma, mp["dsigma"], mean_sign=-1.0)
        total -= ratio.log_().sum()
        if grads_q:
            g_sigma = torch.addcdiv(mq["sigma"] * inv_p, mq["sigma"], mq["var"], value=-1.0)
            _accumulate(grads_q, q, rows, g_mean, g_sigma, mq["dsigma"])
    _finish(grads_q, spec)
    _finish(grads_p, spec)
    return 0.5 * total


class _KL(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, spec: ScaleSpec, *factors: torch.Tensor) -> torch.Tensor:
        q, p = tuple(f.float() for f in factors[:4]), tuple(f.float() for f in factors[4:])
        grads_q = _zeros(q, any(ctx.needs_input_grad[1:5]))
        grads_p = _zeros(p, any(ctx.needs_input_grad[5:9]))
        total = _kl_blocks(q, p, spec, grads_q, grads_p)
        ctx.save_for_backward(*_saved(grads_q), *_saved(grads_p))
        ctx.dtypes = [f.dtype for f in factors]
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        saved = ctx.saved_tensors
        return (None, *(None if g is None else (g * grad_out).to(dt) for g, dt in zip(saved, ctx.dtypes)))


class _LogPrior(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, spec: ScaleSpec, prior: tuple[float, float, float], *factors: torch.Tensor) -> torch.Tensor:
        p = tuple(f.float() for f in factors)
        mean_std, a0, b0 = prior
        grads = _zeros(p, any(ctx.needs_input_grad[2:6]))
        const = -0.5 * math.log(2 * math.pi * mean_std**2) + a0 * math.log(b0) - math.lgamma(a0)
        total = torch.zeros((), device=p[0].device)
        scaled = _prescaled(p, spec)
        for rows in _blocks(p[1].shape[0], p[0].shape[1]):
            m = _block_moments(scaled, rows, spec)
            mean = m["mean"].view(-1)
            total += mean.numel() * const - torch.dot(mean, mean) / (2 * mean_std**2)
            total -= (a0 - 1.0) * m["var"].log().sum()
            precision = m["var"].reciprocal_()
            total -= b0 * precision.sum()
            if grads:
                # d/d sigma = 2 sigma d/d var, d/d var = precision * (b0 * precision - (a0 - 1))
                g_sigma = (precision * b0).sub_(a0 - 1.0).mul_(precision).mul_(m["sigma"]).mul_(2.0)
                _accumulate(grads, p, rows, m["mean"], g_sigma, m["dsigma"], mean_sign=-1.0 / mean_std**2)
        _finish(grads, spec)
        ctx.save_for_backward(*_saved(grads))
        ctx.dtypes = [f.dtype for f in factors]
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        saved = ctx.saved_tensors
        return (None, None, *(None if g is None else (g * grad_out).to(dt) for g, dt in zip(saved, ctx.dtypes)))


def fused_kl(local: tuple[torch.Tensor, ...], global_: tuple[torch.Tensor, ...], spec: ScaleSpec) -> torch.Tensor:
    """``sum KL(q_local || p_global)`` over every entry of ``Delta W`` (float32 scalar, differentiable)."""
    return _KL.apply(spec, *local, *global_)


def fused_log_prior(
    global_: tuple[torch.Tensor, ...], spec: ScaleSpec, mean_std: float, a0: float, b0: float
) -> torch.Tensor:
    """``sum log N(mean; 0, mean_std^2) + sum log Gamma(1/var; a0, b0)`` over every entry (float32 scalar)."""
    return _LogPrior.apply(spec, (mean_std, a0, b0), *global_)


# ------------------------------------------------------------------------------------------- sampled outputs
def _seeded_normal(shape: tuple[int, ...], seed: int, like: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator(device=like.device)
    generator.manual_seed(seed)
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def _local_std(u: torch.Tensor, B_stack: torch.Tensor) -> torch.Tensor:
    """Per-output standard deviation on the row-rescaled input, from ``u = (x / row_max)**2 @ A_stack.T``."""
    return (u @ B_stack.T).clamp_min(1e-30).sqrt()


def _row_scaled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x / row_max, row_max)`` with ``row_max = max |x|`` per row: keeps ``x**2`` in range at any scale."""
    row_max = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return x / row_max, row_max


class _LocalNoise(torch.autograd.Function):
    """``row_max * sqrt((x / row_max)**2 @ A_stack.T @ B_stack.T) * eps``.

    Saves x, the stacks, the small low-rank intermediate ``u`` ``(..., P)`` and a seed: backward redraws ``eps``
    instead of storing it (an activation the size of the output per adapted layer) and skips the ``x -> u`` matmul.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, A_stack: torch.Tensor, B_stack: torch.Tensor, seed: int) -> torch.Tensor:
        xs, row_max = _row_scaled(x)
        u = xs.square_() @ A_stack.T
        std = _local_std(u, B_stack)
        ctx.save_for_backward(x, A_stack, B_stack, u)
        ctx.seed = seed
        return _seeded_normal(tuple(std.shape), seed, x).mul_(std).mul_(row_max)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        x, A_stack, B_stack, u = ctx.saved_tensors
        xs, row_max = _row_scaled(x)  # a constant rescale: m * f(x / m) = f(x)
        std = _local_std(u, B_stack)
        eps = _seeded_normal(tuple(std.shape), ctx.seed, x)
        g_var = eps.mul_(grad_out).mul_(row_max).div_(std.mul_(2))  # d out / d var, var on the rescaled input
        g_u = g_var @ B_stack
        g_B = g_var.reshape(-1, g_var.shape[-1]).T @ u.reshape(-1, u.shape[-1])
        g_xs_sq = g_u @ A_stack
        g_A = g_u.reshape(-1, g_u.shape[-1]).T @ xs.square().reshape(-1, xs.shape[-1])
        g_x = g_xs_sq.mul_(xs).mul_(2 / row_max)
        return g_x, g_A, g_B, None


class _WeightNoise(torch.autograd.Function):
    """``x @ (std * eps).T`` with one ``(d_out, d_in)`` noise matrix; saves x, std and a seed, not the sample."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, std: torch.Tensor, seed: int) -> torch.Tensor:
        eps = _seeded_normal(tuple(std.shape), seed, x)
        ctx.save_for_backward(x, std)
        ctx.seed = seed
        return F.linear(x, std * eps)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        x, std = ctx.saved_tensors
        eps = _seeded_normal(tuple(std.shape), ctx.seed, x)
        g_x = grad_out @ (std * eps)
        g_std = (grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])) * eps
        return g_x, g_std, None


def lowrank_noise(x: torch.Tensor, A_stack: torch.Tensor, B_stack: torch.Tensor, seed: int) -> torch.Tensor:
    """Local-reparameterisation sample ``sqrt(x**2 @ var.T) * eps`` from the stacked low-rank variance factors.

    Args:
        x: ``(..., d_in)`` float32 input.
        A_stack: ``(P, d_in)``, from `peft_abmll.bayes.lowrank_variance_factors`.
        B_stack: ``(d_out, P)``, from the same call.
        seed: seed of ``eps``; the same seed regenerates it in backward instead of storing it.

    Returns:
        ``(..., d_out)`` float32 noise.
    """
    return _LocalNoise.apply(x, A_stack, B_stack, seed)


def weight_noise(x: torch.Tensor, std: torch.Tensor, seed: int) -> torch.Tensor:
    """Weight-space sample ``x @ (std * eps).T``: one ``eps`` per call, regenerated in backward from `seed`."""
    return _WeightNoise.apply(x, std, seed)
