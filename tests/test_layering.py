"""Imports run one way: foundation -> tuner -> core -> adaptation -> trainer -> experiment -> CLI.

docs/architecture.md draws the same layers. A module may import its own layer or any layer below, never one
above, at module level or inside a function; the package facades (``__init__``) are exempt, since they only
name what loads lazily. Within the package the module graph has no cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peft_abmll"

#: Lowest first. Patterns are module names relative to the package.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["_lazy", "_version", "peft_type", "bayes", "fused", "global_update", "metrics", "tables"]),
    ("data", ["data", "files"]),
    ("assets", ["assets", "assets.*", "synthetic"]),
    ("tuner", ["tuner", "tuner.*", "pickle_policy", "registration", "export", "hub"]),
    ("core", ["algorithms"]),
    ("adaptation", ["adaptation", "evaluation"]),
    ("trainer", ["meta", "meta.*", "baselines", "plain_trainer"]),
    ("experiment", ["experiment"]),
    ("cli", ["cli", "integrations", "integrations.*"]),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _layer(module: str) -> int:
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch(module, pattern) for pattern in patterns):
            return rank
    raise AssertionError(f"peft_abmll.{module} is in no layer: add it to LAYERS and to docs/architecture.md")


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(module: str, path: Path) -> set[str]:
    """Package modules `module` imports (relative or absolute, anywhere but under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    known = _modules()
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                stem = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "peft_abmll":
                stem = node.module.split(".")[1:]
            else:
                stem = None
            if stem is not None:
                for alias in node.names:  # `from . import bayes` names a module; `from .x import f` a name in x
                    candidate = ".".join([*stem, alias.name])
                    found.add(candidate if candidate in known else ".".join(stem))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "peft_abmll":
                    found.add(".".join(alias.name.split(".")[1:]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m and m != module}


def _graph() -> dict[str, set[str]]:
    return {name: _imports(name, path) for name, path in _modules().items() if name}


def test_every_module_has_a_layer() -> None:
    for name in _modules():
        if name:
            _layer(name)


def test_imports_never_go_up_a_layer() -> None:
    upward = [
        f"peft_abmll.{module} ({LAYERS[_layer(module)][0]}) imports peft_abmll.{target} ({LAYERS[_layer(target)][0]})"
        for module, targets in _graph().items()
        if _modules()[module].name != "__init__.py"
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_the_module_graph_has_no_cycle() -> None:
    graph = {m: {t for t in targets if t in _modules()} for m, targets in _graph().items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in graph.get(node, ()):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(target) :], target]))
            if target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch) -> None:
    """Control: a tuner module that imported the trainer would be reported."""
    fake = tmp_path / "peft_abmll"
    (fake / "tuner").mkdir(parents=True)
    (fake / "meta").mkdir()
    (fake / "tuner" / "layer.py").write_text("def f():\n    from ..meta.trainer import MetaTrainer\n")
    (fake / "meta" / "trainer.py").write_text("from ..tuner.layer import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match=r"tuner.layer \(tuner\) imports peft_abmll.meta.trainer"):
        test_imports_never_go_up_a_layer()
    with pytest.raises(AssertionError, match="import cycle"):
        test_the_module_graph_has_no_cycle()


def test_importing_the_tuner_does_not_import_the_trainer() -> None:
    code = (
        "import sys, peft_abmll.tuner, peft_abmll.algorithms\n"
        "heavy = [m for m in ('transformers.trainer', 'peft_abmll.meta.trainer', 'peft_abmll.adaptation') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import peft_abmll\n"
        "assert peft_abmll.MetaTrainer.__module__ == 'peft_abmll.meta.trainer'\n"
        "assert 'transformers.trainer' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names_all_resolve() -> None:
    import peft_abmll
    import peft_abmll.meta

    for package in (peft_abmll, peft_abmll.meta):
        for name in package.__all__:
            assert getattr(package, name) is not None
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            package.nope  # noqa: B018
    assert set(peft_abmll._EXPORTS) <= set(peft_abmll.__all__)
