"""The package's import rules: lower layers never import upward (checked on every import statement,
function-level ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "orbit_core"


def imported_modules(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(ROOT.parent))] = names
    return found


@pytest.mark.parametrize("package, forbidden", [
    ("rollout", "orbit_core.train"),
    ("models", "orbit_core.quant"),
    ("models", "orbit_core.train"),
    ("policy", "orbit_core.train"),
    ("data", "orbit_core.policy"),
    ("rl", "orbit_core.train"),
])
def test_lower_layers_do_not_import_upward(package, forbidden):
    offenders = {file: sorted(m for m in names if m == forbidden or m.startswith(forbidden + "."))
                 for file, names in imported_modules(package).items()}
    assert not {f: m for f, m in offenders.items() if m}, f"{package} imports {forbidden}"


def test_the_rule_checker_sees_function_level_imports():
    # train/loop.py imports orbit_core.policy at module level; remote_setup imports rollout
    train = imported_modules("train")
    assert "orbit_core.policy.build" in train["orbit_core/train/loop.py"]
    assert any("orbit_core.train.remote_setup" in names for names in train.values())
