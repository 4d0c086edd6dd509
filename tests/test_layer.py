"""The ABMLL layer and tuner on tiny Llama, Qwen2 and GPT-2 (Conv1D) models."""

from __future__ import annotations

import math

import pytest
import torch
from _models import BUILDERS, make_inputs, tiny_gpt2, tiny_llama
from hypothesis import event, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from torch import nn
from torch.distributions import Normal, kl_divergence
from transformers.pytorch_utils import Conv1D

from peft_abmll import ABMLLConfig, ABMLLLayer

pytestmark = pytest.mark.filterwarnings("ignore:.*Conv1D.*setting fan_in_fan_out=True:UserWarning")

MODELS = sorted(BUILDERS)
Inputs = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------- helpers
def _abmll(base: nn.Module, **kwargs: object) -> PeftModel:
    torch.manual_seed(1)
    return get_peft_model(base, ABMLLConfig(**kwargs))


@torch.no_grad()
def _logits(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    return model(**inputs).logits


def _layers(model: nn.Module) -> list[ABMLLLayer]:
    return [m for m in model.modules() if isinstance(m, ABMLLLayer)]


@torch.no_grad()
def _perturb(model: nn.Module, posterior: str, std: float = 0.1, seed: int = 2) -> None:
    """Add seeded noise to every factor of `posterior` ("global"/"local") so it differs from the other one."""
    generator = torch.Generator().manual_seed(seed)
    for layer in _layers(model):
        for factor in layer.posterior_factors("default", posterior):
            factor.add_(std * torch.randn(factor.shape, generator=generator))


def _base_weights(model: nn.Module) -> list[torch.Tensor]:
    return [layer.get_base_layer().weight.detach().clone() for layer in _layers(model)]


def _trainable_names(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def _names_with(model: nn.Module, fragment: str) -> set[str]:
    return {name for name, _ in model.named_parameters() if fragment in name}


# ----------------------------------------------------------------------------------------- identity, determinism
@pytest.mark.parametrize("family", MODELS)
def test_identity_at_init_in_eval_mode(family: str, inputs: Inputs) -> None:
    base = BUILDERS[family]()
    expected = _logits(base, inputs)
    model = _abmll(base).eval()
    assert len(_layers(model)) > 0
    torch.testing.assert_close(_logits(model, inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", MODELS)
def test_disabled_adapter_equals_base(family: str, inputs: Inputs) -> None:
    base = BUILDERS[family]()
    expected = _logits(base, inputs)
    model = _abmll(base, init_weights=False).eval()
    assert not torch.allclose(_logits(model, inputs), expected, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, inputs), expected, rtol=0, atol=0)
    assert not torch.allclose(_logits(model, inputs), expected, atol=1e-4)


@pytest.mark.parametrize("sampling", ["local", "weight"])
@pytest.mark.parametrize("family", MODELS)
def test_eval_forward_is_deterministic(family: str, sampling: str, inputs: Inputs) -> None:
    model = _abmll(BUILDERS[family](), init_weights=False, sampling=sampling, init_std=0.05).eval()
    assert torch.equal(_logits(model, inputs), _logits(model, inputs))


# ----------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("family", MODELS)
def test_mean_mode_equals_merge_and_unload(family: str, inputs: Inputs) -> None:
    model = _abmll(BUILDERS[family](), init_weights=False, predictive_mode="mean").eval()
    expected = _logits(model, inputs)
    merged = model.merge_and_unload()
    assert not _layers(merged)
    torch.testing.assert_close(_logits(merged, inputs), expected, rtol=1e-5, atol=1e-5)


def test_safe_merge_raises_on_nan(tiny_llama: nn.Module) -> None:
    model = _abmll(tiny_llama, init_weights=False)
    with torch.no_grad():
        _layers(model)[0].abmll_global_mean_B["default"][0, 0] = math.nan
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_and_unload(safe_merge=True)


@pytest.mark.parametrize("family", MODELS)
def test_merge_unmerge_round_trip_restores_base_weights(family: str, inputs: Inputs) -> None:
    model = _abmll(BUILDERS[family](), init_weights=False).eval()
    before, logits = _base_weights(model), _logits(model, inputs)
    model.merge_adapter()
    assert all(layer.merged for layer in _layers(model))
    assert not any(torch.allclose(b, a) for b, a in zip(before, _base_weights(model)))
    torch.testing.assert_close(_logits(model, inputs), logits, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    for original, restored in zip(before, _base_weights(model)):
        torch.testing.assert_close(restored, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(model, inputs), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_uses_the_mean_and_never_samples(family: str, inputs: Inputs) -> None:
    model = _abmll(BUILDERS[family](), init_weights=False, init_std=0.05)
    eval_logits = _logits(model.eval(), inputs)
    model.train()  # sampling would be active here if merge sampled
    base = _base_weights(model)
    model.merge_adapter()
    first = _base_weights(model)
    for layer, w0, w in zip(_layers(model), base, first):
        torch.testing.assert_close(w, w0 + layer.get_delta_weight("default"), rtol=0, atol=1e-6)
    merged_logits = _logits(model, inputs)
    torch.testing.assert_close(_logits(model, inputs), merged_logits, rtol=0, atol=0)
    torch.testing.assert_close(merged_logits, eval_logits, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    model.merge_adapter()
    for w1, w2 in zip(first, _base_weights(model)):
        torch.testing.assert_close(w2, w1, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------- KL
def _reference_kl(model: nn.Module) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for layer in _layers(model):
        mean_q, var_q = layer.posterior_moments("default", "local")
        mean_p, var_p = layer.posterior_moments("default", "global")
        q, p = Normal(mean_q.double(), var_q.double().sqrt()), Normal(mean_p.double(), var_p.double().sqrt())
        total = total + kl_divergence(q, p).sum()
    return total


@pytest.mark.parametrize("scale_type,sampling", [("linear", "local"), ("softplus", "weight")])
@pytest.mark.parametrize("family", MODELS)
def test_kl_divergence_matches_torch_distributions(family: str, scale_type: str, sampling: str) -> None:
    model = _abmll(BUILDERS[family](), init_weights=False, init_std=0.05, scale_type=scale_type, sampling=sampling)
    assert model.kl_divergence().item() == 0.0  # local == global at init
    _perturb(model, "local", std=0.02)
    kl = model.kl_divergence()
    assert kl.dtype == torch.float32 and kl.ndim == 0
    assert kl.item() > 0
    torch.testing.assert_close(kl.double(), _reference_kl(model), rtol=1e-4, atol=0)
    model.reset_local_to_global()
    assert model.kl_divergence().item() == 0.0


def test_kl_divergence_is_differentiable_for_both_posteriors(tiny_llama: nn.Module) -> None:
    model = _abmll(tiny_llama, init_weights=False, init_std=0.05)
    model.set_trainable_posterior("both")
    _perturb(model, "local", std=0.02)
    model.kl_divergence().backward()
    grads = [p.grad for p in model.global_parameters() + model.local_parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_prior_b0_none_puts_the_gamma_mode_at_init_std() -> None:
    """The Gamma(a0, b0) mode in precision is (a0 - 1) / b0: with b0 = (a0 - 1) init_std**2, 1 / init_std**2."""
    matched = _abmll(tiny_llama(), init_weights=False, init_std=0.05, prior_a0=2.0, prior_b0=None)
    explicit = _abmll(tiny_llama(), init_weights=False, init_std=0.05, prior_a0=2.0, prior_b0=1.0 * 0.05**2)
    abml = _abmll(tiny_llama(), init_weights=False, init_std=0.05, prior_a0=2.0, prior_b0=0.01)
    config = matched.peft_config["default"]
    assert config.gamma_rate == pytest.approx(0.0025)
    assert (config.prior_a0 - 1) / config.gamma_rate == pytest.approx(1 / 0.05**2)
    torch.testing.assert_close(matched.log_prior(), explicit.log_prior())
    assert not torch.isclose(matched.log_prior(), abml.log_prior())  # ABML's b0 = 0.01 is another prior


# ----------------------------------------------------------------------------------------- sampled outputs
DRAWS = 4000


def _stats_layer(sampling: str, scale_type: str) -> tuple[ABMLLLayer, torch.Tensor]:
    """A q_proj ABMLL layer with random, heterogeneous scales, and a fixed input ``(3, d_in)``."""
    model = _abmll(tiny_llama(), init_weights=False, init_std=0.05, sampling=sampling, scale_type=scale_type)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for factor in layer.posterior_factors("default")[2:]:
            factor.copy_(0.3 * torch.randn(factor.shape, generator=generator))
    x = torch.randn(3, layer.in_features, generator=generator)
    return layer.train(), x


@torch.no_grad()
def _sample_stats(layer: ABMLLLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(4)
    draws = torch.stack([layer(x) for _ in range(DRAWS)]).double()
    return draws.mean(0), draws.var(0)


@torch.no_grad()
def _expected_stats(layer: ABMLLLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, var = layer.posterior_moments("default")
    return (layer.base_layer(x) + x @ mean.T).double(), (x.square() @ var.T).double()


@pytest.mark.parametrize("sampling,scale_type", [("weight", "linear"), ("local", "linear"), ("weight", "softplus")])
def test_sampled_outputs_have_the_posterior_mean_and_variance(sampling: str, scale_type: str) -> None:
    layer, x = _stats_layer(sampling, scale_type)
    emp_mean, emp_var = _sample_stats(layer, x)
    mean, var = _expected_stats(layer, x)
    assert var.min() > 1e-2  # the noise is not negligible
    # per unit: mean error ~ N(0, var / n); the variance ratio of Gaussian draws has std sqrt(2 / (n - 1))
    assert ((emp_mean - mean).abs() / (var / DRAWS).sqrt()).max() < 5.0
    assert ((emp_var / var) - 1).abs().max() < 5.0 * math.sqrt(2 / (DRAWS - 1))


def test_weight_and_local_sampling_agree() -> None:
    weight_layer, x = _stats_layer("weight", "linear")
    local_layer, x_local = _stats_layer("local", "linear")
    torch.testing.assert_close(x_local, x)
    for pair in zip(weight_layer.posterior_moments("default"), local_layer.posterior_moments("default")):
        torch.testing.assert_close(*pair)
    (mean_w, var_w), (mean_l, var_l) = _sample_stats(weight_layer, x), _sample_stats(local_layer, x)
    assert ((mean_w - mean_l).abs() / ((var_w + var_l) / DRAWS).sqrt()).max() < 5.0
    assert ((var_w / var_l) - 1).abs().max() < 5.0 * math.sqrt(4 / (DRAWS - 1))


@torch.no_grad()
def test_weight_sampling_shares_noise_across_the_batch_and_local_does_not() -> None:
    for sampling, shared in (("weight", True), ("local", False)):
        layer, x = _stats_layer(sampling, "linear")
        out = layer(x[:1].expand(2, -1))
        assert torch.equal(out[0], out[1]) is shared


# ----------------------------------------------------------------------------------------- gradients and trainability
@pytest.mark.parametrize("family", MODELS)
def test_every_trainable_parameter_gets_a_gradient(family: str, inputs: Inputs) -> None:
    model = _abmll(BUILDERS[family]()).train()
    assert _trainable_names(model) == _names_with(model, "abmll_global_")
    model(**inputs).logits.sum().backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in params)
    # B starts at 0 so A's gradient is 0 at init; B and the scales must already move
    assert all(p.grad.abs().sum() > 0 for n, p in params if "mean_A" not in n)


def test_local_posterior_training_gets_gradients(tiny_llama: nn.Module, inputs: Inputs) -> None:
    model = _abmll(tiny_llama, init_weights=False)
    model.set_posterior("local")
    model.set_trainable_posterior("local")
    model.train()
    model(**inputs).logits.sum().backward()
    assert _trainable_names(model) == _names_with(model, "abmll_local_")
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.local_parameters())
    assert all(p.grad is None for p in model.global_parameters())


def test_set_trainable_posterior_selects_exactly_the_pairs(tiny_llama: nn.Module) -> None:
    model = _abmll(tiny_llama)
    local, global_ = _names_with(model, "abmll_local_"), _names_with(model, "abmll_global_")
    assert len(local) == len(global_) == 4 * len(_layers(model))
    model.set_trainable_posterior("local")
    assert _trainable_names(model) == local
    model.set_trainable_posterior("global")
    assert _trainable_names(model) == global_
    model.set_trainable_posterior("both")
    assert _trainable_names(model) == local | global_
    model.set_trainable_posterior("none")
    assert _trainable_names(model) == set()


def test_set_posterior_switches_eval_outputs(tiny_llama: nn.Module, inputs: Inputs) -> None:
    model = _abmll(tiny_llama, init_weights=False).eval()
    global_logits = _logits(model, inputs)
    _perturb(model, "local")
    torch.testing.assert_close(_logits(model, inputs), global_logits, rtol=0, atol=0)  # local not active yet
    model.set_posterior("local")
    assert model.peft_config["default"].posterior == "local"
    assert not torch.allclose(_logits(model, inputs), global_logits, atol=1e-4)
    model.set_posterior("global")
    torch.testing.assert_close(_logits(model, inputs), global_logits, rtol=0, atol=0)


@pytest.mark.parametrize("sampling", ["local", "weight"])
def test_sample_mode_is_seeded_per_sample_index(sampling: str, tiny_llama: nn.Module, inputs: Inputs) -> None:
    model = _abmll(tiny_llama, init_weights=False, init_std=0.05, sampling=sampling, predictive_mode="sample").eval()
    with model.posterior_sample(0):
        first, again = _logits(model, inputs), _logits(model, inputs)
    with model.posterior_sample(1):
        other = _logits(model, inputs)
    with model.posterior_sample(0):
        later = _logits(model, inputs)
    assert torch.equal(first, again) and torch.equal(first, later)
    assert not torch.allclose(first, other, atol=1e-4)


@pytest.mark.parametrize("sampling", ["weight", "local"])
def test_sample_mode_is_batch_invariant(tiny_llama: nn.Module, sampling: str) -> None:
    """Eval sample `i` is one weight draw whatever the training-time sampling: outputs do not depend on the batch."""
    model = _abmll(tiny_llama, init_weights=False, init_std=0.05, sampling=sampling, predictive_mode="sample").eval()
    inputs = make_inputs(batch=3)
    with model.posterior_sample(0):
        batched = _logits(model, inputs)
        alone = _logits(model, {k: v[2:] for k, v in inputs.items()})
    torch.testing.assert_close(alone, batched[2:], rtol=1e-5, atol=1e-5)


def test_a_kept_sample_is_the_same_draw_made_once_and_redrawn_when_the_posterior_moves(
    tiny_llama: nn.Module, inputs: Inputs, monkeypatch
) -> None:
    model = _abmll(tiny_llama, init_weights=False, init_std=0.05, predictive_mode="sample").eval()
    draws = []
    real = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: draws.append(1) or real(*a, **k))
    layers = sum(1 for _ in model.abmll_layers_with_adapter())
    with torch.no_grad():
        with model.posterior_sample(3, keep=False):
            fresh = [_logits(model, inputs) for _ in range(2)]
        assert len(draws) == 2 * layers  # drawn at every forward
        draws.clear()
        with model.posterior_sample(3):
            kept = [_logits(model, inputs) for _ in range(3)]
            assert len(draws) == layers  # drawn once for three forwards ...
            scale_A = next(iter(model.abmll_layers_with_adapter()))[0].abmll_global_scale_A["default"]
            scale_A.mul_(2.0)  # ... and again for the layer whose posterior changed
            moved = _logits(model, inputs)
            assert len(draws) == layers + 1
    assert torch.equal(fresh[0], fresh[1]) and all(torch.equal(k, kept[0]) for k in kept)
    # the same seeded sample either way; kept, it is folded into the float32 weight (one matmul): rounding only
    torch.testing.assert_close(kept[0], fresh[0], rtol=1e-5, atol=1e-5)
    assert not torch.equal(kept[0], fresh[0])  # (the folded path did run)
    assert not torch.allclose(moved, kept[0])
    assert all(layer.abmll_sample_cache is None for layer, _ in model.abmll_layers_with_adapter())  # freed
    draws.clear()
    with model.posterior_sample(3):  # with gradients nothing is kept: each forward has its own graph
        model(**inputs).logits.sum().backward()
        model(**inputs).logits.sum().backward()  # (a kept graph would be freed by the first backward)
    assert len(draws) == 2 * layers


def test_training_mode_never_uses_a_kept_sample(tiny_llama: nn.Module, inputs: Inputs) -> None:
    model = _abmll(tiny_llama, init_weights=False, init_std=0.05).train()
    with model.posterior_sample(0):
        torch.manual_seed(5)
        first = _logits(model, inputs)
        torch.manual_seed(6)
        second = _logits(model, inputs)
        assert all(layer.abmll_sample_cache == {} for layer, _ in model.abmll_layers_with_adapter())  # none kept
    assert not torch.allclose(first, second)  # fresh training noise from the global RNG at every forward


def test_a_kept_sample_is_not_folded_into_low_precision_weights(tiny_llama: nn.Module, inputs: Inputs) -> None:
    """bf16 weights would round the noise away: there the sample stays a separate float32 term, bit for bit."""
    model = _abmll(tiny_llama.to(torch.bfloat16), init_weights=False, init_std=0.05, predictive_mode="sample").eval()
    with model.posterior_sample(1, keep=False):
        fresh = _logits(model, inputs)
    with model.posterior_sample(1):
        kept = [_logits(model, inputs) for _ in range(2)]
    assert torch.equal(kept[0], fresh) and torch.equal(kept[1], fresh)


# ----------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sampling", ["local", "weight"])
def test_half_precision_forward_backward(dtype: torch.dtype, sampling: str, inputs: Inputs) -> None:
    model = _abmll(tiny_llama().to(dtype), init_weights=False, sampling=sampling).train()
    model.set_trainable_posterior("both")
    _perturb(model, "local", std=0.01)
    logits = model(**inputs).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    kl = model.kl_divergence()
    assert kl.dtype == torch.float32 and torch.isfinite(kl) and kl > 0
    (logits.float().mean() + 1e-3 * kl).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(**inputs).logits).all()


# ----------------------------------------------------------------------------------------- targets and errors
def test_unsupported_target_type_names_the_module(tiny_llama: nn.Module) -> None:
    with pytest.raises(TypeError, match=r"embed_tokens.*Embedding"):
        get_peft_model(tiny_llama, ABMLLConfig(target_modules=["embed_tokens"]))


def test_unknown_model_type_needs_target_modules() -> None:
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(nn.Sequential(nn.Linear(4, 4)), ABMLLConfig())


def test_custom_module_with_explicit_targets_works() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model = _abmll(base, target_modules=["0"], init_weights=False)
    assert len(_layers(model)) == 1
    assert torch.isfinite(model(torch.randn(3, 4))).all()


def test_gpt2_default_targets() -> None:
    model = _abmll(tiny_gpt2())
    adapted = {name for name, m in model.named_modules() if isinstance(m, ABMLLLayer)}
    assert adapted == {f"base_model.model.transformer.h.{i}.attn.{n}" for i in range(2) for n in ("c_attn", "c_proj")}
    assert all(isinstance(layer.get_base_layer(), Conv1D) for layer in _layers(model))
    assert not isinstance(model.base_model.model.transformer.h[0].mlp.c_proj, ABMLLLayer)
    assert model.peft_config["default"].fan_in_fan_out is True


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_default_targets_for_llama_like_models(family: str) -> None:
    model = _abmll(BUILDERS[family]())
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, ABMLLLayer)}
    assert adapted == {"q_proj", "v_proj", "o_proj"} and len(_layers(model)) == 6


TINY = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
# model_type -> (extra config kwargs, adapted module names per block)
FAMILIES = {
    "distilbert": ({"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 4}, {"q_lin", "v_lin", "out_lin"}),
    "xlm-roberta": ({"intermediate_size": 64}, {"query", "value", "dense"}),
    "deberta-v2": ({"intermediate_size": 64}, {"query_proj", "value_proj", "dense"}),
    "mpt": ({"d_model": 32, "n_layers": 2, "n_heads": 4, "expansion_ratio": 2}, {"Wqkv", "out_proj"}),
    "codegen": ({"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4, "n_ctx": 64}, {"qkv_proj", "out_proj"}),
    "mistral": ({"intermediate_size": 64, "num_key_value_heads": 2}, {"q_proj", "v_proj", "o_proj"}),
    "qwen3": ({"intermediate_size": 64, "num_key_value_heads": 2, "head_dim": 8}, {"q_proj", "v_proj", "o_proj"}),
    "gemma2": ({"intermediate_size": 64, "num_key_value_heads": 2, "head_dim": 8}, {"q_proj", "v_proj", "o_proj"}),
    "opt": ({"ffn_dim": 64, "word_embed_proj_dim": 32}, {"q_proj", "v_proj", "out_proj"}),
    "phi": ({"intermediate_size": 64}, {"q_proj", "v_proj", "dense"}),  # MLP's fc1 / fc2 stay untouched
    # fused query/key/value: one adapter on the fused projection, one on the output projection, not the MLP's
    "bloom": ({}, {"query_key_value", "dense"}),
    "gpt_neox": ({"intermediate_size": 64}, {"query_key_value", "dense"}),
    "falcon": ({}, {"query_key_value", "dense"}),
    "gpt_bigcode": ({"n_embd": 32, "n_layer": 2, "n_head": 4}, {"c_attn", "c_proj"}),
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_default_targets_of_more_families(model_type: str) -> None:
    from transformers import AutoConfig, AutoModel

    extra, expected = FAMILIES[model_type]
    torch.manual_seed(0)
    base = AutoModel.from_config(AutoConfig.for_model(model_type, **{**TINY, **extra}))
    model = _abmll(base)
    adapted = [name for name, m in model.named_modules() if isinstance(m, ABMLLLayer)]
    assert {name.rsplit(".", 1)[-1] for name in adapted} == expected and len(adapted) == 2 * len(expected)
    out = model(input_ids=torch.randint(0, 64, (2, 5)))
    assert torch.isfinite(out.last_hidden_state).all()


def test_targets_of_an_unknown_model_type_are_found_in_the_model(caplog: pytest.LogCaptureFixture) -> None:
    from _models import llama_config
    from transformers import LlamaConfig, LlamaForCausalLM

    class NewArchConfig(LlamaConfig):
        model_type = "brand_new_arch"  # a family released after this package

    base = LlamaForCausalLM(NewArchConfig(**llama_config().to_dict()))
    with caplog.at_level("INFO", logger="peft_abmll"):
        model = _abmll(base)
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, ABMLLLayer)}
    assert adapted == {"q_proj", "v_proj", "o_proj"} and len(_layers(model)) == 6
    assert "brand_new_arch" in caplog.text and model.peft_config["default"].target_modules == adapted


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"r": 0}, "r"),
        ({"r": -2}, "r"),
        ({"beta": -1e-3}, "beta"),
        ({"sampling": "gibbs"}, "sampling"),
        ({"scale_type": "exp"}, "scale_type"),
        ({"predictive_mode": "median"}, "predictive_mode"),
        ({"sampling": "local", "scale_type": "softplus"}, "sampling"),
        ({"init_std": 1e-7, "scale_floor": 1e-6}, "init_std"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{field}="):
        ABMLLConfig(**kwargs)


# ----------------------------------------------------------------------------------------- fuzzing
GOOD_VALUES: dict[str, st.SearchStrategy] = {
    "r": st.integers(1, 6),
    "lora_alpha": st.floats(0.5, 64),
    "lora_dropout": st.floats(0.0, 0.5),
    "scale_floor": st.floats(1e-8, 1e-4),
    "init_std": st.floats(1e-3, 0.2),
    "beta": st.floats(0.0, 1.0),
    "scale_type": st.sampled_from(["linear", "softplus"]),
    "sampling": st.sampled_from(["local", "weight"]),
    "predictive_mode": st.sampled_from(["mean", "sample"]),
    "posterior": st.sampled_from(["global", "local"]),
    "init_weights": st.booleans(),
}
BAD_VALUES: dict[str, list[object]] = {
    "r": [0, -1, 2.5, True],
    "lora_alpha": [0.0, -1.0, math.nan, math.inf],
    "lora_dropout": [-0.1, 1.0],
    "scale_floor": [0.0, -1e-6],
    "init_std": [0.0, 1e-9],
    "beta": [-1e-7, math.nan],
    "scale_type": ["exp"],
    "sampling": ["gibbs"],
    "predictive_mode": ["median"],
    "posterior": ["task"],
}
bad_entry = st.sampled_from(sorted(BAD_VALUES)).flatmap(lambda k: st.tuples(st.just(k), st.sampled_from(BAD_VALUES[k])))


@settings(max_examples=40, deadline=None)
@given(st.fixed_dictionaries({}, optional=GOOD_VALUES), st.none() | bad_entry)
def test_fuzzed_configs_are_accepted_and_work_or_rejected(
    kwargs: dict[str, object], bad: tuple[str, object] | None
) -> None:
    if bad is not None:
        kwargs = {**kwargs, bad[0]: bad[1]}
    try:
        config = ABMLLConfig(**kwargs)
    except ValueError as error:
        event(f"rejected {bad[0] if bad else 'combination'}")
        assert str(error).startswith("ABMLLConfig")
        softplus_with_local = kwargs.get("scale_type") == "softplus" and kwargs.get("sampling", "local") == "local"
        assert bad is not None or softplus_with_local
        return
    event("accepted")
    assert bad is None
    model = get_peft_model(tiny_llama(), config)
    inputs = make_inputs(seq=4)
    for mode in (model.train, model.eval):
        mode()
        assert torch.isfinite(_logits(model, inputs)).all()
    assert torch.isfinite(model.kl_divergence())


@pytest.mark.parametrize("family", MODELS)
def test_builders_are_seeded(family: str) -> None:
    first, second = BUILDERS[family](), BUILDERS[family]()
    assert not first.training
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))


@pytest.mark.parametrize("init_std", [1e-3, 1e-2])
def test_median_posterior_std_reads_the_width_each_posterior_has(tiny_llama: nn.Module, init_std: float) -> None:
    """At init both posteriors have the config's width; widening the local one moves only the local reading."""
    model = _abmll(tiny_llama, init_std=init_std)
    tuner = model.base_model
    assert tuner.median_posterior_std() == pytest.approx(init_std, rel=0.01)
    assert tuner.median_posterior_std("local") == pytest.approx(init_std, rel=0.01)
    with torch.no_grad():
        for layer in _layers(model):
            for p in [*layer.abmll_local_scale_A.values(), *layer.abmll_local_scale_B.values()]:
                p.add_(1.0)
    assert tuner.median_posterior_std("local") > 1.5 * init_std
    assert tuner.median_posterior_std() == pytest.approx(init_std, rel=0.01)
    with pytest.raises(ValueError, match="Unknown adapter"):
        tuner.median_posterior_std(adapter_name="other")
