"""What S posterior samples buy over the posterior mean, on a generated family whose calibrated answer is known.

    python benchmarks/samples.py                       # beta 0 and 1, S = 1 4 16, seeds 0 1 2 (about 5 minutes)
    python benchmarks/samples.py --samples 1 8 --noise 0.2 --seeds 0

The family (`peft_abmll.synthetic.task_family`, rule "first") answers the first option, but each label is
replaced by a random option with probability ``--noise``: the calibrated prediction is known
(``1 - p + p/3`` on the first option), so is the best attainable NLL (its entropy) and an ECE of 0. A tiny
Llama (``--init-range 1``: weights large enough for confident predictions) is meta-trained with ABMLL on the
training tasks; then on held-out tasks of the same family each
prediction mode adapts on 5 support batches and predicts the rest: the posterior mean (S = 1, deterministic)
and the average of S seeded posterior samples. Metrics are pooled over all query examples with 95 % bootstrap
intervals (examples resampled within tasks), and the paired difference to the mean prediction on the same
examples; ``eval time`` is the time of adaptation plus prediction, as a ratio to the mean mode's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model

from peft_abmll import ABMLLConfig, MetaTrainer, MetaTrainingArguments, TaskEncoder
from peft_abmll.data import seeded_torch_rng
from peft_abmll.evaluation import evaluate_tasks
from peft_abmll.metrics import METRICS as ALL_METRICS
from peft_abmll.metrics import bootstrap_interval
from peft_abmll.synthetic import best_probabilities, task_family, tiny_lm, tiny_tokenizer
from peft_abmll.tables import render_table

METRICS = {key: ALL_METRICS[key] for key in ("accuracy", "nll", "ece")}


def meta_train(tokenizer: Any, beta: float, seed: int, args: argparse.Namespace) -> Any:
    """ABMLL meta-trained on the noisy family (tiny Llama, inner / test-time rate ``args.inner_lr``)."""
    train = task_family(args.train_tasks, 40, seed=seed, rule="first", label_noise=args.noise)
    with seeded_torch_rng(seed, 1):
        base = tiny_lm(tokenizer, seed=seed, initializer_range=args.init_range)
        model = get_peft_model(base, ABMLLConfig(beta=beta))
    margs = MetaTrainingArguments(
        output_dir=str(Path(args.work_dir) / f"beta{beta:g}-seed{seed}"),
        max_steps=args.steps,
        inner_learning_rate=args.inner_lr,
        seed=seed,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=args.steps,
        answer_format="letter",  # the family's rule is a shared offset in letter space (always "A)")
    )
    MetaTrainer(model=model, args=margs, train_dataset=train, processing_class=tokenizer).train()
    return model


def evaluate_modes(model: Any, tokenizer: Any, seed: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Pooled NLL / ECE with intervals for the mean and every S, paired against the mean."""
    held_out = task_family(args.eval_tasks, 10 + args.queries, seed=1000 + seed, prefix="new", label_noise=args.noise)
    encoder = TaskEncoder(tokenizer, answer_format="letter")
    outputs = {}
    for samples in args.samples:
        mode = "mean" if samples == 1 else f"S={samples}"
        start = time.perf_counter()
        result = evaluate_tasks(
            model, held_out, encoder=encoder, lr=args.inner_lr, num_samples=None if samples == 1 else samples, seed=seed
        )
        groups = [i for i, m in enumerate(result["per_task"].values()) for _ in range(m["n"])]
        outputs[mode] = {
            "probs": torch.tensor(result["probs"]),
            "labels": torch.tensor(result["labels"]),
            "groups": groups,
            "seconds": time.perf_counter() - start,
        }
    mean = outputs["mean"]
    rows = {}
    for mode, out in outputs.items():
        row: dict[str, Any] = {"seconds": out["seconds"], "seconds_ratio": out["seconds"] / mean["seconds"]}
        for key, metric in METRICS.items():
            row[key] = bootstrap_interval(metric, out["probs"], out["labels"], out["groups"], seed=seed)
            if mode != "mean":
                row[f"{key}_minus_mean"] = bootstrap_interval(
                    metric, out["probs"], out["labels"], out["groups"], other=mean["probs"], seed=seed
                )
        rows[mode] = row
    return rows


def table(records: list[dict[str, Any]], noise: float) -> str:
    """The calibrated predictor's numbers, then one Markdown row per (beta, seed, prediction mode)."""
    best = torch.tensor(best_probabilities(noise))
    entropy = float(-(best * best.log()).sum())
    header = ["beta", "seed", "mode", "n", "accuracy [95 % CI]", "NLL [CI]", "Δ NLL vs mean [CI]", "ECE [CI]"]
    header += ["Δ ECE vs mean [CI]", "eval time × mean"]
    rows = []
    for r in records:
        for mode, row in r["modes"].items():
            cells = [_cell(row, k) for k in ("accuracy", "nll", "nll_minus_mean", "ece", "ece_minus_mean")]
            rows.append([f"{r['beta']:g}", str(r["seed"]), mode, str(row["nll"]["n"]), *cells])
            rows[-1].append(f"{row['seconds_ratio']:.2f}")
    note = f"calibrated predictor (known truth): NLL {entropy:.3f}, ECE 0"
    return note + "\n" + render_table(header, rows, markdown=True)


def _cell(row: dict[str, Any], key: str) -> str:
    if key not in row:
        return "–"
    v, fmt = row[key], "{:+.3f}" if "minus" in key else "{:.3f}"
    return f"{fmt.format(v['value'])} [{fmt.format(v['low'])}, {fmt.format(v['high'])}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", nargs="+", type=int, default=[1, 4, 16], help="S values (1 = the mean).")
    parser.add_argument("--betas", nargs="+", type=float, default=[0.0, 1.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--noise", type=float, default=0.3, help="Label noise of the family (the known truth).")
    parser.add_argument("--steps", type=int, default=200, help="Meta-training episodes.")
    parser.add_argument("--inner-lr", type=float, default=1e-2, help="Inner and test-time learning rate.")
    parser.add_argument(
        "--init-range",
        type=float,
        default=1.0,
        help="initializer_range of the tiny Llama (at transformers' 0.02 its head cannot express confidence).",
    )
    parser.add_argument("--train-tasks", type=int, default=8)
    parser.add_argument("--eval-tasks", type=int, default=8)
    parser.add_argument("--queries", type=int, default=60, help="Query examples per held-out task.")
    parser.add_argument("--out", default="benchmarks/results/samples.json")
    parser.add_argument("--work-dir", default="/tmp/abmll-samples")
    args = parser.parse_args()
    if 1 not in args.samples:
        args.samples = [1, *args.samples]
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    records = []
    for beta in args.betas:
        for seed in args.seeds:
            print(f"== beta {beta:g} seed {seed}", file=sys.stderr, flush=True)
            model = meta_train(tokenizer, beta, seed, args)
            modes = evaluate_modes(model, tokenizer, seed, args)
            for row in modes.values():
                row.pop("probs", None)
            records.append({"beta": beta, "seed": seed, "modes": modes})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"records": records, "settings": vars(args)}, indent=2))
    print(table(records, args.noise))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
