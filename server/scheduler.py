"""The batching scheduler: many sessions' packets, one jitted step (no JAX here).

One scheduler per model runs as an asyncio task. Whenever sessions have work queued it

1. waits a few milliseconds for company if fewer than the largest batch bucket are ready and other
   attached sessions of the model could still send (a lone session never waits);
2. runs the control items at the heads of the queues (``Reset`` -> one batched zeroing of rows on
   the device, ``Restore`` -> one batched write of snapshot rows, ``Close``, empty packets that
   only need the last answer);
3. takes the next chunk (at most the largest length bucket) of up to ``max_batch`` sessions'
   head packets and runs one step over all of them on the runner's thread; the state stays on the
   device (the runner donates it);
4. answers every packet whose last chunk ran, in each session's order.

Sessions are served first come, first served; sessions left over when a batch is full go first
next time. The scheduler is the only code that steps, zeroes or frees a slot, so a slot is never
freed while a step it belongs to is running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import Executor
from typing import Any, Callable, Protocol

import numpy as np

from .metrics import Metrics
from .protocol import Code, error_frame
from .sessions import Close, Item, Packet, Reset, Restore, Session, SessionTable, SlotError

log = logging.getLogger("evssm.server.scheduler")


class StepRunner(Protocol):
    """What the scheduler needs of a model runner (``runner.ModelRunner``)."""

    name: str
    labels: tuple[str, ...]
    max_batch: int  # largest batch bucket
    max_length: int  # largest length bucket
    executor: Executor  # the one thread that touches the state pool

    def step(self, slots: np.ndarray, tokens: list[np.ndarray],
             gaps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Step ``slots`` int32 [B] by their packets' ``tokens``/``gaps`` (int32 [n_i] each,
        n_i <= max_length). Returns probabilities float32 [B, C] and ready bool [B]."""
        ...

    def zero(self, slots: np.ndarray) -> None:
        """Zero the state rows ``slots`` int32 [K]."""
        ...

    def write_rows(self, slots: np.ndarray, rows: np.ndarray) -> None:
        """Set the state rows ``slots`` int32 [K] to ``rows`` int32 [K, words]."""
        ...

    def recover(self) -> bool:
        """After a failed device call: re-create the pool if the call consumed it (True)."""
        ...


def result_frame(seq: int | None, events: int, t: int | None, probs: np.ndarray | None,
                 labels: tuple[str, ...], top_k: int, durable: int | None = None) -> dict[str, Any]:
    """The ``result`` frame of a packet (``probs`` None: no complete final-rate window yet;
    ``durable`` None: the server keeps no snapshots, and the frame has no ``durable``)."""
    if probs is None:
        frame = {"type": "result", "seq": seq, "events": events, "t": t, "probs": None, "top": []}
    else:
        k = min(top_k, probs.shape[0])
        order = np.argsort(-probs, kind="stable")[:k]
        frame = {"type": "result", "seq": seq, "events": events, "t": t, "probs": probs.tolist(),
                 "top": [[labels[i], float(probs[i])] for i in order]}
    if durable is not None:
        frame["durable"] = durable
    return frame


def _resolve(fut: asyncio.Future | None, frame: dict[str, Any]) -> None:
    if fut is not None and not fut.done():
        fut.set_result(frame)


class Scheduler:
    """Batches one model's sessions' packets into steps (see module docstring)."""

    def __init__(self, runner: StepRunner, table: SessionTable, metrics: Metrics, batch_wait_s: float,
                 on_release: Callable[[Session], None]):
        self.runner = runner
        self.model = runner.name
        self.table = table
        self.pool = table.pools[runner.name]
        self.metrics = metrics
        self.batch_wait_s = batch_wait_s
        self.on_release = on_release
        self.sessions: set[Session] = set()  # this model's live sessions
        self._ready: deque[Session] = deque()  # sessions with queued work, not in a step
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.steps = 0
        # Called with a step's sessions once its results are applied (they are settled then):
        # snapshots read busy sessions' rows here, before the next step is planned.
        self.on_settled: Callable[[list[Session]], None] | None = None

    # --- called from the API layer (event loop) ------------------------------------------------
    def add(self, session: Session) -> None:
        self.sessions.add(session)
        if session.queue:  # a dirty slot's zeroing
            self._mark_ready(session)

    def submit(self, session: Session, item: Item) -> None:
        """Queue ``item`` behind the session's earlier items."""
        if session.released:
            raise SlotError(f"work submitted to released session {session.id}")
        if isinstance(item, Packet):
            item.enqueued = time.perf_counter()
            self.metrics.queue_depth.labels(model=self.model).inc()
        session.queue.append(item)
        self._mark_ready(session)

    def release_if_done(self, session: Session) -> bool:
        """Release a closing session once it has no work left. True if released."""
        if session.closing and session.idle and not session.released:
            self.table.release(session)
            self.sessions.discard(session)
            self.on_release(session)
            return True
        return False

    @property
    def pending(self) -> int:
        """Sessions with work queued or running."""
        return sum(1 for s in self.sessions if not s.idle)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"evssm-scheduler-{self.model}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # --- the loop ----------------------------------------------------------------------------
    def _mark_ready(self, session: Session) -> None:
        if session.queue and not session.queued and not session.in_step:
            session.queued = True
            self._ready.append(session)
            self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._ready:
                continue
            try:
                await self._wait_for_company()
                zero, restore, batch = self._plan()
                if zero:
                    await self._zero(zero)
                if restore:
                    await self._restore(restore)
                batch = [s for s in batch if not s.released]  # a failed zeroing ends sessions
                if batch:
                    await self._step(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad step stop the model's scheduler
                log.exception("scheduler %s: unexpected error", self.model)
            if self._ready:
                self._wake.set()

    async def _wait_for_company(self) -> None:
        """Wait up to ``batch_wait_s`` (from the oldest ready packet) for more sessions' packets."""
        if self.batch_wait_s <= 0:
            return
        heads = [s.queue[0].enqueued for s in self._ready if s.queue and isinstance(s.queue[0], Packet)]
        if not heads:
            return
        deadline = min(heads) + self.batch_wait_s
        for _ in range(self.runner.max_batch):  # at most one wake-up per newly ready session
            if len(self._ready) >= self.runner.max_batch:
                return
            # Company can only come from attached sessions with nothing queued.
            if not any(s.attachment is not None and not s.queued and not s.closing for s in self.sessions):
                return
            timeout = deadline - time.perf_counter()
            if timeout <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                return

    def _plan(self) -> tuple[list[Session], list[Session], list[Session]]:
        """Answer the cheap heads (close, empty packets); split the rest into rows to zero, rows
        to restore and sessions to step. Sessions beyond a full batch stay first in line."""
        zero: list[Session] = []
        restore: list[Session] = []
        batch: list[Session] = []
        leftover: list[Session] = []
        for _ in range(len(self._ready)):
            s = self._ready.popleft()
            s.queued = False
            self._run_cheap_heads(s)
            if not s.queue:
                self.release_if_done(s)
                continue
            head = s.queue[0]
            if isinstance(head, Reset):
                zero.append(s)
            elif isinstance(head, Restore):
                restore.append(s)
            elif len(batch) < self.runner.max_batch:
                if self.pool.is_dirty(s.slot):  # a dirty slot is always zeroed first (sessions.py)
                    raise SlotError(f"session {s.id} would step dirty slot {s.slot}")
                batch.append(s)
            else:
                leftover.append(s)
        for s in reversed(leftover):
            s.queued = True
            self._ready.appendleft(s)
        for s in zero + restore + batch:
            s.in_step = True
        return zero, restore, batch

    def _run_cheap_heads(self, s: Session) -> None:
        """Answer head items that need no device work: empty packets and close."""
        while s.queue:
            head = s.queue[0]
            if isinstance(head, Packet) and head.size == 0:
                s.queue.popleft()
                self.metrics.queue_depth.labels(model=self.model).dec()
                _resolve(head.reply, result_frame(head.seq, s.done_events, s.done_t, s.probs,
                                                  self.runner.labels, s.top_k, s.durable))
            elif isinstance(head, Close):
                s.queue.popleft()
                s.closing = True
                _resolve(head.reply, {"type": "closed", "session": s.id, "events": s.done_events})
            else:
                return

    async def _zero(self, sessions: list[Session]) -> None:
        slots = np.array([s.slot for s in sessions], np.int32)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.runner.executor, self.runner.zero, slots)
        except Exception as e:
            log.exception("scheduler %s: zeroing slots failed", self.model)
            self._fail(sessions, e)
            return
        for s in sessions:
            s.in_step = False
            item = s.queue.popleft()
            assert isinstance(item, Reset)
            self.pool.zeroed(s.slot)
            s.probs, s.done_events, s.done_t, s.done_cropped = None, 0, None, 0
            s.version += 1
            s.epoch += 1  # a new stream: no snapshot covers it yet beyond its start
            if s.durable is not None:
                s.durable = 0
            _resolve(item.reply, {"type": "reset_done", "session": s.id, "events": 0})
            self._after(s)

    async def _restore(self, sessions: list[Session]) -> None:
        """Write restored sessions' snapshot rows into their slots (one device call)."""
        items = [s.queue[0] for s in sessions]
        assert all(isinstance(item, Restore) for item in items)
        slots = np.array([s.slot for s in sessions], np.int32)
        rows = np.stack([item.row for item in items])  # type: ignore[union-attr]
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.runner.executor, self.runner.write_rows, slots, rows)
        except Exception as e:
            log.exception("scheduler %s: restoring slots failed", self.model)
            self._fail(sessions, e)
            return
        for s, item in zip(sessions, items):
            s.in_step = False
            s.queue.popleft()
            self.pool.zeroed(s.slot)  # the whole row is written: the slot is clean
            s.probs, s.done_events, s.done_t = item.probs, item.events, item.last_t  # type: ignore[union-attr]
            s.done_cropped = item.cropped  # type: ignore[union-attr]
            self._after(s)

    async def _step(self, batch: list[Session]) -> None:
        limit = self.runner.max_length
        now = time.perf_counter()
        slots = np.array([s.slot for s in batch], np.int32)
        tokens, gaps, sizes = [], [], []
        for s in batch:
            p = s.queue[0]
            assert isinstance(p, Packet)
            n = min(limit, p.size - p.offset)
            tokens.append(p.tokens[p.offset:p.offset + n])
            gaps.append(p.gaps[p.offset:p.offset + n])
            sizes.append(n)
            if not p.started:
                p.started = True
                self.metrics.queue_wait.labels(model=self.model).observe(now - p.enqueued)
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            probs, ready = await loop.run_in_executor(self.runner.executor, self.runner.step,
                                                      slots, tokens, gaps)
        except Exception as e:
            log.exception("scheduler %s: step failed", self.model)
            self._fail(batch, e)
            return
        self.metrics.step_latency.labels(model=self.model).observe(time.perf_counter() - t0)
        self.metrics.batch_size.labels(model=self.model).observe(len(batch))
        self.metrics.steps.labels(model=self.model).inc()
        self.steps += 1
        for i, s in enumerate(batch):
            s.in_step = False
            p = s.queue[0]
            assert isinstance(p, Packet)
            p.offset += sizes[i]
            if p.offset >= p.size:
                s.queue.popleft()
                self.metrics.queue_depth.labels(model=self.model).dec()
                s.probs = probs[i] if ready[i] else None
                s.done_events, s.done_t, s.done_cropped = p.events_after, p.last_t, p.cropped_after
                s.version += 1
                _resolve(p.reply, result_frame(p.seq, s.done_events, s.done_t, s.probs,
                                               self.runner.labels, s.top_k, s.durable))
            self._after(s)
        if self.on_settled is not None:
            self.on_settled(batch)

    def _after(self, s: Session) -> None:
        if s.queue:
            self._mark_ready(s)
        else:
            self.release_if_done(s)

    def _fail(self, sessions: list[Session], exc: Exception) -> None:
        """A device call failed: the rows' states are unknown, so end these sessions (all of the
        model's sessions if the call consumed the donated pool)."""
        if self.runner.recover():
            sessions = list(self.sessions)
            self._ready.clear()
        frame = error_frame(Code.INTERNAL_ERROR, f"engine failure, session ended: {type(exc).__name__}")
        for s in sessions:
            s.queued = False
            s.in_step = False
            s.closing = True
            while s.queue:
                item = s.queue.popleft()
                if isinstance(item, Packet):
                    self.metrics.queue_depth.labels(model=self.model).dec()
                _resolve(item.reply, {**frame, "seq": getattr(item, "seq", None)})
            if s.attachment is not None:
                s.attachment.detach(s, error_frame(Code.INTERNAL_ERROR, "session ended by an engine failure"))
            self.release_if_done(s)
