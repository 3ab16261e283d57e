"""Input filters served, over real sockets (uvicorn on 127.0.0.1, the tiny 700-channel model).

- a stream with filters, cut at random packet boundaries (inside equal-timestamp bursts of
  thousands of events, across hour-long gaps), answers after every packet as ``/v1/classify``
  of the same prefix with the same filters, and each result's ``filtered`` counts are what the
  NumPy reference removes from that packet; a packet the filters empty is answered as the one
  before it; the totals reach the metrics;
- the filters address the declared source sensor, before its crop;
- bad ``filters`` are refused naming the field, and the session goes on; a packet refused after
  the filters ran leaves their state as it was;
- the filter state survives a live resume and a restore from a snapshot on another server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from conftest import metric_sum
from numeric import assert_close, assert_finite, seeded_rng
from test_client_e2e import DroppingProxy
from test_durability import checked_in_rounds, copy_store, snapshots_while, stream_each
from websockets.asyncio.client import connect

from evssm.client import AsyncStreamSession, Result, classify, packetize, save_events
from evssm.client.cli_options import filters_arg
from evssm.client.protocol import SessionInfo
from evssm.models.events import Recording, SensorSpec
from evssm.models.filters import FilterBank, FilterCounts, FilterSpec
from evssm.models.wire import Classified, Code, Opened, ResultFrame
from evssm.server.api import stream
from evssm.server.api.protocol import RECORD_DTYPE, ProtocolError
from evssm.server.core import ledger
from evssm.server.core.snapshots import token_key
from evssm.server.settings import Settings

pytestmark = pytest.mark.timeout(600)

CHANNELS = 700
BASE = Settings(batch_buckets=(1, 4), length_buckets=(128,), classify_length_buckets=(1024,),
                max_sessions=16, max_packet_events=8192, max_classify_events=200_000,
                session_idle_timeout=60.0, snapshot_interval=0.05)
FILTERS = {"refractory_us": 400, "denoise_us": 3000, "max_rate": 150_000}
HOUR_US = 3_600_000_000
MODEL_SENSOR = SensorSpec.one_d(CHANNELS)
RTOL, ATOL = 1e-3, 2e-6


# --- recordings and the reference ----------------------------------------------------------------
def live_recording(rng: np.random.Generator, channels: int = CHANNELS) -> Recording:
    """Activity that wanders over the channels (so neighbours support each other), with two
    bursts of 3,000 events at one timestamp and an hour-long gap between them."""
    parts_t, parts_x = [], []
    t0 = int(rng.integers(0, 10**6))
    for i in range(3):
        n = 2500
        t = t0 + np.cumsum(rng.integers(0, 120, n))
        x = np.clip(np.cumsum(rng.integers(-3, 4, n)) + int(rng.integers(100, channels - 100)), 0, channels - 1)
        parts_t.append(t)
        parts_x.append(x)
        burst_t = int(t[-1]) + 50
        parts_t.append(np.full(3000, burst_t))
        parts_x.append(rng.integers(0, channels, 3000))
        t0 = burst_t + (HOUR_US if i == 0 else 1000)
    return Recording(np.concatenate(parts_t).astype(np.int64), np.concatenate(parts_x).astype(np.uint16))


def reference(rec: Recording, cuts: list[int], sensor: SensorSpec = MODEL_SENSOR,
              filters: dict[str, int] = FILTERS) -> tuple[np.ndarray, list[FilterCounts]]:
    """The NumPy reference's keep mask over the whole stream and its counts per packet."""
    bank = FilterBank(FilterSpec.from_dict(filters), sensor, native=False)
    state = bank.new_state()
    keep, counts = [], []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        k, c = bank.apply(state, rec.t[a:b], rec.x[a:b].astype(np.int32))
        keep.append(k)
        counts.append(c)
    return np.concatenate(keep), counts


def cuts_with_an_emptied_packet(rng: np.random.Generator, rec: Recording) -> tuple[list[int], int]:
    """Random packet boundaries (some inside the bursts), with one packet made of a run of events
    the filters all remove; returns the cuts and that packet's index."""
    keep, _ = reference(rec, [0, len(rec)])
    removed = np.flatnonzero(~keep)
    runs = np.split(removed, np.flatnonzero(np.diff(removed) != 1) + 1)
    run = max(runs, key=len)  # inside a burst: the rate cap removes long runs
    a, b = int(run[0]), int(run[0]) + min(len(run), 500)
    cuts = {0, a, b, len(rec)}
    while len(cuts) < 60:
        cuts.add(int(rng.integers(1, len(rec))))
    cuts = sorted(c for c in cuts if not a < c < b)
    return cuts, cuts.index(a)


def records(t: np.ndarray, x: np.ndarray) -> bytes:
    rec = np.zeros(len(t), RECORD_DTYPE)
    rec["t"], rec["x"] = t, x
    return rec.tobytes()


async def request(ws: Any, msg: dict[str, Any]) -> dict[str, Any]:
    await ws.send(msgpack.packb(msg))
    return msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60))


def classify_raw(base: str, rec: Recording, **body: Any) -> tuple[int, dict[str, Any]]:
    """A classify request of one stream (columns as msgpack bins): its status and its body."""
    stream = {"t": rec.t.astype("<i8").tobytes(), "x": rec.x.astype("<u2").tobytes()}
    r = httpx.post(f"{base}/v1/classify", timeout=120, headers={"content-type": "application/msgpack"},
                   content=msgpack.packb({"streams": [stream], **body}))
    msgpack_body = r.headers["content-type"].startswith("application/msgpack")
    return r.status_code, msgpack.unpackb(r.content) if msgpack_body else r.json()


def assert_same_answer(got: list[float] | None, want: list[float] | None) -> None:
    assert (got is None) == (want is None), (got, want)
    if got is not None:
        assert_close(assert_finite(got), assert_finite(want), rtol=RTOL, atol=ATOL)


# --- streaming with filters equals classify with filters -------------------------------------------

async def snapshot_then_leave(s: AsyncStreamSession, covered: int) -> str:
    """Ask with empty packets until a snapshot of the session covers the ``covered`` events sent,
    then walk away without closing the server's session (as a crashed client); its resume token."""
    deadline = time.monotonic() + 10
    while True:
        await s.send(Recording(t=np.zeros(0, np.int64), x=np.zeros(0, np.int64)))
        if (await s.recv()).durable == covered:
            break
        assert time.monotonic() < deadline, "no snapshot covered the events sent"
        await asyncio.sleep(0.05)
    token = s.resume_token
    assert token is not None
    s._closing = True
    await s._ws.close()  # type: ignore[union-attr]
    return token

def test_a_filtered_stream_cut_anywhere_answers_as_classify_with_the_same_filters(start) -> None:
    server = start()
    rng = seeded_rng("live-filters", "cuts")
    rec = live_recording(rng)
    cuts, emptied = cuts_with_an_emptied_packet(rng, rec)
    after_gap = int(np.searchsorted(rec.t, rec.t[0] + HOUR_US)) + 1  # the first event after the hour
    cuts = sorted(set(cuts) | {after_gap})
    emptied += after_gap < cuts[emptied]
    keep, per_packet = reference(rec, cuts)
    kept_after = np.cumsum(keep)
    checks = {cuts[i + 1] for i in rng.choice(len(cuts) - 1, 4, replace=False)} | {len(rec), after_gap}
    wanted = {b: classify_raw(server.http, rec.slice(0, b), filters=FILTERS)[1]["results"][0]
              for b in sorted(checks)}

    async def run() -> list[dict[str, Any]]:
        async with connect(f"{server.ws}/v1/stream") as ws:
            opened = await request(ws, {"type": "open", "filters": FILTERS})
            assert opened["type"] == "opened" and opened["filters"] == FILTERS
            assert opened["filtered"] == {"refractory": 0, "denoise": 0, "max_rate": 0}
            out = []
            for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
                form = {"records": records(rec.t[a:b], rec.x[a:b])} if i % 2 else {
                    "t": rec.t[a:b].astype("<i8").tobytes(), "x": rec.x[a:b].astype("<u2").tobytes()}
                out.append(await request(ws, {"type": "events", "seq": i, **form}))
            return out

    results = asyncio.run(run())
    for i, (r, b) in enumerate(zip(results, cuts[1:], strict=True)):
        assert r["type"] == "result" and r["seq"] == i, r
        assert r["filtered"] == per_packet[i].to_dict(), (i, r["filtered"], per_packet[i])
        assert r["events"] == kept_after[b - 1]
        last_kept = np.flatnonzero(keep[:b])
        assert r["t"] == (int(rec.t[last_kept[-1]]) if last_kept.size else None)
        if b in wanted:
            w = wanted[b]
            assert (r["events"], r["t"]) == (w["events"], w["t"])
            assert_same_answer(r["probs"], w["probs"])
    # The emptied packet: every event removed, the answer of the packet before it.
    before, empty = results[emptied - 1], results[emptied]
    assert per_packet[emptied].total == cuts[emptied + 1] - cuts[emptied] > 0
    assert (empty["events"], empty["t"]) == (before["events"], before["t"])
    assert_same_answer(empty["probs"], before["probs"])
    # Totals: the packets' counts add up to the reference over the whole stream, and classify's.
    assert wanted[len(rec)]["probs"] is not None
    total = sum(per_packet, FilterCounts())
    assert total.refractory > 0 and total.denoise > 0 and total.max_rate > 0
    assert wanted[len(rec)]["filtered"] == total.to_dict()
    assert wanted[len(rec)]["events"] + total.total == len(rec)
    text = httpx.get(f"{server.http}/metrics").text
    for name, n in total.to_dict().items():  # the stream's and the classify requests' removals
        classified = sum(w["filtered"][name] for w in wanted.values())
        assert metric_sum(text, "evssm_filtered_events_total", model="tiny", filter=name) == n + classified


def test_filters_address_the_declared_source_before_its_crop(start) -> None:
    """A 1,000-channel source cropped onto the model's 700: the filters see the source's channels
    (neighbours across the crop's edge count), the crop sees what they kept."""
    server = start()
    source = SensorSpec.one_d(1000)
    transform = {"crop": [150, 700]}
    rng = seeded_rng("live-filters", "source")
    rec = live_recording(rng, channels=1000)
    cuts = sorted({0, len(rec), *rng.integers(1, len(rec), 30).tolist()})
    keep, per_packet = reference(rec, cuts, sensor=source)
    inside = (rec.x >= 150) & (rec.x < 850)
    (want,) = classify(server.http, [rec], sensors=[source], transform=transform, filters=FILTERS)
    assert want.filtered == sum(per_packet, FilterCounts()).to_dict()
    assert (want.events, want.cropped) == (int((keep & inside).sum()), int((keep & ~inside).sum()))

    async def run() -> Any:
        async with AsyncStreamSession(server.ws, sensor=source, transform=transform, filters=FILTERS,
                                      reconnect=False) as s:
            assert s.info is not None and s.info.filters == FILTERS
            got = []
            for a, b in zip(cuts[:-1], cuts[1:], strict=True):
                await s.send(rec.slice(a, b))
                got.append(await s.recv())
            return got

    got = asyncio.run(run())
    assert [r.filtered for r in got] == [c.to_dict() for c in per_packet]
    last = got[-1]
    assert (last.events, last.cropped) == (want.events, want.cropped)
    assert_same_answer(last.probs, want.probs)


# --- bad input -----------------------------------------------------------------------------------------
BAD_FILTERS = [
    ({"refractory_us": -1}, "filters.refractory_us"),
    ({"denoise_us": 1.5}, "filters.denoise_us"),
    ({"max_rate": True}, "filters.max_rate"),
    ({"refractory": 100}, "unknown field"),
    ([100], "filters must be a map"),
]


def test_bad_filters_are_refused_naming_the_field_and_the_session_goes_on(start, monkeypatch) -> None:
    server = start()
    rng = seeded_rng("live-filters", "bad")
    rec = live_recording(rng)
    n = len(rec)
    keep, _ = reference(rec, [0, n])
    (want,) = classify(server.http, [rec], filters=FILTERS)
    for bad, words in BAD_FILTERS:
        status, body = classify_raw(server.http, rec, filters=bad)
        assert status == 400 and body["error"] == "invalid_field" and words in body["message"], body

    # A time before an event the filters removed is still a step back in the stream.
    removed = np.flatnonzero(~keep[1:4000] & (rec.t[1:4000] > rec.t[:3999])) + 1
    cut = int(removed[-1]) + 1  # the packet ends with a removed event, later than the one before
    huge = np.array([2**63 + 5, 2**63 + 5], np.uint64)  # beyond int64: refused by the ingest
    fault = threading.Event()  # armed: the model's ingest refuses the next packet
    real_prepare = stream.prepare

    def faulty_prepare(*args: Any) -> Any:
        if fault.is_set():
            fault.clear()
            raise ProtocolError(Code.INVALID_COLUMN, "injected")
        return real_prepare(*args)

    monkeypatch.setattr(stream, "prepare", faulty_prepare)

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        async with connect(f"{server.ws}/v1/stream") as ws:
            for bad, words in BAD_FILTERS:
                err = await request(ws, {"type": "open", "filters": bad})
                assert err["type"] == "error" and err["code"] == "invalid_field" and words in err["message"], err
            opened = await request(ws, {"type": "open", "filters": FILTERS})
            assert opened["type"] == "opened"
            # Times beyond int64 are refused though the filters would remove every event.
            err = await request(ws, {"type": "events", "seq": 0, "records": records(huge, np.array([3, 3]))})
            assert err["type"] == "error" and err["code"] == "invalid_column", err
            # Refused after the filters ran: their state stays, so the same packet is taken again.
            first = {"type": "events", "seq": 1, "t": rec.t[:cut].tolist(), "x": rec.x[:cut].tolist()}
            fault.set()
            err = await request(ws, first)
            assert err["type"] == "error" and err["message"] == "injected" and not fault.is_set(), err
            r = await request(ws, first)
            assert r["type"] == "result" and r["t"] < int(rec.t[cut - 1])
            back = await request(ws, {"type": "events", "seq": 2, "t": [int(rec.t[cut - 1]) - 1], "x": [5]})
            assert back["type"] == "error" and back["code"] == "timestamps_decreasing", back
            for seq, a in enumerate(range(cut, n, 4000), start=3):
                b = min(a + 4000, n)
                last = await request(ws, {"type": "events", "seq": seq, "t": rec.t[a:b].tolist(),
                                          "x": rec.x[a:b].tolist()})
                assert last["type"] == "result", last
            token = opened["resume"]
        async with connect(f"{server.ws}/v1/stream") as ws:  # a live resume: the same filters, or none
            err = await request(ws, {"type": "open", "resume": token, "filters": {"max_rate": 10}})
            assert err["type"] == "error" and err["code"] == "invalid_field" and "filters" in err["message"]
            again = await request(ws, {"type": "open", "resume": token, "filters": FILTERS})
            assert again["type"] == "opened" and again["resumed"]
        return last, again

    last, again = asyncio.run(run())
    assert (last["events"], last["t"]) == (want.events, int(rec.t[np.flatnonzero(keep)[-1]]))
    assert_same_answer(last["probs"], want.probs)
    # The refused packets left the filters' running totals as they were.
    assert again["filtered"] == want.filtered and again["events"] == want.events


def test_frames_carry_filters_only_for_a_session_that_declared_them() -> None:
    counts = {"refractory": 4, "denoise": 0, "max_rate": 9}
    opened = Opened("s", "r", False, False, 0, None, None, 3, {}, filters=FILTERS, filtered=counts)
    result = ResultFrame(1, 10, 99, None, [], filtered=counts)
    for frame in (opened, result, Classified(None, None, 10, 99, [], filtered=counts)):
        assert type(frame).from_wire(frame.to_wire()) == frame
    assert "filters" not in dataclasses.replace(opened, filters=None, filtered=None).to_wire()
    assert "filtered" not in dataclasses.replace(result, filtered=None).to_wire()
    assert SessionInfo.from_message(opened.to_wire()).sent == 13  # kept, cropped and filtered


def test_the_cli_reads_filters() -> None:
    assert filters_arg("refractory_us=1000, denoise_us=5000") == {"refractory_us": 1000, "denoise_us": 5000}
    assert filters_arg("max_rate=2000000") == {"max_rate": 2_000_000}
    for bad in ("refractory=1", "denoise_us=-2", "max_rate", ""):
        with pytest.raises(Exception, match="filter"):
            filters_arg(bad)


def evssm(*argv: str) -> dict[str, Any]:
    """Run the ``evssm`` command line (a process of its own, as a user runs it); its JSON output."""
    done = subprocess.run([sys.executable, "-m", "evssm.cli", *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_stream_and_classify_commands_pass_filters(start, tmp_path: Path) -> None:
    """``evssm stream --filters`` and ``evssm classify --filters``: the same answer, and the
    summaries count what the filters removed."""
    server = start()
    rec = live_recording(seeded_rng("live-filters", "cli")).slice(0, 5500)  # one burst, no hour
    _, per_packet = reference(rec, [0, len(rec)])
    path = str(save_events(tmp_path / "rec.npz", rec))
    flag = ["--filters", ",".join(f"{k}={v}" for k, v in FILTERS.items())]
    streamed = evssm("stream", path, "--url", server.ws, "--fast", "--packet-events", "300", "--json", *flag)
    classified = evssm("classify", path, "--url", server.http, "--json", *flag)["results"][0]
    assert classified["filtered"] == per_packet[0].to_dict()
    assert streamed["filtered"] == per_packet[0].to_dict()
    assert streamed["events"] == classified["events"] == len(rec)  # read and sent
    assert streamed["events_processed"] == classified["events_processed"] == len(rec) - per_packet[0].total
    assert_same_answer(streamed["probs"], classified["probs"])


# --- snapshots -----------------------------------------------------------------------------------------
def test_filter_state_survives_a_restore_on_another_server(start, tmp_path: Path) -> None:
    """Streamed halfway with filters, snapshotted, restored by a second server from the copied
    store: it keeps the filters and their state (the second half is filtered as if the stream had
    never moved), the client's replay counts filtered events as sent, and the stream ends with
    classify's answer of the whole recording with the same filters."""
    rng = seeded_rng("live-filters", "restore")
    rec = live_recording(rng)
    n, half = len(rec), len(rec) // 2
    keep, _ = reference(rec, [0, half, n])
    first = start(state_dir=str(tmp_path / "a"))
    (want,) = classify(first.http, [rec], filters=FILTERS)

    async def part_one() -> tuple[str, int]:
        s = AsyncStreamSession(first.ws, filters=FILTERS, reconnect=False)
        await s.open()
        got = [r async for r in s.stream(packetize(rec.slice(0, half), events=700))]
        assert sum(r.removed for r in got) + got[-1].events == half
        token = await snapshot_then_leave(s, half)
        return token, got[-1].events

    token, kept = asyncio.run(part_one())
    assert kept == int(keep[:half].sum())
    first.call(first.engine.drain(timeout=10))
    copy_store(tmp_path / "a", tmp_path / "b")
    second = start(state_dir=str(tmp_path / "b"))

    async def part_two() -> Any:
        async with AsyncStreamSession(second.ws, resume=token, filters=FILTERS, reconnect=False) as s:
            assert s.info is not None and s.info.restored and s.info.filters == FILTERS
            assert (s.info.events, s.info.sent) == (kept, half)
            return [r async for r in s.stream(packetize(rec.slice(half, n), events=700))][-1]

    last = asyncio.run(part_two())
    assert last.events == want.events
    assert_same_answer(last.probs, want.probs)


def test_snapshots_under_load_hold_the_filter_state_of_their_events(start, tmp_path: Path, monkeypatch) -> None:
    """Three sessions stream with filters as fast as the server answers while snapshots are taken
    every 10 ms (packets in flight when their rows are read): every snapshot's filter state is
    the reference's after exactly the events it covers (kept and filtered), a packet boundary.
    New sessions stream again until six have been checked (at most four rounds)."""
    reverted: list[int] = []  # packets taken out of the live state per capture
    real = ledger._filters_at

    def counting(done: Any) -> Any:
        reverted.append(len(done.log))
        return real(done)

    monkeypatch.setattr(ledger, "_filters_at", counting)
    server = start(state_dir=str(tmp_path), snapshot_interval=0.01)
    recs = [live_recording(seeded_rng("live-filters", "load", i)) for i in range(3)]

    def covered(snap: Any) -> int | None:  # the events sent: kept and filtered
        return None if snap.filters is None else snap.events + sum(snap.filters["state"]["removed"])

    def one_round() -> int:
        outcome, seen = snapshots_while(tmp_path, lambda: stream_each(
            server.ws, recs, 500, max_in_flight=8, options=[{"filters": FILTERS}] * len(recs)), covered)
        checked = 0
        for rec, (token, _) in zip(recs, outcome, strict=True):
            for at, snap in sorted(seen.get(token_key(token), {}).items()):
                assert at % 500 == 0 or at == len(rec), f"a snapshot at {at} events sent"
                bank = FilterBank(FilterSpec.from_dict(FILTERS), MODEL_SENSOR, native=False)
                want = bank.new_state()
                keep, _ = bank.apply(want, rec.t[:at], rec.x[:at].astype(np.int32))
                assert snap.events == int(keep.sum())
                assert snap.filters == {"spec": FILTERS, "state": want.to_dict()}
                checked += at > 0
        return checked

    assert checked_in_rounds(one_round, need=6) >= 6
    assert max(reverted) > 0, "no snapshot was read with packets in flight"


def snapshot_now(server: Any) -> None:
    """Have ``server`` snapshot every session and wait until the writes are done."""
    async def both() -> None:
        await server.engine.durability.snapshot(everything=True)
        await server.engine.durability.flush()

    server.call(both())


def replay_after_switch(start: Any, first: Any, state: Path, rec: Recording, packets: list[Recording],
                        options: dict[str, Any]) -> tuple[list[Result], list[Any]]:
    """Stream ``packets`` (of ``rec``) through a proxy to ``first`` (its store in ``state / "a"``)
    in a session opened with ``options``; after 8 packets ``first`` snapshots and its store is
    copied to ``state / "b"``; 6 more are answered; then a second server starts from the copy,
    the proxy points at it and drops the connection. -> the answers of the packets after the
    switch, and the client's resumes."""
    async def run(proxy: DroppingProxy) -> tuple[list[Result], list[Any]]:
        async with AsyncStreamSession(proxy.url, reconnect_timeout=120, **options) as s:
            for packet in packets[:8]:
                await s.send(packet)
                await s.recv()
            await asyncio.get_running_loop().run_in_executor(None, snapshot_now, first)
            await s.send(rec.slice(0, 0))
            # the last snapshot the first server writes
            assert (await s.recv()).durable == sum(len(p) for p in packets[:8])
            copy_store(state / "a", state / "b")  # the store as it is now
            for packet in packets[8:14]:  # answered, and not in the copied store
                await s.send(packet)
                await s.recv()
            second = await asyncio.get_running_loop().run_in_executor(
                None, lambda: start(state_dir=str(state / "b")))
            proxy.target_port = int(second.http.rsplit(":", 1)[1])
            proxy.drop()  # the first server is gone, as its client sees it
            after = []
            for packet in packets[14:]:
                await s.send(packet)
                after.append(await s.recv())
            return after, s.resumes

    (state / "b").mkdir()
    with DroppingProxy(int(first.http.rsplit(":", 1)[1])) as proxy:
        return asyncio.run(asyncio.wait_for(run(proxy), 300))


def test_a_client_replays_what_an_older_snapshot_lacks_through_the_filters(start, tmp_path: Path) -> None:
    """The server dies (its connections cut) while its store holds an older snapshot than the
    answers the client has: the client reconnects to a server restored from that store, replays
    the answered packets after it (their filtered events count as sent), and ends with classify's
    answer of the whole recording with the same filters."""
    rng = seeded_rng("live-filters", "replay")
    rec = live_recording(rng)
    n = len(rec)
    first = start(state_dir=str(tmp_path / "a"), snapshot_interval=3600.0)  # snapshots when asked
    (want,) = classify(first.http, [rec], filters=FILTERS)
    packets = list(packetize(rec, events=700))
    after, resumes = replay_after_switch(start, first, tmp_path, rec, packets, {"filters": FILTERS})
    last = after[-1]
    (resume,) = resumes
    assert resume.restored and not resume.new_session and resume.replayed > 0
    assert last.events == want.events and last.events + sum(want.filtered.values()) == n
    assert_same_answer(last.probs, want.probs)

