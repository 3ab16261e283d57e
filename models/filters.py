"""Input filters for live sensors: a dead time per pixel, a background-activity filter and a rate
cap, deterministic and carried across packets — NumPy only (the native pass is
``kernels/filters.cc``).

A session's filters see the events of its stream in order, one packet at a time, and keep their
state between packets, so a stream cut anywhere is filtered exactly as the whole stream in one
packet (the project's invariant, before the model). Everything is integer arithmetic on
microseconds, so this module (the specification, and the reference the native pass is tested
against event for event) and the native pass agree bit for bit.

**Addresses.** The filters work on *pixels*: ``(x, y)`` of a ``W x H`` sensor, polarity ignored
(a pixel that fires is dead whatever the sign of its next change, and its neighbours' activity
supports it whatever their sign: tonic's ``Denoise`` keeps one time per pixel too, and libcaer's
background-activity filter checks polarity only as an option). A token
``x + W y + W H p`` is pixel ``token mod W H``. A 1-D sensor of ``C`` channels is a ``C x 1``
sensor: the channel is the pixel. The sensor is the *source's* (the camera's own geometry, before
any adapter maps it onto the model's sensor, ``models/geometry.py``): dead time and background
activity are properties of physical pixels, and many of those share one pixel of a smaller model.

**The chain.** The enabled filters run in this order; each sees only the events the previous one
kept, and the model sees what the last one keeps. For event ``i`` at time ``t_i`` on pixel
``a_i``:

1. ``refractory_us = R``: with ``k(a)`` the time of the last event *kept* by this filter on pixel
   ``a`` (none at the start), keep ``i`` iff ``k(a_i)`` is none or ``t_i - k(a_i) >= R``; then
   ``k(a_i) = t_i`` for a kept event. Every pixel emits at most one event per ``R`` us; a dropped
   event does not extend the dead time (the pixel did not fire: libcaer's refractory filter
   likewise inhibits a pixel for ``R`` after the last event it let through).
2. ``denoise_us = D``: with ``s(a)`` the time of the last event on pixel ``a`` *seen* by this
   filter (kept or not), keep ``i`` iff some neighbour ``b`` of ``a_i`` (the 8 around it on a 2-D
   sensor, the 2 beside it on a 1-D one; fewer at the edges; never ``a_i`` itself) has
   ``t_i - s(b) < D``; then ``s(a_i) = t_i``. A lone event with no recent neighbour is
   background activity.
3. ``max_rate = E`` events/s: a token bucket in stream time. The credit ``c`` (in units of
   1e-6 event) starts full at ``cap = max(1e6, 1000 E)`` (one millisecond of the rate, at least
   one event); before each event it refills by the stream time since this filter's previous
   event: ``c = min(cap, c + E (t_i - t_prev))``; the event is kept iff ``c >= 1e6``, which
   then costs ``1e6``. Over any interval of ``L`` us at most ``cap / 1e6 + E L / 1e6`` events
   pass; a dense burst keeps the bucket's millisecond at its start, then one event per
   ``1e6 / E`` us spread over the burst (not a cut at its end).

Equal timestamps are fine (an event sees every earlier event of the stream, even at the same
time); gaps of hours are fine (times are int64 and differences are taken without overflow).

**State per session**, dense, sized by the sensor: one int64 per pixel for each enabled per-pixel
filter (``refractory``, ``denoise``), and four int64 scalars (the last time seen, the bucket's last
time, its credit, a spare). For a 1280 x 720 camera that is 921,600 pixels x 8 B = 7.4 MB per
enabled per-pixel filter, 14.7 MB with both; a 128 x 128 model's sensor needs 128 KiB each, a
700-channel cochlea 5.5 KiB.

Per packet, :meth:`FilterBank.apply` returns which events to keep and how many each filter
removed; the state also keeps running totals. A packet that breaks the stream's contract (a time
before the previous one, a token off the sensor) raises :class:`FilterError` and leaves the state
as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .events import SensorSpec

NEVER = int(np.iinfo(np.int64).min)  # "no event yet" in every time slot
UNIT = 1_000_000  # one event's credit in the rate filter
MAX_RATE = 1_000_000_000  # events/s: beyond any sensor, and keeps the credit within int64
MAX_TIME_US = 1 << 62  # the longest dead time or denoise window accepted (some 146,000 years)
FIELDS = ("refractory_us", "denoise_us", "max_rate")
LAST_T, BUCKET_T, CREDIT = 0, 1, 2  # slots of FilterState.scalars (the native pass's order)


class FilterError(ValueError):
    """A filters declaration or a packet the filters cannot take (the message says why)."""


@dataclass(frozen=True)
class FilterSpec:
    """Which filters run and their parameters; None: that filter is off."""

    refractory_us: int | None = None
    denoise_us: int | None = None
    max_rate: int | None = None

    def __post_init__(self) -> None:
        for name, top in (("refractory_us", MAX_TIME_US), ("denoise_us", MAX_TIME_US),
                          ("max_rate", MAX_RATE)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise FilterError(f"filters.{name} must be an integer, got {value!r}")
            if not 1 <= value <= top:
                raise FilterError(f"filters.{name} must be between 1 and {top}, got {value}")

    @classmethod
    def from_dict(cls, d: Any) -> FilterSpec:
        """The wire's ``filters`` map: any of :data:`FIELDS`, each a positive integer (or null,
        off)."""
        if not isinstance(d, Mapping):
            raise FilterError(f"filters must be a map of {list(FIELDS)}, got {type(d).__name__}")
        unknown = sorted(str(k) for k in d if k not in FIELDS)
        if unknown:
            raise FilterError(f"filters: unknown field(s) {unknown}; known: {list(FIELDS)}")
        return cls(**{k: d[k] for k in FIELDS if k in d})

    def to_dict(self) -> dict[str, int]:
        return {k: int(v) for k in FIELDS if (v := getattr(self, k)) is not None}

    @property
    def active(self) -> bool:
        return any(getattr(self, k) is not None for k in FIELDS)

    @property
    def cap(self) -> int:
        """The rate filter's bucket size, in credit units (see the module docstring)."""
        return max(UNIT, 1000 * int(self.max_rate or 0))


@dataclass(frozen=True)
class Grid:
    """The pixels the filters address: ``width x height`` (``C x 1`` for a 1-D sensor) and the
    number of polarity planes in a token (2 for a 2-D sensor, 1 for a 1-D one)."""

    width: int
    height: int
    planes: int

    @classmethod
    def of(cls, sensor: SensorSpec) -> Grid:
        if sensor.kind == "1d":
            return cls(sensor.channels, 1, 1)
        return cls(sensor.width, sensor.height, 2)

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def tokens(self) -> int:
        return self.pixels * self.planes


@dataclass(frozen=True)
class FilterCounts:
    """Events removed by each filter (in a packet, or in total)."""

    refractory: int = 0
    denoise: int = 0
    max_rate: int = 0

    @property
    def total(self) -> int:
        return self.refractory + self.denoise + self.max_rate

    def __add__(self, other: FilterCounts) -> FilterCounts:
        return FilterCounts(self.refractory + other.refractory, self.denoise + other.denoise,
                            self.max_rate + other.max_rate)

    def to_dict(self) -> dict[str, int]:
        return {"refractory": self.refractory, "denoise": self.denoise, "max_rate": self.max_rate}


@dataclass
class FilterState:
    """One session's filter state: per-pixel times (``refractory``: last kept, ``denoise``: last
    seen; None where the filter is off), ``scalars`` int64[4] (last time, bucket time, credit,
    spare) and the running totals ``removed``."""

    refractory: np.ndarray | None
    denoise: np.ndarray | None
    scalars: np.ndarray
    removed: FilterCounts = field(default_factory=FilterCounts)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.refractory, self.denoise, self.scalars) if a is not None)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a snapshot (msgpack-ready): per-pixel tables as little-endian int64
        bytes; :meth:`FilterBank.restore` reads it back."""
        def table(a: np.ndarray | None) -> bytes | None:
            return None if a is None else a.astype("<i8").tobytes()

        return {"refractory": table(self.refractory), "denoise": table(self.denoise),
                "scalars": [int(v) for v in self.scalars], "removed": list(self.removed.to_dict().values())}

    def copy(self) -> FilterState:
        return FilterState(None if self.refractory is None else self.refractory.copy(),
                           None if self.denoise is None else self.denoise.copy(),
                           self.scalars.copy(), self.removed)


class FilterBank:
    """The filters of one spec over one sensor; :meth:`new_state` per session, :meth:`apply` per
    packet. ``native``: True runs the C++ pass (raises
    :class:`~models.native_build.NativeUnavailable` where it cannot be built), False the NumPy
    reference, None the native pass where it builds."""

    def __init__(self, spec: FilterSpec, sensor: SensorSpec, native: bool | None = None) -> None:
        self.spec, self.grid = spec, Grid.of(sensor)
        self._native: Any = None
        if native is not False:
            from .native_build import FILTERS_MODULE, FILTERS_SOURCE, NativeUnavailable, load_extension

            try:
                self._native = load_extension(FILTERS_SOURCE, FILTERS_MODULE)
            except NativeUnavailable:
                if native:
                    raise

    @property
    def native(self) -> bool:
        return self._native is not None

    def new_state(self) -> FilterState:
        def times() -> np.ndarray:
            return np.full(self.grid.pixels, NEVER, dtype=np.int64)

        return FilterState(times() if self.spec.refractory_us else None,
                           times() if self.spec.denoise_us else None,
                           np.array([NEVER, NEVER, self.spec.cap, 0], dtype=np.int64))

    def restore(self, d: Any) -> FilterState:
        """A state from :meth:`FilterState.to_dict`, checked against this bank's filters and
        sensor (:class:`FilterError` says what does not fit)."""
        if not isinstance(d, Mapping) or set(d) != {"refractory", "denoise", "scalars", "removed"}:
            raise FilterError("filters snapshot: expected the fields refractory, denoise, scalars, removed")

        def table(name: str, enabled: bool) -> np.ndarray | None:
            data = d[name]
            if not enabled:
                if data is not None:
                    raise FilterError(f"filters snapshot: {name} holds a table, but that filter is off")
                return None
            if not isinstance(data, bytes) or len(data) != 8 * self.grid.pixels:
                raise FilterError(f"filters snapshot: {name} must be {8 * self.grid.pixels} bytes "
                                  f"({self.grid.width} x {self.grid.height} int64)")
            return np.frombuffer(data, dtype="<i8").astype(np.int64)

        def ints(name: str, size: int) -> list[int]:
            v = d[name]
            if not isinstance(v, (list, tuple)) or len(v) != size or not all(
                    isinstance(x, int) and not isinstance(x, bool) and NEVER <= x < -NEVER for x in v):
                raise FilterError(f"filters snapshot: {name} must be {size} int64 integers")
            return list(v)

        removed = ints("removed", 3)
        if min(removed) < 0:
            raise FilterError("filters snapshot: removed counts must not be negative")
        return FilterState(table("refractory", self.spec.refractory_us is not None),
                           table("denoise", self.spec.denoise_us is not None),
                           np.array(ints("scalars", 4), dtype=np.int64), FilterCounts(*removed))

    def apply(self, state: FilterState, t: np.ndarray, tokens: np.ndarray
              ) -> tuple[np.ndarray, FilterCounts]:
        """Filter one packet: ``t`` int64[N] (non-decreasing, not before the state's last time),
        ``tokens`` int32[N] -> ``keep`` bool[N] and this packet's removals; ``state`` advances
        in place (and not at all when the packet is refused)."""
        t = np.ascontiguousarray(t, dtype=np.int64)
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        if t.shape != tokens.shape or t.ndim != 1:
            raise FilterError(f"filters: t and tokens must be 1-d of one length, got {t.shape} "
                              f"and {tokens.shape}")
        if self._native is not None:
            keep = np.empty(t.shape, dtype=np.bool_)
            try:
                removed = self._native.apply(
                    t, tokens, keep, self.grid.width, self.grid.height, self.grid.planes,
                    self.spec.refractory_us or 0, self.spec.denoise_us or 0, self.spec.max_rate or 0,
                    state.refractory, state.denoise, state.scalars)
            except ValueError as exc:
                raise FilterError(str(exc)) from exc
            counts = FilterCounts(*removed)
        else:
            keep, counts = reference_apply(self.spec, self.grid, state, t, tokens)
        state.removed = state.removed + counts
        return keep, counts


def check_packet(grid: Grid, last_t: int, t: np.ndarray, tokens: np.ndarray) -> None:
    """Raise :class:`FilterError` for a packet that goes back in time or leaves the sensor."""
    if t.size == 0:
        return
    back = np.flatnonzero(np.diff(t, prepend=np.int64(last_t if last_t != NEVER else t[0])) < 0)
    if back.size:
        i = int(back[0])
        before = int(t[i - 1]) if i else last_t
        raise FilterError(f"filters: event {i} at t={int(t[i])} us goes back in time (after {before} us)")
    off = np.flatnonzero((tokens < 0) | (tokens >= grid.tokens))
    if off.size:
        i = int(off[0])
        raise FilterError(f"filters: event {i} has token {int(tokens[i])}, outside 0..{grid.tokens - 1}")


def reference_apply(spec: FilterSpec, grid: Grid, state: FilterState, t: np.ndarray,
                    tokens: np.ndarray) -> tuple[np.ndarray, FilterCounts]:
    """The specification (the module docstring), over one packet; advances ``state`` in place
    (its per-filter arrays and scalars, not the running totals)."""
    check_packet(grid, int(state.scalars[LAST_T]), t, tokens)
    keep = np.ones(t.shape, dtype=np.bool_)
    pixel = (tokens % grid.pixels).astype(np.int64)
    removed = [0, 0, 0]
    if spec.refractory_us is not None:
        assert state.refractory is not None
        passed = refractory_reference(t, pixel, state.refractory, spec.refractory_us)
        removed[0] = int(passed.size - np.count_nonzero(passed))
        keep[keep] = passed
    if spec.denoise_us is not None:
        assert state.denoise is not None
        idx = np.flatnonzero(keep)
        passed = denoise_reference(t[idx], pixel[idx], state.denoise, spec.denoise_us, grid)
        removed[1] = int(passed.size - np.count_nonzero(passed))
        keep[idx] = passed
    if spec.max_rate is not None:
        idx = np.flatnonzero(keep)
        passed = rate_reference(t[idx], state.scalars, spec.max_rate, spec.cap)
        removed[2] = int(passed.size - np.count_nonzero(passed))
        keep[idx] = passed
    if t.size:
        state.scalars[LAST_T] = t[-1]
    return keep, FilterCounts(*removed)


def _since(t: np.ndarray, then: np.ndarray) -> np.ndarray:
    """``t - then`` as uint64, exact whenever ``then <= t`` (a gap of any length, no overflow)."""
    return t.astype(np.int64).view(np.uint64) - then.astype(np.int64).view(np.uint64)


def refractory_reference(t: np.ndarray, pixel: np.ndarray, kept_at: np.ndarray, dead_us: int
                         ) -> np.ndarray:
    """Keep ``i`` iff pixel ``a_i`` kept nothing in the last ``dead_us`` us: ``kept_at[a_i]``
    none or ``t_i - kept_at[a_i] >= R``; a kept event sets ``kept_at[a_i] = t_i``. -> bool[N].

    Sequential by nature (a decision depends on the pixel's earlier decisions): a plain loop."""
    keep = np.zeros(t.shape, dtype=np.bool_)
    for i, (ti, a) in enumerate(zip(t.tolist(), pixel.tolist(), strict=True)):
        last = int(kept_at[a])
        if last == NEVER or ti - last >= dead_us:
            keep[i] = True
            kept_at[a] = ti
    return keep


def neighbour_offsets(grid: Grid) -> list[tuple[int, int]]:
    """The ``(dx, dy)`` of a pixel's neighbours: the 8 around it; on a 1-D sensor (height 1) the
    ones with ``dy != 0`` are always off the sensor, leaving the 2 beside it."""
    return [(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dx, dy) != (0, 0)]


def denoise_reference(t: np.ndarray, pixel: np.ndarray, seen: np.ndarray, window_us: int,
                      grid: Grid) -> np.ndarray:
    """Keep ``i`` iff a neighbour ``b`` of ``a_i`` has ``t_i - s(b) < D``, ``s(b)`` the last time
    pixel ``b`` was seen before event ``i`` (in this packet, else the carried ``seen[b]``); then
    ``seen`` holds each pixel's last time. -> bool[N].

    Vectorised: the events sorted by ``(pixel, index)`` give, for a query ``(b, i)``, the last
    event on ``b`` before ``i`` by one binary search on the key ``b N + i``."""
    n = t.size
    if n == 0:
        return np.zeros(0, dtype=np.bool_)
    order = np.lexsort((np.arange(n), pixel))
    keys = pixel[order] * n + order
    x, y = pixel % grid.width, pixel // grid.width
    latest = np.full(n, NEVER, dtype=np.int64)
    index = np.arange(n, dtype=np.int64)
    for dx, dy in neighbour_offsets(grid):
        xx, yy = x + dx, y + dy
        on = (xx >= 0) & (xx < grid.width) & (yy >= 0) & (yy < grid.height)
        b = (yy * grid.width + xx)[on]
        pos = np.searchsorted(keys, b * n + index[on]) - 1
        hit = (pos >= 0) & (keys[np.maximum(pos, 0)] // n == b)
        last = np.where(hit, t[order[np.maximum(pos, 0)]], seen[b])
        latest[on] = np.maximum(latest[on], last)
    keep = (latest != NEVER) & (_since(t, latest) < np.uint64(window_us))
    # Each pixel's last event of the packet is the last of its run in the sorted order.
    sorted_pixels = pixel[order]
    ends = np.flatnonzero(np.append(sorted_pixels[1:] != sorted_pixels[:-1], True))
    seen[sorted_pixels[ends]] = t[order[ends]]
    return keep


def rate_reference(t: np.ndarray, scalars: np.ndarray, max_rate: int, cap: int) -> np.ndarray:
    """The token bucket: before event ``i``, ``c = min(cap, c + E (t_i - t_prev))`` (no refill
    before the filter's first event); keep iff ``c >= 1e6``, which then costs ``1e6``. ``scalars``
    carries ``t_prev`` and ``c``. -> bool[N]. A plain loop: each decision spends the credit."""
    keep = np.zeros(t.shape, dtype=np.bool_)
    prev, credit = int(scalars[BUCKET_T]), int(scalars[CREDIT])
    for i, ti in enumerate(t.tolist()):
        if prev != NEVER:
            # Past a second the bucket is full at any rate (cap / E <= 1e6 us): clamping there
            # keeps E * gap within int64 after gaps of any length.
            credit = min(cap, credit + max_rate * min(ti - prev, UNIT))
        prev = ti
        if credit >= UNIT:
            keep[i] = True
            credit -= UNIT
    scalars[BUCKET_T], scalars[CREDIT] = prev, credit
    return keep
