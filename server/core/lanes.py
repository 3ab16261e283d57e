"""A session's lane of work and the step plan being gathered (event loop and step thread; no
JAX, no wire): the data the scheduler (``scheduler.py``) plans with.

A :class:`Lane` is one session's work queue as the scheduler sees it; a :class:`PlanBuilder` the
next step plan while lanes are planned into it; the :class:`Handoff` the one-plan mailbox between
the event loop, which offers a gathered plan, and the step thread, which takes it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Hashable

import numpy as np

from .ledger import StepChanges
from .plan import StepPlan
from .sessions import Item, Packet, Reset, Restore, Session
from .staging import StagingBuffer


class Lane:
    """One session's work, as the scheduler sees it (event loop only). With snapshots the ledger
    keeps what its row holds (keyed by the lane)."""

    __slots__ = ("session", "slot", "slots", "queue", "inflight", "offset", "builder", "ready", "failed")

    def __init__(self, session: Session):
        self.session = session
        self.slot = session.slot
        self.slots = session.slots  # every row it steps (a sliding window's lanes), ``slot`` first
        self.queue: deque[Item] = deque()  # not yet wholly planned, in order
        self.inflight: deque[Item] = deque()  # planned (one entry per chunk or zeroing), in order
        self.offset = 0  # events of queue[0] already planned (its longest row's, see ``chunk``)
        self.builder: PlanBuilder | None = None  # the last plan it joined
        self.ready = False  # in the scheduler's ready line
        self.failed = False

    @property
    def idle(self) -> bool:
        return not self.queue and not self.inflight


def plannable(lane: Lane) -> bool:
    """The lane's head needs the device: a zeroing, a restore or a packet with events."""
    head = lane.queue[0] if lane.queue else None
    return isinstance(head, (Reset, Restore)) or (isinstance(head, Packet) and head.size > 0)


def span(packet: Packet) -> int:
    """Events of the packet's longest row: the chunks of a packet cover ``0 .. span``."""
    return packet.size if packet.lanes is None or not packet.size else max(packet.lanes.sizes)


def answer_slot(lane: Lane, packet: Packet) -> int:
    """The row whose state answers ``packet``."""
    return lane.slot if packet.lanes is None else lane.slots[packet.lanes.answer]


Row = tuple[int, int, int, bool]  # (slot, staging start, events, zero the slot first)


def chunk(lane: Lane, packet: Packet, max_length: int) -> tuple[list[Row], int]:
    """The rows of ``packet``'s next chunk from ``lane.offset`` and the offset after it.

    The rows are aligned at the packet's end: offset ``v`` of the longest row (``S`` events) is
    event ``n - S + v`` of the packet, and row ``j`` (``sizes[j]`` events) joins from
    ``S - sizes[j]`` on, zeroed first when it restarts. A chunk is at most ``max_length`` long and
    ends where a row with a zero-gap copy starts and one event later, so that event is stepped
    alone from its copy. All rows end in the packet's last chunk."""
    v = lane.offset
    rows = packet.lanes
    if rows is None:
        n = min(max_length, packet.size - v)
        return [(lane.slot, packet.start + v, n, False)], v + n
    longest = max(rows.sizes)
    base = packet.start + packet.size - longest  # the staging index of offset 0
    end = min(v + max_length, longest)
    for size, copy in zip(rows.sizes, rows.copies, strict=True):
        if copy >= 0:
            end = min([end] + [b for b in (longest - size, longest - size + 1) if b > v])
    out: list[Row] = []
    for slot, size, reset, copy in zip(lane.slots, rows.sizes, rows.resets, rows.copies, strict=True):
        lo = max(v, longest - size)
        if lo >= end:
            continue
        first = lo == longest - size
        if first and copy >= 0:  # end == lo + 1 here (the boundaries above)
            out.append((slot, copy, 1, reset))
        else:
            out.append((slot, base + lo, end - lo, first and reset))
    return out, end


class PlanBuilder:
    """The next step plan while it is gathered (lists; arrays once the step thread takes it).
    The event loop appends and the step thread takes it, both under the step thread's lock."""

    __slots__ = ("zero", "slots", "starts", "lengths", "rows", "answer_at", "coalesced", "zeros",
                 "writes", "reads", "published", "taken", "oldest")

    def __init__(self) -> None:
        self.zero: list[int] = []
        self.slots: list[int] = []
        self.starts: list[int] = []
        self.lengths: list[int] = []
        # One entry per chunk planned (its rows are among slots/starts/lengths); a lane has one
        # chunk per plan unless the runner coalesces, see ``Scheduler``.
        self.rows: list[tuple[Lane, Packet, bool, bool]] = []  # (lane, packet, first, last chunk)
        # Per entry of ``rows``: the index into ``slots`` of the row that answers its packet (the
        # answering lane's row of the chunk), -1 when the chunk is not the packet's last.
        self.answer_at: list[int] = []
        # Chunks that joined a lane already in the plan (one row with a readout after each).
        self.coalesced = 0
        self.zeros: list[tuple[Lane, Reset]] = []
        self.writes: list[tuple[Lane, Restore]] = []
        self.reads: list[Hashable] = []  # lanes whose rows are copied out after the step (snapshots)
        self.published = False  # offered to the step thread
        self.taken = False  # the step thread has it: no more rows
        self.oldest = float("inf")  # earliest arrival among its packets

    @property
    def read_rows(self) -> int:
        """Rows its snapshot reads copy (every lane of a windowed session)."""
        return sum(len(lane.slots) if isinstance(lane, Lane) else 1 for lane in self.reads)

    @property
    def empty(self) -> bool:
        return not (self.slots or self.zero or self.writes or self.reads)

    def plan(self, staging: StagingBuffer, words: int) -> StepPlan:
        # A restore writes, and a snapshot read copies, every row of its lane (a window's L).
        write_rows = (np.concatenate([np.reshape(item.row, (-1, words)) for _, item in self.writes])
                      .astype(np.int32, copy=False) if self.writes else np.zeros((0, words), np.int32))
        return StepPlan(np.array(self.zero, np.int32),
                        np.array([s for lane, _ in self.writes for s in lane.slots], np.int32), write_rows,
                        np.array(self.slots, np.int32), np.array(self.starts, np.int64),
                        np.array(self.lengths, np.int32), staging.tokens, staging.gaps,
                        np.array([s for lane in self.reads if isinstance(lane, Lane) for s in lane.slots],
                                 np.int32))

    def changes(self) -> StepChanges:
        return StepChanges([lane for lane, _ in self.zeros], [(lane, item) for lane, item in self.writes],
                           [(lane, packet, last) for lane, packet, _, last in self.rows])


class Handoff:
    """The one-plan mailbox between the event loop (which offers) and the step thread (which
    takes), under one lock: the plan gathered while a step runs is taken the moment it ends."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.next: PlanBuilder | None = None  # published, not yet taken
        self.stopping = False

    def offer(self, builder: PlanBuilder) -> None:
        """Publish ``builder`` (call with :attr:`lock` held)."""
        builder.published = True
        self.next = builder
        self.lock.notify()

    def take(self) -> PlanBuilder | None:
        """The next published plan, waiting for one; None once stopping."""
        with self.lock:
            while self.next is None and not self.stopping:
                self.lock.wait()
            builder, self.next = self.next, None
            if self.stopping or builder is None:
                return None
            builder.taken = True
            return builder

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
