"""Meta-train a tiny ABMLL model on generated tasks: one process, or one rank of ``torchrun`` (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_ddp_worker.py OUT --tasks-per-update 1 2

Used by tests/test_distributed.py: one training run per ``--tasks-per-update`` value G (the
``gradient_accumulation_steps``), in ``OUT/ga<G>``. There every rank gets its *own* ``output_dir``
(``rank<r>``), so the test can see which process wrote what; the final adapter goes to ``rank<r>/final``
through ``trainer.save_model``. Outside those folders each rank leaves ``report_rank<r>.json`` (its log
history, how the run was set up), ``global_rank<r>.pt`` (its global adapter tensors in memory) and
``stdout_rank<r>.txt`` (what it printed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from _tasks import task_family, tiny_lm, tiny_tokenizer
from peft import get_peft_model

from peft_abmll import ABMLLConfig, MetaTrainer, MetaTrainingArguments

UPDATES = 4  # optimizer steps; 2 tasks per update over 4 training tasks = 2 epochs


class CpuFsdpMetaTrainer(MetaTrainer):
    """`MetaTrainer` under accelerate's FSDP2 on CPU processes (a test shim, not a user recipe).

    accelerate enables FSDP only when its distributed type is a GPU-like one (on CPU it silently runs DDP), while
    torch's FSDP2 (`fully_shard`) itself runs on CPU with gloo. Declaring the type GPU-like just before the
    Trainer builds its `Accelerator` makes accelerate take its FSDP2 path, unchanged, on this machine.
    """

    def create_accelerator_and_postprocess(self) -> None:
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        PartialState().distributed_type = DistributedType.MULTI_GPU
        super().create_accelerator_and_postprocess()


def run(out: Path, tasks_per_update: int, rank: int = 0, fsdp: bool = False) -> tuple[MetaTrainer, dict[str, Any]]:
    """Train `UPDATES` updates (evaluating at updates 2 and 4) and save the adapter; return trainer and report.

    With `fsdp`: accelerate's FSDP2, the base model's decoder layers sharded across the processes.
    """
    tok = tiny_tokenizer()
    base = tiny_lm(tok, seed=0)
    torch.manual_seed(0)
    model = get_peft_model(base, ABMLLConfig())
    args = MetaTrainingArguments(
        output_dir=str(out / f"rank{rank}"),
        max_steps=UPDATES,
        gradient_accumulation_steps=tasks_per_update,
        learning_rate=1e-2,
        inner_learning_rate=1e-2,
        outer_step_size=0.1,  # small global steps: float rounding is not amplified into different runs (below)
        inner_steps=3,
        adaptation_steps=3,
        eval_max_query=4,
        eval_strategy="steps",
        eval_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,  # the PrinterCallback prints the logs (on the main process only)
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        fsdp=fsdp,
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]} if fsdp else None,
        ddp_timeout=120,  # a lost peer fails the run in 2 minutes (not torch's 30) with a traceback
        seed=0,
    )
    trainer = (CpuFsdpMetaTrainer if fsdp else MetaTrainer)(
        model=model,
        args=args,
        train_dataset=task_family(num_tasks=4, per_task=16, seed=0),
        eval_dataset=task_family(num_tasks=3, per_task=12, seed=1, prefix="heldout"),
        processing_class=tok,
    )
    trainer.train()
    trainer.save_model(str(out / f"rank{rank}" / "final"))
    report = {
        "rank": rank,
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "wrapped_model": type(trainer.model_wrapped).__name__,
        "parameter_types": sorted({type(p).__name__ for p in trainer.model.parameters()}),
        "adapter_parameter_types": sorted({type(p).__name__ for p in trainer.view.global_params()}),
        "world_process_zero": trainer.is_world_process_zero(),
        "log_history": trainer.state.log_history,
    }
    return trainer, report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--tasks-per-update", type=int, nargs="+", default=[1], help="gradient_accumulation_steps: one run each"
    )
    parser.add_argument("--fsdp", action="store_true", help="accelerate's FSDP2; runs go to OUT/fsdp_ga<G>")
    cli = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    for tasks_per_update in cli.tasks_per_update:
        out = cli.out / f"{'fsdp_' if cli.fsdp else ''}ga{tasks_per_update}"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"stdout_rank{rank}.txt", "w") as stdout, contextlib.redirect_stdout(stdout):
            trainer, report = run(out, tasks_per_update, rank, fsdp=cli.fsdp)
        (out / f"report_rank{rank}.json").write_text(json.dumps(report))
        torch.save([p.detach().clone() for p in trainer.view.global_params()], out / f"global_rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
