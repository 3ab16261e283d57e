"""``evssm serve`` as a real process: configured by EVSSM_* variables, drained by SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import msgpack
import numpy as np
import pytest
import websockets
from conftest import free_port, wait_process_ready
from websockets.asyncio.client import connect


def test_sigterm_drains_in_flight_packets_and_exits_cleanly(tmp_path):
    port = free_port()
    env = {**os.environ, "EVSSM_PORT": str(port), "EVSSM_MAX_SESSIONS": "3", "EVSSM_BATCH_BUCKETS": "4",
           "EVSSM_LENGTH_BUCKETS": "64", "EVSSM_CLASSIFY_LENGTH_BUCKETS": "none", "EVSSM_LOG_LEVEL": "warning",
           "JAX_PLATFORMS": "cpu"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "evssm.cli", "serve", "--model", "small=config:tiny",
                             "--host", "127.0.0.1"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_process_ready(proc, base, tmp_path / "serve.log", 300)
        (info,) = httpx.get(f"{base}/v1/models").json()["models"]
        assert info["name"] == "small" and info["slots"] == 3 and info["batch_buckets"] == [4]

        rng = np.random.default_rng(0)
        t = np.cumsum(rng.integers(0, 1000, 8000)).astype("<i8")
        x = rng.integers(0, 700, 8000).astype("<u2")

        async def session(sent: asyncio.Event) -> tuple[list[dict], int]:
            async with connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
                await ws.send(msgpack.packb({"type": "open"}))
                assert msgpack.unpackb(await ws.recv())["type"] == "opened"
                for k in range(8):
                    await ws.send(msgpack.packb({"type": "events", "seq": k, "t": t[k * 1000:(k + 1) * 1000].tobytes(),
                                                 "x": x[k * 1000:(k + 1) * 1000].tobytes()}))
                sent.set()
                return await collect(ws)

        async def collect(ws) -> tuple[list[dict], int]:
            replies = []
            with pytest.raises(websockets.ConnectionClosed) as info:
                while True:
                    replies.append(msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60)))
            return replies, info.value.rcvd.code

        async def run() -> list[tuple[list[dict], int]]:
            sent = [asyncio.Event() for _ in range(2)]
            tasks = [asyncio.create_task(session(e)) for e in sent]
            for e in sent:
                await asyncio.wait_for(e.wait(), 60)
            await asyncio.sleep(0.01)  # the last frames are on the wire, 16,000 events of work queued
            proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

        for replies, code in asyncio.run(run()):
            assert code == 1001
            assert [r["type"] for r in replies] == ["result"] * 8
            assert [r["seq"] for r in replies] == list(range(8)) and replies[-1]["events"] == 8000
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def test_the_log_says_it_is_compiling_then_one_ready_line_with_the_url(tmp_path):
    # --port 0: the ready line names the port the OS chose, so a person (or this test) can use it.
    env = {**os.environ, "EVSSM_BATCH_BUCKETS": "1", "EVSSM_LENGTH_BUCKETS": "64",
           "EVSSM_CLASSIFY_LENGTH_BUCKETS": "none", "JAX_PLATFORMS": "cpu"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "evssm.cli", "serve", "--model", "small=config:tiny",
                                 "--port", "0"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"ready after \d+ s", text := log_path.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, text[-4000:]
            time.sleep(0.25)
        # One ready line (each model's later "classify ready after" line is another message).
        ready = [line for line in text.splitlines() if "ready after" in line and ": serving " in line]
        assert len(ready) == 1, text
        match = re.search(r"serving small on (http://127\.0\.0\.1:(\d+)) .*try: evssm stream sim "
                          r"--url ws://127\.0\.0\.1:(\d+)", ready[0])
        assert match and match.group(2) == match.group(3) != "0", ready[0]
        # Before it, the model's line says what loading and compiling its streaming step cost.
        loaded = re.search(r"model small from \S+: ready to stream in [\d.]+ s", text)
        assert loaded and loaded.start() < text.index(ready[0]), text
        assert "Unable to initialize backend" not in text  # JAX's TPU probe stays out of the log
        assert httpx.get(f"{match.group(1)}/readyz", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
