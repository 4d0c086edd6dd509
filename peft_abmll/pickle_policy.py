"""Untrusted files: ABMLL adapters load through safetensors; pickle-based ones need an explicit opt-in.

PEFT reads an adapter's weights from ``adapter_model.safetensors`` and, when a folder has none, falls
back to the pickle file ``adapter_model.bin`` (``torch.load(weights_only=True)``). For ABMLL adapters
`peft_abmll` refuses that fallback unless the user opts in, either for a block of code::

    from peft_abmll import allow_pickle

    with allow_pickle():
        model = PeftModel.from_pretrained(base, "old-adapter-folder")

or process-wide with the environment variable ``PEFT_ABMLL_ALLOW_PICKLE=1``. Even then the file is
read with ``torch.load(weights_only=True)`` (PEFT's choice, torch's default since 2.6): its restricted
unpickler builds tensors and plain containers only and refuses anything that would run code.

The check sits on PEFT's one pickle reader (``peft.utils.save_and_load.torch_load``, wrapped by
`install_pickle_guard`, which ``import peft_abmll`` calls), so it covers every loader that goes through
PEFT: ``PeftModel.from_pretrained`` / ``load_adapter``, ``AutoPeftModel*``, transformers'
``model.load_adapter`` and Trainer resume. It only applies to folders whose ``adapter_config.json``
says ``"peft_type": "ABMLL"``; other PEFT methods keep PEFT's behaviour.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Optional

from .peft_type import ABMLLPeftType

__all__ = [
    "ALLOW_PICKLE_ENV",
    "PickleRefusedError",
    "allow_pickle",
    "install_pickle_guard",
    "pickle_allowed",
]

#: Environment variable that, set to ``1`` / ``true`` / ``yes``, allows pickle-based ABMLL adapters process-wide.
ALLOW_PICKLE_ENV = "PEFT_ABMLL_ALLOW_PICKLE"
CONFIG_NAME = "adapter_config.json"

_allowed: ContextVar[bool] = ContextVar("peft_abmll_allow_pickle", default=False)
_installed: Optional[Callable[..., Any]] = None


class PickleRefusedError(ValueError):
    """A pickle-based ABMLL file was about to be loaded without the user's explicit opt-in."""


def pickle_allowed() -> bool:
    """Whether pickle-based ABMLL adapters may load here (inside `allow_pickle`, or ``PEFT_ABMLL_ALLOW_PICKLE=1``)."""
    return _allowed.get() or os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def allow_pickle() -> Iterator[None]:
    """Allow pickle-based ABMLL adapter files inside the block (still read with ``weights_only=True``)."""
    token = _allowed.set(True)
    try:
        yield
    finally:
        _allowed.reset(token)


def _is_abmll_adapter_file(filename: str | os.PathLike) -> bool:
    """Whether ``filename`` sits next to an ``adapter_config.json`` of an ABMLL adapter."""
    config = Path(filename).with_name(CONFIG_NAME)
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("peft_type") == ABMLLPeftType.ABMLL.value


def check_pickle_allowed(filename: str | os.PathLike) -> None:
    """Raise `PickleRefusedError` if ``filename`` is a pickle of an ABMLL adapter and no opt-in is active."""
    if _is_abmll_adapter_file(filename) and not pickle_allowed():
        raise PickleRefusedError(
            f"Refusing to load the pickle-based ABMLL adapter weights {os.fspath(filename)!r}: the folder has no "
            "adapter_model.safetensors, and pickle files can carry code. Re-save the adapter with safetensors "
            "(`model.save_pretrained(path)`, PEFT's default). If you trust this file, opt in explicitly with "
            f"`with peft_abmll.allow_pickle(): ...` or {ALLOW_PICKLE_ENV}=1 (it is then read with "
            "torch.load(weights_only=True))."
        )


def install_pickle_guard() -> bool:
    """Wrap PEFT's pickle reader with `check_pickle_allowed` (idempotent). False if this PEFT has no such reader."""
    global _installed
    from peft.utils import save_and_load

    current = getattr(save_and_load, "torch_load", None)
    if current is None:
        return False
    if current is _installed:
        return True
    original = current

    @functools.wraps(original)
    def guarded_torch_load(*args: Any, **kwargs: Any) -> Any:
        filename = args[0] if args else kwargs.get("f")
        if isinstance(filename, (str, os.PathLike)):
            check_pickle_allowed(filename)
        return original(*args, **kwargs)

    save_and_load.torch_load = guarded_torch_load
    _installed = guarded_torch_load
    return True
