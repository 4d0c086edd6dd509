"""Fast packaging checks: single-sourced version, PEP 561 marker, console script.

The slow check (build the sdist and the wheel, install into a fresh venv, import) is `.ci/package.sh`.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

import peft_abmll

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(peft_abmll.__file__).resolve().parent
DIST_NAME = "peft-abmll"


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_is_single_sourced(pyproject: dict) -> None:
    project = pyproject["project"]
    assert "version" not in project, "the version must live only in peft_abmll/_version.py"
    assert "version" in project.get("dynamic", [])
    dynamic = pyproject["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "peft_abmll._version.__version__"}


def test_version_file_is_the_only_assignment() -> None:
    text = (PACKAGE_DIR / "_version.py").read_text()
    versions = re.findall(r"""^__version__\s*=\s*["']([^"']+)["']\s*$""", text, re.M)
    assert versions == [peft_abmll.__version__], text
    assert re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+(\.?(a|b|rc|dev|post)[0-9]+)*", peft_abmll.__version__)
    assigned = [
        path.relative_to(PACKAGE_DIR)
        for path in PACKAGE_DIR.rglob("*.py")
        if path.name != "_version.py" and re.search(r"^__version__\s*=", path.read_text(), re.M)
    ]
    assert not assigned, f"__version__ assigned outside _version.py: {assigned}"


def test_installed_metadata_matches_the_package_version() -> None:
    # An editable install records the version at install time: reinstall (pip install -e .) after a bump.
    assert importlib.metadata.version(DIST_NAME) == peft_abmll.__version__


def test_py_typed_marker_is_shipped(pyproject: dict) -> None:
    assert (PACKAGE_DIR / "py.typed").is_file()
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["peft_abmll"]
    assert "Typing :: Typed" in pyproject["project"]["classifiers"]


def test_console_script_is_declared(pyproject: dict) -> None:
    assert pyproject["project"]["scripts"]["abmll"] == "peft_abmll.cli:main"
    scripts = importlib.metadata.distribution(DIST_NAME).entry_points.select(group="console_scripts")
    assert {ep.name: ep.value for ep in scripts}.get("abmll") == "peft_abmll.cli:main"


def test_console_script_target_is_callable() -> None:
    (entry_point,) = importlib.metadata.distribution(DIST_NAME).entry_points.select(
        group="console_scripts", name="abmll"
    )
    assert callable(entry_point.load())
