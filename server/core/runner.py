"""Model runner: the server's only JAX-touching module.

Wraps a :class:`evssm.models.streaming.StreamingModel` with what serving needs: a pool of session
states on the default device (one row per slot, updated in place by donated, jitted steps), shape
buckets (every call is padded to a compiled ``(batch, length)`` shape, so steady traffic never
compiles), the offline classify path, softmax, and a count of XLA compilations attributed to the
model. Inputs and outputs are NumPy; nothing here knows about sessions or sockets.

Steps come as plain :class:`~evssm.server.plan.StepPlan` data and go back as one
:class:`~evssm.server.plan.StepResult` per step (probabilities, readiness and class order for the
whole batch, computed once; copies of the rows the plan asked for, for snapshots). Threads: the
scheduler's step thread is the only one that calls :meth:`ModelRunner.run` (and so touches the
state pool: rows are zeroed, written, stepped and read there only); one *classify* thread runs
:meth:`ModelRunner.classify`, so a large HTTP classification never holds up streaming steps.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from evssm.models.events import PAD_TOKEN, SensorSpec
from evssm.models.model import STATE_LAYOUT_VERSION
from evssm.models.streaming import StreamingModel, load_model, softmax
from evssm.models.wire import class_order

from .plan import StepPlan, StepResult
from .snapshots import weights_fingerprint

log = logging.getLogger("evssm.server.runner")

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_local = threading.local()  # .runner: the runner whose call is running on this thread
_listener_installed = False
_listener_lock = threading.Lock()
_PARK = os.environ.get("EVSSM_NATIVE_PARK", "1") != "0"
_COALESCE = os.environ.get("EVSSM_COALESCE", "1") != "0"


def _on_jax_event(event: str, duration_secs: float, **kwargs: str | int) -> None:
    if event == _BACKEND_COMPILE_EVENT:
        runner = getattr(_local, "runner", None)
        if runner is not None:
            runner._compiled()


def _install_compile_listener() -> None:
    """Count XLA backend compilations per runner: JAX reports them on the compiling thread."""
    global _listener_installed
    with _listener_lock:
        if not _listener_installed:
            jax.monitoring.register_event_duration_secs_listener(_on_jax_event)
            _listener_installed = True


def bucket(value: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= ``value`` (``value`` must fit the largest)."""
    i = bisect.bisect_left(buckets, value)
    if i == len(buckets):
        raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


class ModelRunner:
    """One served model: state pool, buckets, steps, classification (all blocking calls; run
    ``run`` on one thread at a time (the scheduler's step thread; ``warmup`` before it starts)
    and ``classify`` and ``warmup_classify`` on :attr:`classify_executor`)."""

    def __init__(self, name: str, model: StreamingModel, *, num_slots: int,
                 batch_buckets: tuple[int, ...], length_buckets: tuple[int, ...],
                 classify_length_buckets: tuple[int, ...] = (), classify_batch_events: int = 1 << 18,
                 on_compile: Callable[[str], None] | None = None):
        _install_compile_listener()
        self.name = name
        self.model = model
        self.config = model.config
        self.sensor: SensorSpec = model.config.sensor
        self.labels: tuple[str, ...] = tuple(model.config.labels)
        self.num_classes = model.config.num_classes
        self.state_bytes = int(model.state_bytes)
        self.num_slots = num_slots
        self.batch_buckets = tuple(sorted(set(batch_buckets)))
        self.length_buckets = tuple(sorted(set(length_buckets)))
        self.max_batch = self.batch_buckets[-1]
        self.max_length = self.length_buckets[-1]
        # Offline classify shapes: every length bucket, with the batch buckets whose padded batch
        # fits the event budget (always at least batch 1).
        lengths = sorted(set(self.length_buckets) | {L for L in classify_length_buckets if L > self.max_length})
        self.classify_shapes: dict[int, tuple[int, ...]] = {
            L: tuple(b for b in self.batch_buckets if b == 1 or b * L <= classify_batch_events)
            for L in lengths
        }
        self.classify_max_length = lengths[-1]
        self.on_compile = on_compile
        self.compilations = 0
        self.classify_executor = ThreadPoolExecutor(1, thread_name_prefix=f"evssm-classify-{name}")
        self.classify_ready = threading.Event()  # every classify shape compiled
        self._closed = False
        with self._attributed():
            self.pool = model.init_state(num_slots)  # the sessions' states: row = slot
        self.words = int(model.layout.words)  # int32 words of one state row
        # A session's queued packets share a step (scheduler.py): the native step reads out after
        # each packet of a row; XLA's reads out once per row. $EVSSM_COALESCE=0 turns it off (to
        # measure against).
        self.coalesces = model.native is not None and model.native.coalesces and _COALESCE
        config = {k: v for k, v in self.config.to_dict().items() if k != "name"}
        config["state_layout"] = STATE_LAYOUT_VERSION
        self.fingerprint = weights_fingerprint(  # a snapshot's row means the same only under these
            ((jax.tree_util.keystr(path), np.asarray(leaf))
             for path, leaf in jax.tree_util.tree_leaves_with_path(model.variables)), config)

    @property
    def info(self) -> dict[str, Any]:
        """JSON description for ``/v1/models`` and ``opened`` frames."""
        return {**self.model.info, "name": self.name, "config_name": self.config.name,
                "labels": list(self.labels), "state_bytes": self.state_bytes,
                "slots": self.num_slots, "batch_buckets": list(self.batch_buckets),
                "length_buckets": list(self.length_buckets)}

    # --- compilation accounting ----------------------------------------------------------------
    @contextlib.contextmanager
    def _attributed(self) -> Iterator[None]:
        prev = getattr(_local, "runner", None)
        _local.runner = self
        try:
            yield
        finally:
            _local.runner = prev

    def _compiled(self) -> None:
        self.compilations += 1
        if self.on_compile is not None:
            self.on_compile(self.name)

    # --- start-up --------------------------------------------------------------------------
    def warmup(self) -> float:
        """Make streaming ready: compile the step for every shape bucket (XLA's step; the native
        step needs none) and the pool's zero/read/write per batch bucket. Returns seconds taken.
        The offline classify buckets are :meth:`warmup_classify`'s, after the server is ready."""
        t0 = time.perf_counter()
        with self._attributed():
            if self.model.native is None:
                self.model.compile(list(self.batch_buckets), list(self.length_buckets),
                                   pool_size=self.num_slots, classify=False)
            for b in self.batch_buckets:  # all-padding rows: compiles, changes nothing
                pad = np.full(b, self.num_slots, np.int32)
                self.pool = self.model.zero_slots(self.pool, pad)
                self.model.read_slots(self.pool, pad)
                self.pool = self.model.write_slots(self.pool, pad, np.zeros((b, self.words), np.int32))
            jax.block_until_ready(self.pool)
        return time.perf_counter() - t0

    def warmup_classify(self) -> float:
        """Compile the offline form for every classify shape, shortest recordings first (the
        common requests are answerable soonest), then set :attr:`classify_ready`. Runs on
        :attr:`classify_executor`, so a request queued behind it waits for it. Returns seconds."""
        t0 = time.perf_counter()
        with self._attributed():
            for L, batches in self.classify_shapes.items():
                if self._closed:  # shutting down: the rest would only delay the exit
                    raise RuntimeError("the server is shutting down")
                self.model.compile(list(batches), [L], classify=True)
        self.classify_ready.set()
        return time.perf_counter() - t0

    # --- streaming (step thread) ---------------------------------------------------------------
    def _pad(self, tokens: list[np.ndarray], gaps: list[np.ndarray], batch: int, length: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``tokens[i]``/``gaps[i]`` padded to int32 [batch, length]; lengths int32 [batch]."""
        tok = np.full((batch, length), PAD_TOKEN, np.int32)
        gap = np.zeros((batch, length), np.int32)
        lengths = np.zeros(batch, np.int32)
        for i, (t, g) in enumerate(zip(tokens, gaps, strict=True)):
            n = t.shape[0]
            tok[i, :n] = t
            gap[i, :n] = g
            lengths[i] = n
        return tok, gap, lengths

    def run(self, plan: StepPlan) -> StepResult:
        """Zero ``plan.zero``, write ``plan.write_rows`` into ``plan.write_slots``, advance
        ``plan.slots`` by their ragged rows of the staging buffers, then copy ``plan.read`` out.
        The native step reads the rows in place; XLA's pads them once into the smallest compiled
        (batch, length) bucket. Softmax and the class order run once for the batch."""
        if plan.zero.size:
            self.zero(plan.zero)
        if plan.write_slots.size:
            self.write_rows(plan.write_slots, plan.write_rows)
        started = time.perf_counter()
        probs, ready, order = self._step(plan)
        seconds = time.perf_counter() - started
        rows = self.read_rows(plan.read) if plan.read.size else np.zeros((0, self.words), np.int32)
        return StepResult(probs, ready, order, started, seconds, rows)

    def _step(self, plan: StepPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Probs float32 [B, C], ready bool [B] and order int32 [B, C] of the plan's step."""
        batch = len(plan.slots)
        if batch == 0:
            empty = np.zeros((0, self.num_classes), np.float32)
            return empty, np.zeros(0, bool), empty.astype(np.int32)
        shape = None
        if self.model.native is None:
            longest = max(1, int(plan.lengths.max()))
            shape = (bucket(batch, self.batch_buckets), bucket(longest, self.length_buckets))
        with self._attributed():
            self.pool, logits_dev, ready_dev = self.model.step_slots_ragged(
                self.pool, plan.slots, plan.tokens, plan.gaps, plan.starts, plan.lengths, shape)
            logits = np.asarray(logits_dev)[:batch]
            ready = np.asarray(ready_dev)[:batch]
        probs = softmax(logits)
        order = class_order(probs)
        return probs, ready, order

    def prime(self) -> None:
        """A step is coming: wake the native step's helper threads now (no-op for XLA), so that
        their wake-up overlaps the packet's ingest instead of delaying the step. Cheap; safe from
        any thread."""
        if self.model.native is not None:
            self.model.native.prime()

    def park(self) -> None:
        """No step follows at once: the native step's helper threads sleep as soon as they are
        idle rather than spin out their budget (the next :meth:`prime` wakes them). No-op for
        XLA, or with ``$EVSSM_NATIVE_PARK=0`` (to measure against)."""
        if self.model.native is not None and _PARK:
            self.model.native.park()

    def helper_threads(self) -> list[int]:
        """Linux thread ids of the native step's helper threads (process-wide, shared by every
        model's step; none for XLA, or before the first step)."""
        return list(self.model.native.helper_threads()) if self.model.native is not None else []

    def zero(self, slots: np.ndarray) -> None:
        """Zero rows ``slots`` int32 [K] (in groups of at most the largest batch bucket)."""
        with self._attributed():
            for i in range(0, len(slots), self.max_batch):
                self.pool = self.model.zero_slots(self.pool, self._padded(slots[i:i + self.max_batch]))
            jax.block_until_ready(self.pool)

    def _padded(self, part: np.ndarray) -> np.ndarray:
        """Slots ``part`` int32 [k] padded with the pool size to the smallest batch bucket."""
        pad = np.full(bucket(len(part), self.batch_buckets), self.num_slots, np.int32)
        pad[:len(part)] = part
        return pad

    def read_rows(self, slots: np.ndarray) -> np.ndarray:
        """A copy of state rows ``slots`` int32 [K]: int32 [K, words] (step thread, between
        steps; in groups of at most the largest batch bucket, so no new shape compiles)."""
        out = np.empty((len(slots), self.words), np.int32)
        with self._attributed():
            for i in range(0, len(slots), self.max_batch):
                part = slots[i:i + self.max_batch]
                out[i:i + len(part)] = self.model.read_slots(self.pool, self._padded(part))[:len(part)]
        return out

    def write_rows(self, slots: np.ndarray, rows: np.ndarray) -> None:
        """Set state rows ``slots`` int32 [K] to ``rows`` int32 [K, words] (step thread)."""
        if rows.shape != (len(slots), self.words):
            raise ValueError(f"rows of shape {rows.shape}; the pool's rows are {self.words} words")
        with self._attributed():
            for i in range(0, len(slots), self.max_batch):
                part = slots[i:i + self.max_batch]
                pad = self._padded(part)
                block = np.zeros((len(pad), self.words), np.int32)
                block[:len(part)] = rows[i:i + len(part)]
                self.pool = self.model.write_slots(self.pool, pad, block)
            jax.block_until_ready(self.pool)

    def recover(self) -> bool:
        """After a failed step: if the donated pool was consumed, re-create it (all rows zero)."""
        if any(getattr(a, "is_deleted", lambda: False)() for a in jax.tree.leaves(self.pool)):
            log.error("runner %s: state pool lost in a failed step; re-created", self.name)
            with self._attributed():
                self.pool = self.model.init_state(self.num_slots)
            return True
        return False

    # --- offline classification (classify thread) ----------------------------------------------
    def classify(self, tokens: list[np.ndarray], gaps: list[np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Classify whole recordings from a zero state. ``tokens[i]``/``gaps[i]`` int32 [n_i].

        Recordings up to :attr:`classify_max_length` events run the offline form, sorted by length
        and padded to ``(batch, length)`` buckets; longer ones are streamed through scratch rows in
        chunks (the same function by the streaming invariant). Returns probs float32 [N, C] and
        ready bool [N] (False: fewer events than one final-rate window).
        """
        n = len(tokens)
        probs = np.zeros((n, self.num_classes), np.float32)
        ready = np.zeros(n, bool)
        sizes = np.array([t.shape[0] for t in tokens], np.int64)
        order = np.argsort(sizes, kind="stable")
        short = [int(i) for i in order if sizes[i] <= self.classify_max_length]
        long = [int(i) for i in order if sizes[i] > self.classify_max_length]
        with self._attributed():
            lengths = sorted(self.classify_shapes)
            pos = 0
            while pos < len(short):
                L = bucket(max(1, int(sizes[short[pos]])), tuple(lengths))
                group = [i for i in short[pos:] if sizes[i] <= L]
                b = min(len(group), self.classify_shapes[L][-1])
                Bb = bucket(b, self.classify_shapes[L])
                idx = group[:b]
                tok, gap, lens = self._pad([tokens[i] for i in idx], [gaps[i] for i in idx], Bb, L)
                logits, rdy = self.model.classify(tok, gap, lens)
                probs[idx] = softmax(np.asarray(logits)[:b])
                ready[idx] = np.asarray(rdy)[:b]
                pos += b
            for start in range(0, len(long), self.max_batch):
                idx = long[start:start + self.max_batch]
                p, r = self._stream_scratch([tokens[i] for i in idx], [gaps[i] for i in idx])
                probs[idx], ready[idx] = p, r
        return probs, ready

    def _stream_scratch(self, tokens: list[np.ndarray], gaps: list[np.ndarray]
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Stream up to ``max_batch`` recordings from a zero state through rows 0..B-1 of a
        scratch pool. The scratch pool has the session pool's shape, so the compiled step is
        reused; it lives only for this call, so it costs device memory only while in use."""
        B = len(tokens)
        Bb = bucket(B, self.batch_buckets)
        rows = np.full(Bb, self.num_slots, np.int32)
        rows[:B] = np.arange(B)
        scratch = self.model.init_state(self.num_slots)
        logits_out = np.zeros((B, self.num_classes), np.float32)
        ready_out = np.zeros(B, bool)
        longest = max(t.shape[0] for t in tokens)
        for off in range(0, longest, self.max_length):
            live = [i for i in range(B) if tokens[i].shape[0] > off]
            slot_arr = np.full(Bb, self.num_slots, np.int32)  # finished rows become padding
            slot_arr[live] = rows[live]
            chunk_t = [tokens[i][off:off + self.max_length] if i in live else tokens[i][:0] for i in range(B)]
            chunk_g = [gaps[i][off:off + self.max_length] if i in live else gaps[i][:0] for i in range(B)]
            L = bucket(max(1, max(c.shape[0] for c in chunk_t)), self.length_buckets)
            tok, gap, lens = self._pad(chunk_t, chunk_g, Bb, L)
            scratch, logits_dev, ready_dev = self.model.step_slots(scratch, slot_arr, tok, gap, lens)
            logits, rdy = np.asarray(logits_dev), np.asarray(ready_dev)
            logits_out[live] = logits[live]
            ready_out[live] = rdy[live]
        return softmax(logits_out), ready_out

    def close(self) -> None:
        self._closed = True
        self.classify_executor.shutdown(wait=False, cancel_futures=True)


def load_runner(name: str | None, source: str | None, *, model: StreamingModel | None = None,
                backend: str | None = None, **kwargs: Any) -> ModelRunner:
    """Load ``source`` (checkpoint dir, ``config:NAME``, None: default model) into a runner named
    ``name`` (None: the model config's name), its streaming step on ``backend`` (``auto``,
    ``native``, ``xla``). A ``model`` already loaded is used as is."""
    if model is None:
        model = load_model(source, backend=backend)
    return ModelRunner(name or model.config.name, model, **kwargs)
