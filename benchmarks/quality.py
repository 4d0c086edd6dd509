"""Quality of ABMLL against the paper's baselines on BIG-bench, with the same data and step budget.

    python benchmarks/quality.py                                   # 5 methods, assets.md split, seeds 0 1 2
    python benchmarks/quality.py --variants softplus weight first_order shots2
    python benchmarks/quality.py --methods abmll --beta 1 1e-5 1e-7 1e-8 1e-16
    python benchmarks/quality.py --methods pretrained regular_lora abmll --prune 0.1 0.3 0.5

Every (configuration, seed) trains on the meta-train tasks for ``--steps`` episodes (LoRA baselines: the same
number of optimizer steps on the same batches), then adapts to each held-out task on 5 support batches of 2 and
predicts up to ``--max-query`` examples. Results are appended to the JSON file as they come (a rerun skips what is
there), and a table with mean ± std over seeds is printed. Pruning zeroes the smallest-magnitude fraction of MLP
hidden units in every layer after training, then runs the same adaptation protocol.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peft_abmll.adaptation import evaluate_tasks
from peft_abmll.baselines import METHODS, train_method
from peft_abmll.cli import DEMO_EVAL_TASKS, DEMO_TRAIN_TASKS
from peft_abmll.data import TaskEncoder
from peft_abmll.experiment import load_causal_lm, resolve_tasks
from peft_abmll.meta.arguments import MetaTrainingArguments
from peft_abmll.tuner.config import ABMLLConfig

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


def run_one(
    name: str,
    method: str,
    seed: int,
    args: argparse.Namespace,
    tasks: tuple,
    model_fn: Any,
    tokenizer: Any,
    prune: float = 0.0,
    config_overrides: dict | None = None,
    arg_overrides: dict | None = None,
) -> dict[str, Any]:
    train, held_out = tasks
    margs = MetaTrainingArguments(
        output_dir=str(Path(args.work_dir) / name / f"seed{seed}"),
        max_steps=args.steps,
        seed=seed,
        learning_rate=args.lr,
        inner_learning_rate=args.inner_lr,
        adaptation_learning_rate=args.adapt_lr,
        max_length=args.max_length,
        eval_max_query=args.max_query,
        report_to=[],
        save_strategy="no",
        logging_steps=10,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        **(arg_overrides or {}),
    )
    config = ABMLLConfig(**(config_overrides or {}))
    start = time.perf_counter()
    model = train_method(method, model_fn, tokenizer, train, margs, config, lora_learning_rate=args.lora_lr)
    train_s = time.perf_counter() - start
    if prune:
        prune_hidden_units(model, prune)
    encoder = TaskEncoder(tokenizer, max_length=args.max_length)
    result = evaluate_tasks(model, held_out, encoder=encoder, **margs.evaluation_kwargs())
    return {
        "name": name,
        "method": method,
        "seed": seed,
        "prune": prune,
        "macro": result["macro"],
        "pooled": result["pooled"],
        "per_task": result["per_task"],
        "train_seconds": train_s,
        "eval_seconds": time.perf_counter() - start - train_s,
    }


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """(name, method, overrides, prune) for every configuration the flags ask for."""
    jobs = []
    for method in args.methods:
        for beta in args.beta or [None]:
            config = {} if beta is None else {"beta": beta}
            suffix = "" if beta is None else f"-beta{beta:g}"
            if method != "abmll" and beta is not None:
                continue
            for prune in args.prune or [0.0]:
                tag = "" if not prune else f"-prune{prune:g}"
                jobs.append(
                    {"name": f"{method}{suffix}{tag}", "method": method, "config": config, "args": {}, "prune": prune}
                )
    for variant in args.variants:
        spec = VARIANTS[variant]
        jobs.append(
            {
                "name": f"abmll-{variant}",
                "method": "abmll",
                "config": spec.get("config", {}),
                "args": spec.get("args", {}),
                "prune": 0.0,
            }
        )
    return jobs


def summarise(records: list[dict[str, Any]]) -> str:
    names = list(dict.fromkeys(r["name"] for r in records))
    lines = [f"{'configuration':<26} {'seeds':>5} {'accuracy':>15} {'ECE':>15} {'NLL':>15} {'train s':>8}"]
    for name in names:
        rows = [r for r in records if r["name"] == name]

        def stat(key: str, rows: list = rows) -> str:
            values = [r["macro"][key] for r in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.3f} ± {spread:.3f}"

        train_s = statistics.mean(r["train_seconds"] for r in rows)
        lines.append(
            f"{name:<26} {len(rows):>5} {stat('accuracy'):>15} {stat('ece'):>15} {stat('nll'):>15} {train_s:>8.0f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--train-tasks", nargs="+", default=list(DEMO_TRAIN_TASKS))
    parser.add_argument("--eval-tasks", nargs="+", default=list(DEMO_EVAL_TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS))
    parser.add_argument("--beta", nargs="*", type=float, default=None, help="ABMLL beta ablation values.")
    parser.add_argument("--prune", nargs="*", type=float, default=None, help="Pruned fractions of hidden units.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40, help="Episodes (LoRA baselines: 5x as many steps).")
    parser.add_argument("--lr", type=float, default=1e-3, help="Global / outer learning rate.")
    parser.add_argument("--inner-lr", type=float, default=1e-3)
    parser.add_argument("--adapt-lr", type=float, default=None)
    parser.add_argument("--lora-lr", type=float, default=None, help="Regular / structured LoRA learning rate.")
    parser.add_argument("--max-query", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/quality.json")
    parser.add_argument("--work-dir", default="/tmp/abmll-quality")
    args = parser.parse_args()

    model_fn, tokenizer = load_causal_lm(args.model)
    tasks = (resolve_tasks(args.train_tasks), resolve_tasks(args.eval_tasks))
    out = Path(args.out)
    records = json.loads(out.read_text())["records"] if out.exists() else []
    done = {(r["name"], r["seed"]) for r in records}
    for job in plan(args):
        for seed in args.seeds:
            if (job["name"], seed) in done:
                continue
            print(f"== {job['name']} seed {seed}", file=sys.stderr, flush=True)
            records.append(
                run_one(
                    job["name"],
                    job["method"],
                    seed,
                    args,
                    tasks,
                    model_fn,
                    tokenizer,
                    prune=job["prune"],
                    config_overrides=job["config"],
                    arg_overrides=job["args"],
                )
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"records": records, "settings": vars(args)}, indent=2))
    print(summarise([r for r in records if r["name"] in {j["name"] for j in plan(args)}]))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
