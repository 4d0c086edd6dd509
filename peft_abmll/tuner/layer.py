"""The Bayesian LoRA layer: four low-rank pairs per adapter, reparameterised sampling, closed-form KL.

Per adapter name the layer holds (``A: (r, d_in)``, ``B: (d_out, r)``):

```text
global mean   abmll_global_mean_A / _B     mu_theta    = s * B @ A
global scale  abmll_global_scale_A / _B    sigma_theta = scale(B @ A)
local mean    abmll_local_mean_A / _B      mu_phi      = s * B @ A
local scale   abmll_local_scale_A / _B     sigma_phi   = scale(B @ A)
```

The *active posterior* (``"global"`` or ``"local"``) is what the forward pass, merging and export use.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional, cast

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import bayes, fused
from .config import ABMLLConfig

POSTERIOR_PAIRS = {
    "global": ("abmll_global_mean_A", "abmll_global_mean_B", "abmll_global_scale_A", "abmll_global_scale_B"),
    "local": ("abmll_local_mean_A", "abmll_local_mean_B", "abmll_local_scale_A", "abmll_local_scale_B"),
}
TRAINABLE_CHOICES = ("global", "local", "both", "none")


@dataclass(frozen=True)
class LayerSettings:
    """What a layer reads from its `ABMLLConfig`, built once per adapter, under the config's names.

    ``gamma_rate`` is `ABMLLConfig.gamma_rate` (``prior_b0``, or its default when that is None); ``rho0`` is the
    softplus offset at which the std starts at ``init_std`` (0 for ``scale_type="linear"``).
    """

    scale_type: str
    scale_floor: float
    init_std: float
    rho0: float
    sampling: str
    predictive_mode: str
    sample_seed: int
    prior_a0: float
    gamma_rate: float
    prior_mean_std: float

    @classmethod
    def from_config(cls, config: ABMLLConfig) -> LayerSettings:
        softplus = config.scale_type == "softplus"
        return cls(
            scale_type=config.scale_type,
            scale_floor=config.scale_floor,
            init_std=config.init_std,
            rho0=bayes.inverse_softplus(config.init_std - config.scale_floor) if softplus else 0.0,
            sampling=config.sampling,
            predictive_mode=config.predictive_mode,
            sample_seed=config.sample_seed,
            prior_a0=config.prior_a0,
            gamma_rate=config.gamma_rate,
            prior_mean_std=config.prior_mean_std,
        )

    def scale_spec(self, scaling: float) -> fused.ScaleSpec:
        """How factors become moments under these settings and the LoRA `scaling` (which PEFT may rescale)."""
        return fused.ScaleSpec(self.scale_type, scaling, self.scale_floor, self.rho0)


class ABMLLLayer(BaseTunerLayer):
    """Adapter state and math shared by every ABMLL layer type (see the module docstring)."""

    adapter_layer_names = POSTERIOR_PAIRS["global"] + POSTERIOR_PAIRS["local"]
    other_param_names = ("r", "scaling", "abmll_dropout", "abmll_settings", "abmll_posterior")

    # The eight factor dicts (adapter name -> parameter), created in __init__ from `adapter_layer_names`.
    abmll_global_mean_A: nn.ParameterDict
    abmll_global_mean_B: nn.ParameterDict
    abmll_global_scale_A: nn.ParameterDict
    abmll_global_scale_B: nn.ParameterDict
    abmll_local_mean_A: nn.ParameterDict
    abmll_local_mean_B: nn.ParameterDict
    abmll_local_scale_A: nn.ParameterDict
    abmll_local_scale_B: nn.ParameterDict
    training: bool  # provided by `torch.nn.Module`, which every concrete layer also subclasses

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.abmll_dropout = nn.ModuleDict({})
        self.abmll_settings: dict[str, LayerSettings] = {}
        self.abmll_posterior: dict[str, str] = {}
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict({}))
        self.frozen_peft_weight_names = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.abmll_layer_index = 0  # set by the tuner; decorrelates eval-mode samples across layers
        self.abmll_sample_index = 0  # which seeded eval-mode sample to draw (predict_proba sets it)
        self.abmll_eval_sampling: Optional[bool] = None  # override of predictive_mode (posterior_sample sets it)
        # adapter -> (what the sample depends on, drawn noise matrix); kept only inside posterior_sample(keep=True)
        self.abmll_sample_cache: Optional[dict[Any, tuple[tuple, torch.Tensor]]] = None

        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"ABMLL cannot adapt a layer of type {type(self.get_base_layer()).__name__}.")
        self.in_features = in_features
        self.out_features = out_features
        self.kwargs = kwargs

    # ----------------------------------------------------------------------------------- set-up
    def update_layer(self, adapter_name: str, config: ABMLLConfig, inference_mode: bool = False) -> None:
        """Create (or re-create) the eight factors of `adapter_name` from `config`."""
        r = config.r
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.scaling
        self.abmll_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.abmll_settings[adapter_name] = LayerSettings.from_config(config)
        self.abmll_posterior[adapter_name] = config.posterior
        shapes = {"A": (r, self.in_features), "B": (self.out_features, r)}
        for name in self.adapter_layer_names:
            getattr(self, name)[adapter_name] = nn.Parameter(torch.empty(shapes[name[-1]]))
        self.reset_abmll_parameters(adapter_name, init_weights=config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_trainable_posterior(adapter_name, config.posterior)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_abmll_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """Initialise the global pairs (mean: LoRA-style; scale: std ``init_std``) and copy them to local."""
        mean_A, mean_B, scale_A, scale_B = (getattr(self, n)[adapter_name] for n in POSTERIOR_PAIRS["global"])
        if mean_A.is_meta:
            return
        nn.init.kaiming_uniform_(mean_A, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(mean_B)
        else:
            nn.init.normal_(mean_B, std=0.1)
        settings = self.abmll_settings[adapter_name]
        if settings.scale_type == "linear":
            # s * B @ A + c = init_std with B @ A ~ constant; jitter breaks the symmetry between rank columns
            value = math.sqrt(
                (settings.init_std - settings.scale_floor) / (self.scaling[adapter_name] * mean_A.shape[0])
            )
            scale_A.copy_(value * (1 + 0.1 * torch.randn_like(scale_A)))
            scale_B.copy_(value * (1 + 0.1 * torch.randn_like(scale_B)))
        else:
            # B @ A ~ N(0, 1/d_in) around rho0: small spread, and both factors get gradients
            nn.init.normal_(scale_A, std=1.0 / math.sqrt(scale_A.shape[1]))
            nn.init.normal_(scale_B, std=1.0 / math.sqrt(scale_B.shape[1]))
        self.reset_local_to_global(adapter_name)

    @torch.no_grad()
    def reset_local_to_global(self, adapter_name: str) -> None:
        """Copy the global pairs into the local pairs (``phi <- theta``), in place."""
        for global_name, local_name in zip(POSTERIOR_PAIRS["global"], POSTERIOR_PAIRS["local"]):
            getattr(self, local_name)[adapter_name].copy_(getattr(self, global_name)[adapter_name])

    def set_posterior(self, adapter_name: str, posterior: str) -> None:
        """Make `posterior` ("global"/"local") the one forward, merge and export use."""
        if posterior not in POSTERIOR_PAIRS:
            raise ValueError(f"posterior must be 'global' or 'local', got {posterior!r}.")
        if adapter_name in self.merged_adapters:
            raise ValueError("Cannot switch the posterior of a merged adapter; call `unmerge_adapter()` first.")
        self.abmll_posterior[adapter_name] = posterior

    def set_trainable_posterior(self, adapter_name: str, which: str) -> None:
        """Declare which pairs of `adapter_name` may train: "global", "local", "both" or "none".

        Goes through PEFT's `frozen_peft_weight_names`, so PEFT's own `set_adapter` and
        `_mark_only_adapters_as_trainable` respect it.
        """
        if which not in TRAINABLE_CHOICES:
            raise ValueError(f"trainable must be one of {TRAINABLE_CHOICES}, got {which!r}.")
        frozen = {"global": POSTERIOR_PAIRS["local"], "local": POSTERIOR_PAIRS["global"], "both": ()}
        self.frozen_peft_weight_names[adapter_name] = frozen.get(which, self.adapter_layer_names)
        trainable = adapter_name in self.active_adapters and not self.disable_adapters
        for name in self.adapter_layer_names:
            if adapter_name in getattr(self, name):
                wanted = trainable and name not in self.frozen_peft_weight_names[adapter_name]
                getattr(self, name)[adapter_name].requires_grad_(wanted)

    # ----------------------------------------------------------------------------------- math
    def posterior_factors(self, adapter_name: str, posterior: Optional[str] = None) -> tuple[nn.Parameter, ...]:
        """``(mean_A, mean_B, scale_A, scale_B)`` of a posterior (default: the active one)."""
        posterior = posterior or self.abmll_posterior[adapter_name]
        return tuple(getattr(self, n)[adapter_name] for n in POSTERIOR_PAIRS[posterior])

    def posterior_moments(
        self, adapter_name: str, posterior: Optional[str] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense float32 ``(mean, variance)`` of ``Delta W``, each ``(d_out, d_in)``."""
        mean_A, mean_B, scale_A, scale_B = self.posterior_factors(adapter_name, posterior)
        mean = (mean_B.float() @ mean_A.float()) * self.scaling[adapter_name]
        return mean, _entry_variance(scale_A, scale_B, self._scale_spec(adapter_name))

    def kl_divergence(self, adapter_name: str) -> torch.Tensor:
        """``KL(q_local || p_global)`` summed over every entry of ``Delta W`` (float32 scalar).

        One fused, row-blocked pass (`peft_abmll.fused`): memory stays at the size of the factors.
        """
        local = self.posterior_factors(adapter_name, "local")
        with _fp32(local[0].device):
            return fused.fused_kl(local, self.posterior_factors(adapter_name, "global"), self._scale_spec(adapter_name))

    def log_prior(self, adapter_name: str) -> torch.Tensor:
        """Log hyperprior of the global posterior: Normal on means + Gamma on precisions (float32 scalar)."""
        settings = self.abmll_settings[adapter_name]
        factors = self.posterior_factors(adapter_name, "global")
        with _fp32(factors[0].device):
            return fused.fused_log_prior(
                factors, self._scale_spec(adapter_name), settings.prior_mean_std, settings.prior_a0, settings.gamma_rate
            )

    def _scale_spec(self, adapter_name: str) -> fused.ScaleSpec:
        return self.abmll_settings[adapter_name].scale_spec(self.scaling[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Mean weight update of the active posterior in the base weight's layout and dtype (never sampled)."""
        mean_A, mean_B = self.posterior_factors(adapter_name)[:2]
        delta = (mean_B.float() @ mean_A.float()) * self.scaling[adapter_name]
        if self._weight_is_transposed():
            delta = delta.T
        return delta.to(self.get_base_weight().dtype)

    def _weight_is_transposed(self) -> bool:
        return isinstance(self.get_base_layer(), Conv1D)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    # ----------------------------------------------------------------------------------- forward pieces
    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The adapter's additive output for input ``x: (..., d_in)`` -> ``(..., d_out)``."""
        mean_A, mean_B, scale_A, scale_B = self.posterior_factors(adapter_name)
        x = self.abmll_dropout[adapter_name](self._cast_input_dtype(x, mean_A.dtype))
        out = F.linear(F.linear(x, mean_A), mean_B) * self.scaling[adapter_name]
        if self._samples(adapter_name):
            with _fp32(x.device):
                out = out + self._noise(x, adapter_name, scale_A, scale_B).to(out.dtype)
        return out

    def _samples(self, adapter_name: str) -> bool:
        if self.training:
            return True
        if self.abmll_eval_sampling is not None:
            return self.abmll_eval_sampling
        return self.abmll_settings[adapter_name].predictive_mode == "sample"

    def _noise(self, x: torch.Tensor, adapter_name: str, scale_A: torch.Tensor, scale_B: torch.Tensor) -> torch.Tensor:
        """The zero-mean random part ``(sigma * eps) x`` of the output, float32.

        Training uses the configured sampling mode and the global RNG. Eval-mode samples are weight
        samples from a seeded generator, so a sample is one fixed model: reproducible and independent of
        how examples are batched.
        """
        spec = self._scale_spec(adapter_name)
        x = x.float()
        if self.training:
            seed = int(torch.randint(0, 2**62, (1,)).item())  # from the global RNG: seeded runs are reproducible
            if self.abmll_settings[adapter_name].sampling == "local":
                A_stack, B_stack = bayes.lowrank_variance_factors(
                    scale_A, scale_B, scaling=spec.scaling, scale_floor=spec.scale_floor
                )
                return fused.lowrank_noise(x, A_stack, B_stack, seed)
            return fused.weight_noise(x, _entry_variance(scale_A, scale_B, spec).sqrt(), seed)
        return F.linear(x, self._eval_sample_noise(adapter_name, scale_A, scale_B, x.device))

    def _eval_sample_noise(
        self, adapter_name: str, scale_A: torch.Tensor, scale_B: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """``sigma * eps``, ``(d_out, d_in)`` float32: eval-mode sample number ``abmll_sample_index`` of ``Delta W``.

        Without gradients, drawn once per sample while `abmll_sample_cache` is set (inside
        ``posterior_sample(keep=True)``), and drawn again whenever the sample index or the scale factors (their
        identity or in-place version) change.
        """
        key = (self.abmll_sample_index, id(scale_A), scale_A._version, id(scale_B), scale_B._version, device)
        cache = None if torch.is_grad_enabled() else self.abmll_sample_cache  # a kept sample has no graph
        if cache is not None and adapter_name in cache and cache[adapter_name][0] == key:
            return cache[adapter_name][1]
        var = _entry_variance(scale_A, scale_B, self._scale_spec(adapter_name))
        eps = torch.randn(
            var.shape, device=var.device, dtype=var.dtype, generator=self._eval_generator(device, adapter_name)
        )
        noise = var.sqrt() * eps if torch.is_grad_enabled() else var.sqrt_().mul_(eps)  # in place: no graph
        if cache is not None:
            cache[adapter_name] = (key, noise)
        return noise

    def _eval_generator(self, device: torch.device, adapter_name: str) -> torch.Generator:
        """A generator seeded by (sample_seed, sample index, layer index): eval samples are reproducible."""
        seed = self.abmll_settings[adapter_name].sample_seed
        generator = torch.Generator(device=device)
        generator.manual_seed(hash((seed, self.abmll_sample_index, self.abmll_layer_index)) % (2**63))
        return generator

    def _active_abmll_adapters(self) -> Iterator[str]:
        return (name for name in self.active_adapters if name in self.abmll_global_mean_A)


class Linear(nn.Module, ABMLLLayer):
    """ABMLL around a `torch.nn.Linear` or a transformers `Conv1D` (GPT-2 family)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: ABMLLConfig, **kwargs: Any) -> None:
        super().__init__()
        ABMLLLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        kept = self._kept_sample_weight(x)
        if kept is not None:  # a kept posterior sample folded into the weight: one matmul, as the base alone
            return F.linear(x, kept, cast(Optional[torch.Tensor], self.get_base_layer().bias))
        result = self.base_layer(x, *args, **kwargs)
        for name in self._active_abmll_adapters():
            result = result + self.adapter_output(x, name).to(result.dtype)
        return result

    def _kept_sample_weight(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``W + s * B_m @ A_m + sigma * eps``: a kept eval sample folded into a float32 `nn.Linear`'s weight.

        Only inside ``posterior_sample(keep=True)`` without gradients, for one active ABMLL adapter on a plain
        float32 `torch.nn.Linear` with a float32 input (elsewhere, e.g. bf16 weights that would round the noise,
        None: the output is computed as base + mean path + noise). The folded weight equals the three terms to
        float32 rounding and is built once per sample, like the noise it holds.
        """
        cache = self.abmll_sample_cache
        base = self.get_base_layer()
        names = list(self._active_abmll_adapters())
        if cache is None or self.training or torch.is_grad_enabled() or type(base) is not nn.Linear or len(names) != 1:
            return None  # (training mode samples with the training RNG and dropout, never a kept sample)
        name = names[0]
        if base.weight.dtype != torch.float32 or x.dtype != torch.float32 or not self._samples(name):
            return None
        factors = self.posterior_factors(name)
        key: tuple[Any, ...] = (self.abmll_sample_index, base.weight._version, id(base.weight), x.device)
        key += tuple((id(f), f._version) for f in factors)
        entry = cache.get(("weight", name))
        if entry is None or entry[0] != key:
            mean_A, mean_B, scale_A, scale_B = factors
            noise = self._eval_sample_noise(name, scale_A, scale_B, x.device)
            weight = torch.addmm(base.weight, mean_B.float(), mean_A.float(), alpha=self.scaling[name]).add_(noise)
            cache.pop(name, None)  # the noise lives on inside the folded weight only
            entry = cache[("weight", name)] = (key, weight)
        return entry[1]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the active posterior's *mean* into the base weight (never a sample)."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.abmll_global_mean_A:
                continue
            weight = self.get_base_weight()
            merged = weight.data.float() + self.get_delta_weight(name).float()
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            self.set_base_weight(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.abmll_global_mean_A:
                weight = self.get_base_weight()
                self.set_base_weight((weight.data.float() - self.get_delta_weight(name).float()).to(weight.dtype))

    def __repr__(self) -> str:
        return "abmll." + super().__repr__()


# --------------------------------------------------------------------------------------- helpers
def _entry_variance(scale_A: torch.Tensor, scale_B: torch.Tensor, spec: fused.ScaleSpec) -> torch.Tensor:
    """Dense float32 variance of every entry of ``Delta W`` from a scale pair (`peft_abmll.bayes.entry_variance`)."""
    return bayes.entry_variance(
        scale_A, scale_B, scale_type=spec.scale_type, scaling=spec.scaling, scale_floor=spec.scale_floor, rho0=spec.rho0
    )


def _fp32(device: torch.device) -> Any:
    """Disable autocast: the Bayesian terms are computed in float32 whatever the model dtype."""
    return torch.autocast(device_type=device.type, enabled=False)
