"""Event streams, sensors and tokens — NumPy only (the server's API layer and the client use this).

An event stream is ``N`` events ``(t_i, address_i)`` with ``t_i`` integer microseconds,
non-decreasing. The network reads two things per event:

- a **token**: for a 1-D sensor with ``C`` channels, ``token = channel``; for a 2-D sensor
  ``W x H`` with polarity ``p in {0, 1}``, ``token = x + W*y + W*H*p`` (one-to-one; the vocabulary
  has ``2*W*H`` entries);
- a **gap**: ``t_i - t_{i-1}`` in integer microseconds, ``0`` for a stream's first event. The model
  turns gaps into ``dt_i = gap_i / 1000`` milliseconds (float32). Gaps are carried as int32 and
  clamped at ``2**31 - 1`` us (about 36 minutes), far beyond any state's memory.

Padding positions carry token ``PAD_TOKEN`` (-1) and gap 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .wire import Code

PAD_TOKEN = -1
MAX_GAP_US = np.iinfo(np.int32).max
MAX_TOKENS = int(np.iinfo(np.int32).max)  # tokens are int32: a vocabulary of at most 2**31 - 1


@dataclass(frozen=True)
class SensorSpec:
    """Geometry of the sensor a model reads.

    ``kind="1d"``: ``channels`` addresses (x only). ``kind="2d"``: ``width x height`` pixels with
    two polarities (x, y, p).
    """

    kind: str  # "1d" | "2d"
    channels: int = 0
    width: int = 0
    height: int = 0

    def __post_init__(self) -> None:
        if self.kind == "1d":
            if self.channels <= 0:
                raise ValueError("a 1-D sensor needs channels > 0")
        elif self.kind == "2d":
            if self.width <= 0 or self.height <= 0:
                raise ValueError("a 2-D sensor needs width > 0 and height > 0")
        else:
            raise ValueError(f"sensor kind must be '1d' or '2d', got {self.kind!r}")
        if self.num_tokens > MAX_TOKENS:
            raise ValueError(f"{self.num_tokens} addresses (2 x width x height) do not fit int32 "
                             f"tokens; at most {MAX_TOKENS}")

    @property
    def num_tokens(self) -> int:
        """Vocabulary size of the tokeniser (``num_embeddings``)."""
        return self.channels if self.kind == "1d" else 2 * self.width * self.height

    @property
    def columns(self) -> tuple[str, ...]:
        """Address columns of an event besides ``t``."""
        return ("x",) if self.kind == "1d" else ("x", "y", "p")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SensorSpec:
        return cls(**{k: d[k] for k in ("kind", "channels", "width", "height") if k in d})

    @classmethod
    def one_d(cls, channels: int) -> SensorSpec:
        return cls(kind="1d", channels=channels)

    @classmethod
    def two_d(cls, width: int, height: int) -> SensorSpec:
        return cls(kind="2d", width=width, height=height)


@dataclass
class Recording:
    """One event recording: ``t`` int64 microseconds [N]; ``x`` [N]; ``y``, ``p`` [N] or None."""

    t: np.ndarray
    x: np.ndarray
    y: np.ndarray | None = None
    p: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def slice(self, start: int, stop: int) -> Recording:
        def cut(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[start:stop]

        return Recording(self.t[start:stop], self.x[start:stop], cut(self.y), cut(self.p))


class EventError(ValueError):
    """Invalid events. ``code`` is the stable error code of the external contract."""

    def __init__(self, code: Code, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def tokenize(sensor: SensorSpec, x: np.ndarray, y: np.ndarray | None = None,
             p: np.ndarray | None = None, *, check: bool = True,
             out: np.ndarray | None = None) -> np.ndarray:
    """Map event addresses to int32 tokens [N] (see module docstring), written into ``out``
    (int32 [N]) when given. The columns may be any integer dtype and strided (views of packed
    records): no temporary is made beyond one for the polarity term.

    With ``check`` an address outside the sensor raises
    ``EventError(Code.ADDRESS_OUT_OF_RANGE)`` before anything is written.
    """
    x = np.asarray(x)
    n = x.shape[0]
    out = np.empty(n, np.int32) if out is None else out
    if sensor.kind == "1d":
        if check and n:
            _check_range("x", x, sensor.channels, "the sensor's channels")
        np.copyto(out, x, casting="unsafe")
        return out
    if y is None or p is None:
        raise EventError(Code.MISSING_COLUMN, "a 2-D sensor needs columns x, y and p")
    y = np.asarray(y)
    p = np.asarray(p)
    w, h = sensor.width, sensor.height
    if check and n:
        for name, col, hi in (("x", x, w), ("y", y, h), ("p", p, 2)):
            _check_range(name, col, hi, "the sensor's range")
    # In range, so x + w*y + w*h*p < 2**31 holds in int32 arithmetic.
    np.multiply(y, np.int32(w), out=out, casting="unsafe")
    np.add(out, x, out=out, casting="unsafe")
    if p.any():
        np.add(out, np.multiply(p, np.int32(w * h), dtype=np.int32, casting="unsafe"), out=out)
    return out


def _check_range(name: str, col: np.ndarray, hi: int, what: str) -> None:
    """Raise ``address_out_of_range`` unless every value of ``col`` is in ``0 .. hi - 1``."""
    if col.max() >= hi or (col.dtype.kind != "u" and col.min() < 0):
        bad = int(col[(col < 0) | (col >= hi)][0])
        raise EventError(Code.ADDRESS_OUT_OF_RANGE, f"{name}={bad} is outside {what} 0..{hi - 1}")


def untokenize(sensor: SensorSpec, tokens: np.ndarray) -> tuple[np.ndarray, ...]:
    """Inverse of :func:`tokenize`: ``(x,)`` or ``(x, y, p)``."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if sensor.kind == "1d":
        return (tokens,)
    w, h = sensor.width, sensor.height
    return tokens % w, (tokens // w) % h, tokens // (w * h)


def time_gaps(t: np.ndarray, last_t: int | None = None, *, check: bool = True,
              out: np.ndarray | None = None) -> np.ndarray:
    """Inter-event gaps in microseconds, int32 [N], clamped to ``MAX_GAP_US``, written into
    ``out`` (int32 [N]) when given. ``t`` is int64 (or uint64 within int64's range), possibly
    strided.

    ``last_t`` is the timestamp of the event before ``t[0]`` (None at a stream's start, which gives
    ``gap_0 = 0``). With ``check``, decreasing timestamps raise
    ``EventError(Code.TIMESTAMPS_DECREASING)`` before anything is written.
    """
    t = np.asarray(t)
    if t.dtype != np.int64:
        t = t.view(np.int64) if t.dtype == np.uint64 else t.astype(np.int64)
    n = t.shape[0]
    out = np.empty(n, np.int32) if out is None else out
    if n == 0:
        return out
    prev = t[0] if last_t is None else np.int64(last_t)
    # Order is checked by comparison, never by the sign of a difference: t[i] - t[i-1] overflows
    # int64 for far-apart values (2**63 - 1 then -2 would wrap to a positive gap).
    if check and (prev > t[0] or (t[1:] < t[:-1]).any()):
        if prev > t[0]:
            msg = f"t[0]={int(t[0])} is before the session's last event at t={int(prev)}"
        else:
            i = int(np.argmax(t[1:] < t[:-1])) + 1
            msg = f"t[{i}]={int(t[i])} is before t[{i - 1}]={int(t[i - 1])}"
        raise EventError(Code.TIMESTAMPS_DECREASING, msg)
    # For non-decreasing t the true gap lies in [0, 2**64): exact as a uint64 difference.
    wide = np.empty(n, np.uint64)
    wide[0] = int(t[0]) - int(prev) if int(t[0]) >= int(prev) else 0
    np.subtract(t[1:].view(np.uint64), t[:-1].view(np.uint64), out=wide[1:])
    np.minimum(wide, np.uint64(MAX_GAP_US), out=wide)
    np.copyto(out, wide, casting="unsafe")
    return out


def recording_inputs(sensor: SensorSpec, rec: Recording) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens int32 [N], gaps int32 [N])`` of a whole recording from its start."""
    return tokenize(sensor, rec.x, rec.y, rec.p), time_gaps(rec.t)
