"""The examples run end to end in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from _models import TESTS_DIR

EXAMPLES = TESTS_DIR.parent / "examples"


@pytest.mark.slow  # a fresh interpreter importing torch, transformers and peft: ~5 s
def test_quickstart_runs() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "eval logits match after save/reload: True" in result.stdout
    change = float(result.stdout.split("after one step: ")[1].split()[0])
    assert change > 0  # the training step moved the adapter away from the identity
