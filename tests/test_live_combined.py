"""The live-sensor fields together on one session, over real sockets (uvicorn on 127.0.0.1, tiny model).

A session opened with a sliding window, input filters, decisions and ``realtime`` answers after
every packet as ``/v1/classify`` answers the stream so far with the same ``filters`` and
``window``: the filters run first (on the source's events, carried across packets), the window
is planned on what they keep. Its results also carry a finite lag and at most one decision per
change of class.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
from test_live_windows_served import cuts_of, live_stream, start, tiny_model  # noqa: F401 (fixtures)
from test_server_stream import Client, assert_probs_equal, classify, columns
from websockets.asyncio.client import connect

WINDOW = {"ms": 2000, "hop_ms": 500}
FILTERS = {"refractory_us": 40, "max_rate": 400_000}


async def stream_live(url: str, t: np.ndarray, x: np.ndarray, cuts: list[int]) -> tuple[dict, list[dict]]:
    async with connect(f"{url}/v1/stream") as ws:
        c = Client(ws)
        opened = await c.open(window=WINDOW, filters=FILTERS, decide={"min_prob": 0.2, "hold_ms": 0},
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
            out += classify(base, batch, filters=FILTERS, window=WINDOW)
            batch, size = [], 0
        batch.append((t[:end], x[:end]))
        size += end
    if batch:
        out += classify(base, batch, filters=FILTERS, window=WINDOW)
    return out


def test_window_filters_decisions_and_lag_on_one_session(start):
    server = start()
    rng = np.random.default_rng(2112)
    t, x = live_stream(rng, 14)
    cuts = cuts_of(rng, len(t))
    opened, results = asyncio.run(stream_live(server.ws, t, x, cuts))
    assert opened["window"]["lanes"] == 4 and opened["filters"] == FILTERS

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
