"""The fused KL / log-prior give the reference values and gradients (autograd through `peft_abmll.bayes`)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_abmll import bayes, fused

SPECS = [fused.ScaleSpec("linear", 2.0, 1e-3), fused.ScaleSpec("softplus", 2.0, 1e-3, bayes.inverse_softplus(0.05))]


def _factors(r: int, d_in: int, d_out: int, seed: int, spread: float) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(r, d_in), (d_out, r), (r, d_in), (d_out, r)]
    return tuple((torch.randn(s, generator=g, dtype=torch.float64) * spread).requires_grad_() for s in shapes)


def _ref_entry_variance(A, B, spec):  # float64 version of bayes.entry_variance (which casts to float32)
    raw = B @ A
    if spec.scale_type == "linear":
        return (spec.scaling * raw + spec.scale_floor) ** 2 + spec.scale_floor**2
    return (torch.nn.functional.softplus(raw + spec.rho0) + spec.scale_floor) ** 2


def _grads(value: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(value, tensors))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.scale_type)
@settings(max_examples=25, deadline=None)
@given(
    r=st.integers(1, 4),
    d_in=st.integers(1, 9),
    d_out=st.integers(1, 9),
    seed=st.integers(0, 10**6),
    block=st.sampled_from([1, 3, 1 << 20]),
)
def test_fused_kl_matches_reference(spec, r, d_in, d_out, seed, block) -> None:
    q, p = _factors(r, d_in, d_out, seed, 0.3), _factors(r, d_in, d_out, seed + 1, 0.3)
    ref = bayes.gaussian_kl(
        spec.scaling * q[1] @ q[0],
        _ref_entry_variance(q[2], q[3], spec),
        spec.scaling * p[1] @ p[0],
        _ref_entry_variance(p[2], p[3], spec),
    ).sum()
    previous, fused.BLOCK_ENTRIES = fused.BLOCK_ENTRIES, block  # also exercise row blocking
    try:
        got = fused.fused_kl(q, p, spec)
    finally:
        fused.BLOCK_ENTRIES = previous
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
    for a, b in zip(_grads(got, q + p), _grads(ref, q + p)):
        # the fused path runs in float32: compare each gradient at float32 precision of its own scale
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4 * float(b.abs().max()) + 1e-8)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.scale_type)
@settings(max_examples=25, deadline=None)
@given(
    r=st.integers(1, 4),
    d_in=st.integers(1, 9),
    d_out=st.integers(1, 9),
    seed=st.integers(0, 10**6),
    a0=st.floats(0.5, 3.0),
    b0=st.floats(1e-3, 1.0),
    mean_std=st.floats(0.1, 2.0),
)
def test_fused_log_prior_matches_reference(spec, r, d_in, d_out, seed, a0, b0, mean_std) -> None:
    p = _factors(r, d_in, d_out, seed, 0.3)
    var = _ref_entry_variance(p[2], p[3], spec)
    ref = bayes.log_normal(spec.scaling * p[1] @ p[0], mean_std).sum() + bayes.log_gamma_precision(var, a0, b0).sum()
    got = fused.fused_log_prior(p, spec, mean_std, a0, b0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-3)
    for a, b in zip(_grads(got, p), _grads(ref, p)):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4 * float(b.abs().max()) + 1e-4)


def test_fused_kl_is_exactly_zero_for_equal_laws_and_skips_unneeded_grads() -> None:
    q = _factors(2, 5, 4, 0, 0.3)
    p = tuple(t.detach().clone() for t in q)  # no gradient wanted on the global side
    kl = fused.fused_kl(q, p, SPECS[0])
    assert kl.item() == 0.0
    grads = torch.autograd.grad(kl, q)
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    both = tuple(t.detach().clone().requires_grad_() for t in q)  # equal laws, gradients wanted on both sides
    kl = fused.fused_kl(q, both, SPECS[1])
    assert kl.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in torch.autograd.grad(kl, q + both))
    nudged = (both[0].detach() + 1e-3, *both[1:])  # any difference leaves the shortcut: KL > 0
    assert fused.fused_kl(q, nudged, SPECS[1]).item() > 0


def test_fused_kl_float32_inputs_give_float32_grads() -> None:
    q = tuple(t.detach().float().requires_grad_() for t in _factors(2, 5, 4, 0, 0.3))
    p = tuple(t.detach().float() for t in _factors(2, 5, 4, 1, 0.3))
    kl = fused.fused_kl(q, p, SPECS[1])
    assert kl.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in torch.autograd.grad(kl, q))


def test_lowrank_noise_gradcheck_and_matches_dense_law() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    A = (torch.randn(2, 5, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    B = (torch.randn(4, 2, generator=g, dtype=torch.float64) * 0.5).requires_grad_()

    def noise(x, A, B):
        A_stack, B_stack = bayes.lowrank_variance_factors(A, B, scaling=2.0, scale_floor=1e-2)
        return fused.lowrank_noise(x, A_stack, B_stack, seed=7)

    assert torch.autograd.gradcheck(noise, (x, A, B))
    # same seed, same draw: |noise| is the exact per-unit std sqrt(x^2 @ var.T) times |eps|
    var = bayes.entry_variance(A, B, scale_type="linear", scaling=2.0, scale_floor=1e-2).double()
    eps = fused._seeded_normal((2, 3, 4), 7, x)
    torch.testing.assert_close(noise(x, A, B), (x.square() @ var.T).sqrt() * eps, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the gradient-free path (prediction) draws the same sample
        torch.testing.assert_close(noise(x, A, B), (x.square() @ var.T).sqrt() * eps, rtol=1e-5, atol=1e-6)


def test_weight_noise_gradcheck() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    std = torch.rand(4, 5, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, s: fused.weight_noise(x, s, seed=3), (x, std))
    eps = fused._seeded_normal((4, 5), 3, x)
    torch.testing.assert_close(fused.weight_noise(x, std, 3), x @ (std * eps).T)
