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

BLOCK_ENTRIES = 1 << 20  # entries of Delta W processed at once


@dataclass(frozen=True)
class ScaleSpec:
    """How factors become moments: ``scale_type``, LoRA ``scaling`` s, ``floor`` c, softplus ``rho0``."""

    scale_type: str
    scaling: float
    floor: float
    rho0: float = 0.0


class _Moments(TypedDict):
    mean: torch.Tensor
    sigma: torch.Tensor
    var: torch.Tensor
    dsigma: torch.Tensor | None  # None for ``linear``: d(sigma)/d(raw) is the constant ``scaling``


def _block_moments(factors: tuple[torch.Tensor, ...], rows: slice, spec: ScaleSpec) -> _Moments:
    """mean, sigma, variance and d(sigma)/d(raw) of the entries in `rows`."""
    mean_A, mean_B, scale_A, scale_B = factors
    mean = (mean_B[rows] @ mean_A) * spec.scaling
    raw = scale_B[rows] @ scale_A
    if spec.scale_type == "linear":
        sigma = spec.scaling * raw + spec.floor
        return {"mean": mean, "sigma": sigma, "var": sigma.square() + spec.floor**2, "dsigma": None}
    sigma = F.softplus(raw + spec.rho0) + spec.floor
    return {"mean": mean, "sigma": sigma, "var": sigma.square(), "dsigma": torch.sigmoid(raw + spec.rho0)}


def _accumulate(
    grads: list[torch.Tensor],
    factors: tuple[torch.Tensor, ...],
    rows: slice,
    g_mean: torch.Tensor,
    g_sigma: torch.Tensor,
    dsigma: torch.Tensor | None,
    spec: ScaleSpec,
) -> None:
    """Chain the entry gradients of one block into the four factor gradients (in place)."""
    mean_A, mean_B, scale_A, scale_B = factors
    g_mean = g_mean * spec.scaling
    g_raw = g_sigma * spec.scaling if dsigma is None else g_sigma * dsigma
    grads[0] += mean_B[rows].T @ g_mean
    grads[1][rows] += g_mean @ mean_A.T
    grads[2] += scale_B[rows].T @ g_raw
    grads[3][rows] += g_raw @ scale_A.T


def _blocks(d_out: int, d_in: int) -> list[slice]:
    step = max(1, BLOCK_ENTRIES // max(d_in, 1))
    return [slice(i, min(i + step, d_out)) for i in range(0, d_out, step)]


def _zeros(factors: tuple[torch.Tensor, ...], wanted: bool) -> list[torch.Tensor]:
    return [torch.zeros_like(f) for f in factors] if wanted else []


def _saved(grads: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """What to save for backward: the four factor gradients, or four ``None`` when none were wanted."""
    return list(grads) if grads else [None] * 4


class _KL(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, spec: ScaleSpec, *factors: torch.Tensor) -> torch.Tensor:
        q, p = tuple(f.float() for f in factors[:4]), tuple(f.float() for f in factors[4:])
        want_q, want_p = any(ctx.needs_input_grad[1:5]), any(ctx.needs_input_grad[5:9])
        grads_q, grads_p = _zeros(q, want_q), _zeros(p, want_p)
        total = torch.zeros((), device=q[0].device)
        for rows in _blocks(q[1].shape[0], q[0].shape[1]):
            mq, mp = _block_moments(q, rows, spec), _block_moments(p, rows, spec)
            diff = mq["mean"] - mp["mean"]
            inv_p = 1.0 / mp["var"]
            ratio = mq["var"] / mp["var"]  # exactly 1 for equal laws, so the KL is exactly 0 there
            total += 0.5 * (ratio - torch.log(ratio) - 1.0 + diff.square() * inv_p).sum()
            if want_q:
                g_sigma = (inv_p - 1.0 / mq["var"]) * mq["sigma"]
                _accumulate(grads_q, q, rows, diff * inv_p, g_sigma, mq["dsigma"], spec)
            if want_p:
                g_sigma = (inv_p - (mq["var"] + diff.square()) * inv_p.square()) * mp["sigma"]
                _accumulate(grads_p, p, rows, -diff * inv_p, g_sigma, mp["dsigma"], spec)
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
        want = any(ctx.needs_input_grad[2:6])
        grads = _zeros(p, want)
        const_n = -0.5 * math.log(2 * math.pi * mean_std**2)
        const_g = a0 * math.log(b0) - math.lgamma(a0)
        total = torch.zeros((), device=p[0].device)
        for rows in _blocks(p[1].shape[0], p[0].shape[1]):
            m = _block_moments(p, rows, spec)
            precision = 1.0 / m["var"]
            log_prec = -torch.log(m["var"])
            n = m["mean"].numel()
            total += n * (const_n + const_g) - (m["mean"].square().sum() / (2 * mean_std**2))
            total += ((a0 - 1.0) * log_prec - b0 * precision).sum()
            if want:
                g_var = -(a0 - 1.0) * precision + b0 * precision.square()
                _accumulate(grads, p, rows, -m["mean"] / mean_std**2, 2.0 * m["sigma"] * g_var, m["dsigma"], spec)
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


class _LocalNoise(torch.autograd.Function):
    """``row_max * sqrt((x / row_max)**2 @ A_stack.T @ B_stack.T) * eps``; saves x, the stacks and a seed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, A_stack: torch.Tensor, B_stack: torch.Tensor, seed: int) -> torch.Tensor:
        row_max = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
        u = (x / row_max).square() @ A_stack.T
        std = (u @ B_stack.T).clamp_min(1e-30).sqrt()
        eps = _seeded_normal(tuple(std.shape), seed, x)
        ctx.save_for_backward(x, A_stack, B_stack)
        ctx.seed = seed
        return row_max * std * eps

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        x, A_stack, B_stack = ctx.saved_tensors
        row_max = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)  # a constant rescale: m * f(x / m) = f(x)
        xs = x / row_max
        xs_sq = xs.square()
        u = xs_sq @ A_stack.T
        std = (u @ B_stack.T).clamp_min(1e-30).sqrt()
        eps = _seeded_normal(tuple(std.shape), ctx.seed, x)
        g_var = grad_out * row_max * eps / (2 * std)  # d out / d var, var taken on the rescaled input
        g_u = g_var @ B_stack
        g_B = g_var.reshape(-1, g_var.shape[-1]).T @ u.reshape(-1, u.shape[-1])
        g_xs_sq = g_u @ A_stack
        g_A = g_u.reshape(-1, g_u.shape[-1]).T @ xs_sq.reshape(-1, xs_sq.shape[-1])
        g_x = g_xs_sq * 2 * xs / row_max
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
