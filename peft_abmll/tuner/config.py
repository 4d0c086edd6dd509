"""`ABMLLConfig`: every knob of an ABMLL adapter, validated on construction."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils.other import get_pattern_key

from ..bayes import SCALE_TYPES
from ..peft_type import ABMLLPeftType

SAMPLING_MODES = ("local", "weight")
PREDICTIVE_MODES = ("mean", "sample")
POSTERIORS = ("global", "local")
BIAS_MODES = ("none", "all", "abmll_only")
KL_REDUCTIONS = ("mean", "sum")
#: The size-scaled default of `ABMLLConfig.beta`: this weight per entry of a *summed* KL (the paper's tempering,
#: measured best on SmolLM2-135M, docs/benchmarks.md) ...
BETA_PER_ENTRY = 1e-5
#: ... for up to this many adapted entries (SmolLM2-135M with q/v/o: beta 232 per entry of an averaged KL); larger
#: adapters keep 232 per entry, near the paper's choice on Llama-3-8B (1e-7 summed over ~1.2e9 entries ~ 120).
BETA_FULL_SIZE = 23_224_320


def size_scaled_beta(num_adapted_entries: int, kl_reduction: str = "mean") -> float:
    """The default ``beta`` for an adapter with ``num_adapted_entries`` entries of ``Delta W``.

    ``1e-5 * min(N, 23.2e6)`` for a KL averaged per entry (``kl_reduction='mean'``): the paper's ``beta = 1e-5``
    on a summed KL up to SmolLM2-135M's size (232 there), constant beyond. The same pull for ``'sum'``: divided
    by N. Small adapters get a small weight: a 5k-entry toy model gets 0.05, which leaves its tasks room to move.
    """
    if num_adapted_entries <= 0:
        raise ValueError(f"num_adapted_entries={num_adapted_entries}: the adapter must hold at least one entry.")
    mean_beta = float(f"{BETA_PER_ENTRY * min(num_adapted_entries, BETA_FULL_SIZE):.12g}")  # 232.2432, not ...03
    return mean_beta if kl_reduction == "mean" else mean_beta / num_adapted_entries


@dataclass
class ABMLLConfig(PeftConfig):
    """Configuration of an ABMLL (Amortized Bayesian Meta-Learning for LoRA) adapter.

    An ABMLL adapter is a *Bayesian* LoRA: instead of one low-rank update ``Delta W = s * B @ A`` per
    adapted layer it holds a Gaussian distribution over ``Delta W`` -- a low-rank mean and a low-rank
    standard deviation for every entry -- twice:

    - the **global** posterior ``theta``: what is shared by all tasks, learned across many tasks
      (meta-training); it is also the prior for every single task;
    - the **local** posterior ``phi``: a task's own distribution, reached from ``theta`` by a few
      gradient steps on that task's examples (adaptation).

    In training mode the forward pass draws a random ``Delta W`` from the active posterior
    (reparameterised, so gradients flow); in eval mode it uses the mean (deterministic, equal to
    the merged weights) or a seeded sample. See ``docs/method.md`` for the math.

    Example:
        ```python
        import peft_abmll  # registers ABMLL with PEFT
        from peft import get_peft_model

        model = get_peft_model(base_model, peft_abmll.ABMLLConfig(r=8, lora_alpha=16))
        ```
    """

    r: int = field(default=8, metadata={"help": "Rank of every low-rank factor pair (like LoRA's `r`)."})
    lora_alpha: float = field(
        default=16,
        metadata={"help": "LoRA scaling numerator: the mean update is `(lora_alpha / r) * B @ A`, as in LoRA."},
    )
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout probability on the adapter's input (as in LoRA); 0 disables it."}
    )
    target_modules: Optional[Union[list[str], set[str], str]] = field(
        default=None,
        metadata={
            "help": "Names (suffix match) or a regex of the modules to adapt. Default: the query, value and output "
            "attention projections, looked up from the model's `model_type` for Llama, Mistral, Qwen2, Gemma, Phi, "
            "GPT-2 and other common families; for an unknown family pass them explicitly. 'all-linear' adapts every "
            "linear layer except the output head."
        },
    )
    exclude_modules: Optional[Union[list[str], set[str], str]] = field(
        default=None, metadata={"help": "Names (suffix match) or a regex of modules never to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the blocks with these indices (needs list `target_modules`)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Name of the `nn.ModuleList` holding the blocks (e.g. 'layers' or 'h'), for `layers_to_transform`."
        },
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": "Ranks that override `r` for some modules, as in LoRA: keys are module names or regexes matched "
            "against the end of the module's full name, e.g. {'o_proj': 4, 'layers\\.0\\..*q_proj': 16}."
        },
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "`lora_alpha` values that override the default for some modules (keys as `rank_pattern`)."},
    )
    use_rslora: bool = field(
        default=False,
        metadata={
            "help": "Rank-stabilised scaling `lora_alpha / sqrt(r)` instead of `lora_alpha / r`, as LoRA's "
            "`use_rslora` (keeps the update's size steady as the rank grows)."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Extra modules (e.g. a classification head) trained in full and saved with the adapter."},
    )
    bias: Literal["none", "all", "abmll_only"] = field(
        default="none",
        metadata={"help": "Which biases to train: 'none', 'all', or 'abmll_only' (biases of adapted layers)."},
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "Set automatically for GPT-2-style `Conv1D` layers whose weight is stored transposed."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the adapter starts as the identity (mean B = 0, so eval outputs equal the base model's). "
            "False: random non-zero means (for tests and research only)."
        },
    )
    scale_type: Literal["linear", "softplus"] = field(
        default="linear",
        metadata={
            "help": "How the low-rank scale pair (A_s, B_s) becomes a standard deviation per weight entry. 'linear' "
            "(the paper's): sigma = (lora_alpha/r) * B_s @ A_s + scale_floor; allows the cheap 'local' sampling. "
            "'softplus': sigma = softplus(B_s @ A_s + rho0) + scale_floor; always positive, needs 'weight' sampling."
        },
    )
    scale_floor: float = field(
        default=1e-6,
        metadata={
            "help": "The constant c added to every standard deviation (the paper uses exp(-20)). Keeps variances and "
            "log-variances finite. Must be > 0 and smaller than `init_std`."
        },
    )
    init_std: float = field(
        default=1e-3,
        metadata={
            "help": "Standard deviation of every weight-update entry at initialisation, for both posteriors. Too small "
            "makes the KL and prior terms huge (they scale with 1/std^2); too large adds noise to every forward pass."
        },
    )
    beta: Optional[float] = field(
        default=None,
        metadata={
            "help": "Weight of KL(local || global) next to the data loss (a per-token mean NLL). With "
            "kl_reduction='mean' (the default) the KL is averaged over the adapted weight entries N; with 'sum' it is "
            "summed as in the paper (which uses 1e-7 on an 8B model). None (default): set from the adapter's size "
            "when the model is built, 1e-5 * min(N, 23.2e6) per entry (232 on SmolLM2-135M with q/v/o, the value "
            "measured best there; 0.05 on a 5k-entry toy model), and saved with the adapter."
        },
    )
    kl_reduction: Literal["mean", "sum"] = field(
        default="mean",
        metadata={
            "help": "How the KL term in a training loss is reduced over the entries of Delta W: 'mean' (per adapted "
            "entry, size-independent) or 'sum' (the paper's, whose beta must shrink as the model grows). Adapters "
            "saved before this field existed load with 'sum', the meaning their beta had."
        },
    )
    loss_beta: Optional[float] = field(
        default=None,
        metadata={
            "help": "Weight of the variational terms the model adds to its own training loss outside MetaTrainer (a "
            "plain Trainer, TRL's SFTTrainer, a hand-written loop), like transformers' auxiliary MoE losses: "
            "KL(local || global) when the local posterior trains, -log p(global) (the hyperprior) when the global "
            "one trains, reduced per kl_reduction. None (default): beta when beta is given; with beta=None, one nat "
            "per adapted entry (1.0 with kl_reduction='mean'), set when the model is built. 0: NLL only (noisy LoRA). "
            "MetaTrainer and `peft_abmll.adapt` add their own terms and switch this off while they run."
        },
    )
    prior_a0: float = field(
        default=1.5,
        metadata={
            "help": "Shape a0 of the Gamma hyperprior on every global precision 1/sigma^2. In the global update it "
            "counts as 2*(a0-1) pseudo-tasks whose variance is the prior's mode b0/(a0-1); a0 > 1 gives a finite "
            "mode. ABML uses 1 (no mode: the prior pushes every variance up without bound)."
        },
    )
    prior_b0: Optional[float] = field(
        default=None,
        metadata={
            "help": "Rate b0 of the Gamma hyperprior on the global precision. None (default): (prior_a0 - 1) * "
            "init_std**2, which puts the prior's mode at a standard deviation of init_std, the scale of the "
            "adapter's updates. ABML's 0.01 suits weights of order 0.1, not weight updates of order init_std."
        },
    )
    prior_mean_std: float = field(
        default=1.0,
        metadata={"help": "Standard deviation of the Normal(0, std^2) hyperprior on the global mean entries."},
    )
    sampling: Literal["local", "weight"] = field(
        default="local",
        metadata={
            "help": "How training forward passes draw the random update. 'weight' (the paper's): one noise matrix "
            "d_out x d_in per forward pass, shared by the batch. 'local': sample each output unit directly from its "
            "exact Gaussian law (local reparameterisation), at LoRA-like cost; needs scale_type='linear'."
        },
    )
    predictive_mode: Literal["mean", "sample"] = field(
        default="mean",
        metadata={
            "help": "What eval-mode forward passes compute. 'mean': the posterior mean only, deterministic and equal "
            "to the merged model. 'sample': a weight sample drawn from a seeded generator (deterministic per sample "
            "index); `peft_abmll.predict_proba` averages `num_samples` of them."
        },
    )
    num_samples: int = field(
        default=1,
        metadata={
            "help": "Posterior samples whose predictive probabilities `peft_abmll.predict_proba` and `evaluate_tasks` "
            "average by default (Monte Carlo). 1: predictive_mode decides (the mean, or one sample as in the paper). "
            "MetaTrainer records its eval_num_samples here."
        },
    )
    sample_seed: int = field(
        default=0, metadata={"help": "Seed of the eval-mode samples (predictive_mode='sample'), for reproducibility."}
    )
    adaptation_learning_rate: Optional[float] = field(
        default=None,
        metadata={
            "help": "Test-time learning rate the global posterior was meta-learned for. Written by `MetaTrainer` "
            "when training starts (its test-time rate, by default its inner one) and saved with the adapter; "
            "`peft_abmll.adapt`, `evaluate_tasks` and `abmll adapt / evaluate` use it when no rate is given. "
            "None: the package default (3e-4)."
        },
    )
    training_record: Optional[dict] = field(
        default=None,
        metadata={
            "help": "How the adapter was made and what it scored, written by `MetaTrainer` (meta-algorithm, global "
            "update, episodes, tasks, inner steps and rates) and by `record_evaluation` (held-out tasks, macro "
            "metrics, examples); shown in the model card that every save writes. Not a setting: nothing reads it."
        },
    )
    posterior: Literal["global", "local"] = field(
        default="global",
        metadata={
            "help": "Which posterior the forward pass, merging and export use: 'global' (the meta-learned one) or "
            "'local' (a task's adapted one; `peft_abmll.adapt` switches to it). Saved with the adapter."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ABMLLPeftType.ABMLL
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """Drop, with one warning naming them, keys of a saved config that this version does not know.

        Called by ``PeftModel.from_pretrained`` / ``load_adapter`` on the contents of
        ``adapter_config.json``. A config written by a newer peft-abmll (or PEFT) may carry fields this
        version lacks: the adapter still loads with every known setting, and the warning says which
        settings were ignored. Known keys are validated as usual (a bad value raises a ValueError).
        """
        known = {f.name for f in dataclasses.fields(cls)}
        if "beta" in kwargs and "kl_reduction" not in kwargs:
            kwargs = {**kwargs, "kl_reduction": "sum"}  # saved before kl_reduction existed: beta weighed a summed KL
        unknown = sorted(set(kwargs) - known)
        if unknown:
            from .._version import __version__

            warnings.warn(
                f"ABMLLConfig: the saved adapter config has key(s) {unknown} that peft-abmll {__version__} does not "
                "know (written by a newer peft-abmll or PEFT?). They are ignored and the adapter loads with its other "
                "settings; upgrade peft-abmll (and peft) to use them.",
                UserWarning,
                stacklevel=2,
            )
            kwargs = {k: v for k, v in kwargs.items() if k in known}
        return super().check_kwargs(**kwargs)

    @property
    def scaling(self) -> float:
        """The LoRA scaling ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with `use_rslora`)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def for_module(self, key: str) -> ABMLLConfig:
        """This config with `r` and `lora_alpha` of the module named `key` (`rank_pattern` / `alpha_pattern`)."""
        r_key = get_pattern_key(list(self.rank_pattern), key)
        alpha_key = get_pattern_key(list(self.alpha_pattern), key)
        r, alpha = self.rank_pattern.get(r_key, self.r), self.alpha_pattern.get(alpha_key, self.lora_alpha)
        if (r, alpha) == (self.r, self.lora_alpha):
            return self
        module_config = copy.copy(self)
        module_config.r, module_config.lora_alpha = r, alpha
        return module_config

    @property
    def training_loss_weight(self) -> float:
        """The weight of the variational terms in the model's own loss: `loss_beta`, else `beta`."""
        weight = self.beta if self.loss_beta is None else self.loss_beta
        if weight is None:
            raise ValueError("beta=None is set from the adapter's size when the model is built; build it first.")
        return weight

    @property
    def gamma_rate(self) -> float:
        """The Gamma hyperprior's rate: ``prior_b0``, or ``(prior_a0 - 1) * init_std**2`` (mode at init_std)."""
        return (self.prior_a0 - 1.0) * self.init_std**2 if self.prior_b0 is None else self.prior_b0

    def _validate(self) -> None:
        """Raise a ValueError naming the field and the fix for any inconsistent value."""
        _require(
            isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
            "r",
            self.r,
            "a positive integer rank, e.g. r=8",
        )
        _require(
            _finite(self.lora_alpha) and self.lora_alpha > 0,
            "lora_alpha",
            self.lora_alpha,
            "a positive number, e.g. lora_alpha=16",
        )
        _require(
            _finite(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0,
            "lora_dropout",
            self.lora_dropout,
            "a probability in [0, 1)",
        )
        _require(
            _finite(self.scale_floor) and self.scale_floor > 0,
            "scale_floor",
            self.scale_floor,
            "a small positive number, e.g. 1e-6",
        )
        _require(
            _finite(self.init_std) and self.init_std > self.scale_floor,
            "init_std",
            self.init_std,
            f"a positive std larger than scale_floor={self.scale_floor}, e.g. 1e-3",
        )
        _require(
            self.beta is None or (_finite(self.beta) and self.beta >= 0),
            "beta",
            self.beta,
            "None (set from the adapter's size) or a non-negative weight, e.g. 1.0",
        )
        _require(
            self.loss_beta is None or (_finite(self.loss_beta) and self.loss_beta >= 0),
            "loss_beta",
            self.loss_beta,
            "None (= beta) or a non-negative weight (0 turns the variational loss off)",
        )
        for name in ("prior_a0", "prior_b0", "prior_mean_std"):
            value = getattr(self, name)
            if name == "prior_b0" and value is None:
                continue
            _require(_finite(value) and value > 0, name, value, "a positive number")
        rate = self.adaptation_learning_rate
        ok_rate = rate is None or (_finite(rate) and rate > 0)
        _require(ok_rate, "adaptation_learning_rate", rate, "a positive rate or None")
        _require(
            _integer(self.num_samples) and self.num_samples >= 1,
            "num_samples",
            self.num_samples,
            "an integer >= 1",
        )
        _require(_integer(self.sample_seed), "sample_seed", self.sample_seed, "an integer seed, e.g. 0")
        _require(
            isinstance(self.rank_pattern, dict)
            and all(isinstance(k, str) and _integer(v) and v > 0 for k, v in self.rank_pattern.items()),
            "rank_pattern",
            self.rank_pattern,
            "a dict of module name (or regex) -> positive integer rank, e.g. {'o_proj': 4}",
        )
        _require(
            isinstance(self.alpha_pattern, dict)
            and all(isinstance(k, str) and _finite(v) and v > 0 for k, v in self.alpha_pattern.items()),
            "alpha_pattern",
            self.alpha_pattern,
            "a dict of module name (or regex) -> positive lora_alpha, e.g. {'o_proj': 8}",
        )
        for name in ("init_weights", "fan_in_fan_out", "inference_mode", "use_rslora"):
            _require(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            _require(
                value is None or isinstance(value, str) or _strings(value, allow_empty=name == "exclude_modules"),
                name,
                value,
                "a list of module names, a regex string, or None",
            )
        layers = self.layers_to_transform
        _require(
            layers is None
            or (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0)
            or (isinstance(layers, list) and all(_integer(i) and i >= 0 for i in layers)),
            "layers_to_transform",
            self.layers_to_transform,
            "a block index or a list of block indices (>= 0), or None",
        )
        _require(
            self.layers_pattern is None or isinstance(self.layers_pattern, str) or _strings(self.layers_pattern),
            "layers_pattern",
            self.layers_pattern,
            "a module-list name such as 'layers', a list of them, or None",
        )
        _require(
            self.modules_to_save is None or _strings(self.modules_to_save, allow_empty=True),
            "modules_to_save",
            self.modules_to_save,
            "a list of module names, or None",
        )
        if self.prior_b0 is None and self.prior_a0 <= 1:
            raise ValueError(
                f"ABMLLConfig: prior_b0=None puts the Gamma hyperprior's mode at init_std, which needs prior_a0 > 1 "
                f"(got prior_a0={self.prior_a0}). Use prior_a0 > 1 (e.g. 1.5), or give prior_b0 explicitly."
            )
        _choice("kl_reduction", self.kl_reduction, KL_REDUCTIONS)
        _choice("scale_type", self.scale_type, SCALE_TYPES)
        _choice("sampling", self.sampling, SAMPLING_MODES)
        _choice("predictive_mode", self.predictive_mode, PREDICTIVE_MODES)
        _choice("posterior", self.posterior, POSTERIORS)
        _choice("bias", self.bias, BIAS_MODES)
        if self.sampling == "local" and self.scale_type != "linear":
            raise ValueError(
                f"ABMLLConfig: sampling='local' needs scale_type='linear' (its output variance is low-rank only for "
                f"the linear scale), got scale_type={self.scale_type!r}. Use sampling='weight' with "
                f"'{self.scale_type}', or scale_type='linear'."
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "ABMLLConfig: `layers_to_transform` cannot be used when `target_modules` is a regex str; "
                "pass target_modules as a list of names instead."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("ABMLLConfig: `layers_pattern` needs `layers_to_transform`; set both or neither.")


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strings(value: object, allow_empty: bool = False) -> bool:
    """A list / set / tuple of non-empty strings (non-empty unless `allow_empty`)."""
    return (
        isinstance(value, (list, set, frozenset, tuple))
        and (allow_empty or len(value) > 0)
        and all(isinstance(v, str) and v for v in value)
    )


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, name: str, value: object, fix: str) -> None:
    if not ok:
        raise ValueError(f"ABMLLConfig: invalid {name}={value!r}; use {fix}.")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"ABMLLConfig: unknown {name}={value!r}; choose one of {', '.join(map(repr, allowed))}.")
