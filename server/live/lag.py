"""Real-time lag of a live session, and the overload policy that bounds it — pure, no I/O.

**Clocks.** A sensor stamps events on its own clock (µs, any origin); the server has its monotonic
clock. A packet that arrives at server time ``a_k`` (µs) and whose newest event is ``t_k`` cannot
have been sent before that event happened, so ``a_k - t_k = offset + d_k``: the clocks' offset
plus the packet's delay ``d_k >= 0`` (batching in the sensor, the network). The best estimate of
the offset is the least delayed packet's: ``offset = min_k (a_k - t_k)``, learned from the first
packet and lowered by any faster one. By default the minimum runs over the whole session;
``window_s`` limits it to the packets of the last ``window_s`` seconds of arrivals, which follows a
sensor clock that drifts against the server's (a few tens of ppm is 0.1 s an hour) at the price of
forgetting the fastest packet, and of hiding lag when the server stops reading for longer than the
window (the arrivals themselves are then late).

**Lag.** An answer computed at server time ``w`` for events up to ``t`` trails the sensor by
``lag = w - (t + offset)`` (reported in ms, never below 0): the packet's own delay plus its wait
and step in the server.

**Overload.** ``overload: "lossless"`` (the default) steps every packet however late.
``overload: "drop"`` drops a whole packet, before it is stepped, when its lag at that moment
(``now - (t + offset)``, ``t`` its newest event) is above ``max_lag_ms``: the queue drains by the
packets it skips and the session answers about the present again. Dropped packets and events are
counted. Dropping loses events, so a window or a decision over them is no longer what
``/v1/classify`` would answer on the sensor's whole stream.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

OVERLOAD_MODES = ("lossless", "drop")
DEFAULT_MAX_LAG_MS = 250.0
MAX_LAG_BOUND_MS = 3_600_000.0  # an hour


class LagError(ValueError):
    """An overload declaration the server cannot take (the message says why)."""


def to_us(seconds: float) -> int:
    """A monotonic clock reading in seconds -> integer microseconds."""
    return round(seconds * 1_000_000)


class ClockSync:
    """The sensor-to-server clock offset (µs): the minimum of ``arrival - newest event time``
    over the session, or over the arrivals of the last ``window_s`` seconds."""

    def __init__(self, window_s: float | None = None) -> None:
        if window_s is not None and not (math.isfinite(window_s) and window_s > 0):
            raise LagError(f"the clock window must be a positive number of seconds, got {window_s!r}")
        self.window_us = None if window_s is None else to_us(window_s)
        # (arrival_us, arrival_us - t_us), the second strictly increasing: the front is the minimum.
        self._candidates: deque[tuple[int, int]] = deque()

    def observe(self, arrival_s: float, t_us: int) -> None:
        """A packet arrived at ``arrival_s`` (monotonic seconds) with its newest event at ``t_us``."""
        arrival = to_us(arrival_s)
        offset = arrival - int(t_us)
        while self._candidates and self._candidates[-1][1] >= offset:
            self._candidates.pop()  # never the minimum again: newer and no larger
        self._candidates.append((arrival, offset))
        if self.window_us is not None:
            while self._candidates[0][0] < arrival - self.window_us:
                self._candidates.popleft()

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a snapshot: the window and the candidate minima (arrival, offset), in
        µs of the server's monotonic clock. Only a server of the same boot shares that clock, so a
        snapshot restored elsewhere should start a fresh :class:`ClockSync` instead."""
        return {"window_us": self.window_us, "candidates": [list(c) for c in self._candidates]}

    @classmethod
    def from_dict(cls, d: Any) -> ClockSync:
        if not isinstance(d, Mapping) or set(d) != {"window_us", "candidates"}:
            raise LagError("lag snapshot: expected the fields window_us, candidates")
        window, candidates = d["window_us"], d["candidates"]
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
            raise LagError("lag snapshot: window_us must be a positive integer or null")
        if not isinstance(candidates, (list, tuple)) or not all(
                isinstance(c, (list, tuple)) and len(c) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in c) for c in candidates):
            raise LagError("lag snapshot: candidates must be [arrival_us, offset_us] pairs")
        offsets = [c[1] for c in candidates]
        if any(b <= a for a, b in zip(offsets, offsets[1:], strict=False)):
            raise LagError("lag snapshot: candidate offsets must increase (the front is the minimum)")
        clock = cls()
        clock.window_us = window
        clock._candidates.extend((int(a), int(o)) for a, o in candidates)
        return clock

    @property
    def offset_us(self) -> int | None:
        return self._candidates[0][1] if self._candidates else None

    def lag_ms(self, now_s: float, t_us: int, arrival_s: float | None = None) -> float | None:
        """How far an answer at ``now_s`` for events up to ``t_us`` trails the sensor (None
        before the first packet). With ``arrival_s``: as if a packet that arrived then, newest
        event ``t_us``, were observed first, without observing it (a window's expiry aside)."""
        offset = self.offset_us
        if arrival_s is not None:
            own = to_us(arrival_s) - int(t_us)
            offset = own if offset is None else min(offset, own)
        if offset is None:
            return None
        return max(0, to_us(now_s) - (int(t_us) + offset)) / 1000


@dataclass(frozen=True)
class OverloadPolicy:
    """``mode`` one of :data:`OVERLOAD_MODES`; ``max_lag_ms`` the bound of ``drop``."""

    mode: str = "lossless"
    max_lag_ms: float = DEFAULT_MAX_LAG_MS

    @classmethod
    def from_fields(cls, overload: Any = None, max_lag_ms: Any = None) -> OverloadPolicy:
        """The ``open`` frame's ``overload`` (absent: lossless) and ``max_lag_ms`` (absent: the
        default bound)."""
        mode = "lossless" if overload is None else overload
        if mode not in OVERLOAD_MODES:
            raise LagError(f"overload must be one of {list(OVERLOAD_MODES)}, got {overload!r}")
        if max_lag_ms is None:
            return cls(mode)
        if isinstance(max_lag_ms, bool) or not isinstance(max_lag_ms, (int, float)):
            raise LagError(f"max_lag_ms must be a number of milliseconds, got {max_lag_ms!r}")
        if not 0 < max_lag_ms <= MAX_LAG_BOUND_MS:  # NaN fails both comparisons
            raise LagError(f"max_lag_ms must be above 0 and at most {MAX_LAG_BOUND_MS:.0f}, got {max_lag_ms!r}")
        if mode != "drop":
            raise LagError('max_lag_ms bounds overload "drop"; set overload: "drop" with it')
        return cls(mode, float(max_lag_ms))

    def drops(self, lag_ms: float | None) -> bool:
        return self.mode == "drop" and lag_ms is not None and lag_ms > self.max_lag_ms


@dataclass
class LagMonitor:
    """One real-time session: the clock, the policy and what was dropped."""

    clock: ClockSync
    policy: OverloadPolicy
    dropped_packets: int = 0
    dropped_events: int = 0

    def arrived(self, arrival_s: float, t_us: int) -> None:
        self.clock.observe(arrival_s, t_us)

    def admit(self, now_s: float, t_us: int, events: int) -> bool:
        """Whether to step a packet (newest event ``t_us``, ``events`` long) at ``now_s``; a
        refused one is counted as dropped."""
        if self.policy.drops(self.clock.lag_ms(now_s, t_us)):
            self.dropped_packets += 1
            self.dropped_events += events
            return False
        return True
