"""peft-abmll: Amortized Bayesian Meta-Learning for LoRA (ABMLL) as a Hugging Face PEFT adapter type.

``import peft_abmll`` registers the ``"ABMLL"`` PEFT type, after which ``peft.get_peft_model``,
``PeftModel.from_pretrained`` and the rest of PEFT's API work with `ABMLLConfig`.
"""

from ._version import __version__
from .peft_type import ABMLLPeftType
from .registration import register
from .tuner import ABMLLConfig, ABMLLLayer, ABMLLModel

register()

from .adaptation import adapt, adaptation_scope, evaluate_tasks, predict_proba, save_adapted  # noqa: E402
from .data import TaskEncoder, format_prompt, prepare_tasks  # noqa: E402
from .export import export_lora  # noqa: E402
from .hub import push_to_hub  # noqa: E402
from .meta import MetaTrainer, MetaTrainingArguments, NonFiniteLossError  # noqa: E402
from .safety import allow_pickle, save_pretrained_atomic  # noqa: E402

__all__ = [
    "ABMLLConfig",
    "ABMLLLayer",
    "ABMLLModel",
    "ABMLLPeftType",
    "MetaTrainer",
    "MetaTrainingArguments",
    "NonFiniteLossError",
    "TaskEncoder",
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
]
