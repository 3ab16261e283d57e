"""Sliding windows at ingest: a windowed session's packets planned onto its lanes.

The planner (``server/live/windows.py``) says which lane restarts at which event of a packet and
which lane answers; this module turns that into the core's plain
:class:`~evssm.server.core.sessions.LaneRows` while the packet is staged. A restarted lane starts a
stream, whose first event has a zero gap, but the other lanes read that event's real gap from the
same staging region; so each restart at an event whose gap is not already zero gets a copy of
that one event with a zero gap after the packet's events (at most one per lane and packet). The
lanes' state advances only with an accepted packet (:meth:`SessionWindow.preview` plans on a
copy, :meth:`SessionWindow.commit` keeps it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.sessions import LaneRows
from ..live.windows import NO_RESTART, LaneState, PacketPlan, WindowError, WindowPlan, WindowSpec


def describe(spec: WindowSpec) -> dict[str, Any]:
    """What ``opened`` echoes: the window as declared, and its lanes (its cost in sessions)."""
    return {**spec.to_dict(), "lanes": spec.lanes}


@dataclass(frozen=True)
class Staged:
    """One packet planned on a copy of the lanes' state: ``copies``, the distinct restart indices
    that need a zero-gap copy of their event (staged after the packet's events, in this order)."""

    plan: PacketPlan
    state: LaneState
    copies: tuple[int, ...]

    @property
    def extra(self) -> int:
        """Staging room needed past the packet's ``n`` events."""
        return len(self.copies)

    def rows(self, tokens: np.ndarray, gaps: np.ndarray, start: int, n: int) -> LaneRows:
        """Write the copies into the staging buffers ``tokens``/``gaps`` int32 [capacity] at
        ``start + n ..`` (the packet is at ``start .. start + n``) and return the lanes' rows."""
        at = {i: start + n + k for k, i in enumerate(self.copies)}
        for i, pos in at.items():
            tokens[pos], gaps[pos] = tokens[start + i], 0
        restarts = [int(i) for i in self.plan.restarts]
        return LaneRows(sizes=tuple(n if i == NO_RESTART else n - i for i in restarts),
                        resets=tuple(i != NO_RESTART for i in restarts),
                        copies=tuple(at.get(i, -1) for i in restarts),
                        answer=0 if self.plan.lane is None else self.plan.lane,
                        t0=self.plan.t0, events=self.plan.events)


class SessionWindow:
    """One session's lanes as the API layer plans them (its stream handler, event loop only)."""

    def __init__(self, spec: WindowSpec):
        self.spec = spec
        self._planner = WindowPlan(spec)
        self.state = self._planner.new_state()

    @property
    def lanes(self) -> int:
        return self.spec.lanes

    def reset(self) -> None:
        """A new stream (the session's ``reset``): the clock starts again at its next event."""
        self.state = self._planner.new_state()

    def preview(self, t: np.ndarray) -> Staged:
        """Plan a packet's event times ``t`` int64 [n] on a copy of the state (raises
        :class:`WindowError` for times that go back)."""
        before = self.state
        state = before.copy()
        plan = self._planner.plan(state, t)
        t = np.asarray(t, dtype=np.int64)

        def zero_gap(i: int) -> bool:  # the event's staged gap is 0 already
            if i:
                return bool(t[i] == t[i - 1])
            return before.seen == 0 or int(t[0]) == before.last_t

        copies = sorted({int(i) for i in plan.restarts if i != NO_RESTART and not zero_gap(int(i))})
        return Staged(plan, state, tuple(copies))

    def commit(self, staged: Staged) -> None:
        """The packet was accepted: its lanes' state is the session's."""
        self.state = staged.state

    def snapshot(self, state: LaneState | None) -> dict[str, Any]:
        """The window for a session snapshot: its spec and ``state``, the lane state paired with
        the rows the snapshot holds (None: a fresh stream). Plain data; :meth:`restore` reads it."""
        spec = self.spec
        return {"spec": {"unit": spec.unit, "length": spec.length, "hop": spec.hop},
                "state": (state or self._planner.new_state()).to_dict()}

    @classmethod
    def restore(cls, d: Any) -> SessionWindow:
        """The window a :meth:`snapshot` kept, planning on from its lane state (raises
        :class:`WindowError` for a record that does not fit)."""
        if not isinstance(d, dict) or set(d) != {"spec", "state"} or not isinstance(d["spec"], dict):
            raise WindowError("window snapshot: expected the fields spec and state")
        spec = d["spec"]
        if set(spec) != {"unit", "length", "hop"} or not all(isinstance(spec[k], int) for k in ("length", "hop")):
            raise WindowError("window snapshot: spec must hold unit and the integers length and hop")
        window = cls(WindowSpec(str(spec["unit"]), spec["length"], spec["hop"]))
        window.state = window._planner.restore(d["state"])
        return window


def window_suffix(spec: WindowSpec, t: np.ndarray) -> tuple[int, int | None]:
    """How many of a whole recording's last events (times ``t`` int64 [n]) form its last window,
    and the first one's time (None for no events): the window a stream of them answers for
    after its last packet, whatever its packets."""
    plan = WindowPlan(spec).plan(LaneState.new(spec.lanes), np.asarray(t, dtype=np.int64))
    return plan.events, plan.t0


__all__ = ["SessionWindow", "Staged", "WindowError", "describe", "window_suffix"]
