"""Multiple-choice task data: validation, the paper's prompt, tokenisation with answer-only loss, episodes.

The user-facing format is a `datasets.Dataset` (or a dict task name -> `Dataset`) with columns
``task`` (str), ``question`` (str), ``choices`` (list of str), ``label`` (int, index of the correct
choice) and optionally ``context`` (str).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from datasets import Dataset

logger = logging.getLogger("peft_abmll")

#: The option letters, in order (prompts, answers, and letter answers in loaded task files).
LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
INSTRUCTION = "Return the label of the correct answer for the question below."
REQUIRED_COLUMNS = ("task", "question", "choices", "label")
TaskData = Union[Dataset, Sequence[Mapping[str, Any]], Mapping[str, Any]]


class LetterCollisionError(ValueError):
    """Two option letters share their first token under this tokenizer: letter scoring cannot be used."""


# ----------------------------------------------------------------------------------------------- tasks
def prepare_tasks(data: TaskData, max_choices: int = 4) -> dict[str, list[dict[str, Any]]]:
    """Validate task-format data and group it by task.

    `data` is a `datasets.Dataset`, a sequence of row dicts (each with a ``task``), or a mapping task name ->
    `Dataset` / sequence of rows (the ``task`` column is then optional). Drops examples with more than
    `max_choices` choices (logging the count per task). Raises a ValueError naming the task and row for a
    missing column, an empty task, or a missing / out-of-range label.

    Returns:
        task name -> list of example dicts (``question``, ``choices``, ``label``, ``context``).
    """
    groups = dict(data) if isinstance(data, Mapping) else {None: data}
    tasks: dict[str, list[dict[str, Any]]] = {}
    for key, rows in groups.items():
        rows = _rows(rows, what=f"Task {key!r}" if key else "Task data")
        for row, example in enumerate(rows):
            missing = [c for c in REQUIRED_COLUMNS if c not in example and not (c == "task" and key)]
            if missing:
                raise ValueError(
                    f"Task data {key or ''} row {row} lacks the column(s) {missing}; expected columns "
                    f"{list(REQUIRED_COLUMNS)} (+ optional 'context')."
                )
            name = str(example.get("task") or key)
            tasks.setdefault(name, []).append(_checked_example(example, name, row))
    return _drop_long_choices(tasks, max_choices)


def as_examples(examples: Any, task: str = "examples") -> list[dict[str, Any]]:
    """One task's examples as validated dicts, from a `datasets.Dataset`, a list of dicts or any sequence of rows.

    Each row needs ``question``, ``choices`` and ``label`` (``context`` optional). Raises a ValueError naming
    the row otherwise, and for no examples at all.
    """
    rows = _rows(examples, what=task)
    for row, example in enumerate(rows):
        missing = [c for c in ("question", "choices", "label") if c not in example]
        if missing:
            raise ValueError(f"{task}: row {row} lacks {missing}; each example needs question, choices and label.")
    return [_checked_example(example, task, row) for row, example in enumerate(rows)]


def _rows(data: Any, what: str) -> list[Mapping[str, Any]]:
    """The rows of a `Dataset` or of any iterable of mappings; a clear error for columns or empty data."""
    if isinstance(data, (str, bytes)) or (isinstance(data, Mapping) and not isinstance(data, Dataset)):
        raise TypeError(
            f"{what}: expected rows (a datasets.Dataset or a list of dicts), got {type(data).__name__}. A dict of "
            "columns becomes rows with datasets.Dataset.from_dict(...)."
        )
    rows = list(data)  # a Dataset iterates its rows as dicts
    if not rows:
        raise ValueError(f"{what} is empty: give it examples or leave it out.")
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, Mapping)), None)
    if bad is not None:
        raise TypeError(f"{what}: row {bad} is a {type(rows[bad]).__name__}, not a dict of columns.")
    return rows


def _checked_example(example: Mapping[str, Any], task: str, row: int) -> dict[str, Any]:
    choices = list(example["choices"] or [])
    label = example["label"]
    if len(choices) < 2:
        raise ValueError(f"Task {task!r}, row {row}: needs at least 2 choices, got {choices!r}.")
    if label is None or isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise ValueError(
            f"Task {task!r}, row {row}: label must be the integer index of the correct choice, got {label!r}."
        )
    if not 0 <= int(label) < len(choices):
        raise ValueError(f"Task {task!r}, row {row}: label {label} is out of range for {len(choices)} choices.")
    return {
        "question": str(example["question"]),
        "choices": [str(c) for c in choices],
        "label": int(label),
        "context": str(example.get("context") or ""),
    }


def _drop_long_choices(tasks: dict[str, list[dict]], max_choices: int) -> dict[str, list[dict]]:
    kept = {}
    for name, examples in tasks.items():
        keep = _max_choices_mask(name, [len(e["choices"]) for e in examples], max_choices)
        short = [e for e, k in zip(examples, keep) if k]
        if short:
            kept[name] = short
        else:
            logger.warning("Task %r: no example left with at most %d choices; task skipped.", name, max_choices)
    return kept


def _max_choices_mask(task: str, num_choices: Sequence[int], max_choices: Optional[int]) -> np.ndarray:
    """Which examples have at most `max_choices` options (all when None); logs how many are dropped.

    The one rule behind every ``max_choices`` argument: `prepare_tasks` and the task loaders of `peft_abmll.assets`.
    """
    counts = np.asarray(num_choices)
    keep = np.ones(len(counts), dtype=bool) if max_choices is None else counts <= max_choices
    if not keep.all():
        dropped = int((~keep).sum())
        logger.warning("Task %r: dropped %d example(s) with more than %d choices.", task, dropped, max_choices)
    return keep


# ----------------------------------------------------------------------------------------------- prompts
def format_question(example: Mapping[str, Any]) -> str:
    """The question block: optional context, ``Question: ...``, ``Choices:`` and ``A) ...`` lines."""
    lines = [example["context"]] if example.get("context") else []
    lines += [f"Question: {example['question']}", "Choices:"]
    lines += [f"{LABELS[i]}) {choice}" for i, choice in enumerate(example["choices"])]
    return "\n".join(lines)


ANSWER_FORMATS = ("letter", "option")
#: The default answer format: the option's own text. On the task screen (docs/benchmarks.md) SmolLM2-135M learns
#: 6 of 8 BIG-bench tasks from their own examples in this format and 1 of the same 8 through option letters.
DEFAULT_ANSWER_FORMAT = "option"


def format_answer(example: Mapping[str, Any], answer_format: str = DEFAULT_ANSWER_FORMAT) -> str:
    """The target text: the option letter (``"B)"``, the paper's) or the option's own text (``"option"``)."""
    if answer_format == "option":
        return str(example["choices"][example["label"]])
    return f"{LABELS[example['label']]})"


def format_prompt(
    example: Mapping[str, Any], shots: Sequence[Mapping[str, Any]] = (), answer_format: str = DEFAULT_ANSWER_FORMAT
) -> str:
    """The paper's prompt, with solved in-context examples (`shots`) from the same task in front."""
    blocks = [INSTRUCTION]
    blocks += [f"{format_question(s)}\nAnswer: {format_answer(s, answer_format)}" for s in shots]
    blocks.append(f"{format_question(example)}\nAnswer:")
    return "\n\n".join(blocks)


def _joined(prompt: list[int], answer: list[int]) -> dict[str, Any]:
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer, "prompt_length": len(prompt)}


@dataclass
class TaskEncoder:
    """Turns examples into token ids with the loss on the answer tokens only.

    Args:
        tokenizer: a transformers tokenizer (the Trainer's `processing_class`).
        max_length: longest sequence; the prompt is cut from the left (in-context examples and
            context go first), the answer never.
        use_chat_template: wrap the prompt as a user turn; ``None`` = when the tokenizer has one.
        answer_format: what the model is trained to answer and scored on: ``"option"`` (the default: the
            option's own text, scored by each option's mean token log-likelihood) or ``"letter"`` (the paper's:
            the option label, e.g. ``B)``, scored by the letters' next-token probabilities). A small model learns
            far more tasks from the option's text (the task screen in docs/benchmarks.md).
    """

    tokenizer: Any
    max_length: int = 512
    use_chat_template: Optional[bool] = None
    answer_format: str = DEFAULT_ANSWER_FORMAT

    def __post_init__(self) -> None:
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format={self.answer_format!r}; choose one of {ANSWER_FORMATS}.")
        if self.use_chat_template is None:
            self.use_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        if self.tokenizer.pad_token_id is None:
            fallback = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
            logger.warning("Tokenizer has no pad token; padding with token id %d (masked out of the loss).", fallback)
            self.pad_token_id = fallback
        else:
            self.pad_token_id = self.tokenizer.pad_token_id

    def prompt_ids(self, example: Mapping[str, Any], shots: Sequence[Mapping[str, Any]] = ()) -> list[int]:
        text = format_prompt(example, shots, self.answer_format)
        if self.use_chat_template:
            return list(
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def answer_ids(self, example: Mapping[str, Any], answer_format: Optional[str] = None) -> list[int]:
        """Token ids of the target (the encoder's `answer_format` unless given), never empty."""
        text = format_answer(example, answer_format or self.answer_format)
        ids = self.tokenizer(text if self.use_chat_template else " " + text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"The answer {text!r} encodes to no token; every option needs some text.")
        return ids

    def label_token_ids(self, num_choices: int) -> list[int]:
        """Token id of each option letter as the first answer token (what letter scoring reads).

        Raises `LetterCollisionError` when two letters share their first token (use option scoring).
        """
        ids = [self.answer_ids({"label": i, "choices": [""] * num_choices}, "letter")[0] for i in range(num_choices)]
        if len(set(ids)) != num_choices:
            raise LetterCollisionError(
                "The tokenizer maps two option labels to the same first token, so letter scoring cannot tell them "
                "apart; use option scoring (scoring='option', or answer_format='option' to train for it)."
            )
        return ids

    def encode_option(
        self, example: Mapping[str, Any], choice: int, shots: Sequence[Mapping[str, Any]] = ()
    ) -> dict[str, Any]:
        """`encode` with option `choice`'s own text as the answer (what option scoring reads)."""
        return self.encode({**example, "label": choice}, shots, answer_format="option")

    def encode_options(
        self, example: Mapping[str, Any], shots: Sequence[Mapping[str, Any]] = ()
    ) -> list[dict[str, Any]]:
        """`encode_option` of every option after one prompt, cut to leave room for the longest option.

        Every option is scored in the same context, and the rows share their prompt tokens (which lets
        option scoring encode the prompt once).
        """
        answers = [self.answer_ids({**example, "label": j}, "option") for j in range(len(example["choices"]))]
        prompt = self._fitted_prompt(example, shots, self.max_length - max(map(len, answers)))
        return [_joined(prompt, answer) for answer in answers]

    def encode(
        self, example: Mapping[str, Any], shots: Sequence[Mapping[str, Any]] = (), answer_format: Optional[str] = None
    ) -> dict[str, Any]:
        """``input_ids`` and ``labels`` (-100 on the prompt), plus ``prompt_length``."""
        answer = self.answer_ids(example, answer_format)
        return _joined(self._fitted_prompt(example, shots, self.max_length - len(answer)), answer)

    def _fitted_prompt(self, example: Mapping[str, Any], shots: Sequence[Mapping[str, Any]], budget: int) -> list[int]:
        """The prompt in at most `budget` tokens: in-context examples dropped first, then cut from the left."""
        prompt = self.prompt_ids(example, shots)
        while shots and len(prompt) > budget:
            shots = shots[1:]
            prompt = self.prompt_ids(example, shots)
        if budget < 1:
            raise ValueError(f"max_length={self.max_length} leaves no room for a prompt before the answer.")
        return prompt[-budget:]

    def collate(self, encoded: Sequence[Mapping[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Right-pad a list of `encode` outputs into a batch of tensors."""
        width = max(len(e["input_ids"]) for e in encoded)
        ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def batch(
        self,
        examples: Sequence[Mapping[str, Any]],
        pool: Sequence[Mapping[str, Any]] = (),
        num_shots: int = 0,
        rng: Optional[np.random.Generator] = None,
    ) -> dict[str, torch.Tensor]:
        """Encode and collate `examples`, each with `num_shots` solved examples drawn from `pool`."""
        rng = rng or np.random.default_rng(0)
        encoded = [self.encode(e, _draw_shots(pool, e, num_shots, rng)) for e in examples]
        return self.collate(encoded)


def _draw_shots(pool: Sequence[Mapping], example: Mapping, k: int, rng: np.random.Generator) -> list[Mapping]:
    candidates = [p for p in pool if p is not example]
    if k <= 0 or not candidates:
        return []
    picks = rng.choice(len(candidates), size=min(k, len(candidates)), replace=False)
    return [candidates[i] for i in picks]


# ----------------------------------------------------------------------------------------------- episodes
class EpisodeSampler(torch.utils.data.Sampler[int]):
    """Yields one episode code per task per epoch, tasks shuffled per epoch (seeded).

    The code ``epoch * num_tasks + task`` makes each episode a pure function of (seed, epoch, task),
    so resumed and distributed runs see exactly the same episodes. Under N processes accelerate's
    ``BatchSamplerShard`` (batch size 1) gives process ``p`` the positions ``p, p + N, p + 2N, ...`` of
    this order, so one update of N processes with G tasks each covers the same consecutive episodes as
    one process with ``gradient_accumulation_steps = N * G``.
    """

    def __init__(self, num_tasks: int, seed: int = 0) -> None:
        self.num_tasks = num_tasks
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_tasks

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_tasks)
        return iter(int(self.epoch * self.num_tasks + t) for t in order)


class EpisodeDataset(torch.utils.data.Dataset):
    """Episodes of a task family: per task, K support batches (+ Q query batches) of distinct examples.

    Tasks with fewer examples than one episode needs are skipped with a warning.

    Args:
        tasks: output of `prepare_tasks`.
        encoder: the `TaskEncoder`.
        support_batches: K, the support batches per episode (paper: 5).
        query_batches: Q, the query batches per episode (paper: 0).
        batch_size: examples per batch (paper: 2).
        num_shots: solved in-context examples in front of every prompt (drawn from the same task).
        seed: base seed of the example draws.

    An episode is ``{"task", "code", "support", "query"}``; ``code`` lets the trainer seed the
    episode's training noise from (seed, code) as well.
    """

    def __init__(
        self,
        tasks: Mapping[str, list[dict]],
        encoder: TaskEncoder,
        support_batches: int = 5,
        query_batches: int = 0,
        batch_size: int = 2,
        num_shots: int = 0,
        seed: int = 0,
    ) -> None:
        self.encoder = encoder
        self.support_batches, self.query_batches, self.batch_size = support_batches, query_batches, batch_size
        self.num_shots, self.seed = num_shots, seed
        need = (support_batches + query_batches) * batch_size
        self.tasks = {n: ex for n, ex in tasks.items() if len(ex) >= need}
        for name in sorted(set(tasks) - set(self.tasks)):
            logger.warning("Task %r has %d examples but an episode needs %d; skipped.", name, len(tasks[name]), need)
        if not self.tasks:
            raise ValueError(
                f"No task has the {need} examples an episode needs "
                f"(({support_batches} support + {query_batches} query batches) x batch {batch_size})."
            )
        self.names = sorted(self.tasks)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, code: int) -> dict[str, Any]:
        epoch, index = divmod(int(code), len(self.names))
        name = self.names[index]
        examples = self.tasks[name]
        rng = np.random.default_rng([self.seed, epoch, index])
        picks = rng.choice(
            len(examples), size=(self.support_batches + self.query_batches) * self.batch_size, replace=False
        )
        batches = [
            self.encoder.batch(
                [examples[i] for i in picks[b * self.batch_size : (b + 1) * self.batch_size]],
                examples,
                self.num_shots,
                rng,
            )
            for b in range(self.support_batches + self.query_batches)
        ]
        return {
            "task": name,
            "code": int(code),
            "support": batches[: self.support_batches],
            "query": batches[self.support_batches :],
        }


def unwrap_episode(items: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader collate for batch size 1: the episode itself."""
    if len(items) != 1:
        raise ValueError(f"Episodes are loaded one at a time, got a batch of {len(items)}.")
    return items[0]


# ----------------------------------------------------------------------------------------------- randomness
def derive_seed(*words: int) -> int:
    """A 63-bit seed that is a pure function of `words` (numpy's `SeedSequence` hashing; non-negative ints)."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


@contextlib.contextmanager
def seeded_torch_rng(*words: int) -> Iterator[None]:
    """Run the block with torch's RNG seeded from `words` (`derive_seed`), restoring the caller's RNG after.

    Makes a block's randomness (training noise, dropout) a function of `words` alone, independent of
    what ran before it in this process: one process running episodes a, b in turn and two processes
    running a and b in parallel draw the same noise for each. The CPU generator and the current CUDA
    device's are forked and restored.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(*words))
        yield
