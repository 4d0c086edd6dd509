"""Checkpoints that survive interruptions: a completeness marker, resume from the last complete one, no NaN saves.

transformers' `Trainer` writes a checkpoint straight into ``checkpoint-<step>/`` file by file (adapter,
tokenizer, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ``trainer_state.json``), and
``resume_from_checkpoint=True`` takes the highest-numbered ``checkpoint-*`` folder whether or not it was
finished (`transformers.trainer_utils.get_last_checkpoint`). A run killed while saving therefore leaves a
half-written folder that a later "resume from latest" picks up and fails on (or, worse, half uses).

`CheckpointSafetyMixin` (mixed into `MetaTrainer`, or into any `Trainer` subclass) fixes that:

- after transformers has written every file of a checkpoint, the files are fsync-ed and a marker
  ``abmll_checkpoint.json`` (step and the size of every file) is written atomically; a folder without a
  valid marker, or whose files no longer have the recorded sizes, is *incomplete*;
- ``train(resume_from_checkpoint=True)`` (or ``"latest"``) resumes from the newest *complete* checkpoint
  and logs the incomplete ones it skipped; an explicit incomplete checkpoint path is refused with a
  ValueError (an unmarked folder with a readable ``trainer_state.json``, e.g. from an older version, is
  accepted with a warning);
- an older checkpoint is never touched by a new save: ``save_total_limit`` rotation runs only after the
  new checkpoint is marked complete, and a leftover incomplete folder of the same step is removed first;
- a checkpoint is never written from non-finite parameters: the save stops with `NonFiniteLossError`
  naming the step and the task, so the last good checkpoint stays the newest complete one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..algorithms import NonFiniteLossError
from ..files import atomic_write_text, fsync_tree

logger = logging.getLogger("peft_abmll")

__all__ = [
    "CHECKPOINT_MARKER",
    "CheckpointSafetyMixin",
    "checkpoint_problem",
    "incomplete_checkpoints",
    "last_complete_checkpoint",
    "mark_checkpoint_complete",
]

CHECKPOINT_MARKER = "abmll_checkpoint.json"
MARKER_VERSION = 1
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


# ----------------------------------------------------------------------------------------------- marker
def _files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``folder`` except the marker."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != CHECKPOINT_MARKER
    }


def mark_checkpoint_complete(folder: Union[str, os.PathLike], step: int) -> Path:
    """Flush every file of ``folder`` to disk, then write the completeness marker atomically."""
    folder = Path(folder)
    files = _files(folder)
    fsync_tree(folder)
    payload = {"version": MARKER_VERSION, "global_step": int(step), "files": files}
    return atomic_write_text(folder / CHECKPOINT_MARKER, json.dumps(payload, indent=1, sort_keys=True))


def checkpoint_problem(folder: Union[str, os.PathLike]) -> Optional[str]:
    """None if ``folder`` is a complete checkpoint, else why it is not (missing marker, missing/changed file)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it is not a folder"
    try:
        marker = json.loads((folder / CHECKPOINT_MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no {CHECKPOINT_MARKER} (the save did not finish)"
    except (OSError, ValueError) as error:
        return f"its {CHECKPOINT_MARKER} is unreadable ({error})"
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict) or not files:
        return f"its {CHECKPOINT_MARKER} lists no files"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes instead of {size}"
    return None


def _checkpoint_folders(output_dir: Union[str, os.PathLike]) -> list[tuple[int, Path]]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _CHECKPOINT_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def last_complete_checkpoint(output_dir: Union[str, os.PathLike]) -> Optional[Path]:
    """The highest-step complete ``checkpoint-<step>`` folder in ``output_dir``, or None."""
    for _, folder in reversed(_checkpoint_folders(output_dir)):
        if checkpoint_problem(folder) is None:
            return folder
    return None


def incomplete_checkpoints(output_dir: Union[str, os.PathLike]) -> list[Path]:
    """The ``checkpoint-<step>`` folders of ``output_dir`` that are not complete (oldest first)."""
    return [folder for _, folder in _checkpoint_folders(output_dir) if checkpoint_problem(folder) is not None]


def _legacy_state_ok(folder: Path) -> bool:
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def _non_finite_parameter(model: torch.nn.Module) -> Optional[str]:
    """Name of the first trainable or adapter parameter holding a NaN / infinity, else None."""
    for name, param in model.named_parameters():
        if not (param.requires_grad or "abmll_" in name or "lora_" in name):
            continue
        if param.is_floating_point() and not param.is_meta and not bool(torch.isfinite(param.detach()).all()):
            return name
    return None


# ----------------------------------------------------------------------------------------------- trainer mixin
class CheckpointSafetyMixin:
    """Complete-or-ignored checkpoints for a transformers `Trainer` subclass (see the module docstring).

    Mix in before the Trainer class: ``class MyTrainer(CheckpointSafetyMixin, Trainer)``.
    """

    # provided by transformers.Trainer
    args: Any
    state: Any
    model: Any
    accelerator: Any

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`; ``resume_from_checkpoint=True`` / ``"latest"`` means the newest *complete* checkpoint."""
        resolved = self._resolve_resume(resume_from_checkpoint)
        return super().train(resolved, *args, **kwargs)  # type: ignore[misc]

    def _resolve_resume(self, resume: Union[str, bool, None]) -> Union[str, bool, None]:
        if resume is None or resume is False:
            return resume
        output_dir = self.args.output_dir
        if resume is True or resume == "latest":
            latest = last_complete_checkpoint(output_dir)
            skipped = [f for f in incomplete_checkpoints(output_dir) if latest is None or _step(f) > _step(latest)]
            for folder in skipped:
                logger.warning("Skipping incomplete checkpoint %s: %s.", folder, checkpoint_problem(folder))
            if latest is None:
                raise ValueError(
                    f"No complete checkpoint in {output_dir} to resume from"
                    + (f" (incomplete: {', '.join(f.name for f in skipped)})" if skipped else "")
                    + ". Start without resume_from_checkpoint, or pass a checkpoint folder explicitly."
                )
            logger.info("Resuming from the last complete checkpoint %s.", latest)
            return str(latest)
        folder = Path(str(resume))
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        if not (folder / CHECKPOINT_MARKER).exists() and _legacy_state_ok(folder):
            logger.warning(
                "Checkpoint %s has no %s (written by an older version?); its completeness cannot be checked.",
                folder,
                CHECKPOINT_MARKER,
            )
            return str(folder)
        latest = last_complete_checkpoint(folder.parent)
        hint = f" The last complete checkpoint there is {latest}." if latest is not None else ""
        raise ValueError(
            f"Cannot resume from {folder}: it is incomplete, {problem} (its save was interrupted, or a file changed "
            f"after it was written).{hint} Pass resume_from_checkpoint=True to use the newest complete checkpoint."
        )

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        step = int(self.state.global_step)
        bad = _non_finite_parameter(self.accelerator.unwrap_model(self.model))
        if bad is not None:
            task = getattr(self, "_current_task", None)
            where = f" after task {task!r}" if task not in (None, "?") else ""
            raise NonFiniteLossError(
                f"Parameter {bad} became non-finite at global step {step}{where}: checkpoint-{step} is not written, "
                "the previous checkpoint stays the newest complete one. Lower learning_rate or beta, or raise "
                "init_std / scale_floor, and resume from it."
            )
        run_dir = Path(self._get_output_dir(trial=trial))  # type: ignore[attr-defined]
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if self.args.should_save and folder.exists():
            if checkpoint_problem(folder) is not None:
                shutil.rmtree(folder)  # a leftover of an interrupted save: no stale file may survive
            else:
                (folder / CHECKPOINT_MARKER).unlink()  # being overwritten: incomplete until done
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotate only once the new checkpoint is marked complete
        self.accelerator.wait_for_everyone()  # no rank writes into the folder before a leftover is cleared
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank has written its files (e.g. rng_state_<rank>.pth)
        if self.args.should_save:
            mark_checkpoint_complete(folder, step)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )


def _step(folder: Path) -> float:
    match = _CHECKPOINT_RE.match(folder.name)
    return int(match.group(1)) if match else -math.inf
