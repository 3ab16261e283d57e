"""Session snapshots inside a running server (uvicorn on 127.0.0.1, the tiny model, real clients).

- snapshots taken while many sessions stream are each exactly a state of their stream (the rows
  are read on the step thread between steps while the event loop keeps accepting packets);
- packets longer than one step are snapshotted only between packets, never between two chunks;
- ``durable`` in result frames, closed and evicted sessions' snapshots deleted, two connections
  restoring the same token get one session, a store that cannot be reached costs only durability;
- a restored token resumes only for the API key that opened it, and counts against that key's
  session cap.

Restarts of real server processes (SIGTERM, SIGKILL, replicas sharing Redis) are in
test_server_restart.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgpack
import numpy as np
import pytest
from conftest import free_port, redis_server, wait_ready
from numeric import assert_close
from websockets.asyncio.client import connect

from evssm.client import AsyncStreamSession, SessionExpired, SimulatedSensor, classify, packetize
from evssm.models.events import Recording, SensorSpec, time_gaps, tokenize
from evssm.models.streaming import softmax
from evssm.server.app import create_app
from evssm.server.core.snapshots import DiskStore, decode, token_key
from evssm.server.settings import Settings

T = TypeVar("T")

pytestmark = pytest.mark.timeout(300)

BASE = Settings(batch_buckets=(1, 4), length_buckets=(64, 256), classify_length_buckets=(),
                max_sessions=16, session_idle_timeout=60.0, snapshot_interval=0.05)
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture
def start(serve, tiny_model):
    def _start(model: Any = None, **changes: Any):
        app = create_app(BASE.replace(**changes), models={"small": model or tiny_model})
        server = serve(app)
        wait_ready(server.http)
        server.engine = app.state.engine
        return server
    return _start


def sim(seed: int, seconds: float = 0.5) -> Recording:
    return SimulatedSensor(SensorSpec.one_d(700), 20_000, label=seed % 20, num_classes=20,
                           seed=seed).recording(seconds)


def stored(state: Path) -> dict[str, bytes]:
    """The state directory's records by key, read by another connection than the server's."""
    path = state / DiskStore.FILE
    if not path.exists():
        return {}
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        return {key: bytes(data) for key, data in db.execute("SELECT key, data FROM snapshots")}


def copy_store(src: Path, dst: Path) -> None:
    """The state directory's database as it is now, into ``dst`` (a consistent copy)."""
    dst.mkdir(exist_ok=True)
    with contextlib.closing(sqlite3.connect(src / DiskStore.FILE)) as db:
        db.execute(f"VACUUM INTO '{dst / DiskStore.FILE}'")


def snapshots_while(state: Path, run: Callable[[], T], covered: Callable[[Any], int | None] = lambda rec: rec.events,
                    every_s: float = 0.005) -> tuple[T, dict[str, dict[int, Any]]]:
    """``run()``'s result, and every record a thread read from the state directory ``state``
    every ``every_s`` seconds while it ran: by store key, then by ``covered(record)`` (the events
    sent it covers; None: not counted)."""
    seen: dict[str, dict[int, Any]] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for key, data in stored(state).items():
                rec = decode(data)
                at = covered(rec)
                if at is not None:
                    seen.setdefault(key, {})[at] = rec
            time.sleep(every_s)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        return run(), seen
    finally:
        stop.set()
        watcher.join(10)


def checked_in_rounds(one_round: Callable[[], int], need: int, rounds: int = 4) -> int:
    """Run ``one_round`` (a streaming round that checks every snapshot it saw -> how many it
    checked) until ``need`` have been checked, at most ``rounds`` times -> the total. How many
    snapshots land inside a stream depends on how fast the server answers."""
    checked = 0
    for _ in range(rounds):
        checked += one_round()
        if checked >= need:
            break
    return checked


def stream_each(ws: str, recs: list[Recording], packet_events: int, *, max_in_flight: int,
                options: list[dict[str, Any]] | None = None) -> list[tuple[str, list[Any]]]:
    """Stream every recording in a session of its own, all at once, as fast as the server
    answers (each session opened with ``options[i]``) -> each session's resume token and
    results."""
    async def one(rec: Recording, opts: dict[str, Any]) -> tuple[str, list[Any]]:
        async with AsyncStreamSession(ws, max_in_flight=max_in_flight, **opts) as s:
            token = s.resume_token
            assert token is not None
            return token, [r async for r in s.stream(packetize(rec, events=packet_events))]

    async def main() -> list[tuple[str, list[Any]]]:
        return await asyncio.gather(*(one(r, o) for r, o in zip(
            recs, options or [{}] * len(recs), strict=True)))

    return asyncio.run(main())


def server_steps(events: int, packet_events: int, max_length: int) -> list[tuple[int, int]]:
    """(start, stop) of the steps that streamed the first ``events`` events in packets of
    ``packet_events``: each packet in consecutive pieces of at most ``max_length``."""
    steps = []
    for p in range(0, events, packet_events):
        end = min(p + packet_events, events)
        steps += [(a, min(a + max_length, end)) for a in range(p, end, max_length)]
    return steps


@pytest.mark.parametrize("packet_events", [97, 600])
def test_snapshots_taken_under_load_are_states_of_their_streams(start, tiny_model, tmp_path: Path,
                                                                 packet_events: int) -> None:
    """Four sessions stream as fast as the server answers while snapshots are taken every 50 ms
    and a thread reads them back: every snapshot is exactly the state after its event count, and
    continuing from it gives the answer of the whole recording. Packets of 600 events take three
    steps each (the largest length bucket is 256): a snapshot never lands between two of them."""
    # Longer packets stream faster: snapshots are taken more often to see as many.
    server = start(state_dir=str(tmp_path), snapshot_interval=0.05 if packet_events < 256 else 0.01)
    recs = [sim(seed, 1.5) for seed in range(4)]
    outcome, seen = snapshots_while(
        tmp_path, lambda: stream_each(server.ws, recs, packet_events, max_in_flight=4), every_s=0.01)
    sensor = SensorSpec.one_d(700)
    checked = 0
    for rec, (token, results) in zip(recs, outcome, strict=False):
        # durable: present, never ahead of the answer, never decreasing, and it moved.
        durable = [r.durable for r in results]
        assert all(d is not None and 0 <= d <= r.events for d, r in zip(durable, results, strict=False))
        assert durable == sorted(durable) and durable[-1] > 0
        tokens = tokenize(sensor, rec.x)
        gaps = time_gaps(rec.t)
        snaps = seen.get(token_key(token), {})
        assert len(snaps) >= 2, f"only {sorted(snaps)} snapshots seen"
        expected = np.asarray(classify(server.http, [rec])[0].probs)
        for events, snap in sorted(snaps.items()):
            assert snap.model == "small" and snap.last_t == (int(rec.t[events - 1]) if events else None)
            assert events % packet_events == 0 or events == len(rec), f"a snapshot at {events} events"
            if events == 0:  # opened, nothing streamed yet: the zero state
                assert not snap.row.any() and snap.probs is None
                continue
            # The row is the state after exactly `events` events, bit for bit, when stepped in the
            # server's own steps (each packet in pieces of at most the largest length bucket: the
            # head adds each step's sums to its running pool once, compensated).
            state, logits = tiny_model.init_state(1), None
            for a, b in server_steps(events, packet_events, max(BASE.length_buckets)):
                state, logits, _ = tiny_model.step(state, tokens[None, a:b], gaps[None, a:b],
                                                   np.array([b - a], np.int32))
            np.testing.assert_array_equal(snap.row, np.asarray(state)[0])
            if snap.probs is not None:
                assert_close(snap.probs, softmax(np.asarray(logits))[0], rtol=RTOL, atol=ATOL)
            # Continuing from the row ends where the whole recording ends.
            rest = len(rec) - events
            _, logits, _ = tiny_model.step(snap.row[None], tokens[None, events:], gaps[None, events:],
                                           np.array([rest], np.int32))
            assert_close(softmax(np.asarray(logits))[0], expected, rtol=RTOL, atol=ATOL)
            checked += 1
    assert checked >= 10
    # Every session was closed: its snapshot is gone and its token resumes nothing.
    deadline = time.monotonic() + 5
    while stored(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stored(tmp_path) == {}


async def raw_open(ws_url: str, **fields: Any) -> tuple[Any, dict]:
    ws = await connect(f"{ws_url}/v1/stream")
    await ws.send(msgpack.packb({"type": "open", **fields}))
    return ws, msgpack.unpackb(await ws.recv())


def test_closed_and_evicted_sessions_leave_no_snapshot(start, tmp_path: Path) -> None:
    server = start(state_dir=str(tmp_path), session_idle_timeout=1.0)
    rec = sim(7, 0.1)

    async def main() -> None:
        ws, opened = await raw_open(server.ws)
        assert opened["durable"] == 0 and opened["restored"] is False
        token = opened["resume"]
        key = token_key(token)
        await ws.send(msgpack.packb({"type": "events", "seq": 0, "t": rec.t.tolist(), "x": rec.x.tolist()}))
        assert msgpack.unpackb(await ws.recv())["durable"] == 0
        deadline = time.monotonic() + 5
        while key not in stored(tmp_path):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        for seq in range(1, 100):  # empty packets: the answer carries durable once written
            await ws.send(msgpack.packb({"type": "events", "seq": seq, "t": [], "x": []}))
            if msgpack.unpackb(await ws.recv())["durable"] == len(rec):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("durable never reached the snapshot's event count")
        await ws.send(msgpack.packb({"type": "close"}))
        assert msgpack.unpackb(await ws.recv())["type"] == "closed"
        # At once: a closed session's token resumes nothing, from memory or from its snapshot.
        await ws.send(msgpack.packb({"type": "open", "resume": token}))
        assert msgpack.unpackb(await ws.recv())["code"] == "unknown_session"
        await ws.close()
        deadline = time.monotonic() + 5
        while key in stored(tmp_path):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        # Evicted after the idle timeout: the snapshot goes with the session.
        ws, opened = await raw_open(server.ws)
        key = token_key(opened["resume"])
        await asyncio.sleep(0.3)
        assert key in stored(tmp_path)
        await ws.close()
        deadline = time.monotonic() + 5
        while key in stored(tmp_path):
            assert time.monotonic() < deadline, "the evicted session's snapshot stayed"
            await asyncio.sleep(0.05)
        ws, reply = await raw_open(server.ws, resume=opened["resume"])
        assert reply["code"] == "unknown_session"
        await ws.close()

    asyncio.run(main())


def test_two_connections_restoring_one_token_get_one_session(start, tmp_path: Path) -> None:
    """A session in the state dir but not in memory (as after a restart); two connections resume
    it at once: one restore, both see the same session."""
    first = start(state_dir=str(tmp_path / "a"))
    rec = sim(3, 0.1)

    async def make() -> tuple[str, int]:
        ws, opened = await raw_open(first.ws)
        await ws.send(msgpack.packb({"type": "events", "seq": 0, "t": rec.t.tolist(), "x": rec.x.tolist()}))
        await ws.recv()
        await ws.close()
        return opened["resume"], len(rec)

    token, events = asyncio.run(make())
    first.call(first.engine.drain(timeout=10))
    # A second server process would find this directory; here a second app does.
    copy_store(tmp_path / "a", tmp_path / "b")
    second = start(state_dir=str(tmp_path / "b"))

    async def race() -> list[list[dict]]:
        async def one() -> list[dict]:
            async with connect(f"{second.ws}/v1/stream") as ws:
                await ws.send(msgpack.packb({"type": "open", "resume": token}))
                frames = [msgpack.unpackb(await ws.recv())]
                return frames
        return await asyncio.gather(one(), one())

    outcomes = asyncio.run(race())
    opened = [frames[0] for frames in outcomes]
    assert [o["type"] for o in opened] == ["opened", "opened"], opened
    assert opened[0]["session"] == opened[1]["session"] and {o["events"] for o in opened} == {events}
    assert opened[0]["restored"] or opened[1]["restored"]
    metrics = httpx.get(f"{second.http}/metrics").text
    assert 'evssm_sessions_restored_total{model="small"} 1.0' in metrics
    assert len(second.engine.table) == 1


def test_a_store_that_cannot_be_reached_costs_durability_only(start, tmp_path: Path) -> None:
    """Redis stopped: sessions open and stream as before (durable stays 0), resuming an unknown
    token says the store is unavailable (the client retries), and once Redis is back the
    snapshots are written."""
    port = free_port()  # nothing listens there yet
    server = start(state_store=f"redis://127.0.0.1:{port}/0", snapshot_interval=0.1)
    rec = sim(5, 0.2)

    async def main() -> list[Any]:
        async with AsyncStreamSession(server.ws) as s:
            results = [r async for r in s.stream(packetize(rec, events=256))]
            await asyncio.sleep(0.3)  # three snapshot passes fail
            return results

    results = asyncio.run(main())
    assert results[-1].durable == 0 and results[-1].events == len(rec)
    assert_close(results[-1].probs, classify(server.http, [rec])[0].probs, rtol=RTOL, atol=ATOL)

    async def resume_unknown() -> None:
        s = AsyncStreamSession(server.ws, resume="a-token-this-server-never-saw", reconnect=False)
        with pytest.raises(Exception) as info:
            await s.open()
        assert getattr(info.value, "code", None) == "store_unavailable"

    asyncio.run(resume_unknown())
    metrics = httpx.get(f"{server.http}/metrics").text
    assert 'evssm_snapshot_failures_total{reason="store_error"}' in metrics
    # Redis comes back on the same port: the next pass writes the live session.
    with redis_server(tmp_path, port=port):
        async def live() -> int:
            async with AsyncStreamSession(server.ws) as s:
                await s.send(rec.slice(0, 100))
                await s.recv()
                deadline = time.monotonic() + 10
                while True:
                    await s.send(Recording(np.zeros(0, np.int64), np.zeros(0, np.uint16)))
                    r = await s.recv()
                    if r.durable == 100:
                        return r.durable
                    assert time.monotonic() < deadline, "no snapshot after Redis came back"
                    await asyncio.sleep(0.1)

        assert asyncio.run(live()) == 100


def test_resume_of_an_unknown_token_without_a_store_is_unchanged(start) -> None:
    server = start()

    async def main() -> None:
        ws, opened = await raw_open(server.ws)
        assert "durable" in opened and opened["durable"] is None and opened["restored"] is False
        await ws.send(msgpack.packb({"type": "events", "seq": 0, "t": [1, 2], "x": [3, 4]}))
        assert "durable" not in msgpack.unpackb(await ws.recv())
        await ws.close()
        with pytest.raises(SessionExpired) as info:
            await AsyncStreamSession(server.ws, resume="nope", reconnect=False).open()
        assert info.value.code == "unknown_session"

    asyncio.run(main())


def test_a_declared_sensor_and_its_crop_survive_a_restore(start, tmp_path: Path) -> None:
    """A session maps a 1,000-channel source onto the model's 700 channels with a crop that drops
    events. Restored from its snapshot by another server, it keeps the mapping and the cropped
    count, the client's replay counts events sent (kept and cropped), and the stream ends with the
    answer of the whole recording classified with the same declaration."""
    source = SensorSpec.one_d(1000)
    transform = {"crop": [100, 800]}
    rng = np.random.default_rng(4)
    n = 6000
    rec = Recording(np.cumsum(rng.integers(0, 200, n)).astype(np.int64), rng.integers(0, 1000, n).astype(np.uint16))
    first = start(state_dir=str(tmp_path / "a"))
    (want,) = classify(first.http, [rec], sensors=[source], transform=transform)

    async def part_one() -> tuple[str, int, int]:
        s = AsyncStreamSession(first.ws, sensor=source, transform=transform, reconnect=False)
        await s.open()
        r = [answer async for answer in s.stream(packetize(rec.slice(0, 3000), events=250))][-1]
        assert r.cropped > 0 and r.events + r.cropped == 3000
        deadline = time.monotonic() + 10
        while True:  # until a snapshot covers everything sent
            await s.send(rec.slice(3000, 3000))
            if (await s.recv()).durable == 3000:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        token = s.resume_token
        s._closing = True  # walk away without closing the server session
        await s._ws.close()  # type: ignore[union-attr]
        return token, r.events, r.cropped

    token, kept, cropped = asyncio.run(part_one())
    first.call(first.engine.drain(timeout=10))
    copy_store(tmp_path / "a", tmp_path / "b")
    second = start(state_dir=str(tmp_path / "b"))

    async def part_two() -> Any:
        async with AsyncStreamSession(second.ws, resume=token, sensor=source, transform=transform,
                                      reconnect=False) as s:
            assert s.info is not None and s.info.restored
            assert (s.info.events, s.info.cropped) == (kept, cropped)
            assert s.info.geometry is not None and s.info.geometry["transform"]["crop"][::2] == [100, 800]
            return [r async for r in s.stream(packetize(rec.slice(3000, n), events=250))][-1]

    last = asyncio.run(part_two())
    assert last.events + last.cropped == n
    assert_close(last.probs, want.probs, rtol=RTOL, atol=ATOL)


KEY_A = "alpha-" + "a1" * 12
KEY_B = "beta-" + "b2" * 12


def test_a_restored_token_resumes_only_for_its_key_and_counts_against_its_cap(start, tmp_path: Path) -> None:
    """With API keys and one session per key: the snapshot holds the id of the key that opened
    the session (not the key). Restored by another server, the token is unknown to another key
    (and that attempt changes nothing), is refused while its key is at its cap, resumes for its
    key, and then counts: that key can open no other session, another key can."""
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY_A}\n{KEY_B}\n")
    keys.chmod(0o600)
    options = dict(api_keys=str(keys), max_sessions_per_client=1)
    first = start(state_dir=str(tmp_path / "a"), **options)
    rec = sim(11, 0.1)

    async def request(ws: Any, msg: dict) -> dict:
        await ws.send(msgpack.packb(msg))
        return msgpack.unpackb(await asyncio.wait_for(ws.recv(), 30))

    def connect_as(server: Any, key: str) -> Any:
        return connect(f"{server.ws}/v1/stream", additional_headers={"Authorization": f"Bearer {key}"})

    async def make() -> str:
        ws = await connect_as(first, KEY_A)
        token = (await request(ws, {"type": "open"}))["resume"]
        await request(ws, {"type": "events", "seq": 0, "t": rec.t.tolist(), "x": rec.x.tolist()})
        for seq in range(1, 200):  # until a snapshot covers it
            if (await request(ws, {"type": "events", "seq": seq, "t": [], "x": []}))["durable"] == len(rec):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("no snapshot covered the packet")
        await ws.close()  # dropped without close: the session waits for a resume
        return token

    token = asyncio.run(make())
    first.call(first.engine.drain(timeout=10))
    copy_store(tmp_path / "a", tmp_path / "b")
    blob = stored(tmp_path / "b")[token_key(token)]
    assert decode(blob).key_id and KEY_A.encode() not in blob and KEY_B.encode() not in blob
    second = start(state_dir=str(tmp_path / "b"), **options)

    async def resume() -> None:
        async with connect_as(second, KEY_B) as ws:  # another key: as unknown as a wrong token
            assert (await request(ws, {"type": "open", "resume": token}))["code"] == "unknown_session"
        assert len(second.engine.table) == 0 and token_key(token) in stored(tmp_path / "b")
        async with connect_as(second, KEY_A) as fresh, connect_as(second, KEY_A) as ws:
            assert (await request(fresh, {"type": "open"}))["type"] == "opened"  # KEY_A's one session
            refused = await request(ws, {"type": "open", "resume": token})
            assert refused["code"] == "too_many_sessions", refused
            assert (await request(fresh, {"type": "close"}))["type"] == "closed"
        async with connect_as(second, KEY_A) as ws:
            opened = await request(ws, {"type": "open", "resume": token})
            assert opened["type"] == "opened" and opened["restored"] and opened["events"] == len(rec)
            assert opened["durable"] == len(rec)
            async with connect_as(second, KEY_A) as other:  # the restored session counts
                assert (await request(other, {"type": "open"}))["code"] == "too_many_sessions"
            async with connect_as(second, KEY_B) as other:
                assert (await request(other, {"type": "open"}))["type"] == "opened"
            assert (await request(ws, {"type": "close"}))["type"] == "closed"

    asyncio.run(resume())
    metrics = httpx.get(f"{second.http}/metrics", headers={"Authorization": f"Bearer {KEY_A}"}).text
    assert 'evssm_sessions_restored_total{model="small"} 1.0' in metrics


@pytest.mark.parametrize("backend", ["native", "xla"])
def test_frames_sent_right_behind_a_restore_apply_after_it(start, tiny_model, tmp_path: Path,
                                                           backend: str) -> None:
    """A restored session's first frames, sent without waiting: a packet (stepped from the restored
    state, in the plan that writes it or later), a reset, an empty packet and a packet. Answers come
    in order and equal classify of the whole stream before the reset and of the last packet after.
    The snapshot comes from a server with the native step; the restoring server's step is native
    or XLA's (the same packed rows and weights), and with XLA's its row writes and reads compile
    nothing after start-up."""
    from evssm.models.streaming import StreamingModel

    # Snapshots expire after the idle timeout: the restoring server (XLA's step compiles for
    # minutes on a loaded 2-core machine) must find the record still alive.
    first = start(state_dir=str(tmp_path / "a"), session_idle_timeout=900.0)
    rec = sim(21, 0.3)
    half = len(rec) // 2

    async def make() -> str:
        ws, opened = await raw_open(first.ws)
        part = rec.slice(0, half)
        await ws.send(msgpack.packb({"type": "events", "seq": 0, "t": part.t.tolist(), "x": part.x.tolist()}))
        await ws.recv()
        await ws.close()
        return opened["resume"]

    token = asyncio.run(make())
    first.call(first.engine.drain(timeout=10))
    copy_store(tmp_path / "a", tmp_path / "b")
    model = tiny_model if backend == "native" else StreamingModel(tiny_model.config, tiny_model.variables,
                                                                  backend="xla")
    second = start(model, state_dir=str(tmp_path / "b"), session_idle_timeout=900.0)
    compiled = httpx.get(f"{second.http}/readyz").json()["compilations"]["small"]
    tail = rec.slice(half, len(rec))
    want_all, want_tail = classify(second.http, [rec, tail])

    async def resume() -> list[dict]:
        async with connect(f"{second.ws}/v1/stream") as ws:
            frames = [{"type": "open", "resume": token},
                      {"type": "events", "seq": 1, "t": tail.t.tolist(), "x": tail.x.tolist()},
                      {"type": "reset"}, {"type": "events", "seq": 2, "t": [], "x": []},
                      {"type": "events", "seq": 3, "t": tail.t.tolist(), "x": tail.x.tolist()}]
            for frame in frames:
                await ws.send(msgpack.packb(frame))
            return [msgpack.unpackb(await asyncio.wait_for(ws.recv(), 30)) for _ in frames]

    replies = asyncio.run(resume())
    assert [r["type"] for r in replies] == ["opened", "result", "reset_done", "result", "result"], replies
    assert replies[0]["restored"] and replies[0]["events"] == half
    assert replies[1]["events"] == len(rec)
    assert_close(replies[1]["probs"], want_all.probs, rtol=RTOL, atol=ATOL)
    assert replies[3]["events"] == 0 and replies[3]["probs"] is None and replies[3]["durable"] == 0
    assert replies[4]["events"] == len(tail)
    assert_close(replies[4]["probs"], want_tail.probs, rtol=RTOL, atol=ATOL)
    assert httpx.get(f"{second.http}/readyz").json()["compilations"]["small"] == compiled
