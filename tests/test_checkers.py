"""The checkers' configuration (pyproject.toml) stays meaningful.

``scripts/check`` runs mypy on the ``evssm`` package and ruff on the tree. A configuration that
drifts fails quietly: a folder no longer linked from ``evssm/`` is simply not type-checked, and a
checker that walks both a folder and its link reports every finding twice (mypy refuses outright:
"source file found twice"). These tests ask each checker which files it would check, without
checking them (a fraction of a second each; the checking itself is ``scripts/check``'s).
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The folders that install as evssm.* (through the links in evssm/) and hold Python modules.
PACKAGES = ("server", "client", "models")


def python_files(folder: Path) -> set[Path]:
    """Every ``.py`` file under ``folder`` (resolved), caches aside."""
    return {p.resolve() for p in folder.rglob("*.py") if "__pycache__" not in p.parts}


def twice(paths: list[Path]) -> list[Path]:
    return sorted(p for p, n in Counter(paths).items() if n > 1)


def test_mypy_checks_every_module_once_as_the_evssm_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from mypy.main import process_options

    monkeypatch.chdir(ROOT)
    sources, options = process_options(["--config-file", str(ROOT / "pyproject.toml")])
    assert options.packages == ["evssm"]
    files = [Path(s.path).resolve() for s in sources if s.path is not None]
    assert len(files) == len(sources), "every source is a file"
    assert not twice(files), f"mypy would check these twice: {twice(files)}"
    modules = [s.module for s in sources]
    assert all(m == "evssm" or m.startswith("evssm.") for m in modules), modules
    assert len(set(modules)) == len(modules)
    want = set().union(*(python_files(ROOT / p) for p in PACKAGES)) | python_files(ROOT / "evssm")
    missing = sorted(str(p.relative_to(ROOT)) for p in want - set(files))
    assert not missing, f"not type-checked: {missing}"
    for package in PACKAGES:  # each as its evssm.* module, not under its bare folder name
        assert f"evssm.{package}" in modules and package not in modules


def test_ruff_lints_every_file_once_and_not_through_the_links() -> None:
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--show-files", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    listed = [Path(line.strip()) for line in done.stdout.splitlines() if line.strip()]
    assert listed, done.stdout
    through_links = [p for p in listed if p.parent != ROOT / "evssm" and ROOT / "evssm" in p.parents]
    assert not through_links, f"linted through evssm/'s links: {through_links[:5]}"
    files = [p.resolve() for p in listed]
    assert not twice(files), f"ruff would lint these twice: {twice(files)}"
    want = set().union(*(python_files(ROOT / p) for p in (*PACKAGES, "tests", "scripts", "evssm")))
    missing = sorted(str(p.relative_to(ROOT)) for p in want - set(files))
    assert not missing, f"not linted: {missing}"


def test_the_suite_runs_the_checkers_first() -> None:
    """CI runs scripts/test; a checker's finding must fail it."""
    text = (ROOT / "scripts" / "test").read_text()
    assert "bash scripts/check" in text
    assert text.index("bash scripts/check") < text.index("-m pytest")
