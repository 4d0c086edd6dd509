"""The `abmll` command: ``demo``, ``train``, ``evaluate`` and ``adapt``.

Every option can also come from a YAML or JSON file given with ``--config`` (keys are the option
names with dashes or underscores); options on the command line win over the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .algorithms import DEFAULT_INNER_LR
from .experiment import DEMO_EVAL_TASKS, DEMO_TRAIN_TASKS
from .meta.arguments import MetaTrainingArguments

logger = logging.getLogger("peft_abmll")


# ----------------------------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON file with option values (command-line options override it).")
    p.add_argument(
        "--model",
        default="smollm2",
        help="Causal LM: a local folder, a Hub id (needs the Hub), or 'smollm2' (offline SmolLM2-135M).",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="Dtype of the base model weights (the adapter is float32).",
    )
    p.add_argument("--output-dir", default="abmll-output", help="Where adapters, JSON results and figures go.")
    p.add_argument("--seed", type=int, default=0, help="Seed of data order, initialisation and sampling.")
    p.add_argument("--max-length", type=int, default=256, help="Max tokens per example (the answer is never cut).")
    p.add_argument("--max-choices", type=int, default=4, help="Examples with more options are dropped.")
    p.add_argument("--batch-size", type=int, default=2, help="Examples per inner / adaptation step (paper: 2).")
    p.add_argument("--adapt-steps", type=int, default=5, help="Test-time adaptation steps per task (paper: 5).")
    p.add_argument(
        "--adapt-lr",
        type=float,
        default=None,
        help="Test-time adaptation learning rate (default: train: the inner rate; evaluate / adapt: the rate the "
        "adapter was meta-trained for, else 3e-4).",
    )
    p.add_argument("--num-samples", type=int, default=None, help="Posterior samples averaged when predicting.")
    p.add_argument("--max-query", type=int, default=None, help="Cap on predicted (query) examples per task.")
    p.add_argument("--num-shots", type=int, default=0, help="Solved in-context examples in front of each prompt.")
    p.add_argument(
        "--answer-format",
        default="letter",
        choices=["letter", "option"],
        help="What is trained and scored: the option letter (the paper's) or the option's own text.",
    )


def _training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", nargs="+", help="Meta-training tasks: BIG-bench names, local files, or hf:<id>.")
    p.add_argument("--eval-tasks", nargs="*", default=[], help="Held-out tasks evaluated during/after training.")
    p.add_argument(
        "--method",
        default="abmll",
        choices=["abmll", "reptile", "regular_lora", "structured_lora", "pretrained"],
        help="What to train (baselines use the same data and budget).",
    )
    p.add_argument("--steps", type=int, default=100, help="Training episodes (one task each).")
    p.add_argument("--tasks-per-update", type=int, default=1, help="Tasks averaged per global update.")
    p.add_argument(
        "--learning-rate",
        type=float,
        default=1e-3,
        help="Step of the first-order query term (natural / Reptile updates) or AdamW rate (--global-update gradient).",
    )
    p.add_argument(
        "--outer-step-size",
        type=float,
        default=None,
        help="Global step eps of ABMLL and Reptile: the global adapter moves eps of the way to the task's adapted one "
        "(annealed linearly to 0; default 1.0, as in Reptile).",
    )
    p.add_argument(
        "--global-update",
        default=None,
        choices=["natural", "gradient"],
        help="ABMLL's global update: natural (default) or the paper-literal gradient (AdamW on the outer loss).",
    )
    p.add_argument("--inner-lr", type=float, default=DEFAULT_INNER_LR, help="Inner-loop learning rate.")
    p.add_argument("--inner-steps", type=int, default=5, help="Inner steps per task (paper: 5).")
    p.add_argument("--first-order", action="store_true", help="Add the query-batch NLL gradient to the update.")
    p.add_argument("--query-batches", type=int, default=0, help="Query batches per task (for --first-order).")
    p.add_argument("--save-steps", type=int, default=0, help="Checkpoint every N episodes (0: only at the end).")
    p.add_argument("--eval-steps", type=int, default=0, help="Evaluate every N episodes (0: only at the end).")
    p.add_argument("--resume", default=None, help="Resume from a checkpoint folder, or 'latest'.")
    p.add_argument("--r", type=int, default=8, help="LoRA rank.")
    p.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (scaling alpha / r).")
    p.add_argument("--target-modules", nargs="*", default=None, help="Modules to adapt (default: q, v, o).")
    p.add_argument("--beta", type=float, default=None, help="KL / hyperprior weight (default: the config's).")
    p.add_argument("--scale-type", default=None, choices=["linear", "softplus"], help="Std parameterisation.")
    p.add_argument("--sampling", default=None, choices=["local", "weight"], help="Training-time sampling mode.")
    p.add_argument("--init-std", type=float, default=None, help="Initial posterior std of each weight entry.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abmll", description="ABMLL: meta-learned Bayesian LoRA for PEFT.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="Fetch SmolLM2 + BIG-bench, meta-train ABMLL, compare with baselines.")
    _common(demo)
    demo.add_argument(
        "--steps", type=int, default=None, help="Training episodes per method (default: 24; 4 with --quick)."
    )
    demo.add_argument(
        "--methods",
        nargs="+",
        default=["pretrained", "regular_lora", "abmll"],
        help="Methods to compare with the same budget.",
    )
    demo.add_argument("--quick", action="store_true", help="A tiny budget for a smoke run (minutes).")
    train = sub.add_parser("train", help="Meta-train an adapter (ABMLL or a baseline) on a task list.")
    _common(train)
    _training(train)
    evaluate = sub.add_parser("evaluate", help="Adapt to and score held-out tasks (accuracy, ECE, NLL, Brier).")
    _common(evaluate)
    evaluate.add_argument("--adapter", default=None, help="Adapter folder (omit: the base model with a fresh LoRA).")
    evaluate.add_argument("--tasks", nargs="+", required=False, help="Held-out tasks to evaluate on.")
    adapt = sub.add_parser("adapt", help="Adapt an adapter to one new task and save the adapted adapter.")
    _common(adapt)
    adapt.add_argument("--adapter", required=False, help="Meta-trained ABMLL adapter folder.")
    adapt.add_argument("--task", required=False, help="The new task: BIG-bench name, local file, or hf:<id>.")
    adapt.add_argument("--support", type=int, default=10, help="Support examples used for adaptation.")
    adapt.add_argument("--save-to", default=None, help="Folder for the adapted adapter (default: output-dir/adapted).")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse `argv`, taking defaults from ``--config`` first."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        import yaml

        try:
            values = _read_config(Path(args.config))
        except (OSError, ValueError, yaml.YAMLError) as err:  # YAMLError: also python/object tags, refused
            parser.error(f"cannot read config {args.config}: {err}")
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subparser = subparsers.choices[args.command]
        actions = {a.dest: a for a in subparser._actions if a.option_strings and a.dest not in ("help", "config")}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            parser.error(f"unknown option(s) in {args.config}: {', '.join(unknown)}")
        for dest, value in values.items():
            action = actions[dest]
            if action.nargs in ("+", "*") and isinstance(value, str):
                values[dest] = value = [value]  # `tasks: snarks` means one task, not its letters
            if action.choices is not None and value is not None:  # argparse does not check defaults
                bad = [v for v in (value if isinstance(value, list) else [value]) if v not in action.choices]
                if bad:
                    parser.error(f"{dest} in {args.config}: invalid choice {bad[0]!r} (choose from {action.choices})")
        subparser.set_defaults(**values)
        args = parser.parse_args(argv)
    return args


def _read_config(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}  # safe_load: a config file cannot construct Python objects
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise SystemExit(f"abmll: {path} must hold a mapping of option names to values.")
    return {k.replace("-", "_"): v for k, v in values.items()}


# ----------------------------------------------------------------------------------------------- commands
def meta_args(args: argparse.Namespace, output_dir: Path, **overrides: Any) -> MetaTrainingArguments:
    """MetaTrainingArguments from parsed options (+ overrides)."""
    values = dict(
        output_dir=str(output_dir),
        seed=args.seed,
        report_to=[],
        use_cpu=_use_cpu(),
        max_length=args.max_length,
        max_choices=args.max_choices,
        inner_batch_size=args.batch_size,
        adaptation_steps=args.adapt_steps,
        adaptation_learning_rate=args.adapt_lr,
        eval_num_samples=args.num_samples,
        eval_max_query=args.max_query,
        num_shots=args.num_shots,
        answer_format=args.answer_format,
        save_strategy="no",
        logging_steps=5,
        bf16=args.dtype == "bfloat16",
    )
    for name, dest in (
        ("max_steps", "steps"),
        ("learning_rate", "learning_rate"),
        ("inner_learning_rate", "inner_lr"),
        ("inner_steps", "inner_steps"),
        ("first_order", "first_order"),
        ("query_batches", "query_batches"),
        ("gradient_accumulation_steps", "tasks_per_update"),
        ("beta", "beta"),
        ("outer_step_size", "outer_step_size"),
        ("global_update", "global_update"),
    ):
        if getattr(args, dest, None) is not None:
            values[name] = getattr(args, dest)
    if getattr(args, "save_steps", 0):
        values.update(save_strategy="steps", save_steps=args.save_steps)
    if getattr(args, "eval_steps", 0):
        values.update(eval_strategy="steps", eval_steps=args.eval_steps)
    return MetaTrainingArguments(**{**values, **overrides})


def _use_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def abmll_config(args: argparse.Namespace) -> Any:
    from .tuner.config import ABMLLConfig

    kwargs: dict[str, Any] = {"r": getattr(args, "r", 8), "lora_alpha": getattr(args, "lora_alpha", 16)}
    for name in ("target_modules", "beta", "scale_type", "sampling", "init_std"):
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    if kwargs.get("scale_type") == "softplus" and "sampling" not in kwargs:
        kwargs["sampling"] = "weight"
    return ABMLLConfig(**kwargs)


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from .experiment import compare_methods, format_table, load_causal_lm, resolve_tasks

    out = Path(args.output_dir)
    steps = args.steps if args.steps is not None else 4 if args.quick else 24
    train_names = DEMO_TRAIN_TASKS[:6] if args.quick else DEMO_TRAIN_TASKS
    eval_names = DEMO_EVAL_TASKS[:2] if args.quick else DEMO_EVAL_TASKS
    print(f"abmll demo: fetching assets (SmolLM2-135M-Instruct, {len(train_names) + len(eval_names)} BIG-bench tasks)")
    model_fn, tokenizer = load_causal_lm(args.model, args.dtype)
    train_tasks = resolve_tasks(train_names, args.max_choices)
    eval_tasks = resolve_tasks(eval_names, args.max_choices)
    max_query = args.max_query or (8 if args.quick else 32)
    margs = meta_args(
        args, out, max_steps=steps, learning_rate=1e-3, inner_learning_rate=DEFAULT_INNER_LR, eval_max_query=max_query
    )
    results = compare_methods(
        args.methods, model_fn, tokenizer, train_tasks, eval_tasks, margs, abmll_config(args), output_dir=out
    )
    print("\nHeld-out tasks:", ", ".join(eval_names))
    print(format_table(results))
    print(f"\nResults JSON:        {out / 'results.json'}")
    print(f"Reliability diagram: {out / 'reliability.png'}")
    print(f"ABMLL adapter:       {out / 'abmll' / 'adapter'}" if "abmll" in args.methods else "")
    return results


def cmd_train(args: argparse.Namespace) -> Path:
    from .baselines import train_method
    from .experiment import load_causal_lm, resolve_tasks
    from .files import save_pretrained_atomic

    if not args.tasks:
        raise SystemExit("abmll train: give --tasks (BIG-bench names, task files, or hf:<dataset id>).")
    out = Path(args.output_dir)
    model_fn, tokenizer = load_causal_lm(args.model, args.dtype)
    train_tasks = resolve_tasks(args.tasks, args.max_choices)
    margs = meta_args(args, out)
    resume = args.resume
    trainer_kwargs: dict[str, Any] = (
        {"resume_from_checkpoint": True if resume == "latest" else resume} if resume else {}
    )
    model = train_method(
        args.method,
        model_fn,
        tokenizer,
        train_tasks,
        margs,
        abmll_config(args),
        **trainer_kwargs,
    )
    adapter = out / "adapter"
    save_pretrained_atomic(model, adapter, tokenizer=tokenizer)
    print(f"Adapter saved to {adapter}")
    if args.eval_tasks:
        _report(_evaluate(model, tokenizer, args, resolve_tasks(args.eval_tasks, args.max_choices), out))
    return adapter


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from .experiment import resolve_tasks

    if not args.tasks:
        raise SystemExit("abmll evaluate: give --tasks to evaluate on.")
    model, tokenizer = _load_adapted_model(args)
    results = _evaluate(model, tokenizer, args, resolve_tasks(args.tasks, args.max_choices), Path(args.output_dir))
    _report(results)
    return results


def cmd_adapt(args: argparse.Namespace) -> Path:
    from .adaptation import adapt, save_adapted
    from .data import prepare_tasks
    from .experiment import resolve_tasks

    if not args.adapter or not args.task:
        raise SystemExit("abmll adapt: give --adapter (a meta-trained ABMLL adapter) and --task.")
    model, tokenizer = _load_adapted_model(args)
    tasks = prepare_tasks(resolve_tasks([args.task], args.max_choices), args.max_choices)
    examples = [e for task in tasks.values() for e in task][: args.support]
    logs = adapt(
        model,
        examples,
        tokenizer=tokenizer,
        steps=args.adapt_steps,
        batch_size=args.batch_size,
        lr=args.adapt_lr,
        seed=args.seed,
        task=args.task,
    )
    target = Path(args.save_to or Path(args.output_dir) / "adapted")
    save_adapted(model, target)
    print(f"Adapted on {len(examples)} examples (final NLL {logs[-1]['nll']:.3f}); adapter saved to {target}")
    return target


def _load_adapted_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from peft import LoraConfig, PeftModel, get_peft_model

    from .experiment import load_causal_lm

    model_fn, tokenizer = load_causal_lm(args.model, args.dtype)
    if args.adapter:
        return PeftModel.from_pretrained(model_fn(), args.adapter, is_trainable=True), tokenizer
    return get_peft_model(model_fn(), LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM")), tokenizer


def _evaluate(model: Any, tokenizer: Any, args: argparse.Namespace, tasks: Any, out: Path) -> dict[str, Any]:
    from .adaptation import evaluate_tasks

    margs = meta_args(args, out)
    encoder = margs.task_encoder(tokenizer)
    kwargs = margs.evaluation_kwargs()
    if not hasattr(args, "inner_lr"):  # `abmll evaluate` trains nothing: default to the adapter's recorded rate
        kwargs["lr"] = args.adapt_lr
    return evaluate_tasks(model, tasks, encoder=encoder, output_dir=out, name="evaluate", **kwargs)


def _report(results: dict[str, Any]) -> None:
    print(f"{'task':<40} {'accuracy':>9} {'ECE':>7} {'NLL':>7} {'n':>5}")
    for task, m in results["per_task"].items():
        print(f"{task:<40} {m['accuracy']:>9.3f} {m['ece']:>7.3f} {m['nll']:>7.3f} {m['n']:>5}")
    m = results["macro"]
    print(f"{'macro':<40} {m['accuracy']:>9.3f} {m['ece']:>7.3f} {m['nll']:>7.3f}")


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "evaluate": cmd_evaluate, "adapt": cmd_adapt}


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    args = parse_args(argv)
    import peft_abmll  # noqa: F401  (registers ABMLL before any adapter is loaded)

    COMMANDS[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
