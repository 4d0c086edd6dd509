"""peft-abmll: Amortized Bayesian Meta-Learning for LoRA (ABMLL) as a Hugging Face PEFT adapter type.

``import peft_abmll`` registers the ``"ABMLL"`` PEFT type, after which ``peft.get_peft_model``,
``PeftModel.from_pretrained`` and the rest of PEFT's API work with `ABMLLConfig`.
"""

from ._version import __version__
from .peft_type import ABMLLPeftType
from .registration import register
from .tuner import ABMLLConfig, ABMLLLayer, ABMLLModel

register()

__all__ = ["ABMLLConfig", "ABMLLLayer", "ABMLLModel", "ABMLLPeftType", "__version__", "register"]
