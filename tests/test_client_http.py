"""classify over HTTP and the classify command, against an in-test HTTP handler (httpx mock)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest

from evssm.client import InvalidEvents, ServerUnavailable, UnknownModel, aclassify, classify
from evssm.client.errors import ConnectionLost
from evssm.client.http_api import list_models
from evssm.client.sources import save_events
from evssm.models.events import Recording

CLASSES = ["a", "b", "c"]


def toy(t: np.ndarray, x: np.ndarray) -> list[float]:
    counts = np.bincount(x % 3, minlength=3) + 1.0
    return (counts / counts.sum()).tolist()


class Handler:
    """POST /v1/classify and GET /v1/models like the server; records the requests."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"default": "toy", "models": [
                {"name": "other", "classes": ["x", "y"]},
                {"name": "toy", "classes": CLASSES,
                 "sensor": {"kind": "1d", "channels": 16, "width": 0, "height": 0}}]})
        assert request.url.path == "/v1/classify"
        assert request.headers["content-type"] == "application/msgpack"
        body = msgpack.unpackb(request.content)
        self.requests.append(body)
        if body.get("model") not in (None, "toy"):
            return httpx.Response(404, json={"error": "unknown_model", "message": "nope"})
        results = []
        for s in body["streams"]:
            t, x = np.frombuffer(s["t"], "<i8"), np.frombuffer(s["x"], "<u2")
            if len(x) and x.max() >= 16:
                return httpx.Response(400, json={"error": "address_out_of_range", "message": "x"})
            probs = toy(t, x)
            results.append({"probs": probs, "label": CLASSES[int(np.argmax(probs))],
                            "events": len(t)})
        return httpx.Response(200, content=msgpack.packb({"model": "toy", "results": results}),
                              headers={"content-type": "application/msgpack"})


def recs(k: int) -> list[Recording]:
    rng = np.random.default_rng(0)
    return [Recording(np.arange(30 + i, dtype=np.int64), rng.integers(0, 16, 30 + i)
                      .astype(np.uint16)) for i in range(k)]


def test_classify_batches_and_answers_in_order() -> None:
    handler = Handler()
    rs = recs(5)
    out = classify("ws://server:1", rs, batch_size=2, transport=httpx.MockTransport(handler))
    assert [len(r["streams"]) for r in handler.requests] == [2, 2, 1]
    assert [o.events for o in out] == [30, 31, 32, 33, 34]
    for o, r in zip(out, rs, strict=True):
        assert o.probs == toy(r.t, r.x) and o.model == "toy"


def test_aclassify() -> None:
    handler = Handler()

    async def main() -> Any:
        return await aclassify("http://server:1", recs(2), transport=httpx.MockTransport(handler))

    assert len(asyncio.run(main())) == 2


def test_http_errors_are_typed() -> None:
    transport = httpx.MockTransport(Handler())
    with pytest.raises(UnknownModel) as err:
        classify("http://server:1", recs(1), model="nope", transport=transport)
    assert err.value.code == "unknown_model" and err.value.status == 404
    bad = Recording(np.arange(2, dtype=np.int64), np.array([1, 99], np.uint16))
    with pytest.raises(InvalidEvents) as err2:
        classify("http://server:1", [bad], transport=transport)
    assert err2.value.code == "address_out_of_range"
    busy = httpx.MockTransport(lambda r: httpx.Response(
        503, json={"error": "not_ready", "message": "loading"}))
    with pytest.raises(ServerUnavailable):
        classify("http://server:1", recs(1), transport=busy)


def test_unreachable_server() -> None:
    with pytest.raises(ConnectionLost):
        classify("http://127.0.0.1:9", recs(1), timeout=5)


def test_list_models_default_first() -> None:
    models = list_models("http://server:1", transport=httpx.MockTransport(Handler()))
    assert [m.name for m in models] == ["toy", "other"]
    assert models[0].classes == tuple(CLASSES)


def test_classify_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from evssm.cli import main

    handler = Handler()
    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(
        **{**kw, "transport": httpx.MockTransport(handler)}))
    rs = recs(3)
    files = [str(save_events(tmp_path / f"r{i}.npz", r, label=i)) for i, r in enumerate(rs)]
    assert main(["classify", *files, "--url", "http://server:1", "--json", "--batch", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "toy"
    rows = report["results"]
    assert [r["events"] for r in rows] == [30, 31, 32]
    for row, r, i in zip(rows, rs, range(3), strict=True):
        assert row["probs"] == toy(r.t, r.x) and row["label_name"] == CLASSES[i]
        assert row["correct"] == (row["prediction"] == CLASSES[i])
    assert report["accuracy"] == sum(r["correct"] for r in rows) / 3
    # the table form, and a sim source drawn for the served model's sensor
    assert main(["classify", files[0], "sim:rate=1000,duration=0.1", "--url",
                 "http://server:1"]) == 0
    out = capsys.readouterr().out
    assert "r0.npz" in out and "sim(" in out and "toy" in out
    assert "2 recordings in " in out
    assert main(["classify", files[0], "--url", "http://server:1"]) == 0
    out = capsys.readouterr().out
    assert "1 recording in " in out and "1 recordings" not in out


def test_classify_command_index_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: Any) -> None:
    h5py = pytest.importorskip("h5py")
    from evssm.cli import main

    handler = Handler()
    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(
        **{**kw, "transport": httpx.MockTransport(handler)}))
    path = tmp_path / "shd.h5"
    with h5py.File(path, "w") as f:
        times = f.create_dataset("spikes/times", (4,), dtype=h5py.vlen_dtype(np.float16))
        units = f.create_dataset("spikes/units", (4,), dtype=h5py.vlen_dtype(np.uint16))
        for i in range(4):
            times[i] = np.linspace(0, 0.1, 10 + i).astype(np.float16)
            units[i] = np.arange(10 + i, dtype=np.uint16) % 16
        f.create_dataset("labels", data=np.arange(4, dtype=np.uint16) % 3)
    assert main(["classify", str(path), "--index", "0,2-3", "--url", "http://s:1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [r["source"] for r in rows] == ["shd.h5[0]", "shd.h5[2]", "shd.h5[3]"]
    assert main(["classify", str(path), "--index", "all", "--url", "http://s:1", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 4
    assert main(["classify", str(path), "--index", "9", "--url", "http://s:1"]) == 2  # a user error
    assert "out of range" in capsys.readouterr().err
