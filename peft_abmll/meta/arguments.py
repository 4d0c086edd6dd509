"""`MetaTrainingArguments`: transformers' `TrainingArguments` plus the meta-learning knobs."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType

from ..adaptation import SCORINGS
from ..algorithms import DEFAULT_INNER_LR
from ..data import ANSWER_FORMATS, TaskEncoder
from ..evaluation import EvaluationProtocol

logger = logging.getLogger(__name__)

META_ALGORITHMS = ("abmll", "reptile")
INNER_OPTIMIZERS = ("adamw", "sgd")
GLOBAL_UPDATES = ("natural", "gradient")


@dataclass
class MetaTrainingArguments(TrainingArguments):
    """Arguments of `MetaTrainer`.

    One *training step* of the Trainer is one task's episode: ``inner_steps`` local steps on support
    batches of ``inner_batch_size`` examples, then one contribution to the global update. Use
    ``gradient_accumulation_steps`` for several tasks per global update (their steps are averaged).

    The global update (``global_update="natural"``, the default, and Reptile) moves the global adapter a
    fraction ``outer_step_size`` of the way to what the task's adaptation says (see ``docs/method.md``):
    it is an interpolation, not a gradient step, so it is never clipped (``max_grad_norm`` is set to 0
    and a non-zero value is refused with a warning), and its step size follows ``lr_scheduler_type``
    (the default ``"linear"`` anneals it to 0, as Reptile does). ``learning_rate`` is then only the step
    size of the optional first-order query term. ``global_update="gradient"`` is the paper read literally:
    AdamW at ``learning_rate`` on ``beta * (KL - log p(global))`` (clipped when ``max_grad_norm`` > 0).
    """

    meta_algorithm: Literal["abmll", "reptile"] = field(
        default="abmll",
        metadata={"help": "'abmll' (Bayesian, needs an ABMLL adapter) or 'reptile' (plain LoRA; see baselines)."},
    )
    global_update: Literal["natural", "gradient"] = field(
        default="natural",
        metadata={
            "help": "ABMLL's global update. 'natural': the natural-gradient step of the outer objective, global mean "
            "toward the adapted means and global variance toward their spread (docs/method.md). 'gradient': AdamW "
            "on beta * (KL - log p(global)) as the paper reads literally (measured data-blind; kept for comparison)."
        },
    )
    outer_step_size: float = field(
        default=1.0,
        metadata={
            "help": "Step size eps of the global update ('natural' and Reptile): the global adapter moves a fraction "
            "eps of the way to the task's adapted one, eps annealed by lr_scheduler_type (default linear to 0). "
            "Reptile's paper: 1.0, annealed linearly."
        },
    )
    lr_scheduler_type: Union[SchedulerType, str] = field(
        default="linear",
        metadata={
            "help": "Schedule of the global step: outer_step_size (natural / Reptile) or learning_rate ('gradient'). "
            "Default 'linear': annealed to 0 over training, Reptile's schedule; 'constant' keeps it fixed."
        },
    )
    max_grad_norm: float = field(
        default=0.0,
        metadata={
            "help": "Gradient clipping of the global update; only global_update='gradient' uses it (the natural and "
            "Reptile steps are interpolations, never clipped)."
        },
    )
    # TrainingArguments fields redefined only to say what they mean for episodes (same type and default)
    max_steps: int = field(
        default=-1,
        metadata={
            "help": "Global updates of meta-training; each consumes gradient_accumulation_steps task episodes (one "
            "by default, so max_steps is the number of episodes). -1: num_train_epochs decides, as in "
            "TrainingArguments.",
            "aliases": ["--steps"],
        },
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "Task episodes per global update: each task adapts on its own and their update directions are "
            "averaged.",
            "aliases": ["--tasks-per-update"],
        },
    )
    resume_from_checkpoint: Optional[str] = field(
        default=None,
        metadata={
            "help": "Checkpoint folder to resume meta-training from, or 'latest': the newest complete checkpoint in "
            "output_dir (episode order and global adapter resume exactly). Read by scripts such as `abmll train`, "
            "which pass it to MetaTrainer.train.",
            "aliases": ["--resume"],
        },
    )
    inner_steps: int = field(default=5, metadata={"help": "Local gradient steps per task (K; paper: 5)."})
    inner_batch_size: int = field(
        default=2, metadata={"help": "Examples per inner step (paper: 2).", "aliases": ["--batch-size"]}
    )
    inner_learning_rate: float = field(
        default=DEFAULT_INNER_LR,
        metadata={"help": "Learning rate of the inner (local) steps.", "aliases": ["--inner-lr"]},
    )
    inner_optimizer: Literal["adamw", "sgd"] = field(
        default="adamw", metadata={"help": "Optimizer of the inner steps, fresh for every task ('adamw' or 'sgd')."}
    )
    inner_weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the inner optimizer."})
    beta: Optional[float] = field(
        default=None, metadata={"help": "Override the adapter config's beta (KL / hyperprior weight)."}
    )
    query_batches: int = field(
        default=0, metadata={"help": "Extra batches per task for the first-order meta-gradient (0 = none)."}
    )
    first_order: bool = field(
        default=False,
        metadata={
            "help": "Add the query-batch NLL gradient at the adapted local posterior to the global update "
            "(first-order MAML term; needs query_batches >= 1). Off = the paper's update (KL and prior only)."
        },
    )
    num_shots: int = field(
        default=0, metadata={"help": "Solved in-context examples from the same task in front of each prompt."}
    )
    answer_format: Literal["letter", "option"] = field(
        default="option",
        metadata={
            "help": "What is trained and scored: 'option' (the option's own text, scored by its mean token "
            "log-likelihood; a small model learns 6 of 8 screened tasks this way) or 'letter' (the paper's: the "
            "option label, e.g. 'B)', scored by the letters' next-token probabilities; 1 of the same 8)."
        },
    )
    max_length: int = field(default=512, metadata={"help": "Maximum tokens per example (the answer is never cut)."})
    max_choices: int = field(default=4, metadata={"help": "Examples with more options are dropped (paper: 4)."})
    adaptation_steps: int = field(
        default=5,
        metadata={
            "help": "Test-time adaptation steps on an unseen task (5 support batches).",
            "aliases": ["--adapt-steps"],
        },
    )
    adaptation_learning_rate: Optional[float] = field(
        default=None,
        metadata={
            "help": "Test-time adaptation learning rate (default: inner_learning_rate; `abmll evaluate / adapt`: the "
            "rate the adapter was meta-trained for, else 3e-4).",
            "aliases": ["--adapt-lr"],
        },
    )
    eval_num_samples: Optional[int] = field(
        default=None,
        metadata={
            "help": "Posterior samples averaged at evaluation (default: the adapter's setting).",
            "aliases": ["--num-samples"],
        },
    )
    eval_max_query: Optional[int] = field(
        default=None,
        metadata={
            "help": "Cap on query examples per evaluation task (None = all the rest).",
            "aliases": ["--max-query"],
        },
    )
    eval_scoring: Optional[Literal["letter", "option", "option_sum"]] = field(
        default=None,
        metadata={
            "help": "How evaluation turns the model into option probabilities (see `predict_proba`): 'letter', "
            "'option' (mean token log-likelihood of each option's text) or 'option_sum' (summed: the model's own "
            "probability of the text). Default: what `answer_format` trains."
        },
    )
    ece_bins: int = field(default=15, metadata={"help": "Equal-width bins of the expected calibration error."})

    def __post_init__(self) -> None:
        self.remove_unused_columns = False
        if self.gradient_checkpointing:
            # reentrant checkpointing silently yields None gradients for autograd.grad-driven inner loops
            raw = self.gradient_checkpointing_kwargs or {}
            # a JSON string from the command line: transformers parses it only in super().__post_init__
            kwargs = dict(json.loads(raw) if isinstance(raw, str) else raw)
            if kwargs.get("use_reentrant", False):
                raise ValueError(
                    "MetaTrainer needs gradient_checkpointing_kwargs={'use_reentrant': False}: reentrant "
                    "checkpointing gives the inner loop no gradients."
                )
            self.gradient_checkpointing_kwargs = {**kwargs, "use_reentrant": False}
        super().__post_init__()
        self._validate_meta()
        if self.uses_interpolation and self.max_grad_norm:
            logger.warning(
                "MetaTrainingArguments: max_grad_norm=%s is ignored: the %s global update is an interpolation with "
                "step outer_step_size, not a gradient step, so it is not clipped. Set max_grad_norm=0 to silence this.",
                self.max_grad_norm,
                "Reptile" if self.meta_algorithm == "reptile" else "natural",
            )
            self.max_grad_norm = 0.0

    @property
    def uses_interpolation(self) -> bool:
        """Whether the global update is an interpolation with step ``outer_step_size`` (natural or Reptile)."""
        return self.meta_algorithm == "reptile" or self.global_update == "natural"

    def task_encoder(self, tokenizer: Any) -> TaskEncoder:
        """The `TaskEncoder` of these arguments (``max_length``, ``answer_format``)."""
        return TaskEncoder(tokenizer, max_length=self.max_length, answer_format=self.answer_format)

    def evaluation_protocol(self, **overrides: Any) -> EvaluationProtocol:
        """The held-out-task protocol these arguments describe (`peft_abmll.evaluate_tasks`' `protocol`)."""
        protocol = EvaluationProtocol(
            support_batches=self.adaptation_steps,
            batch_size=self.inner_batch_size,
            lr=self.resolved_adaptation_learning_rate,
            optimizer=self.inner_optimizer,
            beta=self.beta,
            num_samples=self.eval_num_samples,
            scoring=self.eval_scoring,
            max_query=self.eval_max_query,
            num_shots=self.num_shots,
            max_choices=self.max_choices,
            n_bins=self.ece_bins,
            seed=self.seed,
        )
        return dataclasses.replace(protocol, **overrides) if overrides else protocol

    @property
    def resolved_adaptation_learning_rate(self) -> float:
        """`adaptation_learning_rate`, or the inner rate when it is None."""
        return self.inner_learning_rate if self.adaptation_learning_rate is None else self.adaptation_learning_rate

    def _validate_meta(self) -> None:
        if self.meta_algorithm not in META_ALGORITHMS:
            raise ValueError(f"meta_algorithm={self.meta_algorithm!r}; choose one of {META_ALGORITHMS}.")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format={self.answer_format!r}; choose one of {ANSWER_FORMATS}.")
        if self.eval_scoring is not None and self.eval_scoring not in SCORINGS:
            raise ValueError(f"eval_scoring={self.eval_scoring!r}; choose one of {SCORINGS} (or None).")
        if self.global_update not in GLOBAL_UPDATES:
            raise ValueError(f"global_update={self.global_update!r}; choose one of {GLOBAL_UPDATES}.")
        if not (math.isfinite(self.outer_step_size) and 0 < self.outer_step_size <= 1):
            raise ValueError(f"outer_step_size={self.outer_step_size} must be in (0, 1].")
        if self.inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"inner_optimizer={self.inner_optimizer!r}; choose one of {INNER_OPTIMIZERS}.")
        for name in ("inner_steps", "inner_batch_size", "max_length", "max_choices", "ece_bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        for name in ("query_batches", "num_shots", "adaptation_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        for name, rate in (
            ("inner_learning_rate", self.inner_learning_rate),
            ("adaptation_learning_rate", self.resolved_adaptation_learning_rate),
        ):
            if not (math.isfinite(rate) and rate > 0):
                raise ValueError(f"{name}={rate} must be a finite number > 0.")
        if self.beta is not None and self.beta < 0:
            raise ValueError(f"beta={self.beta} must be >= 0.")
        if self.first_order and self.query_batches < 1:
            raise ValueError("first_order=True needs query_batches >= 1 (the batches whose NLL gradient is used).")
