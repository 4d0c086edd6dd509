"""Task screen: on which BIG-bench multiple-choice tasks can a small model learn from the task's own examples?

    python benchmarks/screen.py --limit 4                          # the first 4 candidate tasks (a chunk)
    python benchmarks/screen.py                                    # every candidate; resumes, skipping what is done
    python benchmarks/screen.py --formats option --tasks snarks navigate
    python benchmarks/screen.py --choose-split benchmarks/results/split.json   # lists from the passing tasks

For each candidate task (≤ 4 options after filtering, at least ``--min-examples`` examples) and each answer format
(``letter``: the paper's option letters; ``option``: the option's own text, scored by its mean token
log-likelihood), the task's examples are split once by a seeded permutation into a held-out set (``--eval``
examples) and an oracle training set (up to ``--train`` of the rest). Two numbers on the held-out set:

- **zero-shot**: the model with a fresh, identity LoRA adapter, no adaptation;
- **oracle**: the same model with a LoRA adapter fine-tuned on the task's own training set for ``--steps`` steps of
  ``--batch`` examples (a generous budget, far beyond 5 steps on 10 examples): what adaptation could reach.

A task *passes* when the oracle's accuracy is above chance and above zero-shot, each by the lower bound of a 95 %
bootstrap interval (paired, same held-out examples). Results go to ``--out`` as they come (a rerun skips what is
there); ``--markdown`` prints the table for docs/. Candidates are all BIG-bench multiple-choice leaf tasks in a
seeded order, so ``--limit`` chunks are a random sample.
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
from datasets import Dataset

from peft_abmll.adaptation import predict_proba
from peft_abmll.baselines import train_method
from peft_abmll.data import prepare_tasks
from peft_abmll.experiment import load_causal_lm
from peft_abmll.meta.arguments import MetaTrainingArguments
from peft_abmll.metrics import accuracy, bootstrap_interval, negative_log_likelihood
from peft_abmll.tables import render_table


def candidates(args: argparse.Namespace) -> list[str]:
    """Multiple-choice BIG-bench leaf tasks in a seeded order (or ``--tasks``)."""
    if args.tasks:
        return list(args.tasks)
    from peft_abmll.assets import list_bigbench_tasks

    names = list_bigbench_tasks()
    return [names[i] for i in np.random.default_rng(args.seed).permutation(len(names))]


def load_rows(name: str, max_choices: int) -> list[dict[str, Any]]:
    from peft_abmll.assets import load_bigbench_task

    dataset = load_bigbench_task(name, max_choices=max_choices)
    if len(dataset) == 0:  # every example has more than `max_choices` options
        return []
    grouped = prepare_tasks(dataset, max_choices)
    return [row for rows in grouped.values() for row in rows]


def split(rows: list[dict[str, Any]], n_eval: int, n_train: int, seed: int) -> tuple[list, list]:
    """Held-out set (``n_eval``, or half the task if smaller) and oracle training set (up to ``n_train``)."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n_eval = min(n_eval, len(rows) // 2)
    held_out = [rows[i] for i in order[:n_eval]]
    train = [rows[i] for i in order[n_eval : n_eval + n_train]]
    return held_out, train


def screen_task(name: str, rows: list, answer_format: str, model_fn: Any, tokenizer: Any, args: argparse.Namespace):
    """Zero-shot and oracle accuracy / NLL of one task in one answer format, with intervals."""
    held_out, train = split(rows, args.eval, args.train, args.seed)
    margs = MetaTrainingArguments(
        output_dir=str(Path(args.work_dir) / name.replace("/", "__") / answer_format),
        max_steps=max(1, args.steps // args.inner_steps),
        inner_steps=args.inner_steps,
        inner_batch_size=args.batch,
        inner_learning_rate=args.lr,
        answer_format=answer_format,
        max_length=args.max_length,
        seed=args.seed,
        report_to=[],
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        logging_steps=50,
    )
    encoder = margs.task_encoder(tokenizer)
    labels = torch.tensor([r["label"] for r in held_out])
    chance = float(np.mean([1.0 / len(r["choices"]) for r in held_out]))
    out: dict[str, Any] = {"task": name, "format": answer_format, "n_eval": len(held_out), "n_train": len(train)}
    out["oracle_budget"] = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "max_length": args.max_length}
    out["chance"] = chance
    start = time.perf_counter()
    zero = train_method("pretrained", model_fn, tokenizer, Dataset.from_list(train), margs)
    zero_probs = predict_proba(zero, held_out, encoder=encoder)
    del zero
    # regular LoRA on the task alone = fine-tuning: steps x batch examples, the same adapter as the baselines
    oracle = train_method(
        "regular_lora", model_fn, tokenizer, Dataset.from_list([{**r, "task": name} for r in train]), margs
    )
    oracle_probs = predict_proba(oracle, held_out, encoder=encoder)
    del oracle
    for key, probs in (("zero_shot", zero_probs), ("oracle", oracle_probs)):
        out[key] = {
            "accuracy": bootstrap_interval(accuracy, probs, labels, seed=args.seed),
            "nll": bootstrap_interval(negative_log_likelihood, probs, labels, seed=args.seed),
        }
    out["oracle_minus_zero_shot"] = bootstrap_interval(accuracy, oracle_probs, labels, other=zero_probs, seed=args.seed)
    out["passes"] = out["oracle"]["accuracy"]["low"] > chance and out["oracle_minus_zero_shot"]["low"] > 0
    out["seconds"] = time.perf_counter() - start
    return out


def family(task: str) -> str:
    """The part of a BIG-bench task name before ``/`` (``multiemo/products_text_ja`` -> ``multiemo``)."""
    return task.split("/")[0]


def family_full(results: list[dict[str, Any]], task: str, cap: int | None) -> bool:
    """True when `cap` other tasks of `task`'s family were screened (skipped ones do not count)."""
    if cap is None:
        return False
    screened = {r["task"] for r in results if "skipped" not in r and r["task"] != task}
    return sum(family(t) == family(task) for t in screened) >= cap


def budget(result: dict[str, Any]) -> str:
    b = result.get("oracle_budget", {"steps": 200, "batch": 2})  # the first results, before it was recorded
    return f"{b['steps']} × {b['batch']}"


def table(results: list[dict[str, Any]]) -> str:
    """The screen as a Markdown table, one row per (task, format)."""
    header = [
        "task",
        "format",
        "n eval / train",
        "oracle steps × batch",
        "chance",
        "zero-shot acc [95 % CI]",
        "oracle acc [CI]",
        "oracle − zero-shot [CI]",
        "passes",
    ]
    rows = [_row(r) for r in sorted(results, key=lambda r: (r["task"], r["format"]))]
    return render_table(header, rows, markdown=True)


def _row(r: dict[str, Any]) -> list[str]:
    if "skipped" in r:
        return [r["task"], r["format"], *["–"] * 6, f"skipped: {r['skipped']}"]
    return [
        r["task"],
        r["format"],
        f"{r['n_eval']} / {r['n_train']}",
        budget(r),
        f"{r['chance']:.2f}",
        _ci(r["zero_shot"]["accuracy"]),
        _ci(r["oracle"]["accuracy"]),
        _ci(r["oracle_minus_zero_shot"], signed=True),
        "yes" if r["passes"] else "no",
    ]


def _ci(stat: dict, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(stat['value'])} [{f.format(stat['low'])}, {f.format(stat['high'])}]"


def choose_split(
    results: list[dict[str, Any]],
    answer_format: str,
    seed: int = 0,
    max_per_family: int | None = 2,
    meta_train_failing: bool = False,
) -> dict[str, Any]:
    """Meta-train / validation / untouched lists from the tasks that pass the screen in `answer_format`.

    The passing tasks, in a seeded order, go half (rounded up) to ``untouched`` (never trained or tuned on:
    independent checks), then one half of the rest to ``validation`` (rounded up) and the other to
    ``meta_train``. A family (the part of a name before ``/``, e.g. the many ``multiemo/...`` subtasks) keeps at
    most `max_per_family` tasks in validation and meta-train together; its others join ``untouched``, so one
    family cannot dominate what is trained or tuned on. Tasks that do not pass are listed as ``failing``; with
    `meta_train_failing` they are meta-trained on too (more tasks to learn the shared posterior from; the
    family cap applies to them as well, and a family's surplus stays unused).
    """
    screened = [r for r in results if r["format"] == answer_format and "skipped" not in r]
    passing = sorted(r["task"] for r in screened if r["passes"])
    order = [passing[i] for i in np.random.default_rng(seed).permutation(len(passing))]
    n_untouched = (len(order) + 1) // 2
    untouched, rest, used = order[:n_untouched], [], {}
    for task in order[n_untouched:]:
        name = family(task)
        if max_per_family is not None and used.get(name, 0) >= max_per_family:
            untouched.append(task)
            continue
        used[name] = used.get(name, 0) + 1
        rest.append(task)
    n_validation = (len(rest) + 1) // 2
    failing = sorted(r["task"] for r in screened if not r["passes"])
    extra = []
    for task in failing if meta_train_failing else []:
        name = family(task)
        if max_per_family is None or used.get(name, 0) < max_per_family:
            used[name] = used.get(name, 0) + 1
            extra.append(task)
    return {
        "format": answer_format,
        "meta_train": sorted(rest[n_validation:] + extra),
        "validation": sorted(rest[:n_validation]),
        "untouched": sorted(untouched),
        "failing": failing,
        "rule": "passing tasks in a seeded order: half untouched, then half validation, the rest meta-train"
        + ("; failing tasks meta-train too" if meta_train_failing else "")
        + f"; at most {max_per_family} of a family outside untouched",
        "seed": seed,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tasks", nargs="*", default=None, help="Screen these tasks (default: all candidates).")
    parser.add_argument("--limit", type=int, default=None, help="Screen at most this many new tasks (a chunk).")
    parser.add_argument("--formats", nargs="+", default=["letter", "option"], choices=["letter", "option"])
    parser.add_argument("--min-examples", type=int, default=100)
    parser.add_argument("--max-choices", type=int, default=4)
    parser.add_argument("--eval", type=int, default=200, help="Held-out examples per task.")
    parser.add_argument("--train", type=int, default=400, help="Oracle training examples per task (at most).")
    parser.add_argument("--steps", type=int, default=200, help="Oracle optimizer steps.")
    parser.add_argument("--inner-steps", type=int, default=5, help="(Steps are run as episodes of this many.)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3, help="Oracle learning rate.")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/screen.json")
    parser.add_argument("--work-dir", default="/tmp/abmll-screen")
    parser.add_argument("--markdown", action="store_true", help="Only print the table of what --out holds.")
    parser.add_argument(
        "--choose-split", metavar="PATH", default=None, help="Only write the split chosen from what --out holds."
    )
    parser.add_argument("--split-format", default="option", choices=["letter", "option"])
    parser.add_argument("--max-per-family", type=int, default=2, help="Tasks of one family outside untouched.")
    parser.add_argument(
        "--meta-train-failing",
        action="store_true",
        help="Meta-train on the tasks that fail the screen too (never validated on or kept untouched).",
    )
    parser.add_argument(
        "--screen-per-family",
        type=int,
        default=3,
        help="Screen at most this many tasks of one family (e.g. the 30 multiemo subtasks), for a broad sample.",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    results = json.loads(out.read_text())["results"] if out.exists() else []
    if args.markdown:
        print(table(results))
        return
    if args.choose_split:
        split = choose_split(results, args.split_format, args.seed, args.max_per_family, args.meta_train_failing)
        Path(args.choose_split).write_text(json.dumps(split, indent=1) + "\n")
        print(json.dumps(split, indent=1))
        return
    done = {(r["task"], r["format"]) for r in results}
    model_fn, tokenizer = load_causal_lm(args.model)
    new_tasks = 0
    for name in candidates(args):
        if all((name, f) in done for f in args.formats):
            continue
        if args.limit is not None and new_tasks >= args.limit:
            break
        if not args.tasks and family_full(results, name, args.screen_per_family):
            print(f"== {name}: its family has {args.screen_per_family} screened tasks, next", file=sys.stderr)
            continue
        rows = load_rows(name, args.max_choices)
        if len(rows) < args.min_examples:
            results += [{"task": name, "format": f, "skipped": f"{len(rows)} examples"} for f in args.formats]
        else:
            new_tasks += 1
            for answer_format in args.formats:
                if (name, answer_format) in done:
                    continue
                print(f"== {name} ({answer_format})", file=sys.stderr, flush=True)
                try:
                    results.append(screen_task(name, rows, answer_format, model_fn, tokenizer, args))
                except ValueError as err:  # e.g. options longer than --max-length: recorded, the screen goes on
                    print(f"== {name} ({answer_format}) skipped: {err}", file=sys.stderr)
                    results.append({"task": name, "format": answer_format, "skipped": str(err)})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"results": results, "settings": vars(args)}, indent=1))
    print(table(results))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
