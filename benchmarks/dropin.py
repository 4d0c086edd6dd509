"""ABMLL as a drop-in Bayesian LoRA: single-task fine-tuning with a plain `transformers.Trainer`, as BLoB measures it.

    python benchmarks/dropin.py                                  # movie_recommendation, 3 seeds (resumes)
    python benchmarks/dropin.py --task snarks --epochs 5 --seeds 0 --samples 1 8
    python benchmarks/dropin.py --set init_std=0.01                # an ABMLL variant; LoRA records are reused

One BIG-bench multiple-choice task, answers in the option format (the option's text, scored by its mean token
log-likelihood). Per seed, the task's examples are split once into ``--train`` training examples and ``--eval``
held-out ones; LoRA and ABMLL (the same rank, targets and learning rate; ABMLL's model adds its variational term
to the loss, `ABMLLConfig.loss_beta`) train for ``--epochs`` passes with a plain `Trainer` — several epochs, where
LoRA grows overconfident. Then every configuration predicts the held-out examples: LoRA, ABMLL's posterior mean
(S = 1) and ABMLL averaging S posterior samples. Accuracy, NLL, Brier and ECE with 95 % bootstrap intervals
(pooled over seeds, resampling within seeds) and the paired difference to LoRA on the same examples. Results go to
``--out`` as they come (a rerun skips what is there), the reliability diagram next to it as PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from peft_abmll import ABMLLConfig, TaskEncoder, VariationalLossCallback
from peft_abmll.adaptation import predict_proba
from peft_abmll.baselines import default_lora_config
from peft_abmll.data import prepare_tasks, seeded_torch_rng
from peft_abmll.experiment import load_causal_lm, resolve_tasks
from peft_abmll.metrics import METRICS, metrics_with_intervals, plot_reliability_diagram
from peft_abmll.tables import render_table


class EncodedRows(torch.utils.data.Dataset):
    """Examples encoded for causal-LM training (loss on the answer tokens only)."""

    def __init__(self, rows: list[dict[str, Any]], encoder: TaskEncoder) -> None:
        self.encoded = [encoder.encode(r) for r in rows]

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {k: self.encoded[i][k] for k in ("input_ids", "labels")}


def split(rows: list[dict[str, Any]], n_train: int, n_eval: int, seed: int) -> tuple[list, list]:
    """A seeded split: the first `n_eval` of a permutation are held out, the next `n_train` train."""
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order[n_eval : n_eval + n_train]], [rows[i] for i in order[:n_eval]]


def fine_tune(model: Any, rows: list, encoder: TaskEncoder, seed: int, args: argparse.Namespace, out: Path) -> float:
    """Train `model` on `rows` with a plain Trainer for ``args.epochs`` epochs; returns the seconds it took."""
    targs = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=25,
        report_to=[],
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        seed=seed,
        disable_tqdm=args.quiet,
    )
    start = time.perf_counter()
    Trainer(
        model=model,
        args=targs,
        train_dataset=EncodedRows(rows, encoder),
        data_collator=encoder.collate,
        callbacks=[VariationalLossCallback()],
    ).train()
    return time.perf_counter() - start


def abmll_name(settings: dict[str, Any]) -> str:
    """``abmll`` or ``abmll[init_std=0.01]``: the configuration's name in the records."""
    return "abmll" + (f"[{','.join(f'{k}={v}' for k, v in settings.items())}]" if settings else "")


def record_name(config: str, samples: int, scoring: str) -> str:
    """``lora``, ``abmll-S8``, ``lora|option_sum``: a configuration, its prediction mode and its scoring."""
    name = config if config == "lora" else f"{config}-S{samples}"
    return name if scoring == "option" else f"{name}|{scoring}"


def record_names(args: argparse.Namespace) -> list[str]:
    """The records one seed produces: per scoring, LoRA, then ABMLL once per prediction mode S."""
    abmll = abmll_name(getattr(args, "settings", {}))
    return [
        record_name(config, s, scoring)
        for scoring in getattr(args, "scorings", ["option"])
        for config, modes in (("lora", [1]), (abmll, args.samples))
        for s in modes
    ]


def run_seed(
    seed: int, rows: list, model_fn: Any, tokenizer: Any, args: argparse.Namespace, done: frozenset = frozenset()
) -> list[dict[str, Any]]:
    """LoRA and ABMLL fine-tuned on the same examples; one record per prediction mode and scoring (those in `done`
    are skipped; a configuration with nothing left to predict is not trained)."""
    train, held_out = split(rows, args.train, args.eval, seed)
    encoder = TaskEncoder(tokenizer, max_length=args.max_length, answer_format="option")
    abmll = ABMLLConfig(task_type="CAUSAL_LM", r=args.r, lora_alpha=2 * args.r, **getattr(args, "settings", {}))
    configs = {"lora": default_lora_config(abmll), abmll_name(getattr(args, "settings", {})): abmll}
    labels = [r["label"] for r in held_out]
    records = []
    for name, config in configs.items():
        todo = [
            (s, scoring, record_name(name, s, scoring))
            for scoring in getattr(args, "scorings", ["option"])
            for s in ([1] if name == "lora" else args.samples)
        ]
        todo = [item for item in todo if item[2] not in done]
        if not todo:
            continue
        with seeded_torch_rng(seed, 1):
            model = get_peft_model(model_fn(), config)
        seconds = fine_tune(model, train, encoder, seed, args, Path(args.work_dir) / f"{name}-seed{seed}")
        for samples, scoring, label in todo:
            start = time.perf_counter()
            probs = predict_proba(
                model, held_out, encoder=encoder, num_samples=samples, scoring=scoring, progress=not args.quiet
            )
            records.append(
                {
                    "name": label,
                    "seed": seed,
                    "scoring": scoring,
                    "probs": [[round(p, 6) for p in row] for row in probs.tolist()],
                    "labels": labels,
                    "train_seconds": seconds,
                    "eval_seconds": time.perf_counter() - start,
                }
            )
        del model
    return records


def pooled(records: list[dict[str, Any]], name: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Probabilities (padded to 4 options), labels and seed groups of configuration `name`, in seed order."""
    rows = sorted((r for r in records if r["name"] == name), key=lambda r: r["seed"])
    probs = [torch.nn.functional.pad(torch.tensor(r["probs"]), (0, 4 - len(r["probs"][0]))) for r in rows]
    groups = [r["seed"] for r in rows for _ in r["labels"]]
    return torch.cat(probs), torch.tensor([y for r in rows for y in r["labels"]]), groups


def summary(records: list[dict[str, Any]], reference: str = "lora") -> str:
    """Metrics with 95 % intervals, and each configuration minus `reference` (same scoring) on the same examples."""
    names = list(dict.fromkeys(r["name"] for r in records))
    header = ["configuration", "seeds", "n", *METRICS, *(f"Δ {k} vs {reference}" for k in METRICS)]
    table = []
    for name in names:
        scoring = name.partition("|")[2]
        ref_name = f"{reference}|{scoring}" if scoring else reference
        ref = pooled(records, ref_name) if ref_name in names and name != ref_name else None
        probs, labels, groups = pooled(records, name)
        stats = metrics_with_intervals(probs, labels, groups)["pooled"]
        cells = [name.replace("|", "\\|"), str(len(set(groups))), str(len(labels)), *(_ci(stats[k]) for k in METRICS)]
        if ref is not None and ref[2] == groups:
            diffs = metrics_with_intervals(probs, labels, groups, other=ref[0])["pooled"]
            cells += [_ci(diffs[k], signed=True) for k in METRICS]
        else:
            cells += ["–"] * len(METRICS)
        table.append(cells)
    return render_table(header, table, markdown=True)


def _ci(stat: dict[str, float], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(stat['value'])} [{fmt.format(stat['low'])}, {fmt.format(stat['high'])}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="movie_recommendation")
    parser.add_argument("--train", type=int, default=300, help="Training examples.")
    parser.add_argument("--eval", type=int, default=200, help="Held-out examples.")
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--samples", nargs="+", type=int, default=[1, 8], help="ABMLL prediction modes (S).")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--scorings",
        nargs="+",
        default=["option"],
        choices=["option", "option_sum"],
        help="How predictions become option probabilities (predict_proba's scoring); each trained model is scored "
        "every way. Records of other scorings are named name|scoring.",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="ABMLLConfig settings of the ABMLL run (e.g. init_std=0.01), named abmll[init_std=0.01] in the records; "
        "LoRA records of the same seed in --out are reused.",
    )
    parser.add_argument("--out", default="benchmarks/results/dropin.json")
    parser.add_argument("--work-dir", default="/tmp/abmll-dropin")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    parser.add_argument("--markdown", action="store_true", help="Only print the table of what --out holds.")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import parse_setting  # the --set parser of the quality benchmark

    args.settings = dict(parse_setting(text) for text in args.set)
    out = Path(args.out)
    records = json.loads(out.read_text())["records"] if out.exists() else []
    if not args.markdown:
        model_fn, tokenizer = load_causal_lm(args.model)
        rows = [r for task_rows in prepare_tasks(resolve_tasks([args.task]), 4).values() for r in task_rows]
        for seed in args.seeds:
            done = frozenset(r["name"] for r in records if r["seed"] == seed)
            if set(record_names(args)) <= done:
                continue
            print(f"== seed {seed}", file=sys.stderr, flush=True)
            records += run_seed(seed, rows, model_fn, tokenizer, args, done)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"records": records, "settings": vars(args)}, indent=1))
    print(summary(records))
    curves = {name: pooled(records, name)[:2] for name in dict.fromkeys(r["name"] for r in records)}
    if curves:
        print(f"wrote {plot_reliability_diagram(curves, out.with_suffix('.reliability.png'), n_bins=10, panels=True)}")


if __name__ == "__main__":
    main()
