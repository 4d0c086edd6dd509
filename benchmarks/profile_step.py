"""Where an ABMLL episode's time goes: one inner step and one global update, split by component.

    python benchmarks/profile_step.py                          # the 4-layer d-2048 Llama, batch 2 x 128 tokens
    python benchmarks/profile_step.py --shape smollm2-135m --seq 512

Runs torch's profiler over ``--reps`` inner steps and global updates (after a warm-up) with the ABMLL pieces
labelled: the KL's value and analytic gradient (``fused_kl``, and its ``_KLBackward``), the output-noise path
(``lowrank_noise`` forward and ``_LocalNoiseBackward``), the global update's direction (``abmll_direction``),
the optimizer step (torch's own ``Optimizer.step#...`` event), and everything else in forward and backward (the
base model and the adapter's mean path).
A LoRA step on the same model and batch is profiled the same way for reference. Shares are of the wall time
inside the profiled region; the table goes to stdout (Markdown) and the raw numbers to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from peft_abmll import fused, global_update
from peft_abmll.tables import render_table

LABELS = {
    "abmll.kl": "KL value + gradient (forward pass of the fused KL)",
    "_KLBackward": "KL backward (multiplies the saved gradients)",
    "abmll.noise": "output noise, forward",
    "_LocalNoiseBackward": "output noise, backward",
    "abmll.global_direction": "global update: natural-gradient direction",
    "Optimizer.step#": "optimizer step",
}


def _labelled(fn: Any, label: str) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def labelled_pieces() -> Any:
    """Label the ABMLL pieces for the profiler (restored afterwards)."""
    patches = [
        (fused, "fused_kl", "abmll.kl"),
        (fused, "lowrank_noise", "abmll.noise"),
        (global_update, "abmll_direction", "abmll.global_direction"),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, label in patches:
        setattr(owner, name, _labelled(getattr(owner, name), label))
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def breakdown(prof: Any, total_s: float) -> dict[str, float]:
    """Seconds per labelled piece (CPU time of its top-level events), and the rest of the region."""
    seconds = dict.fromkeys(LABELS, 0.0)
    for event in prof.events():
        for label in LABELS:
            if (
                event.name == label
                or event.name.endswith(label)
                or event.name.startswith(label + "AdamW")
                or (event.name.startswith(label + "SGD"))
            ):
                seconds[label] += event.cpu_time_total / 1e6
    seconds["rest"] = max(0.0, total_s - sum(seconds.values()))
    return seconds


def _profile(fn: Any, reps: int) -> tuple[Any, float]:
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        seconds = time.perf_counter() - start
    return prof, seconds / reps


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import cost_model  # the model shapes, shared with the cost model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-d2048", choices=list(cost_model.SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="Decoder layers (default: the shape's).")
    cost_model.add_run_options(parser, seq=128)
    parser.add_argument("--out", default="benchmarks/results/profile_step.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = cost_model.SHAPES[args.shape]
    lora, model = cost_model.peft_models(shape, args.layers or shape["num_hidden_layers"], torch.device("cpu"))
    ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    phases = cost_model.episode_phases(lora, model, {"input_ids": ids, "labels": ids})
    rows: dict[str, dict[str, float]] = {}
    with labelled_pieces():
        for name, phase in (("LoRA step", "lora"), ("ABMLL inner step", "inner"), ("ABMLL global update", "global")):
            prof, seconds = _profile(phases[phase], args.reps)
            rows[name] = {"seconds": seconds, **breakdown(prof, seconds * args.reps)}
    print(table(rows, args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "settings": vars(args)}, indent=1))
    print(f"\nwrote {args.out}")


def table(rows: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    pieces = [*LABELS, "rest"]
    header = [
        "phase",
        "s / call",
        *(LABELS.get(p, "the rest: base model, adapter mean path, autograd") for p in pieces),
    ]
    lines = []
    for name, row in rows.items():
        total = row["seconds"] * args.reps
        lines.append([name, f"{row['seconds']:.3f}", *(f"{100 * row[p] / total:.0f} %" for p in pieces)])
    return render_table(header, lines, markdown=True)


if __name__ == "__main__":
    main()
