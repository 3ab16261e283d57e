"""Cutting a recording into packets, and replaying packets at (scaled) real time.

A packet is *due* when a live sensor would have it complete: at its last event's timestamp when
packets are cut by event count, at the end of its window when cut by time. Replay sleeps until
each packet's due time, scaled by ``speed`` (2.0 plays twice as fast); ``speed=None`` sends as fast
as the server accepts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from evssm.models.events import Recording


@dataclass(frozen=True)
class Packet:
    """A slice of a recording. ``due_us``: the recording time at which the packet is complete."""

    events: Recording
    due_us: int
    index: int

    def __len__(self) -> int:
        return len(self.events)


def packetize(rec: Recording, *, events: int | None = None, window_us: int | None = None,
              max_events: int | None = None) -> Iterator[Packet]:
    """Cut ``rec`` into consecutive packets, by event count or by time window.

    ``events``: packets of that many events (the last may be shorter). ``window_us``: one packet
    per window ``[t0 + k*w, t0 + (k+1)*w)`` that holds events (empty windows are skipped: nothing
    to send), split further into chunks of at most ``max_events`` if given (a burst must not exceed
    the server's packet limit). Exactly one of ``events`` and ``window_us`` is required.
    """
    if (events is None) == (window_us is None):
        raise ValueError("give exactly one of events= and window_us=")
    n = len(rec)
    if n == 0:
        return
    t = np.asarray(rec.t, dtype=np.int64)
    if events is not None:
        if events < 1:
            raise ValueError("events per packet must be >= 1")
        for index, start in enumerate(range(0, n, events)):
            stop = min(start + events, n)
            yield Packet(rec.slice(start, stop), int(t[stop - 1]), index)
        return
    assert window_us is not None
    if window_us < 1:
        raise ValueError("the time window must be >= 1 us")
    if max_events is not None and max_events < 1:
        raise ValueError("max_events must be >= 1")
    t0 = int(t[0])
    window = (t - t0) // window_us
    starts = np.concatenate(([0], np.flatnonzero(np.diff(window)) + 1))
    stops = np.concatenate((starts[1:], [n]))
    index = 0
    for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
        due = t0 + (int(window[start]) + 1) * window_us
        step = stop - start if max_events is None else max_events
        for a in range(start, stop, step):
            b = min(a + step, stop)
            # A split chunk is complete at its last event, except the window's final chunk.
            yield Packet(rec.slice(a, b), due if b == stop else int(t[b - 1]), index)
            index += 1


class Pacer:
    """Maps recording time to wall time: ``t0`` (us) plays at the first call, scaled by ``speed``.

    ``speed=None`` means no pacing (every packet is due at once).
    """

    def __init__(self, speed: float | None = 1.0):
        if speed is not None and speed <= 0:
            raise ValueError("speed must be > 0 (or None for as fast as possible)")
        self.speed = speed
        self._t0: int | None = None
        self._wall0 = 0.0

    def delay(self, due_us: int) -> float:
        """Seconds to wait from now until ``due_us`` is due (<= 0: due already)."""
        if self.speed is None:
            return 0.0
        if self._t0 is None:
            self._t0, self._wall0 = due_us, time.monotonic()
        return self._wall0 + (due_us - self._t0) / 1e6 / self.speed - time.monotonic()

    @property
    def started(self) -> bool:
        return self._t0 is not None

    def start(self, t0_us: int) -> None:
        """Anchor recording time ``t0_us`` (e.g. the first event) to the wall clock now."""
        self._t0, self._wall0 = t0_us, time.monotonic()


def paced(packets: Iterable[Packet], speed: float | None = 1.0, *,
          t0_us: int | None = None) -> Iterator[Packet]:
    """Yield ``packets`` no earlier than their due time (blocking sleeps). ``t0_us`` anchors the
    clock (default: the first packet's first event, so the first packet waits its own span)."""
    pacer = Pacer(speed)
    for packet in packets:
        wait = _packet_delay(pacer, packet, t0_us)
        if wait > 0:
            time.sleep(wait)
        yield packet


async def apaced(packets: Iterable[Packet], speed: float | None = 1.0, *,
                 t0_us: int | None = None) -> AsyncIterator[Packet]:
    """Asyncio twin of :func:`paced`."""
    pacer = Pacer(speed)
    for packet in packets:
        wait = _packet_delay(pacer, packet, t0_us)
        if wait > 0:
            await asyncio.sleep(wait)
        yield packet


def _packet_delay(pacer: Pacer, packet: Packet, t0_us: int | None) -> float:
    """Seconds until ``packet`` is due; the first call anchors the clock at ``t0_us`` (default:
    the packet's first event, so the first packet waits its own span)."""
    if pacer.speed is not None and not pacer.started:
        first = int(packet.events.t[0]) if len(packet.events) else packet.due_us
        pacer.start(t0_us if t0_us is not None else first)
    return pacer.delay(packet.due_us)
