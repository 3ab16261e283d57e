"""A session's input filters as the core keeps them: one bank per (filters, source sensor), and
their state in snapshots (no JAX, no wire; the filters are ``models/filters.py``, the packet pass
``server/live/filtering.py``).

A snapshot holds the state after the events its row holds (the ledger pairs them), so a restored
session filters what comes next exactly as the session it continues; ``removed_total`` counts
what the filters removed among the events sent, which a snapshot's coverage (``durable``)
includes with the kept and the cropped ones.
"""

from __future__ import annotations

import functools
from typing import Any

from evssm.models.events import SensorSpec
from evssm.models.filters import FilterBank, FilterError, FilterSpec, FilterState


def parse_filters(value: Any, source: SensorSpec) -> FilterBank | None:
    """The bank a ``filters`` declaration asks for over the ``source`` sensor (None: absent,
    null, or every filter off). Raises :class:`FilterError` naming the field at fault."""
    if value is None:
        return None
    spec = FilterSpec.from_dict(value)
    return bank_for(spec, source) if spec.active else None


@functools.lru_cache(maxsize=256)
def bank_for(spec: FilterSpec, source: SensorSpec) -> FilterBank:
    """One bank per (spec, sensor): a bank holds no per-stream state, so sessions share it."""
    return FilterBank(spec, source)


def snapshot_of(bank: FilterBank | None, state: FilterState | None) -> dict[str, Any] | None:
    """A session's filters for its snapshot (msgpack-ready; None: no filters). ``state`` None:
    nothing stepped since the stream started (the fresh state)."""
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
    """Events a stream's filters removed so far (0 for none, or a fresh stream)."""
    return 0 if state is None else state.removed.total
