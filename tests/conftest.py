"""Shared fixtures: the tiny models of ``_models.py`` (fresh per test) and their inputs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the Hub; set before transformers is imported
# Nor PyPI: an asset fetch that a test did not point at its own fake index is refused at once (port 9: discard).
os.environ["PEFT_ABMLL_INDEX_URL"] = "http://127.0.0.1:9/simple"

from typing import Any

import pytest
import torch
from _models import VOCAB, make_inputs, tiny_gpt2, tiny_llama, tiny_qwen2
from transformers import PreTrainedModel

# The tiny models are dominated by per-op overhead: one thread is much faster than two on a shared machine.
torch.set_num_threads(1)


@pytest.fixture(name="tiny_llama")
def _tiny_llama() -> PreTrainedModel:
    return tiny_llama()


@pytest.fixture(name="tiny_qwen2")
def _tiny_qwen2() -> PreTrainedModel:
    return tiny_qwen2()


@pytest.fixture(name="tiny_gpt2")
def _tiny_gpt2() -> PreTrainedModel:
    return tiny_gpt2()


@pytest.fixture(name="inputs")
def _inputs() -> dict[str, torch.Tensor]:
    return make_inputs(VOCAB)


@pytest.fixture(name="tok", scope="session")
def _tok() -> Any:
    """The offline word-level tokenizer of the meta-learning tests (tests/_tasks.py)."""
    from _tasks import tiny_tokenizer

    return tiny_tokenizer()
