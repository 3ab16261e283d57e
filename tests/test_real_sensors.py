"""Real sensors end to end: five real recordings read, adapted onto two models' sensors by the
server, streamed == classified; the geometry declaration's contract; a live UDP stream sent by
faery's own command line.

The recordings are read in place from the shared folder (``data/real``; skipped where absent).
One module-scoped server serves the ``dvs`` config (128 x 128, the DVS Gesture sensor) and the
shipped default model (34 x 34). Every recording is streamed and classified whole (the Gen3 file
alone holds 539,481 events, a 10.8 M events/s burst): the answers must be finite and equal.
Geometry checks that only exercise the adapter use a prefix (``PREFIX`` events).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from conftest import scrape, serve_app, shared_path, wait_ready
from numeric import assert_close
from websockets.asyncio.client import connect

from evssm.client import StreamSession, classify, packetize
from evssm.client.sources import Sample, open_source
from evssm.models.events import Recording, SensorSpec
from evssm.server.app import create_app
from evssm.server.settings import Settings

# file, events, first t, last t (us), sensor, where the geometry comes from (README numbers;
# timestamps as faery 0.7.1 and the N-MNIST layout give them)
REAL = [
    ("nmnist-sample.bin", 4325, 654, 311175, (34, 34), "guess"),
    ("dvxplorer-sample.aedat4", 111954, 1605537493718345, 1605537494308262, (320, 240), "file"),
    ("prophesee-gen3-evt2.raw", 539481, 1317888, 1367888, (640, 480), "guess"),
    ("prophesee-gen41-evt3.raw", 219596, 11718656, 11727467, (1280, 720), "guess"),
    ("ncars-sample.dat", 2009, 0, 99952, (304, 240), "guess"),
]
PREFIX = 6000
SETTINGS = Settings(batch_buckets=(1,), length_buckets=(256,), classify_length_buckets=(2048,),
                    slots_per_model=8, max_sessions=8, max_packet_events=4096, batch_wait_ms=1.0)
WHOLE_PACKET = 4093  # events per packet streaming a whole recording (windows end mid-packet)


def real(name: str) -> Path:
    return shared_path("data", "real", name)


def load(name: str) -> Sample:
    pytest.importorskip("faery")
    return open_source(str(real(name)))


# --- readers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,events,first,last,sensor,geometry", REAL, ids=[r[0] for r in REAL])
def test_reader_counts_timestamps_and_geometry(name, events, first, last, sensor, geometry) -> None:
    sample = load(name)
    rec = sample.recording
    assert len(rec) == events
    assert (int(rec.t[0]), int(rec.t[-1])) == (first, last)
    assert (np.diff(rec.t) >= 0).all() and rec.t.dtype == np.int64
    assert sample.sensor == SensorSpec.two_d(*sensor) and sample.geometry == geometry
    assert int(rec.x.max()) < sensor[0] and int(rec.y.max()) < sensor[1]
    assert set(np.unique(rec.p).tolist()) == {0, 1}


@pytest.mark.parametrize("name", ["dvxplorer-sample.aedat4", "prophesee-gen3-evt2.raw",
                                  "prophesee-gen41-evt3.raw"])
def test_reader_equals_faerys_own_decoding(name: str) -> None:
    faery = pytest.importorskip("faery")
    rec = load(name).recording
    ev = np.concatenate(list(faery.events_stream_from_file(real(name))))
    np.testing.assert_array_equal(rec.t, ev["t"].astype(np.int64))
    np.testing.assert_array_equal(rec.x, ev["x"])
    np.testing.assert_array_equal(rec.y, ev["y"])
    np.testing.assert_array_equal(rec.p, ev["on"].astype(np.uint8))


# --- a server with a DVS-sized and a 34 x 34 model -------------------------------------------------
@pytest.fixture(scope="module")
def server():
    shared_path("data", "real")  # skip before building a server when the recordings are absent
    from evssm.models.config import load_model_config
    from evssm.models.streaming import StreamingModel, load_model

    models = {"dvs": StreamingModel.from_config(load_model_config("dvs")), "mnist": load_model()}
    app = create_app(SETTINGS, models=models)
    with serve_app(app) as running:
        wait_ready(running.http, 900)  # the dvs config compiles for minutes on a busy CPU
        running.app = app
        yield running


def probs_close(a: list[float] | None, b: list[float] | None) -> None:
    assert a is not None and b is not None
    assert_close(np.asarray(a), np.asarray(b), rtol=1e-3, atol=2e-6)


def stream(url: str, rec: Recording, model: str, sensor: SensorSpec | None,
           transform: dict | None = None, packet: int = 777) -> list:
    with StreamSession(url, model=model, sensor=sensor, transform=transform) as s:
        for p in packetize(rec, events=packet):
            s.send(p)
        return s.drain()


@pytest.mark.parametrize("model", ["dvs", "mnist"])
@pytest.mark.parametrize("name", [r[0] for r in REAL])
def test_real_recording_streams_through_the_adapter_like_classify(server, name: str,
                                                                  model: str) -> None:
    """Each whole recording, its own geometry declared and mapped onto the model's sensor:
    streaming in packets equals /v1/classify of the same events, after the last packet and after
    one in the middle, both finite."""
    sample = load(name)
    rec = sample.recording
    results = stream(server.ws, rec, model, sample.sensor, packet=WHOLE_PACKET)
    assert results[-1].events == len(rec) and results[-1].cropped == 0
    mid = len(results) // 2
    cut = results[mid].events
    whole, half = classify(server.http, [rec, rec.slice(0, cut)], model=model,
                           sensors=[sample.sensor, sample.sensor])
    probs_close(results[-1].probs, whole.probs)
    probs_close(results[mid].probs, half.probs)
    assert whole.events == len(rec)


def test_concurrent_sessions_with_different_geometries_get_their_own_answers(server) -> None:
    """Four cameras at once on one model, each session with its own declaration."""
    from evssm.client import AsyncStreamSession

    samples = [load(r[0]) for r in REAL[:4]]
    recs = [s.recording.slice(0, 3000) for s in samples]

    async def one(rec: Recording, sensor: SensorSpec) -> list:
        async with AsyncStreamSession(server.ws, model="dvs", sensor=sensor) as session:
            return [r async for r in session.stream(packetize(rec, events=300))]

    async def run() -> list:
        return await asyncio.gather(*(one(r, s.sensor) for r, s in zip(recs, samples, strict=True)))

    streamed = asyncio.run(run())
    want = classify(server.http, recs, model="dvs", sensors=[s.sensor for s in samples])
    for results, expected, rec in zip(streamed, want, recs, strict=True):
        assert results[-1].events == len(rec)
        probs_close(results[-1].probs, expected.probs)
    assert len({tuple(np.round(w.probs, 6)) for w in want}) == 4  # four different answers


def test_crop_and_flip_on_gen4_stream_like_classify_and_count_cropped(server) -> None:
    sample = load("prophesee-gen41-evt3.raw")
    rec = sample.recording.slice(0, PREFIX)
    transform = {"crop": [320, 0, 640, 720], "scale": "stretch", "flip_y": True}
    inside = ((rec.x >= 320) & (rec.x < 960)).sum()
    assert 0 < inside < len(rec)
    before = scrape(server.http, "evssm_cropped_events_total")
    results = stream(server.ws, rec, "dvs", sample.sensor, transform, packet=500)
    last = results[-1]
    assert last.events == inside and last.cropped == len(rec) - inside
    assert all(r.events + r.cropped == min((i + 1) * 500, len(rec)) for i, r in enumerate(results))
    (got,) = classify(server.http, [rec], model="dvs", sensors=[sample.sensor], transform=transform)
    assert got.events == inside and got.cropped == len(rec) - inside
    probs_close(last.probs, got.probs)
    assert scrape(server.http, "evssm_cropped_events_total") - before == 2 * (len(rec) - inside)


# --- the declaration's contract over the raw protocol ----------------------------------------------
async def _request(ws: Any, msg: dict) -> dict:
    await ws.send(msgpack.packb(msg))
    return msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60))


def test_declarations_over_the_wire(server) -> None:
    gen4 = {"width": 1280, "height": 720}
    t = np.arange(40, dtype=np.int64) * 10
    x = np.linspace(0, 1279, 40).astype(np.int64)
    y = np.linspace(0, 719, 40).astype(np.int64)
    p = np.arange(40) % 2

    def cols(a: int, b: int, **change: Any) -> dict:
        out = {"t": t[a:b].tolist(), "x": x[a:b].tolist(), "y": y[a:b].tolist(), "p": p[a:b].tolist()}
        return {**out, **change}

    async def run() -> None:
        async with connect(f"{server.ws}/v1/stream") as ws:
            # Undeclared misfit: today's clear error; the session is untouched.
            opened = await _request(ws, {"type": "open", "model": "dvs"})
            assert "geometry" not in opened
            err = await _request(ws, {"type": "events", "seq": 0, **cols(0, 20)})
            assert err["code"] == "address_out_of_range" and "0..127" in err["message"]
            await _request(ws, {"type": "close"})
            # Bad declarations are refused at open, naming what is wrong.
            for bad, words in (({"sensor": {"width": 0, "height": 5}}, "1..65535"),
                               ({"sensor": {"channels": 700}}, "1D source"),
                               ({"sensor": gen4, "transform": {"crop": [0, 0, 2000, 10]}}, "leaves"),
                               ({"sensor": gen4, "transform": {"scale": "zoom"}}, "scale")):
                err = await _request(ws, {"type": "open", "model": "dvs", **bad})
                assert err["code"] == "invalid_field" and words in err["message"], err
            opened = await _request(ws, {"type": "open", "model": "dvs", "sensor": gen4})
            assert opened["geometry"]["scale_x"] == 0.1 and opened["cropped"] == 0
            first = await _request(ws, {"type": "events", "seq": 1, **cols(0, 20)})
            assert first["events"] == 20 and first["cropped"] == 0
            # Beyond the declared sensor: rejected whole, state as before.
            err = await _request(ws, {"type": "events", "seq": 2, **cols(20, 40, x=[1280] * 20)})
            assert err["code"] == "address_out_of_range" and "1280x720" in err["message"]
            again = await _request(ws, {"type": "events", "seq": 3, **cols(20, 40)})
            assert again["events"] == 40
            token = opened["resume"]
            # A resume must not change the declaration.
        async with connect(f"{server.ws}/v1/stream") as ws:
            err = await _request(ws, {"type": "open", "resume": token, "sensor": {"width": 640,
                                                                             "height": 480}})
            assert err["code"] == "invalid_field"
            back = await _request(ws, {"type": "open", "resume": token, "sensor": gen4})
            assert back["resumed"] and back["events"] == 40 and back["geometry"]["scale_x"] == 0.1

    asyncio.run(run())
    # classify: a top-level declaration, overridden per stream
    body = {"model": "dvs", "sensor": gen4, "transform": {"crop": [0, 0, 640, 720]},
            "streams": [cols(0, 40), cols(0, 40, sensor={"width": 1280, "height": 720},
                                          transform=None),
                        cols(0, 40, x=[5] * 40, y=[5] * 40, sensor={"width": 34, "height": 34},
                             transform=None)]}
    r = httpx.post(f"{server.http}/v1/classify", json=body, timeout=60)
    assert r.status_code == 200, r.text
    a, b, c = r.json()["results"]
    assert a["cropped"] == 20 and a["events"] == 20
    assert b["cropped"] == 0 and b["events"] == 40 and c["events"] == 40
    bad = httpx.post(f"{server.http}/v1/classify", timeout=60,
                     json={"model": "dvs", "sensor": {"channels": 3}, "streams": [cols(0, 3)]})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_field"
    assert "streams[0]" in bad.json()["message"]


# --- the command line ------------------------------------------------------------------------------
def evssm(*args: str, timeout: float = 300) -> dict:
    out = subprocess.run([sys.executable, "-m", "evssm.cli", *args], capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("name", ["nmnist-sample.bin", "ncars-sample.dat"])
def test_cli_classify_and_stream_real_files(server, name: str) -> None:
    """The small recordings whole, through both commands, against the 34 x 34 model."""
    sample = load(name)
    report = evssm("classify", str(real(name)), "--url", server.http, "--model", "mnist", "--json")
    (row,) = report["results"]
    assert row["events"] == row["events_processed"] == len(sample.recording)
    assert row["sensor_from"] == "guess" and row["probability"] is not None
    streamed = evssm("stream", str(real(name)), "--url", server.ws, "--model", "mnist", "--fast",
                     "--json")
    assert streamed["events"] == streamed["events_processed"] == len(sample.recording)
    probs_close(streamed["probs"], row["probs"])


@pytest.mark.slow
def test_cli_classify_every_real_format_in_one_call(server) -> None:
    """All five recordings, whole, declared with their geometry: one row each, every event read
    and sent, none cropped."""
    names = [r[0] for r in REAL]
    out = evssm("classify", *(str(real(n)) for n in names), "--url", server.http, "--model",
                "mnist", "--json", "--batch", "1")
    rows = out["results"]
    assert [r["source"] for r in rows] == names
    assert [r["events"] for r in rows] == [r[1] for r in REAL]
    assert all(r["events_processed"] == r["events"] and r["cropped"] == 0 for r in rows)
    assert [tuple(r["sensor"][k] for k in ("width", "height")) for r in rows] == \
        [r[4] for r in REAL]
    assert all(r["probability"] is not None for r in rows)


def test_cli_sensor_option_and_crop(server) -> None:
    name = "prophesee-gen3-evt2.raw"
    out = evssm("classify", str(real(name)), "--url", server.http, "--model", "dvs", "--json",
                "--sensor", "640x480", "--crop", "0,0,320,480")
    (row,) = out["results"]
    assert row["sensor_from"] == "option" and row["events"] == 539481
    assert row["cropped"] == int((load(name).recording.x >= 320).sum()) > 0
    assert row["events_processed"] == row["events"] - row["cropped"]


# --- live UDP: faery's command line sends, evssm stream receives -----------------------------------
def wait_bound(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Until ``proc`` has bound UDP ``port`` (our own bind fails then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return
        time.sleep(0.05)
    raise TimeoutError("the receiver did not bind")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("layout", ["t64_x16_y16_on8", "t32_x16_y15_on1"])
def test_udp_stream_sent_by_faery_is_classified_with_every_event_accounted_for(server, layout):
    pytest.importorskip("faery")
    faery_cli = shutil.which("faery") or str(Path(sys.executable).parent / "faery")
    name, count = "dvxplorer-sample.aedat4", 20000
    port = free_udp_port()
    receiver = subprocess.Popen(
        [sys.executable, "-m", "evssm.cli", "stream", f"udp://127.0.0.1:{port}", "--sensor",
         "320x240", "--format", layout, "--url", server.ws, "--model", "dvs", "--json",
         "--idle-timeout", "3", "--packet-events", "512"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_bound(port, receiver)
        sender = subprocess.run(
            [faery_cli, "input", "file", str(real(name)), "filter", "event-slice", "0", str(count),
             "output", "udp", f"127.0.0.1:{port}", "--format", layout, "--no-progress"],
            capture_output=True, text=True, timeout=120)
        assert sender.returncode == 0, sender.stderr[-3000:]
        out, err = receiver.communicate(timeout=120)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.communicate()
    assert receiver.returncode == 0, err[-3000:]
    report = json.loads(out)
    udp = report["udp"]
    assert udp["events_received"] == count == report["events_forwarded"] == report["events"]
    assert report["events_processed"] == count
    assert udp["events_out_of_order"] == 0 and udp["trailing_bytes"] == 0
    assert udp["kernel_dropped_datagrams"] in (0, None)
    assert udp["datagrams"] >= count // 100  # faery sends at most 100 events per datagram
    rec = load(name).recording.slice(0, count)
    (want,) = classify(server.http, [rec], model="dvs", sensors=[SensorSpec.two_d(320, 240)])
    probs_close(report["probs"], want.probs)
