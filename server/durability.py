"""Session durability: periodic and drain-time snapshots, and restore on resume (engine glue).

The engine calls four hooks: :meth:`Durability.start` (after loading), :meth:`snapshot` (on a
timer, and with ``everything`` during a drain), :meth:`lookup`/:meth:`adopt` (resume of a token
the server does not hold) and :meth:`forget` (a session closed, evicted or failed). The store and
the record format are :mod:`evssm.server.snapshots`; nothing here knows of the scheduler beyond
the fields of :class:`~evssm.server.sessions.Session`.

What runs where:

- the event loop picks the sessions to write, captures their metadata (events, last timestamp,
  probabilities, version), and applies finished writes (``Session.durable``);
- each model's step thread reads the picked sessions' state rows between steps. It is the only
  thread that touches the pool, and it runs jobs in the order they were submitted, so a read
  submitted in the same loop iteration as the capture sees exactly the captured state. A session
  is captured only when ``settled`` (no device call of it running or awaiting its results, no
  packet half done): idle ones by the periodic pass, busy ones (under load a session is in a step
  most of the time) by the scheduler's ``on_settled`` hook right after their step is answered;
- one writer thread encodes and writes records and deletes them: a session's writes and its
  deletion land in the order they were asked for;
- one reader thread looks records up on resume, so a lookup never waits behind a long write.

``Session.durable`` is what result frames carry: the event count of the session's current stream
covered by its last *completed* write. A write captured before a reset never raises it (epochs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from evssm.models.events import SensorSpec
from evssm.models.geometry import Adapter, GeometryError, adapter_for

from .metrics import Metrics
from .sessions import Session, SessionTable
from .snapshots import (CorruptSnapshot, DiskStore, RedisStore, SnapshotRecord, SnapshotStore,
                        StoreUnavailable, decode, encode, token_key)

log = logging.getLogger("evssm.server.durability")

READ_CHUNK = 512  # sessions per row read on the step thread: bounds the pause between two steps
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
    executor: Executor  # the step thread

    def read_rows(self, slots: np.ndarray) -> np.ndarray:
        """A copy of state rows ``slots`` int32 [K]: int32 [K, words] (step thread)."""
        ...


@dataclass(frozen=True)
class _Capture:
    """A session's metadata taken on the event loop, with the record to write (row filled in
    once read)."""

    session: Session
    version: int
    epoch: int
    active: float
    record: SnapshotRecord


class Durability:
    """Snapshots of one server's sessions in ``store`` (see the module docstring)."""

    def __init__(self, store: SnapshotStore, runners: dict[str, RowRunner], table: SessionTable,
                 metrics: Metrics, interval_s: float, on_taken_over: Callable[[Session], None]):
        self.store = store
        self.runners = runners
        self.table = table
        self.metrics = metrics
        self.interval_s = interval_s
        self.on_taken_over = on_taken_over
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="evssm-snapshot-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="evssm-snapshot-reader")
        self._lock = asyncio.Lock()  # one snapshot pass at a time
        self._pending: set[asyncio.Future] = set()  # row reads and writes not finished
        self._due: dict[str, set[Session]] = {}  # model -> sessions to read after their step
        self._deleting: dict[str, int] = {}  # key -> deletions queued and not yet done
        self._task: asyncio.Task | None = None
        self._errors = 0
        self._last_error_log = 0.0

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Check the store (a disk store's records are scanned), then snapshot every interval."""
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
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.snapshot()
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
    @staticmethod
    def _changed(s: Session) -> bool:
        return s.version != s.snap_version or s.last_active > s.snap_active

    async def snapshot(self, *, everything: bool = False) -> int:
        """Write the sessions that changed since their last snapshot (every live session with
        ``everything``). Settled sessions are read now, in chunks (steps run between chunks);
        the others, busy in a step, are read by :meth:`after_step` once their step is answered.
        Returns the number of sessions read now; :meth:`flush` waits for their writes."""
        count = 0
        async with self._lock:
            for name, runner in self.runners.items():
                picked = [s for s in self.table.sessions.values() if s.model == name
                          and not s.closing and (everything or self._changed(s))]
                self._due[name] = set()
                for i in range(0, len(picked), READ_CHUNK):
                    chunk = picked[i:i + READ_CHUNK]
                    self._due[name].update(s for s in chunk if not s.settled)
                    read = self._read([s for s in chunk if s.settled and not s.closing], name, runner)
                    if read is not None:
                        count += len(read[0])
                        await asyncio.wait([read[1]])  # steps queued meanwhile run next
        return count

    def after_step(self, model: str, sessions: list[Session]) -> None:
        """Scheduler hook, on the event loop right after a step's results are applied (its
        sessions are settled): read those of ``sessions`` the last pass found busy."""
        due = self._due.get(model)
        if not due:
            return
        ready = [s for s in sessions if s in due and s.settled and not s.closing]
        if ready:
            due.difference_update(ready)
            self._read(ready, model, self.runners[model])

    def _read(self, sessions: list[Session], model: str, runner: RowRunner
              ) -> tuple[list[_Capture], asyncio.Future] | None:
        """Capture settled ``sessions`` and submit the read of their rows to the step thread in
        the same loop iteration (see the module docstring); the rows go on to the writer."""
        if not sessions:
            return None
        captures = [self._capture(s, runner) for s in sessions]
        slots = np.array([s.slot for s in sessions], np.int32)
        fut = asyncio.get_running_loop().run_in_executor(runner.executor, runner.read_rows, slots)
        self._pending.add(fut)
        fut.add_done_callback(functools.partial(self._rows_read, model, captures))
        return captures, fut

    def _rows_read(self, model: str, captures: list[_Capture], fut: asyncio.Future) -> None:
        self._pending.discard(fut)
        if fut.cancelled():
            return
        if fut.exception() is not None:
            log.error("reading state rows for snapshots failed: %r", fut.exception())
            return
        rows = fut.result()
        # A session released meanwhile has had its deletion queued: write nothing for it.
        items = [(c, rows[j]) for j, c in enumerate(captures) if not c.session.released]
        if items:
            self._submit(model, items)

    def _capture(self, s: Session, runner: RowRunner) -> _Capture:
        record = SnapshotRecord(
            key=token_key(s.token), session=s.id, model=s.model, fingerprint=runner.fingerprint,
            row=np.empty(0, np.int32), events=s.done_events, last_t=s.done_t,
            probs=None if s.probs is None else np.asarray(s.probs, np.float32), top_k=s.top_k,
            cropped=s.done_cropped, geometry=None if s.geometry is None else {
                "sensor": s.geometry.source.to_dict(), "transform": s.geometry.transform.to_dict()})
        return _Capture(s, s.version, s.epoch, s.last_active, record)

    def _submit(self, model: str, items: list[tuple[_Capture, np.ndarray]]) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._writer, self._write, items)
        self._pending.add(fut)
        fut.add_done_callback(lambda f: self._written(model, items, f))

    def _write(self, items: list[tuple[_Capture, np.ndarray]]) -> list[bool]:
        """Writer thread: encode and store a batch of records."""
        t0 = time.perf_counter()
        blobs = [(c.record.key, encode(dataclasses.replace(c.record, row=row, written=time.time())))
                 for c, row in items]
        ok = self.store.put(blobs)
        self.metrics.snapshot_write_seconds.observe(time.perf_counter() - t0)
        return ok

    def _written(self, model: str, items: list[tuple[_Capture, np.ndarray]], fut: asyncio.Future) -> None:
        """Event loop: a batch was written (or failed): advance ``durable`` and the versions."""
        self._pending.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self._store_error(exc, len(items))
            return
        ok: list[bool] = fut.result()
        written = 0
        for (c, _), good in zip(items, ok):
            s = c.session
            if not good:  # another server restored the session since: it is theirs now
                self.metrics.snapshot_failures.labels(reason="taken_over").inc()
                log.info("session %s was restored by another server; ending it here", s.id)
                self.on_taken_over(s)
                continue
            written += 1
            s.snap_version = max(s.snap_version, c.version)
            s.snap_active = max(s.snap_active, c.active)
            if s.durable is not None and c.epoch == s.epoch:  # events sent: kept and cropped
                s.durable = max(s.durable, c.record.events + c.record.cropped)
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
        """Wait for every row read and write asked for so far."""
        while self._pending:
            await asyncio.wait(list(self._pending))

    def forget(self, s: Session) -> None:
        """Delete a session's record (closed, evicted, failed or taken over)."""
        key = token_key(s.token)
        self._deleting[key] = self._deleting.get(key, 0) + 1
        fut = asyncio.get_running_loop().run_in_executor(self._writer, self.store.delete, [key])

        def done(f: asyncio.Future) -> None:
            left = self._deleting.pop(key) - 1
            if left:
                self._deleting[key] = left
            self._check(f)

        fut.add_done_callback(done)

    def _check(self, fut: asyncio.Future) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self._store_error(fut.exception(), 1)  # type: ignore[arg-type]

    # --- restoring ---------------------------------------------------------------------------
    async def lookup(self, token: str) -> tuple[SnapshotRecord, bytes, Adapter | None] | None:
        """The snapshot of ``token`` if there is one this server can restore (None: none, expired,
        damaged, or being deleted), its bytes and its declared source's adapter. Raises
        :class:`SnapshotIncompatible` or StoreUnavailable."""
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
        runner = self.runners.get(rec.model)
        problem = None
        if runner is None:
            problem = f"model {rec.model!r} is not served here (served: {sorted(self.runners)})"
        elif rec.fingerprint != runner.fingerprint:
            problem = (f"it was made for other weights of model {rec.model!r} (fingerprint "
                       f"{rec.fingerprint[:12]}, served {runner.fingerprint[:12]})")
        elif rec.row.size * 4 != runner.state_bytes or (
                rec.probs is not None and rec.probs.size != runner.num_classes):
            problem = f"its state does not fit model {rec.model!r}"
        adapter = None
        if problem is None and rec.geometry is not None:
            try:
                adapter = adapter_for(runner.sensor, rec.geometry.get("sensor"), rec.geometry.get("transform"))
            except (GeometryError, AttributeError, TypeError) as e:
                problem = f"its declared sensor does not fit model {rec.model!r}: {e}"
        if problem:
            self.metrics.snapshot_failures.labels(reason="incompatible").inc()
            raise SnapshotIncompatible(f"session {rec.session} cannot be restored: {problem}")
        return rec, blob, adapter

    def adopt(self, s: Session, rec: SnapshotRecord, blob: bytes) -> None:
        """A session was restored from ``rec``: the store already holds its state; in a shared
        store this server now owns its record (a replica that held it before can no longer write
        it)."""
        s.durable = rec.events + rec.cropped
        s.snap_version = s.version
        s.snap_active = s.last_active
        self.metrics.sessions_restored.labels(model=s.model).inc()
        if isinstance(self.store, RedisStore):  # shared: fence off the replica that held it
            fut = asyncio.get_running_loop().run_in_executor(
                self._writer, lambda: self.store.put([(rec.key, blob)], claim=True))
            fut.add_done_callback(self._check)
