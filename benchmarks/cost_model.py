"""Predict ABMLL's training cost against LoRA on models too big for this machine, from layers that fit.

    python benchmarks/cost_model.py                                   # validate on 2 sizes, predict 4 real ones
    python benchmarks/cost_model.py --shapes llama3-8b --seq 512 --reps 1
    python benchmarks/cost_model.py --validate smollm2-135m --shapes   # any subset

A decoder-only model's step costs ``T(n) = T(1) + (n - 1) * l`` for n decoder layers: embedding, LM head (the
real vocabulary), loss and one layer are in ``T(1)``, every further layer adds the same attention, MLP and adapter
work ``l``. Two ways to get ``l`` (``--fit``):

- ``layer`` (the default): build the 1-layer model and time, besides its whole steps, one decoder layer's training
  work alone — forward and backward through the layer on hidden states that need gradients (as every layer's
  input but the first does), the adapter's optimizer step, and for ABMLL the layer's sampled noise and its KL to
  the global posterior. ``l`` is measured directly, with ``--reps`` repetitions, instead of as the difference of
  two whole-model timings; the global update is per adapted layer, so ``global(n) = n * global(1)``.
- ``depth``: build the architecture with a few depths (``--depths``, default 1, 2 and 4) and fit a least-squares
  line through the whole-step timings.

Every build uses random weights with the real widths, heads, grouped KV and vocabulary. The phases, timed at the
paper's settings (rank 8, q/v/o, batch x tokens):

- ``lora``: one LoRA training step (forward, backward, AdamW);
- ``inner``: one ABMLL inner step (sampled forward, NLL + KL, gradients of the local pairs, AdamW);
- ``global``: ABMLL's global update (the natural-gradient direction of the KL and hyperprior, one SGD step);
- ``layer_lora`` / ``layer_inner`` (``--fit layer``): the same two steps restricted to one decoder layer.

LoRA and ABMLL sit on two copies of the same model in one process and the phases take turns, ``--reps`` times
(medians), so a slow spell of a shared machine hits all of them; each build runs in a fresh process.

An episode is K = 5 inner steps and one global update against K LoRA steps, so the predicted ratio is
``(K * inner(n) + global(n)) / (K * lora(n))``. ``--validate`` checks the model on sizes that fit here: the same
three timings on the full-depth model against the prediction. The same script runs unchanged on a GPU (CUDA
timings synchronise; each phase's ``torch.cuda.max_memory_allocated`` above the resident weights is recorded and
ABMLL's over LoRA's printed). Prints a table; writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peft_abmll.tables import render_table

K = 5  # inner steps per episode (the paper's)
TARGETS = ["q_proj", "v_proj", "o_proj"]
# Public config.json values of each model family (architecture, widths, heads, depth, vocabulary).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-d2048": dict(arch="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                        num_attention_heads=16, num_key_value_heads=16, vocab_size=32000),
    "smollm2-360m": dict(arch="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True),
    "smollm2-1.7b": dict(arch="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True),
    "llama3-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "qwen2-7b": dict(arch="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
}  # fmt: skip
VALIDATE = ("smollm2-135m", "llama-d2048")
PREDICT = ("smollm2-360m", "smollm2-1.7b", "llama3-8b", "qwen2-7b")


# ------------------------------------------------------------------------------------------- the model
def extrapolate(times: dict[int, float], layers: int) -> float:
    """``T(layers)`` from timings at a few depths: the least-squares line ``a + b * depth`` through them."""
    depths = sorted(times)
    if len(depths) < 2:
        raise ValueError("the depth model needs timings at two depths or more")
    mean_d = sum(depths) / len(depths)
    mean_t = sum(times[d] for d in depths) / len(depths)
    slope = sum((d - mean_d) * (times[d] - mean_t) for d in depths) / sum((d - mean_d) ** 2 for d in depths)
    return mean_t + slope * (layers - mean_d)


def episode_ratio(times: dict[str, float], k: int = K) -> float:
    """ABMLL episode (``k`` inner steps + the global update) over ``k`` LoRA steps."""
    return (k * times["inner"] + times["global"]) / (k * times["lora"])


def predict(by_depth: dict[int, dict[str, float]], layers: int, k: int = K) -> dict[str, float]:
    """Per-phase times of the `layers`-deep model and its episode ratio, from timings at smaller depths."""
    times = {key: extrapolate({d: t[key] for d, t in by_depth.items()}, layers) for key in ("lora", "inner", "global")}
    return {**times, "episode_ratio": episode_ratio(times, k)}


def predict_from_layer(one: dict[str, float], layers: int, k: int = K) -> dict[str, float]:
    """Per-phase times of the `layers`-deep model from the 1-layer build's timings `one` (with its ``layer_*``
    phases): ``T(n) = T(1) + (n - 1) * layer`` for the steps, ``n * global(1)`` for the per-layer global update."""
    times = {key: one[key] + (layers - 1) * one[f"layer_{key}"] for key in ("lora", "inner")}
    times["global"] = layers * one["global"]
    return {**times, "episode_ratio": episode_ratio(times, k)}


# ------------------------------------------------------------------------------------------- worker side
def _build(shape: dict[str, Any], layers: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    kwargs = {k: v for k, v in shape.items() if k != "arch"} | {"num_hidden_layers": layers}
    if shape["arch"] == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kwargs))
    return LlamaForCausalLM(LlamaConfig(**kwargs))


def _interleaved_medians(fns: dict[str, Any], reps: int, device: Any) -> dict[str, float]:
    """Median seconds of each function, the functions taking turns (a slow spell of the machine hits them all).

    On CUDA also ``<name>_peak_mb``: the most memory each function allocated above what was resident before it
    (``torch.cuda.max_memory_allocated``; activations, gradients and optimizer state, not the weights). On CPU
    the process's peak resident set is what `benchmarks/cost.py` measures instead."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, float] = {}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated(device) - resident) / 2**20
                peaks[f"{name}_peak_mb"] = max(peaks.get(f"{name}_peak_mb", 0.0), peak)
            times[name].append(time.perf_counter() - start)
    return {**{name: statistics.median(values) for name, values in times.items()}, **peaks}


def peft_models(shape: dict[str, Any], layers: int, device: Any) -> tuple[Any, Any]:
    """Two copies of the same random model, one with LoRA and one with ABMLL (rank 8, q/v/o), in training mode."""
    from peft import LoraConfig, get_peft_model

    import peft_abmll

    lora = get_peft_model(_build(shape, layers).to(device), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    config = peft_abmll.ABMLLConfig(r=8, lora_alpha=16, target_modules=TARGETS)
    return lora.train(), get_peft_model(_build(shape, layers).to(device), config).train()


def episode_phases(lora: Any, model: Any, batch: dict[str, Any]) -> dict[str, Callable[[], None]]:
    """The timed phases: a LoRA step, an ABMLL inner step, an ABMLL global update (after one inner step, so that
    local != global and the KL and the global update do their full work)."""
    import torch

    from peft_abmll.algorithms import ABMLLView, inner_loop

    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
    view = ABMLLView(model)
    outer = torch.optim.SGD(view.global_params(), lr=1.0)

    def lora_step() -> None:
        lora(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def inner_step() -> None:
        with view.local_mode():
            inner_loop(model, view, [batch], lr=1e-4, fresh=False)

    def global_update() -> None:
        for param, direction in zip(view.global_params(), view.outer_direction()[0]):
            param.grad = direction
        outer.step()
        outer.zero_grad(set_to_none=True)

    view.reset()
    inner_step()
    return {"lora": lora_step, "inner": inner_step, "global": global_update}


def layer_phases(lora: Any, model: Any, batch: dict[str, Any]) -> dict[str, Callable[[], None]]:
    """One decoder layer's training step alone, for LoRA and for ABMLL's inner step (``layer_lora``,
    ``layer_inner``): forward and backward through the first decoder layer on hidden states ``(batch, seq, d)``
    that need gradients, the adapter's AdamW step; ABMLL samples in the layer and adds its KL to the global."""
    import torch
    from transformers.masking_utils import create_causal_mask

    from peft_abmll.algorithms import ABMLLView, make_inner_optimizer

    view = ABMLLView(model)

    def step_of(peft_model: Any, params: list[Any], regularizer: Callable[[], Any]) -> Callable[[], None]:
        decoder = peft_model.get_base_model().model
        layer = decoder.layers[0]
        hidden = torch.randn(*batch["input_ids"].shape, decoder.config.hidden_size, device=batch["input_ids"].device)
        hidden.requires_grad_(True)
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=decoder.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None,
            position_ids=positions,
        )  # fmt: skip
        rotary = decoder.rotary_emb(hidden, position_ids=positions)
        opt = make_inner_optimizer(params, "adamw", 1e-4)

        def step() -> None:
            out = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
            loss = out.float().square().mean() + regularizer()
            grads = torch.autograd.grad(loss, [*params, hidden])
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    lora_params = [p for p in lora.parameters() if p.requires_grad]
    lora_step = step_of(lora, lora_params, lambda: 0.0)
    with view.local_mode():
        inner = step_of(model, view.local_params(), lambda: view.inner_regularizer()[0])

    def inner_step() -> None:
        with view.local_mode():
            inner()

    return {"layer_lora": lora_step, "layer_inner": inner_step}


def worker(spec: dict[str, Any]) -> dict[str, float]:
    """The three timings of one (shape, depth) in this process: LoRA and ABMLL on two copies of the same model."""
    import torch

    torch.set_num_threads(spec["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SHAPES[spec["shape"]]
    lora, model = peft_models(shape, spec["layers"], device)
    ids = torch.randint(0, shape["vocab_size"], (spec["batch"], spec["seq"]), device=device)
    batch = {"input_ids": ids, "labels": ids}
    phases = episode_phases(lora, model, batch)
    if spec.get("layer_phases"):
        phases |= layer_phases(lora, model, batch)
    return _interleaved_medians(phases, spec["reps"], device)


# ------------------------------------------------------------------------------------------- driver side
def measure(shape: str, layers: int, args: argparse.Namespace, layer_phases: bool = False) -> dict[str, float]:
    """The worker's timings, in a fresh interpreter (nothing cached from the previous configuration)."""
    spec = {"shape": shape, "layers": layers, "batch": args.batch, "seq": args.seq, "reps": args.reps}
    spec |= {"threads": args.threads, "layer_phases": layer_phases}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed for {spec}:\n{proc.stderr[-3000:]}")
    print(f"  {shape}, {layers} layer(s): {lines[-1]}", file=sys.stderr, flush=True)
    return json.loads(lines[-1])


def study(shape: str, args: argparse.Namespace, validate: bool) -> dict[str, Any]:
    layers = SHAPES[shape]["num_hidden_layers"]
    row: dict[str, Any] = {"shape": shape, "layers": layers, "fit": args.fit}
    if args.fit == "layer":
        row["one_layer"] = measure(shape, 1, args, layer_phases=True)
        row["predicted"] = predict_from_layer(row["one_layer"], layers)
    else:
        row["by_depth"] = {d: measure(shape, d, args) for d in args.depths if d < layers}
        row["predicted"] = predict(row["by_depth"], layers)
    if validate:
        full = measure(shape, layers, args)
        row["measured"] = {**full, "episode_ratio": episode_ratio(full)}
    return row


def peak_memory_ratio(times: dict[str, float]) -> str:
    """ABMLL inner step's CUDA training memory over LoRA step's ("–" where not measured: CPU)."""
    if "inner_peak_mb" not in times or not times.get("lora_peak_mb"):
        return "–"
    return f"{times['inner_peak_mb'] / times['lora_peak_mb']:.3f}"


def table(rows: list[dict[str, Any]]) -> str:
    header = ["model shape", "layers", "LoRA step (s)", "inner step (s)", "global update (s)", "episode × LoRA"]
    header += ["measured episode × LoRA", "error", "train memory × LoRA (CUDA)"]
    lines = []
    for r in rows:
        p, m = r["predicted"], r.get("measured")
        line = [r["shape"], str(r["layers"]), f"{p['lora']:.3f}", f"{p['inner']:.3f}", f"{p['global']:.3f}"]
        line.append(f"{p['episode_ratio']:.3f}")
        if m is None:
            line += ["–", "–"]
        else:
            line += [f"{m['episode_ratio']:.3f}", f"{p['episode_ratio'] - m['episode_ratio']:+.3f}"]
        line.append(peak_memory_ratio(m or r.get("one_layer") or {}))
        lines.append(line)
    return render_table(header, lines, markdown=True)


def add_run_options(parser: argparse.ArgumentParser, seq: int) -> None:
    """``--batch``, ``--seq``, ``--reps`` and ``--threads``: how a timed step is run (shared with the profiler)."""
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=seq)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--validate", nargs="*", default=list(VALIDATE), choices=list(SHAPES))
    parser.add_argument("--shapes", nargs="*", default=list(PREDICT), choices=list(SHAPES), help="Predict these.")
    parser.add_argument(
        "--fit", choices=["layer", "depth"], default="layer",
        help="How the per-layer cost is found: one decoder layer timed alone, or a line through several depths.",
    )  # fmt: skip
    parser.add_argument(
        "--depths", nargs="+", type=int, default=[1, 2, 4], help="--fit depth: decoder layers of the timed builds."
    )
    add_run_options(parser, seq=512)
    parser.add_argument("--out", default="benchmarks/results/cost_model.json")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    rows = [study(s, args, validate=True) for s in args.validate]
    rows += [study(s, args, validate=False) for s in args.shapes if s not in args.validate]
    settings = {k: v for k, v in vars(args).items() if k != "worker"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "settings": settings}, indent=1))
    print(table(rows))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
