"""Input filters, served: the ``filters`` field of ``open`` and ``/v1/classify`` over a stream's
events, before any geometry adapter and before the model (no JAX, no wire).

The filters themselves (what each keeps, their state, the native pass) are
``models/filters.py``; this module binds them to a stream:

- the bank addresses the *source's* sensor (the one declared in ``open`` or a classify stream,
  else the model's): dead time and background activity are properties of physical pixels;
- a packet is filtered on a copy of the session's state (:func:`filter_packet` never touches the
  state it is given), so a packet refused later (by the crop, the model's ingest, a session taken
  away while it waited for room) leaves the session's filters as they were: the caller commits
  ``Filtered.state`` once it accepts the packet;
- a classify stream is filtered from a fresh state, the same function as a session's first packet,
  so a stream cut anywhere is filtered as the whole (the streaming invariant holds with filters);
- a snapshot keeps the spec and the state after the packets its row holds
  (:func:`snapshot_of`, :func:`restore_from`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from evssm.models.events import SensorSpec, time_gaps, tokenize
from evssm.models.filters import LAST_T, NEVER, FilterBank, FilterCounts, FilterError, FilterSpec, FilterState


def parse_filters(value: Any, source: SensorSpec) -> FilterBank | None:
    """The bank a ``filters`` field declares over the ``source`` sensor (None: absent, null, or
    every filter off). Raises :class:`FilterError` naming the field at fault."""
    if value is None:
        return None
    spec = FilterSpec.from_dict(value)
    return bank_for(spec, source) if spec.active else None


@functools.lru_cache(maxsize=256)
def bank_for(spec: FilterSpec, source: SensorSpec) -> FilterBank:
    """One bank per (spec, sensor): a bank holds no per-stream state, so sessions share it."""
    return FilterBank(spec, source)


def spec_of(bank: FilterBank | None) -> dict[str, int] | None:
    """What ``opened`` echoes (and a resume must repeat): the active filters' parameters."""
    return None if bank is None else bank.spec.to_dict()


@dataclass(frozen=True, slots=True)
class Filtered:
    """One packet through a stream's filters: ``keep`` bool [N] (None: every event kept), the
    events each filter removed, and the state after the packet (a new object)."""

    keep: np.ndarray | None
    counts: FilterCounts
    state: FilterState


def filter_packet(bank: FilterBank, state: FilterState, last_t: int | None, t: np.ndarray,
                  x: np.ndarray, y: np.ndarray | None, p: np.ndarray | None) -> Filtered:
    """Filter one packet of source events (``t`` int64/uint64 [N], ``x``/``y``/``p`` [N]) after
    ``state``; ``last_t``: the stream's last accepted (kept) timestamp.

    Addresses are checked against the source sensor and times against the last event the filters
    saw (kept or not: the stream's contract covers every event sent), raising ``EventError`` with
    the codes the model's ingest uses (``address_out_of_range``, ``timestamps_decreasing``);
    times beyond int64 raise :class:`FilterError`. Every check the ingest makes of the packet is
    made here first, so a packet the filters empty is as valid as one they do not touch.
    ``state`` is left as it is; cost: one copy of it (see ``FilterState.nbytes``) and the native pass.
    """
    if t.dtype == np.uint64 and t.size and t.max() > np.iinfo(np.int64).max:
        raise FilterError("records: t beyond int64")  # what the ingest says, before any filter
    tokens = tokenize(bank_sensor(bank), x, y, p)
    seen = int(state.scalars[LAST_T])
    time_gaps(t, last_t if seen == NEVER else seen)  # the check only (a few ns/event)
    after = state.copy()
    keep, counts = bank.apply(after, np.asarray(t).astype(np.int64, copy=False), tokens)
    return Filtered(None if counts.total == 0 else keep, counts, after)


def bank_sensor(bank: FilterBank) -> SensorSpec:
    """The sensor a bank's grid addresses (its tokens are that sensor's)."""
    grid = bank.grid
    return SensorSpec.one_d(grid.width) if grid.planes == 1 else SensorSpec.two_d(grid.width, grid.height)


# --- snapshots -----------------------------------------------------------------------------------
def snapshot_of(bank: FilterBank | None, state: FilterState | None) -> dict[str, Any] | None:
    """A session's filters for its snapshot (msgpack-ready; None: no filters). ``state`` None:
    no packet stepped since the stream started (the fresh state)."""
    if bank is None:
        return None
    return {"spec": bank.spec.to_dict(), "state": (state or bank.new_state()).to_dict()}


def restore_from(d: Any, source: SensorSpec) -> tuple[FilterBank, FilterState]:
    """The bank and state :func:`snapshot_of` kept, over ``source``; raises :class:`FilterError`
    for a record that does not fit."""
    if not isinstance(d, dict) or set(d) != {"spec", "state"}:
        raise FilterError("filters snapshot: expected the fields spec and state")
    bank = parse_filters(d["spec"], source)
    if bank is None:
        raise FilterError("filters snapshot: no filter is on")
    return bank, bank.restore(d["state"])


def removed_total(state: FilterState | None) -> int:
    """Events a stream's filters removed so far (0 for none or a fresh stream)."""
    return 0 if state is None else state.removed.total
