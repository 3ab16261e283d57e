"""Packetising by event count and by time window; real-time pacing; wire encoding."""

from __future__ import annotations

import asyncio
import time

import msgpack
import numpy as np
import pytest

from evssm.client.packets import Pacer, apaced, paced, packetize
from evssm.client.protocol import (
    ModelInfo,
    Result,
    SessionInfo,
    decode_frame,
    encode_events,
    endpoint_url,
)
from evssm.models.events import Recording, SensorSpec


def recording(n: int = 1000, seed: int = 0, two_d: bool = False) -> Recording:
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.integers(0, 2000, n)).astype(np.int64) + 5_000
    x = rng.integers(0, 128, n).astype(np.uint16)
    if not two_d:
        return Recording(t, x)
    return Recording(t, x, rng.integers(0, 128, n).astype(np.uint16),
                     rng.integers(0, 2, n).astype(np.uint8))


def rejoin(packets: list) -> np.ndarray:
    return np.concatenate([p.events.t for p in packets]) if packets else np.zeros(0)


def test_by_count() -> None:
    rec = recording(1000)
    packets = list(packetize(rec, events=256))
    assert [len(p) for p in packets] == [256, 256, 256, 232]
    assert [p.index for p in packets] == [0, 1, 2, 3]
    np.testing.assert_array_equal(rejoin(packets), rec.t)
    assert all(p.due_us == int(p.events.t[-1]) for p in packets)


def test_by_time_window_skips_empty_windows_and_caps_bursts() -> None:
    t = np.array([0, 100, 999, 1000, 5500, 5600, 5700, 5800, 5900], np.int64)
    rec = Recording(t, np.arange(9, dtype=np.uint16))
    packets = list(packetize(rec, window_us=1000))
    assert [p.events.t.tolist() for p in packets] == [[0, 100, 999], [1000],
                                                      [5500, 5600, 5700, 5800, 5900]]
    assert [p.due_us for p in packets] == [1000, 2000, 6000]
    capped = list(packetize(rec, window_us=1000, max_events=2))
    assert [len(p) for p in capped] == [2, 1, 1, 2, 2, 1]
    assert [p.due_us for p in capped] == [100, 1000, 2000, 5600, 5800, 6000]
    assert [p.index for p in capped] == list(range(6))


@pytest.mark.parametrize("window", [1, 777, 10_000, 10**9])
def test_windows_cover_the_recording_in_order(window: int) -> None:
    rec = recording(500, two_d=True)
    packets = list(packetize(rec, window_us=window))
    np.testing.assert_array_equal(rejoin(packets), rec.t)
    for p in packets:
        assert p.events.y is not None and p.events.t[-1] < p.due_us
        assert ((p.events.t - rec.t[0]) // window == (p.due_us - 1 - rec.t[0]) // window).all()


def test_packetize_arguments() -> None:
    rec = recording(10)
    with pytest.raises(ValueError):
        list(packetize(rec))
    with pytest.raises(ValueError):
        list(packetize(rec, events=3, window_us=5))
    with pytest.raises(ValueError):
        list(packetize(rec, events=0))
    assert list(packetize(rec.slice(0, 0), events=3)) == []


def test_paced_replays_in_scaled_real_time() -> None:
    t = np.arange(0, 200_001, 10_000, dtype=np.int64)  # 0.2 s of recording
    rec = Recording(t, np.zeros(t.shape, np.uint16))
    start = time.monotonic()
    out = list(paced(packetize(rec, window_us=50_000), speed=2.0))
    elapsed = time.monotonic() - start
    assert len(out) == 5
    assert 0.11 < elapsed < 0.5  # last window ends at 0.25 s of recording -> 0.125 s at 2x
    start = time.monotonic()
    list(paced(packetize(rec, window_us=50_000), speed=None))
    assert time.monotonic() - start < 0.05


def test_apaced() -> None:
    t = np.arange(0, 100_001, 10_000, dtype=np.int64)
    rec = Recording(t, np.zeros(t.shape, np.uint16))

    async def main() -> float:
        start = time.monotonic()
        async for _ in apaced(packetize(rec, events=5), speed=1.0):
            pass
        return time.monotonic() - start

    assert 0.08 < asyncio.run(main()) < 0.5


def test_pacer_rejects_bad_speed() -> None:
    with pytest.raises(ValueError):
        Pacer(0)
    assert Pacer(None).delay(10**9) == 0.0


@pytest.mark.parametrize("binary", [True, False])
def test_encode_events(binary: bool) -> None:
    rec = recording(50, two_d=True)
    msg = msgpack.unpackb(encode_events(7, rec, binary=binary))
    assert msg["type"] == "events" and msg["seq"] == 7
    if binary:
        assert np.frombuffer(msg["t"], "<i8").tolist() == rec.t.tolist()
        assert np.frombuffer(msg["x"], "<u2").tolist() == rec.x.tolist()
        assert np.frombuffer(msg["p"], "u1").tolist() == rec.p.tolist()
    else:
        assert msg["y"] == rec.y.tolist()
    one_d = msgpack.unpackb(encode_events(0, recording(5)))
    assert set(one_d) == {"type", "seq", "t", "x"}  # y/p omitted for 1-D sensors


def test_encode_refuses_values_outside_wire_types() -> None:
    rec = Recording(np.arange(3, dtype=np.int64), np.array([1, -2, 3]))
    with pytest.raises(ValueError, match="wire range"):
        encode_events(0, rec)
    with pytest.raises(ValueError, match="has 2 events"):
        encode_events(0, Recording(np.arange(3, dtype=np.int64), np.arange(2)))


def test_decode_and_messages() -> None:
    opened = decode_frame(msgpack.packb({
        "type": "opened", "session": "abc", "resume": "tok", "events": 12,
        "model": {"name": "m", "labels": ["a", "b"], "sensor": {"kind": "2d", "width": 4,
                                                               "height": 3, "channels": 0}}}))
    info = SessionInfo.from_message(opened)
    assert info.session == "abc" and info.resume == "tok" and info.events == 12
    assert info.model.classes == ("a", "b") and info.model.sensor == SensorSpec.two_d(4, 3)
    assert ModelInfo.from_dict({"classes": 3}).classes == ("0", "1", "2")
    res = Result.from_message(decode_frame('{"type": "result", "seq": 3, "events": 9, "t": 5, '
                                           '"probs": [0.25, 0.75], "top": [["b", 0.75]]}'))
    assert res.label == "b" and res.probs == [0.25, 0.75] and res.to_dict()["top"] == [["b", 0.75]]


def test_endpoint_urls() -> None:
    assert endpoint_url("ws://h:1", "stream") == "ws://h:1/v1/stream"
    assert endpoint_url("h:1", "stream") == "ws://h:1/v1/stream"
    assert endpoint_url("http://h:1", "stream") == "ws://h:1/v1/stream"
    assert endpoint_url("wss://h/custom", "stream") == "wss://h/custom"
    assert endpoint_url("ws://h:1/v1/stream", "classify") == "http://h:1/v1/classify"
    assert endpoint_url("wss://h", "models") == "https://h/v1/models"
    with pytest.raises(ValueError):
        endpoint_url("ftp://h", "stream")
