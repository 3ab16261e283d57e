"""Snapshots keep sliding windows, over real sockets (uvicorn on 127.0.0.1, the client library),
tiny model, a state directory.

A snapshot of a windowed session holds every lane's row and the window's lane state as of the
same packet; a session restored from it (another server on a copy of the store, or a client's
replay of what the snapshot lacks) answers each packet as if it had never stopped: every result
after the restore equals ``/v1/classify`` of exactly the events its ``window`` names.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sqlite3
import zlib
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from conftest import scrape
from numeric import assert_close, assert_finite, seeded_rng
from test_durability import checked_in_rounds, copy_store, snapshots_while, stored, stream_each
from test_live_filters_served import replay_after_switch, snapshot_then_leave
from test_live_windows_served import HOUR_US, live_stream
from test_server_stream import classify
from websockets.asyncio.client import connect

from evssm.client import AsyncStreamSession, Result, packetize
from evssm.models.events import Recording
from evssm.server.api.windows import SessionWindow, WindowError
from evssm.server.core import durability
from evssm.server.core.snapshots import MAGIC, VERSION, DiskStore, decode, encode, token_key
from evssm.server.live.windows import WindowPlan, WindowSpec
from evssm.server.settings import Settings

pytestmark = pytest.mark.timeout(600)

BASE = Settings(batch_buckets=(1, 4), length_buckets=(128,), classify_length_buckets=(1024,),
                max_sessions=16, max_packet_events=8192, max_classify_events=200_000,
                session_idle_timeout=60.0, snapshot_interval=0.05)
TIME_WINDOW = {"ms": 2000, "hop_ms": 500}  # 4 lanes
COUNT_WINDOW = {"events": 300, "hop": 100}  # 3 lanes


def recording(seed: str, bursts: int) -> Recording:
    t, x = live_stream(seeded_rng("window-snapshots", seed), bursts)
    return Recording(t, x.astype(np.uint16))


def check_windows(base: str, rec: Recording, results: list[Result]) -> None:
    """Each result names the stream's last ``window.events`` events from ``t0``; its answer is
    classify's of exactly those (finite, then close)."""
    assert results
    windows = []
    for r in results:
        assert r.window is not None, r
        first = r.events - r.window["events"]
        assert 0 <= first < r.events and int(rec.t[first]) == r.window["t0"], (r.window, r.events)
        windows.append((rec.t[first:r.events], rec.x[first:r.events].astype(np.int64)))
    answered = 0
    for r, want in zip(results, classify(base, windows), strict=True):
        assert (r.probs is None) == (want["probs"] is None), (r.probs, want["probs"])
        if r.probs is not None:
            assert_close(assert_finite(r.probs), assert_finite(want["probs"]), rtol=1e-3, atol=2e-6)
            answered += 1
    assert answered > len(results) // 2


# --- restore on another server ---------------------------------------------------------------------
def test_a_windowed_session_restored_on_another_server_answers_each_window(start, tmp_path: Path) -> None:
    """Streamed halfway in a time window, snapshotted, the first server drained, a second one
    restores it from the copied store: the window and its lanes go on, and every answer after
    the restore is classify of the events its window names."""
    rec = recording("restore", 24)
    n, half = len(rec), len(rec) // 2
    assert int(rec.t[-1] - rec.t[0]) > HOUR_US
    first = start(state_dir=str(tmp_path / "a"))

    async def part_one() -> tuple[str, list[Result]]:
        s = AsyncStreamSession(first.ws, window=TIME_WINDOW, reconnect=False)
        await s.open()
        assert s.info is not None and s.info.window == {**TIME_WINDOW, "lanes": 4}
        got = [r async for r in s.stream(packetize(rec.slice(0, half), events=97))]
        token = await snapshot_then_leave(s, half)
        return token, got

    token, before = asyncio.run(part_one())
    check_windows(first.http, rec, before[-5:])
    first.call(first.engine.drain(timeout=10))
    (snap,) = (decode(data) for data in stored(tmp_path / "a").values())
    assert snap.lanes == 4 and snap.row.size == 4 * (first.engine.runners["tiny"].state_bytes // 4)
    assert snap.window is not None and snap.window["state"]["seen"] == half
    copy_store(tmp_path / "a", tmp_path / "b")
    second = start(state_dir=str(tmp_path / "b"))

    async def part_two() -> list[Result]:
        async with AsyncStreamSession(second.ws, resume=token, window=TIME_WINDOW, reconnect=False) as s:
            assert s.info is not None and s.info.restored and s.info.events == half
            assert s.info.window == {**TIME_WINDOW, "lanes": 4}
            # Restored, it holds its four slots again, as the metrics say.
            assert await asyncio.to_thread(scrape, second.http, "evssm_slots_used") == 4
            return [r async for r in s.stream(packetize(rec.slice(half, n), events=61))]

    after = asyncio.run(part_two())
    assert after[-1].events == n
    check_windows(second.http, rec, after)
    # The last answer is classify's with the window of the whole recording.
    (whole,) = classify(second.http, [(rec.t, rec.x.astype(np.int64))], window=TIME_WINDOW)
    assert whole["window"] == after[-1].window


# --- a client's replay into a restored window ----------------------------------------------------------
def test_a_client_replays_what_an_older_snapshot_lacks_into_its_window(start, tmp_path: Path) -> None:
    """The server dies while its store holds an older snapshot than the answers the client has:
    the client reconnects to a server restored from that store and replays the answered packets
    after it through the restored window; every answer after that is classify of its window."""
    rec = recording("replay", 16)
    packets = list(packetize(rec, events=60))
    assert len(packets) > 16
    first = start(state_dir=str(tmp_path / "a"), snapshot_interval=3600.0)  # snapshots when asked
    after, resumes = replay_after_switch(start, first, tmp_path, rec, packets, {"window": COUNT_WINDOW})
    (resume,) = resumes
    assert resume.restored and not resume.new_session and resume.replayed == 6 * 60
    assert after[-1].events == len(rec)
    check_windows(first.http, rec, after)


# --- what each snapshot holds ------------------------------------------------------------------------
def test_snapshots_under_load_pair_each_window_state_with_its_rows(start, tmp_path: Path, monkeypatch) -> None:
    """Three windowed sessions stream as fast as the server answers while snapshots are taken every
    10 ms (packets in flight when their rows are read): every snapshot holds ``L`` rows and the
    lane state the planner had after exactly the events it covers (a packet boundary), not the
    live one. New sessions stream again until six have been checked (at most four rounds)."""
    ahead: list[bool] = []  # per capture: the live lane state was past the captured one
    real = durability._window_of

    def watching(window: Any, state: Any) -> Any:
        ahead.append(state is not window.state)
        return real(window, state)

    monkeypatch.setattr(durability, "_window_of", watching)
    server = start(state_dir=str(tmp_path), snapshot_interval=0.01, max_sessions_per_client=16)
    recs = [recording(f"load-{i}", 10) for i in range(3)]
    specs = [TIME_WINDOW, COUNT_WINDOW, TIME_WINDOW]
    words = server.engine.runners["tiny"].state_bytes // 4

    def one_round() -> int:
        outcome, seen = snapshots_while(tmp_path, lambda: stream_each(
            server.ws, recs, 50, max_in_flight=8, options=[{"window": w} for w in specs]))
        checked = 0
        for rec, spec, (token, _) in zip(recs, specs, outcome, strict=True):
            want_spec = WindowSpec.from_dict(spec)
            for covered, snap in sorted(seen.get(token_key(token), {}).items()):
                assert covered % 50 == 0 or covered == len(rec), f"a snapshot at {covered} events"
                assert snap.lanes == want_spec.lanes and snap.row.size == want_spec.lanes * words
                planner = WindowPlan(want_spec)
                state = planner.new_state()
                for a in range(0, covered, 50):
                    planner.plan(state, rec.t[a:min(a + 50, covered)])
                assert snap.window == SessionWindow(want_spec).snapshot(state)
                checked += covered > 0
        return checked

    assert checked_in_rounds(one_round, need=6) >= 6
    assert any(ahead), "no snapshot was read with packets in flight"


# --- the record ------------------------------------------------------------------------------------
def test_a_window_snapshot_round_trips_and_a_bad_one_is_refused_naming_the_field() -> None:
    window = SessionWindow(WindowSpec.from_dict({"ms": 3, "hop_ms": 1.5}))
    window.commit(window.preview(np.array([10, 900, 2_000, 4_100], np.int64)))
    kept = window.snapshot(window.state)
    back = SessionWindow.restore(kept)
    assert back.spec == window.spec and back.snapshot(back.state) == kept
    # Planning on from the restored state is planning on from the original.
    t = np.array([4_200, 6_000, 6_001], np.int64)
    a, b = window.preview(t), back.preview(t)
    assert a.copies == b.copies and a.plan.window() == b.plan.window()
    assert np.array_equal(a.plan.restarts, b.plan.restarts)
    # A fresh stream's snapshot holds the fresh state.
    assert SessionWindow.restore(window.snapshot(None)).state.seen == 0
    bad_lanes = {**kept, "state": {**kept["state"], "counts": [0]}}
    with pytest.raises(WindowError, match="counts"):
        SessionWindow.restore(bad_lanes)
    with pytest.raises(WindowError, match="spec"):
        SessionWindow.restore({"spec": {"unit": "us", "length": 3000}, "state": kept["state"]})
    with pytest.raises(WindowError, match="hop"):
        SessionWindow.restore({"spec": {"unit": "us", "length": 3000, "hop": 4000}, "state": kept["state"]})


def test_a_snapshot_whose_window_does_not_fit_is_refused_as_incompatible(start, tmp_path: Path) -> None:
    """A record whose window names another lane count than its rows (or none this server can
    read) is refused with ``snapshot_incompatible``; nothing is restored."""
    rec = recording("bad", 4)
    first = start(state_dir=str(tmp_path / "a"))

    async def part_one() -> str:
        s = AsyncStreamSession(first.ws, window=COUNT_WINDOW, reconnect=False)
        await s.open()
        [r async for r in s.stream(packetize(rec, events=100))]
        token = s.resume_token
        assert token is not None
        s._closing = True
        await s._ws.close()  # type: ignore[union-attr]
        return token

    token = asyncio.run(part_one())
    first.call(first.engine.drain(timeout=10))
    copy_store(tmp_path / "a", tmp_path / "b")
    key = token_key(token)
    snap = decode(stored(tmp_path / "b")[key])
    assert snap.lanes == 3
    # Two lanes' worth of spec over three lanes' rows and state.
    assert snap.window is not None
    spec = {"unit": "events", "length": 300, "hop": 150}
    broken = encode(dataclasses.replace(snap, window={**snap.window, "spec": spec}))
    with contextlib.closing(sqlite3.connect(tmp_path / "b" / DiskStore.FILE)) as db, db:
        db.execute("UPDATE snapshots SET data = ? WHERE key = ?", (broken, key))
    second = start(state_dir=str(tmp_path / "b"))

    async def part_two() -> dict:
        async with connect(f"{second.ws}/v1/stream") as ws:
            await ws.send(json.dumps({"type": "open", "resume": token}))
            return json.loads(await ws.recv())

    reply = asyncio.run(part_two())
    assert reply["type"] == "error" and reply["code"] == "snapshot_incompatible", reply
    assert "its window" in reply["message"] and "2 int64 integers (one a lane)" in reply["message"]
    assert not second.engine.table.knows(token)


def test_a_record_written_before_windows_were_kept_reads_as_one_row() -> None:
    """A record body without the ``window`` field (older servers) decodes: no window, one row."""
    row = np.arange(293, dtype=np.int32)
    body = msgpack.packb({"key": token_key("t"), "session": "s", "model": "tiny", "fingerprint": "ab" * 16,
                          "row": row.astype("<i4").tobytes(), "events": 7, "last_t": 70, "probs": None,
                          "top_k": 3, "cropped": 0, "geometry": None, "key_id": None, "live": None,
                          "written": 1.0, "filters": None})
    rec = decode(msgpack.packb([MAGIC, VERSION, zlib.crc32(body), body]))
    assert rec.window is None and rec.lanes == 1 and np.array_equal(rec.row, row)
