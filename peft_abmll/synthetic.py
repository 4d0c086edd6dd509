"""Generated task families whose answer is known, with a tiny offline tokenizer and model to learn them.

For checking that a learning algorithm learns what the data says, in seconds and without a download: the
tests, ``benchmarks/samples.py`` and anyone who wants to see what meta-learning recovers use them.

- `task_family(rule="first")`: every task's answer is the first listed option, a *shared offset* the
  global adapter should learn (with ``answer_format="letter"`` the same target, ``A)``, in every example);
  `rule="task"`: task ``t`` answers option ``t mod 3``, the same questions
  with solutions far apart (a *wide* family).
- ``label_noise=p``: each label is replaced by a uniformly drawn option with probability ``p``, so the
  best calibrated prediction is known: ``1 - p + p / 3`` on the rule's option, ``p / 3`` on the others.
"""

from __future__ import annotations

import random

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = [
    "return",
    "the",
    "label",
    "of",
    "correct",
    "answer",
    "for",
    "question",
    "below",
    "choices",
    "is",
    "a",
    "an",
    "x",
    "y",
    "z",
    "red",
    "blue",
    "green",
    "black",
    "white",
    "cat",
    "dog",
    "fish",
    "bird",
    "cow",
    "sun",
    "moon",
    "star",
    "tree",
    "rock",
    "one",
    "two",
    "three",
    "four",
    "five",
    "yes",
    "no",
    "true",
    "false",
]


def best_probabilities(label_noise: float, num_choices: int = 3) -> list[float]:
    """The calibrated prediction for a family with `label_noise`: rule's option first, then the others."""
    other = label_noise / num_choices
    return [1.0 - label_noise + other] + [other] * (num_choices - 1)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over letters, digits, punctuation and a small word list (no download)."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for token in [*"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.,:;!?()", *WORDS]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def tiny_lm(
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    initializer_range: float = 0.02,
) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama over `tokenizer`'s vocabulary (weights drawn from `seed`).

    With transformers' default ``initializer_range`` (0.02) the output head's rows are so small that no
    adapter on the attention projections can make a letter much more likely than another (the top
    probability over three options stays near 0.5); a larger range lets the model become confident.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        initializer_range=initializer_range,
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def task_family(
    num_tasks: int, per_task: int, seed: int = 0, prefix: str = "t", rule: str = "first", label_noise: float = 0.0
) -> Dataset:
    """Tasks in the package's task format whose correct option follows `rule` (see the module docstring).

    Returns:
        A `datasets.Dataset` with columns ``task``, ``question``, ``choices`` (3 colours), ``label``.
    """
    if rule not in ("first", "task"):
        raise ValueError(f"rule must be 'first' or 'task', got {rule!r}.")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be a probability in [0, 1], got {label_noise}.")
    rng = random.Random(seed)
    nouns = ["cat", "dog", "fish", "bird", "cow", "sun", "moon", "star", "tree", "rock"]
    colours = ["red", "blue", "green", "black", "white"]
    rows = []
    for t in range(num_tasks):
        for _ in range(per_task):
            choices = rng.sample(colours, 3)
            label = 0 if rule == "first" else t % 3
            if label_noise and rng.random() < label_noise:  # no draw without noise: same data as before
                label = rng.randrange(3)
            rows.append(
                {"task": f"{prefix}{t}", "question": f"{rng.choice(nouns)} is", "choices": choices, "label": label}
            )
    return Dataset.from_list(rows)
