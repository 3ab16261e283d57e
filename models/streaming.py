"""Inference runner: the model's streaming and offline forms as jitted, shape-bucketed functions.

A session's carried state is a pytree of fixed-shape arrays (``state_spec``): for every layer the
SSM state after the last event and at the current window's first event, the partial pooling
window (weighted sums, weight, dt) and the event count modulo the stride; for the head the running
pool; with the time look-ahead (``ModelConfig.time_lookahead``), the token that waits for the
next event's time. Streaming a recording packet by packet gives the same logits, after every packet, as the
offline form on the prefix seen so far (``tests/test_streaming_invariant.py``).

Between calls the state travels packed, one int32 row per session (:class:`StateLayout`): a jitted
call pays per argument and per result buffer (measured on the build machine: a call that only
passes the twenty-leaf DVS state through takes ~99 us, one packed array ~25 us).

At inference the first layer's per-event inputs depend on the token alone; they are tabulated
once per model (``EventSSM.token_tables``) and gathered per event.

The streaming step has two backends with the same packed rows: on a CPU the native step
(:mod:`evssm.models.native`, one C++ call; rows are NumPy arrays updated in place), elsewhere, or
on request, the Flax model jitted through XLA. The offline form is always XLA's.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import jax
import jax.numpy as jnp
import numpy as np

from .config import STREAMING_BACKENDS, ModelConfig, load_model_config
from .events import PAD_TOKEN
from .model import EventSSM, State, init_state, is_spec_leaf, state_spec
from .native import NativeStep, NativeUnavailable

log = logging.getLogger(__name__)

Array = jax.Array
# What the public methods take and give: packed state rows are NumPy arrays with the native step
# (updated in place) and JAX arrays with XLA's; int32 inputs may be either.
AnyArray = np.ndarray | jax.Array

DEFAULT_MODEL_DIR = Path(__file__).parent / "pretrained" / "event-mnist"
DEFAULT_MODEL_CONFIG = "event-mnist"


class _Jitted(Protocol):
    """A ``jax.jit`` function as :meth:`StreamingModel._call` uses it: callable, with the count
    of executables it has compiled (a method of JAX's jitted functions that its type
    annotations do not declare)."""

    def __call__(self, *args: Any) -> Any: ...

    def _cache_size(self) -> int: ...


class StateLayout:
    """The carried-state pytree of ``state_spec`` packed into one int32 row per session.

    The row holds the float words first (complex leaves as their real then imaginary parts, then
    float leaves), reinterpreted as int32 in one ``bitcast_convert_type``, then the int32 leaves.
    Packing is exact, and a zero row is a fresh session's zero state. ``4 * words`` is the
    session's state in bytes.
    """

    def __init__(self, config: ModelConfig):
        leaves, treedef = jax.tree.flatten(state_spec(config), is_leaf=is_spec_leaf)
        # A jax.tree_util.PyTreeDef; jaxlib declares none of its methods to type checkers.
        self.treedef: Any = treedef
        self.leaves = [(tuple(shape), np.dtype(dtype)) for shape, dtype in leaves]
        sizes = [int(np.prod(shape, dtype=np.int64)) for shape, _ in self.leaves]
        self.float_words = sum(n * (2 if dtype == np.complex64 else 1)
                               for n, (_, dtype) in zip(sizes, self.leaves, strict=True) if dtype != np.int32)
        self.words = self.float_words + sum(n for n, (_, dtype) in zip(sizes, self.leaves, strict=True)
                                            if dtype == np.int32)
        # Word offset of every leaf in a row (a complex leaf's real parts; n words later its
        # imaginary parts), in leaf order and as a pytree shaped like the state.
        self.sizes = sizes
        self.flat_offsets: list[int] = []
        f_at, i_at = 0, self.float_words
        for n, (_, dtype) in zip(sizes, self.leaves, strict=True):
            if dtype == np.int32:
                self.flat_offsets.append(i_at)
                i_at += n
            else:
                self.flat_offsets.append(f_at)
                f_at += n * (2 if dtype == np.complex64 else 1)
        self.offsets = jax.tree.unflatten(self.treedef, self.flat_offsets)

    def pack(self, state: State) -> Array:
        """Batched state pytree -> int32 [B, words]."""
        floats, ints = [], []
        for leaf, (_, dtype) in zip(self.treedef.flatten_up_to(state), self.leaves, strict=True):
            flat = leaf.reshape(leaf.shape[0], -1)
            if dtype == np.complex64:
                floats += [flat.real, flat.imag]
            elif dtype == np.int32:
                ints.append(flat)
            else:
                floats.append(flat)
        words = jax.lax.bitcast_convert_type(jnp.concatenate(floats, 1), jnp.int32)
        return jnp.concatenate([words, *ints], 1)

    def unpack(self, packed: Array) -> State:
        """int32 [B, words] -> batched state pytree."""
        batch = packed.shape[0]
        floats = jax.lax.bitcast_convert_type(packed[:, :self.float_words], jnp.float32)
        leaves = []
        for (shape, dtype), n, at in zip(self.leaves, self.sizes, self.flat_offsets, strict=True):
            if dtype == np.complex64:
                flat = jax.lax.complex(floats[:, at:at + n], floats[:, at + n:at + 2 * n])
            elif dtype == np.int32:
                flat = packed[:, at:at + n]
            else:
                flat = floats[:, at:at + n]
            leaves.append(flat.reshape(batch, *shape))
        return jax.tree.unflatten(self.treedef, leaves)


class StreamingModel:
    """A loaded model with streaming (``step``, ``step_slots``) and offline (``classify``)
    functions. ``backend`` says which streaming step runs (``native`` or ``xla``); XLA's
    executables are cached per input shape and ``compilations`` counts them."""

    def __init__(self, config: ModelConfig, variables: dict[str, Any], *,
                 info: dict[str, Any] | None = None, backend: str | None = None):
        self.config = config
        self.module = EventSSM(config)
        self.variables = {"params": variables["params"],
                          "batch_stats": variables.get("batch_stats", {})}
        # Seconds each start-up phase took (the server logs them): reading a checkpoint, the
        # token tables (one XLA program), the streaming step.
        self.timings: dict[str, float] = {}
        started = time.perf_counter()
        self.tables = jax.jit(lambda v: self.module.apply(v, method=EventSSM.token_tables))(
            self.variables)
        jax.block_until_ready(self.tables)
        self.timings["tables_s"] = time.perf_counter() - started
        self.layout = StateLayout(config)
        self.state_bytes = 4 * self.layout.words
        started = time.perf_counter()
        self.native = self._resolve_backend(backend)
        self.timings["step_s"] = time.perf_counter() - started
        self.backend = "xla" if self.native is None else "native"
        self.info = {
            "name": config.name,
            "classes": list(config.labels),
            "num_classes": config.num_classes,
            "sensor": config.sensor.to_dict(),
            "downsampling": config.downsampling,
            # Events a session's answer lags behind (1 with the reference's time look-ahead).
            "lookahead_events": int(config.time_lookahead),
            "state_bytes": self.state_bytes,
            "backend": self.backend,
            "trained": False,
            "source": "random-init",
            **(info or {}),
        }
        self.compilations = 0
        self._lock = threading.Lock()
        # The parameters are closed over (compile-time constants), not passed: XLA folds every
        # parameter-derived value (Lambda * Delta, gains, transposed and merged weights) once,
        # and a call skips ~60 argument buffers. The tables stay arguments: they are large, and
        # a constant would be copied into every shape bucket's executable.
        variables = self.variables
        def jit(fn: Callable[..., Any], donate: tuple[int, ...] = ()) -> _Jitted:
            return cast(_Jitted, jax.jit(fn, donate_argnums=donate))  # see _Jitted

        self._jitted = {
            "step": jit(functools.partial(self._step_impl, variables)),
            "step_slots": jit(functools.partial(self._step_slots_impl, variables), (1,)),
            "zero_slots": jit(self._zero_slots_impl, (0,)),
            "read_slots": jit(self._read_slots_impl),
            "write_slots": jit(self._write_slots_impl, (0,)),
            "classify": jit(functools.partial(self._classify_impl, variables)),
        }

    def _resolve_backend(self, backend: str | None) -> NativeStep | None:
        """The streaming step's backend: ``native`` (the C++ kernel, CPU only), ``xla``, or
        ``auto`` (native where it builds, else xla). Default: ``$EVSSM_BACKEND``, else auto."""
        backend = backend or os.environ.get("EVSSM_BACKEND") or "auto"
        if backend not in STREAMING_BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of "
                             f"{', '.join(STREAMING_BACKENDS)}")
        if backend == "xla" or (backend == "auto" and jax.default_backend() != "cpu"):
            return None
        if jax.default_backend() != "cpu":
            raise NativeUnavailable(f"the native step runs on CPU; JAX's backend is "
                                    f"{jax.default_backend()!r}")
        try:
            return NativeStep(self.config, self.variables, self.tables, self.layout.offsets,
                              self.layout.words)
        except NativeUnavailable as exc:
            if backend == "native":
                raise
            log.warning("native streaming step unavailable, using XLA's: %s", exc)
            return None

    # --- constructors ------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ModelConfig, seed: int = 0, *,
                    backend: str | None = None) -> StreamingModel:
        """A randomly initialised model (deterministic per ``seed``)."""
        return cls(config, init_variables(config, seed),
                   info={"source": f"random-init(seed={seed})", "trained": False},
                   backend=backend)

    @classmethod
    def load(cls, directory: str | Path, *, backend: str | None = None) -> StreamingModel:
        """Load a checkpoint directory written by the trainer."""
        from .checkpoint import load_checkpoint

        started = time.perf_counter()
        config, variables, meta = load_checkpoint(directory)
        read_s = time.perf_counter() - started
        summary = meta.get("summary", {})
        info = {"source": str(directory), "trained": True, "task": meta.get("task"),
                "summary": summary}
        if "origin" in meta:
            info["origin"] = meta["origin"]
        model = cls(config, variables, info=info, backend=backend)
        model.timings["checkpoint_s"] = read_s
        return model

    # --- pure implementations ----------------------------------------------------------------
    def _apply(self, variables: dict, tables: tuple, state: State, tokens: Array, gaps: Array,
               lengths: Array) -> tuple[Array, Array, State]:
        # With no mutable collections Flax's apply returns the module's own result; its
        # annotation also covers the (result, updated variables) form of mutable=...
        out = self.module.apply(variables, tokens, gaps, lengths, state, tables=tables)
        return cast(tuple[Array, Array, State], out)

    def _step_impl(self, variables, tables, packed, tokens, gaps, lengths):
        state = self.layout.unpack(packed)
        logits, ready, state = self._apply(variables, tables, state, tokens, gaps, lengths)
        return self.layout.pack(state), logits, ready

    def _step_slots_impl(self, variables, tables, pool, slots, tokens, gaps, lengths):
        # Out-of-range slots mark padding rows: reads clip, writes drop.
        state = self.layout.unpack(pool.at[slots].get(mode="clip"))
        logits, ready, state = self._apply(variables, tables, state, tokens, gaps, lengths)
        pool = pool.at[slots].set(self.layout.pack(state), mode="drop")
        return pool, logits, ready

    @staticmethod
    def _zero_slots_impl(pool, slots):
        return pool.at[slots].set(0, mode="drop")

    @staticmethod
    def _read_slots_impl(pool, slots):
        return pool.at[slots].get(mode="clip")  # padding rows read some row; callers drop them

    @staticmethod
    def _write_slots_impl(pool, slots, rows):
        return pool.at[slots].set(rows, mode="drop")

    def _classify_impl(self, variables, tables, tokens, gaps, lengths):
        state = init_state(self.config, tokens.shape[0])
        logits, ready, _ = self._apply(variables, tables, state, tokens, gaps, lengths)
        return logits, ready

    # --- dispatch -----------------------------------------------------------------------------
    def _call(self, name: str, *args: Any) -> Any:
        """Call jitted ``name`` through JAX's fast path, counting new compilations (one per new
        input shape; ``compile`` makes them all before traffic)."""
        fn = self._jitted[name]
        before = fn._cache_size()
        out = fn(*args)
        after = fn._cache_size()
        if after != before:
            with self._lock:
                self.compilations += after - before
        return out

    # --- public API --------------------------------------------------------------------------
    def init_state(self, batch: int) -> AnyArray:
        """Packed zero state (fresh sessions) for ``batch`` sessions: int32 [B, words] (a NumPy
        array with the native backend, a JAX array with XLA's)."""
        if self.native is not None:
            return np.zeros((batch, self.layout.words), np.int32)
        return jnp.zeros((batch, self.layout.words), jnp.int32)

    def unpack_state(self, packed: AnyArray) -> State:
        """The state pytree (``state_spec``, leading axis B) of packed states [B, words]."""
        return self.layout.unpack(jnp.asarray(packed))

    def pack_state(self, state: State) -> Array:
        """Packed int32 [B, words] of a batched state pytree."""
        return self.layout.pack(state)

    def step(self, state: AnyArray, tokens: AnyArray, gaps: AnyArray, lengths: AnyArray
             ) -> tuple[AnyArray, AnyArray, AnyArray]:
        """Advance ``B`` sessions by one packet each.

        state int32 [B, words] (packed, from :meth:`init_state` or an earlier step), tokens int32
        [B, L] (-1 padding), gaps int32 [B, L] (microseconds since the session's previous event;
        0 for its first event and for padding), lengths int32 [B]
        -> ``(state', logits float32 [B, C], ready bool [B])``. ``state`` itself is unchanged.
        """
        if self.native is not None:
            rows = np.array(state, np.int32, order="C")  # a copy: step returns a new state
            logits, ready = self.native.step_rows(rows, None, tokens, gaps, lengths)
            return rows, logits, ready
        return self._call("step", self.tables, state, _i32(tokens), _i32(gaps), _i32(lengths))

    def stream(self, tokens: np.ndarray, gaps: np.ndarray, sizes: list[int], bucket: int
               ) -> tuple[np.ndarray, bool]:
        """One recording (tokens, gaps int32 [N]) streamed through :meth:`step` in packets of
        ``sizes`` events (summing to N), each padded to ``bucket`` events so that one shape is
        compiled. Returns the last packet's ``(logits float32 [C], ready)``."""
        state, pos = self.init_state(1), 0
        logits: AnyArray = np.zeros((1, self.config.num_classes), np.float32)
        ready: AnyArray = np.zeros(1, bool)
        for size in sizes:
            tok, gap, lens = pad_rows(tokens, gaps, np.array([pos], np.int64),
                                      np.array([size], np.int32), 1, bucket)
            state, logits, ready = self.step(state, tok, gap, lens)
            pos += size
        assert pos == len(tokens), "packet sizes must sum to the recording's length"
        return np.asarray(logits)[0], bool(np.asarray(ready)[0])

    def step_slots(self, pool: AnyArray, slots: AnyArray, tokens: AnyArray, gaps: AnyArray,
                   lengths: AnyArray) -> tuple[AnyArray, AnyArray, AnyArray]:
        """:meth:`step` on rows ``slots`` (int32 [B]) of a session pool (packed states
        [N, words]), in place (``pool`` is donated; use the pool returned). A slot index equal to
        the pool size marks a padding row."""
        if self.native is not None:
            rows = _writable_rows(pool)
            logits, ready = self.native.step_rows(rows, np.asarray(slots), tokens, gaps, lengths)
            return rows, logits, ready
        return self._call("step_slots", self.tables, pool, _i32(slots),
                          _i32(tokens), _i32(gaps), _i32(lengths))

    def step_slots_ragged(self, pool: AnyArray, slots: np.ndarray, tokens: np.ndarray,
                          gaps: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                          shape: tuple[int, int] | None = None
                          ) -> tuple[AnyArray, AnyArray, AnyArray]:
        """:meth:`step_slots` on ragged packets: session ``b`` (row ``slots[b]``, int32 [B])
        reads ``tokens/gaps[starts[b] : starts[b] + lengths[b]]`` of flat int32 buffers [E]
        (starts int64 [B], lengths int32 [B]). The native step reads the buffers in place; XLA's
        needs a rectangle, so the rows are padded once into ``shape`` = (batch >= B, length >=
        max(lengths)) (default: exactly B x max(lengths)); padding rows get the pool size as
        their slot. Returns ``(pool, logits [batch, C], ready [batch])``."""
        if self.native is not None:
            rows = _writable_rows(pool)
            logits, ready = self.native.step_ragged(rows, slots, tokens, gaps, starts, lengths)
            return rows, logits, ready
        batch, length = shape or (len(lengths), max(1, int(lengths.max(initial=0))))
        tok, gap, lens = pad_rows(tokens, gaps, starts, lengths, batch, length)
        padded = np.full(batch, pool.shape[0], np.int32)
        padded[:len(slots)] = slots
        return self.step_slots(pool, padded, tok, gap, lens)

    def zero_slots(self, pool: AnyArray, slots: AnyArray) -> AnyArray:
        """Zero rows ``slots`` (int32 [K]; the pool size marks padding) of a pool (donated)."""
        if self.native is not None:
            rows, index = _writable_rows(pool), np.asarray(slots)
            rows[index[(index >= 0) & (index < rows.shape[0])]] = 0
            return rows
        return self._call("zero_slots", pool, _i32(slots))

    def read_slots(self, pool: AnyArray, slots: AnyArray) -> np.ndarray:
        """A host copy of rows ``slots`` (int32 [K]; the pool size marks padding, whose rows are
        unspecified) of a pool: int32 [K, words]. The pool is not donated."""
        if self.native is not None:
            index = np.asarray(slots)
            return np.asarray(pool)[np.minimum(index, pool.shape[0] - 1)]  # a fancy index copies
        return np.asarray(self._call("read_slots", pool, _i32(slots)))

    def write_slots(self, pool: AnyArray, slots: AnyArray, rows: AnyArray) -> AnyArray:
        """Set rows ``slots`` (int32 [K]; the pool size marks padding) of a pool (donated) to
        ``rows`` int32 [K, words]. Returns the pool."""
        if self.native is not None:
            target, index = _writable_rows(pool), np.asarray(slots)
            keep = (index >= 0) & (index < target.shape[0])
            target[index[keep]] = np.asarray(rows, np.int32)[keep]
            return target
        return self._call("write_slots", pool, _i32(slots), _i32(rows))

    def classify(self, tokens: AnyArray, gaps: AnyArray, lengths: AnyArray) -> tuple[Array, Array]:
        """Offline form: whole recordings from a zero state.

        tokens, gaps int32 [B, L]; lengths int32 [B] -> ``(logits [B, C], ready bool [B])``.
        """
        return self._call("classify", self.tables, _i32(tokens), _i32(gaps),
                          _i32(lengths))

    def compile(self, batch_buckets: list[int], length_buckets: list[int], *,
                pool_size: int | None = None, classify: bool = True) -> int:
        """Compile ``step_slots`` (for a pool of ``pool_size`` rows) and ``classify`` for every
        ``(batch, length)`` bucket ahead of traffic, by running each once on padding.
        Returns the number of new compilations."""
        before = self.compilations
        pool = None if pool_size is None else self.init_state(pool_size)
        for b in batch_buckets:
            for length in length_buckets:
                ints = np.zeros((b, length), np.int32)
                vec = np.zeros(b, np.int32)
                if pool is not None:
                    # Every row is padding (slot index == pool size): nothing is written; the
                    # donated pool comes back and serves the next bucket.
                    pool, logits, _ = self.step_slots(pool, vec + pool.shape[0], ints, ints, vec)
                    jax.block_until_ready(logits)
                if classify:
                    jax.block_until_ready(self.classify(ints, ints, vec))
        return self.compilations - before


def pad_rows(tokens: np.ndarray, gaps: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
             batch: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ragged rows ``tokens/gaps[starts[b] : starts[b] + lengths[b]]`` of flat int32 buffers
    -> padded int32 [batch, length] (``PAD_TOKEN`` and gap 0 past each row's end; rows past
    ``len(lengths)`` all padding) and lengths int32 [batch]. One gather per buffer."""
    rows = len(lengths)
    if rows > batch or (rows and int(lengths.max()) > length):
        raise ValueError(f"{rows} rows of up to {int(lengths.max(initial=0))} events do not fit "
                         f"{batch} x {length}")
    lens = np.zeros(batch, np.int32)
    lens[:rows] = lengths
    at = np.zeros(batch, np.int64)
    at[:rows] = starts
    cols = np.arange(length)
    inside = cols < lens[:, None]  # [batch, length]
    index = np.where(inside, at[:, None] + cols, 0)
    if tokens.size == 0:
        return (np.full((batch, length), PAD_TOKEN, np.int32), np.zeros((batch, length), np.int32),
                lens)
    tok = np.where(inside, tokens[index], PAD_TOKEN).astype(np.int32, copy=False)
    gap = np.where(inside, gaps[index], 0).astype(np.int32, copy=False)
    return tok, gap, lens


def random_packet_sizes(rng: np.random.Generator, n: int, max_packet: int) -> list[int]:
    """Random packet sizes summing to ``n``: empty, 1-event, small and large packets (up to
    ``max_packet``), the packetisations streaming is checked against the offline form on."""
    sizes: list[int] = []
    while sum(sizes) < n:
        size = int(rng.choice([0, 1, 2, int(rng.integers(3, 64)), int(rng.integers(64, max_packet + 1))]))
        sizes.append(min(size, n - sum(sizes)))
    return sizes


def softmax(logits: np.ndarray) -> np.ndarray:
    """The served probabilities of logits [B, C]: row-wise ``exp(z - max z) / sum exp(z - max z)``,
    computed in float64, returned float32 [B, C] (one function for every path that answers)."""
    z = np.asarray(logits).astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _writable_rows(pool: Any) -> np.ndarray:
    """The pool as a writable C-contiguous int32 NumPy array (itself when it already is one)."""
    if (isinstance(pool, np.ndarray) and pool.dtype == np.int32 and pool.flags.c_contiguous
            and pool.flags.writeable):
        return pool
    return np.array(pool, np.int32, order="C")


def _i32(a: Any) -> Any:
    """int32 array-like, without a copy when it already is one."""
    return a if getattr(a, "dtype", None) == np.int32 else np.asarray(a, np.int32)


def init_variables(config: ModelConfig, seed: int = 0) -> dict[str, Any]:
    """Initial ``{"params", "batch_stats"}`` of a model; deterministic per seed."""
    module = EventSSM(config)
    x = jnp.zeros((1, 8), jnp.int32)
    variables = jax.jit(lambda key: module.init(key, x, x, jnp.array([8], jnp.int32),
                                                init_state(config, 1)))(jax.random.PRNGKey(seed))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def load_model(spec: str | Path | None = None, *, backend: str | None = None) -> StreamingModel:
    """Load a model for serving.

    ``None``: the project's default model (the shipped trained checkpoint, or — if it is
    missing — a random-init model of ``configs/models/event-mnist.yaml``, marked untrained);
    ``"config:NAME"``: a random-init model of ``configs/models/NAME.yaml``; otherwise a
    checkpoint directory. ``backend``: the streaming step's (``auto``, ``native``, ``xla``).
    """
    if spec is None:
        if (DEFAULT_MODEL_DIR / "evssm.json").exists():
            return StreamingModel.load(DEFAULT_MODEL_DIR, backend=backend)
        return StreamingModel.from_config(load_model_config(DEFAULT_MODEL_CONFIG),
                                          backend=backend)
    spec = str(spec)
    if spec.startswith("config:"):
        return StreamingModel.from_config(load_model_config(spec[len("config:"):]),
                                          backend=backend)
    return StreamingModel.load(spec, backend=backend)
