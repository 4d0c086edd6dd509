"""Fixtures of the PEFT generic-contract tests: never collect the vendored PEFT files, never touch the network."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator

import pytest

# The vendored files are PEFT's full test modules (thousands of tests, many needing the Hub); only the selection in
# test_peft_generic_contract.py runs.
collect_ignore = ["_vendor"]

_real_connect = socket.socket.connect
_attempts: list[object] = []


def _is_local(address: object) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths and the like
        return True
    host = str(address[0])
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _guarded_connect(self: socket.socket, address: object) -> None:
    if not _is_local(address):
        _attempts.append(address)
        raise RuntimeError(f"tests/peft_contract must run offline, but something tried to connect to {address!r}")
    _real_connect(self, address)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tell huggingface_hub / transformers they are offline, refuse any non-loopback connection, and fail the test
    if one was attempted (even when the caller swallowed the error, as PEFT's Hub look-ups do)."""
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _attempts.clear()
    yield
    assert not _attempts, f"network connections attempted: {_attempts}"


@pytest.fixture(autouse=True)
def _allow_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT's checks round-trip adapters through `safe_serialization=False` (pickle) files, which peft_abmll refuses
    for ABMLL adapters unless the user opts in (see docs/robustness.md): these tests are that explicit opt-in."""
    monkeypatch.setenv("PEFT_ABMLL_ALLOW_PICKLE", "1")
