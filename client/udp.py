"""Live event streams over UDP: the datagram layouts event-camera tools send, and their packetiser.

faery (``faery input camera output udp HOST:PORT``) and AEStream send a camera's events as UDP
datagrams in one of two little-endian layouts:

- ``t64_x16_y16_on8``: 13 bytes per event, ``uint64`` t (microseconds), ``uint16`` x and y,
  ``uint8`` polarity (the server's ``records`` layout too);
- ``t32_x16_y15_on1``: 8 bytes per event, ``uint32`` t, ``uint16`` x, and one ``uint16`` holding
  ``y << 1 | on`` (y has 15 bits). The 32-bit clock wraps every ``2**32`` us (71.6 minutes): a
  datagram whose first timestamp is more than ``2**31`` us before the last one seen is taken as a
  wrap and ``2**32`` is added from there on.

:class:`UdpReceiver` reads datagrams on its own thread (a busy event loop must not make the kernel
drop them) and hands them over in batches; :func:`live_packets` turns them into packets by event
count or time window, flushing a partial packet after ``flush_s`` so a quiet sensor still gets
answers (the streaming invariant makes any cut give the same probabilities). UDP can lose and
reorder datagrams: the counters say how many events arrived, how many were dropped because their
datagram went back in time (the server needs non-decreasing time), and, on Linux, how many
datagrams the kernel dropped for a full receive buffer.

``evssm stream udp://...`` forwards them in a session opened with ``realtime: true``: its
results say how far the answers trail the camera (``lag_ms``), and with ``--overload drop`` the
server drops late packets rather than fall behind (``client/live_options.py``).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from evssm.models.events import Recording
from evssm.models.wire import RECORD_DTYPE

from .errors import SourceError
from .packets import Packet, packetize

UDP_FORMATS: dict[str, np.dtype] = {
    "t64_x16_y16_on8": RECORD_DTYPE,  # the server's ``records`` layout
    "t32_x16_y15_on1": np.dtype([("t", "<u4"), ("x", "<u2"), ("y_on", "<u2")]),
}
WRAP_US = 1 << 32
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)  # Linux: count of datagrams dropped on a full buffer
RECEIVE_BUFFER = 8 << 20  # bytes asked of the kernel (it may cap this at net.core.rmem_max)


def parse_udp_url(spec: str) -> tuple[str, int]:
    """``udp://HOST:PORT`` (``udp://[::1]:PORT`` for IPv6) -> (host, port)."""
    rest = spec[len("udp://"):] if spec.startswith("udp://") else spec
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SourceError(f"bad UDP address {spec!r}: use udp://HOST:PORT (e.g. udp://0.0.0.0:7777)")
    return host, int(port)


def decode_datagram(data: bytes, fmt: str) -> tuple[Recording, int]:
    """The events of one datagram ([N] columns, t int64 before unwrapping) and its trailing
    bytes (a partial record, ignored)."""
    dtype = UDP_FORMATS[fmt]
    n = len(data) // dtype.itemsize
    rec = np.frombuffer(data, dtype=dtype, count=n)
    if fmt == "t64_x16_y16_on8":
        events = Recording(rec["t"].astype(np.int64), rec["x"].copy(), rec["y"].copy(),
                           rec["on"].astype(np.uint8))
    else:
        y_on = rec["y_on"]
        events = Recording(rec["t"].astype(np.int64), rec["x"].copy(), (y_on >> 1).astype(np.uint16),
                           (y_on & 1).astype(np.uint8))
    return events, len(data) - n * dtype.itemsize


@dataclass
class UdpStats:
    """What arrived and what became of it."""

    datagrams: int = 0
    events_received: int = 0  # events decoded from datagrams
    events_out_of_order: int = 0  # dropped: their datagram began before the last event seen
    trailing_bytes: int = 0  # bytes of partial records at datagram ends
    kernel_dropped_datagrams: int | None = None  # Linux SO_RXQ_OVFL; None where unsupported
    first_arrival: float | None = None
    last_arrival: float | None = None

    def to_dict(self) -> dict[str, int | None]:
        return {"datagrams": self.datagrams, "events_received": self.events_received,
                "events_out_of_order": self.events_out_of_order,
                "trailing_bytes": self.trailing_bytes,
                "kernel_dropped_datagrams": self.kernel_dropped_datagrams}


class UdpReceiver:
    """Binds ``(host, port)`` and reads datagrams on a thread into batches for an asyncio loop."""

    def __init__(self, host: str, port: int):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            raise SourceError(f"cannot listen on udp://{host}:{port}: {exc}") from exc
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
            self.drops: int | None = 0
        except OSError:
            self.drops = None
        self.address = self.sock.getsockname()[:2]
        self._batches: collections.deque[list[bytes]] = collections.deque()
        self._running = False
        self._thread = threading.Thread(target=self._read, name="evssm-udp", daemon=True)
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self._wake = loop, asyncio.Event()
        self._running = True
        self._thread.start()

    def close(self) -> None:
        self._running = False
        if self._thread.is_alive():
            self._thread.join(2.0)
        self.sock.close()

    def _recv(self, buf: bytearray, flags: int = 0) -> bytes:
        if self.drops is None:
            n = self.sock.recv_into(buf, 0, flags)
            return bytes(buf[:n])
        n, ancillary, _, _ = self.sock.recvmsg_into([buf], socket.CMSG_SPACE(4), flags)
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(value) >= 4:
                self.drops = struct.unpack("=I", value[:4])[0]  # cumulative count
        return bytes(buf[:n])

    def _read(self) -> None:
        buf = bytearray(65536)
        self.sock.settimeout(0.1)
        while self._running:
            try:
                batch = [self._recv(buf)]
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            while len(batch) < 4096:  # drain what is queued already, without blocking
                try:
                    batch.append(self._recv(buf, socket.MSG_DONTWAIT))
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
            self._batches.append(batch)
            assert self._loop is not None and self._wake is not None
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the loop is closed
                return

    async def batch(self, timeout: float) -> list[bytes] | None:
        """The next batch of datagrams, or None after ``timeout`` seconds without one."""
        assert self._wake is not None
        deadline = time.monotonic() + timeout
        while not self._batches:
            self._wake.clear()
            if self._batches:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return None
        return self._batches.popleft()


@dataclass
class _Buffer:
    """Events received and not yet sent, and the stream's clock bookkeeping."""

    pieces: list[Recording] = field(default_factory=list)
    size: int = 0
    since: float = 0.0  # wall time the oldest buffered event arrived
    last_t: int | None = None  # last event time accepted (unwrapped)
    wrap: int = 0  # added to 32-bit timestamps
    t0: int | None = None  # first event time: windows are anchored there

    def take(self) -> Recording:
        rec = _concat(self.pieces)
        self.pieces, self.size = [], 0
        return rec


def _concat(pieces: list[Recording]) -> Recording:
    if len(pieces) == 1:
        return pieces[0]
    cols = [np.concatenate([getattr(p, c) for p in pieces]) for c in ("t", "x", "y", "p")]
    return Recording(*cols)


def _accept(buf: _Buffer, events: Recording, fmt: str, stats: UdpStats) -> Recording | None:
    """Unwrap, order-check and sort one datagram's events; None if it must be dropped."""
    if len(events) == 0:
        return None
    t = events.t
    if fmt == "t32_x16_y15_on1":
        if buf.last_t is not None and buf.last_t - (int(t[0]) + buf.wrap) > (1 << 31):
            buf.wrap += WRAP_US
        t = t + buf.wrap
    if buf.last_t is not None and int(t[0]) < buf.last_t:
        stats.events_out_of_order += len(events)
        return None
    events = Recording(t, events.x, events.y, events.p)
    if len(t) > 1 and (np.diff(t) < 0).any():  # a sensor may interleave slightly within a datagram
        order = np.argsort(t, kind="stable")
        y, p = events.y, events.p
        assert y is not None and p is not None  # datagrams carry 2-D events
        events = Recording(t[order], events.x[order], y[order], p[order])
    buf.last_t = int(events.t[-1])
    return events


async def live_packets(receiver: UdpReceiver, fmt: str, stats: UdpStats, *,
                       events: int | None = None, window_us: int | None = None,
                       max_events: int = 16384, flush_s: float = 0.02,
                       idle_timeout: float | None = 5.0,
                       stop: asyncio.Event | None = None) -> AsyncIterator[Packet]:
    """Packets of the live stream: ``events`` per packet, or one per ``window_us`` of sensor time
    (split at ``max_events``). Events wait at most ``flush_s`` seconds for their packet to fill.
    Ends, after sending what is buffered, when no datagram came for ``idle_timeout`` seconds after
    the last one (None: never) or when ``stop`` is set. Before the first datagram it waits as long
    as it takes: a receiver is often started before its camera."""
    if (events is None) == (window_us is None):
        raise ValueError("give exactly one of events= and window_us=")
    buf = _Buffer()
    index = 0
    idle_since: float | None = None  # the last datagram's arrival
    while stop is None or not stop.is_set():
        now = time.monotonic()
        waits = [0.25 if stop is not None else 3600.0]
        if buf.size:
            waits.append(buf.since + flush_s - now)
        if idle_timeout is not None and idle_since is not None:
            waits.append(idle_since + idle_timeout - now)
        batch = await receiver.batch(max(min(waits), 0.0))
        now = time.monotonic()
        stats.kernel_dropped_datagrams = receiver.drops
        if batch:
            idle_since = now
            stats.first_arrival = stats.first_arrival or now
            stats.last_arrival = now
            for data in batch:
                got, trailing = decode_datagram(data, fmt)
                stats.datagrams += 1
                stats.trailing_bytes += trailing
                stats.events_received += len(got)
                kept = _accept(buf, got, fmt, stats)
                if kept is not None:
                    if not buf.size:
                        buf.since = now
                    buf.pieces.append(kept)
                    buf.size += len(kept)
                    buf.t0 = buf.t0 if buf.t0 is not None else int(kept.t[0])
        elif idle_timeout is not None and idle_since is not None and now - idle_since >= idle_timeout:
            break
        flush = buf.size > 0 and now - buf.since >= flush_s
        for packet in _ready(buf, events, window_us, max_events, flush, index):
            index += 1
            yield packet
    for packet in _ready(buf, events, window_us, max_events, True, index):
        yield packet


def _ready(buf: _Buffer, events: int | None, window_us: int | None, max_events: int, flush: bool,
           index: int) -> list[Packet]:
    """The packets the buffer completes (every buffered event when ``flush``)."""
    if not buf.size:
        return []
    rec = buf.take()
    n = len(rec)
    if events is not None:
        cut = n if flush else n - n % events
    else:
        assert window_us is not None and buf.t0 is not None
        if flush:
            cut = n
        else:  # keep the events of the newest (still open) window
            open_from = buf.t0 + ((int(rec.t[-1]) - buf.t0) // window_us) * window_us
            cut = int(np.searchsorted(rec.t, open_from, side="left"))
    if cut < n:
        buf.pieces, buf.size, buf.since = [rec.slice(cut, n)], n - cut, time.monotonic()
    if cut == 0:
        return []
    done = rec.slice(0, cut)
    cuts = (packetize(done, events=events) if events is not None
            else packetize(done, window_us=window_us, max_events=max_events))
    return [Packet(p.events, p.due_us, index + i) for i, p in enumerate(cuts)]
