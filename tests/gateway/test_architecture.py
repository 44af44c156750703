"""The layering the design promises, checked on the code itself: tools stay apart from serving, and
adapters never reach up into a front door."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT


def _imports(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def _loaded_after(statement: str, prefix: str) -> list[str]:
    probe = f"import sys; {statement}; print(','.join(sorted(m for m in sys.modules if m.startswith('{prefix}'))))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    return [m for m in result.stdout.strip().split(",") if m]


def test_serving_imports_no_tool() -> None:
    """The composition root and everything it pulls in load without the tools package."""
    assert _loaded_after("import gateway.server", "gateway.tools") == []


def test_the_cli_loads_a_tool_only_when_its_command_runs() -> None:
    loaded = _loaded_after("import gateway.cli", "gateway.tools")
    assert not [
        m
        for m in loaded
        if m.startswith(("gateway.tools.lab", "gateway.tools.convert", "gateway.tools.containers"))
    ]


def test_adapters_import_no_front_door() -> None:
    for path in (ROOT / "adapters").rglob("*.py"):
        leaks = {m for m in _imports(path) if m.startswith("gateway.protocols")}
        assert not leaks, f"{path.relative_to(ROOT)} imports {leaks}: the codec is gateway.codec"


def test_front_doors_reach_backends_only_through_the_data_plane() -> None:
    for path in (ROOT / "gateway" / "protocols").rglob("*.py"):
        leaks = {m for m in _imports(path) if m == "adapters" or m.startswith("adapters.")}
        assert not leaks, f"{path.relative_to(ROOT)} imports {leaks}: front doors call gateway.dataplane"


def test_the_layers_below_the_front_doors_import_none_of_them() -> None:
    below = ("dataplane", "routing", "batching", "cache", "rollouts", "registry", "limits", "outcomes")
    for name in below:
        path = ROOT / "gateway" / f"{name}.py"
        leaks = {m for m in _imports(path) if m.startswith("gateway.protocols")}
        assert not leaks, f"{path.relative_to(ROOT)} imports {leaks}: data flows one way"
