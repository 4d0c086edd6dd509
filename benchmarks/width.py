"""What sets the width the global posterior learns: the family's disagreement, scaled by how far adaptation moves.

    python benchmarks/width.py                                   # inner lr 1e-2 1e-3 3e-4, seeds 0 1 (≈ 6 min)
    python benchmarks/width.py --inner-lr 3e-4 --seeds 0 --steps 40

Two generated families (`peft_abmll.synthetic.task_family`) ask the same questions: in one every task answers the
first option (tasks agree), in the other task ``t`` answers option ``t mod 3`` (tasks disagree). A tiny Llama is
meta-trained with ABMLL on each (``--steps`` episodes, ``beta`` 0, the natural global update) at each inner
learning rate, and the median global standard deviation per entry of ``ΔW`` is read off. The family ratio says
whether the width follows the data; the absolute widths say on what scale: the natural update moves the global
variance toward the adapted posteriors' variance plus their spread, so the width that can be learned is about as
large as the distance the K inner steps move the adapter. Results go to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from peft import get_peft_model

from peft_abmll import ABMLLConfig, MetaTrainer, MetaTrainingArguments
from peft_abmll.data import seeded_torch_rng
from peft_abmll.synthetic import task_family, tiny_lm, tiny_tokenizer


def learned_width(rule: str, inner_lr: float, seed: int, steps: int, init_std: float) -> dict[str, float]:
    """Meta-train a tiny Llama on the family `rule` and return its median global std and last spread."""
    tok = tiny_tokenizer()
    with seeded_torch_rng(0):
        model = get_peft_model(tiny_lm(tok, seed=0), ABMLLConfig(beta=0.0, init_std=init_std))
    with tempfile.TemporaryDirectory() as tmp:
        args = MetaTrainingArguments(
            output_dir=tmp,
            max_steps=steps,
            logging_steps=steps,
            inner_learning_rate=inner_lr,
            seed=seed,
            answer_format="letter",  # the families' answer is a shared offset in letter space
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
        )
        family = task_family(num_tasks=6, per_task=24, seed=0, rule=rule)
        trainer = MetaTrainer(model=model, args=args, train_dataset=family, processing_class=tok)
        trainer.train()
    spread = next(float(log["spread_rms"]) for log in reversed(trainer.state.log_history) if "spread_rms" in log)
    return {"global_std": trainer.view.tuner.median_posterior_std(), "spread_rms": spread}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inner-lr", nargs="+", type=float, default=[1e-2, 1e-3, 3e-4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=40, help="Meta-training episodes per run.")
    parser.add_argument("--init-std", type=float, default=ABMLLConfig.init_std)
    parser.add_argument("--out", default="benchmarks/results/width.json")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    print("| inner lr | seed | σ disagreeing | σ agreeing | ratio | spread (disagreeing) |")
    print("|---|---|---|---|---|---|")
    for lr in args.inner_lr:
        for seed in args.seeds:
            wide = learned_width("task", lr, seed, args.steps, args.init_std)
            narrow = learned_width("first", lr, seed, args.steps, args.init_std)
            ratio = wide["global_std"] / narrow["global_std"]
            rows.append({"inner_lr": lr, "seed": seed, "disagreeing": wide, "agreeing": narrow, "ratio": ratio})
            print(
                f"| {lr:g} | {seed} | {wide['global_std']:.3g} | {narrow['global_std']:.3g} | {ratio:.2f} "
                f"| {wide['spread_rms']:.2g} |",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "runs": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
