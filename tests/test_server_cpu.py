"""The server's CPU account over real sockets: ``/v1/stats``'s ``cpu`` block and
``evssm_cpu_seconds_total{part}`` name every part, finite and non-negative, and grow while a
session streams; the parts add up to the process's CPU time. Tiny model, native step."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from conftest import wait_ready
from websockets.asyncio.client import connect

from evssm.server.app import create_app
from evssm.server.cpu import PARTS, CpuAccount, thread_cpu_seconds
from evssm.server.settings import Settings

SETTINGS = Settings(batch_buckets=(1, 8), length_buckets=(256,), classify_length_buckets=(1024,),
                    slots_per_model=8, max_sessions=8, session_idle_timeout=60.0)


@pytest.fixture
def server(serve: Any, tiny_model: Any) -> Any:
    app = create_app(SETTINGS, models={"tiny": tiny_model})
    running = serve(app)
    wait_ready(running.http)
    running.app = app
    return running


def stream(ws_url: str, packets: int, size: int = 256) -> int:
    """One session sends ``packets`` packets of ``size`` events, each answered; events sent."""
    rng = np.random.default_rng(3)

    async def run() -> None:
        async with connect(f"{ws_url}/v1/stream") as ws:
            await ws.send(msgpack.packb({"type": "open"}))
            assert msgpack.unpackb(await ws.recv())["type"] == "opened"
            t0 = 0
            for k in range(packets):
                t = t0 + np.cumsum(rng.integers(1, 50, size)).astype("<i8")
                t0 = int(t[-1])
                x = rng.integers(0, 700, size).astype("<u2")
                await ws.send(msgpack.packb({"type": "events", "seq": k, "t": t.tobytes(),
                                             "x": x.tobytes()}))
                reply = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 30))
                assert reply["type"] == "result", reply

    asyncio.run(run())
    return packets * size


def cpu_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("evssm_cpu_seconds_total{"):
            part = line.split('part="', 1)[1].split('"', 1)[0]
            out[part] = float(line.rsplit(" ", 1)[1])
    return out


def test_stats_and_metrics_split_the_cpu_time_into_parts(server: Any) -> None:
    h = server.http
    before = httpx.get(f"{h}/v1/stats").json()["cpu"]
    metrics_before = cpu_metrics(httpx.get(f"{h}/metrics").text)
    sent = stream(server.ws, 60)
    after = httpx.get(f"{h}/v1/stats").json()["cpu"]
    metrics_after = cpu_metrics(httpx.get(f"{h}/metrics").text)

    assert set(after["parts"]) == set(PARTS) == set(metrics_after) == set(metrics_before)
    assert after["events"] - before["events"] == sent
    for part in PARTS:
        s0, s1 = before["parts"][part]["seconds"], after["parts"][part]["seconds"]
        assert math.isfinite(s0) and math.isfinite(s1) and 0 <= s0 <= s1, part
        assert math.isfinite(metrics_after[part]) and metrics_after[part] >= metrics_before[part] >= 0
        per_event = after["parts"][part]["us_per_event"]
        assert per_event is not None and math.isfinite(per_event) and per_event >= 0
    # Streaming costs the loop, the decoding and the step thread something each.
    for part in ("event_loop", "decode", "step"):
        assert after["parts"][part]["seconds"] > before["parts"][part]["seconds"], part
        assert metrics_after[part] > metrics_before[part], part
    # Disjoint parts: they add up to the process's CPU time.
    total = sum(p["seconds"] for p in after["parts"].values())
    assert math.isfinite(after["process_s"]) and total == pytest.approx(after["process_s"], rel=0.02)
    shares = [p["share"] for p in after["parts"].values()]
    assert all(math.isfinite(s) and 0 <= s <= 1 for s in shares)


def test_step_and_native_helper_threads_are_found_and_counted(server: Any, tiny_model: Any) -> None:
    stream(server.ws, 5)
    threads = server.app.state.engine.cpu_threads()
    assert len(threads["step"]) == 1  # one model, one step thread
    if tiny_model.native is None or not threads["native_helper"]:
        pytest.skip("no native helper thread here (no compiler, or one native thread)")
    for tid in threads["step"] + threads["native_helper"]:
        seconds = thread_cpu_seconds(tid)
        assert seconds is not None and math.isfinite(seconds) and seconds > 0
    cpu = httpx.get(f"{server.http}/v1/stats").json()["cpu"]
    assert cpu["parts"]["native_helper"]["seconds"] > 0  # it has spun, at least


def test_account_reads_other_threads_clocks_and_never_goes_back() -> None:
    """The account alone: a busy thread's time lands in its part, read from another thread; a
    thread that has ended keeps its last reading; decoding is moved out of the loop's part."""
    done = threading.Event()
    tids: list[int] = []

    def busy() -> None:
        tids.append(threading.get_native_id())
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass
        done.wait(5)

    worker = threading.Thread(target=busy)
    worker.start()
    while not tids:
        time.sleep(0.001)
    cpu = CpuAccount(lambda: (0.01, 0.02), lambda: {"step": list(tids), "native_helper": []})
    cpu.start()
    time.sleep(0.1)
    first = cpu.seconds()
    assert first["step"] >= 0.05 and first["decode"] == pytest.approx(0.03)
    done.set()
    worker.join()
    second = cpu.seconds()
    for part in PARTS:
        assert math.isfinite(second[part]) and second[part] >= first[part] >= 0, part
    assert second["step"] >= first["step"]  # the ended thread's time is kept
    report = cpu.report(0)
    assert all(p["us_per_event"] is None for p in report["parts"].values())


def test_bench_serve_reports_the_packets_each_step_answered(server: Any, capsys: Any) -> None:
    """One session flat out with four packets in flight: ``evssm bench serve`` reads the steps
    and coalesced chunks off ``/v1/stats`` before and after. Every 256-event packet is one chunk
    (the length bucket is 256) and the one session is one row per step, so the steps and the
    chunks that shared a step add up to the packets answered."""
    from evssm.cli import main

    assert main(["bench", "serve", "--url", server.ws, "--sessions", "1", "--rate", "max",
                 "--duration", "1", "--packet-events", "256", "--max-in-flight", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    steps = report["server_steps"]
    assert steps is not None and steps["packets"] == report["packets"]["answered"] > 0
    assert steps["steps"] > 0 and steps["steps"] + steps["coalesced"] == steps["packets"]
    assert steps["packets_per_step"] == pytest.approx(steps["packets"] / steps["steps"], abs=1e-3)
    stats = httpx.get(f"{server.http}/v1/stats").json()["models"]["tiny"]
    assert stats["steps_total"] >= steps["steps"] and stats["coalesced_total"] >= steps["coalesced"]
