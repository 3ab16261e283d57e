"""Decisions: a debounced "the class is now X" over a session's rolling answers — pure, no I/O.

``decide: {"min_prob": P, "hold_ms": D}``. After each packet the tracker is fed the top class,
its probability and the stream time ``t`` (µs, the newest event's). A *candidate* is the top
class while its probability stays ``>= P``; it is (re)started at the first answer where the top
class changes or climbs back to ``>= P``, at that answer's ``t_c``. When the candidate differs
from the last decided class and has held for ``t - t_c >= D`` µs of stream time (inclusive, so
``D = 0`` decides at once), the tracker emits ``{"label", "prob", "t"}`` (this answer's
probability and time) and the candidate becomes the decided class. So a decision fires once per
change: the same class again fires only after another class was decided in between, and a
flicker shorter than ``D`` fires nothing.

Stream time, not wall time: a replay of the same packets at any speed decides the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_HOLD_MS = 86_400_000  # one day


class DecisionError(ValueError):
    """A ``decide`` declaration or an update the tracker cannot take (the message says why)."""


@dataclass(frozen=True)
class DecideSpec:
    """``min_prob`` in ``[0, 1]``, ``hold_us`` ``>= 0`` (the wire gives ``hold_ms``)."""

    min_prob: float
    hold_us: int

    @classmethod
    def from_dict(cls, d: Any) -> DecideSpec:
        if not isinstance(d, Mapping):
            raise DecisionError(f'decide must be a map {{"min_prob": P, "hold_ms": D}}, got {type(d).__name__}')
        unknown = sorted(str(k) for k in d if k not in ("min_prob", "hold_ms"))
        if unknown or "min_prob" not in d:
            raise DecisionError(f'decide takes {{"min_prob": P, "hold_ms": D}} (hold optional, 0), got the '
                                f"fields {sorted(map(str, d))}")
        p, hold = d["min_prob"], d.get("hold_ms", 0)
        for name, v in (("min_prob", p), ("hold_ms", hold)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float)
                                                                          and not math.isfinite(v)):
                raise DecisionError(f"decide.{name} must be a number, got {v!r}")
        if not 0 <= p <= 1:
            raise DecisionError(f"decide.min_prob must be between 0 and 1, got {p!r}")
        if not 0 <= hold <= MAX_HOLD_MS:
            raise DecisionError(f"decide.hold_ms must be between 0 and {MAX_HOLD_MS}, got {hold!r}")
        return cls(float(p), round(hold * 1000))

    def to_dict(self) -> dict[str, float]:
        return {"min_prob": self.min_prob, "hold_ms": self.hold_us / 1000}


@dataclass(frozen=True)
class Decision:
    label: str
    prob: float
    t: int

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "prob": self.prob, "t": self.t}


class DecisionTracker:
    """One session's tracker (its state: the decided class, the candidate and since when)."""

    def __init__(self, spec: DecideSpec) -> None:
        self.spec = spec
        self.decided: str | None = None
        self.candidate: str | None = None
        self.since: int = 0
        self.last_t: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a snapshot; :meth:`restore` reads it back."""
        return {"decided": self.decided, "candidate": self.candidate, "since": self.since,
                "last_t": self.last_t}

    def restore(self, d: Any) -> None:
        """Take the state of :meth:`to_dict` (checked first: a bad one changes nothing)."""
        if not isinstance(d, Mapping) or set(d) != {"decided", "candidate", "since", "last_t"}:
            raise DecisionError("decide snapshot: expected the fields decided, candidate, since, last_t")
        for name in ("decided", "candidate"):
            if d[name] is not None and not isinstance(d[name], str):
                raise DecisionError(f"decide snapshot: {name} must be a class name or null")
        for name in ("since", "last_t"):
            v = d[name]
            if (v is not None or name == "since") and (isinstance(v, bool) or not isinstance(v, int)):
                raise DecisionError(f"decide snapshot: {name} must be an integer time")
        self.decided, self.candidate, self.since, self.last_t = (
            d["decided"], d["candidate"], d["since"], d["last_t"])

    def update(self, label: str | None, prob: float, t: int) -> Decision | None:
        """Feed one answer (``label`` None: no prediction yet) -> the decision it completes, if
        any. Times must not go back."""
        if self.last_t is not None and t < self.last_t:
            raise DecisionError(f"decide: time {t} us is before the previous answer's {self.last_t} us")
        if not math.isfinite(prob):
            raise DecisionError(f"decide: probability {prob!r} is not finite")
        self.last_t = t
        if label is None or prob < self.spec.min_prob:
            self.candidate = None
            return None
        if label != self.candidate:
            self.candidate, self.since = label, t
        if self.candidate != self.decided and t - self.since >= self.spec.hold_us:
            self.decided = self.candidate
            return Decision(label, float(prob), int(t))
        return None
