"""The source layout rules a change can break without a failing import: agent and hub never
import each other and shared imports neither (not even through importlib); no product or bench
code finds files by walking up from ``__file__``; no module runs past 400 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"agent": "zk0.agent", "hub": "zk0.hub", "shared": "zk0.shared", "bench": "zk0.bench"}
#: Which zk0 packages each may import (the umbrella ``zk0.cli`` may import all of them).
ALLOWED = {
    "agent": {"zk0.agent", "zk0.shared", "zk0.robot_configs"},
    "hub": {"zk0.hub", "zk0.shared", "zk0.robot_configs"},
    "shared": {"zk0.shared", "zk0.robot_configs"},
    "bench": {"zk0.bench", "zk0.agent", "zk0.hub", "zk0.shared", "zk0.robot_configs"},
}


def _modules(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def _imported(tree: ast.AST) -> set[str]:
    """Every module name an import statement or an ``importlib.import_module("...")`` names."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and ast.unparse(node.func).endswith("import_module")
        ):
            names.add(node.args[0].value)
    return names


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_each_side_imports_only_what_it_may(folder: str) -> None:
    wrong = []
    for path in _modules(folder):
        for name in _imported(ast.parse(path.read_text())):
            top = ".".join(name.split(".")[:2])
            if name.startswith("zk0.") and top not in ALLOWED[folder]:
                wrong.append(f"{path.relative_to(REPO)}: {name}")
    assert wrong == []


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_no_code_walks_up_from_its_own_file(folder: str) -> None:
    walking = re.compile(r"__file__.*parents?\b|parents\[\d+\]")
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in _modules(folder)
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if walking.search(line) and "__file__" in line
    ]
    assert found == []


def test_no_module_is_over_400_lines() -> None:
    long = {
        str(path.relative_to(REPO)): count
        for folder in (*PACKAGES, "cli")
        for path in _modules(folder)
        if (count := len(path.read_text().splitlines())) > 400
    }
    assert long == {}
