"""Session durability: periodic and drain-time snapshots, and restore on resume (engine glue).

The engine calls these hooks: :meth:`Durability.start` (after loading), :meth:`snapshot` (on a
timer, and with ``everything`` during a drain), :meth:`lookup`/:meth:`adopt` (resume of a token
the server does not hold) and :meth:`forget` (a session closed, evicted or failed). The store and
the record format are :mod:`evssm.server.snapshots`.

What runs where:

- the event loop asks each model's scheduler which sessions changed since their last snapshot
  (the scheduler owns that bookkeeping); the scheduler has their rows read after one of the next
  step plans, on the step thread, the one thread that touches the state pool (at most
  ``scheduler.READ_CHUNK`` rows per plan, so steps go on between chunks), and hands each row
  with the state it holds (:meth:`captured`);
- one writer thread encodes and writes records and deletes them: a session's writes and its
  deletion land in the order they were asked for; when a write is done, the scheduler learns
  what it covers (``durable`` in result frames);
- one reader thread looks records up on resume, so a lookup never waits behind a long write.

A row is read right after a step whose answers the API layer has not yet sent: the session's
live-sensor state (``Session.live``: its decisions) is updated as those answers go out, in the
same event-loop callback. So the writer's work (writes and deletions alike, in the order asked
for) is handed over on the event loop's next turn, when the live state is that of the row.

A record holds the id of the API key that opened the session (never the key): a restored token
resumes only for that key, as a live one does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from evssm.models.events import SensorSpec
from evssm.models.filters import FilterBank, FilterError, FilterState
from evssm.models.geometry import Adapter, GeometryError, adapter_for

from ..metrics import Metrics
from .filter_state import removed_total, restore_from, snapshot_of
from .sessions import Captured, Session
from .snapshots import (
    CorruptSnapshot,
    DiskStore,
    RedisStore,
    SnapshotRecord,
    SnapshotStore,
    StoreUnavailable,
    decode,
    encode,
    token_key,
)

log = logging.getLogger("evssm.server.durability")

ERROR_LOG_PERIOD_S = 30.0


class SnapshotIncompatible(Exception):
    """A session's snapshot cannot be restored on this server (other weights, model not served)."""


class RowRunner(Protocol):
    """What durability needs of a model runner (``runner.ModelRunner``)."""

    name: str
    num_classes: int
    state_bytes: int
    sensor: SensorSpec
    fingerprint: str  # of the model's weights and architecture


class SnapshotScheduler(Protocol):
    """What durability needs of a model's scheduler (``scheduler.Scheduler``)."""

    def request_snapshots(self, everything: bool) -> tuple[int, asyncio.Future[None]]: ...

    def snapshot_written(self, item: Captured, covered: int) -> None: ...


class Durability:
    """Snapshots of one server's sessions in ``store`` (see the module docstring)."""

    def __init__(self, store: SnapshotStore, runners: Mapping[str, RowRunner], metrics: Metrics,
                 interval_s: float, on_taken_over: Callable[[Session], None]):
        self.store = store
        self.runners = runners
        self.metrics = metrics
        self.interval_s = interval_s
        self.on_taken_over = on_taken_over
        self.schedulers: Mapping[str, SnapshotScheduler] = {}
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="evssm-snapshot-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="evssm-snapshot-reader")
        self._pending: set[asyncio.Future] = set()  # writes not finished
        self._deleting: dict[str, int] = {}  # key -> deletions queued and not yet done
        self._task: asyncio.Task | None = None
        self._errors = 0
        self._last_error_log = 0.0

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self, schedulers: Mapping[str, SnapshotScheduler]) -> None:
        """Check the store (a disk store's records are scanned), then snapshot every interval."""
        self.schedulers = schedulers
        loop = asyncio.get_running_loop()
        check = self._scan if isinstance(self.store, DiskStore) else self._ping
        loop.run_in_executor(self._writer, check).add_done_callback(self._log_failure)
        self._task = asyncio.create_task(self._periodic(), name="evssm-snapshots")

    @staticmethod
    def _log_failure(fut: asyncio.Future) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            log.error("checking the snapshot store failed: %r", fut.exception())

    def _scan(self) -> None:
        assert isinstance(self.store, DiskStore)
        report = self.store.scan(decode)
        served = {(name, r.fingerprint) for name, r in self.runners.items()}
        other = sum(n for pair, n in report.models.items() if pair not in served)
        if report.corrupt:
            self.metrics.snapshot_failures.labels(reason="corrupt").inc(len(report.corrupt))
        if self.store.damaged:
            self.metrics.snapshot_failures.labels(reason="corrupt").inc()
        log.info("%s: %d session snapshots (%d for models or weights not served here), %d corrupt "
                 "skipped, %d expired removed; scanned in %.2f s", self.store.description,
                 report.valid, other, len(report.corrupt), report.expired, report.seconds)

    def _ping(self) -> None:
        if not isinstance(self.store, RedisStore):
            return
        try:
            self.store.ping()
            log.info("session snapshots in %s", self.store.description)
        except StoreUnavailable as e:
            log.warning("%s; serving on, snapshots are retried every %g s", e, self.interval_s)

    async def _periodic(self) -> None:
        """A pass per interval; a pass whose writes take longer delays the next (no backlog)."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due = max(due + self.interval_s, loop.time())
            await asyncio.sleep(due - loop.time())
            try:
                await self.snapshot()
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("snapshot pass failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._reader.shutdown(wait=False, cancel_futures=True)
        self._writer.shutdown(wait=True, cancel_futures=True)
        self.store.close()

    # --- writing -----------------------------------------------------------------------------
    async def snapshot(self, *, everything: bool = False) -> int:
        """Snapshot the sessions that changed since their last snapshot (every live session with
        ``everything``): returns how many once each row is read and its write queued;
        :meth:`flush` waits for the writes."""
        count = 0
        waits = []
        for sched in list(self.schedulers.values()):
            n, done = sched.request_snapshots(everything)
            count += n
            waits.append(done)
        await asyncio.gather(*waits)
        return count

    def captured(self, model: str, items: list[Captured], rows: list[np.ndarray]) -> None:
        """Scheduler hook (event loop): ``rows[i]`` int32 [L_i, words] read after a step, the
        state ``items[i]`` describes (a window's ``L_i`` lanes, one row without a window); they go
        to the writer thread on the loop's next turn (module docstring), counted as pending from now."""
        loop = asyncio.get_running_loop()
        gate: asyncio.Future[None] = loop.create_future()
        self._pending.add(gate)
        loop.call_soon(self._write_captured, model, items, rows, gate)

    def _write_captured(self, model: str, items: list[Captured], rows: list[np.ndarray],
                        gate: asyncio.Future[None]) -> None:
        try:
            runner = self.runners[model]
            records = [self._record(c, row, runner) for c, row in zip(items, rows, strict=True)]
            fut = asyncio.get_running_loop().run_in_executor(self._writer, self._write, records)
            self._pending.add(fut)
            fut.add_done_callback(lambda f: self._written(model, items, records, f))
        finally:  # a flush waits for the gate, whatever became of the write
            self._pending.discard(gate)
            gate.set_result(None)

    @staticmethod
    def _record(c: Captured, row: np.ndarray, runner: RowRunner) -> SnapshotRecord:
        s = c.session
        live = getattr(s.live, "to_dict", None)
        return SnapshotRecord(
            key=token_key(s.token), session=s.id, model=s.model, fingerprint=runner.fingerprint,
            row=row.reshape(-1), events=c.events, last_t=c.last_t, probs=c.probs, top_k=s.top_k,
            cropped=c.cropped, key_id=s.key_id, geometry=None if s.geometry is None else {
                "sensor": s.geometry.source.to_dict(), "transform": s.geometry.transform.to_dict()},
            filters=snapshot_of(s.filters, c.filters), window=_window_of(s.window, c.window),
            live=live() if live is not None else s.live if isinstance(s.live, dict) else None)

    def _write(self, records: list[SnapshotRecord]) -> list[bool]:
        """Writer thread: encode and store a batch of records."""
        t0 = time.perf_counter()
        now = time.time()
        ok = self.store.put([(r.key, encode(dataclasses.replace(r, written=now))) for r in records])
        self.metrics.snapshot_write_seconds.observe(time.perf_counter() - t0)
        return ok

    def _written(self, model: str, items: list[Captured], records: list[SnapshotRecord],
                 fut: asyncio.Future) -> None:
        """Event loop: a batch was written (or failed): tell the scheduler what it covers."""
        self._pending.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self._store_error(exc, len(items))
            return
        ok: list[bool] = fut.result()
        sched = self.schedulers.get(model)
        written = 0
        for c, rec, good in zip(items, records, ok, strict=True):
            if not good:  # another server restored the session since: it is theirs now
                self.metrics.snapshot_failures.labels(reason="taken_over").inc()
                log.info("session %s was restored by another server; ending it here", c.session.id)
                self.on_taken_over(c.session)
                continue
            written += 1
            if sched is not None:  # events sent: kept, cropped and filtered
                sched.snapshot_written(c, rec.events + rec.cropped + removed_total(c.filters))
        self.metrics.snapshots_written.labels(model=model).inc(written)
    def _store_error(self, exc: BaseException, n: int) -> None:
        self.metrics.snapshot_failures.labels(reason="store_error").inc(n)
        self._errors += n
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_PERIOD_S:
            log.error("%d session snapshots not written (retried next pass): %s", self._errors,
                      exc if isinstance(exc, StoreUnavailable) else repr(exc))
            self._errors = 0
            self._last_error_log = now

    async def flush(self) -> None:
        """Wait for every write asked for so far."""
        while self._pending:
            await asyncio.wait(list(self._pending))

    def forget(self, s: Session) -> None:
        """Delete a session's record (closed, evicted, failed or taken over)."""
        key = token_key(s.token)
        self._deleting[key] = self._deleting.get(key, 0) + 1
        loop = asyncio.get_running_loop()

        def done(f: asyncio.Future) -> None:
            left = self._deleting.pop(key) - 1
            if left:
                self._deleting[key] = left
            self._check(f)

        def delete() -> None:  # after the writes asked for before it (module docstring)
            loop.run_in_executor(self._writer, self.store.delete, [key]).add_done_callback(done)

        loop.call_soon(delete)

    def _check(self, fut: asyncio.Future) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self._store_error(fut.exception(), 1)  # type: ignore[arg-type]

    # --- restoring ---------------------------------------------------------------------------
    async def lookup(self, token: str, key_id: str | None
                     ) -> tuple[SnapshotRecord, bytes, Adapter | None, tuple[FilterBank, FilterState] | None] | None:
        """The snapshot of ``token`` if there is one this server can restore for a client with
        API key ``key_id`` (None: none, expired, damaged, being deleted, or opened under another
        key, which is as unknown as a wrong token), its bytes, its declared source's adapter and
        its input filters (bank and state).
        Raises :class:`SnapshotIncompatible` or StoreUnavailable."""
        key = token_key(token)
        if key in self._deleting:
            return None
        loop = asyncio.get_running_loop()
        blob = await loop.run_in_executor(self._reader, self.store.get, key)
        if blob is None or key in self._deleting:
            return None
        try:
            rec = decode(blob)
            if rec.key != key:
                raise CorruptSnapshot("the record names another session")
        except CorruptSnapshot as e:
            self.metrics.snapshot_failures.labels(reason="corrupt").inc()
            log.warning("%s: snapshot %s... skipped and deleted: %s", self.store.description, key[:12], e)
            loop.run_in_executor(self._writer, self.store.delete, [key]).add_done_callback(self._check)
            return None
        if rec.key_id != key_id:
            return None
        runner = self.runners.get(rec.model)
        problem = None
        if runner is None:
            problem = f"model {rec.model!r} is not served here (served: {sorted(self.runners)})"
        elif rec.fingerprint != runner.fingerprint:
            problem = (f"it was made for other weights or another state layout of model "
                       f"{rec.model!r} (fingerprint "
                       f"{rec.fingerprint[:12]}, served {runner.fingerprint[:12]})")
        elif rec.row.size * 4 != runner.state_bytes * rec.lanes or (
                rec.probs is not None and rec.probs.size != runner.num_classes):
            problem = f"its state does not fit model {rec.model!r}"
        adapter = None
        if problem is None and runner is not None and rec.geometry is not None:
            try:
                adapter = adapter_for(runner.sensor, rec.geometry.get("sensor"), rec.geometry.get("transform"))
            except (GeometryError, AttributeError, TypeError) as e:
                problem = f"its declared sensor does not fit model {rec.model!r}: {e}"
        filters = None
        if problem is None and runner is not None and rec.filters is not None:
            try:
                filters = restore_from(rec.filters, runner.sensor if adapter is None else adapter.source)
            except FilterError as e:
                problem = f"its filters do not fit: {e}"
        if problem:
            self.metrics.snapshot_failures.labels(reason="incompatible").inc()
            raise SnapshotIncompatible(f"session {rec.session} cannot be restored: {problem}")
        return rec, blob, adapter, filters

    @staticmethod
    def window_of(rec: SnapshotRecord, take_up: Callable[[dict], object] | None, max_batch: int) -> object:
        """The window ``take_up`` (the API layer's) rebuilds from ``rec``'s (None: none); raises
        :class:`SnapshotIncompatible` for one this server cannot restore (its lanes must fit one
        step of at most ``max_batch`` rows, as at open)."""
        if rec.window is None:
            return None
        try:
            if take_up is None:
                raise ValueError("this server restores no windows")
            if rec.lanes > max_batch:
                raise ValueError(f"{rec.lanes} lanes; this server steps at most {max_batch} rows at once")
            return take_up(rec.window)
        except (ValueError, TypeError, KeyError) as e:
            raise SnapshotIncompatible(f"session {rec.session} cannot be restored: its window: {e}") from None

    def adopt(self, s: Session, rec: SnapshotRecord, blob: bytes) -> None:
        """A session was restored from ``rec``: the store already holds its state; in a shared
        store this server now owns its record (a replica that held it before can no longer write
        it)."""
        self.metrics.sessions_restored.labels(model=s.model).inc()
        if isinstance(self.store, RedisStore):  # shared: fence off the replica that held it
            fut = asyncio.get_running_loop().run_in_executor(
                self._writer, lambda: self.store.put([(rec.key, blob)], claim=True))
            fut.add_done_callback(self._check)


def _window_of(window: object, state: object) -> dict | None:
    """A windowed session's window for its snapshot (its spec and ``state``, the lane state paired
    with the rows; None: a fresh stream), from the API layer's planner (None: no window)."""
    snapshot = getattr(window, "snapshot", None)
    return None if snapshot is None else snapshot(state)
