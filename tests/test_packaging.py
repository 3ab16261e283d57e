"""The package layout: ``evssm/`` links the top-level folders, so one ``evssm`` tree imports from
the repository root, from an editable install and from a wheel, and the wheel carries real files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("models", "server", "client", "configs")
# One file of each data folder that must ship inside the wheel.
DATA = ("evssm/configs/models/event-mnist.yaml", "evssm/configs/tasks/event-mnist.yaml",
        "evssm/models/kernels/streaming_step.cc", "evssm/server/static/dashboard.html",
        "evssm/models/pretrained/event-mnist/evssm.json",
        "evssm/models/pretrained/event-mnist/variables/manifest.ocdbt")


def test_the_package_folder_links_each_top_level_folder() -> None:
    for part in PARTS:
        link = ROOT / "evssm" / part
        assert link.is_symlink(), f"{link} must be a link to ../{part}"
        assert os.readlink(link) == f"../{part}"  # relative: survives clones and moves
        assert link.resolve() == (ROOT / part).resolve()


def test_the_server_imports_from_the_repository_root() -> None:
    code = "import evssm.server.app, evssm.models.events as e; print(e.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve() == ROOT / "models" / "events.py"


def test_the_wheel_builds_without_warnings_and_holds_real_files(tmp_path: Path) -> None:
    # The build writes build/ and *.egg-info beside its sources: build from a copy (links kept).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("evssm",) + PARTS:
        shutil.copytree(ROOT / name, src / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    # pip relays every warning of the build back end (setuptools) on stderr as "BuildBackendWarning".
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
         "-w", str(tmp_path), str(src)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "BuildBackendWarning" not in done.stderr and "deprecated" not in done.stderr.lower(), \
        done.stderr
    (wheel,) = tmp_path.glob("evssm-*.whl")
    with zipfile.ZipFile(wheel) as z:
        infos = {i.filename: i for i in z.infolist()}
        for name in DATA + ("evssm/server/app.py", "evssm/client/session.py", "evssm/cli.py"):
            assert name in infos, name
        # Unix mode in the high bits: a link would be 0o120000; every entry is a regular file.
        links = [n for n, i in infos.items() if (i.external_attr >> 16) & 0o170000 == 0o120000]
        assert not links, links
        tops = {n.split("/")[0] for n in infos}
        assert tops == {"evssm", wheel.name.split("-py3")[0] + ".dist-info"}, tops
        assert "from ." in z.read("evssm/server/app.py").decode()
