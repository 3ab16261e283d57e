"""Sliding windows served, over real sockets (uvicorn on 127.0.0.1, websockets and httpx), tiny model.

The invariant per window: after every packet of a windowed session, the result's probabilities
equal ``/v1/classify`` of exactly the events its ``window`` names, over a stream of hours of
stream time (sparse events, long silences, MHz bursts with equal timestamps) cut into random
packets; and ``/v1/classify`` with ``window`` answers for the same last window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import scrape, wait_ready
from test_server_stream import BASE, CHANNELS, Client, assert_probs_equal, classify, columns
from websockets.asyncio.client import connect

from evssm.server.app import create_app

HOUR_US = 3_600_000_000


def live_stream(rng: np.random.Generator, bursts: int) -> tuple[np.ndarray, np.ndarray]:
    """Hours of stream time: silences of 1 ms to an hour, lone events, and MHz bursts (gaps of
    0-1 µs, so runs of equal timestamps) of 20-200 events."""
    times: list[np.ndarray] = []
    now = int(rng.integers(0, 10**9))
    for _ in range(bursts):
        now += int(rng.choice([1_000, 300_000, 1_500_000, 60_000_000, 1_200_000_000, HOUR_US]))
        if rng.random() < 0.3:  # a lone event in the silence
            times.append(np.array([now], np.int64))
            now += int(rng.integers(1, 800_000))
        gaps = rng.integers(0, 2, int(rng.integers(20, 200)))
        burst = now + np.cumsum(gaps)
        times.append(burst)
        now = int(burst[-1])
    t = np.concatenate(times).astype(np.int64)
    return t, rng.integers(0, CHANNELS, len(t)).astype(np.int64)


def cuts_of(rng: np.random.Generator, n: int) -> list[int]:
    """Random packet boundaries: empty, 1-event and up to 300-event packets (some over the
    128-event length bucket, so a packet takes several steps)."""
    cuts = [0]
    while cuts[-1] < n:
        cuts.append(min(n, cuts[-1] + int(rng.choice([0, 1, 5, int(rng.integers(1, 300))]))))
    return cuts


async def stream(url: str, t: np.ndarray, x: np.ndarray, cuts: list[int], window: dict[str, Any]
                 ) -> tuple[dict, list[dict]]:
    async with connect(f"{url}/v1/stream") as ws:
        c = Client(ws)
        opened = await c.open(window=window)
        results = []
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=False)):
            form = ("bin", "records", "lists")[i % 3]
            results.append(await c.request({"type": "events", "seq": i, **columns(t[a:b], x[a:b], form)}))
        return opened, results


def check_windows(base: str, t: np.ndarray, x: np.ndarray, cuts: list[int], results: list[dict],
                  length_us: int | None) -> int:
    """Every result's window names the stream's last ``events`` events, starting at ``t0`` (and,
    for a time window, exactly the events in ``[t0, newest]``, less than ``T`` old); its
    probabilities equal classify of them. Returns how many answers had probabilities."""
    windows = []
    for r, b in zip(results, cuts[1:], strict=True):
        assert r["type"] == "result" and r["events"] == b, r
        if b == 0:
            assert "window" not in r and r["probs"] is None
            windows.append((t[:0], x[:0]))
            continue
        w = r["window"]
        first = b - w["events"]
        assert 0 <= first < b and int(t[first]) == w["t0"], (w, b)
        if length_us is not None:
            assert int(t[b - 1]) - w["t0"] < length_us
            assert int(np.count_nonzero(t[:b] >= w["t0"])) == w["events"]
        windows.append((t[first:b], x[first:b]))
    expected = classify(base, windows)
    answered = 0
    for r, want in zip(results, expected, strict=True):
        assert_probs_equal(r["probs"], want["probs"])
        answered += r["probs"] is not None
    return answered


def test_a_stream_of_hours_answers_classify_of_each_window(server):
    rng = np.random.default_rng(21)
    t, x = live_stream(rng, 40)
    cuts = cuts_of(rng, len(t))
    assert (t[-1] - t[0]) > 3 * HOUR_US and np.count_nonzero(np.diff(t) == 0) > 500
    opened, results = asyncio.run(stream(server.ws, t, x, cuts, {"ms": 2000, "hop_ms": 500}))
    assert opened["window"] == {"ms": 2000, "hop_ms": 500, "lanes": 4}
    answered = check_windows(server.http, t, x, cuts, results, 2_000_000)
    assert answered > len(results) // 3
    # Windows forget: no answer covers more than a few bursts of the stream.
    assert max(r["window"]["events"] for r in results if "window" in r) < len(t) // 5
    # /v1/classify with the window answers for the last window of the whole recording.
    got = classify(server.http, [(t, x)], window={"ms": 2000, "hop_ms": 500})[0]
    assert got["events"] == len(t) and got["window"] == results[-1]["window"]
    assert_probs_equal(got["probs"], results[-1]["probs"])


def test_event_count_windows_and_a_reset(server):
    rng = np.random.default_rng(5)
    t, x = live_stream(rng, 12)
    cuts = cuts_of(rng, len(t))
    window = {"events": 150, "hop": 50}

    async def run() -> tuple[list[dict], dict, dict]:
        async with connect(f"{server.ws}/v1/stream") as ws:
            c = Client(ws)
            assert (await c.open(window=window))["window"] == {**window, "lanes": 3}
            results = [await c.request({"type": "events", "seq": i, **columns(t[a:b], x[a:b], "bin")})
                       for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=False))]
            assert (await c.request({"type": "reset"}))["type"] == "reset_done"
            after = await c.request({"type": "events", **columns(t[:40], x[:40], "bin")})
            return results, after, await c.request({"type": "events", **columns(t[:0], x[:0], "bin")})

    results, after, empty = asyncio.run(run())
    assert check_windows(server.http, t, x, cuts, results, None) > 0
    assert all(50 * 2 <= r["window"]["events"] <= 150 for r, b in zip(results, cuts[1:], strict=True)
               if b >= 150)
    # After a reset the window starts again at the next event.
    assert after["window"] == {"t0": int(t[0]), "events": 40} and empty["window"] == after["window"]
    assert_probs_equal(after["probs"], classify(server.http, [(t[:40], x[:40])])[0]["probs"])
    assert_probs_equal(empty["probs"], after["probs"])


def test_a_session_without_window_is_unchanged(server):
    rng = np.random.default_rng(3)
    t, x = live_stream(rng, 3)

    async def run() -> tuple[dict, dict]:
        async with connect(f"{server.ws}/v1/stream") as ws:
            c = Client(ws)
            return await c.open(), await c.request({"type": "events", **columns(t, x, "bin")})

    opened, result = asyncio.run(run())
    assert "window" not in opened and "window" not in result
    assert_probs_equal(result["probs"], classify(server.http, [(t, x)])[0]["probs"])


@pytest.mark.parametrize("window, words", [
    ({"ms": 0}, "positive"),
    ({"ms": 100, "hop_ms": 200}, "hop_ms must be at most"),
    ({"events": 10, "hop_ms": 5}, "window takes"),
    ("2s", "window must be a map"),
    ({"ms": 1000, "hop_ms": 1}, "at most 64"),
    ({"ms": 1000, "hop_ms": 100}, "steps at most 8 rows"),  # 10 lanes, batch bucket 8
])
def test_invalid_windows_are_refused_clearly(server, window, words):
    async def run() -> dict:
        async with connect(f"{server.ws}/v1/stream") as ws:
            return await Client(ws).request({"type": "open", "window": window})

    reply = asyncio.run(run())
    assert reply["type"] == "error" and reply["code"] == "invalid_field" and words in reply["message"], reply
    r = httpx.post(f"{server.http}/v1/classify", json={"streams": [], "window": window}, timeout=30)
    if "rows" not in words:  # classify has no lanes to step
        assert r.status_code == 400 and words in r.json()["message"], r.text


def test_a_window_counts_as_its_lanes_toward_the_limits(start):
    server = start(max_sessions=5, slots_per_model=5)
    held: list[tuple[float, float]] = []  # (sessions, slots in use) as the metrics say

    def gauges() -> tuple[float, float]:
        return scrape(server.http, "evssm_sessions_active"), scrape(server.http, "evssm_slots_used")

    async def run() -> list[dict]:
        async with connect(f"{server.ws}/v1/stream") as a, connect(f"{server.ws}/v1/stream") as b, \
                connect(f"{server.ws}/v1/stream") as c:
            first = await Client(a).request({"type": "open", "window": {"ms": 1000, "hop_ms": 250}})
            plain = await Client(b).request({"type": "open"})
            held.append(await asyncio.to_thread(gauges))
            refused = await Client(c).request({"type": "open"})
            closed = await Client(a).request({"type": "close"})
            held.append(await asyncio.to_thread(gauges))
        # Closed, the window's four rows are free again: three plain sessions fit beside the one.
        async with contextlib.AsyncExitStack() as stack:
            sockets = [await stack.enter_async_context(connect(f"{server.ws}/v1/stream")) for _ in range(4)]
            again = [await Client(ws).request({"type": "open"}) for ws in sockets[:3]]
            window = await Client(sockets[3]).request({"type": "open", "window": {"ms": 100, "hop_ms": 50}})
        return [first, plain, refused, closed, window, *again]

    first, plain, refused, closed, window, *again = asyncio.run(run())
    assert first["type"] == "opened" and first["window"]["lanes"] == 4 and plain["type"] == "opened"
    assert refused["type"] == "error" and refused["code"] == "server_full", refused
    assert "4 window lanes counts as 4" not in refused["message"]  # the plain one was refused
    assert closed["type"] == "closed" and [r["type"] for r in again] == ["opened"] * 3, again
    # One row left (the plain session whose connection dropped keeps its own): two lanes do not fit.
    assert window["type"] == "error" and window["code"] == "server_full", window
    assert "a session of 2 window lanes counts as 2" in window["message"]
    # The metrics count the window as one session holding four slots, and free them on its close.
    assert held == [(2, 5), (1, 1)]


def test_a_resume_keeps_the_lanes_and_may_not_change_the_window(server):
    rng = np.random.default_rng(8)
    t, x = live_stream(rng, 6)
    half = len(t) // 2
    window = {"ms": 2000, "hop_ms": 1000}

    async def run() -> tuple[dict, dict, dict]:
        async with connect(f"{server.ws}/v1/stream") as ws:
            c = Client(ws)
            token = (await c.open(window=window))["resume"]
            await c.request({"type": "events", **columns(t[:half], x[:half], "bin")})
        async with connect(f"{server.ws}/v1/stream") as ws:
            changed = await Client(ws).request({"type": "open", "resume": token, "window": {"ms": 2000}})
        async with connect(f"{server.ws}/v1/stream") as ws:
            c = Client(ws)
            resumed = await c.open(resume=token, window=window)
            return changed, resumed, await c.request({"type": "events", **columns(t[half:], x[half:], "bin")})

    changed, resumed, last = asyncio.run(run())
    assert changed["type"] == "error" and "another window" in changed["message"]
    assert resumed["window"]["lanes"] == 2 and last["events"] == len(t)
    first = len(t) - last["window"]["events"]
    assert int(t[first]) == last["window"]["t0"]
    assert_probs_equal(last["probs"], classify(server.http, [(t[first:], x[first:])])[0]["probs"])


def test_the_stream_command_passes_its_window(server, tmp_path, capsys):
    """``evssm stream --window`` opens a windowed session; its last answer is classify of the
    window the result names."""
    from evssm.cli import main
    from evssm.client import SimulatedSensor, save_events
    from evssm.models.events import SensorSpec

    rec = SimulatedSensor(SensorSpec.one_d(CHANNELS), 20_000, label=3, num_classes=20, seed=0).recording(0.4)
    path = str(save_events(tmp_path / "rec.npz", rec, label=3))
    assert main(["stream", path, "--url", server.ws, "--fast", "--packet-events", "100",
                 "--window", "ms=100,hop_ms=25", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["window"] == {"ms": 100, "hop_ms": 25, "lanes": 4} and out["events"] == len(rec)
    w = out["answer_window"]
    first = len(rec) - w["events"]
    assert 0 < first and int(rec.t[first]) == w["t0"] and int(rec.t[-1]) - w["t0"] < 100_000
    want = classify(server.http, [(rec.t[first:], rec.x[first:].astype(np.int64))])[0]
    assert_probs_equal(out["probs"], want["probs"])
    with pytest.raises(SystemExit):
        main(["stream", path, "--url", server.ws, "--window", "ms=100,every=5"])
    assert "--window takes ms=T,hop_ms=H" in capsys.readouterr().err


def test_windowed_and_plain_sessions_share_steps(server):
    """Sessions of 4, 3 and 2 lanes beside plain ones, all at once (batch bucket 8: a plan holds
    the lanes of a packet or waits for the next): every answer is still its own window's."""
    rng = np.random.default_rng(13)
    recs = [live_stream(rng, 8) for _ in range(5)]
    cuts = [cuts_of(rng, len(t)) for t, _ in recs]
    windows: list[dict[str, Any] | None] = [{"ms": 2000, "hop_ms": 500}, {"ms": 1500, "hop_ms": 500},
                                            {"events": 120, "hop": 60}, None, None]

    async def run() -> list[list[dict]]:
        async def one(i: int) -> list[dict]:
            t, x = recs[i]
            async with connect(f"{server.ws}/v1/stream") as ws:
                c = Client(ws)
                await c.open(**({} if windows[i] is None else {"window": windows[i]}))
                for k, (a, b) in enumerate(zip(cuts[i][:-1], cuts[i][1:], strict=False)):
                    await c.send({"type": "events", "seq": k, **columns(t[a:b], x[a:b], "bin")})
                return [await c.recv() for _ in cuts[i][1:]]
        return await asyncio.gather(*(one(i) for i in range(len(recs))))

    results = asyncio.run(run())
    for (t, x), c, w, res in zip(recs, cuts, windows, results, strict=True):
        if w is None:
            assert all("window" not in r for r in res)
            assert_probs_equal(res[-1]["probs"], classify(server.http, [(t, x)])[0]["probs"])
        else:
            check_windows(server.http, t, x, c, res, None if "events" in w else int(w["ms"] * 1000))


def test_the_lanes_of_a_packet_are_cut_into_chunks_that_end_together():
    """``chunk``: rows aligned at the packet's end, at most ``max_length`` long, a restarted row's
    zero-gap copy stepped alone and zeroed first, every row ending in the last chunk."""
    from evssm.server.core.lanes import Lane, chunk, span
    from evssm.server.core.sessions import LaneRows, Packet, Session

    session = Session(id="s", token="k", model="m", slot=3, top_k=1, slots=(3, 4, 5))
    lane = Lane(session)
    rows = LaneRows(sizes=(10, 4, 10), resets=(False, True, True), copies=(-1, 100, -1), answer=0,
                    t0=0, events=10)
    packet = Packet(seq=0, region=None, start=50, size=10, events_after=10, last_t=9, received=0.0,
                    reply=None, lanes=rows)
    chunks = []
    while lane.offset < span(packet):
        got, lane.offset = chunk(lane, packet, 4)
        chunks.append(got)
    assert chunks == [
        [(3, 50, 4, False), (5, 50, 4, True)],  # row 5 restarts at the packet's start
        [(3, 54, 2, False), (5, 54, 2, False)],  # cut where row 4's copy starts
        [(3, 56, 1, False), (4, 100, 1, True), (5, 56, 1, False)],  # its first event, from its copy
        [(3, 57, 3, False), (4, 57, 3, False), (5, 57, 3, False)],
    ]


def test_a_rejected_packet_leaves_the_lanes_as_they_were(server):
    rng = np.random.default_rng(17)
    t, x = live_stream(rng, 6)
    half = len(t) // 2
    bad_x = x[half:].copy()
    bad_x[-1] = CHANNELS  # out of range: the whole packet is refused

    async def run() -> list[dict]:
        async with connect(f"{server.ws}/v1/stream") as ws:
            c = Client(ws)
            await c.open(window={"ms": 1000, "hop_ms": 250})
            replies = [await c.request({"type": "events", "seq": 0, **columns(t[:half], x[:half], "bin")})]
            # Far in the future, then an address out of range: neither moves the window's clock.
            future = t[half:] + 10 * HOUR_US
            replies.append(await c.request({"type": "events", "seq": 1, **columns(future, bad_x, "bin")}))
            back = t[:5]  # before the session's last event
            replies.append(await c.request({"type": "events", "seq": 2, **columns(back, x[:5], "bin")}))
            replies.append(await c.request({"type": "events", "seq": 3, **columns(t[half:], x[half:], "bin")}))
            return replies

    first, bad, back, last = asyncio.run(run())
    assert bad["type"] == "error" and bad["code"] == "address_out_of_range", bad
    assert back["type"] == "error" and back["code"] == "timestamps_decreasing", back
    assert last["events"] == len(t)
    check_windows(server.http, t, x, [0, half, len(t)], [first, last], 1_000_000)


def test_windows_on_the_xla_step(serve, tiny_model):
    """The same lanes on a model whose streaming step is XLA's (rows padded into its buckets)."""
    from evssm.models.streaming import StreamingModel

    xla = StreamingModel(tiny_model.config, tiny_model.variables, backend="xla")
    server = serve(create_app(BASE.replace(max_sessions=8), models={"tiny": xla}))
    wait_ready(server.http)
    rng = np.random.default_rng(4)
    t, x = live_stream(rng, 10)
    cuts = cuts_of(rng, len(t))
    _, results = asyncio.run(stream(server.ws, t, x, cuts, {"ms": 1000, "hop_ms": 250}))
    assert check_windows(server.http, t, x, cuts, results, 1_000_000) > 0


def test_the_session_table_counts_a_windows_rows():
    from evssm.server.core.sessions import ClientFull, ServerFull, SessionTable

    table = SessionTable(4, {"m": 4})
    windowed = table.open("m", 3, owner="k", owner_limit=4, lanes=3)
    assert len(set(windowed.slots)) == 3 and windowed.slot == windowed.slots[0]
    with pytest.raises(ServerFull, match="2 window lanes counts as 2"):
        table.open("m", 3, lanes=2)
    with pytest.raises(ClientFull):
        table.open("m", 3, owner="k", owner_limit=3)
    plain = table.open("m", 3, owner="k", owner_limit=4)
    assert plain.slots == (plain.slot,) and plain.slot not in windowed.slots
    table.release(windowed, idle=True)
    assert table.pools["m"].is_dirty(windowed.slots[2])  # every row is zeroed before its reuse
    again = table.open("m", 3, owner="k", owner_limit=4, lanes=3)
    assert set(again.slots) == set(windowed.slots)

# --- with the other live fields ----------------------------------------------------------------
# A session opened with a sliding window, input filters, decisions and ``realtime`` answers after
# every packet as ``/v1/classify`` answers the stream so far with the same ``filters`` and
# ``window``: the filters run first (on the source's events, carried across packets), the window
# is planned on what they keep. Its results also carry a finite lag and at most one decision per
# change of class.

LIVE_WINDOW = {"ms": 2000, "hop_ms": 500}
LIVE_FILTERS = {"refractory_us": 40, "max_rate": 400_000}


async def stream_live(url: str, t: np.ndarray, x: np.ndarray, cuts: list[int]) -> tuple[dict, list[dict]]:
    async with connect(f"{url}/v1/stream") as ws:
        c = Client(ws)
        opened = await c.open(window=LIVE_WINDOW, filters=LIVE_FILTERS, decide={"min_prob": 0.2, "hold_ms": 0},
                              realtime=True)
        results = []
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
            form = ("bin", "records", "lists")[i % 3]
            results.append(await c.request({"type": "events", "seq": i, **columns(t[a:b], x[a:b], form)}))
        return opened, results


def classify_prefixes(base: str, t: np.ndarray, x: np.ndarray, ends: list[int]) -> list[dict]:
    """``/v1/classify`` of each prefix ``[:end]`` with the session's filters and window, in requests
    of a bounded size."""
    out: list[dict] = []
    batch: list[tuple[np.ndarray, np.ndarray]] = []
    size = 0
    for end in ends:
        if batch and (size + end > 40_000 or len(batch) >= 32):
            out += classify(base, batch, filters=LIVE_FILTERS, window=LIVE_WINDOW)
            batch, size = [], 0
        batch.append((t[:end], x[:end]))
        size += end
    if batch:
        out += classify(base, batch, filters=LIVE_FILTERS, window=LIVE_WINDOW)
    return out


def test_window_filters_decisions_and_lag_on_one_session(start):
    server = start()
    rng = np.random.default_rng(2112)
    t, x = live_stream(rng, 14)
    cuts = cuts_of(rng, len(t))
    opened, results = asyncio.run(stream_live(server.ws, t, x, cuts))
    assert opened["window"]["lanes"] == 4 and opened["filters"] == LIVE_FILTERS

    expected = classify_prefixes(server.http, t, x, cuts[1:])
    removed_total = 0
    decided: list[Any] = []
    answered = 0
    for r, want, a, b in zip(results, expected, cuts[:-1], cuts[1:], strict=True):
        assert r["type"] == "result", r
        assert r["events"] == want["events"], (r["events"], want["events"])
        removed_total += sum(r["filtered"].values())
        assert removed_total == sum(want["filtered"].values())
        assert r.get("window") == want.get("window")
        assert_probs_equal(r["probs"], want["probs"])
        answered += r["probs"] is not None
        if b > a:  # a packet with events has a lag (an empty one has no time to trail by)
            assert math.isfinite(r["lag_ms"]) and r["lag_ms"] >= 0
        if "decision" in r:
            decided.append(r["decision"]["label"])
    assert removed_total > 0, "the filters removed nothing: the test would not see their order"
    assert answered > len(results) // 2
    assert all(a != b for a, b in zip(decided, decided[1:], strict=False)), decided
