"""Tiny offline tokenizer and generated multiple-choice task families for the meta-learning tests."""

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


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over letters, digits, punctuation and a small word list (no download)."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for token in [*"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.,:;!?()", *WORDS]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def tiny_lm(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
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


def task_family(num_tasks: int, per_task: int, seed: int = 0, prefix: str = "t", rule: str = "first") -> Dataset:
    """Tasks sharing one rule: the correct option is the first listed ('first') or task-dependent ('task')."""
    rng = random.Random(seed)
    nouns = ["cat", "dog", "fish", "bird", "cow", "sun", "moon", "star", "tree", "rock"]
    colours = ["red", "blue", "green", "black", "white"]
    rows = []
    for t in range(num_tasks):
        for _ in range(per_task):
            choices = rng.sample(colours, 3)
            label = 0 if rule == "first" else t % 3
            rows.append(
                {"task": f"{prefix}{t}", "question": f"{rng.choice(nouns)} is", "choices": choices, "label": label}
            )
    return Dataset.from_list(rows)
