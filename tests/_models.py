"""Tiny, seeded transformers models built from configs (no Hub download) and matching inputs.

Importable as plain functions (``from _models import tiny_llama``); ``conftest.py`` exposes them as fixtures.
Dropout is switched off so train-mode randomness comes from the adapter only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 64


def _build(model_cls: type[PreTrainedModel], config: object, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    return model_cls(config).eval()


def llama_config() -> LlamaConfig:
    """Config of the tiny Llama (2 layers, hidden 32, GQA with 4 heads / 2 KV heads)."""
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A tiny random ``LlamaForCausalLM`` in eval mode, identical for equal seeds."""
    return _build(LlamaForCausalLM, llama_config(), seed)


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """A tiny random ``Qwen2ForCausalLM`` (biased q/k/v projections) in eval mode."""
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return _build(Qwen2ForCausalLM, config, seed)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A tiny random ``GPT2LMHeadModel`` (``Conv1D`` layers, weights stored transposed), dropout off, eval mode."""
    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return _build(GPT2LMHeadModel, config, seed)


def make_inputs(vocab: int = VOCAB, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}`` of shape ``(batch, seq)``, random ids from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}


TESTS_DIR = Path(__file__).resolve().parent


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter (offline, one thread, ``tests/`` importable); raise with stderr on failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
