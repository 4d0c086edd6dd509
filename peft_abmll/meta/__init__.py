"""Meta-training: the `MetaTrainer`, its arguments, and the meta-learning verbs."""

from .algorithms import ABMLLView, NonFiniteLossError, ReptileView, SnapshotView, inner_loop, make_view
from .arguments import MetaTrainingArguments
from .trainer import MetaTrainer, TaskCollection

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
