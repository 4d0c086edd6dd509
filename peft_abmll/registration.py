"""Make PEFT aware of ABMLL: fill PEFT's type-to-class tables (idempotent, never overwriting others)."""

from __future__ import annotations

import functools
import warnings
from typing import Any, cast

from .hub import write_model_card
from .peft_type import PREFIX, ABMLLPeftType
from .pickle_policy import install_pickle_guard
from .tuner.config import ABMLLConfig
from .tuner.model import ABMLLModel


def register() -> None:
    """Register ABMLL with PEFT so `get_peft_model`, `PeftModel.from_pretrained` & co. know it.

    PEFT's own `register_peft_method` only accepts members of its closed `PeftType` enum, so this
    fills the same mapping tables with our own str-enum key. Safe to call any number of times;
    raises `RuntimeError` if another package registered a different method under ``"ABMLL"``.
    Also installs the pickle guard of `peft_abmll.pickle_policy`: pickle-based ABMLL adapter files are refused
    unless the user opts in.
    """
    from peft import mapping

    key = ABMLLPeftType.ABMLL
    # typed dict[PeftType, ...]: our key is a str enum of our own, which PEFT's lookups accept
    tables: tuple[tuple[dict[Any, Any], type | str], ...] = (
        (cast(dict[Any, Any], mapping.PEFT_TYPE_TO_CONFIG_MAPPING), ABMLLConfig),
        (cast(dict[Any, Any], mapping.PEFT_TYPE_TO_TUNER_MAPPING), ABMLLModel),
        (cast(dict[Any, Any], mapping.PEFT_TYPE_TO_PREFIX_MAPPING), PREFIX),
    )
    for table, value in tables:
        existing = table.get(key)
        if existing is not None and existing is not value and _qualname(existing) != _qualname(value):
            raise RuntimeError(
                f"PEFT already has a method registered as {key.value!r} ({existing!r}); peft_abmll cannot register "
                "over it. Uninstall the other plugin or import peft_abmll first."
            )
    for table, value in tables:
        table[key] = value
    install_pickle_guard()
    install_model_card_writer()
    check_transformers_peft_versions()


def install_model_card_writer() -> bool:
    """Make every ``PeftModel.save_pretrained`` of an ABMLL adapter write the ABMLL model card (idempotent).

    PEFT's own card is a blank template; a folder saved by ``save_pretrained``, ``Trainer.save_model`` or the
    CLI and uploaded with the Hub's own tools then shows what the adapter is and how to load it.
    """
    from peft import PeftModel

    current = PeftModel.create_or_update_model_card
    if getattr(current, "_abmll", False):
        return True

    @functools.wraps(current)
    def create_or_update_model_card(self: Any, output_dir: str) -> None:
        if any(isinstance(c, ABMLLConfig) for c in getattr(self, "peft_config", {}).values()):
            try:
                write_model_card(self, output_dir)
                return
            except Exception as error:  # a card must never cost the user their save
                warnings.warn(f"Could not write the ABMLL model card ({error!r}); PEFT's is written.", stacklevel=2)
        current(self, output_dir)

    create_or_update_model_card._abmll = True  # type: ignore[attr-defined]
    PeftModel.create_or_update_model_card = create_or_update_model_card  # type: ignore[method-assign]
    return True


def check_transformers_peft_versions() -> bool:
    """Warn (and return False) if the installed transformers refuses the installed peft in its PEFT integration.

    transformers' ``load_adapter`` / ``add_adapter`` / loading an adapter folder with ``from_pretrained`` check a
    minimum peft version of their own (transformers 5.24 asks for peft 0.22); with an older peft those calls fail
    for every adapter type, ABMLL included, while ``peft.PeftModel`` keeps working.
    """
    try:
        import peft
        from packaging.version import Version
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:
        return True
    if Version(peft.__version__) >= Version(MIN_PEFT_VERSION):
        return True
    import transformers

    warnings.warn(
        f"transformers {transformers.__version__} needs peft >= {MIN_PEFT_VERSION} for its own adapter methods "
        f"(model.load_adapter, add_adapter, from_pretrained on an adapter folder); peft {peft.__version__} is "
        "installed. peft's API (PeftModel.from_pretrained, get_peft_model) works; for the transformers methods "
        f"upgrade peft, or install a transformers release that accepts peft {peft.__version__}.",
        UserWarning,
        stacklevel=2,
    )
    return False


def _qualname(obj: type | str) -> str:
    return obj if isinstance(obj, str) else f"{obj.__module__}.{obj.__qualname__}"
