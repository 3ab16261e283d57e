"""The server over real sockets (uvicorn on 127.0.0.1, websockets and httpx clients), tiny model.

One ``config:tiny`` model is loaded for the module; every app reuses it, so its shape buckets are
compiled once. Buckets are small (batch 8, length 128) so packets above 128 events take several
steps and 64 sessions take several batches.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
import websockets
from conftest import metric_sum, wait_ready
from numeric import assert_close
from websockets.asyncio.client import connect

from evssm.server.api.protocol import RECORD_DTYPE
from evssm.server.app import create_app
from evssm.server.settings import Settings

CHANNELS = 700
BASE = Settings(batch_buckets=(8,), length_buckets=(128,), classify_length_buckets=(1024,),
                slots_per_model=64, max_sessions=64, max_packet_events=2048, batch_wait_ms=2.0,
                max_classify_events=50_000, session_idle_timeout=60.0, max_sessions_per_client=64)


@pytest.fixture
def start(serve, tiny_model):
    """``start(**settings)`` -> a ready server with the tiny model named "tiny"."""
    def _start(**changes: Any):
        app = create_app(BASE.replace(**changes), models={"tiny": tiny_model})
        server = serve(app)
        wait_ready(server.http)
        server.app = app
        return server
    return _start


@pytest.fixture
def server(start):
    return start()


# --- helpers -------------------------------------------------------------------------------------
def recording(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.cumsum(rng.integers(0, 3000, n)).astype(np.int64) + int(rng.integers(0, 10**6))
    return t, rng.integers(0, CHANNELS, n).astype(np.int64)


def columns(t: np.ndarray, x: np.ndarray, form: str) -> dict[str, Any]:
    if form == "bin":
        return {"t": t.astype("<i8").tobytes(), "x": x.astype("<u2").tobytes()}
    if form == "records":
        rec = np.zeros(len(t), RECORD_DTYPE)
        rec["t"], rec["x"] = t, x
        return {"records": rec.tobytes()}
    return {"t": t.tolist(), "x": x.tolist()}


def random_cuts(rng: np.random.Generator, n: int, largest: int = 400) -> list[int]:
    cuts = [0]
    while cuts[-1] < n:
        cuts.append(min(n, cuts[-1] + int(rng.choice([0, 1, 7, rng.integers(1, largest)]))))
    return cuts


class Client:
    """A thin WebSocket client speaking msgpack (or JSON with ``text=True``)."""

    def __init__(self, ws: Any):
        self.ws = ws

    async def send(self, msg: dict[str, Any], text: bool = False) -> None:
        await self.ws.send(json.dumps(msg) if text else msgpack.packb(msg, use_bin_type=True))

    async def recv(self, timeout: float = 30.0) -> dict[str, Any]:
        data = await asyncio.wait_for(self.ws.recv(), timeout)
        return json.loads(data) if isinstance(data, str) else msgpack.unpackb(data, raw=False)

    async def request(self, msg: dict[str, Any], text: bool = False) -> dict[str, Any]:
        await self.send(msg, text)
        return await self.recv()

    async def open(self, **fields: Any) -> dict[str, Any]:
        reply = await self.request({"type": "open", **fields})
        assert reply["type"] == "opened", reply
        return reply


def classify(base: str, streams: list[tuple[np.ndarray, np.ndarray]], **body: Any) -> list[dict]:
    r = httpx.post(f"{base}/v1/classify", timeout=120,
                   json={"streams": [{"t": t.tolist(), "x": x.tolist()} for t, x in streams], **body})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def assert_probs_equal(a: list[float] | None, b: list[float] | None) -> None:
    assert (a is None) == (b is None), (a, b)
    if a is not None:
        assert_close(np.asarray(a), np.asarray(b), rtol=1e-3, atol=2e-6)


# --- streaming equals classify -------------------------------------------------------------------
def test_random_packets_match_classify_of_every_prefix(server):
    rng = np.random.default_rng(1)
    t, x = recording(rng, 900)
    cuts = random_cuts(rng, len(t))
    forms = ["bin", "lists", "records", "json"]

    async def stream() -> list[dict]:
        async with connect(f"{server.ws}/v1/stream") as ws:
            c = Client(ws)
            opened = await c.open(top_k=2)
            assert opened["model"]["name"] == "tiny" and opened["events"] == 0
            results = []
            for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=False)):
                form = forms[i % 4]
                msg = {"type": "events", "seq": i,
                       **columns(t[a:b], x[a:b], "lists" if form == "json" else form)}
                results.append(await c.request(msg, text=form == "json"))
            return results

    results = asyncio.run(stream())
    assert [r["seq"] for r in results] == list(range(len(cuts) - 1))
    assert [r["events"] for r in results] == cuts[1:]
    prefixes = [(t[:b], x[:b]) for b in cuts[1:]]
    expected = classify(server.http, prefixes)
    for got, want, b in zip(results, expected, cuts[1:], strict=False):
        assert got["t"] == (int(t[b - 1]) if b else None)
        assert_probs_equal(got["probs"], want["probs"])
        if got["probs"] is not None:
            assert len(got["top"]) == 2 and got["top"][0][0] == want["label"]
    assert results[-1]["probs"] is not None


def test_packets_queued_behind_a_held_step_are_answered_in_order_and_exactly(server):
    """While the step thread is held in a step, two sessions queue five packets each (one longer
    than the length bucket, so it takes two chunks), and a rejected packet among the first's:
    once the step goes on, each packet gets its own answer, in order, equal to /v1/classify of
    its session's prefix; the rejected packet gets its error in its place and leaves the state
    as it was (the answers after it still equal classify). The native step coalesces: the
    queued packets of a session share the steps after the held one, each answered from its own
    readout."""
    runner = server.app.state.engine.runners["tiny"]
    sched = server.app.state.engine.schedulers["tiny"]
    assert runner.coalesces
    real, go, held = runner.run, threading.Event(), threading.Event()
    stepped: list[list[int]] = []

    def held_run(plan):
        if len(plan.slots):
            stepped.append(plan.slots.tolist())
            held.set()
            assert go.wait(30), "the test never let the step go on"
        return real(plan)

    rng = np.random.default_rng(21)
    streams = [recording(rng, 520) for _ in range(2)]
    cuts = [0, 60, 61, 250, 380, 520]  # 61..250: two chunks of the 128-event bucket

    async def run() -> list[list[dict]]:
        async with connect(f"{server.ws}/v1/stream") as wa, connect(f"{server.ws}/v1/stream") as wb:
            clients = [Client(wa), Client(wb)]
            for c in clients:
                await c.open()
            for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
                for c, (t, x) in zip(clients, streams, strict=True):
                    await c.send({"type": "events", "seq": k, **columns(t[a:b], x[a:b], "bin")})
                if k == 0:
                    assert await asyncio.to_thread(held.wait, 30)  # the first step is held
                if k == 2:  # older than the session's newest event: refused
                    t, x = streams[0]
                    await clients[0].send({"type": "events", "seq": 99, "t": [int(t[0])], "x": [1]})
            for _ in range(3000):  # every packet accepted (and planned) before the step goes on
                if sched.queued_packets == 10:
                    break
                await asyncio.sleep(0.01)
            go.set()
            return [[await c.recv() for _ in range(n)] for c, n in zip(clients, (6, 5), strict=True)]

    runner.run = held_run
    try:
        replies = asyncio.run(run())
    finally:
        go.set()
        runner.run = real
    assert [r["seq"] for r in replies[0]] == [0, 1, 2, 99, 3, 4]
    assert replies[0][3]["type"] == "error" and replies[0][3]["code"] == "timestamps_decreasing"
    del replies[0][3]
    for got, (t, x) in zip(replies, streams, strict=True):
        assert [r["type"] for r in got] == ["result"] * 5 and [r["seq"] for r in got] == list(range(5))
        assert [r["events"] for r in got] == cuts[1:]
        expected = classify(server.http, [(t[:b], x[:b]) for b in cuts[1:]])
        for r, want in zip(got, expected, strict=True):
            if r["probs"] is not None:
                assert np.isfinite(r["probs"]).all()
            assert_probs_equal(r["probs"], want["probs"])
        assert got[-1]["probs"] is not None
    # One step for the first packets, then 7 chunks per session (three packets are longer than
    # the 128-event bucket): 14 rows in steps of at most 8.
    assert [len(s) for s in stepped] == [2, 8, 6] and len(set(stepped[1])) == 2
    coalesced = sum(len(s) - len(set(s)) for s in stepped)
    assert f'evssm_coalesced_chunks_total{{model="tiny"}} {coalesced:.1f}' in httpx.get(f"{server.http}/metrics").text


def test_xla_step_pads_the_staged_rows_into_its_buckets(serve, tiny_model):
    """The same streams on a model whose streaming step is XLA's: the staged ragged rows are
    padded once per step into the compiled buckets; every answer equals classify, and steady
    traffic compiles nothing."""
    from evssm.models.streaming import StreamingModel

    xla = StreamingModel(tiny_model.config, tiny_model.variables, backend="xla")
    app = create_app(BASE.replace(max_sessions=8), models={"tiny": xla})
    server = serve(app)
    before = wait_ready(server.http)["compilations"]["tiny"]
    assert not app.state.engine.runners["tiny"].coalesces  # XLA's step reads out once per row
    rng = np.random.default_rng(11)
    recs = [recording(rng, int(rng.integers(100, 400))) for _ in range(5)]

    async def session(t: np.ndarray, x: np.ndarray) -> list[dict]:
        async with connect(f"{server.ws}/v1/stream") as ws:
            c = Client(ws)
            await c.open()
            cuts = random_cuts(rng, len(t), 300)
            for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=False)):
                await c.send({"type": "events", "seq": k, **columns(t[a:b], x[a:b], "bin")})
            return [await c.recv() for _ in cuts[1:]]

    async def run() -> list[list[dict]]:
        return await asyncio.gather(*(session(t, x) for t, x in recs))

    finals = [replies[-1] for replies in asyncio.run(run())]
    for got, want, (t, _) in zip(finals, classify(server.http, recs), recs, strict=False):
        assert got["events"] == len(t)
        assert_probs_equal(got["probs"], want["probs"])
    assert httpx.get(f"{server.http}/readyz").json()["compilations"]["tiny"] == before


def test_classify_msgpack_long_recordings_and_order(server):
    """Recordings beyond every classify bucket are chunked; results keep the request's order."""
    rng = np.random.default_rng(2)
    streams = [recording(rng, n) for n in (1500, 10, 300, 0, 2048)]
    body = {"streams": [columns(t, x, "bin") for t, x in streams]}
    r = httpx.post(f"{server.http}/v1/classify", content=msgpack.packb(body),
                   headers={"content-type": "application/msgpack"}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/msgpack")
    got = msgpack.unpackb(r.content)["results"]
    assert [g["events"] for g in got] == [1500, 10, 300, 0, 2048]
    assert got[1]["probs"] is None and got[3]["probs"] is None and got[3]["label"] is None

    async def stream(t: np.ndarray, x: np.ndarray) -> dict:
        async with connect(f"{server.ws}/v1/stream") as ws:
            c = Client(ws)
            await c.open()
            reply = await c.request({"type": "events", "seq": 0, **columns(t, x, "bin")})
            return reply

    for i in (0, 4):
        assert_probs_equal(asyncio.run(stream(*streams[i]))["probs"], got[i]["probs"])
        assert_close(sum(got[i]["probs"]), 1.0, rtol=1e-5)


def test_classify_is_busy_until_its_shapes_compile_while_streams_are_served(server):
    """Ready means streams are served; classify answers 503 busy with Retry-After (and /readyz
    says so) until the model's classify shapes are compiled, then the same request succeeds."""
    runner = server.app.state.engine.runners["tiny"]
    t, x = recording(np.random.default_rng(3), 600)
    body = msgpack.packb({"streams": [columns(t, x, "bin")]})
    headers = {"content-type": "application/msgpack"}
    runner.classify_ready.clear()  # as between ready and the end of the classify warm-up
    try:
        r = httpx.post(f"{server.http}/v1/classify", content=body, headers=headers, timeout=60)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"] == "busy" and "compiling" in r.json()["message"]
        ready = httpx.get(f"{server.http}/readyz")
        assert ready.status_code == 200 and ready.json()["classify"] == {"tiny": False}

        async def stream() -> dict:
            async with connect(f"{server.ws}/v1/stream") as ws:
                c = Client(ws)
                await c.open()
                return await c.request({"type": "events", "seq": 0, **columns(t, x, "bin")})

        streamed = asyncio.run(stream())
        assert streamed["type"] == "result" and np.isfinite(streamed["probs"]).all()
    finally:
        runner.classify_ready.set()
    assert httpx.get(f"{server.http}/readyz").json()["classify"] == {"tiny": True}
    r = httpx.post(f"{server.http}/v1/classify", content=body, headers=headers, timeout=60)
    assert r.status_code == 200
    assert_probs_equal(streamed["probs"], msgpack.unpackb(r.content)["results"][0]["probs"])



def test_client_classify_waits_out_busy_and_gives_up_after_its_timeout(server):
    """The client library sends a request answered `busy` again after the server's Retry-After
    (saying so through on_busy) and gets the answer once the classify shapes are compiled; with
    no time to wait it raises ServerUnavailable at once."""
    from evssm.client import classify
    from evssm.client.errors import ServerUnavailable
    from evssm.models.events import Recording

    runner = server.app.state.engine.runners["tiny"]
    t, x = recording(np.random.default_rng(5), 600)
    rec = Recording(t=t, x=x)
    waits: list[tuple[float, str]] = []
    runner.classify_ready.clear()
    try:
        with pytest.raises(ServerUnavailable, match="compiling"):
            classify(server.http, [rec], busy_timeout=0)
        timer = threading.Timer(2.5, runner.classify_ready.set)
        timer.start()
        got = classify(server.http, [rec], on_busy=lambda d, m: waits.append((d, m)))
        timer.join()
    finally:
        runner.classify_ready.set()
    assert waits and all(d >= 1 and "compiling" in m for d, m in waits)
    direct = classify(server.http, [rec])
    assert got[0].events == 600 and got[0].probs is not None
    assert_probs_equal(got[0].probs, direct[0].probs)

def test_64_concurrent_sessions_each_get_their_own_answer(server):
    rng = np.random.default_rng(3)
    recs = [recording(rng, int(rng.integers(150, 500))) for _ in range(64)]
    cuts = [random_cuts(rng, len(t), 200) for t, _ in recs]

    async def session(i: int) -> dict:
        t, x = recs[i]
        async with connect(f"{server.ws}/v1/stream") as ws:
            c = Client(ws)
            await c.open()
            packets = list(zip(cuts[i][:-1], cuts[i][1:], strict=False))
            for k, (a, b) in enumerate(packets):  # pipelined: all sent before any answer is read
                await c.send({"type": "events", "seq": k, **columns(t[a:b], x[a:b], "bin")})
                await asyncio.sleep(0)
            replies = [await c.recv() for _ in packets]
            assert [r["seq"] for r in replies] == list(range(len(packets)))
            assert (await c.request({"type": "close"}))["type"] == "closed"
            return replies[-1]

    async def all_sessions() -> list[dict]:
        return await asyncio.gather(*(session(i) for i in range(64)))

    finals = asyncio.run(all_sessions())
    expected = classify(server.http, recs)
    for got, want, (t, _) in zip(finals, expected, recs, strict=False):
        assert got["events"] == len(t)
        assert_probs_equal(got["probs"], want["probs"])
    metrics = httpx.get(f"{server.http}/metrics").text
    steps = metric_sum(metrics, "evssm_batch_size_count")
    sessions_stepped = metric_sum(metrics, "evssm_batch_size_sum")
    assert sessions_stepped / steps > 2  # packets of different sessions shared steps
    assert metric_sum(metrics, "evssm_sessions_active") == 0  # all closed, all slots free


def test_steady_traffic_compiles_nothing(server):
    before = httpx.get(f"{server.http}/readyz").json()["compilations"]["tiny"]
    rng = np.random.default_rng(4)
    t, x = recording(rng, 2000)

    async def run() -> None:
        async with connect(f"{server.ws}/v1/stream") as ws:
            c = Client(ws)
            await c.open()
            for k, n in enumerate([1, 128, 129, 0, 2000 - 258]):
                a = sum([1, 128, 129, 0][:k])
                await c.request({"type": "events", "seq": k, **columns(t[a:a + n], x[a:a + n], "bin")})

    asyncio.run(run())
    classify(server.http, [(t[:n], x[:n]) for n in (5, 100, 1000, 1500)])
    after = httpx.get(f"{server.http}/readyz").json()["compilations"]["tiny"]
    assert after == before
    assert metric_sum(httpx.get(f"{server.http}/metrics").text, "evssm_compilations_total") == before


# --- session lifecycle ---------------------------------------------------------------------------
def test_reset_and_close_and_slot_reuse(start):
    server = start(max_sessions=1)
    rng = np.random.default_rng(5)
    (t1, x1), (t2, x2) = recording(rng, 300), recording(rng, 200)
    want1, want2 = classify(server.http, [(t1, x1), (t2, x2)])

    async def run() -> None:
        async with connect(f"{server.ws}/v1/stream") as ws:
            c = Client(ws)
            opened = await c.open()
            r = await c.request({"type": "events", "seq": 0, **columns(t1, x1, "bin")})
            assert_probs_equal(r["probs"], want1["probs"])
            assert (await c.request({"type": "reset"}))["type"] == "reset_done"
            # After a reset time may start again anywhere, like a new session.
            r = await c.request({"type": "events", "seq": 1, **columns(t2, x2, "bin")})
            assert r["events"] == len(t2)
            assert_probs_equal(r["probs"], want2["probs"])
            closed = await c.request({"type": "close"})
            assert closed == {"type": "closed", "session": opened["session"], "events": len(t2)}
            assert (await c.request({"type": "events", "t": [1], "x": [1]}))["code"] == "no_session"
            # The only slot was freed: a new session on the same connection gets it, zeroed.
            again = await c.open()
            assert again["session"] != opened["session"] and again["events"] == 0
            r = await c.request({"type": "events", "seq": 2, **columns(t2, x2, "bin")})
            assert_probs_equal(r["probs"], want2["probs"])

    asyncio.run(run())


def test_pipelined_control_frames_keep_their_order(start):
    """reset, empty packets, long packets (several steps each) and close sent back to back,
    none awaited: every answer comes in order and says the right thing; the slot is reused by
    a session whose first frames are an empty packet and a packet (its zeroing comes first)."""
    server = start(max_sessions=1)
    rng = np.random.default_rng(13)
    t, x = recording(rng, 700)
    want_all, want_tail = classify(server.http, [(t, x), (t[300:], x[300:])])

    async def run() -> None:
        async with connect(f"{server.ws}/v1/stream") as ws:
            c = Client(ws)
            opened = await c.open()
            frames = [{"type": "events", "seq": 0, **columns(t[:300], x[:300], "bin")},
                      {"type": "reset"},
                      {"type": "events", "seq": 1, "t": [], "x": []},
                      {"type": "events", "seq": 2, **columns(t[300:], x[300:], "bin")},
                      {"type": "events", "seq": 3, "t": [], "x": []},
                      {"type": "close"}]
            for frame in frames:
                await c.send(frame)
            replies = [await c.recv() for _ in frames]
            assert [r["type"] for r in replies] == ["result", "reset_done", "result", "result",
                                                   "result", "closed"]
            assert replies[2]["probs"] is None and replies[2]["events"] == 0
            assert replies[3]["events"] == replies[4]["events"] == 400
            assert_probs_equal(replies[3]["probs"], want_tail["probs"])
            assert_probs_equal(replies[4]["probs"], want_tail["probs"])
            assert replies[5] == {"type": "closed", "session": opened["session"], "events": 400}
            again = await c.open()  # the same (dirty) slot
            for frame in ({"type": "events", "seq": 4, "t": [], "x": []},
                          {"type": "events", "seq": 5, **columns(t, x, "bin")}):
                await c.send(frame)
            first, second = await c.recv(), await c.recv()
            assert first["probs"] is None and first["events"] == 0 and again["events"] == 0
            assert second["events"] == 700
            assert_probs_equal(second["probs"], want_all["probs"])

    asyncio.run(run())


def test_resets_back_to_back_behind_a_long_packet(start):
    """A packet of several steps, then two resets and an empty packet, none awaited: the second
    reset is planned once the first is (it used to stop the session's planning for good); the
    answers come in order, and the state after them is zero."""
    server = start()
    rng = np.random.default_rng(17)
    t, x = recording(rng, 700)
    want_all, want_tail = classify(server.http, [(t, x), (t[500:], x[500:])])

    async def run() -> None:
        async with connect(f"{server.ws}/v1/stream") as ws:
            c = Client(ws)
            await c.open()
            frames = [{"type": "events", "seq": 0, **columns(t, x, "bin")}, {"type": "reset"},
                      {"type": "reset"}, {"type": "events", "seq": 1, "t": [], "x": []},
                      {"type": "events", "seq": 2, **columns(t[500:], x[500:], "bin")}]
            for frame in frames:
                await c.send(frame)
            replies = [await asyncio.wait_for(c.recv(), 30) for _ in frames]
            assert [r["type"] for r in replies] == ["result", "reset_done", "reset_done", "result", "result"]
            assert_probs_equal(replies[0]["probs"], want_all["probs"])
            assert replies[3]["events"] == 0 and replies[3]["probs"] is None
            assert replies[4]["events"] == 200
            assert_probs_equal(replies[4]["probs"], want_tail["probs"])

    asyncio.run(run())


def test_resume_continues_the_same_state(server):
    rng = np.random.default_rng(6)
    t, x = recording(rng, 600)
    (want,) = classify(server.http, [(t, x)])

    async def run() -> None:
        ws1 = await connect(f"{server.ws}/v1/stream")
        c1 = Client(ws1)
        opened = await c1.open()
        await c1.request({"type": "events", "seq": 0, **columns(t[:250], x[:250], "bin")})
        await ws1.close()  # dropped without a close frame of the protocol
        async with connect(f"{server.ws}/v1/stream") as ws2:
            c2 = Client(ws2)
            # Only the token re-attaches: the session id is not a credential.
            err = await c2.request({"type": "open", "resume": opened["session"]})
            assert err["type"] == "error" and err["code"] == "unknown_session"
            resumed = await c2.open(resume=opened["resume"])
            assert resumed["session"] == opened["session"] and resumed["resumed"] is True
            assert resumed["events"] == 250 and resumed["t"] == int(t[249])
            # Timestamps continue from the session's last event, not from zero.
            bad = await c2.request({"type": "events", "seq": 1, "t": [int(t[0])], "x": [1]})
            assert bad["code"] == "timestamps_decreasing"
            # A second connection resuming the same token takes the session over.
            async with connect(f"{server.ws}/v1/stream") as ws3:
                c3 = Client(ws3)
                await c3.open(resume=opened["resume"])
                note = await c2.recv()
                assert note["code"] == "session_resumed_elsewhere"
                assert (await c2.request({"type": "reset"}))["code"] == "no_session"
                r = await c3.request({"type": "events", "seq": 2, **columns(t[250:], x[250:], "bin")})
                assert r["events"] == 600
                assert_probs_equal(r["probs"], want["probs"])

    asyncio.run(run())


def test_idle_sessions_are_evicted(start):
    server = start(session_idle_timeout=0.5)

    async def run() -> None:
        ws1 = await connect(f"{server.ws}/v1/stream")
        opened = await Client(ws1).open()
        await ws1.close()  # disconnected without close: kept only until the timeout
        async with connect(f"{server.ws}/v1/stream") as ws2:
            c = Client(ws2)
            await c.open()  # attached but idle: evicted too, and told so
            note = await c.recv(timeout=5)
            assert note["type"] == "error" and note["code"] == "session_expired"
            assert (await c.request({"type": "events", "t": [1], "x": [1]}))["code"] == "no_session"
            err = await c.request({"type": "open", "resume": opened["resume"]})
            assert err["code"] == "unknown_session"

    asyncio.run(run())
    metrics = httpx.get(f"{server.http}/metrics").text
    assert metric_sum(metrics, "evssm_sessions_evicted_total") == 2
    assert metric_sum(metrics, "evssm_sessions_active") == 0


def test_server_full_closes_with_1013(start):
    server = start(max_sessions=2)

    async def run() -> None:
        a = await connect(f"{server.ws}/v1/stream")
        b = await connect(f"{server.ws}/v1/stream")
        await Client(a).open()
        await Client(b).open()
        async with connect(f"{server.ws}/v1/stream") as ws:
            c = Client(ws)
            err = await c.request({"type": "open"})
            assert err["type"] == "error" and err["code"] == "server_full"
            with pytest.raises(websockets.ConnectionClosed) as info:
                await c.recv()
            assert info.value.rcvd.code == 1013
        await Client(a).request({"type": "close"})
        await a.close()
        async with connect(f"{server.ws}/v1/stream") as ws:  # room again
            await Client(ws).open()
        await b.close()

    asyncio.run(run())


def test_a_failed_step_ends_its_session_and_the_server_goes_on(server):
    """A device call that fails (injected once into the real runner): the packet is answered
    with internal_error, its session ends (its slot is freed), and a new session streams
    exactly."""
    engine = server.app.state.engine
    runner = engine.runners["tiny"]
    real, failures = runner.run, []

    def fail_once(plan):
        if len(plan.slots) and not failures:
            failures.append(len(plan.slots))
            raise RuntimeError("injected device failure")
        return real(plan)

    runner.run = fail_once
    rng = np.random.default_rng(12)
    t, x = recording(rng, 300)
    (want,) = classify(server.http, [(t, x)])

    async def run() -> None:
        async with connect(f"{server.ws}/v1/stream") as ws:
            c = Client(ws)
            await c.open()
            err = await c.request({"type": "events", "seq": 0, **columns(t[:100], x[:100], "bin")})
            assert err["type"] == "error" and err["code"] == "internal_error" and err["seq"] == 0
            note = await c.recv()
            assert note["code"] == "internal_error" and note["seq"] is None
            assert (await c.request({"type": "events", "seq": 1, "t": [int(t[0])], "x": [1]}))["code"] == "no_session"
            await c.open()
            r = await c.request({"type": "events", "seq": 2, **columns(t, x, "bin")})
            assert_probs_equal(r["probs"], want["probs"])

    try:
        asyncio.run(run())
    finally:
        runner.run = real
    assert failures == [1]
    metrics = httpx.get(f"{server.http}/metrics").text
    assert metric_sum(metrics, "evssm_sessions_active") == 1


# --- bad input -----------------------------------------------------------------------------------
BAD_FRAMES: list[tuple[Any, str]] = [
    (b"\xc1\xc1", "malformed_frame"),
    ("{not json", "malformed_frame"),
    (msgpack.packb([1, 2, 3]), "malformed_frame"),
    ({"type": "teleport"}, "unknown_type"),
    ({"seq": 1}, "unknown_type"),
    ({"type": "events", "seq": "one", "t": [1], "x": [1]}, "invalid_field"),
    ({"type": "events", "seq": 1, "t": [1]}, "missing_column"),
    ({"type": "events", "seq": 1, "t": [1], "x": "1"}, "invalid_column"),
    ({"type": "events", "seq": 1, "t": [1.5], "x": [1]}, "invalid_column"),
    ({"type": "events", "seq": 1, "t": b"\x00" * 9, "x": b"\x00\x00"}, "invalid_column"),
    ({"type": "events", "seq": 1, "records": b"\x00" * 14}, "invalid_column"),
    ({"type": "events", "seq": 1, "t": [1, 2], "x": [1]}, "length_mismatch"),
    ({"type": "events", "seq": 1, "t": [1], "x": [CHANNELS]}, "address_out_of_range"),
    ({"type": "events", "seq": 1, "t": [1], "x": [-3]}, "address_out_of_range"),
    ({"type": "events", "seq": 1, "t": [1], "x": [70000]}, "address_out_of_range"),
    ({"type": "events", "seq": 1, "t": [10**9 + 5, 10**9 + 4], "x": [1, 1]}, "timestamps_decreasing"),
    ({"type": "events", "seq": 1, "t": [0], "x": [1]}, "timestamps_decreasing"),  # before the last event
    ({"type": "events", "seq": 1, "t": list(range(10**9, 10**9 + 2049)), "x": [1] * 2049}, "packet_too_large"),
    ({"type": "open"}, "session_already_open"),
    ({"type": "open", "top_k": "all"}, "invalid_field"),
]


def test_every_bad_input_gets_an_error_and_leaves_the_state_untouched(server):
    rng = np.random.default_rng(7)
    t, x = recording(rng, 400)
    (want,) = classify(server.http, [(t, x)])

    async def run() -> None:
        async with connect(f"{server.ws}/v1/stream") as ws:
            c = Client(ws)
            before_open = await c.request({"type": "events", "seq": 0, "t": [1], "x": [1]})
            assert before_open["code"] == "no_session"
            err = await c.request({"type": "open", "model": "no-such-model"})
            assert err["code"] == "unknown_model"
            await c.open()
            first = await c.request({"type": "events", "seq": 0, **columns(t[:200], x[:200], "bin")})
            assert first["events"] == 200
            for frame, code in BAD_FRAMES:
                if isinstance(frame, dict):
                    await c.send(frame)
                else:
                    await c.ws.send(frame)
                reply = await c.recv()
                assert reply["type"] == "error" and reply["code"] == code, \
                    (frame if len(str(frame)) < 200 else code, reply)
                assert isinstance(reply["message"], str) and reply["message"]
                if isinstance(frame, dict) and isinstance(frame.get("seq"), int):
                    assert reply["seq"] == frame["seq"]
            last = await c.request({"type": "events", "seq": 2, **columns(t[200:], x[200:], "bin")})
            assert last["events"] == 400 and last["seq"] == 2
            assert_probs_equal(last["probs"], want["probs"])

    asyncio.run(run())
    metrics = httpx.get(f"{server.http}/metrics").text
    assert 'evssm_rejected_packets_total{code="timestamps_decreasing"} 2.0' in metrics
    assert metric_sum(metrics, "evssm_rejected_packets_total") == len(BAD_FRAMES) + 2


def test_http_bad_input_is_4xx_json(server):
    h = server.http
    ok = {"streams": [{"t": [1, 2], "x": [3, 4]}]}
    cases = [
        (dict(content=b"{nope", headers={"content-type": "application/json"}), 400, "malformed_frame"),
        (dict(content=b"\xc1", headers={"content-type": "application/msgpack"}), 400, "malformed_frame"),
        (dict(content=b"a,b", headers={"content-type": "text/csv"}), 415, "unsupported_media_type"),
        (dict(json=[1, 2]), 400, "malformed_frame"),
        (dict(json={}), 400, "invalid_field"),
        (dict(json={"streams": [5]}), 400, "invalid_field"),
        (dict(json={**ok, "model": "nope"}), 404, "unknown_model"),
        (dict(json={**ok, "top_k": "x"}), 400, "invalid_field"),
        (dict(json={"streams": [{"t": [1]}]}), 400, "missing_column"),
        (dict(json={"streams": [{"t": [1], "x": ["a"]}]}), 400, "invalid_column"),
        (dict(json={"streams": [{"t": [1, 2], "x": [1]}]}), 400, "length_mismatch"),
        (dict(json={"streams": [{"t": [1], "x": [CHANNELS]}]}), 400, "address_out_of_range"),
        (dict(json={"streams": [{"t": [2, 1], "x": [1, 1]}]}), 400, "timestamps_decreasing"),
        (dict(json={"streams": [{"t": list(range(30_000)), "x": [0] * 30_000}] * 2}), 413, "request_too_large"),
    ]
    for kwargs, status, code in cases:
        r = httpx.post(f"{h}/v1/classify", timeout=60, **kwargs)
        assert r.status_code == status and r.json()["error"] == code, \
            (kwargs.get("json", "")[:1] if False else code, r.text)
        assert r.json()["message"]
    r = httpx.get(f"{h}/v1/classify")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    r = httpx.get(f"{h}/no/such/route")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    metrics = httpx.get(f"{h}/metrics").text
    assert 'evssm_http_requests_total{route="/v1/classify",status="400"}' in metrics
    assert 'evssm_http_requests_total{route="unmatched",status="404"}' in metrics
    assert 'status="500"' not in metrics


# --- read-only endpoints -------------------------------------------------------------------------
def test_models_health_stats_metrics_dashboard(server):
    h = server.http
    models = httpx.get(f"{h}/v1/models").json()
    assert models["default"] == "tiny" and models["ready"] is True
    (info,) = models["models"]
    assert info["name"] == "tiny" and info["sensor"]["kind"] == "1d" and len(info["classes"]) == 20
    assert info["downsampling"] == 32 and info["state_bytes"] > 0 and info["slots"] == 64
    assert httpx.get(f"{h}/healthz").json()["status"] == "ok"
    ready = httpx.get(f"{h}/readyz").json()
    assert ready["ready"] is True and ready["compilations"]["tiny"] >= 0

    rng = np.random.default_rng(8)
    t, x = recording(rng, 512)

    async def run() -> tuple[dict, dict]:
        async with connect(f"{server.ws}/v1/stream") as ws:
            c = Client(ws)
            opened = await c.open(top_k=0)  # no top in the frames: the answer is still known
            for k in range(4):
                last = await c.request({"type": "events", "seq": k,
                                        **columns(t[k * 128:(k + 1) * 128], x[k * 128:(k + 1) * 128],
                                                  "bin")})
            stats = httpx.get(f"{h}/v1/stats").json()
            assert stats["sessions_active"] == 1 and stats["models"]["tiny"]["sessions_active"] == 1
            (live,) = stats["recent"]
            assert live["session"] == opened["session"] and live["live"] is True
            await c.request({"type": "close"})
            return opened, last

    opened, last = asyncio.run(run())
    stats = httpx.get(f"{h}/v1/stats").json()
    # The live page's "Recent sessions": the session's answer after its last packet, then ended.
    (ended,) = stats["recent"]
    assert last["probs"] is not None and np.isfinite(last["probs"]).all()
    best = int(np.argmax(last["probs"]))
    assert ended["label"] == info["classes"][best] and ended["events"] == 512
    assert abs(ended["probability"] - last["probs"][best]) < 1e-4
    assert ended["live"] is False and ended["model"] == "tiny" and ended["idle_s"] >= 0
    assert opened["resume"] not in json.dumps(stats)  # nothing that resumes a session
    assert set(ended) == {"session", "model", "label", "probability", "events", "live", "idle_s"}
    assert stats["events_total"] == 512 and stats["packets_total"] == 4
    assert stats["events_per_s"] > 0 and stats["latency_p50_ms"] > 0
    assert stats["latency_p99_ms"] >= stats["latency_p50_ms"] and "time" in stats
    metrics = httpx.get(f"{h}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'evssm_events_total{model="tiny"} 512.0' in text
    assert 'evssm_packets_total{model="tiny"} 4.0' in text
    for name in ("evssm_sessions_active", "evssm_packet_latency_seconds_count", "evssm_step_latency_seconds_count",
                 "evssm_batch_size_count", "evssm_queue_wait_seconds_count", "evssm_compilations_total"):
        assert f'{name}{{model="tiny"}}' in text, name
    assert metric_sum(text, "evssm_packet_latency_seconds_count") == 4
    r = httpx.get(f"{h}/dashboard")
    if r.status_code == 200:
        assert "html" in r.headers["content-type"]
    else:
        assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_stats_history_serves_the_recent_past(server):
    """The live page draws the server's last minutes at once: one /v1/stats sample per second."""
    h = server.http
    rng = np.random.default_rng(9)
    t, x = recording(rng, 256)
    body = {"streams": [{"t": t.tolist(), "x": x.tolist()}]}
    assert httpx.post(f"{h}/v1/classify", json=body, timeout=60).status_code == 200
    deadline = time.monotonic() + 20
    while True:  # the sampler records once a second; wait for samples on both sides of the request
        history = httpx.get(f"{h}/v1/stats/history").json()
        samples = history["samples"]
        if samples and samples[-1]["events_total"] == 256 and len(samples) >= 3:
            break
        assert time.monotonic() < deadline, history
        time.sleep(0.2)
    assert history["interval_s"] == 1.0 and history["window_s"] == 900
    times = [s["time"] for s in samples]
    assert times == sorted(times) and 0.5 < (times[-1] - times[0]) / (len(times) - 1) < 2.0
    assert samples[0]["models"]["tiny"]["events_total"] <= 256  # the past, not a copy of now
    for key in ("events_per_s", "latency_p50_ms", "latency_p99_ms", "sessions_active", "models"):
        assert key in samples[-1], key
    page = httpx.get(f"{h}/dashboard")
    assert page.status_code == 200 and "/history" in page.text


def test_drain_answers_in_flight_packets_then_closes(server):
    rng = np.random.default_rng(9)
    t, x = recording(rng, 10 * 1000)
    engine = server.app.state.engine

    async def run() -> None:
        async with connect(f"{server.ws}/v1/stream") as ws:
            c = Client(ws)
            await c.open()
            for k in range(10):
                await c.send({"type": "events", "seq": k, **columns(t[k * 1000:(k + 1) * 1000],
                                                                    x[k * 1000:(k + 1) * 1000], "bin")})
            await asyncio.sleep(0.05)
            drained = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(engine.drain(10.0), server.loop))
            async with connect(f"{server.ws}/v1/stream") as late:  # no new sessions while draining
                lc = Client(late)
                err = await lc.recv()  # told at once, before any frame of its own
                assert err["type"] == "error" and err["code"] == "draining"
                with pytest.raises(websockets.ConnectionClosed) as info:
                    await lc.recv()
                assert info.value.rcvd.code == 1012
            replies = []
            with pytest.raises(websockets.ConnectionClosed) as info:
                while True:
                    replies.append(await c.recv())
            assert info.value.rcvd.code == 1001
            assert [r["seq"] for r in replies] == list(range(10))
            assert replies[-1]["events"] == 10_000
            assert await drained is True

    asyncio.run(run())
    r = httpx.get(f"{server.http}/readyz")
    assert r.status_code == 503 and r.json()["error"] == "draining"
    r = httpx.post(f"{server.http}/v1/classify", json={"streams": []})
    assert r.status_code == 503 and r.json()["error"] == "draining"


def test_several_models_served_at_once(serve, tiny_model):
    app = create_app(BASE.replace(max_sessions=4), models={"a": tiny_model, "b": tiny_model})
    server = serve(app)
    wait_ready(server.http)
    models = httpx.get(f"{server.http}/v1/models").json()
    assert models["default"] == "a" and [m["name"] for m in models["models"]] == ["a", "b"]
    rng = np.random.default_rng(10)
    t, x = recording(rng, 300)
    (want,) = classify(server.http, [(t, x)], model="b")

    async def run() -> None:
        async with connect(f"{server.ws}/v1/stream") as wa, connect(f"{server.ws}/v1/stream") as wb:
            ca, cb = Client(wa), Client(wb)
            assert (await ca.open())["model"]["name"] == "a"
            assert (await cb.open(model="b"))["model"]["name"] == "b"
            ra = await ca.request({"type": "events", "seq": 0, **columns(t[:100], x[:100], "bin")})
            rb = await cb.request({"type": "events", "seq": 0, **columns(t, x, "bin")})
            assert ra["events"] == 100 and rb["events"] == 300
            assert_probs_equal(rb["probs"], want["probs"])
            stats = httpx.get(f"{server.http}/v1/stats").json()
            assert stats["models"]["a"]["sessions_active"] == stats["models"]["b"]["sessions_active"] == 1

    asyncio.run(run())
