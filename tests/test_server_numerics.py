"""Never a NaN answer, never a 500 for extreme input: the server over real sockets.

A model whose output is not finite is made the honest way: the tiny model with a NaN in its
head's bias (every answer it computes is NaN, whatever the events). The server must withhold
those answers: an error frame ``non_finite_output`` per packet, HTTP 422 for classify, the metric
``evssm_non_finite_outputs_total{model}``, a log line naming model and session, strict JSON
everywhere, and the command line prints the error and fails. A declared sensor too large
for int32 tokens is ``invalid_field`` on ``open`` and classify.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from conftest import metric_sum
from test_server_stream import BASE, wait_ready
from websockets.asyncio.client import connect

from evssm.models.streaming import StreamingModel
from evssm.server.app import create_app


def strict_json(text: str) -> Any:
    """``json.loads`` that refuses NaN and Infinity (what a browser's JSON.parse accepts)."""
    def refuse(name: str) -> Any:
        raise AssertionError(f"the server wrote {name}, which is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def broken_models() -> dict[str, StreamingModel]:
    from evssm.models.streaming import load_model

    tiny = load_model("config:tiny")
    params = dict(tiny.variables["params"])
    head = dict(params["head"])
    head["bias"] = np.asarray(head["bias"]).copy()
    head["bias"][1] = np.nan
    params["head"] = head
    variables = {"params": params, "batch_stats": tiny.variables["batch_stats"]}
    return {backend: StreamingModel(tiny.config, variables, backend=backend)
            for backend in ("native", "xla")}


@pytest.fixture
def server(serve, broken_models, request):
    backend = getattr(request, "param", "native")
    app = create_app(BASE, models={"tiny": broken_models[backend]})
    running = serve(app)
    wait_ready(running.http)
    return running


def events(n: int, start: int = 1_000_000) -> dict[str, list[int]]:
    rng = np.random.default_rng(n)
    return {"t": (start + np.arange(n)).tolist(), "x": rng.integers(0, 700, n).tolist()}


@pytest.mark.parametrize("server", ["native", "xla"], indirect=True)
def test_a_non_finite_answer_is_an_error_frame_counted_and_logged(server, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="evssm.server.app")

    async def run() -> list[Any]:
        async with connect(f"{server.ws}/v1/stream") as ws:
            await ws.send(json.dumps({"type": "open"}))
            opened = strict_json(await ws.recv())
            frames = [opened]
            # Too short for a window (no answer either way), then enough for one, as JSON and
            # as msgpack, then a reset: the session stays usable.
            for seq, n, text in ((0, 5, True), (1, 100, True), (2, 100, False)):
                frame = {"type": "events", "seq": seq, **events(n, 1_000_000 + 1000 * seq)}
                await ws.send(json.dumps(frame) if text else msgpack.packb(frame))
                reply = await asyncio.wait_for(ws.recv(), 30)
                frames.append(strict_json(reply) if text else msgpack.unpackb(reply))
            await ws.send(json.dumps({"type": "reset"}))
            frames.append(strict_json(await asyncio.wait_for(ws.recv(), 30)))
            return frames

    opened, short, text_reply, binary_reply, reset = asyncio.run(run())
    assert short["type"] == "result" and short["probs"] is None, short
    for seq, reply in ((1, text_reply), (2, binary_reply)):
        assert reply["type"] == "error" and reply["code"] == "non_finite_output", reply
        assert reply["seq"] == seq and "not finite" in reply["message"], reply
        assert "probs" not in reply
    assert reset["type"] == "reset_done"
    metrics = httpx.get(f"{server.http}/metrics").text
    assert metric_sum(metrics, "evssm_non_finite_outputs_total") == 2
    logged = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(logged) == 2 and all("tiny" in m and opened["session"] in m for m in logged), logged


@pytest.mark.parametrize("server", ["native"], indirect=True)
def test_classify_of_a_non_finite_answer_is_422_in_strict_json(server, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="evssm.server.app")
    body = {"streams": [events(3), events(300)]}
    r = httpx.post(f"{server.http}/v1/classify", json=body, timeout=60)
    assert r.status_code == 422, r.text
    answer = strict_json(r.text)
    assert answer["error"] == "non_finite_output" and "stream 1" in answer["message"], answer
    r = httpx.post(f"{server.http}/v1/classify", content=msgpack.packb(body), timeout=60,
                   headers={"content-type": "application/msgpack"})
    assert r.status_code == 422 and strict_json(r.text)["error"] == "non_finite_output"
    # A recording too short for an answer has nothing to withhold.
    r = httpx.post(f"{server.http}/v1/classify", json={"streams": [events(3)]}, timeout=60)
    assert r.status_code == 200 and strict_json(r.text)["results"][0]["probs"] is None
    metrics = httpx.get(f"{server.http}/metrics").text
    assert metric_sum(metrics, "evssm_non_finite_outputs_total") == 2
    assert any("tiny" in r.getMessage() and "classify" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("server", ["native"], indirect=True)
def test_the_command_line_prints_an_error_not_nan(server, tmp_path, capsys) -> None:
    from evssm.cli import main
    from evssm.client import save_events
    from evssm.models.events import Recording

    cols = events(300)
    path = str(save_events(tmp_path / "rec.npz", Recording(np.asarray(cols["t"], np.int64),
                                                            np.asarray(cols["x"], np.int64))))
    for command in (["classify", path, "--url", server.http, "--json"],
                    ["stream", path, "--url", server.ws, "--fast", "--json"]):
        assert main(command) != 0, command
        out = capsys.readouterr()
        assert "non_finite_output" in out.err, (command, out)
        assert "nan" not in out.out.lower(), (command, out)


def test_an_oversized_declared_sensor_is_invalid_field(serve) -> None:
    from evssm.models.streaming import load_model

    app = create_app(BASE, models={"tiny": load_model("config:tiny")})
    running = serve(app)
    wait_ready(running.http)
    huge = {"width": 65535, "height": 65535}

    async def open_with_it() -> dict:
        async with connect(f"{running.ws}/v1/stream") as ws:
            await ws.send(json.dumps({"type": "open", "sensor": huge}))
            return strict_json(await asyncio.wait_for(ws.recv(), 30))

    reply = asyncio.run(open_with_it())
    assert reply["type"] == "error" and reply["code"] == "invalid_field", reply
    assert "int32" in reply["message"], reply
    r = httpx.post(f"{running.http}/v1/classify", timeout=60, json={
        "sensor": huge, "streams": [{"t": [0, 1], "x": [65534, 3], "y": [65534, 4], "p": [1, 0]}]})
    assert r.status_code == 400, r.text
    assert strict_json(r.text)["error"] == "invalid_field"
