"""Bootstrap intervals of the quality metrics: coverage, macro vs pooled, paired differences."""

from __future__ import annotations

import math

import pytest
import torch

from peft_abmll import metrics


def _calibrated(n: int, seed: int, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions whose labels are drawn from the predicted probabilities: calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(2 * torch.randn(n, classes, generator=g), dim=-1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(-1)
    return probs, labels


def test_interval_width_matches_the_binomial_standard_error() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(400, dtype=torch.long)
    correct = torch.rand(400, generator=g) < 0.7
    probs = torch.stack([correct.float(), (~correct).float()], dim=-1)
    ci = metrics.bootstrap_interval(metrics.accuracy, probs, labels)
    expected = 2 * 1.96 * math.sqrt(0.7 * 0.3 / 400)
    assert ci["n"] == 400 and ci["low"] < ci["value"] < ci["high"]
    assert ci["high"] - ci["low"] == pytest.approx(expected, rel=0.2)


def test_intervals_cover_the_truth_about_95_percent_of_the_time() -> None:
    """Accuracy of a fixed predictor on fresh samples: the truth is the expected accuracy under its own labels."""
    covered, runs = 0, 100
    for seed in range(runs):
        probs, labels = _calibrated(300, seed)
        truth = probs.max(-1).values.mean().item()  # expected accuracy of a calibrated predictor (this sample's)
        ci = metrics.bootstrap_interval(metrics.accuracy, probs, labels, n_resamples=300, seed=seed)
        covered += ci["low"] <= truth <= ci["high"]
    assert 0.88 <= covered / runs <= 1.0


def test_macro_is_the_mean_over_groups_and_differs_from_pooled() -> None:
    probs, labels = _calibrated(90, 1)
    groups = [0] * 10 + [1] * 80
    probs[:10] = torch.nn.functional.one_hot((labels[:10] + 1) % 3, 3).float()  # group 0: always wrong
    macro = metrics.bootstrap_interval(metrics.accuracy, probs, labels, groups, macro=True, n_resamples=100)
    pooled = metrics.bootstrap_interval(metrics.accuracy, probs, labels, groups, n_resamples=100)
    expected = (0.0 + metrics.accuracy(probs[10:], labels[10:])) / 2
    assert macro["value"] == pytest.approx(expected)
    assert pooled["value"] == pytest.approx(metrics.accuracy(probs, labels))
    assert macro["value"] < pooled["value"]


def test_paired_difference_of_a_method_with_itself_is_exactly_zero() -> None:
    probs, labels = _calibrated(120, 2)
    both = metrics.metrics_with_intervals(probs, labels, [0] * 60 + [1] * 60, other=probs, n_resamples=50)
    for kind in ("pooled", "macro"):
        for stat in both[kind].values():
            assert stat["value"] == stat["low"] == stat["high"] == 0.0


def test_paired_interval_is_narrower_than_the_unpaired_one() -> None:
    """Two close methods on the same examples: pairing removes the examples' own variance."""
    probs, labels = _calibrated(400, 3)
    better = 0.9 * probs + 0.1 * torch.nn.functional.one_hot(labels, 3).float()
    paired = metrics.bootstrap_interval(metrics.negative_log_likelihood, better, labels, other=probs, n_resamples=300)
    alone = metrics.bootstrap_interval(metrics.negative_log_likelihood, better, labels, n_resamples=300)
    assert paired["high"] < 0  # better on every example: the interval excludes 0
    assert paired["high"] - paired["low"] < 0.5 * (alone["high"] - alone["low"])


def test_ece_interval_is_corrected_for_the_resampling_bias() -> None:
    """Macro ECE over small tasks: resampling with repeats inflates ECE; the interval still brackets the value."""
    probs, labels = _calibrated(150, 5)
    groups = [i // 30 for i in range(150)]  # five tasks of 30
    ci = metrics.bootstrap_interval(metrics.expected_calibration_error, probs, labels, groups, macro=True)
    assert ci["low"] <= ci["value"] <= ci["high"]
