"""What a new user meets first, end to end: ``evssm serve`` as the README starts it (the default
model, in a subprocess on a free loopback port), every ``evssm`` command of the README's code
blocks run as written against it, and the server's log: one line per session and per classify
request, no line per request or connection unless ``--access-log`` asks for uvicorn's access log.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_port, wait_process_ready

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
READY_TIMEOUT_S = float(os.environ.get("EVSSM_TEST_READY_TIMEOUT", "420"))
# Small shape buckets: every bucket compiles at start-up, on 2 shared cores. 64 sessions: 16 per
# client, as many as the README's benchmark opens.
SERVER_ENV = {"EVSSM_BATCH_BUCKETS": "1,8", "EVSSM_LENGTH_BUCKETS": "64,256",
              "EVSSM_CLASSIFY_LENGTH_BUCKETS": "2048", "EVSSM_CLASSIFY_BATCH_EVENTS": "20480",
              "EVSSM_MAX_SESSIONS": "64", "JAX_PLATFORMS": "cpu"}
# README commands the test does not run, and why (every other `evssm` line is run).
NOT_RUN = {
    "evssm train": "trains for minutes (tests/test_train.py trains small models)",
    "evssm serve": "starts a server: the test runs the server the README's other commands use",
    'evssm stream --url "ws://localhost:8080': "needs the compose stack's load balancer "
                                               "(tests/test_deploy_stack.py)",
}


def readme_commands() -> list[str]:
    """Every ``evssm ...`` line of the README's ``bash`` blocks, comments removed."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)
    lines = (line.strip() for block in blocks for line in block.splitlines())
    return [shlex.join(shlex.split(line, comments=True)) if "#" in line else line
            for line in lines if line.startswith("evssm ")]


def skipped_because(command: str) -> str | None:
    return next((why for prefix, why in NOT_RUN.items() if command.startswith(prefix)), None)


def readme_python_writing(name: str) -> str:
    """The README's Python block that writes ``name`` (the recording its examples classify)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return next(b for b in blocks if f'"{name}"' in b and "np.save" in b)


class Served:
    """``evssm serve`` (default model) in its own process group, its log in a file."""

    def __init__(self, log_path: Path, *args: str):
        self.port = free_port()
        self.log_path = log_path
        env = {**os.environ, **SERVER_ENV, "EVSSM_PORT": str(self.port)}
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "evssm.cli", "serve", "--host", "127.0.0.1", *args], cwd=ROOT,
            env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> str:
        """SIGTERM (a drain), then the whole log."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def served(tmp_path: Path, *args: str) -> Iterator[Served]:
    server = Served(tmp_path / "server.log", *args)
    try:
        wait_process_ready(server.proc, server.http, server.log_path, READY_TIMEOUT_S)
        yield server
    finally:
        server.stop()


def test_every_readme_command_is_run_or_skipped_for_a_reason() -> None:
    commands = readme_commands()
    run = [c for c in commands if skipped_because(c) is None]
    assert len(run) >= 5, commands
    assert {c.split()[1] for c in run} >= {"stream", "classify", "bench"}
    # No example names a file the reader does not have (a camera recording, say).
    for command in run:
        for word in shlex.split(command):
            if re.search(r"\.(raw|dat|aedat4?|es|csv|h5|npy)$", word):
                pytest.fail(f"README example {command!r} needs a file no set-up step provides")


def test_readme_commands_run_as_written_and_the_log_has_one_line_per_session(tmp_path: Path) -> None:
    commands = [c for c in readme_commands() if skipped_because(c) is None]
    work = tmp_path / "work"
    work.mkdir()
    # The README's own snippet writes the recording its examples classify.
    subprocess.run([sys.executable, "-c", readme_python_writing("recording.npz")], cwd=work,
                   check=True, timeout=60)
    with served(tmp_path) as server:
        for _ in range(10):  # an orchestrator's probes
            assert httpx.get(f"{server.http}/readyz", timeout=10).status_code == 200
        # As the README's shell has it: the virtual environment active, EVSSM_URL exported.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {**os.environ, "PATH": path, "EVSSM_URL": f"ws://127.0.0.1:{server.port}",
               "JAX_PLATFORMS": "cpu"}
        outputs = {}
        for command in commands:
            proc = subprocess.run(command, shell=True, cwd=work, env=env, capture_output=True,
                                  text=True, timeout=240, executable="/bin/bash")
            assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            assert proc.stdout.strip(), command
            outputs[command] = proc.stdout
        log = server.stop()
    assert "prediction:" in outputs["evssm stream dataset:event-mnist"]
    assert "10 recordings in " in outputs["evssm classify dataset:event-mnist --index 0-9"]
    assert "1 recording in " in outputs["evssm classify recording.npz"]
    # One line per session and per classify request; none per request or connection.
    assert not re.search(r'"(GET|POST) /', log), log[-3000:]  # uvicorn's access lines
    assert "connection open" not in log and '"WebSocket' not in log
    ended = re.findall(r"session \w+ of event-mnist ended after [\d.]+ s: (\d+) events, (.*)", log)
    bench = json.loads(outputs["evssm bench serve --sessions 16 --rate 6000 --duration 10"])
    assert bench["sessions"]["opened"] == 16, bench
    assert len(ended) == 2 + 16, log[-3000:]  # two streams, then the benchmark's sessions
    assert any(answer.startswith("answer ") for _, answer in ended)
    classified = re.findall(r"classify event-mnist: (\d+) recordings?, (\d+) events", log)
    assert [n for n, _ in classified].count("10") == 1 and "1" in [n for n, _ in classified]


def test_access_log_is_an_option(tmp_path: Path) -> None:
    with served(tmp_path, "--access-log", "--model", "tiny=config:tiny") as server:
        for _ in range(3):
            assert httpx.get(f"{server.http}/readyz", timeout=10).status_code == 200
        log = server.stop()
    assert len(re.findall(r'"GET /readyz HTTP/1.1" 200', log)) >= 3, log[-3000:]
