"""Streaming sessions, the stream/bench commands and error typing against an in-test fake server.

The fake speaks the WebSocket contract (docs/protocol.md) with a toy model whose answer depends on
every event seen (a class histogram), so a packet processed twice or skipped changes the answer.
It can drop the connection before or after processing a chosen packet, as a flaky network would,
and, with ``snapshot_every``, keep session snapshots and "restart" (forget every live session and
restore them from their snapshots on resume), as ``evssm serve --state-dir`` does.
The same tests against the real server are in test_client_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import numpy as np
import pytest
from conftest import LoopThread
from numeric import assert_close
from websockets.asyncio.server import ServerConnection, serve

from evssm.client import (
    AsyncStreamSession,
    InvalidEvents,
    ServerFull,
    SessionExpired,
    StreamSession,
    UnknownModel,
    packetize,
)
from evssm.client.errors import ConnectionLost, NothingInFlight, SessionClosed
from evssm.client.state import SessionState
from evssm.models.events import Recording, SensorSpec

pytestmark = pytest.mark.timeout(120)

CLASSES = ("a", "b", "c", "d")
CHANNELS = 16
MIN_EVENTS = 4  # the toy model's "first complete output window"


def toy_probs(counts: np.ndarray) -> list[float] | None:
    total = counts.sum()
    if total < MIN_EVENTS:
        return None
    return ((counts + 1.0) / (total + len(counts))).tolist()


def offline_probs(rec: Recording) -> list[float] | None:
    return toy_probs(np.bincount(np.asarray(rec.x) % len(CLASSES), minlength=len(CLASSES)))


def _column(value: Any, dtype: str) -> np.ndarray:
    if isinstance(value, (bytes, bytearray)):
        return np.frombuffer(value, dtype=dtype)
    return np.asarray(value, dtype=np.int64)


class _State:
    def __init__(self, sid: str):
        self.sid = sid
        self.counts = np.zeros(len(CLASSES))
        self.events = 0
        self.last_t: int | None = None
        self.packets = 0
        self.durable = 0  # reported in results: the last snapshot's count, one packet late
        self.snapshotted: int | None = None

    def copy(self) -> _State:
        other = _State(self.sid)
        other.counts, other.events, other.last_t = self.counts.copy(), self.events, self.last_t
        other.durable = other.snapshotted = self.events
        return other


async def drop(ws: Any) -> None:
    """Drop the connection with no close handshake, as a crashed or cut-off server does, after the
    answers already sent reach the client: the server ends its side (FIN) and goes on reading for
    a moment before it closes the socket. A reset makes the client's kernel discard answers it has
    received and not yet read, and closing at once resets: a packet the client sends into the
    closed socket is answered by a reset. Which answers survive a drop would then depend on
    scheduling (the tests below count them exactly)."""
    transport = ws.transport
    if transport.can_write_eof():
        transport.write_eof()
        await asyncio.sleep(0.3)  # the client reads to the end and closes its side
    transport.close()


class FakeServer(LoopThread):
    """A WebSocket server on 127.0.0.1 in its own thread, speaking the stream protocol."""

    def __init__(self, *, max_sessions: int = 1000, delay_s: float = 0.0, snapshot_every: int | None = None):
        super().__init__()
        self.max_sessions = max_sessions
        self.delay_s = delay_s
        self.snapshot_every = snapshot_every  # None: no snapshots (no durable); 0: none taken yet
        self.store: dict[str, _State] = {}  # session -> its last snapshot
        self.restored = 0
        self.draining_after: int | None = None  # refuse packets after this many, then close 1001
        self.refused = 0
        self._next_id = 0
        self.packet_sizes: list[int] = []
        self.sessions: dict[str, _State] = {}
        self.closed: dict[str, _State] = {}  # sessions ended by a client's close
        self.live = 0
        self.packets_processed = 0
        # packet number (server-wide, counted from 1) -> "before" | "after" processing
        self.drops: dict[int, str] = {}
        self.seen_seqs: list[int] = []

    @contextlib.asynccontextmanager
    async def _listen(self) -> AsyncIterator[int]:
        async with serve(self._handler, "127.0.0.1", 0, compression=None) as server:
            yield next(iter(server.sockets)).getsockname()[1]

    async def _handler(self, ws: ServerConnection) -> None:
        state: _State | None = None
        self.live += 1
        try:
            async for frame in ws:
                msg = json.loads(frame) if isinstance(frame, str) else msgpack.unpackb(frame)
                kind = msg.get("type")
                if kind == "open":
                    if msg.get("model") not in (None, "toy"):
                        await self._error(ws, None, "unknown_model", "no such model")
                        continue
                    restored = False
                    if msg.get("resume"):
                        state = self.sessions.get(msg["resume"])
                        if state is None and msg["resume"] in self.store:
                            state = self.sessions[msg["resume"]] = self.store[msg["resume"]].copy()
                            self.restored += 1
                            restored = True
                        if state is None:
                            await self._error(ws, None, "unknown_session", "expired")
                            continue
                    else:
                        if len(self.sessions) >= self.max_sessions:
                            await ws.close(1013, "server full")
                            return
                        state = _State(f"s{self._next_id}")
                        self._next_id += 1
                        self.sessions[state.sid] = state
                    durable = {} if self.snapshot_every is None else {"durable": state.durable,
                                                                      "restored": restored}
                    await ws.send(msgpack.packb({
                        "type": "opened", "session": state.sid, "resume": state.sid,
                        "events": state.events, **durable,
                        "model": {"name": "toy", "classes": list(CLASSES), "downsampling": 1,
                                  "sensor": {"kind": "1d", "channels": CHANNELS, "width": 0,
                                             "height": 0}}}))
                elif kind == "events" and state is not None:
                    number = self.packets_processed + 1
                    if self.draining_after is not None and number > self.draining_after:
                        await self._error(ws, msg.get("seq"), "draining", "shutting down")
                        self.refused += 1
                        if self.refused == 2:  # the drain ends: snapshot, close 1001, forget
                            self.draining_after = None
                            self.store = {sid: st.copy() for sid, st in self.sessions.items()}
                            self.sessions.clear()
                            await ws.close(1001, "server shutting down")
                            return
                        continue
                    if self.drops.get(number) == "before":
                        del self.drops[number]
                        await drop(ws)
                        return
                    err = self._apply(state, msg)
                    if err:
                        await self._error(ws, msg.get("seq"), *err)
                        continue
                    self.packets_processed = number
                    self.seen_seqs.append(msg["seq"])
                    self.packet_sizes.append(len(_column(msg["t"], "<i8")))
                    state.packets += 1
                    reported = state.durable
                    if self.snapshot_every and state.packets % self.snapshot_every == 0:
                        self.store[state.sid] = state.copy()
                        state.snapshotted = state.events
                    if self.drops.get(number) == "after":
                        del self.drops[number]
                        await drop(ws)
                        return
                    if self.drops.get(number) == "restart":  # the process dies after this packet
                        del self.drops[number]
                        self.sessions.clear()
                        await drop(ws)
                        return
                    if self.drops.get(number) == "mute":  # answer nothing more, drop after next
                        del self.drops[number]
                        self.drops[number + 1] = "after"
                        continue
                    if self.delay_s:
                        await asyncio.sleep(self.delay_s)
                    probs = toy_probs(state.counts)
                    top = [] if probs is None else sorted(
                        ((CLASSES[i], p) for i, p in enumerate(probs)), key=lambda e: -e[1])[:2]
                    durable = {} if self.snapshot_every is None else {"durable": reported}
                    await ws.send(msgpack.packb({
                        "type": "result", "seq": msg["seq"], "events": state.events,
                        "t": state.last_t, "probs": probs, "top": [list(e) for e in top], **durable}))
                    if state.snapshotted is not None:  # the write is done: say so from now on
                        state.durable = state.snapshotted
                elif kind == "reset" and state is not None:
                    state.counts[:] = 0
                    state.events = 0
                    state.last_t = None
                    state.durable, state.snapshotted = 0, None  # the old snapshot stays stored
                    await ws.send(msgpack.packb({"type": "reset_done", "session": state.sid,
                                                 "events": 0}))
                elif kind == "close":
                    if state is not None and state.sid in self.sessions:
                        self.closed[state.sid] = self.sessions.pop(state.sid)
                    await ws.close()
                    return
                else:
                    await self._error(ws, msg.get("seq"), "unknown_type", f"type {kind!r}")
        except Exception:  # a dropped client ends its handler; nothing else to do
            pass
        finally:
            self.live -= 1

    @staticmethod
    async def _error(ws: ServerConnection, seq: Any, code: str, message: str) -> None:
        await ws.send(msgpack.packb({"type": "error", "seq": seq, "code": code,
                                     "message": message}))

    @staticmethod
    def _apply(state: _State, msg: dict[str, Any]) -> tuple[str, str] | None:
        if "t" not in msg or "x" not in msg:
            return ("missing_column", "t and x are required")
        t = _column(msg["t"], "<i8")
        x = _column(msg["x"], "<u2")
        if len(t) != len(x):
            return ("length_mismatch", "columns differ")
        if len(x) and x.max() >= CHANNELS:
            return ("address_out_of_range", f"x={int(x.max())}")
        prev = state.last_t if state.last_t is not None else (t[0] if len(t) else 0)
        if len(t) and (np.diff(t, prepend=prev) < 0).any():
            return ("timestamps_decreasing", "time went backwards")
        np.add.at(state.counts, x % len(CLASSES), 1)
        state.events += len(t)
        if len(t):
            state.last_t = int(t[-1])
        return None


def make_recording(n: int = 500, seed: int = 0) -> Recording:
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.integers(0, 300, n)).astype(np.int64)
    x = rng.integers(0, CHANNELS, n).astype(np.uint16)
    return Recording(t, x)


@pytest.fixture()
def server() -> Any:
    with FakeServer() as srv:
        yield srv


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def closed_session(server: FakeServer, sid: str = "s0") -> _State:
    """The server's state of a session the client closed (its handler may lag the client)."""
    deadline = time.monotonic() + 5
    while sid not in server.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    return server.closed[sid]


# -- library -------------------------------------------------------------------------------------


def test_async_stream_results_in_order_match_offline(server: FakeServer) -> None:
    rec = make_recording()

    async def main() -> list[Any]:
        async with AsyncStreamSession(server.url, max_in_flight=3) as s:
            assert s.info is not None and s.info.model.name == "toy"
            assert s.info.model.sensor == SensorSpec.one_d(CHANNELS)
            assert s.info.model.classes == CLASSES
            return [r async for r in s.stream(packetize(rec, events=37))]

    results = run(main())
    assert [r.seq for r in results] == list(range(len(results)))
    assert results[-1].events == len(rec) and results[-1].t == int(rec.t[-1])
    assert results[0].probs is not None
    assert_close(results[-1].probs, offline_probs(rec))
    assert results[-1].label == results[-1].top[0][0]
    assert all(r.latency_s > 0 for r in results)


def test_int_array_columns_and_first_packet_without_prediction(server: FakeServer) -> None:
    rec = make_recording(10)

    async def main() -> list[Any]:
        async with AsyncStreamSession(server.url, binary=False) as s:
            return [r async for r in s.stream(packetize(rec, events=2))]

    results = run(main())
    assert results[0].probs is None and results[0].top == [] and results[0].label is None
    assert_close(results[-1].probs, offline_probs(rec))


def test_backpressure_bounds_packets_in_flight() -> None:
    rec = make_recording(400)
    seen: list[int] = []

    async def main() -> None:
        async with AsyncStreamSession(srv.url, max_in_flight=2) as s:
            async def watch() -> None:
                while True:
                    seen.append(s.in_flight)
                    await asyncio.sleep(0.001)

            watcher = asyncio.create_task(watch())
            async for _ in s.stream(packetize(rec, events=20)):
                pass
            watcher.cancel()

    with FakeServer(delay_s=0.01) as srv:
        run(main())
    assert max(seen) == 2


@pytest.mark.parametrize("when", ["before", "after"])
def test_reconnect_resumes_and_sends_each_packet_once(server: FakeServer, when: str) -> None:
    rec = make_recording(600, seed=3)
    server.drops = {5: when, 11: when}

    async def main() -> tuple[list[Any], int]:
        async with AsyncStreamSession(server.url, max_in_flight=4) as s:
            results = [r async for r in s.stream(packetize(rec, events=25))]
            return results, s.reconnects

    results, reconnects = run(main())
    assert reconnects == 2
    assert [r.seq for r in results] == list(range(24))
    state = closed_session(server)
    assert state.events == len(rec)  # no packet applied twice, none skipped
    assert_close(results[-1].probs, offline_probs(rec))
    lost = [r for r in results if r.lost]
    # Dropped after processing: the processed packet's answer is recovered with an empty
    # stand-in (the last of the processed prefix), so nothing is reported lost here.
    assert lost == []
    if when == "after":
        assert server.seen_seqs.count(4) == 2  # packet 4's stand-in (0 events) was sent again


def test_answers_lost_with_the_connection_are_flagged(server: FakeServer) -> None:
    rec = make_recording(300, seed=4)
    server.drops = {3: "mute"}  # packets 3 and 4 processed, neither answered, then a drop

    async def main() -> list[Any]:
        async with AsyncStreamSession(server.url, max_in_flight=4) as s:
            return [r async for r in s.stream(packetize(rec, events=30))]

    results = run(main())
    assert [r.seq for r in results] == list(range(10))
    assert [r.seq for r in results if r.lost] == [2]  # seq 3's answer recovered by its stand-in
    assert results[2].probs is None and results[2].events == 90
    assert results[3].events == 120 and results[3].probs is not None
    assert closed_session(server).events == 300
    assert_close(results[-1].probs, offline_probs(rec))


def test_reconnect_gives_up_with_connection_lost() -> None:
    rec = make_recording(200)

    async def main() -> None:
        async with AsyncStreamSession(srv.url, max_reconnect_attempts=2,
                                      backoff=(0.01, 0.02)) as s:
            srv.drops = {2: "before"}
            srv.max_sessions = 0
            srv.sessions.clear()  # the session is gone: resuming fails
            async for _ in s.stream(packetize(rec, events=10)):
                pass

    with FakeServer() as srv:
        with pytest.raises(SessionExpired) as info:
            run(main())
    assert info.value.code == "unknown_session"


def test_no_reconnect_raises_connection_lost(server: FakeServer) -> None:
    server.drops = {2: "before"}

    async def main() -> None:
        async with AsyncStreamSession(server.url, reconnect=False) as s:
            async for _ in s.stream(packetize(make_recording(100), events=10)):
                pass

    with pytest.raises(ConnectionLost):
        run(main())


def test_error_frames_are_typed_and_session_stays_usable(server: FakeServer) -> None:
    async def main() -> None:
        async with AsyncStreamSession(server.url) as s:
            good = make_recording(20)
            await s.send(good)
            assert (await s.recv()).events == 20
            await s.send(Recording(np.array([5, 3], np.int64), np.array([1, 2], np.uint16)))
            with pytest.raises(InvalidEvents) as err:
                await s.recv()
            assert err.value.code == "timestamps_decreasing" and err.value.seq == 1
            await s.send(Recording(np.array([10**9], np.int64), np.array([CHANNELS], np.uint16)))
            with pytest.raises(InvalidEvents) as err:
                await s.recv()
            assert err.value.code == "address_out_of_range"
            # state untouched: the next packet continues from 20 events
            await s.send(Recording(np.array([10**9], np.int64), np.array([1], np.uint16)))
            assert (await s.recv()).events == 21
            with pytest.raises(NothingInFlight):
                await s.recv()

    run(main())


def test_stream_can_yield_errors_in_place(server: FakeServer) -> None:
    packets = [make_recording(10), Recording(np.array([0], np.int64), np.array([99], np.uint16)),
               Recording(np.array([10**9], np.int64), np.array([1], np.uint16))]

    async def main() -> list[Any]:
        async with AsyncStreamSession(server.url) as s:
            return [r async for r in s.stream(packets, raise_errors=False)]

    items = run(main())
    assert [type(i).__name__ for i in items] == ["Result", "InvalidEvents", "Result"]
    assert items[2].events == 11


def test_unknown_model_and_server_full() -> None:
    async def open_one(url: str, model: str | None = None) -> AsyncStreamSession:
        s = AsyncStreamSession(url, model=model)
        await s.open()
        return s

    async def main(url: str) -> None:
        with pytest.raises(UnknownModel) as err:
            await open_one(url, "nope")
        assert err.value.code == "unknown_model"
        first = await open_one(url)
        with pytest.raises(ServerFull):
            await open_one(url)
        await first.close()

    with FakeServer(max_sessions=1) as srv:
        run(main(srv.url))


def test_resume_token_reattaches_to_the_same_state(server: FakeServer) -> None:
    rec = make_recording(300)
    a, b = rec.slice(0, 120), rec.slice(120, 300)

    async def main() -> Any:
        s1 = AsyncStreamSession(server.url)
        await s1.open()
        async for _ in s1.stream(packetize(a, events=40)):
            pass
        token = s1.resume_token
        s1._closing = True  # walk away without closing the server session
        ws = s1._ws
        assert ws is not None
        await ws.close()
        async with AsyncStreamSession(server.url, resume=token) as s2:
            assert s2.info is not None and s2.info.events == 120
            return [r async for r in s2.stream(packetize(b, events=40))][-1]

    last = run(main())
    assert last.events == 300
    assert_close(last.probs, offline_probs(rec))


def test_session_states_from_open_to_closed(server: FakeServer) -> None:
    async def main() -> list[SessionState]:
        s = AsyncStreamSession(server.url)
        seen = [s.state]
        await s.open()
        seen.append(s.state)
        async for _ in s.stream(packetize(make_recording(40), events=10)):
            pass
        seen.append(s.state)
        await s.close()
        seen.append(s.state)
        with pytest.raises(SessionClosed):
            await s.send(make_recording(5))
        await s.close()  # a second close changes nothing
        seen.append(s.state)
        return seen

    S = SessionState
    assert run(main()) == [S.NEW, S.OPEN, S.OPEN, S.CLOSED, S.CLOSED]


def test_reset_starts_over(server: FakeServer) -> None:
    rec = make_recording(100)

    async def main() -> Any:
        async with AsyncStreamSession(server.url) as s:
            async for _ in s.stream(packetize(make_recording(50, seed=9), events=10)):
                pass
            await s.reset()
            return [r async for r in s.stream(packetize(rec, events=10))][-1]

    last = run(main())
    assert last.events == 100
    assert_close(last.probs, offline_probs(rec))


def test_sync_session(server: FakeServer) -> None:
    rec = make_recording(300)
    server.drops = {4: "after"}
    with StreamSession(server.url, max_in_flight=2) as s:
        assert s.info is not None and s.session_id == "s0"
        results = list(s.stream(packetize(rec, events=30)))
        assert s.reconnects == 1
        seq = s.send(make_recording(5, seed=1).slice(0, 0))  # an empty packet is fine
        (empty,) = s.drain()
        assert empty.seq == seq and empty.events == 300
        assert s.poll() == []
    assert [r.seq for r in results] == list(range(10))
    assert_close(results[-1].probs, offline_probs(rec))


def test_sync_session_typed_error(server: FakeServer) -> None:
    with StreamSession(server.url) as s:
        s.send(Recording(np.array([0], np.int64), np.array([CHANNELS + 1], np.uint16)))
        with pytest.raises(InvalidEvents):
            s.recv(timeout=10)


def test_values_the_wire_cannot_carry_are_refused(server: FakeServer) -> None:
    with StreamSession(server.url) as s:
        with pytest.raises(ValueError, match="wire range"):
            s.send(Recording(np.array([0], np.int64), np.array([70000])))


# -- commands against the fake -------------------------------------------------------------------


def test_stream_command_json(server: FakeServer, tmp_path: Any, capsys: Any) -> None:
    from evssm.cli import main
    from evssm.client.sources import save_events

    rec = make_recording(400)
    path = save_events(tmp_path / "rec.npz", rec, label=2)
    assert main(["stream", str(path), "--url", server.url, "--fast", "--packet-events", "50",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    probs = offline_probs(rec)
    assert probs is not None
    assert out["events"] == 400 and out["packets"] == 8
    assert_close(out["probs"], probs)
    assert out["prediction"] == CLASSES[int(np.argmax(probs))]
    assert out["label_name"] == "c" and out["correct"] == (int(np.argmax(probs)) == 2)
    assert out["latency_ms"]["p50"] > 0


def test_stream_command_live_view_real_time(server: FakeServer, tmp_path: Any,
                                            capsys: Any) -> None:
    from evssm.cli import main
    from evssm.client.sources import save_events

    n = 200
    rec = Recording(np.arange(n, dtype=np.int64) * 1000, (np.arange(n) % CHANNELS).astype(np.uint16))
    path = save_events(tmp_path / "rec.npy", rec)  # 0.2 s of recording
    started = time.monotonic()
    assert main(["stream", str(path), "--url", server.url, "--packet-ms", "20",
                 "--speed", "1"]) == 0
    elapsed = time.monotonic() - started
    out = capsys.readouterr().out
    assert 0.15 < elapsed < 5
    assert "prediction:" in out and "events/s" in out


def test_stream_command_into_a_pipe_prints_whole_lines(server: FakeServer, tmp_path: Any) -> None:
    """Without a terminal (stdout a pipe) the final view and the summary are separate lines."""
    import subprocess
    import sys

    from evssm.client.sources import save_events

    rec = Recording(np.arange(300, dtype=np.int64) * 100, (np.arange(300) % CHANNELS).astype(np.uint16))
    path = save_events(tmp_path / "rec.npz", rec, label="b")
    proc = subprocess.run([sys.executable, "-m", "evssm.cli", "stream", str(path), "--url",
                           server.url, "--fast"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "true label: b" in lines, lines
    assert sum(line.startswith("prediction: ") for line in lines) == 1, lines
    assert lines.index("true label: b") < next(i for i, line in enumerate(lines)
                                               if line.startswith("prediction: "))
    assert "\x1b[" not in proc.stdout  # no cursor movement or colours into a pipe


def test_stream_command_sim_source_and_sensor_mismatch(server: FakeServer, tmp_path: Any,
                                                       capsys: Any) -> None:
    from evssm.cli import main
    from evssm.client.sources import save_events

    assert main(["stream", "sim:rate=5000,duration=0.2,label=1,classes=4", "--url", server.url,
                 "--fast", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["events"] > 500 and out["label"] == 1
    rec2d = Recording(np.arange(3, dtype=np.int64), np.zeros(3, np.uint16),
                      np.zeros(3, np.uint16), np.zeros(3, np.uint8))
    path = save_events(tmp_path / "cam.npy", rec2d)
    assert main(["stream", str(path), "--url", server.url, "--json"]) == 2  # a user error
    assert "2-D" in capsys.readouterr().err


def test_stream_command_cannot_connect(capsys: Any) -> None:
    from evssm.cli import main

    assert main(["stream", "sim", "--url", "ws://127.0.0.1:9", "--json"]) == 1
    assert "cannot connect" in capsys.readouterr().err


def test_bench_serve_real_time(server: FakeServer, capsys: Any) -> None:
    from evssm.cli import main

    started = time.monotonic()
    assert main(["bench", "serve", "--url", server.url, "--sessions", "3", "--rate", "4000",
                 "--duration", "1.0", "--packet-events", "100"]) == 0
    assert time.monotonic() - started < 20
    report = json.loads(capsys.readouterr().out)
    assert report["offered_events_per_s"] == 12000
    assert report["sessions"] == {"requested": 3, "opened": 3, "kept_up": 3,
                                  "share_real_time": 1.0, "reconnects": 0}
    assert 0.6 * 12000 < report["achieved_events_per_s"] < 1.5 * 12000
    assert report["errors"] == {}
    assert report["latency_ms"]["p50"] > 0 and report["latency_ms"]["p99"] is not None
    assert report["packets"]["sent"] == report["packets"]["answered"] > 0
    assert report["model"]["name"] == "toy"
    assert report["environment"]["versions"]["websockets"]


def test_bench_serve_max_rate_and_errors_by_code(capsys: Any) -> None:
    from evssm.cli import main

    with FakeServer(max_sessions=2) as srv:
        assert main(["bench", "serve", "--url", srv.url, "--sessions", "3", "--rate", "max",
                     "--duration", "0.5", "--packet-ms", "5"]) == 0
        deadline = time.monotonic() + 5
        while srv.live and time.monotonic() < deadline:  # handlers may lag the client's close
            time.sleep(0.01)
        assert srv.live == 0  # every connection was closed
    report = json.loads(capsys.readouterr().out)
    assert report["offered_events_per_s"] is None
    assert report["sessions"]["opened"] == 2 and report["sessions"]["share_real_time"] is None
    assert report["errors"] == {"server_full": 1}
    assert report["achieved_events_per_s"] > 0


# -- resuming from snapshots (a server restarted with --state-dir) -------------------------------


def test_restore_from_an_older_snapshot_replays_what_it_lacks() -> None:
    """Snapshots after every 4th packet; the server dies after packet 14 with 3 packets in flight
    unanswered. The restored session holds 12 packets' events: the client replays the answered ones
    after that point (merged into larger packets), resends those in flight, and the state is
    exactly one of an unbroken stream."""
    rec = make_recording(1000, seed=5)

    async def main() -> tuple[list[Any], AsyncStreamSession]:
        async with AsyncStreamSession(srv.url, max_in_flight=3, replay_packet_events=60) as s:
            results = [r async for r in s.stream(packetize(rec, events=25))]
            return results, s

    with FakeServer(snapshot_every=4) as srv:
        srv.drops = {14: "restart"}
        results, session = run(main())
        state = closed_session(srv, "s0")
    assert [r.seq for r in results] == list(range(40)) and not any(r.lost for r in results)
    assert state.events == 1000  # no event applied twice onto the restored state, none skipped
    assert_close(results[-1].probs, offline_probs(rec))
    (resume,) = session.resumes
    assert resume.restored and resume.events == 12 * 25 and not resume.new_session
    # Packets 13 and 14 were processed; whether their answers arrived before the connection died
    # is a race: answered ones are replayed, the others are recovered as in-flight packets.
    assert resume.replayed in (0, 25, 50)
    # durable never ran ahead of the answers; the replay buffer holds only what follows it.
    assert all(r.durable is not None and r.durable <= r.events for r in results)
    assert session.replay_events == 1000 - session.durable


def test_replay_merges_answered_packets() -> None:
    rec = make_recording(600, seed=6)

    async def main() -> list[Any]:
        async with AsyncStreamSession(srv.url, max_in_flight=1, replay_packet_events=80) as s:
            return [r async for r in s.stream(packetize(rec, events=20))]

    with FakeServer(snapshot_every=10) as srv:
        srv.drops = {19: "restart"}  # snapshot at 10 packets; 8 answered after it, then the drop
        results = run(main())
        sizes = srv.packet_sizes
    assert_close(results[-1].probs, offline_probs(rec))
    # After 19 packets of 20: the replay of packets 11..18 (160 events) as two packets of 80.
    assert sizes[:19] == [20] * 19 and sizes[19:21] == [80, 80] and set(sizes[21:]) == {20}


def test_reset_not_covered_by_a_snapshot_is_replayed_from_its_start() -> None:
    """The last snapshot predates a reset when the server dies: the restored state is the old
    stream's, so the client resets it and replays the new stream from its start."""
    first, second = make_recording(200, seed=7), make_recording(300, seed=8)

    async def main() -> tuple[Any, AsyncStreamSession]:
        async with AsyncStreamSession(srv.url, max_in_flight=1) as s:
            async for _ in s.stream(packetize(first, events=20)):
                pass
            await s.reset()
            srv.drops = {srv.packets_processed + 4: "restart"}  # before the new stream's snapshot
            results = [r async for r in s.stream(packetize(second, events=20))]
            return results, s

    with FakeServer(snapshot_every=5) as srv:  # 10 packets: snapshots at 5 and 10, then reset
        results, session = run(main())
        state = closed_session(srv, "s0")
    assert srv.restored == 1 and state.events == 300
    assert_close(results[-1].probs, offline_probs(second))
    (resume,) = session.resumes
    assert resume.restored and resume.events == 200  # the old stream's snapshot came back
    assert resume.replayed == 60  # the new stream's 3 answered packets, from its start


def test_session_gone_before_its_first_snapshot_is_replayed_into_a_new_one() -> None:
    rec = make_recording(400, seed=9)

    async def main() -> tuple[list[Any], AsyncStreamSession]:
        async with AsyncStreamSession(srv.url, max_in_flight=1) as s:  # 5 answered at the drop
            return [r async for r in s.stream(packetize(rec, events=40))], s

    with FakeServer(snapshot_every=0) as srv:  # snapshots on, none taken yet
        srv.drops = {6: "restart"}
        results, session = run(main())
        state = closed_session(srv, "s1")
    assert state.events == 400
    assert_close(results[-1].probs, offline_probs(rec))
    (resume,) = session.resumes
    assert resume.new_session and resume.events == 0 and resume.replayed == 200
    assert session.session_id == "s1"


def test_replay_buffer_is_bounded_and_overflow_is_a_clear_mismatch() -> None:
    rec = make_recording(1000, seed=10)

    async def main() -> None:
        async with AsyncStreamSession(srv.url, max_in_flight=2, max_replay_events=100) as s:
            async for _ in s.stream(packetize(rec, events=25)):
                assert s.replay_events <= 100

    with FakeServer(snapshot_every=0) as srv:  # no snapshot after the one made at open:
        srv.store["s0"] = _State("s0").copy()  # the restore goes back to 0 events
        srv.drops = {20: "restart"}
        with pytest.raises(SessionExpired) as info:
            run(main())
    assert info.value.code == "resume_mismatch" and "max_replay_events" in str(info.value)


def test_without_snapshots_nothing_is_kept(server: FakeServer) -> None:
    rec = make_recording(500, seed=11)

    async def main() -> tuple[list[Any], int]:
        async with AsyncStreamSession(server.url, max_in_flight=2) as s:
            kept = 0
            results = []
            async for r in s.stream(packetize(rec, events=25)):
                results.append(r)
                kept = max(kept, s.replay_events)
            assert s.durable is None
            return results, kept

    results, kept = run(main())
    assert kept == 0 and all(r.durable is None for r in results)


def test_packets_refused_while_draining_are_sent_again() -> None:
    rec = make_recording(500, seed=12)

    async def main() -> tuple[list[Any], AsyncStreamSession]:
        async with AsyncStreamSession(srv.url, max_in_flight=4) as s:
            return [r async for r in s.stream(packetize(rec, events=25))], s

    with FakeServer(snapshot_every=100) as srv:
        srv.draining_after = 8
        results, session = run(main())
        state = closed_session(srv)
    assert [r.seq for r in results] == list(range(20)) and state.events == 500
    assert_close(results[-1].probs, offline_probs(rec))
    (resume,) = session.resumes
    assert resume.restored and resume.events == 200 and resume.replayed == 0 and resume.resent >= 2


def test_stream_command_shows_where_it_resumed(tmp_path: Any, capsys: Any) -> None:
    from evssm.cli import main
    from evssm.client.sources import save_events

    rec = make_recording(800, seed=13)
    path = save_events(tmp_path / "rec.npz", rec)
    with FakeServer(snapshot_every=4) as srv:
        srv.drops = {10: "restart"}
        # One packet in flight: packet 9 is answered before packet 10 goes, so the restored
        # snapshot (8 packets) lacks one answered packet, which is replayed.
        assert main(["stream", str(path), "--url", srv.url, "--fast", "--packet-events", "50",
                     "--max-in-flight", "1", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        srv.drops = {srv.packets_processed + 10: "restart"}
        assert main(["stream", str(path), "--url", srv.url, "--fast", "--packet-events", "50",
                     "--max-in-flight", "1"]) == 0
        text = capsys.readouterr().out
    assert_close(out["probs"], offline_probs(rec))
    assert out["reconnects"] == 1
    (resume,) = out["resumes"]
    assert resume == {"events": 400, "restored": True, "new_session": False, "replayed": 50,
                      "resent": 1}
    assert "resumed at event 400 from a snapshot" in text and "replayed 50 answered events" in text
