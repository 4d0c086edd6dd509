"""The ABMLL PEFT type: a string enum of our own, since PEFT's `PeftType` is closed."""

from __future__ import annotations

import enum


class ABMLLPeftType(str, enum.Enum):
    """PEFT type of ABMLL adapters; compares and hashes like the string ``"ABMLL"`` in ``adapter_config.json``."""

    ABMLL = "ABMLL"

    def __str__(self) -> str:
        return self.value


PREFIX = "abmll_"
