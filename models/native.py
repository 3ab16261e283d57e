"""Native CPU streaming step: the inference step of :class:`~evssm.models.model.EventSSM` as one
C++ function (``kernels/streaming_step.cc``), built as a small Python extension.

On a CPU, XLA runs a 256-event packet of the DVS model as ~150 small kernels, each a loop nest
over a few rows, and gathers the first layer's table rows into fresh arrays before using them;
a jitted call alone costs ~25 us. The native step runs the same mathematics in one plain call
(without the GIL): event by event through the first layer (reading each event's table
rows in place), then layer by layer on the stacked rows of all sessions with register-tiled
matrix products. It reads and writes the packed state rows of
:class:`~evssm.models.streaming.StateLayout` (NumPy arrays, updated in place), so the two
backends are interchangeable mid-stream; ``tests/test_native.py`` holds them equal (and the
invariant tests hold it equal to the offline form) within float32 rounding.

The kernel is compiled on first use (``native_build.py``); without a compiler the XLA step serves
(``backend="auto"``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import DISCRETIZATIONS, GELUS, HEAD_DIVISORS, NORMS, ModelConfig
from .model import EventSSM, InferenceTables
from .native_build import (  # noqa: F401
    COMPILE_FLAGS,
    KERNEL_SOURCE,
    MODULE_NAME,
    NativeUnavailable,
    build_library,
    cache_dir,
    load_library,
)
from .pooling import TIMEPOOL_EPS
from .ssm import input_gain

Array = jax.Array


# The plan layout this module writes. Where each field goes is the kernel's own business: the
# field lists of kernels/streaming_step.cc, read through its plan_layout() (PlanLayout).
PLAN_VERSION = 3
POOL_MODES = ("first", "avgpool", "timepool")
HEAD_MODES = ("pool", "timepool", "last")
# The choices a header field codes (as its index in the kernel's list of the same names).
CODED = {"pool": POOL_MODES, "head": HEAD_MODES, "norm": NORMS, "gelu": GELUS}

# What the kernel implements: every ModelConfig field, with the values it implements (None: any
# value). A field that is not listed (a model option added later) must keep its default, else
# the native step refuses the model and XLA serves it: the kernel never computes another network.
IMPLEMENTED: dict[str, tuple[Any, ...] | None] = {
    "sensor": None, "num_classes": None, "d_model": None, "d_state": None, "block_size": None,
    "num_stages": None, "layers_per_stage": None, "pooling_stride": None,
    "pooling_mode": POOL_MODES, "state_expansion_factor": None,
    "discretization": DISCRETIZATIONS, "conj_sym": None, "clip_eigs": None, "prenorm": None,
    "norm": NORMS, "dropout": None, "dt_min": None, "dt_max": None, "step_rescale": None,
    "head": HEAD_MODES, "bn_momentum": None, "class_names": None, "name": None,
    "time_lookahead": None, "layer_norm_eps": None, "gelu": GELUS,
    "head_divisor": HEAD_DIVISORS,
}


def unsupported(config: ModelConfig) -> str | None:
    """Why the native step cannot compute ``config``'s network, or None if it can."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name not in IMPLEMENTED:
            factory = f.default_factory
            default = f.default if factory is dataclasses.MISSING else factory()
            if value != default:
                return f"the native step does not implement the model option {f.name}={value!r}"
        elif IMPLEMENTED[f.name] is not None and value not in IMPLEMENTED[f.name]:  # type: ignore[operator]
            return f"the native step does not implement {f.name}={value!r}"
    return None


@dataclasses.dataclass(frozen=True)
class PlanLayout:
    """The plan layout a built kernel reads (its ``plan_layout()``, from the field lists of
    ``kernels/streaming_step.cc``): ``header_fields`` int32 words, then ``layer_fields`` words
    per layer; ``header`` and ``layer`` name the fields in plan order (the rest of a block is
    unused, -1)."""

    version: int
    header_fields: int
    layer_fields: int
    header: tuple[str, ...]
    layer: tuple[str, ...]
    codes: dict[str, tuple[str, ...]]  # field -> the names of its choices, by code

    @classmethod
    def of(cls, library: Any) -> PlanLayout:
        """The layout of ``library`` (the kernel's extension module); NativeUnavailable unless
        it is version :data:`PLAN_VERSION`, the one this module writes."""
        describe = getattr(library, "plan_layout", None)
        if describe is None:
            raise NativeUnavailable("the native library does not describe its plan layout "
                                    "(rebuild the native step)")
        d = describe()
        layout = cls(int(d["version"]), int(d["header_fields"]), int(d["layer_fields"]),
                     tuple(d["header"]), tuple(d["layer"]),
                     {field: tuple(names) for field, names in d.get("codes", {}).items()})
        if layout.version != PLAN_VERSION:
            raise NativeUnavailable(f"the native library reads plan version {layout.version}; "
                                    f"this module writes version {PLAN_VERSION} (rebuild the "
                                    "native step)")
        if len(layout.header) > layout.header_fields or len(layout.layer) > layout.layer_fields:
            raise NativeUnavailable("the native library's plan layout names more fields than "
                                    "its blocks hold")
        for field, names in CODED.items():
            if layout.codes.get(field) != tuple(names):
                raise NativeUnavailable(f"the native library codes {field} as "
                                        f"{layout.codes.get(field)}, not {tuple(names)} (rebuild "
                                        "the native step)")
        return layout

    def code(self, field: str, choice: str) -> int:
        """The kernel's code of ``choice`` for the header field ``field`` (``pool``, ``head``,
        ``norm``, ``gelu``)."""
        return self.codes[field].index(choice)

    def pack(self, header: dict[str, int], layers: list[dict[str, int]]) -> np.ndarray:
        """The plan, int32 [header_fields + layer_fields * len(layers)], from every field by
        name (-1 where a model has none); NativeUnavailable when the names given are not
        exactly the layout's, so no field is left unset or written where the kernel reads
        another."""
        plan = np.full(self.header_fields + self.layer_fields * len(layers), -1, np.int32)
        plan[:len(self.header)] = self._ordered("header", self.header, header)
        for i, fields in enumerate(layers):
            at = self.header_fields + self.layer_fields * i
            plan[at:at + len(self.layer)] = self._ordered("layer", self.layer, fields)
        return plan

    @staticmethod
    def _ordered(block: str, names: tuple[str, ...], fields: dict[str, int]) -> list[int]:
        if set(fields) != set(names):
            unread = sorted(set(fields) - set(names))
            unwritten = sorted(set(names) - set(fields))
            raise NativeUnavailable(f"plan {block} mismatch: the native library does not read "
                                    f"{unread} and this module does not write {unwritten} "
                                    "(rebuild the native step)")
        return [int(fields[name]) for name in names]


class WeightBuffer:
    """The kernel's weights, one float32 buffer put together piece by piece; every piece starts
    64-byte aligned."""

    def __init__(self) -> None:
        self.pieces: list[np.ndarray] = []
        self.size = 0

    def put(self, array: Any) -> int:
        """Append ``array`` (flattened, as float32) -> its offset in floats."""
        flat = np.asarray(array, np.float32).reshape(-1)
        at = self.size
        pad = -flat.size % 16
        self.pieces.append(flat)
        if pad:
            self.pieces.append(np.zeros(pad, np.float32))
        self.size += flat.size + pad
        return at

    def array(self) -> np.ndarray:
        """float32 [size]; NativeUnavailable beyond the kernel's 32-bit offsets."""
        if self.size >= 2**31:
            raise NativeUnavailable("model too large for the native step's 32-bit offsets")
        return np.concatenate(self.pieces)


def layer_fields(config: ModelConfig, layer: Any, params: dict[str, Any], stats: dict[str, Any],
                 state: dict[str, int], weights: WeightBuffer) -> tuple[dict[str, int], Any]:
    """A bound :class:`~.model.SequenceLayer`'s plan fields, its parameters put into
    ``weights`` (``params``/``stats``: its own variables; ``state``: its offsets in a state
    row) -> ``(fields, gain)``. Except with zoh, the input gain does not depend on the time
    step and is folded into B~: ``gain`` [P'] is returned for the first layer's table (None with
    zoh)."""
    zoh = config.discretization == "zoh"
    ssm = layer.ssm
    lam = ssm.lambda_()
    gain = None if zoh else input_gain(lam, ssm.delta(), jnp.zeros(()), config.discretization)
    b = ssm.b[..., 0] + 1j * ssm.b[..., 1]  # B~ [P', d_in]
    if gain is not None:
        b = gain[:, None] * b
    c = ssm.readout_scale
    skip = params.get("skip_proj")
    pooled = layer.stride > 1
    fields = {
        "d_in": layer.d_in, "d_out": layer.d_out, "p": int(lam.shape[0]), "stride": layer.stride,
        "d_pool": 2 * layer.d_in if config.prenorm else layer.d_in,
        "d_matrix": int(ssm.d.ndim == 2),
        # Pieces in the order they are put (the weights' layout follows it).
        "step": weights.put(_split(ssm.step_size())),
        "inv_lambda": weights.put(_split(1.0 / lam)) if zoh else -1,
        "b": weights.put(np.concatenate([np.real(b), np.imag(b)], 0).T),  # [d_in, 2P']
        "c": weights.put(np.concatenate([c * ssm.c[..., 0].T, -c * ssm.c[..., 1].T], 0)),
        "d": weights.put(ssm.d.T if ssm.d.ndim == 2 else ssm.d),
        "gate_w": weights.put(params["gate"]["kernel"]),
        "gate_b": weights.put(params["gate"]["bias"]),
        "skip_w": -1 if skip is None else weights.put(skip["kernel"]),
        "skip_b": -1 if skip is None else weights.put(skip["bias"]),
        **norm_fields(config, layer, params, stats, weights),
        "s_last": state["s_last"],
        **{key: state[key] if pooled else -1
           for key in ("s_first", "sum_wx", "sum_w", "sum_dt", "count")},
    }
    return fields, gain


def norm_fields(config: ModelConfig, layer: Any, params: dict[str, Any], stats: dict[str, Any],
                weights: WeightBuffer) -> dict[str, int]:
    """The layer's norm as ``x * norm_a + norm_b`` after standardising (layer norm), or as that
    affine map alone (batch norm at inference: ``a = gamma / sqrt(var + eps)``,
    ``b = beta - mean * a``)."""
    if config.norm == "layer":
        ln = params["norm"]["LayerNorm_0"]
        return {"norm_a": weights.put(ln["scale"]), "norm_b": weights.put(ln["bias"])}
    norm = params["norm"]
    mean, var = stats["norm"]["mean"], stats["norm"]["var"]
    scale = jax.lax.rsqrt(var + layer.norm.eps) * norm["scale"]
    return {"norm_a": weights.put(scale), "norm_b": weights.put(norm["bias"] - mean * scale)}


def header_fields(config: ModelConfig, layout: PlanLayout, bound: Any, tables: InferenceTables,
                  first_gain: Any, state_offsets: dict[str, Any], words: int, layers: int,
                  weights: WeightBuffer) -> dict[str, int]:
    """The plan header: the model's modes and sizes, the head's weights and the first layer's
    tables (put into ``weights``), the head's offsets in a state row."""
    params = bound.variables["params"]
    head = state_offsets["head"]
    bu = tables.bu if first_gain is None else tables.bu * first_gain  # None exactly with zoh
    return {
        "version": PLAN_VERSION, "layers": layers, "words": words,
        "prenorm": int(config.prenorm), "norm": layout.code("norm", config.norm),
        "pool": layout.code("pool", config.pooling_mode), "head": layout.code("head", config.head),
        "classes": config.num_classes, "width": config.stage_width(config.num_stages - 1),
        "head_w": weights.put(params["head"]["kernel"]), "head_b": weights.put(params["head"]["bias"]),
        "sum_z": head["sum_z"], "sum_w": head["sum_w"], "last_z": head["last_z"],
        "count": head["count"], "zoh": int(config.discretization == "zoh"),
        "vocab": config.num_embeddings, "decay_size": int(tables.decay.values.shape[0]),
        "table_bu": weights.put(np.concatenate([np.real(bu), np.imag(bu)], 1)),
        "table_pool": weights.put(tables.pool_in),
        "table_decay": weights.put(np.concatenate([np.real(tables.decay.values),
                                                   np.imag(tables.decay.values)], 1)),
        "consts": weights.put([bound.layers[0].norm.eps, TIMEPOOL_EPS]),
        "gelu": layout.code("gelu", config.gelu), "held": state_offsets.get("held", -1),
        "head_sum_dt": head.get("sum_dt", -1), "sum_z_c": head["sum_z_c"],
        "sum_w_c": head["sum_w_c"], "head_sum_dt_c": head.get("sum_dt_c", -1),
    }


class NativeStep:
    """One model's weights and plan for the kernel, and the calls into it.

    ``weights`` is one float32 array: every parameter in the layout the kernel reads (weight
    matrices ``[K, N]`` row-major, complex vectors as real parts then imaginary parts, the
    gain folded into ``B~`` where it does not depend on the time step) and the first layer's
    tables. ``plan`` holds the offsets of each piece in ``weights`` and in a packed state row,
    placed by the kernel's own :class:`PlanLayout`.
    """

    def __init__(self, config: ModelConfig, variables: dict[str, Any], tables: InferenceTables,
                 state_offsets: dict[str, Any], words: int):
        reason = unsupported(config)
        if reason is not None:
            raise NativeUnavailable(reason)
        library = load_library()
        self.layout = PlanLayout.of(library)  # refuses a kernel whose plan this module cannot write
        self.config = config
        self.words = words
        bound = EventSSM(config).bind(variables)
        stats = variables.get("batch_stats", {})
        weights = WeightBuffer()
        layers, gains = [], []
        for i, layer in enumerate(bound.layers):
            name = f"layers_{i}"
            fields, gain = layer_fields(config, layer, variables["params"][name],
                                        stats.get(name, {}), state_offsets["layers"][i], weights)
            layers.append(fields)
            gains.append(gain)
        header = header_fields(config, self.layout, bound, tables, gains[0], state_offsets, words,
                               len(layers), weights)
        self.plan = self.layout.pack(header, layers)
        self.weights = weights.array()
        self.weight_bytes = self.weights.nbytes
        self._step = library.step
        self.prime = library.prime  # () -> None: wake the helper threads ahead of a step
        self.park = library.park  # () -> None: no step follows at once; let the helpers sleep
        # () -> list[int]: the helper threads' Linux ids (for their CPU clocks; one process-wide
        # set, shared by every model's step)
        self.helper_threads = library.helper_threads
        # Several packets of one session in a call: the total-time divisor would need every
        # strided layer's partial window after each packet, which the step does not keep.
        self.coalesces = config.head_divisor != "total_time"


    def step_rows(self, pool: np.ndarray, slots: np.ndarray | None, tokens: Any, gaps: Any,
                  lengths: Any) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`step_ragged` on padded packets: tokens, gaps int32 [B, L]; session ``b``'s
        events are the first ``lengths[b]`` of row ``b`` (clipped to 0..L)."""
        tokens = _i32(tokens)
        batch, length = tokens.shape
        starts = np.arange(batch, dtype=np.int64) * length
        lengths = np.clip(_i32(lengths), 0, length).astype(np.int32)
        return self.step_ragged(pool, slots, tokens.reshape(-1), _i32(gaps).reshape(-1), starts,
                                lengths)

    def step_ragged(self, pool: np.ndarray, slots: np.ndarray | None, tokens: np.ndarray,
                    gaps: np.ndarray, starts: np.ndarray, lengths: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Advance sessions in place on ``pool`` (int32 [N, words], C-contiguous, writable):
        entry ``b`` steps row ``slots[b]`` (``b`` when ``slots`` is None; a slot outside the pool
        is a padding row, not written) by the ragged row
        ``tokens/gaps[starts[b] : starts[b] + lengths[b]]`` of the flat int32 buffers [E]
        (starts int64 [B], lengths int32 [B]; no copy of the buffers is made)
        -> ``(logits float32 [B, C], ready bool [B])``, each entry's after its packet.

        Entries with the same slot are one session's consecutive packets, in entry order: they
        are stepped as one row with a readout after each packet, the same arithmetic as one call
        per packet (see :attr:`coalesces`; a head that cannot read out mid-row raises)."""
        batch = lengths.shape[0]
        if slots is None and pool.shape[0] < batch:
            raise ValueError(f"{batch} sessions but {pool.shape[0]} state rows")
        logits = np.empty((batch, self.config.num_classes), np.float32)
        ready = np.empty(batch, np.int32)
        # The extension checks dtypes, contiguity, shapes and row bounds, and raises ValueError.
        self._step(self.weights, self.plan, pool, None if slots is None else _i32(slots),
                   _i32(tokens), _i32(gaps), np.ascontiguousarray(starts, np.int64),
                   _i32(lengths), logits, ready)
        return logits, ready > 0


def _i32(a: Any) -> np.ndarray:
    """C-contiguous int32 NumPy array, without a copy when it already is one."""
    return np.ascontiguousarray(a, np.int32)


def _split(z: Array) -> np.ndarray:
    """Complex [..., n] -> real [..., 2n]: real parts, then imaginary parts."""
    a = np.asarray(z)
    return np.concatenate([a.real, a.imag], -1)
