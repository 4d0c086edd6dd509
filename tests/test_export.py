"""Exporting the ABMLL posterior mean as a plain PEFT LoRA adapter (`export_lora`, peft's `save_as_lora`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _models import BUILDERS, run_python, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.conversion import save_as_lora
from safetensors.torch import load_file
from torch import nn

from peft_abmll import ABMLLConfig, ABMLLLayer
from peft_abmll.export import export_lora

pytestmark = pytest.mark.filterwarnings("ignore:.*Conv1D.*fan_in_fan_out:UserWarning")
Inputs = dict[str, torch.Tensor]


@torch.no_grad()
def _logits(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    return model(**inputs).logits


def _layers(model: nn.Module) -> list[ABMLLLayer]:
    return [m for m in model.modules() if isinstance(m, ABMLLLayer)]


def _abmll(family: str, posterior: str = "global", **kwargs: object) -> PeftModel:
    """A non-trivial ABMLL model (random means, local != global) using `posterior`, in eval mode."""
    torch.manual_seed(1)
    model = get_peft_model(BUILDERS[family](), ABMLLConfig(init_weights=False, init_std=0.05, **kwargs))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in _layers(model):
            for factor in layer.posterior_factors("default", "local"):
                factor.add_(0.1 * torch.randn(factor.shape, generator=generator))
    model.set_posterior(posterior)
    return model.eval()


def _load_lora(family: str, path: Path) -> PeftModel:
    model = PeftModel.from_pretrained(BUILDERS[family](), path).eval()
    assert isinstance(model.peft_config["default"], LoraConfig)
    assert not _layers(model) and any(isinstance(m, LoraLayer) for m in model.modules())
    return model


# ----------------------------------------------------------------------------------------- export_lora
@pytest.mark.parametrize("posterior", ["global", "local"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_export_lora_reproduces_mean_mode_logits(family: str, posterior: str, tmp_path: Path, inputs: Inputs) -> None:
    model = _abmll(family, posterior)
    expected = _logits(model, inputs)
    config = export_lora(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (config.r, config.lora_alpha, config.fan_in_fan_out) == (8, 16, family == "gpt2")
    loaded = _load_lora(family, tmp_path)
    torch.testing.assert_close(_logits(loaded, inputs), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_lora_keeps_per_module_ranks_alphas_and_rslora(family: str, tmp_path: Path, inputs: Inputs) -> None:
    """`rank_pattern` / `alpha_pattern` / `use_rslora` reach the LoRA export, which computes the same update."""
    first, second = ("q_proj", "o_proj") if family == "llama" else ("c_attn", "c_proj")
    patterns = {"rank_pattern": {first: 4}, "alpha_pattern": {second: 5.0}, "use_rslora": True}
    model = _abmll(family, **patterns)
    expected = _logits(model, inputs)
    config = export_lora(model, tmp_path)
    assert (config.rank_pattern, config.alpha_pattern, config.use_rslora) == ({first: 4}, {second: 5.0}, True)
    assert model.peft_config["default"].fan_in_fan_out is (family == "gpt2")  # Conv1D's layout, though patterned
    torch.testing.assert_close(_logits(_load_lora(family, tmp_path), inputs), expected, rtol=1e-6, atol=1e-6)


def test_export_lora_uses_the_lora_layout_for_conv1d(tmp_path: Path) -> None:
    model = _abmll("gpt2")
    export_lora(model, tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert len(weights) == 2 * len(_layers(model))
    key = "base_model.model.transformer.h.0.attn.c_attn"
    assert weights[f"{key}.lora_A.weight"].shape == (8, 32)  # (r, d_in)
    assert weights[f"{key}.lora_B.weight"].shape == (96, 8)  # (d_out, r)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    delta = 2.0 * weights[f"{key}.lora_B.weight"] @ weights[f"{key}.lora_A.weight"]
    torch.testing.assert_close(delta.T, layer.get_delta_weight("default"))  # Conv1D stores W transposed


def test_export_lora_keeps_config_fields_and_modules_to_save(tmp_path: Path, inputs: Inputs) -> None:
    model = _abmll(
        "llama",
        target_modules=["q_proj", "v_proj"],
        exclude_modules=["k_proj"],
        layers_to_transform=[1],
        layers_pattern="layers",
        modules_to_save=["lm_head"],
        lora_alpha=8,
        r=4,
    )
    assert len(_layers(model)) == 2
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    expected = _logits(model, inputs)
    config = export_lora(model, tmp_path)
    assert config.target_modules == {"q_proj", "v_proj"} and config.exclude_modules == {"k_proj"}
    assert (config.layers_to_transform, config.layers_pattern) == ([1], "layers")
    assert config.modules_to_save == ["lm_head"] and (config.r, config.lora_alpha) == (4, 8)
    loaded = _load_lora("llama", tmp_path)
    assert sum(isinstance(m, LoraLayer) for m in loaded.modules()) == 2
    torch.testing.assert_close(_logits(loaded, inputs), expected, rtol=1e-6, atol=1e-6)


def test_export_lora_keeps_trained_biases(tmp_path: Path, inputs: Inputs) -> None:
    model = _abmll("qwen2", bias="abmll_only")
    with torch.no_grad():
        for layer in _layers(model):
            if layer.get_base_layer().bias is not None:
                layer.get_base_layer().bias.add_(0.5)
    expected = _logits(model, inputs)
    assert export_lora(model, tmp_path).bias == "lora_only"
    torch.testing.assert_close(_logits(_load_lora("qwen2", tmp_path), inputs), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # a fresh interpreter importing torch, transformers and peft: ~5 s
def test_export_lora_loads_without_the_plugin(tmp_path: Path, inputs: Inputs) -> None:
    model = _abmll("llama", "local")
    expected = _logits(model, inputs)
    export_lora(model, tmp_path / "lora")
    out = tmp_path / "logits.pt"
    run_python(
        "import sys, torch\n"
        "from peft import PeftModel, mapping\n"
        "from _models import make_inputs, tiny_llama\n"
        f"model = PeftModel.from_pretrained(tiny_llama(), {str(tmp_path / 'lora')!r}).eval()\n"
        "assert 'peft_abmll' not in sys.modules and 'ABMLL' not in mapping.PEFT_TYPE_TO_CONFIG_MAPPING\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(**make_inputs()).logits, {str(out)!r})\n"
    )
    torch.testing.assert_close(torch.load(out), expected, rtol=1e-6, atol=1e-6)


def test_export_lora_rejects_non_abmll_models(tmp_path: Path) -> None:
    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="ABMLL"):
        export_lora(lora, tmp_path)
    with pytest.raises(TypeError, match="'other'"):
        export_lora(_abmll("llama"), tmp_path, adapter_name="other")


# ----------------------------------------------------------------------------------------- peft's save_as_lora
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_save_as_lora(family: str, tmp_path: Path, inputs: Inputs) -> None:
    model = _abmll(family, "local")
    assert all(layer.supports_lora_conversion("default") for layer in _layers(model))
    expected = _logits(model, inputs)
    save_as_lora(tmp_path, model, rank=8)  # SVD of the exact rank-8 mean update: lossless up to rounding
    loaded = _load_lora(family, tmp_path)
    torch.testing.assert_close(_logits(loaded, inputs), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_logits(_abmll(family, "global"), inputs), expected, atol=1e-3)
