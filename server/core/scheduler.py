"""The batching scheduler: many sessions' packets, one step, pipelined (no JAX, no wire).

One scheduler per model. It keeps each session's work queue (a *lane*) and builds *step plans*:
plain data (:class:`~evssm.server.core.plan.StepPlan`) naming the state rows to zero and, for each
session in the batch, its slot and the offset and length of its next chunk in the model's staging
buffer (at most the largest length bucket). A step reads as one function (:meth:`Scheduler.step`,
as vLLM's ``EngineCore.step``): take the plan gathered, run it on the device, update the lanes
from its result into plain :class:`~.outputs.StepOutputs`, hand those to the API layer's sink,
gather the next plan. The run happens on a step thread and the rest on the event loop, so the
next plan is gathered while a step runs and the step thread takes it the moment the step ends:
steps run back to back under load. A plan holds at most the largest batch bucket of rows; a
session's next chunk may already be in the next plan while its current one runs (plans run in
order, so its state is advanced in order).

A plan holds one chunk per session, unless the runner *coalesces* (the native step): then the
packets a session has queued join its row in the same plan, each chunk an entry of its own with
the same slot, and the step reads out after each (the same arithmetic as one step per packet).
A live camera that sends faster than one step per packet then costs one step and one hand-off
per plan, not per packet. Only a session of one row whose head is a packet joins again (a reset
or a restore acts at the start of a plan, so it waits for the next one); the others still take
turns, since a lane that joined goes to the back of the line. The trade: a session with a
backlog may fill a plan alone, so a session whose packet comes after the plan filled waits for
one such step (at most the largest batch bucket of full-length rows, the bound any plan had).

When the step thread is idle a plan goes at once, except that it may wait up to ``batch_wait_s``
(from its oldest packet) for company while other attached sessions could still send; a lone
session never waits. After each step the scheduler updates its per-slot arrays (probabilities,
readiness, class order) for the whole batch at once and returns the finished packets with them
as arrays (this module knows neither frames nor labels). Resets are zeroings at the start of a
plan; empty packets and closes need no device work and are answered once everything before them
is.

A session may hold several rows (a sliding window's lanes, ``Packet.lanes``): its chunk of a
packet is then one row per lane, all in the same plan (the lanes of a packet that do not fit a
plan wait for the next), a restarted lane zeroed first; the packet is answered from the row of
its chosen lane once the last chunk is stepped (``lanes.chunk``).

Sessions are served first come, first served. The scheduler is the only code that steps, zeroes
or frees a slot, and frees it only when nothing of the session is queued or in a plan.

**Snapshots** (with ``--state-dir``/``--state-store``). A plan may also name rows to *write* (a
session restored from a snapshot: its ``Restore`` item, after the plan's zeroings, before its
step) and rows to *read* after its step; the bookkeeping of what each row holds and what its
snapshots cover is the :class:`~.ledger.SnapshotLedger`, fed each finished plan.

Longer than 400 lines for a reason: planning, the update after a step and the failure path all
keep the same invariants of a lane (its queue, the chunks in flight, the offset into its head
packet, its slot's dirtiness); in one class they are read and checked together.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Protocol

import numpy as np

from evssm.models.wire import class_order

from ..metrics import ModelMetrics
from .lanes import Handoff, Lane, PlanBuilder, answer_slot, chunk, plannable, span
from .ledger import READ_CHUNK, SnapshotLedger, Snapshots
from .outputs import Answered, Ended, EndReason, OutputSink, StepOutputs
from .plan import StepPlan, StepResult
from .sessions import Captured, Close, Item, Packet, Reset, Restore, Session, SessionStatus, SessionTable, SlotError
from .staging import StagingBuffer

log = logging.getLogger("evssm.server.scheduler")


class StepRunner(Protocol):
    """What the scheduler needs of a model runner (``runner.ModelRunner``)."""

    name: str
    num_classes: int
    num_slots: int
    max_batch: int  # largest batch bucket
    max_length: int  # largest length bucket
    words: int  # int32 words of one state row
    coalesces: bool  # one session's packets may share a step (repeated slots, a readout each)

    def run(self, plan: StepPlan) -> StepResult:
        """Zero ``plan.zero``, write, step ``plan.slots`` by their rows, read (see ``plan.py``)."""
        ...

    def recover(self) -> bool:
        """After a failed device call: re-create the pool if the call consumed it (True)."""
        ...

    def prime(self) -> None:
        """A step is coming soon: get ready (wake helper threads); any thread."""
        ...

    def park(self) -> None:
        """No step follows at once: stop getting ready (let helper threads sleep); step thread."""
        ...


class Scheduler:
    """Batches one model's sessions' work into pipelined steps (see module docstring)."""

    def __init__(self, runner: StepRunner, table: SessionTable, staging: StagingBuffer,
                 sink: OutputSink, metrics: ModelMetrics, batch_wait_s: float,
                 on_release: Callable[[Session], None], snapshots: Snapshots | None = None):
        self.runner = runner
        self.model = runner.name
        self.table = table
        self.pool = table.pools[runner.name]
        self.staging = staging
        self.sink = sink
        self.metrics = metrics
        self.batch_wait_s = batch_wait_s
        self.on_release = on_release
        slots, classes = runner.num_slots, runner.num_classes
        # The per-slot state of the answers: after each session's last stepped chunk.
        self.probs = np.zeros((slots, classes), np.float32)
        self.ready = np.zeros(slots, bool)
        self.order = np.tile(np.arange(classes, dtype=np.int32), (slots, 1))
        # What each row holds and its snapshots cover; None without snapshots (the frames then
        # carry no ``durable``).
        self.ledger = None if snapshots is None else SnapshotLedger(runner.name, slots, snapshots)
        self.lanes: dict[str, Lane] = {}  # session id -> lane, live sessions only
        self.queued_packets = 0  # accepted, not yet answered
        self.steps = 0
        self._ready: deque[Lane] = deque()  # lanes with work to plan, first come first served
        # Ready lanes that already have a chunk in (or do not fit) the plan being gathered: they
        # wait for the next one, at the head of the line, and are not scanned again until then.
        self._next: list[Lane] = []
        self._builder: PlanBuilder | None = None  # the plan being gathered
        self._busy = 0  # plans published and not yet reported back
        self._timer: asyncio.TimerHandle | None = None
        self._handoff: Handoff | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._released: list[Session] = []  # released while outputs were gathered: reported after them

    # --- one step --------------------------------------------------------------------------------
    def step(self) -> bool:
        """One step, top to bottom (the step thread's loop body; False once stopping):

        1. take the plan the event loop gathered while the last step ran (it waits for one);
        2. run it on the device (a failure is the step's result; the runner recovers its pool);
        3. on the event loop: update the lanes from the result into plain :class:`StepOutputs`,
           hand them to the sink (the API layer answers), gather the next plan.
        """
        assert self._handoff is not None and self._loop is not None
        plan = self._handoff.take()
        if plan is None:
            return False
        result, recovered = self._execute(plan)
        if self._handoff.next is None:  # no plan waits: nothing for the helpers to spin for
            self.runner.park()
        try:
            self._loop.call_soon_threadsafe(self._after_step, plan, result, recovered)
        except RuntimeError:  # the event loop is closed: the server is gone
            return False
        return True

    def _execute(self, plan: PlanBuilder) -> tuple[StepResult | BaseException, bool]:
        """Run ``plan`` (step thread): its result, or the exception and whether the runner
        re-created its pool (every session's row is lost then)."""
        try:
            return self.runner.run(plan.plan(self.staging, self.runner.words)), False
        except Exception as exc:
            try:
                return exc, self.runner.recover()
            except Exception:
                log.exception("runner %s: recovery failed", self.model)
                return exc, False

    def _after_step(self, plan: PlanBuilder, result: StepResult | BaseException, recovered: bool) -> None:
        """Step 3 (event loop)."""
        self._busy -= 1
        try:
            self._emit(self.update_from_result(plan, result, recovered))
        except Exception:  # never let one bad step stop the model's scheduler
            log.exception("scheduler %s: unexpected error after a step", self.model)
        self._fill()

    def _emit(self, outputs: StepOutputs) -> None:
        """Hand ``outputs`` to the sink, then report the sessions released meanwhile (after their
        last answers, which their summaries show)."""
        if outputs:
            self.sink.emit(outputs)
        released, self._released = self._released, []
        for session in released:
            self.on_release(session)

    def update_from_result(self, plan: PlanBuilder, result: StepResult | BaseException,
                           recovered: bool) -> StepOutputs:
        """What a finished plan did (event loop): the lanes advanced, the answers as arrays."""
        out = StepOutputs(self.model)
        if isinstance(result, BaseException):
            log.error("scheduler %s: step failed: %r", self.model, result)
            self._fail_plan(plan, result, recovered, out)
            return out
        self.steps += 1
        if self.ledger is not None:
            self.ledger.update(plan.changes())
        touched: list[Lane] = []
        for lane, reset in plan.zeros:
            lane.inflight.popleft()
            self.ready[list(lane.slots)] = False
            if reset.reply is not None and not lane.failed:
                out.reset.append((lane.session, reset))
            touched.append(lane)
        for lane, item in plan.writes:
            lane.inflight.popleft()
            self._restored(lane, item)
            touched.append(lane)
        rows = plan.rows
        if rows:
            # The per-slot answers: each slot's last entry (a coalesced lane has several).
            slots = np.asarray(plan.slots, np.int64)
            final = np.arange(len(slots))
            if plan.coalesced:
                by_slot = np.argsort(slots, kind="stable")
                final = by_slot[np.append(slots[by_slot][:-1] != slots[by_slot][1:], True)]
            self.probs[slots[final]] = result.probs[final]
            self.ready[slots[final]] = result.ready[final]
            self.order[slots[final]] = result.order[final]
        done: list[int] = []
        waits: list[float] = []
        for i, (lane, packet, first, last) in enumerate(rows):
            lane.inflight.popleft()
            if first:
                waits.append(result.started - packet.received)
            if last or (lane.failed and packet not in lane.inflight):
                self.staging.release(packet.region)  # no plan reads it any more
            if last and not lane.failed:
                done.append(i)
            touched.append(lane)
        self.metrics.step(result.seconds, len(plan.slots) - plan.coalesced, plan.coalesced,
                          np.asarray(waits, np.float64))
        if done:
            self.queued_packets -= len(done)
            # Copies of the answering rows as they are after this plan, then each packet's own
            # readout where its answering row was stepped by it (a coalesced lane's earlier
            # packets are not the row's last entry).
            at = np.fromiter((answer_slot(rows[i][0], rows[i][1]) for i in done), np.int64, len(done))
            entry = np.fromiter((plan.answer_at[i] for i in done), np.int64, len(done))
            probs, ready, order = self.probs[at], self.ready[at], self.order[at]
            own = entry >= 0
            probs[own], ready[own], order[own] = (result.probs[entry[own]], result.ready[entry[own]],
                                                  result.order[entry[own]])
            out.answered.append(Answered(
                [rows[i][0].session for i in done], [rows[i][1] for i in done], probs, ready, order,
                None if self.ledger is None else self.ledger.durable[at]))
        if plan.reads and self.ledger is not None:
            self.ledger.captured(plan.reads, result.rows, self.probs, self.ready, self._wanted,
                                 [len(lane.slots) if isinstance(lane, Lane) else 1 for lane in plan.reads])
        for lane in touched:
            if lane.failed:
                self._release_failed(lane)
            else:
                self._advance(lane, out)
        return out

    # --- called from the API layer (event loop) ------------------------------------------------
    def add(self, session: Session) -> None:
        lane = self.lanes[session.id] = Lane(session)
        dirty = any(self.pool.is_dirty(slot) for slot in lane.slots)
        if self.ledger is not None:
            self.ledger.add(lane, session, None, zero_first=dirty)
        if dirty:  # a reused row is zeroed before anything else
            lane.queue.append(Reset(reply=None))
            self._mark_ready(lane)
            self._fill()

    def restore(self, session: Session, item: Restore) -> None:
        """A session restored from a snapshot: its row is written before anything else. The
        snapshot it came from covers that state already."""
        if self.ledger is None:
            raise SlotError("a session restored without snapshots")
        lane = self.lanes[session.id] = Lane(session)
        self.ledger.add(lane, session, item, zero_first=False)
        lane.queue.append(item)
        self._mark_ready(lane)
        self._fill()

    def submit(self, session: Session, item: Item) -> None:
        """Queue ``item`` behind the session's earlier items; what needs no step (an empty
        packet, a close) is answered at once when nothing is before it."""
        lane = self.lanes.get(session.id)
        if lane is None or session.status is SessionStatus.RELEASED:
            raise SlotError(f"work submitted to released session {session.id}")
        if isinstance(item, Packet):
            self.queued_packets += 1
        if self.ledger is not None:
            self.ledger.accepted(lane, item)
        lane.queue.append(item)
        if len(lane.queue) == 1:
            out = StepOutputs(self.model)
            self._advance(lane, out)
            self._emit(out)
            self._fill()

    def expect(self) -> None:
        """A packet is arriving: when no step runs, have the runner get ready for one while
        the packet is read (a step already running keeps it ready)."""
        if not self._busy:
            self.runner.prime()

    def idle(self, session: Session) -> bool:
        """No work of ``session`` queued or in a plan."""
        lane = self.lanes.get(session.id)
        return lane is None or lane.idle

    def release_if_done(self, session: Session) -> bool:
        """Release a closing session once it has no work left. True if released; it is
        reported (``on_release``) with the outputs being gathered, or at once outside a step."""
        lane = self.lanes.get(session.id)
        if lane is None or session.open or not lane.idle or session.status is SessionStatus.RELEASED:
            return False
        self.table.release(session, idle=True)
        del self.lanes[session.id]
        if self.ledger is not None:
            self.ledger.remove(lane)
        self._released.append(session)
        return True

    def release_now(self, session: Session) -> bool:
        """:meth:`release_if_done` outside a step: reported at once."""
        released = self.release_if_done(session)
        self._emit(StepOutputs(self.model))
        return released

    # --- snapshots (event loop) ------------------------------------------------------------------
    def durable_of(self, session: Session) -> int | None:
        """What ``session``'s snapshots cover (None: no snapshots are kept)."""
        lane = self.lanes.get(session.id)
        if self.ledger is None or lane is None:
            return None
        return self.ledger.durable_of(lane)

    def request_snapshots(self, everything: bool) -> tuple[int, asyncio.Future[None]]:
        """Have the rows of the live sessions that changed since their last snapshot (every live
        session with ``everything``) read after the next plans. Returns how many, and a future
        done once each was read (and handed to the sink) or is gone."""
        if self.ledger is None:
            raise SlotError("snapshots requested without snapshots")
        candidates: dict[Hashable, Session] = {lane: lane.session for lane in self.lanes.values()
                                               if not lane.failed and lane.session.open}
        n, done = self.ledger.request(candidates, everything)
        if n:
            self._fill()
        return n, done

    def snapshot_written(self, item: Captured, covered: int) -> None:
        """The sink wrote ``item``'s snapshot: ``covered`` events sent (kept and cropped)."""
        lane = self.lanes.get(item.session.id)
        if lane is not None and self.ledger is not None:
            self.ledger.written(lane, item, covered)

    def _wanted(self, key: Hashable) -> bool:
        """A lane whose row is still worth a snapshot: live, healthy and open."""
        return isinstance(key, Lane) and not key.failed and key.session.open

    @property
    def pending(self) -> int:
        """Sessions with work queued or running."""
        return sum(1 for lane in self.lanes.values() if not lane.idle)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._handoff = Handoff()
        self._thread = threading.Thread(target=self._run_steps, name=f"evssm-step-{self.model}", daemon=True)
        self._thread.start()

    @property
    def thread_id(self) -> int | None:
        """The step thread's Linux thread id (for its CPU clock), None before it started."""
        return None if self._thread is None else self._thread.native_id

    def _run_steps(self) -> None:
        while self.step():
            pass

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._thread is not None and self._handoff is not None:
            self._handoff.stop()
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30.0)
            self._thread = None

    # --- planning (event loop) -------------------------------------------------------------------
    def _mark_ready(self, lane: Lane) -> None:
        if not lane.ready and not lane.failed:
            lane.ready = True
            self._ready.append(lane)

    def _advance(self, lane: Lane, out: StepOutputs) -> None:
        """Answer the heads that need no device work once everything before them is answered;
        line the lane up for planning if its head needs a step."""
        queue = lane.queue
        while queue and not lane.inflight:
            head = queue[0]
            if isinstance(head, Packet) and head.size == 0:
                queue.popleft()
                self.queued_packets -= 1
                if self.ledger is not None:
                    self.ledger.answered_empty(lane, head)
                at = [answer_slot(lane, head)]  # copies: the record must not change with later steps
                out.answered.append(Answered([lane.session], [head], self.probs[at], self.ready[at], self.order[at],
                                             None if self.ledger is None else self.ledger.durable[at]))
            elif isinstance(head, Close):
                queue.popleft()
                out.closed.append((lane.session, head))
            else:
                break
        if plannable(lane):
            self._mark_ready(lane)
        elif lane.idle:
            self.release_if_done(lane.session)

    def _fill(self) -> None:
        """Plan ready lanes into the plan being gathered; publish it when it should go."""
        handoff = self._handoff
        if handoff is None or not (self._ready or self._next or (self.ledger is not None and self.ledger.due)):
            return
        max_batch = self.runner.max_batch
        with handoff.lock:
            builder = self._builder
            if builder is None or builder.taken:
                builder = self._builder = PlanBuilder()
                self._ready.extendleft(reversed(self._next))  # they were first in line
                self._next = []
            while self._ready and len(builder.slots) < max_batch:
                lane = self._ready.popleft()
                if lane.failed or not plannable(lane):
                    lane.ready = False
                    continue
                # One chunk per session and plan (unless it joins, see module), its rows all
                # in it: else the next plan (each lane is scanned once per plan, however many
                # packets arrive while it gathers).
                joins = lane.builder is builder
                if (joins and not self._joins(lane)) or len(builder.slots) + len(lane.slots) > max_batch:
                    self._next.append(lane)  # still in line (``ready``)
                    continue
                builder.coalesced += joins
                lane.ready = False
                self._plan_lane(lane, builder)
            if self.ledger is not None and builder.read_rows < READ_CHUNK:
                builder.reads.extend(self.ledger.next_reads(READ_CHUNK - builder.read_rows))
            if not builder.empty and not builder.published:
                if self._should_publish(builder):
                    self._publish(builder)
                elif self._timer is None:
                    deadline = builder.oldest + self.batch_wait_s
                    delay = max(0.0, deadline - time.perf_counter())
                    self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _joins(self, lane: Lane) -> bool:
        """``lane``, already in the plan being gathered, may add its next chunk to it."""
        head = lane.queue[0]
        return self.runner.coalesces and len(lane.slots) == 1 and isinstance(head, Packet) and head.lanes is None

    def _plan_lane(self, lane: Lane, builder: PlanBuilder) -> None:
        """Put the lane's next zeroing or restore and/or chunk into ``builder``."""
        lane.builder = builder
        head: Item | None = lane.queue[0]
        if isinstance(head, (Reset, Restore)):
            lane.queue.popleft()
            lane.inflight.append(head)
            if isinstance(head, Reset):
                builder.zero.extend(lane.slots)
                builder.zeros.append((lane, head))
            else:  # written after the plan's zeroings, before its step
                builder.writes.append((lane, head))
            for slot in lane.slots:
                self.pool.zeroed(slot)  # everything planned after it runs after it
            head = lane.queue[0] if lane.queue else None
            if not (isinstance(head, Packet) and head.size > 0):
                # Nothing, an empty packet or a close: answered after it. Another reset: in a
                # later plan (a plan zeroes a row once).
                if plannable(lane):
                    self._mark_ready(lane)
                return
        assert isinstance(head, Packet)
        if any(self.pool.is_dirty(slot) for slot in lane.slots):  # zeroed first (sessions.py)
            raise SlotError(f"session {lane.session.id} would step a dirty slot of {lane.slots}")
        rows, end = chunk(lane, head, self.runner.max_length)
        answering = answer_slot(lane, head)
        answer_at = -1
        for slot, start, n, zero in rows:
            if slot == answering:
                answer_at = len(builder.slots)
            if zero and slot not in builder.zero:  # a restarted lane: zeroed before the step
                builder.zero.append(slot)
            builder.slots.append(slot)
            builder.starts.append(start)
            builder.lengths.append(n)
        first = lane.offset == 0
        lane.offset = end
        last = end >= span(head)
        builder.rows.append((lane, head, first, last))
        builder.answer_at.append(answer_at if last else -1)
        builder.oldest = min(builder.oldest, head.received)
        lane.inflight.append(head)
        if last:
            lane.queue.popleft()
            lane.offset = 0
        if plannable(lane):
            self._mark_ready(lane)  # its next chunk goes into a later plan

    def _should_publish(self, builder: PlanBuilder) -> bool:
        """Publish now unless the step thread is idle and company may come (see module)."""
        if self._busy or self.batch_wait_s <= 0 or len(builder.slots) >= self.runner.max_batch:
            return True
        if not builder.slots or time.perf_counter() >= builder.oldest + self.batch_wait_s:
            return True
        # Company can only come from attached sessions with nothing queued.
        return not any(lane.session.attachment is not None and lane.idle and lane.session.open
                       for lane in self.lanes.values())

    def _publish(self, builder: PlanBuilder) -> None:
        assert self._handoff is not None
        self._busy += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._handoff.offer(builder)

    def _on_timer(self) -> None:
        self._timer = None
        builder = self._builder
        if builder is not None and self._handoff is not None:
            with self._handoff.lock:
                if not builder.published and not builder.empty:
                    self._publish(builder)

    # --- after a step (event loop) ---------------------------------------------------------------
    def _restored(self, lane: Lane, item: Restore) -> None:
        """A restore is done: the per-slot answer is the snapshot's (on every lane of a window,
        so whichever answers next reads it)."""
        s = list(lane.slots)
        self.ready[s] = item.probs is not None
        if item.probs is not None:
            self.probs[s] = item.probs
            self.order[s] = class_order(item.probs)

    def _fail_plan(self, builder: PlanBuilder, exc: BaseException, recovered: bool, out: StepOutputs) -> None:
        """A step failed: the rows' states are unknown, so end these sessions (all of the model's
        sessions if the call consumed the pool). Rows it was to read are read after a later plan."""
        if self.ledger is not None:
            self.ledger.retry(builder.reads)
        stepped: dict[Lane, list[Item]] = {}  # each lane's items in this plan, in order
        for lane, _ in builder.zeros:
            stepped.setdefault(lane, []).append(lane.inflight.popleft())
        for lane, _ in builder.writes:
            stepped.setdefault(lane, []).append(lane.inflight.popleft())
        for lane, packet, _, _ in builder.rows:
            stepped.setdefault(lane, []).append(lane.inflight.popleft())
            if packet not in lane.inflight:  # no later plan reads it
                self.staging.release(packet.region)
        lanes = list(stepped) + (list(self.lanes.values()) if recovered else [])
        reason = f"engine failure, session ended: {type(exc).__name__}"
        for lane in dict.fromkeys(lanes):
            self._fail_lane(lane, reason, stepped.get(lane, []), out)
            self._release_failed(lane)

    def _fail_lane(self, lane: Lane, reason: str, stepped: list[Item], out: StepOutputs) -> None:
        """End the lane's session: every unanswered item of it (``stepped``: those of the failed
        plan) is reported with the :class:`Ended` record, and nothing more is planned for it."""
        if lane.failed:
            return
        lane.failed = True
        items = stepped + list(lane.inflight) + list(lane.queue)
        items = list(dict.fromkeys(items))  # a packet in flight in chunks is listed once
        for i, item in enumerate(lane.queue):
            # A head with chunks in a plan keeps its region until that plan is done.
            if isinstance(item, Packet) and not (i == 0 and lane.offset):
                self.staging.release(item.region)
        self.queued_packets -= sum(1 for item in items if isinstance(item, Packet))
        lane.queue.clear()
        lane.offset = 0
        self.table.end(lane.session)
        out.ended.append(Ended(lane.session, EndReason.FAILED, reason, tuple(items)))

    def _release_failed(self, lane: Lane) -> None:
        """A failed lane frees its slot once no plan holds a chunk of it."""
        if not lane.inflight and lane.session.id in self.lanes:
            self.release_if_done(lane.session)
