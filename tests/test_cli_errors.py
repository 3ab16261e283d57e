"""Ordinary mistakes get one line of advice from the command line, exit 2 and no traceback; what
the commands say when there is no answer yet, when a key is missing, and how fast a stream went.

Every command runs as a subprocess, as a user runs it; the ones that need a server talk to a real
``evssm serve`` (the default model, API keys) on a free loopback port.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import key_file
from test_server_limits import Server, evssm_serve

KEY = "cli-" + "f6" * 12


def evssm(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("EVSSM_API_KEY", "EVSSM_URL")}
    return subprocess.run([sys.executable, "-m", "evssm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**environ, **(env or {})})


def one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    """The single stderr line of a user error (exit 2, no traceback) that names every needle."""
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --- no server needed ----------------------------------------------------------------------------
@pytest.mark.parametrize("args, needles", [
    (["train", "task=shd"], ["evssm train:", "missing shd_train.h5", "--data-dir"]),
    (["train", "task=shd", "model.d_modl=32"], ["unknown key model.d_modl", "did you mean model.d_model?"]),
    (["eval", "models/shd-paper"], ["evssm eval:", "models/shd-paper"]),
    (["bench", "model", "--config", "nosuch"], ["evssm bench model:", "no model config 'nosuch'"]),
    (["stream", "no-such-file.npz"], ["evssm stream:", "no-such-file.npz"]),
    (["classify", "no-such-file.npz", "--url", "http://127.0.0.1:9"], ["evssm classify:", "no-such-file.npz"]),
    (["stream", "udp://127.0.0.1:0"], ["--sensor WxH"]),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    """Old CLI: the first three printed 15-line tracebacks (exit 1); the client's errors exited 1."""
    one_line_error(evssm(*args, env={"EVSSM_DATA_DIR": str(tmp_path)}), *needles)


# --- against a server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("cli-keyed")
    with evssm_serve(tmp, "--api-keys", str(key_file(tmp, KEY)), "--batch-buckets", "1,8", "--length-buckets", "256",
                     "--classify-length-buckets", "1024", "--classify-batch-events", "8192",
                     "--max-packet-events", "4096", "--log-level", "info") as s:
        yield s


@pytest.fixture
def readme_recording(tmp_path: Path) -> Path:
    """The README's three-event recording, written as the README writes it."""
    path = tmp_path / "recording.npz"
    t, x, y, p = [0, 150, 420], [3, 17, 30], [5, 5, 9], [1, 0, 1]
    np.savez(path, t=t, x=x, y=y, p=p)
    return path


def test_the_ready_line_says_keys_are_required(keyed):
    deadline = time.monotonic() + 10  # /readyz answers a tick before the line is written
    # The server's one ready line (each model's "classify ready after" line comes later).
    while not (ready := [line for line in keyed.log.read_text().splitlines()
                         if "ready after" in line and ": serving " in line]):
        assert time.monotonic() < deadline, "no ready line"
        time.sleep(0.1)
    assert len(ready) == 1 and "API keys required" in ready[0] and "EVSSM_API_KEY" in ready[0], ready


def test_three_events_get_a_reason_instead_of_a_dash(keyed, readme_recording):
    """Old CLI: the README's example showed ``-`` in every column, with no reason."""
    url, key = f"http://127.0.0.1:{keyed.port}", {"EVSSM_API_KEY": KEY}
    reason = "too few events for an answer (the model needs 64)"
    table = evssm("classify", str(readme_recording), "--url", url, env=key)
    assert table.returncode == 0, table.stderr
    assert f"recording.npz: {reason}" in table.stdout.splitlines(), table.stdout
    listed = json.loads(evssm("classify", str(readme_recording), "--url", url, "--json", env=key).stdout)
    assert listed["results"][0]["no_answer"] == reason and listed["results"][0]["prediction"] is None
    streamed = evssm("stream", str(readme_recording), "--url", url, "--fast", env=key)
    assert streamed.returncode == 0, streamed.stderr
    assert f"no prediction: {reason}" in streamed.stdout, streamed.stdout


def test_classify_of_addresses_beyond_the_model_suggests_sensor(keyed, tmp_path):
    """Old CLI: the server's address_out_of_range, without the way out that stream suggests."""
    path = tmp_path / "big.npz"
    n = 200
    np.savez(path, t=np.arange(n) * 100, x=np.arange(n) % 640, y=np.arange(n) % 480, p=np.arange(n) % 2)
    for command in ("classify", "stream"):
        done = evssm(command, str(path), "--url", f"http://127.0.0.1:{keyed.port}", env={"EVSSM_API_KEY": KEY})
        one_line_error(done, "exceed the model's", "--sensor WxH")


def test_auth_errors_name_the_option_and_the_variable(keyed, readme_recording):
    """Old CLI: 'send Authorization: Bearer KEY', which no evssm command takes."""
    url = f"http://127.0.0.1:{keyed.port}"
    for args in (["classify", str(readme_recording)], ["stream", str(readme_recording)],
                 ["classify", str(readme_recording), "--api-key", "wrong-" + KEY]):
        one_line_error(evssm(*args, "--url", url), "--api-key", "EVSSM_API_KEY")


def test_the_live_view_shows_the_speed_reached(keyed):
    """Old view: 'speed 100x', the speed asked for, however slowly the stream went."""
    done = evssm("stream", "sim:rate=20000,duration=1", "--url", f"ws://127.0.0.1:{keyed.port}", "--speed", "100",
                 env={"EVSSM_API_KEY": KEY, "COLUMNS": "200"})  # the view on one line
    assert done.returncode == 0, done.stderr
    match = re.search(r"speed (\d+\.\d+)x \(asked 100x\)", done.stdout)
    assert match is not None, done.stdout
    reached = float(match.group(1))
    assert np.isfinite(reached) and 0 < reached < 150
    summary = json.loads(evssm("stream", "sim:rate=20000,duration=1", "--url", f"ws://127.0.0.1:{keyed.port}",
                               "--speed", "2", "--json", env={"EVSSM_API_KEY": KEY}).stdout)
    assert summary["speed"] == 2 and np.isfinite(summary["speed_reached"])
    assert 0.5 < summary["speed_reached"] <= 2.2  # paced at twice real time: it cannot run ahead
    # Lag over time: each answer after its packet's last event was due, at most 20 points in
    # recording order, the last one at the recording's end; 40 k events/s is kept up with.
    points = summary["lag_over_time"]
    assert 2 <= len(points) <= 20
    times, lags = [p[0] for p in points], [p[1] for p in points]
    assert np.isfinite(times).all() and np.isfinite(lags).all()
    assert times == sorted(times) and 0.9 < times[-1] <= 1.0
    assert all(-50 < lag < 1000 for lag in lags), lags
    lag = summary["playback_lag_ms"]
    assert np.isfinite(lag["p50"]) and lag["p50"] <= lag["p99"] <= lag["max"] < 1000
