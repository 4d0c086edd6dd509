"""Classification metrics for probabilistic predictions: accuracy, ECE, NLL, Brier, reliability diagrams.

All take ``probs: (n, C)`` (rows sum to 1; invalid options hold 0) and ``labels: (n,)`` integer tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional, Union

import torch

Metric = Callable[[torch.Tensor, torch.Tensor], float]


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose most probable option is the label."""
    return (probs.argmax(dim=-1) == labels).float().mean().item()


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, torch.Tensor]:
    """Top-label confidence binned into `n_bins` equal-width bins on (0, 1].

    Returns:
        ``count``, ``confidence`` (mean per bin) and ``accuracy`` (per bin), each ``(n_bins,)``.
    """
    confidence, predicted = probs.float().max(dim=-1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1, device=probs.device)
    index = torch.bucketize(confidence, edges[1:-1], right=False).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, device=probs.device).index_add_(0, index, torch.ones_like(confidence))
    conf_sum = torch.zeros(n_bins, device=probs.device).index_add_(0, index, confidence)
    acc_sum = torch.zeros(n_bins, device=probs.device).index_add_(0, index, correct)
    safe = count.clamp_min(1)
    return {"count": count, "confidence": conf_sum / safe, "accuracy": acc_sum / safe}


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE (L1) of the top-label confidence, equal-width bins (as torchmetrics' `CalibrationError`)."""
    bins = calibration_bins(probs, labels, n_bins)
    weights = bins["count"] / bins["count"].sum()
    return (weights * (bins["confidence"] - bins["accuracy"]).abs()).sum().item()


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean ``-log p(label)``, with probabilities clamped at 1e-12."""
    return -probs.float().gather(1, labels[:, None]).clamp_min(1e-12).log().mean().item()


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean squared distance between the probabilities and the one-hot label."""
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).float()
    return (probs.float() - onehot).square().sum(dim=-1).mean().item()


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """accuracy, ece, nll and brier in one dict."""
    return {
        "accuracy": accuracy(probs, labels),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
    }


def bootstrap_interval(
    metric: Metric,
    probs: torch.Tensor,
    labels: torch.Tensor,
    groups: Optional[Sequence[int]] = None,
    *,
    other: Optional[torch.Tensor] = None,
    macro: bool = False,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Percentile-bootstrap interval of ``metric(probs, labels)``, or of a paired difference.

    Examples are resampled with replacement *within* each group (task), so every resample keeps the tasks'
    sizes. The percentile interval is shifted by the bootstrap's estimate of the statistic's bias (the mean of
    the resampled values minus the value): ECE on a resample with repeated examples is biased upward, and the
    plain percentile interval of a macro ECE over small tasks can lie wholly above the measured value.
    ``macro=True``: the statistic is the mean over groups of the metric within each group (the macro
    average over tasks) instead of the metric on all examples pooled. With `other` (a second method's
    ``(n, C)`` probabilities on the same examples) the statistic is the paired difference
    ``metric(probs) - metric(other)``, resampled jointly.

    Returns:
        ``{"value", "low", "high", "n"}``: the statistic on all examples, the interval bounds, the example count.
    """
    groups_t = torch.zeros(len(labels), dtype=torch.long) if groups is None else torch.as_tensor(groups)
    members = [torch.nonzero(groups_t == g).flatten() for g in torch.unique(groups_t)]
    generator = torch.Generator().manual_seed(seed)

    def value(p: torch.Tensor, parts: list[torch.Tensor]) -> float:
        if macro:
            return sum(metric(p[i], labels[i]) for i in parts) / len(parts)
        index = torch.cat(parts)
        return metric(p[index], labels[index])

    def statistic(parts: list[torch.Tensor]) -> float:
        return value(probs, parts) - (value(other, parts) if other is not None else 0.0)

    draws = []
    for _ in range(n_resamples):
        draws.append(statistic([m[torch.randint(len(m), (len(m),), generator=generator)] for m in members]))
    ordered = torch.tensor(draws, dtype=torch.float64)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(ordered, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    observed = statistic(members)
    bias = ordered.mean().item() - observed
    return {"value": observed, "low": low - bias, "high": high - bias, "n": len(labels)}


METRICS: dict[str, Metric] = {
    "accuracy": accuracy,
    "nll": negative_log_likelihood,
    "brier": brier_score,
    "ece": expected_calibration_error,
}


def metrics_with_intervals(
    probs: torch.Tensor,
    labels: torch.Tensor,
    groups: Sequence[int],
    *,
    other: Optional[torch.Tensor] = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """Every metric pooled and macro over groups, each with its bootstrap interval (see `bootstrap_interval`).

    Returns:
        ``{"pooled": {metric: interval}, "macro": {metric: interval}}``; with `other`, paired differences.
    """
    return {
        kind: {
            name: bootstrap_interval(
                metric, probs, labels, groups, other=other, macro=kind == "macro", n_resamples=n_resamples, seed=seed
            )
            for name, metric in METRICS.items()
        }
        for kind in ("pooled", "macro")
    }


def plot_reliability_diagram(
    results: dict[str, tuple[torch.Tensor, torch.Tensor]],
    path: Union[str, Path],
    n_bins: int = 15,
    panels: bool = False,
) -> Path:
    """Write a reliability diagram (accuracy vs confidence per bin) as PNG.

    Args:
        results: method name -> ``(probs, labels)``.
        panels: one panel per method side by side (else one line per method on a single panel).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results) if panels else 1
    fig, axes = plt.subplots(1, n, figsize=(4 * n if panels else 5, 4.2 if panels else 5), squeeze=False)
    for i, (name, (probs, labels)) in enumerate(results.items()):
        ax = axes[0, i if panels else 0]
        if panels or i == 0:
            ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
        bins = calibration_bins(probs, labels, n_bins)
        used = bins["count"] > 0
        ece = expected_calibration_error(probs, labels, n_bins)
        conf, acc, count = (bins[k][used].cpu() for k in ("confidence", "accuracy", "count"))
        (line,) = ax.plot(conf, acc, alpha=0.6, label=f"{name} (ECE {ece:.3f}, n={int(count.sum())})")
        ax.scatter(conf, acc, s=20 + 180 * count / count.max(), color=line.get_color(), alpha=0.8)
    for ax in axes[0]:
        ax.set(xlabel="confidence (marker area: examples in the bin)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("Reliability diagram" + (" per method" if panels else ""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
