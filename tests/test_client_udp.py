"""The live UDP source: datagram layouts, the receiver thread, packetising, accounting (real UDP
sockets on 127.0.0.1; a sender thread in the test)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np
import pytest

from evssm.client.errors import SourceError
from evssm.client.udp import UDP_FORMATS, UdpReceiver, UdpStats, decode_datagram, live_packets, parse_udp_url


def datagram(t: np.ndarray, x: np.ndarray, y: np.ndarray, p: np.ndarray, fmt: str) -> bytes:
    arr = np.zeros(len(t), UDP_FORMATS[fmt])
    arr["t"], arr["x"] = t, x
    if fmt == "t64_x16_y16_on8":
        arr["y"], arr["on"] = y, p
    else:
        arr["y_on"] = (y << 1) | p
    return arr.tobytes()


def events(n: int, t0: int = 1000, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    t = t0 + np.cumsum(rng.integers(0, 50, n)).astype(np.int64)
    return t, rng.integers(0, 640, n), rng.integers(0, 480, n), rng.integers(0, 2, n)


@pytest.mark.parametrize("fmt", list(UDP_FORMATS))
def test_decode_datagram_layouts(fmt: str) -> None:
    t, x, y, p = events(50)
    rec, trailing = decode_datagram(datagram(t, x, y, p, fmt) + b"\x01\x02", fmt)
    assert trailing == 2
    np.testing.assert_array_equal(rec.t, t)
    np.testing.assert_array_equal(rec.x, x)
    np.testing.assert_array_equal(rec.y, y)
    np.testing.assert_array_equal(rec.p, p)


def test_parse_udp_url() -> None:
    assert parse_udp_url("udp://0.0.0.0:7777") == ("0.0.0.0", 7777)
    assert parse_udp_url("udp://[::1]:9") == ("::1", 9)
    for bad in ("udp://host", "udp://:80", "udp://h:99999", "udp://h:x"):
        with pytest.raises(SourceError, match="udp://HOST:PORT"):
            parse_udp_url(bad)


def collect(datagrams: list[bytes], fmt: str, delay: float = 0.0, **options) -> tuple[list, UdpStats, float]:
    """Send ``datagrams`` from a thread, ``delay`` seconds after the receiver started, to a live
    receiver; the packets it yields, its stats and the seconds until its first packet."""
    async def run() -> tuple[list, UdpStats, float]:
        receiver = UdpReceiver("127.0.0.1", 0)
        receiver.start(asyncio.get_running_loop())
        stats = UdpStats()
        start = time.monotonic()

        def send() -> None:
            time.sleep(delay)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for d in datagrams:
                    s.sendto(d, receiver.address)

        sender = threading.Thread(target=send)
        sender.start()
        packets, first = [], None
        try:
            async for packet in live_packets(receiver, fmt, stats, **options):
                first = first if first is not None else time.monotonic() - start
                packets.append(packet)
        finally:
            sender.join(10)
            receiver.close()
        return packets, stats, first or 0.0

    return asyncio.run(run())


@pytest.mark.parametrize("fmt", list(UDP_FORMATS))
def test_every_event_arrives_in_order_in_full_packets(fmt: str) -> None:
    t, x, y, p = events(1234)
    grams = [datagram(t[i:i + 100], x[i:i + 100], y[i:i + 100], p[i:i + 100], fmt)
             for i in range(0, 1234, 100)]
    packets, stats, _ = collect(grams, fmt, events=256, idle_timeout=0.5)
    got = np.concatenate([pk.events.t for pk in packets])
    np.testing.assert_array_equal(got, t)
    np.testing.assert_array_equal(np.concatenate([pk.events.y for pk in packets]), y)
    assert stats.datagrams == len(grams) and stats.events_received == 1234
    assert stats.events_out_of_order == 0 and stats.kernel_dropped_datagrams in (0, None)
    assert [pk.index for pk in packets] == list(range(len(packets)))
    assert all(len(pk) <= 256 for pk in packets) and sum(len(pk) for pk in packets) == 1234


def test_out_of_order_datagram_is_dropped_and_counted_and_32_bit_clock_unwrapped() -> None:
    fmt = "t32_x16_y15_on1"
    late = (1 << 32) - 500
    a = datagram(np.array([late, late + 10]), np.array([1, 2]), np.array([3, 4]),
                 np.array([0, 1]), fmt)
    back = datagram(np.array([late - 100]), np.array([5]), np.array([5]), np.array([1]), fmt)
    wrapped = datagram(np.array([20, 30]), np.array([6, 7]), np.array([8, 9]), np.array([1, 0]),
                       fmt)
    packets, stats, _ = collect([a, back, wrapped], fmt, events=10, idle_timeout=0.5)
    t = np.concatenate([pk.events.t for pk in packets])
    np.testing.assert_array_equal(t, [late, late + 10, (1 << 32) + 20, (1 << 32) + 30])
    assert stats.events_out_of_order == 1 and stats.events_received == 5


def test_time_windows_and_flush_of_a_quiet_stream() -> None:
    fmt = "t64_x16_y16_on8"
    t = np.array([0, 400, 999, 1000, 1500, 2600], np.int64) + 10_000
    zeros = np.zeros(len(t), np.int64)
    packets, _, _ = collect([datagram(t, zeros, zeros, zeros, fmt)], fmt, window_us=1000,
                            idle_timeout=0.5)
    assert [pk.events.t.tolist() for pk in packets] == [t[:3].tolist(), t[3:5].tolist(),
                                                        t[5:].tolist()]
    # 10 events, packets of 1000: flushed after flush_s, long before the idle timeout.
    packets, _, first = collect([datagram(t[:5], zeros[:5], zeros[:5], zeros[:5], fmt)], fmt,
                                events=1000, flush_s=0.05, idle_timeout=1.5)
    assert sum(len(pk) for pk in packets) == 5 and first < 1.0


def test_the_idle_timeout_counts_from_the_first_datagram() -> None:
    """Old receiver: the idle timeout ran from start, so one started 1 s before its camera (idle
    timeout 0.5 s here) ended with 0 events. Now it waits for the first datagram."""
    t, x, y, p = events(100)
    fmt = "t64_x16_y16_on8"
    t0 = time.monotonic()
    packets, stats, first = collect([datagram(t, x, y, p, fmt)], fmt, delay=1.0, events=50,
                                    idle_timeout=0.5)
    assert stats.events_received == 100 and sum(len(pk.events) for pk in packets) == 100
    assert first >= 1.0 and time.monotonic() - t0 >= 1.5  # then idle for the timeout after it


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        with pytest.raises(SourceError, match="cannot listen on udp://127.0.0.1"):
            UdpReceiver("127.0.0.1", s.getsockname()[1])
