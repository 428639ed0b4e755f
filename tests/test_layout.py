"""The package's shape: no module over 600 lines, each opening with a docstring saying what it
does, and no exec of code held in strings (the exported script's sources load through importlib)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lmcore"
MAX_LINES = 600


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_over_600_lines_and_each_has_a_docstring():
    mods = _modules()
    assert len(mods) > 20
    too_long = {str(p.relative_to(PKG)): n for p in mods if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not too_long, too_long
    undocumented = [str(p.relative_to(PKG)) for p in mods
                    if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not undocumented, undocumented


def test_no_exec_of_source_strings():
    calls = []
    for p in _modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("exec", "eval"):
                calls.append(f"{p.relative_to(PKG)}:{node.lineno}")
    assert not calls, calls
