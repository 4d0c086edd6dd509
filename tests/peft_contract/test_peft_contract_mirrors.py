"""Our one-to-one mirrors of the PEFT 0.21.2 generic checks that cannot run on ABMLL unmodified.

Each test is named after the PEFT test it mirrors and follows its steps (code adapted from PEFT's tests, Apache-2.0,
see _vendor/NOTICE). The single change is stated in each docstring. The common reason: PEFT's check expects *every*
parameter of a trainable adapter to require (or receive) a gradient, whereas ABMLL trains one posterior at a time
and declares the other pair of factors frozen through PEFT's own ``frozen_peft_weight_names`` (the mechanism of
LoRA's MiCA variant, which fails the unmodified checks identically). The mirrors require exactly PEFT's expectation
for every parameter outside that declared frozen subset, and requires_grad=False / no gradient inside it.

``TestDefaultTargetModules`` mirrors PEFT's tests of the same name, which PEFT runs for DeLoRA/LoRA/OSF only and which
patch those methods' own target-module tables.
"""

from __future__ import annotations

from typing import Any
from unittest.mock import MagicMock

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import peft_abmll.tuner.model as abmll_model
from peft_abmll import ABMLLConfig

from ._peft_tests import test_custom_models as upstream
from ._peft_tests import testing_common
from .test_peft_common_decoder_contract import MODEL_ID, LocalTinyCausalLM

POSTERIORS = pytest.mark.parametrize("posterior", ["global", "local"])


def frozen_by_design(model: nn.Module) -> set[int]:
    """ids of the adapter parameters that their layer declares frozen through ``frozen_peft_weight_names``."""
    frozen = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for adapter_name, layer_names in module.frozen_peft_weight_names.items():
                for layer_name in layer_names:
                    container = getattr(module, layer_name, None)
                    if container is not None and adapter_name in container:
                        frozen.add(id(container[adapter_name]))
    return frozen


def test_frozen_subset_is_the_inactive_posterior() -> None:
    """What the mirrors rely on: ABMLL's declared frozen subset is exactly the pair of the other posterior."""
    model = get_peft_model(upstream.MLP(), ABMLLConfig(target_modules=["lin0"]))
    layer = model.base_model.model.lin0
    assert layer.frozen_peft_weight_names["default"] == tuple(n for n in layer.adapter_layer_names if "_local_" in n)
    frozen = frozen_by_design(model)
    for name, param in model.named_parameters():
        if model.prefix in name:
            assert (id(param) in frozen) == ("_local_" in name)
            assert param.requires_grad == ("_global_" in name)


# ------------------------------------------------------------------------------------------------ custom models
def _check_requires_grad(module: BaseTunerLayer, adapter_name: str, requires_grad: bool) -> None:
    """PEFT's TestPeftCustomModel._check_requires_grad, except that the declared frozen subset must stay frozen."""
    frozen = module.frozen_peft_weight_names.get(adapter_name, ())
    for name in module.adapter_layer_names:
        module_dict = getattr(module, name)
        if adapter_name not in module_dict:
            continue
        attr = module_dict[adapter_name]
        expected = requires_grad and name not in frozen
        params = attr.parameters() if isinstance(attr, nn.Module) else [attr]
        for param in params:
            assert param.requires_grad == expected, (name, adapter_name)


@POSTERIORS
def test_set_requires_grad(posterior: str) -> None:
    """Mirrors TestPeftCustomModel.test_set_requires_grad (change: the frozen subset stays frozen)."""
    config_kwargs: dict[str, Any] = {"target_modules": ["layers.0.lin0"], "posterior": posterior}
    model = get_peft_model(upstream.DeepMLP(size=256), ABMLLConfig(**config_kwargs), adapter_name="adapter0").eval()
    layers = model.base_model.model.layers
    _check_requires_grad(layers[0].lin0, adapter_name="adapter0", requires_grad=True)

    config_kwargs["target_modules"] = ["layers.0.lin0", "layers.1.lin0"]
    config_kwargs["modules_to_save"] = ["layers.2.lin0"]
    model.add_adapter("adapter1", ABMLLConfig(**config_kwargs))
    _check_requires_grad(layers[0].lin0, adapter_name="adapter0", requires_grad=True)
    _check_requires_grad(layers[0].lin0, adapter_name="adapter1", requires_grad=False)
    _check_requires_grad(layers[1].lin0, adapter_name="adapter1", requires_grad=False)

    model.set_requires_grad(adapter_names="adapter1")
    _check_requires_grad(layers[0].lin0, adapter_name="adapter0", requires_grad=True)
    _check_requires_grad(layers[0].lin0, adapter_name="adapter1", requires_grad=True)
    _check_requires_grad(layers[1].lin0, adapter_name="adapter1", requires_grad=True)

    model.set_requires_grad(adapter_names=["adapter0", "adapter1"], requires_grad=False)
    _check_requires_grad(layers[0].lin0, adapter_name="adapter0", requires_grad=False)
    _check_requires_grad(layers[0].lin0, adapter_name="adapter1", requires_grad=False)
    _check_requires_grad(layers[1].lin0, adapter_name="adapter1", requires_grad=False)


def _assert_trainable(model: nn.Module, adapters: tuple[str, ...]) -> None:
    """PEFT's expectation (`.{adapter}` params of `adapters` train, nothing else), minus the declared frozen subset."""
    frozen = frozen_by_design(model)
    for name, param in model.named_parameters():
        expected = any(f".{adapter}" in name for adapter in adapters) and id(param) not in frozen
        assert param.requires_grad == expected, name


@POSTERIORS
@pytest.mark.parametrize("is_trainable", [False, True])
def test_loading_model_requires_grad_set_correctly(posterior: str, is_trainable: bool, tmp_path) -> None:
    """Mirrors TestRequiresGrad.test_loading_model_requires_grad_set_correctly (change: frozen subset honoured)."""
    config = ABMLLConfig(target_modules=["layers.0.lin0"], posterior=posterior)
    get_peft_model(upstream.DeepMLP(size=256), config).save_pretrained(tmp_path)

    model = PeftModel.from_pretrained(upstream.DeepMLP(size=256), tmp_path, is_trainable=is_trainable)
    _assert_trainable(model, ("default",) if is_trainable else ())

    model.load_adapter(tmp_path, adapter_name="other", is_trainable=is_trainable)
    _assert_trainable(model, ("default", "other") if is_trainable else ())

    model.load_adapter(tmp_path, adapter_name="opposite", is_trainable=not is_trainable)
    expected = ("default", "other") if is_trainable else ("opposite",)
    _assert_trainable(model, expected)

    model.add_adapter(adapter_name="added", peft_config=config)
    _assert_trainable(model, expected)


@POSTERIORS
@pytest.mark.parametrize("is_trainable", [False, True])
def test_loading_model_with_modules_to_save_requires_grad_set_correctly(posterior, is_trainable, tmp_path) -> None:
    """Mirrors TestRequiresGrad.test_loading_model_with_modules_to_save_requires_grad_set_correctly (same change)."""
    config = ABMLLConfig(target_modules=["layers.0.lin0"], modules_to_save=["layers.0.lin1"], posterior=posterior)
    get_peft_model(upstream.DeepMLP(size=256), config).save_pretrained(tmp_path)

    model = PeftModel.from_pretrained(upstream.DeepMLP(size=256), tmp_path, is_trainable=is_trainable)
    _assert_trainable(model, ("default",) if is_trainable else ())

    model.load_adapter(tmp_path, adapter_name="other", is_trainable=is_trainable)
    _assert_trainable(model, ("default", "other") if is_trainable else ())


# ------------------------------------------------------------------------------------------------ decoder model
class TestMirroredDecoderChecks(testing_common.PeftCommonTester):
    transformers_class = LocalTinyCausalLM

    def prepare_inputs_for_testing(self) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([[1, 1, 1], [1, 2, 1]]).to(self.torch_device)
        attention_mask = torch.tensor([[1, 1, 1], [1, 0, 1]]).to(self.torch_device)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @POSTERIORS
    def test_training_decoders_layer_indexing(self, posterior: str) -> None:
        """Mirrors PeftCommonTester._test_training_layer_indexing (change: no gradient expected on the frozen subset).

        PEFT asserts a gradient on every adapter parameter; here on every adapter parameter that requires one.
        """
        config_kwargs = {"target_modules": ["q_proj", "v_proj"], "posterior": posterior}
        config = ABMLLConfig(base_model_name_or_path=MODEL_ID, layers_to_transform=[0], **config_kwargs)
        model = get_peft_model(self.transformers_class.from_pretrained(MODEL_ID), config).to(self.torch_device)
        inputs = self.prepare_inputs_for_testing()
        model(**inputs)[0].sum().backward()

        frozen = frozen_by_design(model)
        nb_trainable = 0
        for name, param in model.named_parameters():
            if model.prefix in name:
                nb_trainable += 1
                assert (param.grad is not None) == (id(param) not in frozen), name
            else:
                assert param.grad is None, name

        model.eval()
        logits = model(**inputs)[0][0]
        model.save_pretrained(self._tmp)
        loaded = PeftModel.from_pretrained(self.transformers_class.from_pretrained(MODEL_ID), self._tmp)
        assert torch.allclose(logits, loaded(**inputs)[0][0], atol=1e-4, rtol=1e-4)

        model = get_peft_model(self.transformers_class.from_pretrained(MODEL_ID), ABMLLConfig(**config_kwargs))
        nb_trainable_all = sum(1 for name, _ in model.named_parameters() if model.prefix in name)
        assert nb_trainable < nb_trainable_all  # the tiny Llama has 2 layers; layers_to_transform=[0] adapts fewer

    @pytest.fixture(autouse=True)
    def _tmp_dir(self, tmp_path) -> None:
        self._tmp = tmp_path

    @POSTERIORS
    @pytest.mark.parametrize("use_reentrant", [True, False])
    def test_training_decoders_gradient_checkpointing(self, posterior: str, use_reentrant: bool) -> None:
        """Mirrors PeftCommonTester._test_training_gradient_checkpointing (change: frozen subset has no gradient)."""
        model = self.transformers_class.from_pretrained(MODEL_ID)
        assert model.supports_gradient_checkpointing
        config = ABMLLConfig(base_model_name_or_path=MODEL_ID, target_modules=None, posterior=posterior)
        model = get_peft_model(model, config).to(self.torch_device)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        model.train(True)
        inputs = self.prepare_inputs_for_testing()

        def get_grads() -> dict[str, float]:
            for _, param in params:
                param.grad = None
            (model(**inputs)[0] ** 2).sum().backward()
            return {n: 0.0 if p.grad is None else p.grad.abs().sum().item() for n, p in params}

        grads_normal = get_grads()
        model.prepare_model_for_gradient_checkpointing(model)
        model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
        grads_checkpointing = get_grads()

        all_grads = [*grads_normal.values(), *grads_checkpointing.values()]
        threshold = sum(all_grads) / len(all_grads) * 1e-6
        for name in grads_normal:
            if grads_normal[name] > threshold:
                assert grads_checkpointing[name] > 0, name
            if grads_checkpointing[name] > threshold:
                assert grads_normal[name] > 0, name

        frozen = frozen_by_design(model)
        for name, param in model.named_parameters():
            if model.prefix in name:
                assert (param.grad is not None) == (id(param) not in frozen), name
            else:
                assert param.grad is None, name


# ------------------------------------------------------------------------------------------------ default targets
class TestDefaultTargetModules:
    """Mirrors of PEFT's TestDefaultTargetModules (DeLoRA/LoRA there), with ABMLL's own target-module table."""

    def test_default_target_modules_not_set_raises(self) -> None:
        with pytest.raises(ValueError, match="target_modules"):
            get_peft_model(upstream.MLP(), ABMLLConfig())

    def test_default_target_modules_not_set_model_type_set_raises(self) -> None:
        model = upstream.MLP()
        model_config = MagicMock(return_value="foobar")
        model_config.to_dict.return_value = {"model_type": "foobar"}
        model.config = model_config
        with pytest.raises(ValueError, match="target_modules"):
            get_peft_model(model, ABMLLConfig())

    def test_default_target_modules_list_of_str(self, monkeypatch: pytest.MonkeyPatch) -> None:
        model = upstream.MLP()
        model_config = MagicMock()
        model_config.to_dict.return_value = {"model_type": "foobar"}
        model.config = model_config
        monkeypatch.setitem(abmll_model.TARGET_MODULES_MAPPING, "foobar", ["lin0"])
        model = get_peft_model(model, ABMLLConfig())
        assert model.targeted_module_names == ["lin0"]
        assert model.peft_config["default"].target_modules == {"lin0"}
