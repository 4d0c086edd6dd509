"""The paper's baselines in the same harness, data and step budget as ABMLL.

| method | what trains |
| --- | --- |
| ``pretrained`` | nothing; a fresh identity LoRA adapter gives the 5-step test-time adaptation something to train |
| ``regular_lora`` | plain PEFT LoRA, one optimizer step per batch, batches shuffled across tasks |
| ``structured_lora`` | plain PEFT LoRA, task by task: K consecutive steps per task, no reset |
| ``reptile`` | LoRA, K inner steps per task, outer interpolation at ``outer_step_size`` (`MetaTrainer`) |
| ``abmll`` | ABMLL (`MetaTrainer`) |

All of them see the same episodes (same tasks, examples and order for a given seed): an ABMLL or
Reptile run of ``max_steps`` episodes makes ``max_steps * K`` inner steps of ``inner_batch_size``
examples, and the LoRA baselines make exactly as many optimizer steps on the same batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Optional, Union

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import Trainer

from .data import EpisodeDataset, prepare_tasks, seeded_torch_rng, unwrap_episode
from .meta.arguments import MetaTrainingArguments
from .meta.checkpoints import CheckpointSafetyMixin
from .meta.trainer import MetaTrainer, _data_seed
from .tuner.config import ABMLLConfig

ADAPTER_INIT_STREAM = 1  # the seed stream of adapter initialisation (episode noise uses (seed, episode code))


class EpisodeBatchSampler(torch.utils.data.Sampler[int]):
    """Yields batch codes ``episode_code * K + k``: shuffled across tasks (regular) or task-blocked (structured)."""

    def __init__(self, num_tasks: int, support_batches: int, seed: int = 0, blocked: bool = False) -> None:
        self.num_tasks, self.k, self.seed, self.blocked = num_tasks, support_batches, seed, blocked
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_tasks * self.k

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_tasks)
        codes = [(self.epoch * self.num_tasks + int(t)) * self.k + k for t in order for k in range(self.k)]
        if not self.blocked:
            codes = [codes[i] for i in np.random.default_rng([self.seed, self.epoch, 1]).permutation(len(codes))]
        return iter(codes)


class EpisodeBatchDataset(torch.utils.data.Dataset):
    """The support batches of an `EpisodeDataset`, addressable one by one."""

    def __init__(self, episodes: EpisodeDataset) -> None:
        self.episodes = episodes
        self._cache: tuple[int, dict] = (-1, {})

    def __len__(self) -> int:
        return len(self.episodes) * self.episodes.support_batches

    def __getitem__(self, code: int) -> dict[str, torch.Tensor]:
        episode_code, k = divmod(int(code), self.episodes.support_batches)
        if self._cache[0] != episode_code:
            self._cache = (episode_code, self.episodes[episode_code])
        return self._cache[1]["support"][k]


class MultiTaskTrainer(CheckpointSafetyMixin, Trainer):
    """A plain `Trainer` over the same support batches as `MetaTrainer` (regular or structured LoRA).

    Its checkpoints are complete-or-ignored like `MetaTrainer`'s, so ``resume_from_checkpoint=True`` and
    `last_complete_checkpoint` find them (an interrupted baseline run resumes instead of starting over).
    """

    args: MetaTrainingArguments
    train_dataset: EpisodeBatchDataset

    def __init__(
        self,
        model: nn.Module,
        args: MetaTrainingArguments,
        train_dataset: Any,
        processing_class: Any,
        blocked: bool = False,
        **kwargs: Any,
    ) -> None:
        encoder = args.task_encoder(processing_class)
        episodes = EpisodeDataset(
            prepare_tasks(train_dataset, args.max_choices),
            encoder,
            args.inner_steps,
            0,
            args.inner_batch_size,
            args.num_shots,
            seed=_data_seed(args),
        )
        self.blocked = blocked
        args = dataclasses.replace(args, max_steps=args.max_steps * args.inner_steps if args.max_steps > 0 else -1)
        super().__init__(
            model=model,
            args=args,
            train_dataset=EpisodeBatchDataset(episodes),
            data_collator=unwrap_episode,
            processing_class=processing_class,
            **kwargs,
        )

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return EpisodeBatchSampler(
            len(dataset.episodes), dataset.episodes.support_batches, seed=_data_seed(self.args), blocked=self.blocked
        )

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        loader = torch.utils.data.DataLoader(
            self.train_dataset, batch_size=1, sampler=self._get_train_sampler(), collate_fn=self.data_collator
        )
        return self.accelerator.prepare(loader)


def default_lora_config(abmll_config: Optional[ABMLLConfig] = None, **overrides: Any) -> LoraConfig:
    """A LoRA config matching an ABMLL config's rank, alpha, dropout and targets."""
    ref = abmll_config or ABMLLConfig()
    kwargs = {
        "r": ref.r,
        "lora_alpha": ref.lora_alpha,
        "lora_dropout": ref.lora_dropout,
        "target_modules": ref.target_modules,
        "task_type": "CAUSAL_LM",
    }
    return LoraConfig(**{**kwargs, **overrides})


def train_method(
    method: str,
    base_model_fn: Callable[[], nn.Module],
    tokenizer: Any,
    train_dataset: Any,
    args: MetaTrainingArguments,
    abmll_config: Optional[ABMLLConfig] = None,
    lora_config: Optional[LoraConfig] = None,
    lora_learning_rate: Optional[float] = None,
    resume_from_checkpoint: Union[bool, str, None] = None,
    **trainer_kwargs: Any,
) -> PeftModel:
    """Build and train one method of `METHODS` on the same data and budget; returns the trained PeftModel.

    ABMLL and Reptile take their global step from ``args.outer_step_size`` and their inner one from
    ``args.inner_learning_rate``. The regular / structured LoRA baselines train at `lora_learning_rate`
    (default: ``args.inner_learning_rate``). The adapter is initialised from ``args.seed`` alone (not from
    whatever ran before in the process), so the LoRA methods of one seed start from the same adapter.
    `resume_from_checkpoint` is passed to ``Trainer.train`` (``True``: the last checkpoint in ``args.output_dir``).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {list(METHODS)}.")
    abmll_config = abmll_config or ABMLLConfig(task_type="CAUSAL_LM")
    config = abmll_config if method == "abmll" else lora_config or default_lora_config(abmll_config)
    model = _seeded_peft_model(base_model_fn, config, args.seed)
    if method == "regular_lora" or method == "structured_lora":
        args = dataclasses.replace(args, learning_rate=lora_learning_rate or args.inner_learning_rate)
    run = Run(model, tokenizer, train_dataset, args, {**trainer_kwargs}, resume_from_checkpoint)
    METHODS[method].train(run)
    return model


@dataclasses.dataclass
class Run:
    """One method's training run: the fresh model and everything its trainer needs."""

    model: PeftModel
    tokenizer: Any
    train_dataset: Any
    args: MetaTrainingArguments
    trainer_kwargs: dict[str, Any]
    resume_from_checkpoint: Union[bool, str, None]

    def fit(self, trainer_class: Callable[..., Trainer], args: MetaTrainingArguments, **extra: Any) -> None:
        trainer = trainer_class(
            model=self.model,
            args=args,
            train_dataset=self.train_dataset,
            processing_class=self.tokenizer,
            **extra,
            **self.trainer_kwargs,
        )
        trainer.train(resume_from_checkpoint=self.resume_from_checkpoint)


def _train_nothing(run: Run) -> None:
    """The pretrained model: the fresh identity adapter is what test-time adaptation trains."""


def _train_abmll(run: Run) -> None:
    run.fit(MetaTrainer, run.args)


def _train_reptile(run: Run) -> None:
    run.fit(MetaTrainer, dataclasses.replace(run.args, meta_algorithm="reptile"))
    run.model.delete_adapter("meta")
    run.model.set_adapter(run.model.active_adapter)  # trainable again, like any freshly trained LoRA


def _train_regular_lora(run: Run) -> None:
    run.fit(MultiTaskTrainer, run.args, blocked=False)


def _train_structured_lora(run: Run) -> None:
    run.fit(MultiTaskTrainer, run.args, blocked=True)


@dataclasses.dataclass(frozen=True)
class Method:
    """A method of the comparison: its name, what trains (the docs' table), and how."""

    name: str
    description: str
    train: Callable[[Run], None]


#: Every method, in the order tables list them. `train_method` dispatches through it; the CLI offers its keys.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("pretrained", "nothing; a fresh identity LoRA adapter for test-time adaptation", _train_nothing),
        Method("regular_lora", "plain PEFT LoRA, batches shuffled across tasks", _train_regular_lora),
        Method(
            "structured_lora", "plain PEFT LoRA, task by task: K consecutive steps per task", _train_structured_lora
        ),
        Method("reptile", "LoRA meta-learned by Reptile (MetaTrainer, meta_algorithm='reptile')", _train_reptile),
        Method("abmll", "ABMLL: a meta-learned Bayesian LoRA (MetaTrainer)", _train_abmll),
    )
}


def _seeded_peft_model(base_model_fn: Callable[[], nn.Module], config: Any, seed: int) -> PeftModel:
    """``get_peft_model`` with the adapter's random initialisation drawn from `seed` alone."""
    base = base_model_fn()
    with seeded_torch_rng(seed, ADAPTER_INIT_STREAM):
        return get_peft_model(base, config)
