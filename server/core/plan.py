"""The plain data that crosses from the scheduler to the model runner and back (no JAX).

A :class:`StepPlan` says which state rows to zero, which to overwrite with given rows (sessions
restored from snapshots), which to step by which events, and which to copy out after the step
(snapshots); the events are ragged rows of a staging buffer (``server/staging.py``), referenced by
offset, not copied. A :class:`StepResult` is what one step computed for its whole batch at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class StepPlan:
    """In this order: zero rows ``zero`` (int32 [K]); set rows ``write_slots`` (int32 [W]) to
    ``write_rows`` (int32 [W, words]); step row ``slots[b]`` (int32 [B]) by the events
    ``tokens/gaps[starts[b] : starts[b] + lengths[b]]`` (starts int64 [B], lengths int32 [B],
    each at most the runner's largest length bucket) of the int32 staging buffers [E]; copy rows
    ``read`` (int32 [R]) out. The runner is the one thread that touches the rows, so the copy is
    exactly the state after this plan, before any later plan."""

    zero: np.ndarray
    write_slots: np.ndarray
    write_rows: np.ndarray
    slots: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    tokens: np.ndarray
    gaps: np.ndarray
    read: np.ndarray


@dataclass(frozen=True, slots=True)
class StepResult:
    """One step's outputs for its B rows: probs float32 [B, C]; ready bool [B] (False: no
    complete final-rate window yet, the probabilities mean nothing); order int32 [B, C] (classes
    by decreasing probability, ties by class index: the top-k of every k); started (perf_counter
    at the start of the step) and seconds (its duration); rows int32 [R, words]: the rows the plan
    asked to ``read``, after the step."""

    probs: np.ndarray
    ready: np.ndarray
    order: np.ndarray
    started: float
    seconds: float
    rows: np.ndarray
