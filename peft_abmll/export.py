"""Export the posterior mean of an ABMLL adapter as a plain PEFT LoRA adapter (loads without this plugin).

The mean weight update of every ABMLL layer is ``s * B_mean @ A_mean`` with ``s = lora_alpha / r`` -- exactly
a LoRA update with the same rank and alpha. The export is therefore exact (no SVD): ``lora_A`` / ``lora_B``
are the mean factors of the active posterior (``config.posterior``, "global" or "local").
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Literal, Union

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file

from .peft_type import PREFIX
from .tuner.config import ABMLLConfig
from .tuner.layer import ABMLLLayer

__all__ = ["export_lora", "to_lora_config", "to_lora_state_dict"]

_BIAS: dict[str, Literal["none", "all", "lora_only"]] = {"none": "none", "all": "all", "abmll_only": "lora_only"}


def to_lora_config(config: ABMLLConfig) -> LoraConfig:
    """The `LoraConfig` whose adapter computes the same mean update as `config`'s ABMLL adapter."""
    return LoraConfig(
        r=config.r,
        # LoraConfig annotates lora_alpha as int but takes any number; a fractional alpha must stay exact
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]
        lora_dropout=config.lora_dropout,
        rank_pattern=dict(config.rank_pattern),
        alpha_pattern=dict(config.alpha_pattern),
        use_rslora=config.use_rslora,
        # LoraConfig annotates these as list | str, yet turns a list into a set itself and accepts one
        target_modules=copy.copy(config.target_modules),  # type: ignore[arg-type]
        exclude_modules=copy.copy(config.exclude_modules),  # type: ignore[arg-type]
        layers_to_transform=copy.copy(config.layers_to_transform),
        layers_pattern=copy.copy(config.layers_pattern),
        modules_to_save=copy.copy(config.modules_to_save),
        fan_in_fan_out=config.fan_in_fan_out,
        bias=_BIAS[config.bias],
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        task_type=config.task_type,
    )


def to_lora_state_dict(
    model: PeftModel, adapter_name: str = "default", save_embedding_layers: Union[bool, Literal["auto"]] = "auto"
) -> dict[str, torch.Tensor]:
    """PEFT-LoRA checkpoint keys -> tensors for `adapter_name`'s active-posterior mean.

    Non-ABMLL entries PEFT would save with the adapter (``modules_to_save``, trainable biases, resized
    embeddings) are kept unchanged: their keys do not depend on the PEFT method.
    """
    state_dict = get_peft_model_state_dict(
        model, adapter_name=adapter_name, save_embedding_layers=save_embedding_layers
    )
    layers = {name: m for name, m in model.named_modules() if _holds(m, adapter_name)}
    if not layers:
        raise ValueError(f"No ABMLL layer holds adapter {adapter_name!r}.")
    abmll_prefixes = tuple(f"{name}.{PREFIX}" for name in layers)
    lora = {k: v for k, v in state_dict.items() if not k.startswith(abmll_prefixes)}
    for name, layer in layers.items():
        mean_A, mean_B = layer.posterior_factors(adapter_name)[:2]
        lora[f"{name}.lora_A.weight"] = mean_A
        lora[f"{name}.lora_B.weight"] = mean_B
    return {k: v.detach().to("cpu").contiguous() for k, v in lora.items()}


def export_lora(
    model: PeftModel,
    path: Union[str, os.PathLike],
    adapter_name: str = "default",
    *,
    save_embedding_layers: Union[bool, Literal["auto"]] = "auto",
) -> LoraConfig:
    """Save the active posterior's mean of an ABMLL `PeftModel` as a plain PEFT LoRA adapter in `path`.

    The result loads with plain PEFT, no plugin: ``PeftModel.from_pretrained(base, path)``. Its eval outputs
    equal the ABMLL model's ``predictive_mode="mean"`` outputs. Returns the saved `LoraConfig`.
    """
    config = model.peft_config.get(adapter_name) if hasattr(model, "peft_config") else None
    if not isinstance(config, ABMLLConfig):
        raise TypeError(f"export_lora needs a PeftModel with an ABMLL adapter named {adapter_name!r}.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lora_config = to_lora_config(config)
    state_dict = to_lora_state_dict(model, adapter_name, save_embedding_layers=save_embedding_layers)
    save_file(state_dict, path / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
    lora_config.save_pretrained(str(path))
    return lora_config


def _holds(module: torch.nn.Module, adapter_name: str) -> bool:
    return isinstance(module, ABMLLLayer) and adapter_name in module.abmll_global_mean_A
