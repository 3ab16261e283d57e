"""Two models and long classifications at once, through the public API of a real `evssm serve`.

Each model's step thread and each model's classify thread call the native streaming step; a
classify of a recording longer than the largest offline length streams through scratch rows,
so it enters the kernel beside the streaming sessions. Every result must equal what the same
recording gives alone (`/v1/classify` once the load is gone), and the server must survive.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading

import httpx
import msgpack
import numpy as np
import pytest
from conftest import free_port, stop_process, wait_process_ready
from numeric import assert_close, assert_finite
from websockets.asyncio.client import connect

W = H = 34  # both models read the default model's 34x34 sensor
MODELS = ("default", "other")  # the shipped model, and the same architecture at random init


def recording(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {"t": np.cumsum(rng.integers(0, 400, n)).astype(np.int64),
            "x": rng.integers(0, W, n), "y": rng.integers(0, H, n), "p": rng.integers(0, 2, n)}


def columns(rec: dict[str, np.ndarray], a: int = 0, b: int | None = None) -> dict[str, bytes]:
    dtypes = {"t": "<i8", "x": "<u2", "y": "<u2", "p": "u1"}
    return {k: rec[k][a:b].astype(dtypes[k]).tobytes() for k in dtypes}


def classify(base: str, model: str, recs: list[dict[str, np.ndarray]]) -> list[list[float]]:
    body = msgpack.packb({"model": model, "streams": [columns(r) for r in recs]})
    resp = httpx.post(f"{base}/v1/classify", content=body, timeout=300,
                      headers={"content-type": "application/msgpack"})
    assert resp.status_code == 200, resp.text
    return [r["probs"] for r in msgpack.unpackb(resp.content)["results"]]


async def stream(ws_base: str, model: str, rec: dict[str, np.ndarray],
                 rng: np.random.Generator) -> list[float]:
    async with connect(f"{ws_base}/v1/stream", max_size=None) as ws:
        await ws.send(msgpack.packb({"type": "open", "model": model}))
        opened = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60))
        assert opened["type"] == "opened", opened
        n, at, seq = len(rec["t"]), 0, 0
        while at < n:  # random packet sizes, 1 to 600 events (several steps for the longest)
            size = int(rng.integers(1, 600))
            await ws.send(msgpack.packb({"type": "events", "seq": seq, **columns(rec, at, at + size)}))
            at, seq = min(n, at + size), seq + 1
        last = None
        for _ in range(seq):
            last = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 120))
            assert last["type"] == "result", last
        assert last["events"] == n
        await ws.send(msgpack.packb({"type": "close"}))  # free the session (per-client caps)
        closed = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60))
        assert closed["type"] == "closed", closed
        return last["probs"]


@pytest.mark.slow
def test_two_models_with_long_classifies_give_exact_answers(tmp_path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    env = dict(os.environ, EVSSM_NATIVE_THREADS="2", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "evssm.cli", "serve", "--port", str(port),
           "--model", "default=default", "--model", "other=config:event-mnist",
           "--backend", "native", "--batch-buckets", "1,8", "--length-buckets", "64,256",
           "--classify-length-buckets", "1024", "--max-sessions", "16"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_process_ready(proc, base, log_path, timeout=300)
        models = httpx.get(f"{base}/v1/models").json()["models"]
        assert {m["name"]: m["backend"] for m in models} == {"default": "native", "other": "native"}
        rng = np.random.default_rng(7)
        streamed = {m: [recording(rng, int(n)) for n in rng.integers(1500, 4000, 6)] for m in MODELS}
        long = {m: [recording(rng, int(n)) for n in rng.integers(5000, 12000, 2)] for m in MODELS}

        # Under load: one streaming client per model and a thread of long classifies.
        got_stream: dict[str, list] = {}
        got_classify: list[tuple[str, list]] = []
        stop = threading.Event()
        errors: list[BaseException] = []

        def classifier() -> None:
            try:
                while not stop.is_set():
                    for m in MODELS:
                        got_classify.append((m, classify(base, m, long[m])))
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                errors.append(exc)

        async def streamers() -> None:
            async def one(m: str, seed: int) -> None:
                local = np.random.default_rng(seed)
                got_stream[m] = [await stream(f"ws://127.0.0.1:{port}", m, r, local)
                                 for r in streamed[m]]
            await asyncio.gather(one(MODELS[0], 1), one(MODELS[1], 2))

        thread = threading.Thread(target=classifier)
        thread.start()
        try:
            asyncio.run(streamers())
        finally:
            stop.set()
            thread.join(600)
        assert not errors, errors
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert len(got_classify) >= 2

        # Alone: the same recordings, one request at a time.
        for m in MODELS:
            alone = classify(base, m, streamed[m])
            for got, want in zip(got_stream[m], alone, strict=True):
                assert_close(got, want, rtol=1e-3, atol=2e-6)
            alone_long = classify(base, m, long[m])
            for name, probs in got_classify:
                if name == m:
                    np.testing.assert_array_equal(probs, alone_long)
        # The two models really differ (a mix-up between them would show).
        assert not np.allclose(assert_finite(classify(base, MODELS[0], long[MODELS[0]])),
                               assert_finite(classify(base, MODELS[1], long[MODELS[0]])), atol=1e-3)
        assert httpx.get(f"{base}/healthz").status_code == 200
    finally:
        stop_process(proc, 60)
