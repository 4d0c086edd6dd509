"""peft-abmll: Amortized Bayesian Meta-Learning for LoRA (ABMLL) as a Hugging Face PEFT adapter type.

``import peft_abmll`` registers the ``"ABMLL"`` PEFT type, after which ``peft.get_peft_model``,
``PeftModel.from_pretrained`` and the rest of PEFT's API work with `ABMLLConfig`. The tuner loads with the
package; everything else (adaptation, the `MetaTrainer`, Hub helpers) loads on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports
from ._version import __version__
from .peft_type import ABMLLPeftType
from .registration import register
from .tuner import ABMLLConfig, ABMLLLayer, ABMLLModel

register()

_EXPORTS = {
    "adapt": "peft_abmll.adaptation",
    "adaptation_scope": "peft_abmll.adaptation",
    "evaluate_tasks": "peft_abmll.evaluation",
    "EvaluationProtocol": "peft_abmll.evaluation",
    "predict_proba": "peft_abmll.adaptation",
    "save_adapted": "peft_abmll.adaptation",
    "TaskEncoder": "peft_abmll.data",
    "format_prompt": "peft_abmll.data",
    "prepare_tasks": "peft_abmll.data",
    "export_lora": "peft_abmll.export",
    "save_pretrained_atomic": "peft_abmll.files",
    "push_to_hub": "peft_abmll.hub",
    "MetaTrainer": "peft_abmll.meta.trainer",
    "MetaTrainingArguments": "peft_abmll.meta.arguments",
    "NonFiniteLossError": "peft_abmll.algorithms",
    "allow_pickle": "peft_abmll.pickle_policy",
    "VariationalLossCallback": "peft_abmll.plain_trainer",
    "variational_loss": "peft_abmll.plain_trainer",
}

if TYPE_CHECKING:
    from .adaptation import adapt, adaptation_scope, predict_proba, save_adapted
    from .algorithms import NonFiniteLossError
    from .data import TaskEncoder, format_prompt, prepare_tasks
    from .evaluation import EvaluationProtocol, evaluate_tasks
    from .export import export_lora
    from .files import save_pretrained_atomic
    from .hub import push_to_hub
    from .meta.arguments import MetaTrainingArguments
    from .meta.trainer import MetaTrainer
    from .pickle_policy import allow_pickle
    from .plain_trainer import VariationalLossCallback, variational_loss


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)

__all__ = [
    "ABMLLConfig",
    "ABMLLLayer",
    "ABMLLModel",
    "ABMLLPeftType",
    "EvaluationProtocol",
    "MetaTrainer",
    "MetaTrainingArguments",
    "NonFiniteLossError",
    "TaskEncoder",
    "VariationalLossCallback",
    "__version__",
    "adapt",
    "adaptation_scope",
    "allow_pickle",
    "evaluate_tasks",
    "export_lora",
    "format_prompt",
    "predict_proba",
    "prepare_tasks",
    "push_to_hub",
    "register",
    "save_adapted",
    "save_pretrained_atomic",
    "variational_loss",
]
