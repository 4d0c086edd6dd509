"""`peft_abmll.bayes` against `torch.distributions` references and dense computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Gamma, Normal, kl_divergence

from peft_abmll import bayes

SETTINGS = settings(max_examples=60, deadline=None)


def _tensor(seed: int, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    """float64 values uniform in ``[low, high)`` from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def _log_uniform(seed: int, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return torch.exp(_tensor(seed, shape, math.log(low), math.log(high)))


shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)
seeds = st.integers(0, 2**31 - 1)


# ----------------------------------------------------------------------------------------- gaussian_kl
@SETTINGS
@given(shape=shapes, seed=seeds, mean_range=st.floats(1e-3, 10.0), var_low=st.floats(1e-8, 1e-2))
def test_gaussian_kl_matches_torch(shape: tuple[int, ...], seed: int, mean_range: float, var_low: float) -> None:
    mean_q, mean_p = _tensor(seed, shape, -mean_range, mean_range), _tensor(seed + 1, shape, -mean_range, mean_range)
    var_q, var_p = _log_uniform(seed + 2, shape, var_low, 10.0), _log_uniform(seed + 3, shape, var_low, 10.0)
    ours = bayes.gaussian_kl(mean_q, var_q, mean_p, var_p)
    reference = kl_divergence(Normal(mean_q, var_q.sqrt()), Normal(mean_p, var_p.sqrt()))
    assert ours.shape == reference.shape == shape
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)
    assert (ours >= -1e-12).all()


@SETTINGS
@given(shape=shapes, seed=seeds)
def test_gaussian_kl_is_exactly_zero_for_equal_laws(shape: tuple[int, ...], seed: int) -> None:
    mean, var = _tensor(seed, shape, -5.0, 5.0).float(), _log_uniform(seed + 1, shape, 1e-12, 1e3).float()
    assert torch.equal(bayes.gaussian_kl(mean, var, mean, var), torch.zeros(shape))


def test_gaussian_kl_positive_when_laws_differ() -> None:
    one = torch.ones(3)
    assert (bayes.gaussian_kl(one, one, -one, one) > 0).all()  # means differ
    assert (bayes.gaussian_kl(one, one, one, 2 * one) > 0).all()  # variances differ


# ----------------------------------------------------------------------------------------- log densities
@SETTINGS
@given(shape=shapes, seed=seeds, std=st.floats(1e-3, 1e2))
def test_log_normal_matches_torch(shape: tuple[int, ...], seed: int, std: float) -> None:
    value = _tensor(seed, shape, -3 * std, 3 * std)
    reference = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)).log_prob(value)
    torch.testing.assert_close(bayes.log_normal(value, std), reference, rtol=1e-10, atol=1e-10)


@SETTINGS
@given(shape=shapes, seed=seeds, a0=st.floats(0.1, 10.0), b0=st.floats(1e-4, 10.0))
def test_log_gamma_precision_matches_torch(shape: tuple[int, ...], seed: int, a0: float, b0: float) -> None:
    var = _log_uniform(seed, shape, 1e-4, 1e2)
    reference = Gamma(torch.tensor(a0, dtype=torch.float64), torch.tensor(b0, dtype=torch.float64)).log_prob(1 / var)
    torch.testing.assert_close(bayes.log_gamma_precision(var, a0, b0), reference, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------- entry_variance
dims = st.integers(1, 6)


@SETTINGS
@given(r=dims, d_in=dims, d_out=dims, seed=seeds, scaling=st.floats(0.1, 8.0), scale_floor=st.floats(1e-8, 0.1))
def test_entry_variance_linear(r: int, d_in: int, d_out: int, seed: int, scaling: float, scale_floor: float) -> None:
    A, B = _tensor(seed, (r, d_in), -1, 1).float(), _tensor(seed + 1, (d_out, r), -1, 1).float()
    ours = bayes.entry_variance(A, B, scale_type="linear", scaling=scaling, scale_floor=scale_floor)
    expected = (scaling * B.double() @ A.double() + scale_floor).square() + scale_floor**2
    assert ours.dtype == torch.float32 and ours.shape == (d_out, d_in)
    assert (ours > 0).all()
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-7 * scaling**2)


@SETTINGS
@given(r=dims, d_in=dims, d_out=dims, seed=seeds, scale_floor=st.floats(1e-8, 0.1), rho0=st.floats(-8.0, 3.0))
def test_entry_variance_softplus(r: int, d_in: int, d_out: int, seed: int, scale_floor: float, rho0: float) -> None:
    A, B = _tensor(seed, (r, d_in), -1, 1).float(), _tensor(seed + 1, (d_out, r), -1, 1).float()
    ours = bayes.entry_variance(A, B, scale_type="softplus", scaling=2.0, scale_floor=scale_floor, rho0=rho0)
    expected = (F.softplus(B.double() @ A.double() + rho0) + scale_floor).square()
    assert (ours > 0).all()
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-12)


def test_entry_variance_computes_in_float32_from_half_inputs() -> None:
    A, B = torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(4, 2, dtype=torch.float16)
    assert bayes.entry_variance(A, B, scale_type="linear", scaling=1.0, scale_floor=1e-3).dtype == torch.float32


def test_entry_variance_rejects_unknown_scale_type() -> None:
    with pytest.raises(ValueError, match="scale_type"):
        bayes.entry_variance(torch.ones(1, 1), torch.ones(1, 1), scale_type="exp", scaling=1.0, scale_floor=1e-3)


# ----------------------------------------------------------------------------------------- lowrank_output_variance
@SETTINGS
@given(
    r=st.integers(1, 8),
    d_in=st.integers(1, 12),
    d_out=st.integers(1, 12),
    rows=st.integers(1, 4),
    seed=seeds,
    scaling=st.floats(0.1, 8.0),
    scale_floor=st.floats(1e-8, 0.1),
)
def test_lowrank_output_variance_equals_dense(
    r: int, d_in: int, d_out: int, rows: int, seed: int, scaling: float, scale_floor: float
) -> None:
    A, B = _tensor(seed, (r, d_in), -1, 1).float(), _tensor(seed + 1, (d_out, r), -1, 1).float()
    x = _tensor(seed + 2, (2, rows, d_in), -2, 2).float()
    ours = bayes.lowrank_output_variance(x.square(), A, B, scaling=scaling, scale_floor=scale_floor)
    variance = bayes.entry_variance(A, B, scale_type="linear", scaling=scaling, scale_floor=scale_floor).double()
    dense = x.double().square() @ variance.T
    # cancellation-aware tolerance: the terms are bounded by the variance built from |A|, |B|
    bound = (
        x.double().square()
        @ ((scaling * B.double().abs() @ A.double().abs() + scale_floor).square() + scale_floor**2).T
    )
    assert ours.shape == (2, rows, d_out) and ours.dtype == torch.float32
    assert ((ours.double() - dense).abs() <= 1e-5 * bound + 1e-30).all()


# ----------------------------------------------------------------------------------------- inverse_softplus
@SETTINGS
@given(y=st.floats(1e-12, 1e4))
def test_inverse_softplus_round_trips(y: float) -> None:
    x = bayes.inverse_softplus(y)
    assert math.isfinite(x)
    value = F.softplus(torch.tensor(x, dtype=torch.float64)).item()
    assert value == pytest.approx(y, rel=1e-9)


@pytest.mark.parametrize("y", [0.0, -1.0])
def test_inverse_softplus_rejects_non_positive(y: float) -> None:
    with pytest.raises(ValueError, match="y > 0"):
        bayes.inverse_softplus(y)


def test_lowrank_variance_cache_survives_inference_mode() -> None:
    """The cached pair indices built under inference_mode must still work with autograd afterwards."""
    from peft_abmll.bayes import _pairs

    _pairs.cache_clear()
    A, B = torch.randn(3, 5), torch.randn(4, 3)
    with torch.inference_mode():
        bayes.lowrank_output_variance(torch.rand(2, 5), A, B, scaling=2.0, scale_floor=1e-3)
    A.requires_grad_(True)
    bayes.lowrank_output_variance(torch.rand(2, 5), A, B, scaling=2.0, scale_floor=1e-3).sum().backward()
    assert A.grad is not None and torch.isfinite(A.grad).all()
