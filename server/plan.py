"""The plain data that crosses from the scheduler to the model runner and back (no JAX).

A :class:`StepPlan` says which state rows to zero and which to step by which events; the events
are ragged rows of a staging buffer (``server/staging.py``), referenced by offset, not copied. A
:class:`StepResult` is what one step computed for its whole batch at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class StepPlan:
    """Zero rows ``zero`` (int32 [K]), then step row ``slots[b]`` (int32 [B]) by the events
    ``tokens/gaps[starts[b] : starts[b] + lengths[b]]`` (starts int64 [B], lengths int32 [B],
    each at most the runner's largest length bucket) of the int32 staging buffers [E]."""

    zero: np.ndarray
    slots: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    tokens: np.ndarray
    gaps: np.ndarray


@dataclass(frozen=True, slots=True)
class StepResult:
    """One step's outputs for its B rows: probs float32 [B, C]; ready bool [B] (False: no
    complete final-rate window yet, the probabilities mean nothing); order int32 [B, C] (classes
    by decreasing probability, ties by class index: the top-k of every k); started (perf_counter
    at the start of the step) and seconds (its duration)."""

    probs: np.ndarray
    ready: np.ndarray
    order: np.ndarray
    started: float
    seconds: float
