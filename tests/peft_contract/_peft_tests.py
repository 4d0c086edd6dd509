"""Import PEFT's vendored generic tests (tests/peft_contract/_vendor, peft 0.21.2) without their optional extras.

`testing_common.py` does ``from diffusers import StableDiffusionPipeline`` at import time, only to recognise Stable
Diffusion pipelines in `_test_disable_adapter`. diffusers is not a dependency of peft-abmll, so when it is missing a
stand-in class is put in ``sys.modules`` for the duration of the import (and removed afterwards): no object is ever
an instance of it, which is the truth for every model these tests build.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import peft

VENDORED_PEFT_VERSION = "0.21.2"


def _import_vendored() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    stubbed = False
    if "diffusers" not in sys.modules and importlib.util.find_spec("diffusers") is None:
        stub = types.ModuleType("diffusers")
        stub.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})  # type: ignore[attr-defined]
        sys.modules["diffusers"] = stub
        stubbed = True
    try:
        utils = importlib.import_module(f"{__package__}._vendor.testing_utils")
        common = importlib.import_module(f"{__package__}._vendor.testing_common")
        custom = importlib.import_module(f"{__package__}._vendor.test_custom_models")
    except ImportError as error:  # pragma: no cover - only when peft moved on
        raise ImportError(
            f"PEFT's vendored generic tests (peft {VENDORED_PEFT_VERSION}) no longer import with the installed peft "
            f"{peft.__version__}: {error}. Refresh tests/peft_contract/_vendor as described in docs/peft-contract.md."
        ) from error
    finally:
        if stubbed:
            del sys.modules["diffusers"]
    return utils, common, custom


testing_utils, testing_common, test_custom_models = _import_vendored()
