"""`ABMLLModel`: the PEFT tuner that swaps target linear layers for ABMLL layers, plus model-wide verbs."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Literal, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import bayes
from ..peft_type import PREFIX
from .config import ABMLLConfig, size_scaled_beta
from .layer import ABMLLLayer, Linear

logger = logging.getLogger("peft_abmll")

#: Default targets per transformers ``model_type``: the query, value and output attention projections.
#: Fused-qkv families (GPT-2, Phi-3, GPT-NeoX, Falcon, ...) adapt the fused projection plus the output one.
TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    **{
        family: ["q_proj", "v_proj", "o_proj"]
        for family in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "stablelm",
            "smollm3",
            "cohere",
            "starcoder2",
            "deepseek_v2",
        )
    },
    "phi": ["q_proj", "v_proj", "dense"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["c_attn", "attn.c_proj"],
    "gpt_bigcode": ["c_attn", "attn.c_proj"],
    "gpt_neox": ["query_key_value", "attention.dense"],
    "falcon": ["query_key_value", "self_attention.dense"],
    "bloom": ["query_key_value", "self_attention.dense"],
    "gptj": ["q_proj", "v_proj", "out_proj"],
    "gpt_neo": ["q_proj", "v_proj", "out_proj"],
    "opt": ["q_proj", "v_proj", "out_proj"],
    "bart": ["q_proj", "v_proj", "out_proj"],
    "bert": ["query", "value", "attention.output.dense"],
    "roberta": ["query", "value", "attention.output.dense"],
    "xlm-roberta": ["query", "value", "attention.output.dense"],
    "camembert": ["query", "value", "attention.output.dense"],
    "electra": ["query", "value", "attention.output.dense"],
    "deberta-v2": ["query_proj", "value_proj", "attention.output.dense"],
    "distilbert": ["q_lin", "v_lin", "out_lin"],
    "mpt": ["Wqkv", "out_proj"],
    "codegen": ["qkv_proj", "out_proj"],
    "t5": ["q", "v", "o"],
    "mt5": ["q", "v", "o"],
}

#: For model types without an entry above: the first of these name sets whose every name matches an adaptable
#: module of the model (PEFT's suffix matching) is used — most new architectures reuse one of these layouts.
ATTENTION_NAME_SETS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj", "o_proj"),
    ("q_proj", "v_proj", "out_proj"),
    ("q_proj", "v_proj", "dense"),
    ("qkv_proj", "o_proj"),
    ("query", "value", "attention.output.dense"),
    ("query_proj", "value_proj", "attention.output.dense"),
    ("q_lin", "v_lin", "out_lin"),
    ("query_key_value", "dense"),
    ("Wqkv", "out_proj"),
    ("c_attn", "attn.c_proj"),
    ("q", "v", "o"),
)


def detect_target_modules(model: nn.Module) -> Optional[list[str]]:
    """The first `ATTENTION_NAME_SETS` entry fully present among ``model``'s linear / Conv1D modules, else None."""
    names = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))]
    for candidates in ATTENTION_NAME_SETS:
        if all(any(n == c or n.endswith("." + c) for n in names) for c in candidates):
            return list(candidates)
    return None


class ABMLLModel(BaseTuner):
    """Creates an ABMLL model from a pretrained transformers model.

    Normally built by ``peft.get_peft_model(model, ABMLLConfig(...))`` after ``import peft_abmll``.
    Besides PEFT's usual tuner methods it offers the ABMLL verbs, all reachable from the `PeftModel`:
    `kl_divergence`, `log_prior`, `reset_local_to_global`, `set_posterior`,
    `set_trainable_posterior` and `posterior_sample`.
    """

    prefix: str = PREFIX
    tuner_layer_cls = ABMLLLayer
    _objective_owners: int = 0  # > 0 inside `objective_owned` (a meta-learning loop adds its own terms)
    target_module_mapping = TARGET_MODULES_MAPPING

    # PEFT only passes this tuner its own config type; BaseTuner annotates the generic PeftConfig.
    def _prepare_adapter_config(self, peft_config: ABMLLConfig, model_config: dict) -> ABMLLConfig:  # type: ignore[override]
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            targets = self.target_module_mapping.get(str(model_type)) or detect_target_modules(self.model)
            if targets is None:
                raise ValueError(
                    f"ABMLL has no default target modules for model_type={model_type!r} and found none of the usual "
                    "attention projection names in the model. Pass them explicitly, e.g. "
                    "ABMLLConfig(target_modules=['q_proj', 'v_proj', 'o_proj']) with your model's attention projection "
                    f"names. Known families: {', '.join(sorted(self.target_module_mapping))}."
                )
            if model_type not in self.target_module_mapping:
                logger.info(
                    "ABMLL: no default targets for model_type=%r; adapting %s (found in the model)", model_type, targets
                )
            peft_config.target_modules = set(targets)
        return peft_config

    def _create_and_replace(  # type: ignore[override]  # PEFT passes an ABMLLConfig (see above)
        self,
        peft_config: ABMLLConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        module_config = peft_config.for_module(current_key)  # this module's rank and alpha (rank / alpha_pattern)
        if isinstance(target, Linear):
            target.update_layer(adapter_name, module_config)
            return
        new_module = _create_new_module(module_config, adapter_name, target, current_key)
        peft_config.fan_in_fan_out = module_config.fan_in_fan_out  # as the layer type forced it (Conv1D), saved
        new_module.abmll_layer_index = sum(1 for _ in self._abmll_layers())
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """PEFT's replacement; a module coming back whole at unload is put back as it is.

        Unloading returns each wrapped module itself (a base linear layer, or the trained copy of a
        ``modules_to_save`` head such as RoBERTa's two-layer classifier): it already holds its own weights, and
        PEFT's generic ``new_module.weight = child.weight`` fails on heads that have no ``weight``.
        """
        if isinstance(new_module, BaseTunerLayer):
            super()._replace_module(parent, child_name, new_module, child)
        else:
            setattr(parent, child_name, new_module)

    # ------------------------------------------------------------------------------- loading
    @classmethod
    def _remap_adapter_state_dict_for_load(  # type: ignore[override]  # PEFT passes an ABMLLConfig (see above)
        cls,
        model: nn.Module,
        config: ABMLLConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """PEFT's key remapping, then a check that the checkpoint fits the model it is loaded into.

        PEFT's load paths (`PeftModel.from_pretrained`, `load_adapter`, `set_peft_model_state_dict`,
        Trainer resume) go through here. A checkpoint trained on another base model (other hidden size,
        other number of layers) or with another rank raises a ValueError naming both base models, the
        first mismatching ABMLL tensor and both shapes -- instead of torch's bare size-mismatch error or,
        for extra/missing layers, a silently half-loaded adapter. ABMLL factors are checked even with
        ``ignore_mismatched_sizes=True`` (a partly re-initialised posterior is not a usable adapter);
        other saved tensors (``modules_to_save``, biases) are left to PEFT's own handling.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        _check_checkpoint_fits(model, config, adapter_name, remapped)
        return remapped

    # ------------------------------------------------------------------------------- ABMLL verbs
    def abmll_config(self, adapter_name: Optional[str] = None) -> ABMLLConfig:
        """The `ABMLLConfig` of `adapter_name` (default: the first active adapter)."""
        name = self.active_adapters[0] if adapter_name is None else adapter_name
        config = self.peft_config[name]
        if not isinstance(config, ABMLLConfig):
            raise TypeError(f"Adapter {name!r} has a {type(config).__name__}, not an ABMLLConfig.")
        if config.beta is None:  # an adapter added by a path that skipped `inject_adapter`
            self._set_size_scaled_weights(name)
        return config

    def _abmll_layers(self, model: Optional[nn.Module] = None) -> Iterator[ABMLLLayer]:
        return (m for m in (model or self.model).modules() if isinstance(m, ABMLLLayer))

    def _adapter_names(self, adapter_name: Optional[str]) -> list[str]:
        names = self.active_adapters if adapter_name is None else [adapter_name]
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"Unknown adapter {missing}; available: {sorted(self.peft_config)}.")
        return names

    def abmll_layers_with_adapter(self, adapter_name: Optional[str] = None) -> Iterator[tuple[ABMLLLayer, str]]:
        """``(layer, adapter name)`` for every ABMLL layer holding the adapter(s), in a fixed order."""
        for name in self._adapter_names(adapter_name):
            for layer in self._abmll_layers():
                if name in layer.abmll_global_mean_A:
                    yield layer, name

    def _layers_holding(self, adapter_name: Optional[str]) -> list[tuple[ABMLLLayer, str]]:
        """`abmll_layers_with_adapter` as a list; an adapter no layer holds is refused."""
        layers = list(self.abmll_layers_with_adapter(adapter_name))
        if not layers:
            raise ValueError(f"No ABMLL layer holds adapter {adapter_name or self.active_adapters}.")
        return layers

    def _sum_over_layers(self, method: str, adapter_name: Optional[str]) -> torch.Tensor:
        return _layer_sum(getattr(layer, method)(name) for layer, name in self._layers_holding(adapter_name))

    def num_adapted_entries(self, adapter_name: Optional[str] = None) -> int:
        """Entries of ``Delta W`` the adapter(s) model, summed over layers (the KL's per-entry denominator)."""
        return sum(layer.out_features * layer.in_features for layer, _ in self.abmll_layers_with_adapter(adapter_name))

    @torch.no_grad()
    def median_posterior_std(
        self, posterior: Literal["global", "local"] = "global", adapter_name: Optional[str] = None
    ) -> float:
        """Median over every adapted entry of ``Delta W`` (all layers) of the posterior's standard deviation.

        The one-number width of the posterior: compare it with the config's ``init_std`` to see whether meta-training
        moved it. Holds one float32 per adapted entry of every layer at once (the exact median needs them all):
        ~93 MB on SmolLM2-135M with q/v/o (23 M entries), ~5 GB on a Llama-3-8B shape — read it on small models.
        """
        layers = self._layers_holding(adapter_name)
        stds = [layer.posterior_moments(name, posterior)[1].sqrt().flatten() for layer, name in layers]
        return torch.cat(stds).median().item()

    # ----------------------------------------------------------------------------------- the model's own loss
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward, called through ``__call__`` so that the loss hook runs on every path."""
        return self.model(*args, **kwargs)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's injection, then the weights left to the adapter's size set (`_set_size_scaled_weights`)."""
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._set_size_scaled_weights(adapter_name)

    def _set_size_scaled_weights(self, adapter_name: str) -> None:
        """``beta=None`` -> `size_scaled_beta` of the adapter's entries (the inner loop's KL weight), written into
        its config and so saved; with it, ``loss_beta=None`` -> one nat per adapted entry (1.0 for a KL averaged per
        entry, 1/N for a summed one), the weight of the model's own loss that the drop-in benchmark measured."""
        config = self.peft_config.get(adapter_name)
        if not isinstance(config, ABMLLConfig) or config.beta is not None:
            return
        entries = self.num_adapted_entries(adapter_name)
        if entries:
            config.beta = size_scaled_beta(entries, config.kl_reduction)
            if config.loss_beta is None:
                config.loss_beta = 1.0 if config.kl_reduction == "mean" else 1.0 / entries
            logger.info("ABMLL: beta=None -> %.4g for %d adapted entries (%r)", config.beta, entries, adapter_name)

    def _post_injection_hook(self, model: nn.Module, config: Any, adapter_name: str) -> None:
        """Hook the variational terms onto the wrapped model's loss (once per tuner)."""
        super()._post_injection_hook(model, config, adapter_name)
        if "_loss_hook" not in self.__dict__:
            self.__dict__["_loss_hook"] = model.register_forward_hook(self._add_variational_loss, with_kwargs=True)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> Any:
        """PEFT's unload / merge_and_unload, and the base model it returns carries no ABMLL hook."""
        hook = self.__dict__.pop("_loss_hook", None)
        if hook is not None:
            hook.remove()
        return super()._unload_and_optionally_merge(*args, **kwargs)

    def _add_variational_loss(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        """In training mode, ``loss += training_loss_weight * variational_regularizer`` (see `ABMLLConfig.loss_beta`).

        A forward hook on the wrapped model, so it applies however the model is called (``PeftModel.forward``
        calls the wrapped model directly, ``PeftModelForCausalLM`` goes through this tuner): any Trainer or loop
        that minimises ``outputs.loss`` optimises the Bayesian objective. Called without labels, the term is
        attached as ``outputs.abmll_regularizer`` for loss functions that work from the logits
        (`peft_abmll.variational_loss`). Off inside `objective_owned` (a meta-learning loop adds its own terms),
        in eval mode and at weight 0. The terms are kept for logging (`pop_loss_logs`). A forward with fused
        log-probabilities (TRL's ``fused_lm_head=True``) is left alone: its caller never reads ``outputs.loss``
        (a warning says to pass ``compute_loss_func=peft_abmll.variational_loss``).
        """
        if not module.training or self._objective_owners:
            return output
        if kwargs.get("fused_lm_head"):  # TRL's SFTTrainer: its loss comes from `log_probs`, never `outputs.loss`
            self._warn_loss_not_used()
            return output
        if not hasattr(output, "logits"):
            return output
        weight = self.abmll_config().training_loss_weight
        layers = list(self.abmll_layers_with_adapter())  # the one walk over the modules of this forward
        if weight == 0 or not layers:
            return output
        regularizer, logs = self.variational_regularizer(layers=layers)
        loss = getattr(output, "loss", None)
        if loss is not None:
            logs = {"nll": loss.detach().float().item(), **logs}
        store = self.__dict__.setdefault("_loss_logs", {})
        for key, value in logs.items():
            store.setdefault(key, []).append(value)
        term = weight * regularizer.to(output.logits.device)
        if loss is None:  # a trainer computes the loss from the logits: `peft_abmll.variational_loss` adds this
            output["abmll_regularizer"] = term
        else:
            output.loss = loss + term.to(loss.dtype)
        return output

    def _warn_loss_not_used(self) -> None:
        """Once per model: a trainer that takes its loss from fused log-probs leaves the variational terms out."""
        if not torch.is_grad_enabled() or self.__dict__.get("_warned_fused_loss"):
            return  # without gradients (TRL's metrics pass after `compute_loss_func`) nothing is trained
        self.__dict__["_warned_fused_loss"] = True
        warnings.warn(
            "The trainer computes its loss from the model's fused log-probabilities (TRL's SFTTrainer does) and "
            "ignores `outputs.loss`, so the ABMLL variational terms (KL / hyperprior) are not trained: the adapter "
            "becomes a noisy LoRA. Pass `compute_loss_func=peft_abmll.variational_loss` to the trainer.",
            stacklevel=2,
        )

    def variational_regularizer(
        self, layers: Optional[list[tuple[ABMLLLayer, str]]] = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The variational terms of whatever posterior trains, reduced per ``kl_reduction`` (float32 scalar).

        ``KL(q_local || p_global)`` if the local pairs have ``requires_grad``, ``-log p(global)`` if the global
        pairs do (both when both train; measured from its largest value, so it is 0 at the hyperprior's mode and
        a loss starts at the NLL); zero when nothing trains. `layers`: ``abmll_layers_with_adapter()``, if the
        caller has it already (one walk over the model's modules per call).
        """
        layers = list(self.abmll_layers_with_adapter()) if layers is None else layers
        trains = {
            posterior: any(p.requires_grad for layer, name in layers for p in layer.posterior_factors(name, posterior))
            for posterior in ("local", "global")
        }
        total = torch.zeros(())
        logs: dict[str, float] = {}
        entries = sum(layer.out_features * layer.in_features for layer, _ in layers)
        scale = 1.0 / entries if self.abmll_config().kl_reduction == "mean" and entries else 1.0
        if trains["local"]:
            kl = _layer_sum(layer.kl_divergence(name) for layer, name in layers) * scale
            total, logs["kl"] = total + kl.cpu(), kl.item()
        if trains["global"]:
            log_prior = _layer_sum(layer.log_prior(name) for layer, name in layers)
            neg_log_prior = (_max_log_prior(layers) - log_prior) * scale  # >= 0, 0 at the hyperprior's mode
            total, logs["neg_log_prior"] = total + neg_log_prior.cpu(), neg_log_prior.item()
        return total, logs

    @contextlib.contextmanager
    def objective_owned(self) -> Iterator[None]:
        """Inside the block the forward returns the bare data loss: the caller adds its own terms (no double count)."""
        self._objective_owners += 1
        try:
            yield
        finally:
            self._objective_owners -= 1

    def pop_loss_logs(self) -> dict[str, float]:
        """Means of the loss terms (``nll``, ``kl`` / ``neg_log_prior``) since the last call, then forget them."""
        store = self.__dict__.setdefault("_loss_logs", {})
        logs = {f"abmll_{k}": sum(v) / len(v) for k, v in store.items() if v}
        store.clear()
        return logs

    def kl_divergence(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """``KL(q_local || p_global)`` summed over every adapted layer (float32 scalar, differentiable)."""
        return self._sum_over_layers("kl_divergence", adapter_name)

    def log_prior(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """Log hyperprior ``log p(theta)`` of the global posterior, summed over layers (float32 scalar)."""
        return self._sum_over_layers("log_prior", adapter_name)

    def reset_local_to_global(self, adapter_name: Optional[str] = None) -> None:
        """Copy the global pairs into the local pairs (``phi <- theta``) in every layer."""
        for layer, name in self.abmll_layers_with_adapter(adapter_name):
            layer.reset_local_to_global(name)

    def set_posterior(self, posterior: Literal["global", "local"], adapter_name: Optional[str] = None) -> None:
        """Use the "global" or "local" posterior in forward, merge and export (recorded in the config)."""
        for name in self._adapter_names(adapter_name):
            for layer in self._abmll_layers():
                if name in layer.abmll_global_mean_A:
                    layer.set_posterior(name, posterior)
            self.abmll_config(name).posterior = posterior

    def set_trainable_posterior(self, which: str, adapter_name: Optional[str] = None) -> None:
        """Let only the "global", only the "local", "both" or "none" of the pairs receive gradients."""
        for layer, name in self.abmll_layers_with_adapter(adapter_name):
            layer.set_trainable_posterior(name, which)

    def global_parameters(self, adapter_name: Optional[str] = None) -> list[nn.Parameter]:
        """The global-pair parameters of the adapter(s), in a fixed order."""
        return self._pair_parameters("global", adapter_name)

    def local_parameters(self, adapter_name: Optional[str] = None) -> list[nn.Parameter]:
        """The local-pair parameters of the adapter(s), in the same order as `global_parameters`."""
        return self._pair_parameters("local", adapter_name)

    def _pair_parameters(self, posterior: str, adapter_name: Optional[str]) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for layer, name in self.abmll_layers_with_adapter(adapter_name):
            params.extend(layer.posterior_factors(name, posterior))
        return params

    @contextlib.contextmanager
    def posterior_sample(self, index: int, keep: bool = True) -> Iterator[None]:
        """Within the block, eval forward passes draw the seeded posterior sample number `index`.

        Deterministic: the same `index` gives the same sample (seeded by ``sample_seed``, the index and
        the layer), different indices give independent samples. Used by `peft_abmll.predict_proba`.

        With `keep` (default), each layer draws its sample once and reuses it for every forward in the block
        (redrawn if its scale factors change), so scoring many batches with one sample costs one draw: the
        block holds one ``d_out x d_in`` float32 matrix per adapted layer, freed when it ends. ``keep=False``
        draws at every forward and holds nothing.
        """
        layers = list(self._abmll_layers())
        previous = [(layer.abmll_sample_index, layer.abmll_eval_sampling, layer.abmll_sample_cache) for layer in layers]
        for layer in layers:
            layer.abmll_sample_index, layer.abmll_eval_sampling = index, True
            layer.abmll_sample_cache = {} if keep else None
        try:
            yield
        finally:
            for layer, (value, flag, cache) in zip(layers, previous):
                layer.abmll_sample_index, layer.abmll_eval_sampling, layer.abmll_sample_cache = value, flag, cache


_PEFT_PREFIX = "base_model.model."


def _is_factor_key(key: str) -> bool:
    """Whether a state-dict key is one of the eight ABMLL factors (with or without the adapter name)."""
    return any(f".{name}." in f"{key}." for name in ABMLLLayer.adapter_layer_names)


def _model_name(model: nn.Module) -> str:
    """``'name_or_path'`` of a (PEFT-wrapped) transformers model, else its class."""
    name = getattr(model, "name_or_path", None)
    if name:
        return repr(name)
    get_base_model = getattr(model, "get_base_model", None)
    base = get_base_model() if callable(get_base_model) else model
    return f"an unnamed {type(base).__name__} (empty name_or_path)"


def _check_checkpoint_fits(
    model: nn.Module, config: ABMLLConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> None:
    """Raise a ValueError naming both base models if `state_dict` (remapped) does not fit `model`."""
    model_state = model.state_dict()
    mismatched, unexpected = [], []
    for key, tensor in state_dict.items():
        if not _is_factor_key(key):
            continue  # modules_to_save, biases, embeddings: left to PEFT / torch (and ignore_mismatched_sizes)
        target = model_state.get(key)
        if target is None:
            target = model_state.get(key.removeprefix(_PEFT_PREFIX))
        if target is None:
            unexpected.append(key)
        elif tuple(tensor.shape) != tuple(target.shape):
            mismatched.append((key, tuple(tensor.shape), tuple(target.shape)))
    loaded = {k.removeprefix(_PEFT_PREFIX) for k in state_dict}
    missing = [
        k
        for k in model_state
        if _is_factor_key(k) and k.endswith(f".{adapter_name}") and k.removeprefix(_PEFT_PREFIX) not in loaded
    ]
    if not (mismatched or unexpected or missing):
        return
    saved_on = repr(config.base_model_name_or_path) if config.base_model_name_or_path else "an unrecorded base model"
    head = (
        f"Cannot load ABMLL adapter {adapter_name!r}: the checkpoint was trained on base model {saved_on} and does "
        f"not fit the model it is loaded into, {_model_name(model)}"
    )
    if mismatched:
        key, saved, wanted = mismatched[0]
        more = f" (and {len(mismatched) - 1} more mismatching tensor(s))" if len(mismatched) > 1 else ""
        detail = f"{key} has shape {list(saved)} in the checkpoint but {list(wanted)} in the model{more}"
    elif unexpected:
        detail = f"the checkpoint has {len(unexpected)} ABMLL tensor(s) with no matching layer, e.g. {unexpected[0]}"
    else:
        detail = f"{len(missing)} ABMLL tensor(s) of the model are not in the checkpoint, e.g. {missing[0]}"
    raise ValueError(
        f"{head}: {detail}. Load the adapter onto the base model it was trained on (same architecture, hidden size "
        "and number of layers)."
    )


def _create_new_module(config: ABMLLConfig, adapter_name: str, target: nn.Module, key: str) -> Linear:
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, Conv1D):
        if not config.fan_in_fan_out:
            warnings.warn(
                f"{key} is a transformers Conv1D (weight stored transposed): setting fan_in_fan_out=True.", stacklevel=2
            )
            config.fan_in_fan_out = True
    elif isinstance(base, nn.Linear):
        if config.fan_in_fan_out:
            warnings.warn(f"{key} is a torch.nn.Linear: setting fan_in_fan_out=False.", stacklevel=2)
            config.fan_in_fan_out = False
    else:
        raise TypeError(
            f"ABMLL cannot adapt module '{key}' of type {type(base).__module__}.{type(base).__name__}: only "
            "torch.nn.Linear and transformers' Conv1D are supported. Remove it from target_modules (or add it to "
            "exclude_modules)."
        )
    return Linear(target, adapter_name, config)


def _layer_sum(values: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of per-layer scalars that may live on different devices (on the first one's device)."""
    total: Optional[torch.Tensor] = None
    for value in values:
        total = value if total is None else total + value.to(total.device)
    if total is None:
        raise ValueError("No ABMLL layer holds the adapter.")
    return total


def _max_log_prior(layers: list[tuple[ABMLLLayer, str]]) -> float:
    """The largest value `log_prior` can take over `layers` (a constant: it shifts the loss, not its gradient)."""
    total = 0.0
    for layer, name in layers:
        s = layer.abmll_settings[name]
        total += (
            layer.out_features
            * layer.in_features
            * bayes.max_log_prior_per_entry(s.prior_mean_std, s.prior_a0, s.gamma_rate)
        )
    return total
