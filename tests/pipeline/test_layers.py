"""``pipeline/`` is layered: each subpackage imports only the shared modules and the layers below it.

From the bottom: the shared modules (errors, paths, console, fingerprint, signals, machine, locks), config, training,
orchestration, tracking, backends, commands, and the CLI on top; ``sweeps`` sits beside the commands.
Lazy imports inside functions count too: they are found by walking each file's whole syntax tree.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = {"errors", "paths", "console", "fingerprint", "signals", "machine", "locks"}
LAYERS = ["config", "training", "orchestration", "tracking", "backends", "commands", "cli"]


def _layer(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts  # ("pipeline", "training", "engine"), ("pipeline", "cli")
    return "commands" if parts[0] == "sweeps" else parts[1]


def _imported_layers(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names] * (node.module == "pipeline")
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {name.split(".")[1] for name in names if name.startswith("pipeline.")}
    return found


def test_no_import_runs_up_a_layer():
    sources = [p for p in [*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "sweeps").rglob("*.py")]
               if p.name not in ("__init__.py", "__main__.py")]  # fmt: skip
    assert len(sources) > 20
    upward = []
    for path in sources:
        layer = _layer(path)
        if layer in SHARED:
            allowed = SHARED
        else:
            allowed = SHARED | set(LAYERS[: LAYERS.index(layer) + 1])
        if layer == "commands":
            allowed = allowed | {"commands"}
        upward += [f"{path.relative_to(ROOT)} imports pipeline.{name}" for name in _imported_layers(path) - allowed]
    assert not upward, upward


def test_the_shared_modules_import_only_each_other():
    for name in SHARED:
        assert _imported_layers(ROOT / "pipeline" / f"{name}.py") <= SHARED, name
