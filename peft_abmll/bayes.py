"""The probabilistic math of ABMLL as small pure functions.

Every function here is side-effect free, works on plain tensors, and is tested against a reference
(``torch.distributions``) in ``tests/test_bayes.py``. Shapes use ``r`` for the LoRA rank, ``d_in`` /
``d_out`` for the adapted layer's input / output width and ``N`` for any number of leading rows.

A Bayesian LoRA "scale pair" ``(A, B)`` with ``A: (r, d_in)`` and ``B: (d_out, r)`` parameterises a
standard deviation for every entry of the weight update ``Delta W`` (``d_out x d_in``):

- ``linear`` (paper-literal): ``sigma = s * B @ A + c``; variance ``sigma**2 + c**2`` so that
  ``log(variance)`` stays finite when ``sigma`` crosses zero.
- ``softplus``: ``sigma = softplus(B @ A + rho0) + c`` with ``rho0`` chosen from the initial std.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

__all__ = [
    "SCALE_TYPES",
    "closed_form_global_moments",
    "entry_variance",
    "gaussian_kl",
    "global_variance_direction",
    "inverse_softplus",
    "log_gamma_precision",
    "log_normal",
    "lowrank_output_variance",
    "lowrank_variance_factors",
]

SCALE_TYPES = ("linear", "softplus")


def inverse_softplus(y: float) -> float:
    """Return ``x`` with ``softplus(x) == y`` for ``y > 0`` (stable for small and large ``y``)."""
    if y <= 0:
        raise ValueError(f"inverse_softplus needs y > 0, got {y}")
    return y + math.log(-math.expm1(-y))


def entry_variance(
    A: torch.Tensor, B: torch.Tensor, *, scale_type: str, scaling: float, scale_floor: float, rho0: float = 0.0
) -> torch.Tensor:
    """Variance of every weight-update entry from a scale pair, in float32.

    Args:
        A: ``(r, d_in)`` scale factor.
        B: ``(d_out, r)`` scale factor.
        scale_type: ``"linear"`` or ``"softplus"`` (see the module docstring).
        scaling: ``s = lora_alpha / r`` (used by ``linear`` only).
        scale_floor: the constant ``c`` added to the standard deviation (`ABMLLConfig.scale_floor`).
        rho0: softplus offset (``softplus`` only).

    Returns:
        ``(d_out, d_in)`` variances, strictly positive.
    """
    raw = B.float() @ A.float()
    if scale_type == "linear":
        sigma = scaling * raw + scale_floor
        return sigma.square() + scale_floor**2
    if scale_type == "softplus":
        return (F.softplus(raw + rho0) + scale_floor).square()
    raise ValueError(f"Unknown scale_type {scale_type!r}; expected one of {SCALE_TYPES}.")


@functools.lru_cache(maxsize=32)
def _pairs(r: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index pairs ``k <= l`` of the rank and their weights (1 on the diagonal, 2 off it)."""
    with torch.inference_mode(False):  # cached: must stay usable by autograd even if first built in inference mode
        k, l = torch.triu_indices(r, r, device=device)
        return k, l, torch.where(k == l, 1.0, 2.0).to(device)


def lowrank_output_variance(
    x_sq: torch.Tensor, A: torch.Tensor, B: torch.Tensor, *, scaling: float, scale_floor: float
) -> torch.Tensor:
    """Output variance ``x**2 @ variance.T`` of a ``linear``-scale layer without forming ``d_out x d_in``.

    With ``sigma = s B A + c`` and variance ``sigma**2 + c**2``:

    ```text
    variance = s**2 (BA)∘(BA) + 2 s c BA + 2 c**2
    (BA)∘(BA) = sum_{k<=l} w_kl (B[:,k] B[:,l]) (A[k] A[l])      (w = 1 on the diagonal, 2 off it)
    ```

    The three terms are stacked into one ``(d_in, P)`` and one ``(P, d_out)`` factor with
    ``P = r (r+1) / 2 + r + 1``, so the cost is two thin matmuls: ``O(N P (d_in + d_out))``
    instead of ``O(N d_in d_out)``.

    Args:
        x_sq: ``(..., d_in)`` squared inputs.
        A: ``(r, d_in)`` scale factor.
        B: ``(d_out, r)`` scale factor.

    Returns:
        ``(..., d_out)`` float32 variances of the sampled part of the output (``>= 0``).
    """
    A_stack, B_stack = lowrank_variance_factors(A, B, scaling=scaling, scale_floor=scale_floor)
    return (x_sq.float() @ A_stack.T) @ B_stack.T


def lowrank_variance_factors(
    A: torch.Tensor, B: torch.Tensor, *, scaling: float, scale_floor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked factors with ``variance == A_stack.T``-free form ``B_stack @ A_stack`` (see above).

    Returns:
        ``A_stack: (P, d_in)`` and ``B_stack: (d_out, P)`` in float32, ``P = r (r+1) / 2 + r + 1``.
    """
    dtype = torch.promote_types(A.dtype, torch.float32)  # at least float32 (float64 stays float64)
    A, B = A.to(dtype), B.to(dtype)
    k, l, weight = _pairs(A.shape[0], A.device)
    A_stack = torch.cat([A[k] * A[l], A, A.new_ones(1, A.shape[1])])
    B_stack = torch.cat(
        [
            (scaling**2) * B[:, k] * B[:, l] * weight,
            (2 * scaling * scale_floor) * B,
            B.new_full((B.shape[0], 1), 2 * scale_floor**2),
        ],
        dim=1,
    )
    return A_stack, B_stack


def gaussian_kl(mean_q: torch.Tensor, var_q: torch.Tensor, mean_p: torch.Tensor, var_p: torch.Tensor) -> torch.Tensor:
    """Element-wise ``KL(N(mean_q, var_q) || N(mean_p, var_p))`` (same shapes in and out)."""
    return 0.5 * (torch.log(var_p) - torch.log(var_q) + (var_q + (mean_q - mean_p).square()) / var_p - 1.0)


def log_normal(value: torch.Tensor, std: float) -> torch.Tensor:
    """Element-wise log density of ``N(0, std**2)`` at ``value``."""
    return -0.5 * math.log(2 * math.pi * std**2) - value.square() / (2 * std**2)


def log_gamma_precision(var: torch.Tensor, a0: float, b0: float) -> torch.Tensor:
    """Element-wise log density of ``Gamma(a0, rate=b0)`` at the precision ``1 / var``."""
    precision = 1.0 / var
    return a0 * math.log(b0) - math.lgamma(a0) + (a0 - 1.0) * torch.log(precision) - b0 * precision


def max_log_prior_per_entry(mean_std: float, a0: float, b0: float) -> float:
    """The largest value of ``log N(mean; 0, mean_std^2) + log Gamma(1/var; a0, b0)`` for one entry.

    Reached at mean 0 and precision ``(a0 - 1) / b0`` (the Gamma's mode); with ``a0 <= 1`` the Gamma density has
    no maximum and 0 is returned (no offset).
    """
    if a0 <= 1.0:
        return 0.0
    mode = (a0 - 1.0) / b0
    log_gamma = a0 * math.log(b0) - math.lgamma(a0) + (a0 - 1.0) * math.log(mode) - b0 * mode
    return -0.5 * math.log(2 * math.pi * mean_std**2) + log_gamma


def global_variance_direction(
    var_p: torch.Tensor,
    var_q: torch.Tensor,
    diff: torch.Tensor,
    *,
    prior_weight: float,
    a0: float,
    b0: float,
) -> torch.Tensor:
    """Natural-gradient direction, in variance coordinates, of the global update's objective per entry.

    The objective of the global variance ``var_p`` for one adapted local posterior ``N(m_q, var_q)`` is
    ``KL(N(m_q, var_q) || N(m_p, var_p)) - prior_weight * log Gamma(1 / var_p; a0, b0)``. Its gradient in
    ``var_p`` times the inverse Fisher information ``2 var_p**2`` is

    ```text
    (1 + 2 w (a0 - 1)) var_p - (var_q + diff**2 + 2 w b0)        (w = prior_weight, diff = m_q - m_p)
    ```

    which no longer depends on the scale of the sum or on ``1 / var_p``: stepping ``var_p -= eps * direction``
    moves the variance a fraction of the way to ``(var_q + diff**2 + 2 w b0) / (1 + 2 w (a0 - 1))``.
    Shapes: all inputs broadcast together; the output has the broadcast shape.
    """
    gain = 1.0 + 2.0 * prior_weight * (a0 - 1.0)
    return gain * var_p - (var_q + diff.square() + 2.0 * prior_weight * b0)


def closed_form_global_moments(
    means: torch.Tensor,
    variances: torch.Tensor,
    *,
    prior_weight: float,
    a0: float,
    b0: float,
    mean_std: float = math.inf,
    iterations: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-entry minimiser of the global update's objective for fixed local posteriors (the reference).

    Minimises over ``(m, v)``, entry by entry,
    ``sum_i KL(N(means[i], variances[i]) || N(m, v)) - n * prior_weight * log p(m, v)`` with the hyperprior
    ``p = N(m; 0, mean_std**2) * Gamma(1/v; a0, b0)``. Stationarity gives

    ```text
    m = mean_i(means) / (1 + w v / mean_std**2)
    v = (mean_i(variances + (means - m)**2) + 2 w b0) / (1 + 2 w (a0 - 1))
    ```

    solved by fixed-point iteration (exact in one step when ``mean_std`` is infinite).

    Args:
        means: ``(n, ...)`` local means, one row per task.
        variances: ``(n, ...)`` local variances.

    Returns:
        ``(mean, variance)``, each of shape ``means.shape[1:]``.
    """
    shrink = 0.0 if math.isinf(mean_std) else prior_weight / mean_std**2
    mean = means.mean(0)
    var = variances.mean(0)
    for _ in range(iterations):
        spread = (variances + (means - mean).square()).mean(0)
        var = (spread + 2.0 * prior_weight * b0) / (1.0 + 2.0 * prior_weight * (a0 - 1.0))
        mean = means.mean(0) / (1.0 + shrink * var)
    return mean, var
