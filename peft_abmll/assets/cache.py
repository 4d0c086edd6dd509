"""Where real assets are cached.

``cache_root()`` is ``$ABMLL_CACHE`` if set, else ``$XDG_CACHE_HOME/peft-abmll``, else ``~/.cache/peft-abmll``.
Entries are written with `peft_abmll.files.atomic_dir` (finished ones carry its marker).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache root directory (not created)."""
    if os.environ.get("ABMLL_CACHE"):
        return Path(os.environ["ABMLL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "peft-abmll"
