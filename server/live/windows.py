"""Sliding windows over a stream: which staggered lane restarts where in a packet, and which lane
answers after it — pure planning, NumPy only (the engine steps the lanes; this says how).

**The field.** ``window: {"ms": T, "hop_ms": H}`` (stream time) or ``{"events": N, "hop": M}``
(event counts); without a hop the window tumbles (``H = T``). Both are planned on one *clock*:
an event's clock is its time minus the stream's first event's time (µs), or its index in the
stream (counts). ``T`` and ``H`` are in the clock's unit below.

**Lanes.** ``L = ceil(T / H)`` lanes; lane ``j`` restarts at the clock values
``g = j H + m T`` (``m >= 0``): its current segment holds the events with clock ``>= g_j``, where
``g_j`` is its latest restart not after the clock of the newest event, ``c_now`` (0, the stream's
start, before its first restart). Each lane's segment is younger than ``T``
(``c_now - T < g_j <= c_now``), so the state of every lane stays bounded however long the stream.

**The answer** after a packet comes from the lane with the longest history: the one whose segment
started first, ``s* = min_j g_j`` (the lowest lane on a tie). Equivalently, over the grid
``G = {0} ∪ {j H + m T}``, ``s* = min {g in G : g > c_now - T}``: the window is every event with
clock in ``[s*, c_now]``, between ``T - H`` and ``T`` long once the stream is older than ``T``,
whatever the packets. Its ``t0`` is the time of its first event and ``events`` its count.

**Per packet** (``n`` events) a lane whose latest restart falls after the previous packet's newest
clock restarts at the packet's first event with clock ``>= g_j`` (an index in ``0..n-1``): the engine
resets that lane's model state and steps it on ``packet[index:]``; the other lanes step on the
whole packet. Restarts in a gap between packets land on index 0; of several restarts of one
lane inside one packet only the last matters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_LANES = 64  # each lane is a session's worth of model state and step work
MAX_WINDOW_US = 86_400_000_000  # one day
MAX_WINDOW_EVENTS = 1 << 40
NO_RESTART = -1
NEVER = int(np.iinfo(np.int64).min)


class WindowError(ValueError):
    """A window declaration or a packet the planner cannot take (the message says why)."""


def _positive_int(name: str, value: Any, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise WindowError(f"window.{name} must be an integer, got {value!r}")
    if not 1 <= value <= top:
        raise WindowError(f"window.{name} must be between 1 and {top}, got {value}")
    return int(value)


def _ms_to_us(name: str, value: Any) -> int:
    """A positive number of milliseconds at microsecond resolution -> integer microseconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise WindowError(f"window.{name} must be a number of milliseconds, got {value!r}")
    if value > MAX_WINDOW_US / 1000:  # before float(): an int beyond a double's range overflows
        raise WindowError(f"window.{name} must be at most {MAX_WINDOW_US // 1000} ms, got {value!r}")
    ms = float(value)
    if not math.isfinite(ms) or ms <= 0:
        raise WindowError(f"window.{name} must be a positive number of milliseconds, got {value!r}")
    us = round(ms * 1000)
    if abs(us - ms * 1000) > 1e-6 * max(1.0, ms):
        raise WindowError(f"window.{name} has a resolution of 1 microsecond (0.001 ms), got {value!r}")
    return int(us)


@dataclass(frozen=True)
class WindowSpec:
    """``length`` ``T`` and ``hop`` ``H`` on the clock of ``unit`` (``"us"`` or ``"events"``)."""

    unit: str
    length: int
    hop: int

    def __post_init__(self) -> None:
        if self.unit not in ("us", "events"):
            raise WindowError(f"window unit must be 'us' or 'events', got {self.unit!r}")
        if not 1 <= self.hop <= self.length:
            raise WindowError(f"window hop must be between 1 and the window's length {self.length}, "
                              f"got {self.hop}")
        if self.lanes > MAX_LANES:
            raise WindowError(f"window needs ceil(length / hop) = {self.lanes} lanes; at most "
                              f"{MAX_LANES}: raise the hop to at least {-(-self.length // MAX_LANES)}")

    @property
    def lanes(self) -> int:
        return -(-self.length // self.hop)

    @classmethod
    def from_dict(cls, d: Any) -> WindowSpec:
        """The wire's ``window`` map: ``{"ms": T, "hop_ms": H}`` or ``{"events": N, "hop": M}``
        (the hop optional: a tumbling window)."""
        if not isinstance(d, Mapping):
            raise WindowError(f'window must be a map, {{"ms": T, "hop_ms": H}} or {{"events": N, '
                              f'"hop": M}}, got {type(d).__name__}')
        keys = set(d)
        if keys and keys <= {"ms", "hop_ms"} and "ms" in keys:
            length = _ms_to_us("ms", d["ms"])
            hop = _ms_to_us("hop_ms", d["hop_ms"]) if "hop_ms" in d else length
            if hop > length:
                raise WindowError(f"window.hop_ms must be at most window.ms ({d['ms']}), got {d['hop_ms']}")
            return cls("us", length, hop)
        if keys and keys <= {"events", "hop"} and "events" in keys:
            length = _positive_int("events", d["events"], MAX_WINDOW_EVENTS)
            hop = _positive_int("hop", d["hop"], MAX_WINDOW_EVENTS) if "hop" in d else length
            if hop > length:
                raise WindowError(f"window.hop must be at most window.events ({length}), got {hop}")
            return cls("events", length, hop)
        raise WindowError(f'window takes {{"ms": T, "hop_ms": H}} or {{"events": N, "hop": M}}, '
                          f"got the fields {sorted(map(str, keys))}")

    def to_dict(self) -> dict[str, int | float]:
        if self.unit == "events":
            return {"events": self.length, "hop": self.hop}
        return {"ms": self.length / 1000, "hop_ms": self.hop / 1000}

    def latest_restarts(self, clock: int) -> np.ndarray:
        """int64[L]: each lane's latest restart ``g_j <= clock`` (0 before its first)."""
        offsets = np.arange(self.lanes, dtype=np.int64) * self.hop
        started = clock >= offsets
        periods = np.where(started, (clock - offsets) // self.length, 0)
        return np.where(started, offsets + periods * self.length, 0)


@dataclass
class LaneState:
    """A session's window bookkeeping (bounded: a few integers per lane).

    ``origin``: the first event's time and ``last_t`` the newest's (NEVER before them); ``seen``:
    events so far; ``clock``: the newest event's clock; per lane, ``starts`` (the clock its
    segment began at), ``t0`` (its first event's time) and ``counts`` (its events)."""

    origin: int
    last_t: int
    seen: int
    clock: int
    starts: np.ndarray
    t0: np.ndarray
    counts: np.ndarray

    @classmethod
    def new(cls, lanes: int) -> LaneState:
        return cls(NEVER, NEVER, 0, NEVER, np.zeros(lanes, dtype=np.int64),
                   np.full(lanes, NEVER, dtype=np.int64), np.zeros(lanes, dtype=np.int64))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a snapshot; :meth:`WindowPlan.restore` reads it back."""
        return {"origin": self.origin, "last_t": self.last_t, "seen": self.seen, "clock": self.clock,
                "starts": self.starts.tolist(), "t0": self.t0.tolist(), "counts": self.counts.tolist()}

    def copy(self) -> LaneState:
        return LaneState(self.origin, self.last_t, self.seen, self.clock, self.starts.copy(), self.t0.copy(),
                         self.counts.copy())


@dataclass(frozen=True)
class PacketPlan:
    """What one packet does to the lanes: ``restarts`` int64[L] (the event index each lane
    restarts at, :data:`NO_RESTART` to continue), and the answer after it: ``lane`` (None before
    any event), the window's first event time ``t0`` and its ``events``."""

    restarts: np.ndarray
    lane: int | None
    t0: int | None
    events: int

    def window(self) -> dict[str, int] | None:
        """The result's ``window`` field."""
        if self.lane is None or self.t0 is None:
            return None
        return {"t0": self.t0, "events": self.events}


class WindowPlan:
    """Plans one session's lanes packet by packet (see the module docstring)."""

    def __init__(self, spec: WindowSpec) -> None:
        self.spec = spec

    def new_state(self) -> LaneState:
        return LaneState.new(self.spec.lanes)

    def restore(self, d: Any) -> LaneState:
        """A state from :meth:`LaneState.to_dict`, checked against this plan's lane count."""
        fields = ("origin", "last_t", "seen", "clock", "starts", "t0", "counts")
        if not isinstance(d, Mapping) or set(d) != set(fields):
            raise WindowError(f"window snapshot: expected the fields {list(fields)}")
        lanes = self.spec.lanes

        def int64(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and NEVER <= v < -NEVER

        for name in fields[:4]:
            if not int64(d[name]):
                raise WindowError(f"window snapshot: {name} must be an int64 integer")
        for name in fields[4:]:
            v = d[name]
            if not isinstance(v, (list, tuple)) or len(v) != lanes or not all(map(int64, v)):
                raise WindowError(f"window snapshot: {name} must be {lanes} int64 integers (one a lane)")
        if d["seen"] < 0 or min(d["counts"]) < 0:
            raise WindowError("window snapshot: counts must not be negative")
        return LaneState(d["origin"], d["last_t"], d["seen"], d["clock"],
                         *(np.array(d[name], dtype=np.int64) for name in fields[4:]))

    def plan(self, state: LaneState, t: np.ndarray) -> PacketPlan:
        """One packet's event times ``t`` int64[n] (non-decreasing, not before the stream's
        newest) -> its :class:`PacketPlan`; ``state`` advances (not when the packet is
        refused)."""
        t = np.asarray(t, dtype=np.int64)
        n = int(t.size)
        lanes = self.spec.lanes
        restarts = np.full(lanes, NO_RESTART, dtype=np.int64)
        if n == 0:
            return PacketPlan(restarts, *self._answer(state))
        if t.ndim != 1:
            raise WindowError(f"window: event times must be 1-d, got shape {t.shape}")
        if (np.diff(t) < 0).any() or t[0] < state.last_t:
            raise WindowError("window: event times go back in time")
        origin = state.origin if state.seen else int(t[0])
        clocks = t - origin if self.spec.unit == "us" else state.seen + np.arange(n, dtype=np.int64)
        now = int(clocks[-1])
        latest = self.spec.latest_restarts(now)
        # A lane restarts in this packet if its latest restart is past the previous newest clock;
        # at the stream's first packet every lane starts at its own latest restart.
        fresh = latest > state.clock if state.seen else np.ones(lanes, dtype=np.bool_)
        index = np.searchsorted(clocks, latest, side="left")
        restarts[fresh] = index[fresh]
        counts = np.where(fresh, n - index, state.counts + n)
        t0 = np.where(fresh, t[np.minimum(index, n - 1)], state.t0)
        starts = np.where(fresh, latest, state.starts)
        state.origin, state.last_t, state.seen, state.clock = origin, int(t[-1]), state.seen + n, now
        state.starts, state.t0, state.counts = starts, t0, counts
        return PacketPlan(restarts, *self._answer(state))

    @staticmethod
    def _answer(state: LaneState) -> tuple[int | None, int | None, int]:
        if not state.seen:
            return None, None, 0
        lane = int(np.argmin(state.starts))
        return lane, int(state.t0[lane]), int(state.counts[lane])
