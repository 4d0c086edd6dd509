"""The ABMLL tuner, laid out like PEFT's own: `config.py`, `layer.py`, `model.py`."""

from .config import ABMLLConfig, size_scaled_beta
from .layer import ABMLLLayer, Linear
from .model import TARGET_MODULES_MAPPING, ABMLLModel

__all__ = ["TARGET_MODULES_MAPPING", "ABMLLConfig", "ABMLLLayer", "ABMLLModel", "Linear", "size_scaled_beta"]
