"""The server with the project's default model (a 2-D sensor), over real sockets.

No ``--model``: the app loads the default model itself. Two batch buckets (1, 4) so lone packets and
batches of concurrent sessions take different compiled shapes.
"""

from __future__ import annotations

import asyncio

import httpx
import msgpack
import numpy as np
from conftest import wait_ready
from numeric import assert_close
from websockets.asyncio.client import connect

from evssm.server.api.protocol import RECORD_DTYPE
from evssm.server.app import create_app
from evssm.server.settings import Settings

SETTINGS = Settings(batch_buckets=(1, 4), length_buckets=(128,), classify_length_buckets=(),
                    slots_per_model=8, max_sessions=8, max_packet_events=4096)


def recording(rng: np.random.Generator, n: int, w: int, h: int) -> dict[str, np.ndarray]:
    return {"t": np.cumsum(rng.integers(0, 2000, n)).astype(np.int64),
            "x": rng.integers(0, w, n), "y": rng.integers(0, h, n), "p": rng.integers(0, 2, n)}


def bins(rec: dict[str, np.ndarray], a: int, b: int) -> dict[str, bytes]:
    dtypes = {"t": "<i8", "x": "<u2", "y": "<u2", "p": "u1"}
    return {k: rec[k][a:b].astype(dtypes[k]).tobytes() for k in dtypes}


def records(rec: dict[str, np.ndarray], a: int, b: int) -> dict[str, bytes]:
    out = np.zeros(b - a, RECORD_DTYPE)
    out["t"], out["x"], out["y"], out["on"] = rec["t"][a:b], rec["x"][a:b], rec["y"][a:b], rec["p"][a:b]
    return {"records": out.tobytes()}


async def request(ws, msg: dict) -> dict:
    await ws.send(msgpack.packb(msg))
    return msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60))


def test_default_model_streams_2d_events_like_classify(serve):
    server = serve(create_app(SETTINGS))
    wait_ready(server.http, 300)
    models = httpx.get(f"{server.http}/v1/models").json()
    (info,) = models["models"]
    assert models["default"] == info["name"] and info["sensor"]["kind"] == "2d"
    w, h = info["sensor"]["width"], info["sensor"]["height"]
    rng = np.random.default_rng(0)
    recs = [recording(rng, int(n), w, h) for n in rng.integers(300, 700, 4)]

    body = {"streams": [bins(r, 0, len(r["t"])) for r in recs], "top_k": 1}
    resp = httpx.post(f"{server.http}/v1/classify", content=msgpack.packb(body),
                      headers={"content-type": "application/msgpack"}, timeout=120)
    assert resp.status_code == 200, resp.text
    expected = msgpack.unpackb(resp.content)["results"]

    async def session(rec: dict[str, np.ndarray]) -> dict:
        async with connect(f"{server.ws}/v1/stream") as ws:
            opened = await request(ws, {"type": "open", "top_k": 1})
            assert opened["model"]["sensor"]["kind"] == "2d"
            n = len(rec["t"])
            cuts = [0, 100, 101, 101, 300, n]
            reply = None
            for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=False)):
                cols = records(rec, a, b) if k % 2 else bins(rec, a, b)
                reply = await request(ws, {"type": "events", "seq": k, **cols})
                assert reply["type"] == "result" and reply["events"] == b
            # 2-D specific bad input leaves the state untouched.
            t_next = [int(rec["t"][-1]) + 1]
            for bad, code in ((dict(t=t_next, x=[0], y=[0]), "missing_column"),
                              (dict(t=t_next, x=[0], y=[0], p=[2]), "address_out_of_range"),
                              (dict(t=t_next, x=[0], y=[h], p=[0]), "address_out_of_range"),
                              (dict(t=t_next, x=[w], y=[0], p=[0]), "address_out_of_range")):
                err = await request(ws, {"type": "events", "seq": 99, **bad})
                assert err["code"] == code, (bad, err)
            same = await request(ws, {"type": "events", "seq": 100, "t": [], "x": [], "y": [], "p": []})
            assert same["probs"] == reply["probs"] and same["events"] == n
            return reply

    async def together() -> list[dict]:
        return list(await asyncio.gather(*(session(r) for r in recs)))

    lone = asyncio.run(session(recs[0]))  # batch bucket 1
    finals = asyncio.run(together())  # batch bucket 4
    for got, want in zip([lone] + finals, [expected[0]] + expected, strict=False):
        assert_close(got["probs"], want["probs"], rtol=1e-3, atol=2e-6)
        assert got["top"][0][0] == want["label"] and len(got["top"]) == 1
