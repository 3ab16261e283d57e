"""``evssm bench startup``: real ``evssm serve`` processes timed from launch to ready, cold and
warm; a cache folder with something in it is refused (a cold run needs an empty one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evssm.cli", "bench", "startup", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_a_cache_folder_in_use_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "entry").write_text("x")
    done = bench("--cache-dir", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (f"evssm bench startup: {tmp_path} is not empty; a cold run needs "
                                   "an empty folder")


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two starts; each stop waits for a classify shape being compiled
def test_cold_then_warm_start_of_a_real_server(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # Until ready only: the classify shapes of the default buckets take minutes on a loaded CPU.
    done = bench("--model", "tiny=config:tiny", "--cache-dir", str(cache), "--warm-runs", "1",
                 "--until", "ready", timeout=1100)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["bench"] == "startup" and report["environment"]["cores"] >= 1
    cold, warm = report["runs"]
    assert (cold["cache"], warm["cache"]) == ("cold", "warm")
    for run in (cold, warm):
        assert run["ready_s"] > 0 and run["classify_ready_s"] is None, run
        assert run["models"] == ["tiny"]
        assert any("ready to stream in" in line for line in run["phases"]), run["phases"]
    assert any(cache.iterdir()), "the cold run filled the compilation cache"
