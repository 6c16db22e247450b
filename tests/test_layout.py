"""The house rules, checked on the source: imports point down, modules and functions stay small.

Layers, top to bottom: ``cli`` -> ``demo`` (which runs the whole chain) -> one package per command
(``train``, ``predict``, ``evaluate``, ``benchmark``) -> core (``data``, ``models``, ``inference``, ``labels``, ``losses``,
``metrics``, ``augment``, ``checkpoint``, ``viz``) -> base (``errors``, ``log``, ``files``,
``devices``, ``options``) -> ``errors``. A module may import its own layer's modules only inside its
package (core modules may use each other); no command imports another command.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mriseg"
LAYERS = {
    "__main__": 5, "cli": 4,
    "demo": 3,  # the whole chain on synthetic data: it calls every command's function
    "train": 2, "predict": 2, "evaluate": 2, "benchmark": 2, "convert": 2,
    "data": 1, "models": 1, "inference": 1, "labels": 1, "losses": 1, "metrics": 1, "augment": 1,
    "checkpoint": 1, "viz": 1,
    "log": 0, "files": 0, "devices": 0, "options": 0, "__init__": 0,
    "errors": -1,
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def top(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imported_tops(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mriseg"):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("mriseg.") and "." in alias.name)
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    own = top(path)
    for other in imported_tops(path) - {own, "__version__"}:
        assert other in LAYERS, f"{path.name} imports mriseg.{other}, which has no layer"
        mine, theirs = LAYERS[own], LAYERS[other]
        assert theirs < mine or (theirs == mine == 1), (
            f"{path.relative_to(PACKAGE)} (layer {mine}) imports mriseg.{other} (layer {theirs})")


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_small(path):
    lines = path.read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(PACKAGE)}: {lines} lines"


def function_bodies(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            # a Typer command's option signature does not count: measure from the first body line
            yield node.name, node.body[0].lineno, node.end_lineno - node.body[0].lineno + 1


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_are_short(path):
    long = [f"{name} (line {line}): {length} lines" for name, line, length in function_bodies(path)
            if length > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(PACKAGE)}: {long}"
