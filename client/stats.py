"""Small measurement helpers shared by the live view and the load generator."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable

import numpy as np


def percentiles_ms(latencies_s: Iterable[float], qs: tuple[int, ...] = (50, 95, 99)
                   ) -> dict[str, float | None]:
    """``{"p50": ms, ..., "max": ms, "mean": ms}`` of latencies in seconds (None when empty)."""
    arr = np.fromiter(latencies_s, dtype=np.float64)
    keys = [f"p{q}" for q in qs] + ["max", "mean"]
    if arr.size == 0:
        return dict.fromkeys(keys, None)
    vals = list(np.percentile(arr, qs)) + [arr.max(), arr.mean()]
    return {k: round(float(v) * 1e3, 3) for k, v in zip(keys, vals, strict=True)}


class RateMeter:
    """Events per second over a sliding window of recent wall time."""

    def __init__(self, window_s: float = 1.0):
        self.window_s = window_s
        self._marks: collections.deque[tuple[float, int]] = collections.deque()
        self._total = 0

    def add(self, events: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._total += events
        self._marks.append((now, self._total))
        while len(self._marks) > 2 and now - self._marks[1][0] >= self.window_s:
            self._marks.popleft()

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if len(self._marks) < 2:
            return 0.0
        t0, n0 = self._marks[0]
        span = max(now - t0, 1e-9)
        return (self._total - n0) / span
