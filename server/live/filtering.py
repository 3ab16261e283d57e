"""Input filters, served: the ``filters`` field of ``open`` and ``/v1/classify`` over a stream's
events, before any geometry adapter and before the model (no JAX, no wire).

The filters themselves (what each keeps, their state, the native pass) are
``models/filters.py``; the bank per declaration and the state in snapshots are
``server/core/filter_state.py``. This module runs one packet through a stream's filters:

- the bank addresses the *source's* sensor (the one declared in ``open`` or a classify stream,
  else the model's): dead time and background activity are properties of physical pixels;
- every check the model's ingest makes of a packet is made before the filters run, so a packet
  the filters empty is as valid as one they do not touch, and a refused packet never reaches them;
- the pass changes the state in place (a copy of a 1280 x 720 camera's tables per packet would
  cost more than the events it saves) and returns an :class:`Undo` of what it changed, O(events):
  a packet refused after the filters ran is reverted with it;
- a classify stream is filtered from a fresh state by the same function as a session's packets,
  so a stream cut anywhere is filtered as the whole (the streaming invariant holds with filters).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evssm.models.events import SensorSpec, time_gaps, tokenize
from evssm.models.filters import LAST_T, NEVER, FilterBank, FilterCounts, FilterError, FilterState

from ..core.filter_state import parse_filters

__all__ = ["Filtered", "Undo", "filter_packet", "parse_filters", "spec_of"]


def spec_of(bank: FilterBank | None) -> dict[str, int] | None:
    """What ``opened`` echoes (and a resume must repeat): the active filters' parameters."""
    return None if bank is None else bank.spec.to_dict()


@dataclass(frozen=True, slots=True)
class Undo:
    """What one packet's pass changed in a :class:`FilterState`: the previous times of the
    pixels it touched (``pixels`` int64 [N], repeats allowed: each repeat holds the same old
    value), its scalars and running totals."""

    pixels: np.ndarray
    refractory: np.ndarray | None
    denoise: np.ndarray | None
    scalars: np.ndarray
    removed: FilterCounts

    @classmethod
    def of(cls, state: FilterState, pixels: np.ndarray) -> Undo:
        return cls(pixels, None if state.refractory is None else state.refractory[pixels],
                   None if state.denoise is None else state.denoise[pixels], state.scalars.copy(),
                   state.removed)

    def revert(self, state: FilterState) -> None:
        """Put ``state`` back as it was before the packet."""
        if self.refractory is not None and state.refractory is not None:
            state.refractory[self.pixels] = self.refractory
        if self.denoise is not None and state.denoise is not None:
            state.denoise[self.pixels] = self.denoise
        state.scalars[:] = self.scalars
        state.removed = self.removed


@dataclass(frozen=True, slots=True)
class Filtered:
    """One packet through a stream's filters: ``keep`` bool [N] (None: every event kept), the
    events each filter removed, and how to undo the pass."""

    keep: np.ndarray | None
    counts: FilterCounts
    undo: Undo


def filter_packet(bank: FilterBank, state: FilterState, last_t: int | None, t: np.ndarray,
                  x: np.ndarray, y: np.ndarray | None, p: np.ndarray | None) -> Filtered:
    """Filter one packet of source events (``t`` int64/uint64 [N], ``x``/``y``/``p`` [N]) after
    ``state``, which advances in place; ``last_t``: the stream's last accepted (kept) timestamp.

    Addresses are checked against the source sensor and times against the last event the filters
    saw (kept or not: the stream's contract covers every event sent), raising ``EventError`` with
    the codes the model's ingest uses (``address_out_of_range``, ``timestamps_decreasing``);
    times beyond int64 raise :class:`FilterError`. A refused packet leaves ``state`` as it was.
    Cost: the native pass, one tokenisation and an O(N) undo record.
    """
    if t.dtype == np.uint64 and t.size and t.max() > np.iinfo(np.int64).max:
        raise FilterError("records: t beyond int64")  # what the ingest says, before any filter
    tokens = tokenize(bank_sensor(bank), x, y, p)
    seen = int(state.scalars[LAST_T])
    time_gaps(t, last_t if seen == NEVER else seen)  # the check only (a few ns/event)
    undo = Undo.of(state, tokens % np.int32(bank.grid.pixels))
    keep, counts = bank.apply(state, np.asarray(t).astype(np.int64, copy=False), tokens)
    return Filtered(None if counts.total == 0 else keep, counts, undo)


def bank_sensor(bank: FilterBank) -> SensorSpec:
    """The sensor a bank's grid addresses (its tokens are that sensor's)."""
    grid = bank.grid
    return SensorSpec.one_d(grid.width) if grid.planes == 1 else SensorSpec.two_d(grid.width, grid.height)
