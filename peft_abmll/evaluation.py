"""Held-out-task evaluation: adapt to each task on a support set, predict the rest, score and write the results.

```python
protocol = EvaluationProtocol(support_batches=5, batch_size=2, max_query=200)
results = evaluate_tasks(model, held_out_tasks, tokenizer=tok, protocol=protocol)
results["macro"]["accuracy"], results["pooled"]["ece"], results["per_task"]["snarks"]["n"]
```
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers.utils.logging import tqdm

from .adaptation import adapt, adaptation_learning_rate, adaptation_scope, encoder_for, predict_proba
from .algorithms import abmll_tuner, require_causal_lm
from .data import TaskData, TaskEncoder, prepare_tasks, seeded_torch_rng
from .metrics import classification_metrics, plot_reliability_diagram

logger = logging.getLogger("peft_abmll")


@dataclass(frozen=True)
class EvaluationProtocol:
    """How a model is scored on held-out tasks: adapt on a support set, predict the query examples.

    Per task, ``support_batches x batch_size`` examples (a seeded draw) are the support set the model adapts to
    in ``support_batches`` steps; up to ``max_query`` of the others are predicted. Every adaptation is undone
    before the next task.
    """

    support_batches: int = 5
    """Adaptation steps per task, one support batch each (0: predict without adapting)."""
    batch_size: int = 2
    """Support examples per adaptation step."""
    lr: Optional[float] = None
    """Adaptation learning rate; None: the rate the adapter was meta-learned for (`adaptation_learning_rate`)."""
    optimizer: str = "adamw"
    """Optimizer of the adaptation steps, fresh per task ('adamw' or 'sgd')."""
    beta: Optional[float] = None
    """Weight of the KL to the global posterior while adapting (ABMLL); None: the adapter's."""
    num_samples: Optional[int] = None
    """Posterior samples averaged per prediction; None: the adapter's ``num_samples``."""
    scoring: Optional[str] = None
    """'letter', 'option' or 'option_sum' (see `predict_proba`); None: the encoder's answer format."""
    max_query: Optional[int] = None
    """Cap on predicted examples per task (None: all but the support set)."""
    num_shots: int = 0
    """Solved support examples put in front of every prompt (in-context examples)."""
    max_choices: int = 4
    """Examples with more options are dropped; probabilities are padded to this width."""
    n_bins: int = 15
    """Equal-width bins of the expected calibration error."""
    seed: int = 0
    """Seeds each task's support draw and adaptation noise (with the task's index)."""

    @property
    def support_size(self) -> int:
        return self.support_batches * self.batch_size

    def adapt_settings(self) -> dict[str, Any]:
        """The keyword arguments of `peft_abmll.adapt` this protocol fixes."""
        return {
            "steps": self.support_batches,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "optimizer": self.optimizer,
            "beta": self.beta,
            "num_shots": self.num_shots,
        }


def evaluate_tasks(
    model: nn.Module,
    tasks: TaskData,
    *,
    tokenizer: Any = None,
    encoder: Optional[TaskEncoder] = None,
    protocol: Optional[EvaluationProtocol] = None,
    output_dir: Optional[Union[str, Path]] = None,
    name: str = "model",
    accelerator: Any = None,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Score `model` on held-out `tasks` under `protocol` (default `EvaluationProtocol()`).

    `settings` override single protocol fields (``evaluate_tasks(model, tasks, tokenizer=tok, max_query=50)``).
    Each task's randomness (support draw, adaptation noise) is seeded from (``seed``, task index in name order),
    so a task's result depends neither on the other tasks nor on the process that evaluates it. Returns per-task
    and macro metrics (accuracy, ECE, NLL, Brier), ``pooled`` metrics over all query examples and the raw
    ``probs`` / ``labels``; with `output_dir`, also writes ``<name>_results.json`` and ``<name>_reliability.png``.

    `progress` shows a bar over the tasks and one over each task's query batches (main process only; off when
    transformers' progress bars are disabled, e.g. ``TrainingArguments(disable_tqdm=True)`` in `MetaTrainer`).

    With `accelerator` (an `accelerate.Accelerator` or `PartialState`) running N processes, every
    process must call this: process ``p`` evaluates the tasks ``p, p + N, ...``, the per-task results
    are gathered (``accelerate.utils.gather_object``), every process returns the same results (equal to
    a single-process run), and only the main process writes files. Under FSDP, where every forward pass
    gathers sharded weights from all processes, every process evaluates every task instead.
    """
    require_causal_lm(model, "evaluate_tasks")
    protocol = _with_settings(protocol or EvaluationProtocol(), settings)
    if protocol.lr is None:
        protocol = dataclasses.replace(protocol, lr=adaptation_learning_rate(model))
    encoder = encoder_for(tokenizer, encoder, model)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    runnable = _runnable_tasks(prepare_tasks(tasks, protocol.max_choices), protocol.support_size, warn=rank == 0)
    main = rank == 0
    show = progress and main
    share, shares = (0, 1) if _every_forward_is_collective(accelerator) else (rank, world)  # FSDP: every task
    mine = tqdm(runnable[share::shares], desc=f"evaluating {name}", unit="task", disable=not show)
    outcomes = [_evaluate_task(model, t, task, rows, encoder, protocol, show) for t, task, rows in mine]
    if shares > 1:
        from accelerate.utils import gather_object

        outcomes = gather_object(outcomes)
    outcomes.sort(key=lambda outcome: outcome[0])  # task order, whatever process evaluated each task
    if not outcomes:
        raise ValueError("No evaluation task had enough examples for the support set plus a query example.")
    results = _summarise(outcomes, protocol)
    if output_dir is not None and main:  # one writer, also when every process evaluated every task
        curves = {name: (torch.tensor(results["probs"]), torch.tensor(results["labels"]))}
        write_results(results, curves, output_dir, name, protocol.n_bins)
    return results


def _every_forward_is_collective(accelerator: Any) -> bool:
    """True under FSDP: each forward all-gathers weights, so the processes must run the same forwards."""
    return accelerator is not None and getattr(accelerator, "distributed_type", None) == DistributedType.FSDP


def record_evaluation(model: nn.Module, results: dict[str, Any]) -> None:
    """Keep `evaluate_tasks`' results in the ABMLL adapter's ``training_record`` (the saved model card shows them).

    Records the held-out tasks, the macro and pooled metrics and the number of query examples; a model without
    an ABMLL adapter is left alone.
    """
    tuner = abmll_tuner(model)
    if tuner is None:
        return
    config = tuner.abmll_config()
    summary = {
        "tasks": sorted(results["per_task"]),
        "query_examples": sum(m["n"] for m in results["per_task"].values()),
        "macro": {k: round(v, 4) for k, v in results["macro"].items()},
        "pooled": {k: round(v, 4) for k, v in results["pooled"].items()},
    }
    config.training_record = {**(config.training_record or {}), "evaluation": summary}


def _with_settings(protocol: EvaluationProtocol, settings: dict[str, Any]) -> EvaluationProtocol:
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(EvaluationProtocol)})
    if unknown:
        raise TypeError(f"evaluate_tasks() got unknown setting(s) {unknown}; see EvaluationProtocol's fields.")
    return dataclasses.replace(protocol, **settings) if settings else protocol


def _runnable_tasks(grouped: dict[str, list], n_support: int, warn: bool) -> list[tuple[int, str, list]]:
    """``(index, task, rows)`` of the tasks with more examples than the support set, in name order."""
    runnable = []
    for t, (task, rows) in enumerate(sorted(grouped.items())):
        if len(rows) > n_support:
            runnable.append((t, task, rows))
        elif warn:
            logger.warning("Eval task %r has %d examples, needs more than %d; skipped.", task, len(rows), n_support)
    return runnable


def _evaluate_task(
    model: nn.Module,
    t: int,
    task: str,
    examples: list[dict[str, Any]],
    encoder: TaskEncoder,
    p: EvaluationProtocol,
    progress: bool = False,
) -> tuple[int, str, torch.Tensor, torch.Tensor]:
    """Adapt to task number `t` and predict its query examples: ``(t, task, probs, labels)`` on the CPU."""
    order = np.random.default_rng([p.seed, t]).permutation(len(examples))
    support = [examples[i] for i in order[: p.support_size]]
    query = [examples[i] for i in order[p.support_size :]][: p.max_query]
    with adaptation_scope(model), seeded_torch_rng(p.seed, t):
        if p.support_batches > 0:
            adapt(model, support, encoder=encoder, **p.adapt_settings(), seed=p.seed + t, task=task)
        probs = predict_proba(
            model,
            query,
            encoder=encoder,
            num_samples=p.num_samples,
            scoring=p.scoring,
            shots=support,
            num_shots=p.num_shots,
            seed=p.seed + t,
            progress=progress,
            desc=task,
        )
    return t, task, probs.cpu(), torch.tensor([e["label"] for e in query])


def _pad(probs: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(probs, (0, max(0, width - probs.shape[1])))


def _summarise(outcomes: list[tuple[int, str, torch.Tensor, torch.Tensor]], p: EvaluationProtocol) -> dict[str, Any]:
    per_task = {
        task: {**classification_metrics(probs, labels, p.n_bins), "n": len(labels)}
        for _, task, probs, labels in outcomes
    }
    probs = torch.cat([_pad(probs, p.max_choices) for *_, probs, _ in outcomes])
    labels = torch.cat([labels for *_, labels in outcomes])
    keys = ("accuracy", "ece", "nll", "brier")
    return {
        "macro": {k: float(np.mean([m[k] for m in per_task.values()])) for k in keys},
        "pooled": classification_metrics(probs, labels, p.n_bins),
        "per_task": per_task,
        "probs": probs.tolist(),
        "labels": labels.tolist(),
    }


def write_results(
    results: dict[str, Any],
    curves: dict[str, tuple[torch.Tensor, torch.Tensor]],
    output_dir: Union[str, Path],
    name: str,
    n_bins: int = 15,
) -> dict[str, Path]:
    """Write ``<name>_results.json`` (without raw probabilities) and ``<name>_reliability.png``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    slim = {k: v for k, v in results.items() if k not in ("probs", "labels")}
    json_path = out / f"{name}_results.json"
    json_path.write_text(json.dumps(slim, indent=2))
    png_path = plot_reliability_diagram(curves, out / f"{name}_reliability.png", n_bins)
    return {"json": json_path, "png": png_path}
