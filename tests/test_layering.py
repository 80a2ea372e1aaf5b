"""The import rules of the developers' brief, checked on the source (no imports executed).

Layers (imports point down only, see shared/docs/architecture.md):
0 config · 1 algorithms, data, models, metrics, devices · 2 training, dp, privacy, checkpoint ·
3 simulation, flower (never each other), evaluation, audit · 4 cli (imported by nobody).
``flwr`` only under ``fedfew_med/flower/``; ``opacus`` only in the DP module;
algorithms are pure torch (no I/O libraries, no higher layers).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedfew_med"

LAYER = {
    "config": 0,
    "site_config": 0,
    "algorithms": 1,
    "data": 1,
    "models": 1,
    "metrics": 1,
    "devices": 1,
    "training": 2,
    "dp": 2,
    "audit": 3,
    "checkpoint": 2,
    "runtime": 2,
    "deployment": 2,
    "rundir": 2,
    "privacy": 2,
    "simulation": 3,
    "site_pool": 3,
    "flower": 3,
    "evaluation": 3,
    "datasets": 3,
    "cli": 4,
}
ALGORITHMS_MAY_IMPORT = {"torch", "numpy", "math", "abc", "collections", "dataclasses", "typing", "__future__"}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def top(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            if node.module == "fedfew_med":
                out += [f"fedfew_med.{a.name}" for a in node.names]
    return out


def internal(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "fedfew_med" and len(parts) > 1 else None


def test_every_module_has_a_layer():
    unknown = {top(p) for p in modules()} - set(LAYER) - {"__init__", "__main__"}
    assert not unknown, f"add these modules to LAYER in {__file__}: {sorted(unknown)}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    me = top(path)
    if me in ("__init__", "__main__"):
        return
    for name in imports(path):
        other = internal(name)
        if other is None or other == me:
            continue
        assert LAYER[other] <= LAYER[me], f"{path.name} (layer {LAYER[me]}) imports {name} (layer {LAYER[other]})"
        assert {me, other} != {"simulation", "flower"}, f"{path.name} imports {name}: simulation and flower stay apart"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_third_party_boundaries(path):
    rel = path.relative_to(PACKAGE)
    for name in imports(path):
        root = name.split(".")[0]
        if root == "flwr":
            assert rel.parts[0] == "flower", f"{rel} imports flwr; only fedfew_med/flower/ may"
        if root == "opacus":
            assert rel.parts[0] in ("dp", "dp.py"), f"{rel} imports opacus; only the DP module may"
        if rel.parts[0] == "algorithms" and not name.startswith("fedfew_med"):
            assert root in ALGORITHMS_MAY_IMPORT, f"{rel} imports {name}; algorithms are pure torch/numpy"
        if rel.parts[0] == "algorithms" and name.startswith("fedfew_med"):
            assert internal(name) in ("algorithms", "config"), f"{rel} imports {name}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_does_not_print(path):
    if top(path) == "cli":
        return
    tree = ast.parse(path.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
    assert not calls, f"{path.name} calls print(); the library logs, the CLI prints"


def test_the_rules_catch_a_violation(tmp_path):
    """The checker itself works: a module that imports upward is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from fedfew_med.simulation import run\nimport flwr\n")
    names = imports(bad)
    assert "fedfew_med.simulation" in names and "flwr" in names
    assert LAYER[internal("fedfew_med.simulation")] > LAYER["training"]
