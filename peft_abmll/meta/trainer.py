"""`MetaTrainer`: transformers' `Trainer` with ABMLL's per-task inner loop and global update.

One Trainer step = one task episode:

```text
local <- global                                          (reset)
K inner steps on the local pairs: NLL + beta * KL         (own fresh optimizer, global frozen)
global update through the Trainer's optimizer (SGD at outer_step_size on a direction d):
    global -= eps * d,  d = natural-gradient step of KL(q_local || p_global) - w log p(global)
    (Reptile: d = global - local; global_update="gradient": AdamW on beta * (KL - log p(global)))
```

Everything else is the Trainer's: progress bars, callbacks, logging, gradient accumulation (tasks
per global update), mixed precision, checkpointing and exact resume, `save_model`, `push_to_hub`.
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch
from accelerate.utils import DistributedType, gather_object
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PredictionOutput
from transformers.utils import logging

from ..algorithms import (
    ABMLLView,
    NonFiniteLossError,
    ReptileView,
    inner_loop,
    linear_surrogate,
    query_gradients,
    require_causal_lm,
)
from ..data import EpisodeDataset, EpisodeSampler, prepare_tasks, seeded_torch_rng, unwrap_episode
from ..evaluation import evaluate_tasks, record_evaluation
from ..hub import write_model_card
from .arguments import MetaTrainingArguments
from .checkpoints import CheckpointSafetyMixin

OUTER_KEY = "__abmll_outer_step__"
logger = logging.get_logger(__name__)


class TaskCollection:
    """Held-out tasks for `MetaTrainer.evaluate`: task name -> list of examples."""

    def __init__(self, tasks: Mapping[str, list[dict]]) -> None:
        self.tasks = dict(tasks)

    def __len__(self) -> int:
        """Examples over all tasks (the size the Trainer reports for an eval set); ``len(self.tasks)`` counts tasks."""
        return sum(len(v) for v in self.tasks.values())


class MetaTrainer(CheckpointSafetyMixin, Trainer):
    """Meta-trains an ABMLL adapter (or Reptile on LoRA) on a multi-task dataset.

    Args:
        model: a PeftModel with an ABMLL adapter (or a LoRA adapter for ``meta_algorithm="reptile"``).
        args: `MetaTrainingArguments`.
        train_dataset: task-format data (a `datasets.Dataset` with columns ``task``, ``question``,
            ``choices``, ``label`` [, ``context``], or a dict task name -> Dataset).
        eval_dataset: held-out tasks in the same format. Evaluation adapts on support batches of each
            task and predicts the rest.
        processing_class: the tokenizer.
        **kwargs: anything else `Trainer` takes (callbacks, optimizers, ...).
    """

    loss_is_scaled_for_ga = False
    args: MetaTrainingArguments
    train_dataset: Optional[EpisodeDataset]

    def __init__(
        self,
        model: nn.Module,
        args: MetaTrainingArguments,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, MetaTrainingArguments):
            raise TypeError("MetaTrainer needs MetaTrainingArguments (a TrainingArguments subclass) as `args`.")
        if processing_class is None:
            raise ValueError("MetaTrainer needs the tokenizer as `processing_class=` to encode the tasks.")
        require_causal_lm(model, "MetaTrainer")
        self.encoder = args.task_encoder(processing_class)
        episodes = None
        if train_dataset is not None:
            tasks = prepare_tasks(train_dataset, args.max_choices)
            episodes = EpisodeDataset(
                tasks,
                self.encoder,
                args.inner_steps,
                args.query_batches,
                args.inner_batch_size,
                args.num_shots,
                seed=_data_seed(args),
            )
        held_out = None if eval_dataset is None else TaskCollection(prepare_tasks(eval_dataset, args.max_choices))
        kwargs.setdefault("data_collator", unwrap_episode)
        super().__init__(
            model=model,
            args=args,
            train_dataset=episodes,
            eval_dataset=held_out,
            processing_class=processing_class,
            **kwargs,
        )
        self.view = self._make_view()
        self._keep_adapter_out_of_fsdp()
        self.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # set per update by train()
        self._update_logs: dict[str, list[float]] = defaultdict(list)  # this process, current update
        self._meta_logs: dict[str, list[float]] = defaultdict(list)  # all processes, since the last log
        self._pending_query_grads: Optional[list[torch.Tensor]] = None
        self._current_task = "?"

    def _make_view(self) -> Any:
        model = self.accelerator.unwrap_model(self.model)
        if self.args.meta_algorithm == "reptile":
            return ReptileView(model)
        num_tasks = len(self.train_dataset) if self.train_dataset is not None else 1
        return ABMLLView(model, beta=self.args.beta, prior_weight=1.0 / num_tasks)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`, leaving the model with local == global (the meta-learned adapter).

        An ABMLL adapter's config records the test-time rate it is meta-learned for
        (``adaptation_learning_rate``) and, when set, the posterior samples of its evaluation
        (``eval_num_samples`` as ``num_samples``), so `peft_abmll.adapt` and `predict_proba` on the saved
        adapter use the same protocol.
        """
        if isinstance(self.view, ABMLLView):
            config = self.view.tuner.abmll_config()
            config.adaptation_learning_rate = self.args.resolved_adaptation_learning_rate
            if self.args.eval_num_samples is not None:
                config.num_samples = self.args.eval_num_samples
            config.training_record = {**(config.training_record or {}), "meta_training": self._training_summary()}
        try:
            return super().train(*args, **kwargs)
        finally:
            self.view.reset()

    def _training_summary(self) -> dict[str, Any]:
        """What the model card says about how the adapter was meta-trained."""
        a = self.args
        return {
            "meta_algorithm": a.meta_algorithm,
            "global_update": a.global_update,
            "episodes": a.max_steps,
            "tasks": len(self.train_dataset) if self.train_dataset is not None else None,
            "inner_steps": a.inner_steps,
            "inner_batch_size": a.inner_batch_size,
            "inner_learning_rate": a.inner_learning_rate,
            "outer_step_size": a.outer_step_size,
            "answer_format": a.answer_format,
            "seed": a.seed,
        }

    # --------------------------------------------------------------------------------- data
    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if dataset is None:
            raise ValueError("MetaTrainer: training requires a train_dataset of tasks.")
        return EpisodeSampler(len(dataset), seed=_data_seed(self.args))

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        if self.train_dataset is None:
            raise ValueError("MetaTrainer: training requires a train_dataset of tasks.")
        loader = torch.utils.data.DataLoader(
            self.train_dataset,
            batch_size=1,
            sampler=self._get_train_sampler(),
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
        )
        return self.accelerator.prepare(loader)

    # --------------------------------------------------------------------------------- optimisation
    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer over the *global* parameters.

        Natural and Reptile updates: plain SGD at ``outer_step_size`` on the update direction, so a step is
        exactly ``global -= eps * direction`` (the Trainer's scheduler anneals ``eps``). ``"gradient"``: the
        Trainer's own optimizer (AdamW at ``learning_rate``).
        """
        _only_trainable(self.accelerator.unwrap_model(self.model), self.view.global_params())
        if self.optimizer is None and self.args.uses_interpolation:
            self.optimizer = torch.optim.SGD(self.view.global_params(), lr=self.args.outer_step_size)
            return self.optimizer
        return super().create_optimizer(model)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Optional[Any] = None
    ) -> torch.Tensor:
        """One task: reset, K inner steps on the local pairs, then the outer loss through the Trainer.

        The episode's randomness (training noise, dropout) is seeded from (``args.seed``, episode code),
        so it does not depend on which process runs the episode or what ran before it.
        """
        task = inputs["task"]
        self._current_task = task
        code = inputs.get("code")
        seeded = seeded_torch_rng(self.args.seed, code) if code is not None else contextlib.nullcontext()
        with seeded:
            outer, nll = self._episode_step(model, inputs, num_items_in_batch)
        self._average_global_grads_across_processes()
        self._collect_update_logs()
        return outer + nll / self.current_gradient_accumulation_steps

    def _episode_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Optional[Any]
    ) -> tuple[torch.Tensor, float]:
        task = inputs["task"]
        unwrapped = self.accelerator.unwrap_model(model)
        unwrapped.train()
        self.view.reset()
        with self.view.local_mode():
            logs = inner_loop(
                unwrapped,
                self.view,
                [self._prepare_inputs(b) for b in inputs["support"]],
                lr=self.args.inner_learning_rate,
                optimizer=self.args.inner_optimizer,
                weight_decay=self.args.inner_weight_decay,
                autocast=self.compute_loss_context_manager,
                task=task,
                step_label=f"at global step {self.state.global_step} ",
                fresh=True,
            )
            if self.args.first_order:
                queries = [self._prepare_inputs(b) for b in inputs["query"]]
                self._pending_query_grads, query_nll = query_gradients(
                    unwrapped, self.view, queries, self.compute_loss_context_manager
                )
                self._update_logs["query_nll"].append(query_nll)
        for key in ("nll", "kl"):
            if key in logs[-1]:
                self._update_logs[key].append(float(np.mean([step[key] for step in logs])))
        # the outer loss reads the parameters directly: no forward through a DDP wrapper, so DDP's reducer
        # stays idle and `_average_global_grads_across_processes` is the one gradient synchronisation
        outer = super().training_step(model, {OUTER_KEY: torch.zeros(1)}, num_items_in_batch)
        return outer, float(np.mean([step["nll"] for step in logs]))

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Any] = None,
    ) -> Any:
        if OUTER_KEY not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, logs = self._outer_objective()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"Non-finite global-update loss {loss.item()} at global step {self.state.global_step} on task "
                f"{self._current_task!r} ({logs}). The last saved checkpoint is intact; lower learning_rate or beta, "
                "or raise init_std / scale_floor, and resume from it."
            )
        for key, value in logs.items():
            self._update_logs[key].append(value)
        return (loss, None) if return_outputs else loss

    def _outer_objective(self) -> tuple[torch.Tensor, dict[str, float]]:
        """A scalar whose gradient on the global parameters is the update direction.

        Natural / Reptile: the direction of `view.outer_direction` (the optimizer is SGD at ``eps``, the value
        is 0), plus the first-order query gradient scaled by ``learning_rate / eps``. ``"gradient"``: the
        paper's loss, plus the query gradient as is.
        """
        params = self.view.global_params()
        query, self._pending_query_grads = self._pending_query_grads, None
        if not self.args.uses_interpolation:
            loss, logs = self.view.outer_loss()
            return (loss if query is None else loss + linear_surrogate(params, query)), logs
        directions, logs = self.view.outer_direction()
        if query is not None:
            ratio = self.args.learning_rate / self.args.outer_step_size
            directions = [d + ratio * g.to(d.dtype) for d, g in zip(directions, query)]
        surrogate = linear_surrogate(params, directions)
        return surrogate - surrogate.detach(), logs  # NaN if any direction is: refused in compute_loss

    # --------------------------------------------------------------------------------- multi-process
    def _keep_adapter_out_of_fsdp(self) -> None:
        """Under FSDP, shard the base model but leave the adapter's parameters whole on every process.

        The meta-learner reads its parameters outside any forward pass (the reset local <- global, the inner
        loop's own optimizer step, the global update's KL and natural-gradient solves), where sharded tensors
        would be seen as shards. The modules that own them are added to the FSDP plugin's ``ignored_modules``
        (after any the user listed), so they stay replicated, and `_average_global_grads_across_processes`
        averages their gradients as under DDP. Warns when FSDP was asked for but accelerate did not enable it
        (accelerate runs FSDP only on GPU-like devices: on CPU the run is plain DDP).
        """
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if plugin is None:
            if self.args.fsdp:
                logger.warning(
                    "`fsdp` is set but accelerate did not enable FSDP (distributed type %s): it runs FSDP only on "
                    "GPU-like devices, so this run replicates the model on every process (DDP).",
                    self.accelerator.distributed_type,
                )
            return
        if getattr(plugin, "fsdp_version", 1) != 2:
            logger.warning(
                "MetaTrainer is tested under FSDP2 (fsdp_config={'version': 2}). Under FSDP1 the inner loop runs "
                "the unwrapped model, which may bypass the root unit's unsharding."
            )
        model = self.accelerator.unwrap_model(self.model)
        mine = {id(p) for p in (*self.view.global_params(), *self.view.local_params())}
        owners = [m for m in model.modules() if any(id(p) in mine for p in m.parameters(recurse=False))]
        theirs = plugin.ignored_modules
        if isinstance(theirs, str):
            theirs = [m for name, m in model.named_modules() if re.fullmatch(theirs, name)]
        plugin.ignored_modules = [*(theirs or []), *(m for m in owners if all(m is not t for t in theirs or []))]

    def _average_global_grads_across_processes(self) -> None:
        """The global update is the mean over processes (each process adapts its own tasks).

        At the last task of an update, the global-pair gradients are averaged with one flat
        ``accelerator.reduce(..., "mean")`` per dtype. Each process has already averaged its own
        ``gradient_accumulation_steps`` tasks, so the result is the mean over all tasks of the update.
        The outer loss is the same function of the same parameters on every process, so every process
        holds gradients for the same parameters. DeepSpeed reduces gradients itself inside
        ``accelerator.backward``, so nothing is done there.
        """
        acc = self.accelerator
        if acc.num_processes == 1 or not acc.sync_gradients or acc.distributed_type == DistributedType.DEEPSPEED:
            return
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        for p in self.view.global_params():
            if p.grad is not None:
                groups[(p.grad.device, p.grad.dtype)].append(p.grad)
        for grads in groups.values():
            flat = acc.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
            for g, piece in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(piece.view_as(g))

    def _collect_update_logs(self) -> None:
        """At the end of an update, add every process's meta terms (nll, kl, ...) to the logged means."""
        if not self.accelerator.sync_gradients:
            return
        pending = [dict(self._update_logs)]
        self._update_logs.clear()
        if self.accelerator.num_processes > 1:
            pending = gather_object(pending)  # in process order = the order of the tasks in the update
        for logs in pending:
            for key, values in logs.items():
                self._meta_logs[key].extend(values)

    # --------------------------------------------------------------------------------- logging / saving
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._meta_logs:
            logs = {**logs, **{k: float(np.mean(v)) for k, v in self._meta_logs.items() if v}}
            self._meta_logs.clear()
        super().log(logs, *args, **kwargs)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The ABMLL model card (PEFT metadata, settings, a snippet that imports `peft_abmll` first)."""
        if not self.is_world_process_zero():
            return
        model = self.accelerator.unwrap_model(self.model)
        write_model_card(model, self.args.output_dir or ".", repo_id=getattr(self, "hub_model_id", None))

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model` with local == global on every process.

        The reset comes first, on all processes, because under FSDP or DeepSpeed the Trainer gathers the
        state dict before it calls `_save`. Only the main process writes (the Trainer's `should_save`).
        """
        self.view.reset()
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """Save with local == global, so the adapter on disk is the meta-learned one."""
        self.view.reset()
        super()._save(output_dir, state_dict)

    # --------------------------------------------------------------------------------- evaluation
    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: Optional[list[str]] = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Held-out-task evaluation: per task adapt on support batches, predict the rest.

        Logs macro accuracy / ECE / NLL / Brier as ``{prefix}_accuracy`` etc., and writes the JSON and
        the reliability diagram into ``args.output_dir`` on the main process. Under several processes
        each evaluates every N-th task and the per-task results are gathered; every process returns the
        same metrics, equal to a single-process evaluation.
        """
        tasks = self.eval_dataset if eval_dataset is None else eval_dataset
        if tasks is None:
            raise ValueError("MetaTrainer.evaluate needs held-out tasks (eval_dataset).")
        metrics = self._held_out_metrics(tasks, metric_key_prefix)[1]
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def predict(
        self, test_dataset: Any, ignore_keys: Optional[list[str]] = None, metric_key_prefix: str = "test"
    ) -> PredictionOutput:
        """`evaluate` on `test_dataset`, with the per-example probabilities, as `Trainer.predict` returns them.

        Returns:
            ``PredictionOutput``: ``predictions`` ``(n_query, max_choices)`` float32 probabilities of the query
            examples (tasks in name order; options a row lacks are 0), ``label_ids`` ``(n_query,)`` and the
            ``{prefix}_*`` metrics.
        """
        results, metrics = self._held_out_metrics(test_dataset, metric_key_prefix)
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, metrics)
        return PredictionOutput(
            predictions=np.asarray(results["probs"], dtype=np.float32),
            label_ids=np.asarray(results["labels"], dtype=np.int64),
            metrics=metrics,
        )

    def _held_out_metrics(self, tasks: Any, prefix: str) -> tuple[dict[str, Any], dict[str, float]]:
        """`evaluate_tasks` on `tasks` from the global posterior; its results and the ``{prefix}_*`` metrics."""
        if not isinstance(tasks, TaskCollection):
            tasks = TaskCollection(prepare_tasks(tasks, self.args.max_choices))
        model = self.accelerator.unwrap_model(self.model)
        self.view.reset()
        results = evaluate_tasks(
            model,
            tasks.tasks,
            encoder=self.encoder,
            output_dir=self.args.output_dir if self.is_world_process_zero() else None,
            name=f"{prefix}_step{self.state.global_step}",
            accelerator=self.accelerator,
            protocol=self.args.evaluation_protocol(),
            progress=not self.args.disable_tqdm,
        )
        self.view.reset()
        record_evaluation(model, results)
        metrics = {f"{prefix}_{k}": v for k, v in results["macro"].items()}
        metrics.update({f"{prefix}_pooled_{k}": v for k, v in results["pooled"].items()})
        return results, metrics


def _data_seed(args: MetaTrainingArguments) -> int:
    return args.data_seed if args.data_seed is not None else args.seed


def _only_trainable(model: nn.Module, params: list[nn.Parameter]) -> None:
    """Leave exactly `params` (plus modules_to_save) trainable before the optimizer is built."""
    keep = {id(p) for p in params}
    for name, p in model.named_parameters():
        if id(p) in keep:
            p.requires_grad_(True)
        elif p.requires_grad and "modules_to_save" not in name:
            p.requires_grad_(False)
