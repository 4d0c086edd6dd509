"""The meta-learning core: views of a model's global / local parameters and the inner loop (learn2learn style).

Below both `peft_abmll.adaptation` (test-time adaptation, evaluation) and `peft_abmll.meta` (the
`MetaTrainer`): it imports the tuner and the pure update functions of `peft_abmll.global_update`, nothing above.

A *view* (the `View` protocol; `MetaView` adds the global step) tells which parameters are the global
(meta-learned) ones and which the local (per-task) ones, how to ``reset`` local from global, how a task
starts and ends, and what the global update is:

- `ABMLLView`: the ABMLL adapter's global / local pairs; outer objective
  ``beta * KL(q_local || p_global) - beta * log p(global)``.
- `ReptileView`: plain PEFT LoRA with two adapters, ``"meta"`` (global, inactive) and the active one
  (local); outer "gradient" ``global - local`` so that an SGD step with rate eps is Reptile's
  interpolation ``global += eps * (local - global)``.
- `SnapshotView`: any other PeftModel (regular LoRA, a fresh adapter on a pretrained model): adapt
  the trainable adapter parameters and restore them afterwards.

`inner_loop` runs the K local steps with first-order gradients only (`torch.autograd.grad`, no graph
kept between steps), so memory does not grow with the number of steps or tasks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Optional, Protocol, Union, runtime_checkable

import torch
from peft import PeftModel
from torch import nn

from . import global_update
from .tuner.model import ABMLLModel

__all__ = [
    "DEFAULT_INNER_LR",
    "ABMLLView",
    "MetaView",
    "NonFiniteLossError",
    "ReptileView",
    "SnapshotView",
    "View",
    "abmll_tuner",
    "inner_loop",
    "linear_surrogate",
    "make_view",
]

#: Inner-loop and test-time adaptation learning rate. 3e-4 beat 1e-3 and 3e-3 for ABMLL on every seed of the
#: quality benchmark (5 AdamW steps on 10 support examples over-fit at 1e-3); see docs/benchmarks.md.
DEFAULT_INNER_LR = 3e-4


@runtime_checkable
class View(Protocol):
    """What adapting to one task needs of a model: its local parameters and how a task starts and ends.

    ``beta`` weighs `inner_regularizer` in the inner loss (0 for views without one).
    """

    beta: float

    def global_params(self) -> list[nn.Parameter]:
        """The meta-learned parameters (empty when there are none)."""
        ...

    def local_params(self) -> list[nn.Parameter]:
        """The per-task parameters the inner loop trains."""
        ...

    def reset(self) -> None:
        """Local <- global (or the snapshot)."""
        ...

    def local_mode(self) -> contextlib.AbstractContextManager[None]:
        """Inside the block, the forward uses and training moves only the local parameters."""
        ...

    def inner_regularizer(self) -> tuple[torch.Tensor, dict[str, float]]:
        """The inner loss's term besides the NLL (already weighted by ``beta``) and its logs."""
        ...

    def begin_task(self) -> None:
        """Before adapting to a new task (ABMLL: local <- global)."""
        ...

    def finish_task(self) -> None:
        """After adapting (ABMLL: the adapted local posterior becomes the one predictions use)."""
        ...


@runtime_checkable
class MetaView(View, Protocol):
    """A `View` that also meta-learns: the direction of the global step after a task's inner loop."""

    def outer_direction(self) -> tuple[list[torch.Tensor], dict[str, float]]:
        """One tensor per `global_params` entry, in order, and per-step logs."""
        ...


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the step and the task."""


def abmll_tuner(model: nn.Module) -> Optional[ABMLLModel]:
    """The `ABMLLModel` inside a (possibly wrapped) PeftModel, or None."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, ABMLLModel) else None


_NOT_CAUSAL_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM")


def require_causal_lm(model: nn.Module, verb: str) -> None:
    """Raise a ValueError naming the fix unless `model` (or the base inside a PeftModel) is a decoder-only LM.

    The task verbs (`MetaTrainer`, `adapt`, `predict_proba`, `evaluate_tasks`) train on the answer's tokens and
    score options by next-token probabilities, which needs a causal language-model head. Modules that are not
    transformers models (no ``config``) are let through.
    """
    get_base = getattr(model, "get_base_model", None)
    base: nn.Module = get_base() if callable(get_base) else model
    config, name = getattr(base, "config", None), type(base).__name__
    if config is None:
        return
    reason = None
    if getattr(config, "is_encoder_decoder", False):
        reason = "an encoder-decoder model"
    elif name.endswith(_NOT_CAUSAL_HEADS):
        reason = "a model with a task head instead of a causal language-model head"
    elif callable(head := getattr(base, "get_output_embeddings", None)) and head() is None:
        reason = "a model without a language-model head"
    if reason is not None:
        raise ValueError(
            f"{verb} needs a decoder-only causal language model (e.g. LlamaForCausalLM, GPT2LMHeadModel, loaded "
            f"with AutoModelForCausalLM): it trains on the answer's tokens and scores options by next-token "
            f"probabilities. Got {name}, {reason}. For classification or sequence-to-sequence models, train the "
            "ABMLL adapter with a plain transformers Trainer (the model's loss includes the variational terms)."
        )


class ABMLLView:
    """Global / local pairs of an ABMLL adapter.

    ``prior_weight`` is the hyperprior's weight per task in the outer objective (``1 / number of training
    tasks``; see `peft_abmll.global_update.HyperPrior`).
    """

    def __init__(self, model: nn.Module, beta: Optional[float] = None, prior_weight: float = 1.0) -> None:
        self.model = model
        tuner = abmll_tuner(model)
        if tuner is None:
            raise TypeError("ABMLLView needs a PeftModel with an ABMLL adapter (get_peft_model(..., ABMLLConfig())).")
        self.tuner: ABMLLModel = tuner
        config = tuner.abmll_config()
        chosen = config.beta if beta is None else beta  # abmll_config() has set a beta=None from the size
        if chosen is None:
            raise ValueError("ABMLLView: the adapter has no beta; give one, e.g. ABMLLConfig(beta=1.0).")
        self.beta: float = chosen
        self.kl_per_entry = config.kl_reduction == "mean"
        self.prior_weight = prior_weight

    def global_params(self) -> list[nn.Parameter]:
        return self.tuner.global_parameters()

    def local_params(self) -> list[nn.Parameter]:
        return self.tuner.local_parameters()

    def reset(self) -> None:
        self.tuner.reset_local_to_global()

    begin_task = reset

    def finish_task(self) -> None:
        self.tuner.set_posterior("local")

    @contextlib.contextmanager
    def local_mode(self) -> Iterator[None]:
        """Forward uses (and training moves) only the local posterior inside the block.

        The loop inside adds its own terms (`inner_regularizer`): the model's own variational loss is off there.
        """
        previous = self.tuner.abmll_config().posterior
        self.tuner.set_posterior("local")
        self.tuner.set_trainable_posterior("local")
        try:
            with self.tuner.objective_owned():
                yield
        finally:
            self.tuner.set_posterior(previous)
            self.tuner.set_trainable_posterior(previous)

    def inner_regularizer(self) -> tuple[torch.Tensor, dict[str, float]]:
        """``beta * KL(q_local || p_global)``, the KL summed or averaged per adapted entry (``kl_reduction``)."""
        if self.beta == 0:
            return torch.zeros(()), {}
        kl = self.tuner.kl_divergence()
        if self.kl_per_entry:
            kl = kl / self.tuner.num_adapted_entries()
        return self.beta * kl, {"kl": kl.item()}

    def outer_loss(self) -> tuple[torch.Tensor, dict[str, float]]:
        """The paper-literal outer objective ``beta * (KL - log p(global))`` (``global_update='gradient'``)."""
        self.tuner.set_trainable_posterior("global")
        kl = self.tuner.kl_divergence()
        log_prior = self.tuner.log_prior()
        return self.beta * (kl - log_prior), {"outer_kl": kl.item(), "log_prior": log_prior.item()}

    def outer_direction(self) -> tuple[list[torch.Tensor], dict[str, float]]:
        """The natural-gradient global step (`peft_abmll.global_update.abmll_direction`) for every layer.

        Returns the directions in the order of `global_params` and per-entry logs: the outer KL and the
        weighted ``-log p(global)`` per adapted entry, the RMS of the global mean, of the global std, of
        the std the step aims at and of the adapted means' distance to the global mean, and the mean size of
        the KL's and of the hyperprior's parts of the variance step (which one drives the width).
        """
        self.tuner.set_trainable_posterior("global")
        directions: list[torch.Tensor] = []
        totals = dict.fromkeys(global_update.STAT_KEYS, 0.0)
        for layer, name in self.tuner.abmll_layers_with_adapter():
            settings = layer.abmll_settings[name]
            prior = global_update.HyperPrior(
                self.prior_weight, settings.prior_a0, settings.gamma_rate, settings.prior_mean_std
            )
            step, stats = global_update.abmll_direction(
                layer.posterior_factors(name, "global"),
                layer.posterior_factors(name, "local"),
                layer._scale_spec(name),
                prior,
            )
            directions.extend(step)
            for key, value in stats.items():
                totals[key] += value
        n = max(totals["entries"], 1.0)
        logs = {
            "outer_kl_per_entry": totals["kl"] / n,
            "hyperprior_per_entry": self.prior_weight * totals["neg_log_prior"] / n,
            "global_mean_rms": math.sqrt(totals["global_mean_sq"] / n),
            "global_std_rms": math.sqrt(totals["global_var"] / n),
            "target_std_rms": math.sqrt(totals["target_var"] / n),
            "spread_rms": math.sqrt(totals["spread"] / n),
            # which term drives the width: mean |part of the variance step| per entry, in variance units
            "var_step_kl_per_entry": totals["var_step_kl"] / n,
            "var_step_hyperprior_per_entry": totals["var_step_prior"] / n,
        }
        return directions, logs


class ReptileView:
    """Reptile on plain PEFT LoRA: adapter ``meta_adapter`` holds the global weights, the active one the local."""

    def __init__(self, model: PeftModel, meta_adapter: str = "meta") -> None:
        self.model = model
        self.local_adapter = model.active_adapter
        self.meta_adapter = meta_adapter
        if meta_adapter not in model.peft_config:
            model.add_adapter(meta_adapter, model.peft_config[self.local_adapter])
            model.set_adapter(self.local_adapter)
            _copy_(self._params(meta_adapter), self._params(self.local_adapter))
        self.beta = 0.0

    def _params(self, adapter: str) -> list[nn.Parameter]:
        named = [
            (n.replace(f".{adapter}.", ".").removesuffix(f".{adapter}"), p)
            for n, p in self.model.named_parameters()
            if f".{adapter}." in n or n.endswith(f".{adapter}")
        ]
        return [p for _, p in sorted(named, key=lambda item: item[0])]

    def global_params(self) -> list[nn.Parameter]:
        return self._params(self.meta_adapter)

    def local_params(self) -> list[nn.Parameter]:
        return self._params(self.local_adapter)

    def reset(self) -> None:
        _copy_(self.local_params(), self.global_params())

    @contextlib.contextmanager
    def local_mode(self) -> Iterator[None]:
        _set_requires_grad(self.global_params(), False)
        _set_requires_grad(self.local_params(), True)
        try:
            yield
        finally:
            _set_requires_grad(self.local_params(), False)
            _set_requires_grad(self.global_params(), True)

    def inner_regularizer(self) -> tuple[torch.Tensor, dict[str, float]]:
        return torch.zeros(()), {}

    def begin_task(self) -> None:
        """Nothing: the MetaTrainer resets local <- global itself; evaluation adapts the local adapter in place."""

    def finish_task(self) -> None:
        """Nothing: the local adapter is the active one."""

    def outer_direction(self) -> tuple[list[torch.Tensor], dict[str, float]]:
        """``global - local``: the step ``global -= eps * direction`` is Reptile's interpolation."""
        direction = global_update.reptile_direction(self.global_params(), self.local_params())
        distance = math.sqrt(sum(d.float().square().sum().item() for d in direction))
        return direction, {"reptile_distance": distance}


class SnapshotView:
    """Adapt the trainable parameters of any model, restoring them on `restore()` (no global copy)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("The model has no trainable parameter to adapt; add an adapter first.")
        self.snapshot = [p.detach().clone() for p in self.params]
        self.beta = 0.0

    def global_params(self) -> list[nn.Parameter]:
        return []

    def local_params(self) -> list[nn.Parameter]:
        return self.params

    def reset(self) -> None:
        _copy_(self.params, self.snapshot)

    restore = reset

    @contextlib.contextmanager
    def local_mode(self) -> Iterator[None]:
        yield

    def inner_regularizer(self) -> tuple[torch.Tensor, dict[str, float]]:
        return torch.zeros(()), {}

    def begin_task(self) -> None:
        """Nothing: the trainable parameters are adapted from where they are."""

    def finish_task(self) -> None:
        """Nothing: the adapted parameters are the model's."""


def make_view(model: nn.Module, beta: Optional[float] = None) -> Union[ABMLLView, ReptileView, SnapshotView]:
    """`ABMLLView` for an ABMLL model, `ReptileView` if a "meta" LoRA adapter exists, else `SnapshotView`."""
    if abmll_tuner(model) is not None:
        return ABMLLView(model, beta)
    if isinstance(model, PeftModel) and "meta" in model.peft_config:
        return ReptileView(model)
    return SnapshotView(model)


# ------------------------------------------------------------------------------------------- pure pieces
def linear_surrogate(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """A scalar whose gradient w.r.t. ``params[i]`` is exactly ``grads[i]`` (``sum <g, p>``, g detached).

    Lets a precomputed update direction flow through the Trainer's own backward, so gradient
    accumulation, mixed precision and distributed reduction treat it like any loss.
    """
    total = torch.zeros((), device=params[0].device if params else "cpu")
    for p, g in zip(params, grads):
        total = total + (p * g.detach().to(p.dtype)).sum()
    return total


def make_inner_optimizer(
    params: Sequence[nn.Parameter], name: str, lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """A fresh optimizer for one inner loop (state is per task and dropped afterwards).

    Uses torch's fused kernel where the parameters' device and dtype have one (CPU and CUDA, floating point): on
    CPU the default per-parameter loop costs several times more per step over the many small LoRA factors.
    """
    classes = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if name not in classes:
        raise ValueError(f"Unknown inner optimizer {name!r}; choose 'adamw' or 'sgd'.")
    try:
        return classes[name](params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # no fused kernel for this device / dtype
        return classes[name](params, lr=lr, weight_decay=weight_decay)


def inner_loop(
    model: nn.Module,
    view: View,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    lr: float,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    task: str = "?",
    step_label: str = "",
    fresh: bool = False,
) -> list[dict[str, float]]:
    """K first-order steps on ``view.local_params()``: one optimizer step per batch on NLL + beta * KL.

    Must run inside ``view.local_mode()``. ``fresh=True`` declares that local == global on entry (just
    reset), which lets the first step skip the KL (exactly 0, with zero gradient). Returns one log dict
    (``nll``, ``kl``, ``loss``) per step.
    Raises `NonFiniteLossError` naming the step and `task` on a NaN / infinite loss.
    """
    params = view.local_params()
    opt = make_inner_optimizer(params, optimizer, lr, weight_decay)
    logs = []
    for k, batch in enumerate(batches):
        with autocast():
            nll = model(**batch).loss
        # right after a reset local == global: the KL and its gradient are exactly 0, skip computing them
        reg, reg_logs = view.inner_regularizer() if (k > 0 or not fresh) else (torch.zeros(()), {"kl": 0.0})
        loss = nll.float() + reg.to(nll.device)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"Non-finite inner loss {loss.item()} {step_label}at inner step {k + 1} on task {task!r} "
                f"(nll={nll.item()}, {reg_logs}). Lower the learning rates, raise init_std/scale_floor, or check the "
                "data of this task."
            )
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        opt.step()
        for p in params:
            p.grad = None
        logs.append({"nll": nll.item(), "loss": loss.item(), **reg_logs})
    return logs


def query_gradients(
    model: nn.Module,
    view: View,
    batches: Sequence[dict[str, torch.Tensor]],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[list[torch.Tensor], float]:
    """First-order meta-gradient: mean query-batch NLL gradient at the adapted local parameters."""
    params = view.local_params()
    total = [torch.zeros_like(p) for p in params]
    nll_sum = 0.0
    for batch in batches:
        with autocast():
            nll = model(**batch).loss
        grads = torch.autograd.grad(nll, params, allow_unused=True)
        for acc, g in zip(total, grads):
            if g is not None:
                acc.add_(g, alpha=1.0 / len(batches))
        nll_sum += nll.item()
    return total, nll_sum / max(len(batches), 1)


def _copy_(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for d, s in zip(dst, src):
            d.copy_(s)


def _set_requires_grad(params: Sequence[nn.Parameter], flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)
