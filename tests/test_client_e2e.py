"""The client against a real server process (``python -m evssm.cli serve``) on loopback.

- a recording streamed through the client equals ``evssm classify`` of it (the invariant, end to
  end, through both commands and the library);
- dropping the connection in the middle of a stream (a proxy between client and server cuts it)
  ends with the same answer, every event applied once;
- typed errors, resume tokens and the load generator on the real thing.

One server serves the whole module: the tiny model with small shape buckets, so start-up
(compilation) stays around a minute on the 2-core build machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
# noqa: E402 below: the imports follow the skips, so the file skips cleanly without the server extra.

from conftest import LoopThread, free_port, stop_process, wait_process_ready  # noqa: E402
from numeric import assert_close  # noqa: E402

from evssm.client import (  # noqa: E402
    AsyncStreamSession,
    InvalidEvents,
    SimulatedSensor,
    StreamSession,
    UnknownModel,
    classify,
    packetize,
    save_events,
)
from evssm.models.events import Recording, SensorSpec  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STARTUP_TIMEOUT_S = 600
SERVER_ARGS = ["--model", "config:tiny", "--batch-buckets", "1,8", "--length-buckets", "64,256",
               "--classify-length-buckets", "1024,16384", "--max-sessions", "16"]
RTOL, ATOL = 1e-4, 1e-6  # float32 tolerance of the streaming == offline invariant


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "evssm.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(port), *SERVER_ARGS],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_process_ready(proc, base, log_path, STARTUP_TIMEOUT_S)
        yield {"http": base, "ws": f"ws://127.0.0.1:{port}", "port": port}
    finally:
        stop_process(proc, 60)


class DroppingProxy(LoopThread):
    """A TCP proxy on loopback to ``target_port`` (read at each new connection, so it may be
    switched to another server) whose :meth:`drop` cuts every open connection at once (RST)."""

    def __init__(self, target_port: int):
        super().__init__()
        self.target_port = target_port
        self.connections = 0
        self._transports: list[asyncio.WriteTransport] = []

    def drop(self) -> None:
        done = threading.Event()

        def cut() -> None:
            for tr in self._transports:
                tr.abort()
            self._transports.clear()
            done.set()

        self._loop.call_soon_threadsafe(cut)
        assert done.wait(5)

    @contextlib.asynccontextmanager
    async def _listen(self) -> AsyncIterator[int]:
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        async with server:
            yield server.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._transports += [writer.transport, up_writer.transport]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def sim_recording(seconds: float = 0.4, label: int = 3, seed: int = 0) -> Recording:
    return SimulatedSensor(SensorSpec.one_d(700), 20_000, label=label, num_classes=20,
                           seed=seed).recording(seconds)


def offline(server: dict[str, Any], rec: Recording) -> np.ndarray:
    (answer,) = classify(server["http"], [rec])
    assert answer.probs is not None
    return np.asarray(answer.probs)


# -- streaming equals classify ---------------------------------------------------------------


def test_stream_command_equals_classify_command(server: dict[str, Any], tmp_path: Path,
                                                capsys: Any) -> None:
    from evssm.cli import main

    rec = sim_recording()
    path = str(save_events(tmp_path / "rec.npz", rec, label=3))
    assert main(["stream", path, "--url", server["ws"], "--fast", "--packet-events", "100",
                 "--json"]) == 0
    streamed = json.loads(capsys.readouterr().out)
    assert main(["classify", path, "--url", server["http"], "--json"]) == 0
    classified = json.loads(capsys.readouterr().out)["results"][0]
    assert streamed["events"] == classified["events"] == len(rec)
    assert_close(streamed["probs"], classified["probs"], rtol=RTOL, atol=ATOL)
    assert streamed["prediction"] == classified["prediction"]


def test_any_packetisation_gives_the_offline_answer(server: dict[str, Any]) -> None:
    rec = sim_recording(0.3, label=5, seed=1)
    expected = offline(server, rec)
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, len(rec)), 25, replace=False))
    bounds = [0, *cuts.tolist(), len(rec)]
    packets = [rec.slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    packets.insert(3, rec.slice(0, 0))  # an empty packet too
    with StreamSession(server["ws"], max_in_flight=4) as s:
        results = list(s.stream(packets))
    assert [r.seq for r in results] == list(range(len(packets)))
    assert results[-1].events == len(rec)
    assert_close(results[-1].probs, expected, rtol=RTOL, atol=ATOL)
    # time-window packets through the asyncio session
    async def by_time() -> Any:
        async with AsyncStreamSession(server["ws"]) as a:
            return [r async for r in a.stream(packetize(rec, window_us=7_000))][-1]

    last = asyncio.run(by_time())
    assert_close(last.probs, expected, rtol=RTOL, atol=ATOL)


def test_shd_file_streamed_equals_classified(server: dict[str, Any], tmp_path: Path,
                                             capsys: Any) -> None:
    h5py = pytest.importorskip("h5py")
    from evssm.cli import main

    path = tmp_path / "shd.h5"
    recs = [sim_recording(0.2, label=k, seed=k) for k in range(2)]
    with h5py.File(path, "w") as f:
        times = f.create_dataset("spikes/times", (2,), dtype=h5py.vlen_dtype(np.float16))
        units = f.create_dataset("spikes/units", (2,), dtype=h5py.vlen_dtype(np.uint16))
        for i, r in enumerate(recs):
            times[i] = (r.t / 1e6).astype(np.float16)
            units[i] = r.x
        f.create_dataset("labels", data=np.array([0, 1], np.uint16))
    assert main(["stream", str(path), "--index", "1", "--url", server["ws"], "--fast",
                 "--packet-ms", "5", "--json"]) == 0
    streamed = json.loads(capsys.readouterr().out)
    assert main(["classify", str(path), "--index", "all", "--url", server["http"], "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert len(rows) == 2 and streamed["source"] == rows[1]["source"] == "shd.h5[1]"
    assert_close(streamed["probs"], rows[1]["probs"], rtol=RTOL, atol=ATOL)


# -- reconnect ---------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_after", [[3], [2, 9]])
def test_reconnect_mid_stream_ends_with_the_same_answer(server: dict[str, Any],
                                                        drop_after: list[int]) -> None:
    rec = sim_recording(0.5, label=7, seed=2)
    expected = offline(server, rec)
    results = []
    with DroppingProxy(server["port"]) as proxy:
        with StreamSession(proxy.url, max_in_flight=6) as s:
            for packet in packetize(rec, events=250):
                s.send(packet)
                for r in s.poll():
                    results.append(r)
                    if len(results) in drop_after:
                        proxy.drop()  # with packets in flight, some processed, some not
            results += s.drain(timeout=120)
            reconnects = s.reconnects
        assert proxy.connections == 1 + len(drop_after)
    assert reconnects == len(drop_after)
    assert [r.seq for r in results] == list(range(len(results)))
    assert results[-1].events == len(rec)  # every event applied exactly once
    assert not results[-1].lost
    assert_close(results[-1].probs, expected, rtol=RTOL, atol=ATOL)


def test_reconnect_through_the_stream_command(server: dict[str, Any], tmp_path: Path,
                                              capsys: Any) -> None:
    from evssm.cli import main

    rec = sim_recording(0.6, label=1, seed=3)
    path = str(save_events(tmp_path / "rec.npy", rec))
    with DroppingProxy(server["port"]) as proxy:
        timer = threading.Timer(0.3, proxy.drop)  # mid-way through a 0.6 s real-time replay
        timer.start()
        try:
            assert main(["stream", path, "--url", proxy.url, "--packet-ms", "10",
                         "--json"]) == 0
        finally:
            timer.cancel()
    out = json.loads(capsys.readouterr().out)
    assert out["reconnects"] == 1 and out["events"] == len(rec)
    assert_close(out["probs"], offline(server, rec), rtol=RTOL, atol=ATOL)


def test_resume_token_from_a_new_client(server: dict[str, Any]) -> None:
    rec = sim_recording(0.3, label=4, seed=4)
    half = len(rec) // 2
    first = StreamSession(server["ws"])
    first.open()
    list(first.stream(packetize(rec.slice(0, half), events=200)))
    token = first.resume_token
    ws = first._s._ws
    assert ws is not None
    first._run(ws.close())  # walk away without closing the server session
    first._stop_loop()
    with StreamSession(server["ws"], resume=token) as second:
        assert second.info is not None and second.info.events == half
        last = list(second.stream(packetize(rec.slice(half, len(rec)), events=200)))[-1]
    assert_close(last.probs, offline(server, rec), rtol=RTOL, atol=ATOL)


def test_reset_then_a_new_recording(server: dict[str, Any]) -> None:
    first, second = sim_recording(0.2, label=1, seed=5), sim_recording(0.2, label=2, seed=6)
    with StreamSession(server["ws"]) as s:
        list(s.stream(packetize(first, events=300)))
        s.reset()
        last = list(s.stream(packetize(second, events=300)))[-1]
    assert last.events == len(second)
    assert_close(last.probs, offline(server, second), rtol=RTOL, atol=ATOL)


# -- errors and load -------------------------------------------------------------------------


def test_typed_errors_from_the_server(server: dict[str, Any]) -> None:
    with pytest.raises(UnknownModel) as err:
        StreamSession(server["ws"], model="no-such-model").open()
    assert err.value.code == "unknown_model"
    with StreamSession(server["ws"]) as s:
        s.send(Recording(np.array([0, 1], np.int64), np.array([5, 700], np.uint16)))
        with pytest.raises(InvalidEvents) as bad:
            s.recv(timeout=60)
        assert bad.value.code == "address_out_of_range" and bad.value.seq == 0
        s.send(Recording(np.array([10], np.int64), np.array([5], np.uint16)))
        assert s.recv(timeout=60).events == 1  # the session is untouched and usable
        s.send(Recording(np.array([5], np.int64), np.array([5], np.uint16)))
        with pytest.raises(InvalidEvents) as back:
            s.recv(timeout=60)
        assert back.value.code == "timestamps_decreasing"


def test_bench_serve_against_the_server(server: dict[str, Any], capsys: Any) -> None:
    from evssm.cli import main

    started = time.monotonic()
    assert main(["bench", "serve", "--url", server["ws"], "--sessions", "3", "--rate", "2000",
                 "--duration", "2", "--packet-events", "128"]) == 0
    assert time.monotonic() - started < 60
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["sessions"]["opened"] == 3 and report["errors"] == {}
    assert report["offered_events_per_s"] == 6000
    assert report["events"]["answered"] == report["events"]["sent"] > 0
    assert report["latency_ms"]["p99"] is not None
    assert report["sessions"]["share_real_time"] is not None
    machine = report["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and isinstance(machine["instruction_sets"], list)
    # The server's CPU over the run, split by part: every part finite and non-negative, the
    # events the sessions sent counted, and the split printed.
    split = report["server_cpu"]
    assert split["events"] >= report["events"]["answered"] > 0
    assert set(split["parts"]) == {"event_loop", "decode", "step", "native_helper", "other"}
    for part in split["parts"].values():
        assert np.isfinite(part["seconds"]) and part["seconds"] >= 0
        assert np.isfinite(part["us_per_event"]) and part["us_per_event"] >= 0
    assert split["parts"]["step"]["seconds"] > 0 and split["parts"]["decode"]["seconds"] > 0
    assert np.isfinite(split["us_per_event"]) and split["us_per_event"] > 0
    printed = out.err
    assert "us/event" in printed and "event_loop" in printed and "native_helper" in printed


def test_bench_serve_spreads_sessions_over_worker_processes(server: dict[str, Any],
                                                            capsys: Any) -> None:
    """--workers 2: the sessions run in two load-generator processes; one report, every
    session's figures in it, and each process's CPU share."""
    from evssm.cli import main

    assert main(["bench", "serve", "--url", server["ws"], "--sessions", "4", "--rate", "2000",
                 "--duration", "2", "--packet-events", "128", "--workers", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sessions"]["opened"] == 4 and report["errors"] == {}
    assert report["config"]["workers"] == 2
    assert report["events"]["answered"] == report["events"]["sent"] > 0
    assert report["achieved_events_per_s_per_session"]["min"] > 0  # all four streamed
    shares = report["client_cpu_share_per_worker"]
    assert len(shares) == 2 and all(0 < c < 2 for c in shares)
    assert report["client_cpu_share"] == pytest.approx(sum(shares), abs=0.01)
