"""Quality of ABMLL against the paper's baselines on BIG-bench, with the same data and step budget.

    python benchmarks/quality.py                                   # 5 methods, assets.md split, seeds 0 1 2
    python benchmarks/quality.py --variants softplus weight first_order shots2
    python benchmarks/quality.py --methods abmll --beta 1 1e-5 1e-7 1e-8 1e-16
    python benchmarks/quality.py --methods pretrained regular_lora abmll --prune 0.1 0.3 0.5
    python benchmarks/quality.py --methods abmll --set prior_b0=1e-6 init_std=3e-3
    python benchmarks/quality.py --methods abmll --samples 4 8
    python benchmarks/quality.py --methods abmll reptile --arg outer_step_size=0.1 global_update=gradient

Every (configuration, seed) trains on the meta-train tasks for ``--steps`` episodes (LoRA baselines: the same
number of optimizer steps on the same batches), then adapts to each held-out task on 5 support batches of 2 and
predicts up to ``--max-query`` examples. Results are appended to the JSON file as they come (a rerun skips what is
there), and a table with mean ± std over seeds is printed. Pruning zeroes the smallest-magnitude fraction of MLP
hidden units in every layer after training (each trained model is evaluated unpruned and at every fraction), then
runs the same adaptation protocol. ``--set KEY=VALUE`` adds one ABMLL configuration per pair (an ablation of any
`ABMLLConfig` field), ``--arg KEY=VALUE`` one configuration of every listed method per `MetaTrainingArguments`
field (``reptile-inner_learning_rate=0.001``; what the field means for a LoRA baseline is `train_method`'s); ABMLL
records also hold the median global standard deviation after training. ``--num-samples S`` averages S posterior
samples at prediction (ABMLL; 1 = the posterior mean); ``--samples 4 8`` evaluates every trained ABMLL model
once more per S (records ``abmll-S4``, ...), on the same examples. ``--test_shots 2`` evaluates every trained
model once more with 2 solved support examples in front of each prompt, at test time only (records
``reptile-test_shots2``, ...); ``--num_shots 2`` (or the ``shots2`` variant) puts them in training as well.

The options are `QualityOptions` plus every `MetaTrainingArguments` field (``--learning_rate``, ``--outer_step_size``,
``--answer_format``, ``--num_shots``, aliases such as ``--steps`` / ``--inner-lr``), parsed by `HfArgumentParser`
as in `abmll train`; `PRESETS` lists this benchmark's own defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from peft_abmll.baselines import METHODS, train_method
from peft_abmll.cli import OptionParser
from peft_abmll.evaluation import evaluate_tasks
from peft_abmll.experiment import DEMO_EVAL_TASKS, DEMO_TRAIN_TASKS, load_causal_lm, resolve_tasks, run_method
from peft_abmll.files import atomic_write_text
from peft_abmll.meta.arguments import MetaTrainingArguments
from peft_abmll.meta.checkpoints import last_complete_checkpoint
from peft_abmll.metrics import METRICS, bootstrap_interval, metrics_with_intervals, plot_reliability_diagram
from peft_abmll.tables import render_table
from peft_abmll.tuner.config import ABMLLConfig
from peft_abmll.tuner.layer import ABMLLLayer

#: ABMLL's beta in every configuration that does not set one (``--beta``, ``--set beta=...``). The records named
#: ``abmll``, ``abmll-prune0.02``, ``abmll-S4``, ... were measured at beta 1, the package default before the
#: size-scaled one; pinned so that a rerun resumes them. ``--beta 232`` is the size-scaled default on SmolLM2-135M.
RECORDED_BETA = 1.0

VARIANTS: dict[str, dict[str, Any]] = {
    "softplus": {"config": {"scale_type": "softplus", "sampling": "weight"}},
    "weight": {"config": {"sampling": "weight"}},
    "first_order": {"args": {"first_order": True, "query_batches": 1}},
    "shots2": {"args": {"num_shots": 2}},
}


def prune_hidden_units(model: nn.Module, fraction: float) -> int:
    """Zero the `fraction` of MLP hidden units with the smallest weight norm in every layer; returns the count."""
    pruned = 0
    for module in model.modules():
        down = getattr(module, "down_proj", None)
        if down is None or not hasattr(module, "up_proj"):
            continue
        down_w = down.get_base_layer().weight if hasattr(down, "get_base_layer") else down.weight
        up_w = (
            module.up_proj.get_base_layer().weight
            if hasattr(module.up_proj, "get_base_layer")
            else module.up_proj.weight
        )
        score = down_w.norm(dim=0) * up_w.norm(dim=1)  # per hidden unit
        k = int(fraction * score.numel())
        if k == 0:
            continue
        idx = score.argsort()[:k]
        with torch.no_grad():
            down_w[:, idx] = 0
            up_w[idx] = 0
        pruned += k
    return pruned


def median_layer_global_std(model: nn.Module) -> float | None:
    """Median over adapted layers of the mean global standard deviation per ``Delta W`` entry (None: not ABMLL)."""
    stds = [moments[1].sqrt().mean().item() for moments in _global_moments(model)]
    return statistics.median(stds) if stds else None


def global_mean_rms(model: nn.Module) -> float | None:
    """Root mean square of the global mean update over every adapted entry (None: not ABMLL)."""
    sums = [(moments[0].square().sum().item(), moments[0].numel()) for moments in _global_moments(model)]
    return (sum(s for s, _ in sums) / sum(n for _, n in sums)) ** 0.5 if sums else None


def _global_moments(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        module.posterior_moments(name, "global")
        for module in model.modules()
        if isinstance(module, ABMLLLayer)
        for name in module.abmll_global_mean_A
    ]


@contextmanager
def pruned(model: nn.Module, fraction: float) -> Iterator[None]:
    """Prune `fraction` of the MLP hidden units for the duration of the block, then restore the weights."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items() if "up_proj" in k or "down_proj" in k}
    prune_hidden_units(model, fraction)
    try:
        yield
    finally:
        with torch.no_grad():
            state = model.state_dict()
            for key, value in saved.items():
                state[key].copy_(value)


def run_one(
    job: dict[str, Any],
    seed: int,
    options: QualityOptions,
    base: MetaTrainingArguments,
    tasks: tuple,
    model_fn: Any,
    tokenizer: Any,
    done: Optional[dict[str, dict[str, Any]]] = None,
) -> list[dict[str, Any]]:
    """Train `job` once with `seed`; evaluate it unpruned and at each of the job's prune fractions.

    `done` maps the names of this seed's records already in the results file to them: those evaluations are
    not repeated (a rerun that adds ``--samples`` or ``--prune`` reloads the trained model from its final
    checkpoint and runs only the new evaluations).
    """
    done = done or {}
    train, held_out = tasks
    settings = dict(
        output_dir=str(Path(options.work_dir) / job["name"] / f"seed{seed}"),
        seed=seed,
        save_strategy="steps" if options.save_every else "no",
        save_steps=options.save_every or base.save_steps,
        save_total_limit=1,
    )
    margs = dataclasses.replace(base, **{**settings, **job["args"]})  # a job's own arguments win
    checkpoint = last_complete_checkpoint(margs.output_dir) if options.save_every else None  # an interrupted run
    train_args = (job["method"], model_fn, tokenizer, train)
    config = ABMLLConfig(**{"task_type": "CAUSAL_LM", **job["config"]})
    resume = {"lora_learning_rate": options.lora_lr, "resume_from_checkpoint": True if checkpoint else None}
    if job["name"] in done:  # trained and evaluated before: reload it (training resumes at its end)
        model = train_method(*train_args, margs, config, **resume)
        trained = done[job["name"]]  # its training time and resume step describe the training, not this reload
        unpruned = {"train_seconds": trained["train_seconds"], "resumed_from_step": trained.get("resumed_from_step", 0)}
    else:
        model, unpruned = run_method(*train_args, held_out, margs, config, **resume)
        unpruned["resumed_from_step"] = _checkpoint_step(checkpoint)
    global_std, mean_rms = median_layer_global_std(model), global_mean_rms(model)
    encoder = margs.task_encoder(tokenizer)
    records = []
    for prune, samples, shots in evaluations(job):
        if record_name(job["name"], prune, samples, shots) in done:
            continue
        result = unpruned
        if prune or samples or shots:
            start = time.perf_counter()
            protocol = margs.evaluation_protocol()
            protocol = dataclasses.replace(
                protocol, num_samples=samples or protocol.num_samples, num_shots=shots or protocol.num_shots
            )
            with pruned(model, prune) if prune else nullcontext():
                show = not margs.disable_tqdm
                result = evaluate_tasks(model, held_out, encoder=encoder, protocol=protocol, progress=show)
            result["eval_seconds"] = time.perf_counter() - start
        records.append(
            {
                "name": record_name(job["name"], prune, samples, shots),
                "method": job["method"],
                "seed": seed,
                "prune": prune,
                "samples": samples or None,  # posterior samples averaged per prediction (None: the default)
                "test_shots": shots or None,  # in-context examples added at test time only (None: as trained)
                "macro": result["macro"],
                "pooled": result["pooled"],
                "per_task": result["per_task"],
                "global_std": global_std,
                "global_mean_rms": mean_rms,
                # per query example, in task order: what intervals and paired differences are computed from
                "probs": [[round(p, 6) for p in row] for row in result["probs"]],
                "labels": result["labels"],
                "train_seconds": unpruned["train_seconds"],  # this process's share when resumed
                "resumed_from_step": unpruned["resumed_from_step"],
                "eval_seconds": result["eval_seconds"],
            }
        )
    return records


def _checkpoint_step(checkpoint: Optional[Path]) -> int:
    """The step of a ``checkpoint-<step>`` folder (0: trained from scratch)."""
    return int(checkpoint.name.rpartition("-")[2]) if checkpoint else 0


def _key_value(text: str, fields: Any, flag: str, owner: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or key not in fields:
        raise argparse.ArgumentTypeError(f"{flag} expects FIELD=VALUE with a {owner} field, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def parse_setting(text: str) -> tuple[str, Any]:
    """``"prior_b0=1e-6"`` -> ``("prior_b0", 1e-06)``; the key must be an `ABMLLConfig` field."""
    return _key_value(text, ABMLLConfig.__dataclass_fields__, "--set", "ABMLLConfig")


def parse_argument(text: str) -> tuple[str, Any]:
    """``"outer_step_size=0.1"`` -> ``("outer_step_size", 0.1)``; the key must be a `MetaTrainingArguments` field."""
    return _key_value(text, MetaTrainingArguments.__dataclass_fields__, "--arg", "MetaTrainingArguments")


def plan(args: QualityOptions) -> list[dict[str, Any]]:
    """One job (name, method, config/argument overrides, prune fractions) per configuration the flags ask for."""
    prune = [0.0, *(args.prune or [])]
    jobs = [{"name": m, "method": m, "config": {}, "args": {}, "prune": prune} for m in args.methods]
    if "abmll" in args.methods:
        for beta in args.beta or []:
            jobs.append({"name": f"abmll-beta{beta:g}", "method": "abmll", "config": {"beta": beta}, "args": {}})
        for key, value in map(parse_setting, args.set or []):
            jobs.append({"name": f"abmll-{key}={value}", "method": "abmll", "config": {key: value}, "args": {}})
    for key, value in map(parse_argument, args.arg or []):
        for m in args.methods:
            jobs.append({"name": f"{m}-{key}={value}", "method": m, "config": {}, "args": {key: value}})
    for variant in args.variants:
        spec = VARIANTS[variant]
        jobs.append({"name": f"abmll-{variant}", "method": "abmll", **{"config": {}, "args": {}, **spec}})
    for job in jobs:
        if job["method"] == "abmll":
            job["config"] = {"beta": RECORDED_BETA, **job["config"]}
        job.setdefault("prune", [0.0])
        job["samples"] = list(args.samples or []) if job["method"] == "abmll" else []
        job["test_shots"] = list(args.test_shots or [])
    return jobs


def only(jobs: list[dict[str, Any]], names: Optional[list[str]]) -> list[dict[str, Any]]:
    """The jobs named by ``--only`` (all when it is not given); an unknown name is refused with the known ones."""
    unknown = sorted(set(names or []) - {job["name"] for job in jobs})
    if unknown:
        known = ", ".join(job["name"] for job in jobs)
        raise SystemExit(f"--only {' '.join(unknown)}: not a configuration these flags plan (planned: {known})")
    return [job for job in jobs if not names or job["name"] in names]


def evaluations(job: dict[str, Any]) -> list[tuple[float, int, int]]:
    """(pruned fraction, posterior samples, test-time in-context examples; 0 = as trained) of every evaluation
    of one trained model."""
    shots = [(0.0, 0, k) for k in job.get("test_shots", [])]
    return [(p, 0, 0) for p in job["prune"]] + [(0.0, n, 0) for n in job.get("samples", [])] + shots


def record_name(name: str, prune: float, samples: int, shots: int = 0) -> str:
    """``abmll``, ``abmll-prune0.3``, ``abmll-S8``, ``abmll-test_shots2``: one record per evaluation of a
    configuration."""
    return name + "".join(
        (f"-prune{prune:g}" if prune else "", f"-S{samples}" if samples else "", f"-test_shots{shots}" if shots else "")
    )


def record_names(job: dict[str, Any]) -> list[str]:
    return [record_name(job["name"], *evaluation) for evaluation in evaluations(job)]


def summarise(records: list[dict[str, Any]], markdown: bool = False) -> str:
    """One row per configuration: macro accuracy / ECE / NLL / Brier as mean ± std over seeds, global std, time."""
    header = ["configuration", "seeds", "accuracy", "ECE", "NLL", "Brier", "global σ", "train s"]
    table = []
    for name in dict.fromkeys(r["name"] for r in records):
        rows = [r for r in records if r["name"] == name]

        def stat(key: str, rows: list = rows) -> str:
            values = [r["macro"][key] for r in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.3f} ± {spread:.3f}"

        stds = [r["global_std"] for r in rows if r.get("global_std") is not None]
        sigma = f"{statistics.mean(stds):.1e}" if stds else "-"
        train_s = f"{statistics.mean(r['train_seconds'] for r in rows):.0f}"
        if any(r.get("resumed_from_step") for r in rows):
            train_s += " (resumed: this process's share)"
        table.append([name, str(len(rows)), *map(stat, ("accuracy", "ece", "nll", "brier")), sigma, train_s])
    return render_table(header, table, markdown=markdown, sep="  ")


def interval_summary(
    records: list[dict[str, Any]], reference: str = "pretrained", n_resamples: int = 1000, kind: str = "pooled"
) -> str:
    """Metrics over every seed's query examples with 95 % bootstrap intervals, and paired differences.

    `kind` ``"pooled"`` computes each metric on all examples together, ``"macro"`` averages it over the
    (seed, task) groups. Examples are resampled within (seed, task) groups. The paired difference to
    `reference` uses the seeds both have: their query examples are the same (the split depends on the seed
    alone), so each configuration is compared with the reference example by example; a difference over fewer
    seeds than the row's names them. Records without per-example probabilities (older runs) are left out.
    """
    rows = [r for r in records if "probs" in r and not r["prune"]]
    pooled = {name: _pooled([r for r in rows if r["name"] == name]) for name in dict.fromkeys(r["name"] for r in rows)}
    names = list(METRICS)
    header = ["configuration", "seeds", "n", *names, *(f"Δ {k} vs {reference}" for k in names)]
    table = []
    for name, (probs, labels, groups, seeds) in pooled.items():
        cells = [name, str(len(seeds)), str(len(labels))]
        stats = metrics_with_intervals(probs, labels, groups, n_resamples=n_resamples)[kind]
        cells += [_interval(stats[k]) for k in names]
        pair = _paired(rows, name, reference) if name != reference else None
        if pair is None:
            cells += ["–"] * len(names)
        else:
            (probs, labels, groups, common), other = pair
            diffs = metrics_with_intervals(probs, labels, groups, other=other, n_resamples=n_resamples)[kind]
            note = "" if common == seeds else f" (seeds {','.join(map(str, common))})"
            cells += [_interval(diffs[k], signed=True) + note for k in names]
        table.append(cells)
    return render_table(header, table, markdown=True)


def paired_summary(
    records: list[dict[str, Any]], focus: str = "abmll", n_resamples: int = 1000, kind: str = "pooled"
) -> str:
    """`focus` minus every other configuration, example by example on the seeds both have, with 95 % intervals.

    A difference whose interval excludes zero is marked: ``better`` / ``worse`` for `focus` (lower is better for
    NLL, ECE and Brier). A pruned `focus` (``abmll-prune0.02``) is compared with the unpruned configurations and
    with those pruned by the same fraction; an unpruned one with the unpruned configurations only.
    """
    fraction = next((r["prune"] for r in records if r["name"] == focus), 0.0)
    rows = [r for r in records if "probs" in r and r["prune"] in (0.0, fraction)]
    if not any(r["name"] == focus for r in rows):
        return f"(no records of {focus!r})"
    names = list(METRICS)
    header = ["baseline", "seeds", "n", *(f"Δ {k} ({focus} − baseline)" for k in names)]
    table = []
    for name in dict.fromkeys(r["name"] for r in rows if r["name"] != focus):
        pair = _paired(rows, focus, name)
        if pair is None:
            continue
        (probs, labels, groups, seeds), other = pair
        diffs = metrics_with_intervals(probs, labels, groups, other=other, n_resamples=n_resamples)[kind]
        cells = [_interval(diffs[k], signed=True) + _verdict(k, diffs[k]) for k in names]
        table.append([name, str(len(seeds)), str(len(labels)), *cells])
    return render_table(header, table, markdown=True)


def per_task_summary(records: list[dict[str, Any]], n_resamples: int = 1000) -> str:
    """Accuracy and NLL of every configuration on every held-out task, pooled over seeds, with 95 % intervals."""
    rows = [r for r in records if "probs" in r and not r["prune"]]
    names = list(dict.fromkeys(r["name"] for r in rows))
    tasks = list(dict.fromkeys(task for r in rows for task in r["per_task"]))
    header = ["task", "n", *(f"{name} {k}" for name in names for k in ("accuracy", "nll"))]
    table = []
    for task in tasks:
        cells, n = [], 0
        for name in names:
            probs, labels, groups, _ = _pooled([r for r in rows if r["name"] == name], task=task)
            cells += [
                _interval(bootstrap_interval(METRICS[k], probs, labels, groups, n_resamples=n_resamples))
                for k in ("accuracy", "nll")
            ]
            n = len(labels)
        table.append([task, str(n), *cells])
    return render_table(header, table, markdown=True)


def _verdict(metric: str, diff: dict[str, float]) -> str:
    if diff["low"] <= 0 <= diff["high"]:
        return ""
    higher_is_better = metric == "accuracy"
    return " better" if (diff["low"] > 0) == higher_is_better else " worse"


def plot_reliability(records: list[dict[str, Any]], path: Path, n_bins: int = 10) -> Path:
    """One reliability-diagram panel per configuration, pooled over seeds and held-out tasks (PNG)."""
    rows = [r for r in records if "probs" in r and not r["prune"]]
    results = {}
    for name in dict.fromkeys(r["name"] for r in rows):
        probs, labels, _, _ = _pooled([r for r in rows if r["name"] == name])
        results[name] = (probs, labels)
    return plot_reliability_diagram(results, path, n_bins=n_bins, panels=True)


def _pooled(
    rows: list[dict[str, Any]], task: Optional[str] = None
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Probabilities (padded to 4 options), labels and (seed, task) group ids of `rows`, in seed order.

    With `task`, only that held-out task's examples (records list their tasks' examples in order).
    """
    rows = sorted(rows, key=lambda r: r["seed"])
    probs, labels, groups = [], [], []
    for r in rows:
        p = torch.tensor(r["probs"], dtype=torch.float32)
        p = torch.nn.functional.pad(p, (0, 4 - p.shape[1]))
        start = 0
        for t, (name, result) in enumerate(r["per_task"].items()):
            stop = start + result["n"]
            if task is None or name == task:
                probs.append(p[start:stop])
                labels.extend(r["labels"][start:stop])
                groups.extend([r["seed"] * 1000 + t] * result["n"])
            start = stop
    return torch.cat(probs), torch.tensor(labels), groups, [r["seed"] for r in rows]


def _paired(
    rows: list[dict[str, Any]], name: str, other: str
) -> Optional[tuple[tuple[torch.Tensor, torch.Tensor, list[int], list[int]], torch.Tensor]]:
    """`name`'s pooled examples and `other`'s probabilities on the seeds both have (same examples), or None."""
    common = {r["seed"] for r in rows if r["name"] == name} & {r["seed"] for r in rows if r["name"] == other}
    if not common:
        return None
    on = [r for r in rows if r["seed"] in common]
    return _pooled([r for r in on if r["name"] == name]), _pooled([r for r in on if r["name"] == other])[0]


def _interval(stat: dict[str, float], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(stat['value'])} [{fmt.format(stat['low'])}, {fmt.format(stat['high'])}]"


def pruning_curves(records: list[dict[str, Any]]) -> dict[str, list[tuple[float, float, float]]]:
    """Per method, (pruned fraction, macro accuracy, macro ECE) means over the seeds that have pruned records.

    The unpruned point (fraction 0) averages only seeds that were pruned at some fraction, never a seed the
    curve has no pruned record of; each pruned point averages the seeds pruned at that fraction.
    """
    curves = {}
    for method in dict.fromkeys(r["method"] for r in records if r["prune"]):
        rows = [r for r in records if r["name"] == method or r["name"].startswith(f"{method}-prune")]
        seeds = {r["seed"] for r in rows if r["prune"]}
        rows = [r for r in rows if r["seed"] in seeds]
        curves[method] = [
            (f, *(statistics.mean(r["macro"][k] for r in rows if r["prune"] == f) for k in ("accuracy", "ece")))
            for f in sorted({r["prune"] for r in rows})
        ]
    return curves


def plot_pruning(records: list[dict[str, Any]], path: Path) -> Path:
    """Held-out accuracy and ECE (mean over seeds) against the pruned fraction, one line per method (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for method, points in pruning_curves(records).items():
        for ax, column in zip(axes, (1, 2)):
            ax.plot([100 * p[0] for p in points], [p[column] for p in points], marker="o", label=method)
    for ax, key in zip(axes, ("held-out accuracy", "ECE")):
        ax.set_xlabel("hidden units pruned (%)")
        ax.set_ylabel(key)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass
class QualityOptions:
    """What to compare and where the results go; the training and evaluation settings are `MetaTrainingArguments`."""

    model: str = field(default="smollm2", metadata={"help": "Causal LM (see `peft_abmll.experiment.load_causal_lm`)."})
    train_tasks: list[str] = field(default_factory=lambda: list(DEMO_TRAIN_TASKS), metadata={"help": "Meta-train."})
    eval_tasks: list[str] = field(default_factory=lambda: list(DEMO_EVAL_TASKS), metadata={"help": "Held out."})
    split: Optional[str] = field(
        default=None,
        metadata={"help": "JSON with 'meta_train' and 'validation' task lists (screen.py --choose-split)."},
    )
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": "Methods to compare."})
    variants: list[str] = field(default_factory=list, metadata={"help": f"ABMLL variants: {', '.join(VARIANTS)}."})
    beta: Optional[list[float]] = field(default=None, metadata={"help": "ABMLL beta ablation values."})
    prune: Optional[list[float]] = field(default=None, metadata={"help": "Pruned fractions of hidden units."})
    samples: Optional[list[int]] = field(
        default=None,
        metadata={"help": "Also evaluate every trained ABMLL model averaging S posterior samples (one record per S)."},
    )
    test_shots: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": "Also evaluate every trained model with K solved support examples in front of each prompt, at "
            "test time only (one record per K; --num_shots puts them in training as well)."
        },
    )
    set: Optional[list[str]] = field(default=None, metadata={"help": "ABMLLConfig ablations, FIELD=VALUE."})
    arg: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "MetaTrainingArguments ablations, FIELD=VALUE: one configuration of every listed method per pair."
        },
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "One run per seed."})
    lora_lr: Optional[float] = field(
        default=None, metadata={"help": "Regular / structured LoRA learning rate (default: inner_learning_rate)."}
    )
    only: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Run only these configurations of the plan (e.g. abmll-init_std=0.01 without abmll)."},
    )
    focus: str = field(default="abmll", metadata={"help": "Configuration compared example by example with others."})
    save_every: int = field(default=0, metadata={"help": "Checkpoint every N steps; a rerun resumes from it."})
    out: str = field(default="benchmarks/results/quality.json", metadata={"help": "Results JSON (resumed)."})
    work_dir: str = field(default="/tmp/abmll-quality", metadata={"help": "Checkpoints and trainer outputs."})
    markdown: bool = field(default=False, metadata={"help": "Print the table as Markdown (for docs/)."})
    report_only: bool = field(
        default=False,
        metadata={"help": "Run nothing: print the tables and plots of what --out holds for these configurations."},
    )


#: This benchmark's settings where they differ from `MetaTrainingArguments`' defaults.
PRESETS: dict[str, Any] = {
    "output_dir": "/tmp/abmll-quality",
    "max_steps": 40,
    "learning_rate": 1e-3,
    "max_length": 256,
    "eval_max_query": 200,
    "report_to": "none",
    "save_strategy": "no",
    "logging_steps": 10,
    "seed": 0,
}


def parse(argv: Optional[list[str]] = None) -> tuple[QualityOptions, MetaTrainingArguments]:
    """The options and the base `MetaTrainingArguments` (every field a flag, as in `abmll train`)."""
    parser = OptionParser(
        (QualityOptions, MetaTrainingArguments),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(**PRESETS, use_cpu=not torch.cuda.is_available())
    options, base = parser.parse_owned(argv)  # --beta: the ablation list (MetaTrainingArguments.beta stays None)
    for text in options.set or []:
        parse_setting(text)  # refuse a bad FIELD=VALUE before anything runs
    for text in options.arg or []:
        parse_argument(text)
    unknown = [m for m in options.methods if m not in METHODS] + [v for v in options.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown method or variant {unknown[0]!r}")
    if options.split:
        split = json.loads(Path(options.split).read_text())
        options.train_tasks, options.eval_tasks = split["meta_train"], split["validation"]
    return options, base


def save_records(out: Path, new: list[dict[str, Any]], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Add `new` to the records in `out` as it is on disk now (replacing the same name and seed) and write it
    atomically, under a file lock; returns all records. Runs of different methods can so share one file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        on_disk = json.loads(out.read_text())["records"] if out.exists() else []
        keys = {(r["name"], r["seed"]) for r in new}
        records = [r for r in on_disk if (r["name"], r["seed"]) not in keys] + new
        atomic_write_text(out, json.dumps({"records": records, "settings": settings}, indent=2))
    return records


def run_missing(
    jobs: list[dict[str, Any]], options: QualityOptions, base: MetaTrainingArguments, records: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Train and evaluate every (configuration, seed) of `jobs` not yet in `records`; saves each to ``--out``."""
    model_fn, tokenizer = load_causal_lm(options.model)
    tasks = (resolve_tasks(options.train_tasks), resolve_tasks(options.eval_tasks))
    done = {(r["name"], r["seed"]) for r in records}
    settings = {"options": dataclasses.asdict(options), "arguments": base.to_json_string()}
    for job in jobs:
        for seed in options.seeds:
            if all((name, seed) in done for name in record_names(job)):
                continue
            print(f"== {job['name']} seed {seed}", file=sys.stderr, flush=True)
            previous = {r["name"]: r for r in records if r["seed"] == seed}
            new = run_one(job, seed, options, base, tasks, model_fn, tokenizer, done=previous)
            records = save_records(Path(options.out), new, settings)
    return records


def report(records: list[dict[str, Any]], options: QualityOptions, out: Path) -> None:
    """Print the tables of `records` (the planned configurations on ``--seeds``) and write the PNG plots."""
    print(summarise(records, markdown=options.markdown))
    for kind in ("pooled", "macro"):
        print(f"\n{kind.capitalize()} over seeds and tasks, 95 % bootstrap intervals (resampled within seed x task):")
        print(interval_summary(records, kind=kind))
        print(f"\n{options.focus} minus each baseline ({kind}), paired on the same examples:")
        print(paired_summary(records, focus=options.focus, kind=kind))
    print("\nPer held-out task, pooled over seeds, 95 % bootstrap intervals:")
    print(per_task_summary(records))
    print(f"\nwrote {plot_reliability(records, out.with_suffix('.reliability.png'))}")
    if any(r["prune"] for r in records):
        print(f"wrote {plot_pruning(records, out.with_suffix('.png'))}")


def main(argv: Optional[list[str]] = None) -> None:
    options, base = parse(argv)
    out = Path(options.out)
    records = json.loads(out.read_text())["records"] if out.exists() else []
    jobs = only(plan(options), options.only)
    if options.report_only:
        missing = {(n, s) for job in jobs for n in record_names(job) for s in options.seeds}
        missing -= {(r["name"], r["seed"]) for r in records}
        if missing:
            print(f"--report_only: not in {out} (left out): {sorted(missing)}", file=sys.stderr)
    else:
        records = run_missing(jobs, options, base, records)
        print(f"wrote {out}")
    names = {name for job in jobs for name in record_names(job)}
    chosen = [r for r in records if r["name"] in names and r["seed"] in options.seeds]
    if not chosen:
        raise SystemExit(
            f"No records of {sorted(names)} on seeds {options.seeds} in {out}: check --out, --methods / --only and "
            "--seeds (a run without --report_only trains them)."
        )
    report(chosen, options, out)


if __name__ == "__main__":
    main()
