"""A live session's serving state: decisions, compact results, real-time lag and overload drops.

``open`` may declare (all optional; docs/protocol.md)::

    decide: {"min_prob": P, "hold_ms": D}   results: "full" | "compact"
    realtime: true   overload: "lossless" | "drop"   max_lag_ms: L

:func:`parse_live` checks them (``invalid_field`` naming what is wrong) into :class:`LiveOptions`;
a session that declares any gets a :class:`SessionLive` (``Session.live``), kept by the API layer:

- **decisions** (``server.live.decisions``): after each answered packet its tracker is fed the
  top class, its probability and the packet's newest event time; a result that completes a
  change carries ``decision``. ``results: "compact"`` leaves ``probs``/``top`` out of the
  results that carry none (so it needs ``decide``).
- **lag** (``server.live.lag``): each packet's arrival (when its frame was read) and newest event
  time feed the clock; a result carries ``lag_ms = answered - (t + offset)`` for that packet's
  newest event ``t``. With ``overload: "drop"`` a packet is *admitted* only while its own lag
  when the server takes it up (after it is decoded, before it is tokenised and queued) is at
  most ``max_lag_ms``; a refused packet is answered in its place with the session's current
  answer and ``dropped: {"packets", "events"}``, the session's totals including it. Its events
  never reach the model, the session's ``events`` or ``t``. The check sits at admission, not
  in the batching scheduler: a session's queue is bounded by the connection's in-flight limit,
  so what waits past the check is at most that many packets, and a late packet then costs
  neither its tokenisation nor a staging region.

The state goes into the session's snapshot as plain data (:meth:`SessionLive.to_dict`); the
clock does not (it reads this server's monotonic clock): a restored session learns it again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evssm.models.wire import LIVE_FIELDS, Code, Decided, Dropped

from ..core.engine import Engine
from ..core.sessions import Packet, Session
from ..live.decisions import DecideSpec, DecisionError, DecisionTracker
from ..live.lag import ClockSync, LagError, LagMonitor, OverloadPolicy
from ..metrics import Metrics
from .protocol import Events, ProtocolError, check_times

log = logging.getLogger("evssm.server.app")

RESULT_MODES = ("full", "compact")


@dataclass(frozen=True)
class LiveOptions:
    """What an ``open`` declared: ``decide`` (None: no decisions), ``compact`` results,
    ``realtime`` with its overload ``policy``."""

    decide: DecideSpec | None = None
    compact: bool = False
    realtime: bool = False
    policy: OverloadPolicy = field(default_factory=OverloadPolicy)

    def to_dict(self) -> dict[str, Any]:
        """The declaration as ``open`` fields (the snapshot's, and a resume's comparison)."""
        out: dict[str, Any] = {}
        if self.decide is not None:
            out["decide"] = self.decide.to_dict()
        if self.compact:
            out["results"] = "compact"
        if self.realtime:
            out["realtime"] = True
            if self.policy.mode == "drop":
                out.update(overload="drop", max_lag_ms=self.policy.max_lag_ms)
        return out


def declares_live(msg: Mapping[str, Any]) -> bool:
    """The frame names any of :data:`LIVE_FIELDS`."""
    return any(name in msg for name in LIVE_FIELDS)


def parse_live(msg: Mapping[str, Any]) -> LiveOptions | None:
    """The live fields of an ``open`` frame (None: none declared). Raises ``invalid_field``."""
    if not declares_live(msg):
        return None
    try:
        decide = None if msg.get("decide") is None else DecideSpec.from_dict(msg["decide"])
        policy = OverloadPolicy.from_fields(msg.get("overload"), msg.get("max_lag_ms"))
    except (DecisionError, LagError) as e:
        raise ProtocolError(Code.INVALID_FIELD, str(e)) from None
    results = msg.get("results", "full")
    if results not in RESULT_MODES:
        raise ProtocolError(Code.INVALID_FIELD, f"results must be one of {list(RESULT_MODES)}, got {results!r}")
    if results == "compact" and decide is None:
        raise ProtocolError(Code.INVALID_FIELD, 'results "compact" sends probabilities only with a '
                            'decision: declare decide {"min_prob": P, "hold_ms": D} with it')
    realtime = msg.get("realtime", False)
    if not isinstance(realtime, bool):
        raise ProtocolError(Code.INVALID_FIELD, f"realtime must be true or false, got {realtime!r}")
    if policy.mode == "drop" and not realtime:
        raise ProtocolError(Code.INVALID_FIELD, 'overload "drop" bounds the lag of a realtime session: '
                            "set realtime: true with it")
    return LiveOptions(decide, results == "compact", realtime, policy)


class SessionLive:
    """One session's decisions and lag (module docstring). Event loop only."""

    def __init__(self, options: LiveOptions):
        self.options = options
        self.tracker = None if options.decide is None else DecisionTracker(options.decide)
        self.lag = LagMonitor(ClockSync(), options.policy) if options.realtime else None
        # Packets refused by the overload policy, not yet answered -> (newest event time, the
        # session's dropped totals with it).
        self._dropped: dict[object, tuple[int, Dropped]] = {}
        self.last_lag_ms: float | None = None  # the last answer's (the live page shows it)

    # --- admission (the stream handler) ----------------------------------------------------------
    def late(self, received: float, now: float, t_us: int) -> bool:
        """Whether the overload policy drops a packet read at ``received`` (perf_counter s)
        whose newest event is ``t_us``, taken up at ``now``. Pure: the clock learns the packet
        only once it is accepted (:meth:`arrived`, :meth:`drop`), as it offers itself here."""
        if self.lag is None or self.lag.policy.mode != "drop":
            return False
        return self.lag.policy.drops(self.lag.clock.lag_ms(now, t_us, arrival_s=received))

    def arrived(self, received: float, t_us: int) -> None:
        """An accepted packet's arrival and newest event time (realtime sessions)."""
        if self.lag is not None:
            self.lag.arrived(received, t_us)

    def drop(self, packet: object, received: float, t_us: int, events: int) -> None:
        """``packet`` (queued empty in its place) answers a dropped one of ``events`` events
        whose newest was ``t_us``; it counts."""
        assert self.lag is not None, "only a realtime session drops"
        self.lag.arrived(received, t_us)
        self.lag.dropped_packets += 1
        self.lag.dropped_events += events
        self._dropped[packet] = (t_us, Dropped(self.lag.dropped_packets, self.lag.dropped_events))

    # --- answers (the output processor) ----------------------------------------------------------
    def answered(self, packet: object, t_us: int | None, now: float, answer: tuple[str, float] | None
                 ) -> tuple[Decided | None, float | None, Dropped | None]:
        """A packet's answer (``answer``: top class and probability; None before the model has
        one) at ``now``, for events up to ``t_us``: its decision, lag (ms) and dropped totals."""
        dropped = self._dropped.pop(packet, None)
        if dropped is not None:
            t_us = dropped[0]
        lag_ms = None
        if self.lag is not None and t_us is not None:
            lag_ms = self.last_lag_ms = self.lag.clock.lag_ms(now, t_us)
        decided = None
        if self.tracker is not None and t_us is not None and dropped is None:
            label, prob = answer if answer is not None else (None, 0.0)
            try:
                found = self.tracker.update(label, prob, t_us)
            except DecisionError as e:  # a bug: answers come in stream order, resets start afresh
                log.error("decisions: %s; the tracker starts afresh", e)
                self.reset()
                found = None
            decided = None if found is None else Decided(found.label, found.prob, found.t)
        return decided, lag_ms, None if dropped is None else dropped[1]

    def reset(self) -> None:
        """The stream's reset is done (answered in order): decisions start afresh (its times
        may go back)."""
        if self.tracker is not None:
            self.tracker = DecisionTracker(self.tracker.spec)

    def restart_clock(self) -> None:
        """A ``reset`` was accepted: the packets after it may restart the sensor's clock, so the
        offset is learned again (from now on: a packet queued before the reset and answered
        after it is measured on the new clock, and carries no lag before the new clock has a
        packet). The drop totals stay the session's."""
        if self.lag is not None:
            self.lag.clock = ClockSync()

    # --- snapshots -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data for the session's snapshot: the declaration, the tracker, the drop counts."""
        out: dict[str, Any] = {"open": self.options.to_dict()}
        if self.tracker is not None:
            out["tracker"] = self.tracker.to_dict()
        if self.lag is not None:
            out["dropped"] = [self.lag.dropped_packets, self.lag.dropped_events]
        return out

    @classmethod
    def from_dict(cls, d: Any) -> SessionLive:
        """Read :meth:`to_dict` back; raises ``ValueError`` saying what is wrong."""
        if not isinstance(d, Mapping) or not isinstance(d.get("open"), Mapping):
            raise ValueError("live state: expected a map with the open declaration")
        try:
            options = parse_live(d["open"])
        except ProtocolError as e:
            raise ValueError(f"live state: {e.message}") from None
        live = cls(options or LiveOptions())
        if live.tracker is not None:
            live.tracker.restore(d.get("tracker"))
        if live.lag is not None:
            dropped = d.get("dropped", [0, 0])
            if not (isinstance(dropped, (list, tuple)) and len(dropped) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in dropped)):
                raise ValueError("live state: dropped must be two counts")
            live.lag.dropped_packets, live.lag.dropped_events = dropped
        return live


# --- the stream handler's hooks ------------------------------------------------------------------
def live_of(session: Session) -> SessionLive | None:
    """The session's live state, taken up from a restored snapshot's plain map on first use (a
    map this server cannot read is logged and dropped: the session streams on without it)."""
    state = session.live
    if isinstance(state, Mapping):
        try:
            state = SessionLive.from_dict(state)
        except (ValueError, TypeError) as e:
            log.error("session %s: its snapshot's live state is unusable (%s); serving it without", session.id, e)
            state = None
        session.live = state
    return state if isinstance(state, SessionLive) else None


def check_resume(msg: Mapping[str, Any], session: Session) -> None:
    """A resume may repeat the session's live declaration, never change it."""
    options = parse_live(msg)
    if options is None:
        return
    live = live_of(session)
    if options != (LiveOptions() if live is None else live.options):
        raise ProtocolError(Code.INVALID_FIELD, "the session was opened with other decide, results, realtime "
                            "or overload fields; a resume must declare the same (or none)")


def drop_packet(engine: Engine, metrics: Metrics, session: Session, live: SessionLive, events: Events,
                seq: int | None, received: float, reply: Callable[[], object]) -> None:
    """Answer a packet the overload policy drops (module docstring): its timestamps are checked
    (they teach the clock), nothing else; an empty packet takes its place in the queue, and
    its answer the place ``reply()`` reserves (once it is accepted)."""
    check_times(events.t, session.last_t)
    n = len(events)
    lanes = None
    if session.window is not None:  # a windowed session answers from its answering lane, unchanged
        empty = np.zeros(0, np.int32)
        lanes = session.window.preview(np.zeros(0, np.int64)).rows(empty, empty, 0, 0)
    packet = Packet(seq=seq, region=None, start=0, size=0, events_after=session.events, last_t=session.last_t,
                    received=received, reply=reply(),
                    cropped_after=None if session.geometry is None else session.cropped, lanes=lanes)
    live.drop(packet, received, int(events.t[-1]), n)
    session.last_active = time.monotonic()
    metrics.dropped_packets.labels(model=session.model).inc()
    metrics.dropped_events.labels(model=session.model).inc(n)
    engine.submit(session, packet)
