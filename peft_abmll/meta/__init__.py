"""Meta-training: the `MetaTrainer`, its arguments and checkpoints.

The meta-learning verbs it drives (views, the inner loop) live one level down, in `peft_abmll.algorithms`;
they are re-exported here. Names load on first use, so ``import peft_abmll.meta.arguments`` does not import
the Trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    "ABMLLView": "peft_abmll.algorithms",
    "NonFiniteLossError": "peft_abmll.algorithms",
    "ReptileView": "peft_abmll.algorithms",
    "SnapshotView": "peft_abmll.algorithms",
    "inner_loop": "peft_abmll.algorithms",
    "make_view": "peft_abmll.algorithms",
    "MetaTrainingArguments": "peft_abmll.meta.arguments",
    "MetaTrainer": "peft_abmll.meta.trainer",
    "TaskCollection": "peft_abmll.meta.trainer",
}
__all__ = [
    "ABMLLView",
    "MetaTrainer",
    "MetaTrainingArguments",
    "NonFiniteLossError",
    "ReptileView",
    "SnapshotView",
    "TaskCollection",
    "inner_loop",
    "make_view",
]

if TYPE_CHECKING:
    from ..algorithms import ABMLLView, NonFiniteLossError, ReptileView, SnapshotView, inner_loop, make_view
    from .arguments import MetaTrainingArguments
    from .trainer import MetaTrainer, TaskCollection


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
