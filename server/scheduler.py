"""The batching scheduler: many sessions' packets, one step, pipelined (no JAX here).

One scheduler per model. It keeps each session's work queue (a *lane*) and builds *step plans*:
plain data (:class:`~evssm.server.plan.StepPlan`) naming the state rows to zero and, for each
session in the batch, its slot and the offset and length of its next chunk in the model's staging
buffer (at most the largest length bucket). A step thread runs the plans one after another; the
next plan is gathered while a step runs, and the step thread takes it the moment the step ends,
so steps run back to back under load. A plan holds at most one chunk per session and at most
the largest batch bucket of sessions; a session's next chunk may already be in the next plan
while its current one runs (plans run in order, so its state is advanced in order).

When the step thread is idle a plan goes at once, except that it may wait up to ``batch_wait_s``
(from its oldest packet) for company while other attached sessions could still send; a lone
session never waits. After each step the scheduler updates its per-slot arrays (probabilities,
readiness, class order) for the whole batch at once and hands the finished packets to the
:class:`Outputs` (the API layer's output processor, which builds and sends the frames: this
module knows neither frames nor labels). Resets are zeroings at the start of a plan; empty
packets and closes need no device work and are answered once everything before them is.

Sessions are served first come, first served. The scheduler is the only code that steps, zeroes
or frees a slot, and frees it only when nothing of the session is queued or in a plan.

**Snapshots** (with ``--state-dir``/``--state-store``; ``server/durability.py``). A plan may also
name rows to *write* (a session restored from a snapshot: its ``Restore`` item, after the plan's
zeroings, before its step) and rows to *read* after its step. The step thread is the one thread
that touches the rows and runs plans in order, so a row read after plan k is exactly the state
after plan k; when plan k is reported back the lanes' *done* state (events, last timestamp and
cropped count of the last finished packet, resets so far, changes so far) is the state after plan
k too, so the scheduler pairs each row with it (:class:`~evssm.server.sessions.Captured`) and
hands both to the snapshot sink, which writes them on its own thread. A row read while its
session is between two chunks of a packet has no event count and is read again after a later
plan. The scheduler keeps what snapshots have covered (``durable`` per slot: events sent that
the last finished write of the session's current stream covers) and hands it to the
:class:`Outputs` with each result.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import numpy as np

from evssm.models.wire import class_order

from .metrics import ModelMetrics
from .plan import StepPlan, StepResult
from .sessions import Captured, Close, Item, Packet, Reset, Restore, Session, SessionTable, SlotError
from .staging import StagingBuffer

log = logging.getLogger("evssm.server.scheduler")

READ_CHUNK = 512  # rows one plan reads for snapshots at most: bounds the pause between two steps


class StepRunner(Protocol):
    """What the scheduler needs of a model runner (``runner.ModelRunner``)."""

    name: str
    num_classes: int
    num_slots: int
    max_batch: int  # largest batch bucket
    max_length: int  # largest length bucket
    words: int  # int32 words of one state row

    def run(self, plan: StepPlan) -> StepResult:
        """Zero ``plan.zero``, write, step ``plan.slots`` by their rows, read (see ``plan.py``)."""
        ...

    def recover(self) -> bool:
        """After a failed device call: re-create the pool if the call consumed it (True)."""
        ...

    def prime(self) -> None:
        """A step is coming soon: get ready (wake helper threads); any thread."""
        ...


class Outputs(Protocol):
    """Where answers go (``app.OutputProcessor``). Called on the event loop."""

    def model_loaded(self, model: str, labels: tuple[str, ...]) -> None:
        """``model`` is served; its classes are ``labels`` (the engine calls this once)."""
        ...

    def results(self, model: str, sessions: list[Session], packets: list[Packet], probs: np.ndarray,
                ready: np.ndarray, order: np.ndarray, durable: np.ndarray | None) -> None:
        """Packets answered, in order per session; row ``i`` of probs float32 [N, C], ready bool
        [N] and order int32 [N, C] is the state after ``packets[i]``; ``durable`` int64 [N] what
        the session's snapshots cover then (None: the server keeps no snapshots)."""
        ...

    def reset_done(self, session: Session, item: Reset) -> None: ...

    def closed(self, session: Session, item: Close) -> None: ...

    def failed(self, session: Session, items: list[Item], reason: str) -> None:
        """The session's state is lost (a failed device call): answer ``items`` with errors."""
        ...


class Snapshots(Protocol):
    """Where rows read for snapshots go (``durability.Durability``). Called on the event loop."""

    def captured(self, model: str, items: list[Captured], rows: np.ndarray) -> None:
        """``rows`` int32 [N, words]: row ``i`` is the state ``items[i]`` describes."""
        ...


class _Lane:
    """One session's work, as the scheduler sees it (event loop only)."""

    __slots__ = ("session", "slot", "queue", "inflight", "offset", "builder", "ready", "failed",
                 "settled", "events", "last_t", "cropped", "epoch", "version", "snap_version",
                 "snap_active", "reading")

    def __init__(self, session: Session, settled: bool):
        self.session = session
        self.slot = session.slot
        self.queue: deque[Item] = deque()  # not yet wholly planned, in order
        self.inflight: deque[Item] = deque()  # planned (one entry per chunk or zeroing), in order
        self.offset = 0  # events of queue[0] already planned
        self.builder: _Builder | None = None  # the last plan it joined
        self.ready = False  # in the scheduler's ready line
        self.failed = False
        # The *done* state: what the row holds once every reported plan has run (module docstring).
        self.settled = settled  # the row is exactly the state after ``events`` (no chunk of a
        # packet half done, no zeroing or restore pending)
        self.events = 0  # events of the current stream the finished packets hold
        self.last_t: int | None = None
        self.cropped = 0
        self.epoch = 0  # resets done
        self.version = 0  # changes of the row done: packets, resets, a restore
        self.snap_version = -1  # the version the last finished snapshot write covered
        self.snap_active = 0.0  # the session's last_active that write saw
        self.reading = False  # due for a snapshot read, or in a plan's reads

    @property
    def idle(self) -> bool:
        return not self.queue and not self.inflight

    def capture(self, probs: np.ndarray | None) -> Captured:
        return Captured(self.session, self.version, self.epoch, self.session.last_active, self.events,
                        self.last_t, self.cropped, probs)


def _plannable(lane: _Lane) -> bool:
    """The lane's head needs the device: a zeroing, a restore or a packet with events."""
    head = lane.queue[0] if lane.queue else None
    return isinstance(head, (Reset, Restore)) or (isinstance(head, Packet) and head.size > 0)


class _Builder:
    """The next step plan while it is gathered (lists; arrays once the step thread takes it).
    The event loop appends and the step thread takes it, both under the step thread's lock."""

    __slots__ = ("zero", "slots", "starts", "lengths", "rows", "zeros", "writes", "reads",
                 "published", "taken", "oldest")

    def __init__(self) -> None:
        self.zero: list[int] = []
        self.slots: list[int] = []
        self.starts: list[int] = []
        self.lengths: list[int] = []
        self.rows: list[tuple[_Lane, Packet, bool, bool]] = []  # (lane, packet, first, last chunk)
        self.zeros: list[tuple[_Lane, Reset]] = []
        self.writes: list[tuple[_Lane, Restore]] = []
        self.reads: list[_Lane] = []  # rows to copy out after the step (snapshots)
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
                        np.array([lane.slot for lane in self.reads], np.int32))


class StepThread:
    """Runs published plans one after another and reports each to the event loop."""

    def __init__(self, runner: StepRunner, staging: StagingBuffer, loop: asyncio.AbstractEventLoop,
                 done: Callable[[_Builder, StepResult | BaseException, bool], None]):
        self.runner, self.staging, self.loop, self.done = runner, staging, loop, done
        self.lock = threading.Condition()
        self.next: _Builder | None = None  # published, not yet taken
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=f"evssm-step-{runner.name}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, builder: _Builder) -> None:
        """Publish ``builder`` (call with :attr:`lock` held)."""
        builder.published = True
        self.next = builder
        self.lock.notify()

    def stop(self) -> None:
        with self.lock:
            self._stopping = True
            self.lock.notify()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _main(self) -> None:
        while True:
            with self.lock:
                while self.next is None and not self._stopping:
                    self.lock.wait()
                if self._stopping:
                    return
                builder, self.next = self.next, None
                builder.taken = True
            recovered = False
            try:
                result: StepResult | BaseException = self.runner.run(builder.plan(self.staging,
                                                                                  self.runner.words))
            except Exception as exc:
                result = exc
                try:
                    recovered = self.runner.recover()
                except Exception:
                    log.exception("runner %s: recovery failed", self.runner.name)
            try:
                self.loop.call_soon_threadsafe(self.done, builder, result, recovered)
            except RuntimeError:  # the event loop is closed: the server is gone
                return


class Scheduler:
    """Batches one model's sessions' work into pipelined steps (see module docstring)."""

    def __init__(self, runner: StepRunner, table: SessionTable, staging: StagingBuffer,
                 outputs: Outputs, metrics: ModelMetrics, batch_wait_s: float,
                 on_release: Callable[[Session], None], snapshots: Snapshots | None = None):
        self.runner = runner
        self.model = runner.name
        self.table = table
        self.pool = table.pools[runner.name]
        self.staging = staging
        self.outputs = outputs
        self.metrics = metrics
        self.batch_wait_s = batch_wait_s
        self.on_release = on_release
        slots, classes = runner.num_slots, runner.num_classes
        # The per-slot state of the answers: after each session's last stepped chunk.
        self.probs = np.zeros((slots, classes), np.float32)
        self.ready = np.zeros(slots, bool)
        self.order = np.tile(np.arange(classes, dtype=np.int32), (slots, 1))
        # Events sent (kept and cropped) of each session's current stream that its last finished
        # snapshot write covers; None without snapshots (the frames then carry no ``durable``).
        self.snapshots = snapshots
        self.durable = None if snapshots is None else np.zeros(slots, np.int64)
        self._due: dict[_Lane, None] = {}  # lanes to read for a snapshot, in request order
        self._waiters: list[tuple[set[_Lane], asyncio.Future[None]]] = []
        self.lanes: dict[str, _Lane] = {}  # session id -> lane, live sessions only
        self.queued_packets = 0  # accepted, not yet answered
        self.steps = 0
        self._ready: deque[_Lane] = deque()  # lanes with work to plan, first come first served
        self._builder: _Builder | None = None  # the plan being gathered
        self._busy = 0  # plans published and not yet reported back
        self._timer: asyncio.TimerHandle | None = None
        self._thread: StepThread | None = None

    # --- called from the API layer (event loop) ------------------------------------------------
    def add(self, session: Session) -> None:
        lane = self.lanes[session.id] = _Lane(session, settled=not session.dirty)
        if self.durable is not None:
            self.durable[lane.slot] = 0
        if session.dirty:  # a reused row is zeroed before anything else
            lane.queue.append(Reset(reply=None))
            self._mark_ready(lane)
            self._fill()

    def restore(self, session: Session, item: Restore) -> None:
        """A session restored from a snapshot: its row is written before anything else. The
        snapshot it came from covers that state already."""
        if self.durable is None:
            raise SlotError("a session restored without snapshots")
        lane = self.lanes[session.id] = _Lane(session, settled=False)
        self.durable[lane.slot] = item.events + item.cropped
        lane.snap_version = 1  # the version once the Restore is done
        lane.snap_active = session.last_active
        lane.queue.append(item)
        self._mark_ready(lane)
        self._fill()

    def submit(self, session: Session, item: Item) -> None:
        """Queue ``item`` behind the session's earlier items."""
        lane = self.lanes.get(session.id)
        if lane is None or session.released:
            raise SlotError(f"work submitted to released session {session.id}")
        if isinstance(item, Packet):
            self.queued_packets += 1
        lane.queue.append(item)
        if len(lane.queue) == 1:
            self._advance(lane)
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
        """Release a closing session once it has no work left. True if released."""
        lane = self.lanes.get(session.id)
        if lane is None or not session.closing or not lane.idle or session.released:
            return False
        self.table.release(session, idle=True)
        del self.lanes[session.id]
        if lane.reading:
            self._due.pop(lane, None)  # a plan's read of it is dropped when the plan is done
            self._read_done(lane)
        self.on_release(session)
        return True

    # --- snapshots (event loop) ------------------------------------------------------------------
    def durable_of(self, session: Session) -> int | None:
        """What ``session``'s snapshots cover (None: no snapshots are kept)."""
        lane = self.lanes.get(session.id)
        if self.durable is None or lane is None:
            return None
        return int(self.durable[lane.slot])

    def request_snapshots(self, everything: bool) -> tuple[int, asyncio.Future[None]]:
        """Have the rows of the live sessions that changed since their last snapshot (every live
        session with ``everything``) read after the next plans. Returns how many, and a future
        done once each was read (and handed to the sink) or is gone."""
        picked = {lane for lane in self.lanes.values()
                  if not lane.failed and not lane.session.closing
                  and (everything or lane.version != lane.snap_version
                       or lane.session.last_active > lane.snap_active)}
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not picked:
            done.set_result(None)
            return 0, done
        for lane in picked:
            if not lane.reading:
                lane.reading = True
                self._due[lane] = None
        self._waiters.append((picked, done))
        self._fill()
        return len(picked), done

    def snapshot_written(self, item: Captured, covered: int) -> None:
        """The sink wrote ``item``'s snapshot: ``covered`` events sent (kept and cropped)."""
        lane = self.lanes.get(item.session.id)
        if lane is None or lane.session is not item.session or self.durable is None:
            return
        lane.snap_version = max(lane.snap_version, item.version)
        lane.snap_active = max(lane.snap_active, item.active)
        if item.epoch == lane.epoch:  # a write from before a reset covers nothing of this stream
            self.durable[lane.slot] = max(int(self.durable[lane.slot]), covered)

    def _read_done(self, lane: _Lane) -> None:
        lane.reading = False
        for waiting, done in self._waiters:
            waiting.discard(lane)
            if not waiting and not done.done():
                done.set_result(None)
        self._waiters = [(w, d) for w, d in self._waiters if w]

    def _captured(self, reads: list[_Lane], rows: np.ndarray) -> None:
        """After a plan: pair each read row with its lane's done state; a lane between two chunks
        of a packet is read again after a later plan."""
        items: list[Captured] = []
        keep: list[int] = []
        for i, lane in enumerate(reads):
            if self.lanes.get(lane.session.id) is not lane:
                continue  # released meanwhile (its waiters were told then)
            if lane.failed or lane.session.closing:
                self._read_done(lane)
                continue
            if not lane.settled:
                self._due[lane] = None
                continue
            s = lane.slot
            items.append(lane.capture(self.probs[s].copy() if self.ready[s] else None))
            keep.append(i)
            self._read_done(lane)
        if items and self.snapshots is not None:
            self.snapshots.captured(self.model, items, rows[keep])

    @property
    def pending(self) -> int:
        """Sessions with work queued or running."""
        return sum(1 for lane in self.lanes.values() if not lane.idle)

    def start(self) -> None:
        self._thread = StepThread(self.runner, self.staging, asyncio.get_running_loop(), self._done)
        self._thread.start()

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._thread is not None:
            self._thread.stop()
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30.0)
            self._thread = None

    # --- planning (event loop) -------------------------------------------------------------------
    def _mark_ready(self, lane: _Lane) -> None:
        if not lane.ready and not lane.failed:
            lane.ready = True
            self._ready.append(lane)

    def _advance(self, lane: _Lane) -> None:
        """Answer the heads that need no device work once everything before them is answered;
        line the lane up for planning if its head needs a step."""
        queue = lane.queue
        while queue and not lane.inflight:
            head = queue[0]
            if isinstance(head, Packet) and head.size == 0:
                queue.popleft()
                self.queued_packets -= 1
                s = lane.slot
                self.outputs.results(self.model, [lane.session], [head], self.probs[s:s + 1],
                                     self.ready[s:s + 1], self.order[s:s + 1],
                                     None if self.durable is None else self.durable[s:s + 1])
            elif isinstance(head, Close):
                queue.popleft()
                self.outputs.closed(lane.session, head)
            else:
                break
        if _plannable(lane):
            self._mark_ready(lane)
        elif lane.idle:
            self.release_if_done(lane.session)

    def _fill(self) -> None:
        """Plan ready lanes into the plan being gathered; publish it when it should go."""
        if self._thread is None or not (self._ready or self._due):
            return
        max_batch = self.runner.max_batch
        with self._thread.lock:
            builder = self._builder
            if builder is None or builder.taken:
                builder = self._builder = _Builder()
            later: list[_Lane] = []
            while self._ready and len(builder.slots) < max_batch:
                lane = self._ready.popleft()
                lane.ready = False
                if lane.failed or not _plannable(lane):
                    continue
                if lane.builder is builder:  # one chunk per session and plan: the next plan
                    later.append(lane)
                    continue
                self._plan_lane(lane, builder)
            for lane in reversed(later):
                lane.ready = True
                self._ready.appendleft(lane)
            while self._due and len(builder.reads) < READ_CHUNK:
                lane = next(iter(self._due))
                del self._due[lane]
                builder.reads.append(lane)
            if not builder.empty and not builder.published:
                if self._should_publish(builder):
                    self._publish(builder)
                elif self._timer is None:
                    deadline = builder.oldest + self.batch_wait_s
                    delay = max(0.0, deadline - time.perf_counter())
                    self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _plan_lane(self, lane: _Lane, builder: _Builder) -> None:
        """Put the lane's next zeroing or restore and/or chunk into ``builder``."""
        lane.builder = builder
        head = lane.queue[0]
        if isinstance(head, (Reset, Restore)):
            lane.queue.popleft()
            lane.inflight.append(head)
            if isinstance(head, Reset):
                builder.zero.append(lane.slot)
                builder.zeros.append((lane, head))
            else:  # written after the plan's zeroings, before its step
                builder.writes.append((lane, head))
            self.pool.zeroed(lane.slot)  # everything planned after it runs after it
            head = lane.queue[0] if lane.queue else None
            if not (isinstance(head, Packet) and head.size > 0):
                # Nothing, an empty packet or a close: answered after it. Another reset: in a
                # later plan (a plan zeroes a row once).
                if _plannable(lane):
                    self._mark_ready(lane)
                return
        assert isinstance(head, Packet)
        if self.pool.is_dirty(lane.slot):  # a dirty slot is always zeroed first (sessions.py)
            raise SlotError(f"session {lane.session.id} would step dirty slot {lane.slot}")
        n = min(self.runner.max_length, head.size - lane.offset)
        builder.slots.append(lane.slot)
        builder.starts.append(head.start + lane.offset)
        builder.lengths.append(n)
        first = lane.offset == 0
        lane.offset += n
        last = lane.offset >= head.size
        builder.rows.append((lane, head, first, last))
        builder.oldest = min(builder.oldest, head.received)
        lane.inflight.append(head)
        if last:
            lane.queue.popleft()
            lane.offset = 0
        if _plannable(lane):
            self._mark_ready(lane)  # its next chunk goes into a later plan

    def _should_publish(self, builder: _Builder) -> bool:
        """Publish now unless the step thread is idle and company may come (see module)."""
        if self._busy or self.batch_wait_s <= 0 or len(builder.slots) >= self.runner.max_batch:
            return True
        if not builder.slots or time.perf_counter() >= builder.oldest + self.batch_wait_s:
            return True
        # Company can only come from attached sessions with nothing queued.
        return not any(lane.session.attachment is not None and lane.idle and not lane.session.closing
                       for lane in self.lanes.values())

    def _publish(self, builder: _Builder) -> None:
        assert self._thread is not None
        self._busy += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._thread.offer(builder)

    def _on_timer(self) -> None:
        self._timer = None
        builder = self._builder
        if builder is not None and self._thread is not None:
            with self._thread.lock:
                if not builder.published and not builder.empty:
                    self._publish(builder)

    # --- after a step (event loop) ---------------------------------------------------------------
    def _done(self, builder: _Builder, result: StepResult | BaseException, recovered: bool) -> None:
        self._busy -= 1
        try:
            if isinstance(result, BaseException):
                log.error("scheduler %s: step failed: %r", self.model, result)
                self._fail_plan(builder, result, recovered)
            else:
                self._complete(builder, result)
        except Exception:  # never let one bad step stop the model's scheduler
            log.exception("scheduler %s: unexpected error after a step", self.model)
        self._fill()

    def _complete(self, builder: _Builder, result: StepResult) -> None:
        self.steps += 1
        touched: list[_Lane] = []
        for lane, reset in builder.zeros:
            lane.inflight.popleft()
            self.ready[lane.slot] = False
            lane.settled, lane.events, lane.last_t, lane.cropped = True, 0, None, 0
            lane.epoch += 1
            lane.version += 1
            if self.durable is not None:
                self.durable[lane.slot] = 0  # a new stream: no snapshot covers any of it yet
            if reset.reply is not None and not lane.failed:
                self.outputs.reset_done(lane.session, reset)
            touched.append(lane)
        for lane, item in builder.writes:
            lane.inflight.popleft()
            self._restored(lane, item)
            touched.append(lane)
        rows = builder.rows
        if rows:
            slots = np.fromiter((lane.slot for lane, _, _, _ in rows), np.int64, len(rows))
            self.probs[slots] = result.probs
            self.ready[slots] = result.ready
            self.order[slots] = result.order
        done: list[int] = []
        waits: list[float] = []
        for i, (lane, packet, first, last) in enumerate(rows):
            lane.inflight.popleft()
            lane.settled = last
            if last:
                lane.events, lane.last_t = packet.events_after, packet.last_t
                lane.cropped = packet.cropped_after or 0
                lane.version += 1
            if first:
                waits.append(result.started - packet.received)
            if last or (lane.failed and packet not in lane.inflight):
                self.staging.release(packet.region)  # no plan reads it any more
            if last and not lane.failed:
                done.append(i)
            touched.append(lane)
        self.metrics.step(result.seconds, len(rows), np.asarray(waits, np.float64))
        if done:
            self.queued_packets -= len(done)
            self.outputs.results(self.model, [rows[i][0].session for i in done],
                                 [rows[i][1] for i in done], result.probs[done], result.ready[done],
                                 result.order[done],
                                 None if self.durable is None else self.durable[slots[done]])
        if builder.reads:
            self._captured(builder.reads, result.rows)
        for lane in touched:
            if lane.failed:
                self._release_failed(lane)
            else:
                self._advance(lane)

    def _restored(self, lane: _Lane, item: Restore) -> None:
        """A restore is done: the row and the per-slot answer are the snapshot's."""
        s = lane.slot
        self.ready[s] = item.probs is not None
        if item.probs is not None:
            self.probs[s] = item.probs
            self.order[s] = class_order(item.probs)
        lane.settled, lane.events, lane.last_t, lane.cropped = True, item.events, item.last_t, item.cropped
        lane.version += 1

    def _fail_plan(self, builder: _Builder, exc: BaseException, recovered: bool) -> None:
        """A step failed: the rows' states are unknown, so end these sessions (all of the model's
        sessions if the call consumed the pool). Rows it was to read are read after a later plan."""
        for lane in builder.reads:
            if self.lanes.get(lane.session.id) is lane:
                self._due[lane] = None
        stepped: dict[_Lane, list[Item]] = {}  # each lane's items in this plan, in order
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
            self._fail_lane(lane, reason, stepped.get(lane, []))
            self._release_failed(lane)

    def _fail_lane(self, lane: _Lane, reason: str, stepped: list[Item]) -> None:
        """Answer every unanswered item of the lane (``stepped``: those of the failed plan) with
        an error and plan nothing more for it."""
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
        self.outputs.failed(lane.session, items, reason)

    def _release_failed(self, lane: _Lane) -> None:
        """A failed lane frees its slot once no plan holds a chunk of it."""
        if not lane.inflight and lane.session.id in self.lanes:
            self.release_if_done(lane.session)  # the outputs marked it closing
