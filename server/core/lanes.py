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

    __slots__ = ("session", "slot", "queue", "inflight", "offset", "builder", "ready", "failed")

    def __init__(self, session: Session):
        self.session = session
        self.slot = session.slot
        self.queue: deque[Item] = deque()  # not yet wholly planned, in order
        self.inflight: deque[Item] = deque()  # planned (one entry per chunk or zeroing), in order
        self.offset = 0  # events of queue[0] already planned
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


class PlanBuilder:
    """The next step plan while it is gathered (lists; arrays once the step thread takes it).
    The event loop appends and the step thread takes it, both under the step thread's lock."""

    __slots__ = ("zero", "slots", "starts", "lengths", "rows", "zeros", "writes", "reads",
                 "published", "taken", "oldest")

    def __init__(self) -> None:
        self.zero: list[int] = []
        self.slots: list[int] = []
        self.starts: list[int] = []
        self.lengths: list[int] = []
        self.rows: list[tuple[Lane, Packet, bool, bool]] = []  # (lane, packet, first, last chunk)
        self.zeros: list[tuple[Lane, Reset]] = []
        self.writes: list[tuple[Lane, Restore]] = []
        self.reads: list[Hashable] = []  # lanes whose rows are copied out after the step (snapshots)
        self.published = False  # offered to the step thread
        self.taken = False  # the step thread has it: no more rows
        self.oldest = float("inf")  # earliest arrival among its packets

    @property
    def empty(self) -> bool:
        return not (self.slots or self.zero or self.writes or self.reads)

    def plan(self, staging: StagingBuffer, words: int) -> StepPlan:
        write_rows = (np.stack([item.row for _, item in self.writes]).astype(np.int32, copy=False)
                      if self.writes else np.zeros((0, words), np.int32))
        return StepPlan(np.array(self.zero, np.int32),
                        np.array([lane.slot for lane, _ in self.writes], np.int32), write_rows,
                        np.array(self.slots, np.int32), np.array(self.starts, np.int64),
                        np.array(self.lengths, np.int32), staging.tokens, staging.gaps,
                        np.array([lane.slot for lane in self.reads if isinstance(lane, Lane)], np.int32))

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
