"""Decisions and compact results, served: ``open`` with ``decide``/``results`` over real sockets.

The tiny model's answers on a random stream are the ground truth: a session without ``decide``
gives the top class after every packet, and a decision tracker fed those answers says where each
decision must fall; a ``decide`` session of the same packets must send exactly those decisions.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import msgpack
import numpy as np
from conftest import wait_ready
from websockets.asyncio.client import connect

from evssm.server.app import create_app
from evssm.server.live.decisions import DecideSpec, DecisionTracker
from evssm.server.settings import Settings

CHANNELS = 700
BASE = Settings(batch_buckets=(8,), length_buckets=(128,), classify_length_buckets=(),
                slots_per_model=16, max_sessions=16, max_packet_events=2048, batch_wait_ms=1.0,
                session_idle_timeout=60.0)
PACKETS = 40


def packets(seed: int = 3) -> list[dict[str, Any]]:
    """Packets of a stream whose halves differ (other channels, other rates), so the tiny
    model's top class changes along it."""
    rng = np.random.default_rng(seed)
    out, t = [], 1_000
    for k in range(PACKETS):
        low = k < PACKETS // 2
        n = int(rng.integers(60, 200))
        t_col = t + np.cumsum(rng.integers(0, 400 if low else 4000, n))
        x = rng.integers(0, CHANNELS // 4, n) if low else rng.integers(CHANNELS // 2, CHANNELS, n)
        t = int(t_col[-1])
        out.append({"type": "events", "seq": k, "t": t_col.astype("<i8").tobytes(),
                    "x": x.astype("<u2").tobytes()})
    return out


async def request(ws: Any, msg: dict[str, Any]) -> dict[str, Any]:
    await ws.send(msgpack.packb(msg))
    return msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60))


async def run(url: str, frames: list[dict[str, Any]], **open_fields: Any) -> tuple[dict, list[dict]]:
    async with connect(f"{url}/v1/stream") as ws:
        opened = await request(ws, {"type": "open", "top_k": 1, **open_fields})
        assert opened["type"] == "opened", opened
        return opened, [await request(ws, f) for f in frames]


def expected_decisions(full: list[dict], spec: DecideSpec) -> list[tuple[int, str, float, int]]:
    """(seq, label, prob, t) of each decision a tracker fed ``full``'s answers makes."""
    tracker, out = DecisionTracker(spec), []
    for r in full:
        label, prob = (r["top"][0][0], r["top"][0][1]) if r["top"] else (None, 0.0)
        d = tracker.update(label, prob, r["t"])
        if d is not None:
            out.append((r["seq"], d.label, d.prob, d.t))
    return out


def decisions(results: list[dict]) -> list[tuple[int, str, float, int]]:
    return [(r["seq"], r["decision"]["label"], r["decision"]["prob"], r["decision"]["t"])
            for r in results if "decision" in r]


def test_decisions_fire_once_per_change_as_the_answers_say(server):
    frames = packets()
    _, full = asyncio.run(run(server.ws, frames))
    assert all(r["type"] == "result" and "decision" not in r for r in full)
    tops = [r["top"][0][0] for r in full if r["top"]]
    changes = sum(a != b for a, b in zip(tops, tops[1:], strict=False))
    assert changes >= 1, f"the stream must switch class for this test: {tops}"
    for spec in ({"min_prob": 0.0, "hold_ms": 0}, {"min_prob": 0.0, "hold_ms": 30},
                 {"min_prob": 0.5, "hold_ms": 0}):
        want = expected_decisions(full, DecideSpec.from_dict(spec))
        _, got = asyncio.run(run(server.ws, frames, decide=spec))
        assert [r["seq"] for r in got] == list(range(PACKETS))
        have = decisions(got)
        assert [(s, label, t) for s, label, _, t in have] == [(s, label, t) for s, label, _, t in want], spec
        for (_, _, p, _), (_, _, q, _) in zip(have, want, strict=True):
            assert math.isfinite(p) and abs(p - q) < 1e-5
        # Once per change: consecutive decisions name different classes.
        labels = [label for _, label, _, _ in have]
        assert all(a != b for a, b in zip(labels, labels[1:], strict=False)), labels
        # Full results still carry probabilities everywhere.
        assert all("probs" in r and "top" in r for r in got)
    # hold 0, any probability: the first answer decides, and every change of top class decides.
    _, got = asyncio.run(run(server.ws, frames, decide={"min_prob": 0, "hold_ms": 0}))
    assert len(decisions(got)) == changes + 1
    # A hold longer than the stream decides nothing.
    _, got = asyncio.run(run(server.ws, frames, decide={"min_prob": 0, "hold_ms": 3_600_000}))
    assert decisions(got) == []


def test_compact_results_carry_probabilities_only_with_a_decision(server):
    frames = packets()
    _, full = asyncio.run(run(server.ws, frames))
    _, compact = asyncio.run(run(server.ws, frames, decide={"min_prob": 0, "hold_ms": 0}, results="compact"))
    assert [r["seq"] for r in compact] == list(range(PACKETS))
    with_decision = [r for r in compact if "decision" in r]
    assert with_decision, "the stream decides at least once"
    for r, f in zip(compact, full, strict=True):
        assert r["events"] == f["events"] and r["t"] == f["t"]
        if "decision" in r:
            assert np.isfinite(r["probs"]).all()
            np.testing.assert_allclose(r["probs"], f["probs"], rtol=1e-4, atol=1e-6)
            assert r["top"][0][0] == r["decision"]["label"] == f["top"][0][0]
        else:
            assert "probs" not in r and "top" not in r


BAD_OPENS = [
    ({"decide": {"min_prob": 2}}, "min_prob"),
    ({"decide": {"min_prob": 0.5, "hold_ms": -1}}, "hold_ms"),
    ({"decide": {"hold_ms": 10}}, "min_prob"),
    ({"decide": [0.5, 10]}, "decide"),
    ({"results": "tiny"}, "results"),
    ({"results": "compact"}, "decide"),
    ({"realtime": "yes"}, "realtime"),
    ({"overload": "fast", "realtime": True}, "overload"),
    ({"overload": "drop"}, "realtime"),
    ({"realtime": True, "overload": "drop", "max_lag_ms": -5}, "max_lag_ms"),
    ({"realtime": True, "max_lag_ms": 50}, "drop"),
]


def test_bad_live_fields_are_refused_and_the_connection_opens_after(server):
    frames = packets()[:3]

    async def go() -> None:
        async with connect(f"{server.ws}/v1/stream") as ws:
            for fields, named in BAD_OPENS:
                err = await request(ws, {"type": "open", **fields})
                assert err["type"] == "error" and err["code"] == "invalid_field", (fields, err)
                assert named in err["message"], (fields, err["message"])
            opened = await request(ws, {"type": "open", "decide": {"min_prob": 0}})
            assert opened["type"] == "opened"
            results = [await request(ws, f) for f in frames]
            assert [r["type"] for r in results] == ["result"] * 3
            assert results[-1]["events"] > 0

    asyncio.run(go())


def test_decisions_survive_a_resume_and_a_changed_declaration_is_refused(server):
    frames = packets()
    spec = {"min_prob": 0, "hold_ms": 0}
    _, whole = asyncio.run(run(server.ws, frames, decide=spec))
    cut = PACKETS // 2 + 3

    async def go() -> list[dict]:
        async with connect(f"{server.ws}/v1/stream") as ws:
            opened = await request(ws, {"type": "open", "top_k": 1, "decide": spec})
            assert opened["decide"] == spec and "results" not in opened and "realtime" not in opened
            first = [await request(ws, f) for f in frames[:cut]]
        async with connect(f"{server.ws}/v1/stream") as ws:
            err = await request(ws, {"type": "open", "resume": opened["resume"],
                                     "decide": {"min_prob": 0.9, "hold_ms": 0}})
            assert err["type"] == "error" and err["code"] == "invalid_field" and "decide" in err["message"]
            again = await request(ws, {"type": "open", "resume": opened["resume"], "decide": spec})
            assert again["type"] == "opened" and again["resumed"] and again["decide"] == spec
            return first + [await request(ws, f) for f in frames[cut:]]

    assert decisions(asyncio.run(go())) == decisions(whole)


def test_decisions_survive_a_restart_through_the_snapshot(tiny_model, tmp_path):
    from conftest import serve_app

    frames = packets()
    spec = {"min_prob": 0, "hold_ms": 0}
    settings = BASE.replace(state_dir=str(tmp_path / "state"), snapshot_interval=0.2)
    cut = PACKETS // 2 + 3

    async def first_half(url: str) -> tuple[str, list[dict], list[dict]]:
        _, whole = await run(url, frames, decide=spec)
        async with connect(f"{url}/v1/stream") as ws:
            opened = await request(ws, {"type": "open", "top_k": 1, "decide": spec, "realtime": True})
            first = [await request(ws, f) for f in frames[:cut]]
            for _ in range(100):  # until a snapshot covers every event sent
                r = await request(ws, {"type": "events", "seq": 1000, "t": [], "x": []})
                if r.get("durable") == first[-1]["events"]:
                    break
                await asyncio.sleep(0.1)
            assert r["durable"] == first[-1]["events"], r
        return opened["resume"], whole, first

    async def second_half(url: str, token: str) -> list[dict]:
        async with connect(f"{url}/v1/stream") as ws:
            again = await request(ws, {"type": "open", "resume": token})
            assert again["type"] == "opened" and again["restored"], again
            # The declaration came back with the snapshot, and the reply says so.
            assert again["decide"] == spec and again["realtime"] is True, again
            return [await request(ws, f) for f in frames[cut:]]

    with serve_app(create_app(settings, models={"tiny": tiny_model})) as a:
        wait_ready(a.http)
        token, whole, first = asyncio.run(first_half(a.ws))
    with serve_app(create_app(settings, models={"tiny": tiny_model})) as b:
        wait_ready(b.http)
        rest = asyncio.run(second_half(b.ws, token))
    assert decisions(whole), "the stream decides"
    assert decisions(first + rest) == decisions(whole)
    assert all(math.isfinite(r["lag_ms"]) and r["lag_ms"] >= 0 for r in rest), "restored realtime, a new clock"
