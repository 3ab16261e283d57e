"""The snapshot ledger: what each session's row holds after the reported steps, and what its
snapshots cover (no JAX, no wire).

With snapshots (``--state-dir``/``--state-store``; ``server/core/durability.py``) a scheduler
keeps one :class:`SnapshotLedger`. The step thread is the one thread that touches the rows and
runs plans in order, so a row read after plan k is exactly the state after plan k; the ledger
is fed each reported plan (:meth:`SnapshotLedger.update`), so its *done* state of a lane (events,
last timestamp, cropped count, filter state and window lane state of the last finished packet,
resets so far, changes so far) is the state after plan k too, and it pairs each row read with it
(:class:`~.sessions.Captured`) for the snapshot sink, which writes them on its own thread. A
windowed session's rows (one per lane) are read in the same plan, so they hold one state. A row
read while its session is between two chunks of a packet has no event count and is read again
after a later plan. ``durable`` per slot: events sent that the last finished write of the
session's current stream covers; it goes out with each result.
"""

from __future__ import annotations

import asyncio
import functools
import operator
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .filter_state import removed_total
from .sessions import Captured, Item, Packet, Reset, Restore, Session

READ_CHUNK = 512  # rows one plan reads for snapshots at most: bounds the pause between two steps


class Snapshots(Protocol):
    """Where rows read for snapshots go (``durability.Durability``). Called on the event loop."""

    def captured(self, model: str, items: list[Captured], rows: list[np.ndarray]) -> None:
        """``rows[i]`` int32 [L_i, words]: the rows (a window's lanes, in slot order) whose state
        ``items[i]`` describes."""
        ...


@dataclass(eq=False, slots=True)
class _Done:
    """One session's done state and its snapshot bookkeeping."""

    session: Session
    slot: int  # its first row (the one of a session without a window)
    slots: list[int]  # every row it holds
    settled: bool  # the row is exactly the state after ``events`` (no packet half done, no
    # zeroing or restore pending)
    events: int = 0  # events of the current stream the finished packets hold
    last_t: int | None = None
    cropped: int = 0
    window: Any = None  # the lane state of a windowed session (None: none, or a fresh stream)
    answer: int = 0  # the lane (index into ``slots``) that answers at the done state
    epoch: int = 0  # resets done
    version: int = 0  # changes of the row done: packets, resets, a restore
    snap_version: int = -1  # the version the last finished snapshot write covered
    snap_active: float = 0.0  # the session's last_active that write saw
    reading: bool = False  # due for a snapshot read, or in a plan's reads
    # With input filters: the packets and resets accepted after the done state, in order (their
    # undo records take the live filter state back to it), and whether the zeroing of a reused
    # row, which no client asked for, is still to come.
    log: deque[Item] = field(default_factory=deque)
    zero_pending: bool = False


@dataclass(frozen=True, slots=True)
class StepChanges:
    """What a finished plan did to its rows, in plan order: the lanes (by key) it zeroed, the
    restores it wrote, and each packet chunk it stepped with whether it was the packet's last."""

    zeroed: list[Hashable]
    restored: list[tuple[Hashable, Restore]]
    stepped: list[tuple[Hashable, Packet, bool]]


class SnapshotLedger:
    """The snapshot bookkeeping of one model's sessions, keyed by the scheduler's lane."""

    def __init__(self, model: str, num_slots: int, sink: Snapshots):
        self.model = model
        self.sink = sink
        self.durable = np.zeros(num_slots, np.int64)
        self._done: dict[Hashable, _Done] = {}
        self._due: dict[Hashable, None] = {}  # lanes to read, in request order
        self._waiters: list[tuple[set[Hashable], asyncio.Future[None]]] = []

    # --- a lane's life ----------------------------------------------------------------------------
    def add(self, key: Hashable, session: Session, restore: Restore | None, zero_first: bool) -> None:
        """A new lane: a fresh session (its row is zeroed first when ``zero_first``) or one restored
        from a snapshot, which that snapshot already covers."""
        done = self._done[key] = _Done(session, session.slot, list(session.slots),
                                       settled=restore is None and not zero_first, zero_pending=zero_first)
        if restore is None:
            self.durable[done.slots] = 0
        else:
            self.durable[done.slots] = restore.events + restore.cropped + removed_total(restore.filters)
            done.window = restore.window  # every slot holds the snapshot's answer (answer 0 will do)
            done.snap_version = 1  # the version once the Restore is done
            done.snap_active = session.last_active

    def remove(self, key: Hashable) -> None:
        """The lane's session was released: a plan's read of it is dropped when the plan is done."""
        done = self._done.pop(key, None)
        if done is not None and done.reading:
            self._due.pop(key, None)
            self._read_done(key)

    def accepted(self, key: Hashable, item: Item) -> None:
        """The session accepted ``item``: with filters, its packets and resets are logged until
        done (stepped, zeroed, or answered without a step)."""
        done = self._done.get(key)
        if done is not None and done.session.filters is not None and isinstance(item, (Packet, Reset)):
            done.log.append(item)

    def answered_empty(self, key: Hashable, packet: Packet) -> None:
        """An empty packet (its filters removed every event) was answered after everything before
        it: its row needs no step, its filter state counts as done."""
        done = self._done.get(key)
        if done is not None and done.log and done.log[0] is packet:  # all before it are done
            done.log.popleft()

    def durable_of(self, key: Hashable) -> int | None:
        done = self._done.get(key)
        return None if done is None else int(self.durable[done.slot])

    # --- fed by each finished plan ------------------------------------------------------------------
    def update(self, changes: StepChanges) -> None:
        """A plan ran: advance the done state of the lanes it touched."""
        for key in changes.zeroed:
            done = self._done[key]
            done.settled, done.events, done.last_t, done.cropped = True, 0, None, 0
            done.window, done.answer = None, 0
            if done.zero_pending:
                done.zero_pending = False
            else:
                _pop_through(done.log, lambda item: isinstance(item, Reset))
            done.epoch += 1
            done.version += 1
            self.durable[done.slots] = 0  # a new stream: no snapshot covers any of it yet
        for key, item in changes.restored:
            done = self._done[key]
            done.settled, done.events, done.last_t, done.cropped = True, item.events, item.last_t, item.cropped
            done.window, done.answer = item.window, 0
            done.version += 1
        for key, packet, last in changes.stepped:
            done = self._done[key]
            done.settled = last
            if last:
                done.events, done.last_t = packet.events_after, packet.last_t
                done.cropped = packet.cropped_after or 0
                # The window's lane state as of this packet, as the rows are (the live one may
                # be ahead by packets accepted since).
                done.window = packet.window_after
                done.answer = 0 if packet.lanes is None else packet.lanes.answer
                _pop_through(done.log, functools.partial(operator.is_, packet))
                done.version += 1

    def captured(self, reads: list[Hashable], rows: np.ndarray, probs: np.ndarray, ready: np.ndarray,
                 live: Callable[[Hashable], bool], sizes: list[int] | None = None) -> None:
        """After a plan: pair each lane's read rows (``rows`` int32 [sum(sizes), words], ``sizes[i]``
        rows for ``reads[i]``, one each when None) with its done state and the answering slot's
        answer (``probs`` float32 [slots, C], ``ready`` bool [slots]); ``live``: the lanes still
        wanted (a failed or closing one is dropped, a released one is gone)."""
        items: list[Captured] = []
        keep: list[np.ndarray] = []
        ends = np.cumsum([1] * len(reads) if sizes is None else sizes)
        for i, key in enumerate(reads):
            done = self._done.get(key)
            if done is None:
                continue  # released meanwhile (its waiters were told then)
            if not live(key):
                self._read_done(key)
                continue
            filters = _filters_at(done) if done.settled else False
            if filters is False:  # not settled, or a reset pending: read again after a later plan
                self._due[key] = None
                continue
            s = done.slots[done.answer]
            items.append(Captured(done.session, done.version, done.epoch, done.session.last_active, done.events,
                                  done.last_t, done.cropped, probs[s].copy() if ready[s] else None, filters,
                                  done.window))
            keep.append(rows[ends[i] - len(done.slots):ends[i]].copy())
            self._read_done(key)
        if items:
            self.sink.captured(self.model, items, keep)

    def retry(self, reads: Iterable[Hashable]) -> None:
        """A plan failed: the rows it was to read are read after a later plan."""
        for key in reads:
            if key in self._done:
                self._due[key] = None

    # --- reads --------------------------------------------------------------------------------------
    @property
    def due(self) -> bool:
        return bool(self._due)

    def next_reads(self, limit: int) -> list[Hashable]:
        """Lanes to read after the plan being gathered, oldest request first: up to ``limit`` rows
        (a window's lanes count each; one lane at least, whatever its rows)."""
        out: list[Hashable] = []
        rows = 0
        while self._due:
            key = next(iter(self._due))
            size = len(self._done[key].slots)
            if rows + size > limit and out:
                break
            del self._due[key]
            out.append(key)
            rows += size
        return out

    def request(self, candidates: dict[Hashable, Session], everything: bool) -> tuple[int, asyncio.Future[None]]:
        """Have the rows of ``candidates`` (the live, healthy lanes) that changed since their last
        snapshot (all with ``everything``) read after the next plans. Returns how many, and a
        future done once each was read (and handed to the sink) or is gone."""
        picked = {key for key, session in candidates.items()
                  if everything or self._done[key].version != self._done[key].snap_version
                  or session.last_active > self._done[key].snap_active}
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not picked:
            done.set_result(None)
            return 0, done
        for key in picked:
            state = self._done[key]
            if not state.reading:
                state.reading = True
                self._due[key] = None
        self._waiters.append((picked, done))
        return len(picked), done

    def written(self, key: Hashable, item: Captured, covered: int) -> None:
        """The sink wrote ``item``'s snapshot: ``covered`` events sent (kept and cropped)."""
        done = self._done.get(key)
        if done is None or done.session is not item.session:
            return
        done.snap_version = max(done.snap_version, item.version)
        done.snap_active = max(done.snap_active, item.active)
        if item.epoch == done.epoch:  # a write from before a reset covers nothing of this stream
            self.durable[done.slots] = np.maximum(self.durable[done.slots], covered)

    def _read_done(self, key: Hashable) -> None:
        done = self._done.get(key)
        if done is not None:
            done.reading = False
        for waiting, fut in self._waiters:
            waiting.discard(key)
            if not waiting and not fut.done():
                fut.set_result(None)
        self._waiters = [(w, f) for w, f in self._waiters if w]


def _pop_through(log: deque[Item], last: Callable[[Item], bool]) -> None:
    """Drop the logged items up to the first one ``last`` picks (with it): they are done."""
    while log:
        if last(log.popleft()):
            return


def _filters_at(done: _Done) -> Any:
    """The session's filter state at its done state: the live one with every packet accepted
    since taken out, newest first (a copy; None: no filters). False while a reset is pending: the
    live state is the new stream's, so the row is read again after a later plan."""
    session = done.session
    if session.filters is None:
        return None
    if any(isinstance(item, Reset) for item in done.log):
        return False
    state = session.filter_state.copy()
    for item in reversed(done.log):
        if isinstance(item, Packet) and item.filters_undo is not None:
            item.filters_undo.revert(state)
    return state

