"""The engine: models, the session table and one scheduler per model (no JAX at import, no wire).

The API layer talks to the engine only: open/resume sessions, the staging buffer a packet is
written into, submit work, classify, drain. The engine loads models (importing the JAX runner
lazily, in a background thread, so ``/healthz`` answers while models compile), evicts idle
sessions, and keeps the session metrics. Answers leave as plain records
(:class:`~.outputs.StepOutputs`, :class:`~.outputs.Ended`) through the sink the API layer gives
it. With ``--state-dir``/``--state-store`` it snapshots sessions (``server/core/durability.py``)
and restores, on resume, a token it does not hold from its snapshot.

Just over 400 lines on purpose: a session's whole life in the core (open, restore, evict, drain,
end) reads in one place beside the models it serves; the snapshot machinery is
``durability.py``, the batching ``scheduler.py``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..metrics import Metrics
from ..settings import ModelSpec, Settings
from .outputs import Ended, EndReason, OutputSink
from .scheduler import Scheduler
from .sessions import Client, Close, Item, LanesRefused, Restore, Session, SessionTable
from .snapshots import open_store, token_key
from .staging import StagingBuffer

if TYPE_CHECKING:  # the runner imports JAX; the API layer must not
    from evssm.models.streaming import StreamingModel

    from .durability import Durability
    from .runner import ModelRunner

log = logging.getLogger("evssm.server.engine")

RECENT_SESSIONS = 10  # sessions the live page lists with their answers


class Engine:
    """Everything behind the API of one server instance."""

    def __init__(self, settings: Settings, metrics: Metrics, sink: OutputSink,
                 models: dict[str, StreamingModel] | None = None):
        self.settings = settings
        self.metrics = metrics
        self.sink = sink
        self._preloaded = models
        self.runners: dict[str, ModelRunner] = {}
        self.schedulers: dict[str, Scheduler] = {}
        self.staging: dict[str, StagingBuffer] = {}
        self.table: SessionTable | None = None
        self.default_model: str | None = None
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self.connections: set[Client] = set()
        self.started_at = time.monotonic()
        self.ready_after_s: float | None = None
        self._tasks: list[asyncio.Task] = []
        self._drained = asyncio.Event()
        self.durability: Durability | None = None  # session snapshots (--state-dir/--state-store)
        self._restoring: dict[str, asyncio.Future] = {}  # token key -> a restore in progress
        self._ended: deque[dict[str, Any]] = deque(maxlen=RECENT_SESSIONS)  # newest last

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Begin loading models in the background. ``ready`` turns True when every model can
        stream; each model's classify shapes compile after that (:meth:`classify_ready`)."""
        self._tasks.append(asyncio.create_task(self._load(), name="evssm-load"))

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        try:
            store = None
            if s.snapshots:  # before the models: a locked or unusable store fails fast
                store = await loop.run_in_executor(None, functools.partial(
                    open_store, state_dir=s.state_dir, state_store=s.state_store, ttl_s=s.snapshot_ttl,
                    owner=secrets.token_hex(8)))
            # JAX is imported here, off the API layer's path.
            from evssm.models.xla_cache import use_compilation_cache

            cache = use_compilation_cache(s.compilation_cache_dir)
            log.info("JAX imported %.1f s after start; XLA compilation cache: %s",
                     time.monotonic() - self.started_at, cache or "off")

            slots = s.slots_per_model or s.max_sessions
            kwargs = dict(num_slots=slots, batch_buckets=s.batch_buckets, length_buckets=s.length_buckets,
                          classify_length_buckets=s.classify_length_buckets,
                          classify_batch_events=s.classify_batch_events, backend=s.backend,
                          on_compile=lambda name: self.metrics.compilations.labels(model=name).inc())
            jobs: list[tuple[str | None, str | None, StreamingModel | None]]
            if self._preloaded is not None:
                jobs = [(name, None, model) for name, model in self._preloaded.items()]
            else:
                jobs = [(spec.name, spec.source, None) for spec in (s.models or (ModelSpec(None, None),))]
            # Models load and compile side by side (XLA compiles and the checkpoint reads
            # release the GIL); the order of ``runners`` stays the order given.
            loaded = await asyncio.gather(*(loop.run_in_executor(None, functools.partial(
                self._load_one, name, source, model, kwargs)) for name, source, model in jobs))
            for runner in loaded:
                if runner.name in self.runners:
                    raise ValueError(f"two models are named {runner.name!r}; name them with NAME=SOURCE")
                self.metrics.init_model(runner.name, runner.state_bytes, runner.num_slots)
                self.sink.model_loaded(runner.name, runner.labels)
                self.runners[runner.name] = runner
                self.default_model = self.default_model or runner.name
            self.table = SessionTable(s.max_sessions, {n: r.num_slots for n, r in self.runners.items()})
            capacity = max(s.staging_events, 2 * s.max_packet_events + 1)
            if store is not None:
                from .durability import Durability

                self.durability = Durability(store, dict(self.runners), self.metrics, s.snapshot_interval,
                                             self._taken_over)
            for name, runner in self.runners.items():
                self.staging[name] = StagingBuffer(capacity)
                sched = Scheduler(runner, self.table, self.staging[name], self.sink,
                                  self.metrics.model(name), s.batch_wait_ms / 1000.0, self._released,
                                  self.durability)
                self.metrics.queue_depth.labels(model=name).set_function(_queued_packets(sched))
                sched.start()
                self.schedulers[name] = sched
            if self.durability is not None:
                self.durability.start(self.schedulers)
            self._tasks.append(asyncio.create_task(self._janitor(), name="evssm-janitor"))
            self.ready_after_s = time.monotonic() - self.started_at
            self.ready = True
            self.metrics.ready.set(1)
            # The ready line a person reads is the command line's (it knows the URL).
            log.debug("ready after %.1f s: models %s", self.ready_after_s, list(self.runners))
            for runner in self.runners.values():  # each on its classify thread, side by side
                self._tasks.append(asyncio.create_task(self._warm_classify(runner),
                                                       name=f"evssm-classify-warmup-{runner.name}"))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            # The message says what is wrong (a folder that is not a checkpoint, an unknown
            # config); the traceback is for debugging.
            log.error("loading models failed: %s", self.load_error)
            log.debug("loading models failed", exc_info=True)

    def _load_one(self, name: str | None, source: str | None, model: StreamingModel | None,
                  kwargs: dict[str, Any]) -> ModelRunner:
        """Load one model and make it ready to stream (a worker thread); logs what each phase
        cost."""
        from .runner import load_runner

        t0 = time.perf_counter()
        runner = load_runner(name, source, model=model, **kwargs)
        loaded_s = time.perf_counter() - t0
        compile_s = runner.warmup()  # no steps run yet
        phases = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in runner.model.timings.items())
        log.info("model %s from %s: ready to stream in %.1f s (loading %.1f s: %s; compiling the "
                 "streaming step %.1f s, %d compilations); %s streaming step; %d B of state per "
                 "session, %d slots; its classify shapes compile next", runner.name,
                 runner.model.info.get("source"), time.perf_counter() - t0, loaded_s, phases,
                 compile_s, runner.compilations, runner.model.backend, runner.state_bytes,
                 runner.num_slots)
        return runner

    async def _warm_classify(self, runner: ModelRunner) -> None:
        """Compile ``runner``'s classify shapes on its classify thread (POST /v1/classify answers
        ``busy`` for the model until then)."""
        loop = asyncio.get_running_loop()
        before = runner.compilations
        try:
            seconds = await loop.run_in_executor(runner.classify_executor, runner.warmup_classify)
        except Exception as e:  # classify stays unavailable; streaming is unaffected
            log.error("model %s: compiling its classify shapes failed: %s: %s", runner.name,
                      type(e).__name__, e)
            return
        log.info("model %s: classify ready after %.1f s (compiling %.1f s, %d compilations)",
                 runner.name, time.monotonic() - self.started_at, seconds,
                 runner.compilations - before)

    def classify_ready(self, model: str) -> bool:
        """``model``'s offline classify shapes are compiled (streams need not wait for them)."""
        return self.runners[model].classify_ready.is_set()

    async def stop(self) -> None:
        """Stop schedulers and background tasks (after a drain, or abruptly)."""
        for sched in self.schedulers.values():
            await sched.stop()
        if self.durability is not None:
            await self.durability.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        for runner in self.runners.values():
            runner.close()

    # --- sessions ------------------------------------------------------------------------------
    def open(self, model: str, top_k: int, *, owner: str | None = None, key_id: str | None = None,
             lanes: int | None = None) -> Session:
        """A new session of ``model`` for ``owner`` (raises ``sessions.ServerFull``, or its
        subclass ``ClientFull`` past ``Settings.sessions_per_client``). ``lanes``: a window's ``L``
        rows (None: one row), counted as ``L`` sessions; ``LanesRefused`` where one step cannot
        hold them all."""
        assert self.table is not None
        if lanes is not None:
            batch = self.runners[model].max_batch
            if lanes > batch:
                raise LanesRefused(f"the window needs {lanes} lanes; this server steps at most {batch} "
                                   f"rows at once (its largest batch bucket): raise the hop")
        session = self.table.open(model, top_k, owner=owner, owner_limit=self.settings.sessions_per_client,
                                  key_id=key_id, lanes=lanes or 1)
        self.schedulers[model].add(session)
        self.metrics.model(model).session_live(len(session.slots))
        self.metrics.sessions_opened.labels(model=model).inc()
        return session

    def resume(self, token: str) -> Session | None:
        return None if self.table is None else self.table.by_token(token)

    def durable(self, session: Session) -> int | None:
        """Events sent that ``session``'s last snapshot covers (None: no snapshots are kept)."""
        return self.schedulers[session.model].durable_of(session)

    async def restore(self, token: str, *, key_id: str | None, owner: str | None,
                      window: Callable[[dict], Any] | None = None) -> Session | None:
        """The session of ``token`` restored from its snapshot, for a token this server does not
        hold, resumed by a client with API key ``key_id`` (None: no snapshot, one opened under
        another key, or snapshots are off). It counts against ``owner``'s sessions. ``window``:
        the API layer's planner from a snapshot's window (its ``state`` the lane state). Raises
        ``sessions.ServerFull`` (or ``ClientFull``), ``durability.SnapshotIncompatible`` or
        ``snapshots.StoreUnavailable``."""
        if self.durability is None or self.table is None or self.table.knows(token):
            return None
        key = token_key(token)
        if key in self._restoring:  # another connection is restoring it: share the outcome
            await asyncio.shield(self._restoring[key])
            return self.table.by_token(token)
        done = asyncio.get_running_loop().create_future()
        self._restoring[key] = done
        try:
            found = await self.durability.lookup(token, key_id)
            if found is None or self.table.knows(token):
                return None
            rec, blob, adapter, filters = found
            planner = self.durability.window_of(rec, window, self.runners[rec.model].max_batch)
            session = self.table.restore(rec.model, rec.top_k, rec.session, token, owner=owner,
                                         owner_limit=self.settings.sessions_per_client, key_id=rec.key_id,
                                         events=rec.events, last_t=rec.last_t, cropped=rec.cropped,
                                         geometry=adapter, filters=filters, lanes=rec.lanes)
            session.live = rec.live  # plain data; the API layer takes it up (sessions.Session)
            session.window = planner
            self.schedulers[rec.model].restore(session, Restore(
                row=rec.row.reshape(rec.lanes, -1), events=rec.events, last_t=rec.last_t, probs=rec.probs,
                cropped=rec.cropped, filters=None if filters is None else filters[1],
                window=getattr(planner, "state", None)))
            self.metrics.model(rec.model).session_live(len(session.slots))
            self.durability.adopt(session, rec, blob)
            log.info("session %s of %s restored from its snapshot at %d events", session.id, rec.model,
                     rec.events)
            return session
        finally:
            del self._restoring[key]
            done.set_result(None)

    def expect(self, model: str) -> None:
        """A packet for ``model`` is being read (see ``Scheduler.expect``)."""
        self.schedulers[model].expect()

    def submit(self, session: Session, item: Item) -> None:
        self.schedulers[session.model].submit(session, item)

    def close(self, session: Session, reply: Any) -> None:
        """The client closes ``session``: no more work, no resume; it is freed once everything
        before the close is answered (``reply``: the close's place in the client's outbox)."""
        assert self.table is not None
        self.table.end(session)
        self.submit(session, Close(reply=reply, events=session.events))

    def idle(self, session: Session) -> bool:
        """No work of ``session`` queued or running."""
        return self.schedulers[session.model].idle(session)

    def _released(self, session: Session) -> None:
        self.metrics.model(session.model).session_gone(len(session.slots))
        summary = session_summary(session, live=False)
        self._ended.append(summary)
        answer = "no answer yet" if session.answer is None else \
            f"answer {summary['label']} (p {summary['probability']:.3f})"
        log.info("session %s of %s ended after %.1f s: %d events, %s", session.id, session.model,
                 time.monotonic() - session.opened, session.events, answer)
        if self.durability is not None:
            self.durability.forget(session)

    def _taken_over(self, session: Session) -> None:
        """Another server restored this session from the shared store: end it here."""
        if not SessionTable.end(session):
            return
        self.sink.ended(Ended(session, EndReason.TAKEN_OVER, f"session {session.id} was resumed on another server"))
        self.schedulers[session.model].release_now(session)

    def recent_sessions(self) -> list[dict[str, Any]]:
        """The ``RECENT_SESSIONS`` sessions active last, live or ended, newest first, with their
        answers (:func:`session_summary`): what the live page lists."""
        live = [] if self.table is None else [session_summary(s, live=True)
                                              for s in self.table.sessions.values()]
        ordered = sorted(live + list(self._ended), key=lambda r: r["last_active"], reverse=True)
        now = time.monotonic()
        return [{**{k: v for k, v in r.items() if k != "last_active"},
                 "idle_s": round(now - r["last_active"], 1)} for r in ordered[:RECENT_SESSIONS]]

    def cpu_threads(self) -> dict[str, list[int]]:
        """Linux ids of the threads of the CPU account's ``step`` and ``native_helper`` parts."""
        steps = [s.thread_id for s in list(self.schedulers.values())]
        helpers = {tid for r in list(self.runners.values()) for tid in r.helper_threads()}
        return {"step": [t for t in steps if t is not None], "native_helper": sorted(helpers)}

    def sessions_by_model(self) -> dict[str, int]:
        if self.table is None:
            return {name: 0 for name in self.runners}
        return self.table.counts()

    async def _janitor(self) -> None:
        """Evict sessions idle longer than the timeout (attached or not)."""
        timeout = self.settings.session_idle_timeout
        period = min(1.0, max(0.01, timeout / 4))
        while True:
            await asyncio.sleep(period)
            self.evict_idle(time.monotonic() - timeout)

    def evict_idle(self, before: float) -> int:
        """Evict sessions with no work whose last activity is older than ``before``."""
        assert self.table is not None
        evicted = 0
        for session in list(self.table.sessions.values()):
            if not session.open or not self.idle(session) or session.last_active >= before:
                continue
            self.table.end(session)
            self.sink.ended(Ended(session, EndReason.EXPIRED, f"session {session.id} was evicted after "
                                  f"{self.settings.session_idle_timeout:g} s idle"))
            if self.schedulers[session.model].release_now(session):
                self.metrics.sessions_evicted.labels(model=session.model).inc()
                evicted += 1
        return evicted

    # --- classification ----------------------------------------------------------------------
    async def classify(self, model: str, tokens: list[np.ndarray], gaps: list[np.ndarray]
                       ) -> tuple[np.ndarray, np.ndarray]:
        runner = self.runners[model]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(runner.classify_executor, runner.classify, tokens, gaps)

    # --- drain -------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Sessions with work queued or running."""
        return sum(s.pending for s in self.schedulers.values())

    async def drain(self, timeout: float | None = None) -> bool:
        """Refuse new sessions and packets, finish and answer in-flight packets, snapshot every
        session (with snapshots), then close every connection cleanly (1001). True if everything
        finished within ``timeout``.

        The snapshots get ``timeout`` of their own, whatever the in-flight packets left of it: a
        drain whose packets ran out of time (a loaded machine, a long step) still writes every
        session's snapshot, so that its resume token outlives the process."""
        timeout = self.settings.drain_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self.draining = True
        self.metrics.ready.set(0)
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        finished = not self.pending
        if self.durability is not None:  # every session, before its client is told to go
            try:
                await asyncio.wait_for(self._snapshot_all(), timeout)
            except TimeoutError:
                finished = False
                log.error("drain: the snapshots did not finish within the drain timeout")
        for conn in list(self.connections):
            conn.going_away()
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._drained.set()
        log.info("drained: %s", "clean" if finished and not self.connections else "timed out")
        return finished and not self.connections

    async def _snapshot_all(self) -> None:
        assert self.durability is not None
        t0 = time.perf_counter()
        n = await self.durability.snapshot(everything=True)
        await self.durability.flush()
        log.info("drain: %d session snapshots written in %.2f s", n, time.perf_counter() - t0)


def _queued_packets(sched: Scheduler) -> Callable[[], float]:
    """The queue-depth gauge's reading of ``sched`` (bound now, not when the loop ends)."""
    return lambda: sched.queued_packets


def session_summary(session: Session, *, live: bool) -> dict[str, Any]:
    """What the live page shows of a session: its answer and counts, no event data and nothing
    that would let anyone resume it (the token stays private)."""
    label, prob = session.answer if session.answer is not None else (None, None)
    out = {"session": session.id, "model": session.model, "label": label,
           "probability": None if prob is None else round(float(prob), 4),
           "events": session.events, "live": live, "last_active": session.last_active}
    lag_ms = getattr(session.live, "last_lag_ms", None)  # a realtime session's (server/api/live.py)
    if lag_ms is not None:
        out["lag_ms"] = round(float(lag_ms), 1)
    return out
