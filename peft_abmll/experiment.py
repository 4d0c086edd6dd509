"""Side-by-side comparison of methods on the same tasks, data and budget (used by `abmll demo` and benchmarks).

>>> results = compare_methods(["pretrained", "regular_lora", "abmll"], load_base, tok, train, held_out, args)
>>> print(format_table(results))
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from datasets import Dataset
from torch import nn

from .assets import load_bigbench_task, load_hub_task, load_task_file
from .assets.smollm2 import SMOLLM2_HUB_ID, smollm2_path
from .baselines import train_method
from .evaluation import evaluate_tasks, record_evaluation
from .files import save_pretrained_atomic
from .meta.arguments import MetaTrainingArguments
from .metrics import plot_reliability_diagram
from .tables import render_table
from .tuner.config import ABMLLConfig

logger = logging.getLogger("peft_abmll")
TASK_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".pq")

#: Meta-training and validation task lists of the demo (BIG-bench, multiple choice, <= 4 options).
DEMO_TRAIN_TASKS = (
    "multiemo/hotels_sentence_en",
    "multiemo/products_sentence_en",
    "vitaminc_fact_verification",
    "epistemic_reasoning",
    "fact_checker/fever",
    "formal_fallacies_syllogisms_negation",
    "snarks",
    "movie_dialog_same_or_different",
    "play_dialog_same_or_different",
    "social_iqa",
    "strategyqa",
    "goal_step_wikihow/goal_inference",
    "goal_step_wikihow/step_ordering",
    "physics",
    "causal_judgment",
    "moral_permissibility",
    "misconceptions",
    "navigate",
    "hyperbaton",
    "logical_fallacy_detection",
    "anachronisms",
    "temporal_sequences",
    "question_selection",
    "entailed_polarity",
)
DEMO_EVAL_TASKS = (
    "multiemo/medicine_sentence_en",
    "fact_checker/covid19_scientific",
    "disambiguation_qa",
    "fantasy_reasoning",
    "ruin_names",
)


def resolve_tasks(specs: Sequence[str], max_choices: int = 4) -> dict[str, Dataset]:
    """Load tasks by spec: a local file path, ``hf:<dataset id>`` (needs the Hub), or a BIG-bench task name."""
    tasks: dict[str, Dataset] = {}
    for spec in specs:
        if Path(spec).exists():
            dataset = load_task_file(spec, max_choices=max_choices)
        elif spec.startswith("hf:"):
            dataset = load_hub_task(spec[3:], max_choices=max_choices)
        elif Path(spec).suffix.lower() in TASK_FILE_SUFFIXES:  # not a BIG-bench name (those have no dot)
            raise FileNotFoundError(f"Task file {spec!r} not found.")
        else:
            dataset = load_bigbench_task(spec, max_choices=max_choices)
        for name in sorted(set(dataset["task"])):
            tasks[name] = dataset.filter(lambda row, n=name: row["task"] == n)
    return tasks


def load_causal_lm(name_or_path: str, dtype: str = "float32") -> tuple[Callable[[], nn.Module], Any]:
    """A factory of fresh copies of the model, and its tokenizer. ``"smollm2"`` = the offline SmolLM2 asset."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub_id = None
    if name_or_path == "smollm2":
        name_or_path, hub_id = str(smollm2_path(install=True)), SMOLLM2_HUB_ID
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    torch_dtype = getattr(torch, dtype)
    state: dict[str, nn.Module] = {}

    def fresh() -> nn.Module:
        if "model" not in state:
            model: Any = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype)
            if hub_id is not None:  # adapters record the Hub id as their base model, not the cache folder
                model.config._name_or_path = model.name_or_path = hub_id
            state["model"] = model
        import copy

        return copy.deepcopy(state["model"])

    return fresh, tokenizer


def compare_methods(
    methods: Sequence[str],
    base_model_fn: Callable[[], nn.Module],
    tokenizer: Any,
    train_tasks: Union[Dataset, Mapping[str, Dataset]],
    eval_tasks: Union[Dataset, Mapping[str, Dataset]],
    args: MetaTrainingArguments,
    abmll_config: Optional[ABMLLConfig] = None,
    output_dir: Optional[Union[str, Path]] = None,
    lora_learning_rate: Optional[float] = None,
    save_adapters: bool = True,
) -> dict[str, Any]:
    """Train each method with the same budget, evaluate all on the held-out tasks, write JSON and a diagram."""
    out = Path(output_dir or args.output_dir or "trainer_output")
    results: dict[str, Any] = {"methods": {}, "settings": _settings(args, abmll_config)}
    curves = {}
    for method in methods:
        model, evaluation = run_method(
            method,
            base_model_fn,
            tokenizer,
            train_tasks,
            eval_tasks,
            _args_for(args, out / method),
            abmll_config,
            lora_learning_rate=lora_learning_rate,
            adapter_dir=out / method / "adapter" if save_adapters and method != "pretrained" else None,
        )
        curves[method] = (torch.tensor(evaluation.pop("probs")), torch.tensor(evaluation.pop("labels")))
        results["methods"][method] = evaluation
        del model
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_reliability_diagram(curves, out / "reliability.png", args.ece_bins)
    return results


def run_method(
    method: str,
    base_model_fn: Callable[[], nn.Module],
    tokenizer: Any,
    train_tasks: Union[Dataset, Mapping[str, Dataset]],
    eval_tasks: Union[Dataset, Mapping[str, Dataset]],
    args: MetaTrainingArguments,
    abmll_config: Optional[ABMLLConfig] = None,
    lora_learning_rate: Optional[float] = None,
    adapter_dir: Optional[Union[str, Path]] = None,
    **train_kwargs: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train one method (`train_method`), evaluate it on `eval_tasks`, save its adapter (and card) to `adapter_dir`.

    Returns the trained model and `evaluate_tasks`' results plus ``train_seconds`` and ``eval_seconds``.
    """
    logger.warning("== %s: training (%d episodes budget)", method, args.max_steps)
    start = time.perf_counter()
    model = train_method(
        method,
        base_model_fn,
        tokenizer,
        train_tasks,
        args,
        abmll_config,
        lora_learning_rate=lora_learning_rate,
        **train_kwargs,
    )
    train_seconds = time.perf_counter() - start
    logger.warning("== %s: evaluating on %d held-out task(s)", method, len(_names(eval_tasks)))
    start = time.perf_counter()
    evaluation = evaluate_tasks(
        model,
        eval_tasks,
        encoder=args.task_encoder(tokenizer),
        protocol=args.evaluation_protocol(),
        progress=not args.disable_tqdm,
    )
    eval_seconds = time.perf_counter() - start
    if adapter_dir is not None:  # after the evaluation, so the saved model card shows its numbers
        record_evaluation(model, evaluation)
        save_pretrained_atomic(model, adapter_dir)
    return model, {**evaluation, "train_seconds": train_seconds, "eval_seconds": eval_seconds}


def _names(tasks: Union[Dataset, Mapping[str, Dataset]]) -> list[str]:
    return sorted(set(tasks["task"])) if isinstance(tasks, Dataset) else sorted(tasks)


def _args_for(args: MetaTrainingArguments, output_dir: Path) -> MetaTrainingArguments:
    import dataclasses

    return dataclasses.replace(args, output_dir=str(output_dir))


def _settings(args: MetaTrainingArguments, config: Optional[ABMLLConfig]) -> dict[str, Any]:
    keys = (
        "max_steps",
        "inner_steps",
        "inner_batch_size",
        "inner_learning_rate",
        "learning_rate",
        "adaptation_steps",
        "adaptation_learning_rate",
        "max_length",
        "seed",
        "num_shots",
        "first_order",
    )
    settings = {k: getattr(args, k) for k in keys}
    if config is not None:
        settings["abmll"] = {
            k: getattr(config, k)
            for k in ("r", "lora_alpha", "scale_type", "sampling", "beta", "init_std", "scale_floor")
        }
    return settings


def format_table(results: Mapping[str, Any]) -> str:
    """A plain-text table: method, macro accuracy, ECE, NLL, Brier, training time."""
    rows = [
        [method, *(f"{r['macro'][k]:.3f}" for k in ("accuracy", "ece", "nll", "brier")), f"{r['train_seconds']:.0f}"]
        for method, r in results["methods"].items()
    ]
    header = ["method", "accuracy", "ECE", "NLL", "Brier", "train s"]
    return render_table(header, rows, min_widths=[16, 9, 7, 7, 7, 8])
