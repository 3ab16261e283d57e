"""The serving core (``server/core``) knows nothing of the wire: no API layer, no frames, no
close codes, no web framework. Only the API layer (``server/api``, ``server/app.py``) speaks it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "server" / "core"
# What no core module may import: the API layer and the web stack. (msgpack is allowed: the
# snapshot store encodes its records with it, which is storage, not the wire.)
FORBIDDEN = ("evssm.server.api", "fastapi", "starlette", "websockets", "uvicorn", "httpx")
# The one name of the contract module the core may use: the order of classes in an answer, a fact
# of the model's output that the runner computes once per step (no frame, code or close code).
WIRE = "evssm.models.wire"
WIRE_ALLOWED = {"class_order"}


def _imports(path: Path) -> list[tuple[str, set[str]]]:
    """(absolute module, names taken from it) of every import in ``path``, wherever it is
    (inside functions and ``TYPE_CHECKING`` blocks too)."""
    package = "evssm." + ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out: list[tuple[str, set[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, set()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names = {alias.name for alias in node.names}
            # ``from . import x`` imports the module x
            out += [(f"{base}.{n}", set()) for n in names] if not node.module else [(base, names)]
    return out


def _core_modules() -> list[Path]:
    return sorted(CORE.glob("*.py"))


def test_the_core_has_modules() -> None:
    names = {p.stem for p in _core_modules()}
    assert {"engine", "scheduler", "sessions", "staging", "plan", "runner", "durability", "outputs"} <= names


@pytest.mark.parametrize("path", _core_modules(), ids=lambda p: p.name)
def test_a_core_module_imports_nothing_of_the_wire(path: Path) -> None:
    for module, names in _imports(path):
        bad = [f for f in FORBIDDEN if module == f or module.startswith(f + ".")]
        assert not bad, f"{path.name} imports {module}"
        if module == WIRE or module.startswith(WIRE + "."):
            assert names and names <= WIRE_ALLOWED, f"{path.name} imports {sorted(names) or module} of the wire"
        if module.startswith("evssm.server.") and not module.startswith("evssm.server.core"):
            # Outside the core, only the shared settings and metrics (neither speaks the wire).
            assert module in ("evssm.server.settings", "evssm.server.metrics"), f"{path.name} imports {module}"


def test_the_import_walker_sees_relative_and_nested_imports(tmp_path: Path) -> None:
    """The check above would pass vacuously if the walker missed imports: feed it some."""
    fake = CORE / "engine.py"
    found = dict(_imports(fake))
    assert "evssm.server.core.scheduler" in found and "evssm.server.metrics" in found
    assert "evssm.server.core.runner" in found  # imported inside a function


def test_shared_modules_the_core_uses_import_nothing_of_the_api() -> None:
    for name in ("settings.py", "metrics.py"):
        for module, _ in _imports(ROOT / "server" / name):
            assert not any(module == f or module.startswith(f + ".") for f in FORBIDDEN), f"{name}: {module}"
