"""PEFT and transformers workflows with an ABMLL adapter: save/load paths, multi-adapter verbs, registration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from _models import run_python, tiny_llama
from peft import (
    AutoPeftModelForCausalLM,
    LoraConfig,
    PeftModel,
    get_peft_model,
    inject_adapter_in_model,
    mapping,
    set_peft_model_state_dict,
)
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedModel

import peft_abmll
from peft_abmll import ABMLLConfig, ABMLLLayer, ABMLLModel, ABMLLPeftType

Inputs = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------- helpers
@torch.no_grad()
def _logits(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    return model(**inputs).logits


def _layers(model: nn.Module) -> list[ABMLLLayer]:
    return [m for m in model.modules() if isinstance(m, ABMLLLayer)]


@torch.no_grad()
def _perturb(model: nn.Module, posterior: str, adapter: str = "default", seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    for layer in _layers(model):
        if adapter in layer.abmll_global_mean_A:
            for factor in layer.posterior_factors(adapter, posterior):
                factor.add_(0.1 * torch.randn(factor.shape, generator=generator))


@pytest.fixture(name="base_dir")
def _base_dir(tmp_path: Path) -> Path:
    """The tiny Llama saved with `save_pretrained`, so loaders can find the base by path."""
    path = tmp_path / "base"
    tiny_llama().save_pretrained(path)
    return path


def _load_base(base_dir: Path) -> PreTrainedModel:
    return LlamaForCausalLM.from_pretrained(base_dir).eval()


def _trained(base: nn.Module, seed: int = 1, **kwargs: object) -> PeftModel:
    """A non-trivial ABMLL model: random means, and a local posterior different from the global one."""
    torch.manual_seed(seed)
    model = get_peft_model(base, ABMLLConfig(init_weights=False, init_std=0.05, **kwargs))
    _perturb(model, "local", seed=seed + 1)
    return model.eval()


@pytest.fixture(name="saved")
def _saved(base_dir: Path, tmp_path: Path, inputs: Inputs) -> tuple[Path, torch.Tensor]:
    """An ABMLL adapter saved to disk, and the eval logits it must reproduce."""
    model = _trained(_load_base(base_dir))
    model.set_posterior("local")  # the saved posterior choice and the local pairs must both round-trip
    path = tmp_path / "adapter"
    model.save_pretrained(path)
    return path, _logits(model, inputs)


# ----------------------------------------------------------------------------------------- files on disk
def test_saved_files_hold_only_abmll_weights(saved: tuple[Path, torch.Tensor]) -> None:
    path, _ = saved
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in path.iterdir()}
    with safe_open(path / "adapter_model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert keys and all(k.startswith("base_model.model.") for k in keys)
    expected = {f"abmll_{p}_{kind}_{m}" for p in ("global", "local") for kind in ("mean", "scale") for m in "AB"}
    assert {k.rsplit(".", 1)[-1] for k in keys} == expected
    assert len(keys) == 8 * 6  # 8 factors x (q, v, o) x 2 blocks
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ABMLL"
    assert config["posterior"] == "local" and config["r"] == 8
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "o_proj"}


@pytest.mark.slow  # a fresh interpreter importing torch, transformers and peft: ~5 s
def test_save_and_load_in_a_fresh_process(saved: tuple[Path, torch.Tensor], base_dir: Path, tmp_path: Path) -> None:
    path, expected = saved
    out = tmp_path / "logits.pt"
    run_python(
        "import torch, peft_abmll\n"
        "from peft import PeftModel\n"
        "from transformers import LlamaForCausalLM\n"
        "from _models import make_inputs\n"
        f"base = LlamaForCausalLM.from_pretrained({str(base_dir)!r})\n"
        f"model = PeftModel.from_pretrained(base, {str(path)!r}).eval()\n"
        "assert model.peft_config['default'].posterior == 'local'\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(**make_inputs()).logits, {str(out)!r})\n"
    )
    assert torch.equal(torch.load(out), expected)


# ----------------------------------------------------------------------------------------- loaders
def test_peft_model_from_pretrained(saved: tuple[Path, torch.Tensor], base_dir: Path, inputs: Inputs) -> None:
    path, expected = saved
    model = PeftModel.from_pretrained(_load_base(base_dir), path)
    assert isinstance(model.peft_config["default"], ABMLLConfig)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert torch.equal(_logits(model, inputs), expected)


def test_from_pretrained_trainable_keeps_the_saved_posterior(saved: tuple[Path, torch.Tensor], base_dir: Path) -> None:
    path, _ = saved
    model = PeftModel.from_pretrained(_load_base(base_dir), path, is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "abmll_local_" in n}


def test_low_cpu_mem_usage_load(saved: tuple[Path, torch.Tensor], base_dir: Path, inputs: Inputs) -> None:
    path, expected = saved
    model = PeftModel.from_pretrained(_load_base(base_dir), path, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(_logits(model.eval(), inputs), expected)


def test_load_adapter_under_a_second_name(
    saved: tuple[Path, torch.Tensor], base_dir: Path, tmp_path: Path, inputs: Inputs
) -> None:
    path, expected = saved
    other = _trained(_load_base(base_dir), seed=7)
    other.save_pretrained(tmp_path / "other")
    other_logits = _logits(other, inputs)
    model = PeftModel.from_pretrained(_load_base(base_dir), path)
    model.load_adapter(tmp_path / "other", adapter_name="other")
    assert torch.equal(_logits(model, inputs), expected)
    model.set_adapter("other")
    assert torch.equal(_logits(model.eval(), inputs), other_logits)
    model.set_adapter("default")
    assert torch.equal(_logits(model.eval(), inputs), expected)


def test_auto_peft_model_for_causal_lm(saved: tuple[Path, torch.Tensor], base_dir: Path, inputs: Inputs) -> None:
    path, expected = saved
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    model = AutoPeftModelForCausalLM.from_pretrained(path)
    assert isinstance(model, PeftModel) and isinstance(model.base_model, ABMLLModel)
    assert torch.equal(_logits(model.eval(), inputs), expected)


def test_transformers_load_adapter(saved: tuple[Path, torch.Tensor], base_dir: Path, inputs: Inputs) -> None:
    path, expected = saved
    base = _load_base(base_dir)
    base_logits = _logits(base, inputs)
    base.load_adapter(str(path))
    assert len(_layers(base)) == 6
    assert torch.equal(_logits(base.eval(), inputs), expected)
    base.disable_adapters()
    assert torch.equal(_logits(base, inputs), base_logits)


def test_installed_transformers_accepts_installed_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    """The versions pyproject.toml resolves to let transformers' adapter methods run; a mismatch is warned about."""
    from transformers.integrations import peft as hf_peft

    from peft_abmll.registration import check_transformers_peft_versions

    assert check_transformers_peft_versions(), "pin transformers in pyproject.toml to a release that takes this peft"
    monkeypatch.setattr(hf_peft, "MIN_PEFT_VERSION", "99.0")
    with pytest.warns(UserWarning, match=r"needs peft >= 99\.0 .*PeftModel\.from_pretrained"):
        assert not check_transformers_peft_versions()


def test_inject_adapter_in_model_and_set_state_dict(saved: tuple[Path, torch.Tensor], inputs: Inputs) -> None:
    path, expected = saved
    config = ABMLLConfig.from_pretrained(path)
    model = inject_adapter_in_model(config, tiny_llama())
    assert len(_layers(model)) == 6
    result = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "abmll_" in k]
    # injected layers are created in train mode (as for LoRA); eval() makes the forward deterministic
    assert torch.equal(_logits(model.eval(), inputs), expected)


# ----------------------------------------------------------------------------------------- multi-adapter verbs
def test_add_set_delete_adapter(tiny_llama: nn.Module, inputs: Inputs) -> None:
    model = _trained(tiny_llama)
    default_logits = _logits(model, inputs)
    torch.manual_seed(9)
    model.add_adapter("second", ABMLLConfig(init_weights=False))
    assert torch.equal(_logits(model, inputs), default_logits)  # adding does not activate
    model.set_adapter("second")
    assert model.active_adapter == "second"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "abmll_global_" in n and n.endswith(".second")}
    assert not torch.allclose(_logits(model.eval(), inputs), default_logits, atol=1e-4)
    with pytest.warns(UserWarning, match="now deleted"):
        model.delete_adapter("second")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert not [n for n, _ in model.named_parameters() if "second" in n]
    assert all("second" not in layer.r and "second" not in layer.abmll_settings for layer in _layers(model))
    assert torch.equal(_logits(model.eval(), inputs), default_logits)


def test_merge_and_unload_and_unload(inputs: Inputs) -> None:
    base_logits = _logits(tiny_llama(), inputs)
    model = _trained(tiny_llama())
    mean_logits = _logits(model, inputs)
    merged = model.merge_and_unload()
    assert isinstance(merged, LlamaForCausalLM) and not _layers(merged)
    torch.testing.assert_close(_logits(merged, inputs), mean_logits, rtol=1e-5, atol=1e-5)
    unloaded = _trained(tiny_llama()).unload()
    assert isinstance(unloaded, LlamaForCausalLM) and not _layers(unloaded)
    assert torch.equal(_logits(unloaded, inputs), base_logits)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_merge_and_unload_keeps_a_trained_classification_head(family: str) -> None:
    """Sequence classification: the head PEFT keeps whole (``modules_to_save``) comes back trained at unload.

    RoBERTa's head is two layers with no ``weight`` of its own (PEFT's generic unload fails on it); BERT's is one
    linear layer. The merged model predicts what the adapter's posterior mean did.
    """
    config_cls, model_cls = {
        "bert": (transformers.BertConfig, transformers.BertForSequenceClassification),
        "roberta": (transformers.RobertaConfig, transformers.RobertaForSequenceClassification),
    }[family]
    torch.manual_seed(0)
    config = config_cls(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, vocab_size=100, num_labels=3
    )
    model = get_peft_model(model_cls(config), ABMLLConfig(task_type="SEQ_CLS", r=4, init_weights=False))
    _perturb(model, "global")
    with torch.no_grad():
        for p in model.base_model.model.get_submodule("classifier").modules_to_save["default"].parameters():
            p.add_(0.5)  # as if trained: differs from the base model's head
    inputs = {"input_ids": torch.randint(3, 100, (2, 7))}
    mean_logits = _logits(model.eval(), inputs)
    merged = model.merge_and_unload()
    assert isinstance(merged, model_cls) and not _layers(merged)
    assert not any("modules_to_save" in name for name, _ in merged.named_modules())
    torch.testing.assert_close(_logits(merged, inputs), mean_logits, rtol=1e-5, atol=1e-5)


def test_rank_and_alpha_patterns_and_rslora_as_in_lora(inputs: Inputs, tmp_path: Path) -> None:
    """LoRA's per-module `rank_pattern` / `alpha_pattern` (names or regexes) and `use_rslora`, saved and reloaded."""
    config = ABMLLConfig(
        r=8,
        lora_alpha=16,
        rank_pattern={"o_proj": 2, r"layers\.1\.self_attn\.q_proj": 4},
        alpha_pattern={"v_proj": 4.0},
        use_rslora=True,
        init_weights=False,
    )
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), config).eval()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, ABMLLLayer)}
    expected = {  # module -> (rank, alpha)
        "layers.0.self_attn.q_proj": (8, 16.0),
        "layers.1.self_attn.q_proj": (4, 16.0),
        "layers.0.self_attn.v_proj": (8, 4.0),
        "layers.1.self_attn.o_proj": (2, 16.0),
    }
    for suffix, (rank, alpha) in expected.items():
        layer = next(m for name, m in layers.items() if name.endswith(suffix))
        assert layer.r["default"] == rank and layer.abmll_global_mean_A["default"].shape[0] == rank, suffix
        assert layer.abmll_global_scale_B["default"].shape[1] == rank, suffix
        assert layer.scaling["default"] == pytest.approx(alpha / rank**0.5), suffix  # rsLoRA: alpha / sqrt(r)
    logits = _logits(model, inputs)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert torch.equal(_logits(reloaded, inputs), logits)
    torch.testing.assert_close(_logits(reloaded.merge_and_unload(), inputs), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("field", "value"), [("rank_pattern", {"o_proj": 0}), ("rank_pattern", {"o_proj": 2.5}), ("alpha_pattern", [4])]
)
def test_bad_patterns_are_refused_with_the_fix(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"invalid {field}=.*use a dict of module name"):
        ABMLLConfig(**{field: value})


# ----------------------------------------------------------------------------------------- registration
TABLES = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")


def test_register_is_idempotent(inputs: Inputs) -> None:
    before = {name: dict(getattr(mapping, name)) for name in TABLES}
    peft_abmll.register()
    peft_abmll.register()
    assert {name: dict(getattr(mapping, name)) for name in TABLES} == before
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["ABMLL"] is ABMLLConfig
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["ABMLL"] is ABMLLModel
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING["ABMLL"] == "abmll_"
    assert torch.isfinite(_logits(get_peft_model(tiny_llama(), ABMLLConfig()), inputs)).all()


@pytest.mark.parametrize(("table", "intruder"), [(TABLES[0], LoraConfig), (TABLES[1], nn.Module), (TABLES[2], "x_")])
def test_register_refuses_to_overwrite_another_method(
    table: str, intruder: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(getattr(mapping, table), ABMLLPeftType.ABMLL, intruder)  # restored after the test
    with pytest.raises(RuntimeError, match="ABMLL"):
        peft_abmll.register()
    assert getattr(mapping, table)["ABMLL"] is intruder  # nothing was overwritten
    others = [name for name in TABLES if name != table]
    assert all(getattr(mapping, name)["ABMLL"] is not None for name in others)
