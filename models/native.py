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


# Plan layout: must match the Header and Layer enums of kernels/streaming_step.cc.
PLAN_VERSION = 3
HEADER_FIELDS = 32
LAYER_FIELDS = 24
HEADER = ("version layers words prenorm norm pool head classes width head_w head_b sum_z sum_w "
          "last_z count zoh vocab decay_size table_bu table_pool table_decay consts gelu held "
          "head_sum_dt sum_z_c sum_w_c head_sum_dt_c").split()
LAYER = ("d_in d_out p stride s_last s_first sum_wx sum_w sum_dt count norm_a norm_b b step "
         "inv_lambda c d d_matrix gate_w gate_b skip_w skip_b d_pool").split()
POOL_MODES = {"first": 0, "avgpool": 1, "timepool": 2}
HEAD_MODES = {"pool": 0, "timepool": 1, "last": 2}

# What the kernel implements: every ModelConfig field, with the values it implements (None: any
# value). A field that is not listed (a model option added later) must keep its default, else
# the native step refuses the model and XLA serves it: the kernel never computes another network.
IMPLEMENTED: dict[str, tuple[Any, ...] | None] = {
    "sensor": None, "num_classes": None, "d_model": None, "d_state": None, "block_size": None,
    "num_stages": None, "layers_per_stage": None, "pooling_stride": None,
    "pooling_mode": tuple(POOL_MODES), "state_expansion_factor": None,
    "discretization": DISCRETIZATIONS, "conj_sym": None, "clip_eigs": None, "prenorm": None,
    "norm": NORMS, "dropout": None, "dt_min": None, "dt_max": None, "step_rescale": None,
    "head": tuple(HEAD_MODES), "bn_momentum": None, "class_names": None, "name": None,
    "time_lookahead": None, "layer_norm_eps": None, "gelu": GELUS,
    "head_divisor": HEAD_DIVISORS,
}


def unsupported(config: ModelConfig) -> str | None:
    """Why the native step cannot compute ``config``'s network, or None if it can."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name not in IMPLEMENTED:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            if value != default:
                return f"the native step does not implement the model option {f.name}={value!r}"
        elif IMPLEMENTED[f.name] is not None and value not in IMPLEMENTED[f.name]:  # type: ignore[operator]
            return f"the native step does not implement {f.name}={value!r}"
    return None
class NativeStep:
    """One model's weights and plan for the kernel, and the calls into it.

    ``weights`` is one float32 array: every parameter in the layout the kernel reads (weight
    matrices ``[K, N]`` row-major, complex vectors as real parts then imaginary parts, the
    gain folded into ``B~`` where it does not depend on the time step) and the first layer's
    tables. ``plan`` holds the offsets of each piece in ``weights`` and in a packed state row.
    """

    def __init__(self, config: ModelConfig, variables: dict[str, Any], tables: InferenceTables,
                 state_offsets: dict[str, Any], words: int):
        reason = unsupported(config)
        if reason is not None:
            raise NativeUnavailable(reason)
        self.config = config
        bound = EventSSM(config).bind(variables)
        params = variables["params"]
        stats = variables.get("batch_stats", {})
        pieces: list[np.ndarray] = []
        size = 0

        def put(array: Any) -> int:
            nonlocal size
            flat = np.asarray(array, np.float32).reshape(-1)
            at = size
            pad = -flat.size % 16  # keep every piece 64-byte aligned
            pieces.append(flat)
            if pad:
                pieces.append(np.zeros(pad, np.float32))
            size += flat.size + pad
            return at

        zoh = config.discretization == "zoh"
        header = dict.fromkeys(HEADER, -1)
        layers, gains = [], []
        for i, layer in enumerate(bound.layers):
            ssm = layer.ssm
            lam = ssm.lambda_()
            # The gain does not depend on the time step except with zoh: fold it into B~.
            gain = None if zoh else input_gain(lam, ssm.delta(), jnp.zeros(()),
                                               config.discretization)
            gains.append(gain)
            b = ssm.b[..., 0] + 1j * ssm.b[..., 1]  # B~ [P', d_in]
            if gain is not None:
                b = gain[:, None] * b
            name = f"layers_{i}"
            rec = dict.fromkeys(LAYER, -1)
            rec.update(d_in=layer.d_in, d_out=layer.d_out, p=int(lam.shape[0]),
                       stride=layer.stride, d_pool=2 * layer.d_in if config.prenorm else layer.d_in,
                       d_matrix=int(ssm.d.ndim == 2))
            rec["step"] = put(_split(ssm.step_size()))
            if zoh:
                rec["inv_lambda"] = put(_split(1.0 / lam))
            rec["b"] = put(np.concatenate([np.real(b), np.imag(b)], 0).T)  # [d_in, 2P']
            c = ssm.readout_scale
            rec["c"] = put(np.concatenate([c * ssm.c[..., 0].T, -c * ssm.c[..., 1].T], 0))
            rec["d"] = put(ssm.d.T if ssm.d.ndim == 2 else ssm.d)
            rec["gate_w"] = put(params[name]["gate"]["kernel"])
            rec["gate_b"] = put(params[name]["gate"]["bias"])
            if "skip_proj" in params[name]:
                rec["skip_w"] = put(params[name]["skip_proj"]["kernel"])
                rec["skip_b"] = put(params[name]["skip_proj"]["bias"])
            if config.norm == "layer":
                ln = params[name]["norm"]["LayerNorm_0"]
                rec["norm_a"], rec["norm_b"] = put(ln["scale"]), put(ln["bias"])
            else:
                norm = params[name]["norm"]
                mean, var = stats[name]["norm"]["mean"], stats[name]["norm"]["var"]
                scale = jax.lax.rsqrt(var + layer.norm.eps) * norm["scale"]
                rec["norm_a"], rec["norm_b"] = put(scale), put(norm["bias"] - mean * scale)
            st = state_offsets["layers"][i]
            rec["s_last"] = st["s_last"]
            if layer.stride > 1:
                for key in ("s_first", "sum_wx", "sum_w", "sum_dt", "count"):
                    rec[key] = st[key]
            layers.append(rec)

        first = bound.layers[0]
        bu = tables.bu if zoh else tables.bu * gains[0]
        head_state = state_offsets["head"]
        header.update(
            version=PLAN_VERSION, layers=len(layers), words=words, prenorm=int(config.prenorm),
            norm=0 if config.norm == "layer" else 1, pool=POOL_MODES[config.pooling_mode],
            head=HEAD_MODES[config.head], classes=config.num_classes,
            width=config.stage_width(config.num_stages - 1),
            head_w=put(params["head"]["kernel"]), head_b=put(params["head"]["bias"]),
            sum_z=head_state["sum_z"], sum_w=head_state["sum_w"], last_z=head_state["last_z"],
            count=head_state["count"], zoh=int(zoh), vocab=config.num_embeddings,
            decay_size=int(tables.decay.values.shape[0]),
            table_bu=put(np.concatenate([np.real(bu), np.imag(bu)], 1)),
            table_pool=put(tables.pool_in),
            table_decay=put(np.concatenate([np.real(tables.decay.values),
                                            np.imag(tables.decay.values)], 1)),
            consts=put([first.norm.eps, TIMEPOOL_EPS]), gelu=GELUS.index(config.gelu),
            held=state_offsets.get("held", -1), head_sum_dt=head_state.get("sum_dt", -1),
            sum_z_c=head_state["sum_z_c"], sum_w_c=head_state["sum_w_c"],
            head_sum_dt_c=head_state.get("sum_dt_c", -1))
        if size >= 2**31:
            raise NativeUnavailable("model too large for the native step's 32-bit offsets")
        plan = np.full(HEADER_FIELDS + LAYER_FIELDS * len(layers), -1, np.int32)
        plan[:len(HEADER)] = [header[k] for k in HEADER]
        for i, rec in enumerate(layers):
            at = HEADER_FIELDS + LAYER_FIELDS * i
            plan[at:at + len(LAYER)] = [rec[k] for k in LAYER]
        self.plan = plan
        self.words = words
        self.weights = np.concatenate(pieces)
        self.weight_bytes = self.weights.nbytes
        library = load_library()
        self._step = library.step
        self.prime = library.prime  # () -> None: wake the helper threads ahead of a step
        self.park = library.park  # () -> None: no step follows at once; let the helpers sleep
        # () -> list[int]: the helper threads' Linux ids (for their CPU clocks; one process-wide
        # set, shared by every model's step)
        self.helper_threads = library.helper_threads

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
        session ``b`` is row ``slots[b]`` (``b`` when ``slots`` is None; a slot outside the pool
        is a padding row, not written) and reads the ragged row
        ``tokens/gaps[starts[b] : starts[b] + lengths[b]]`` of the flat int32 buffers [E]
        (starts int64 [B], lengths int32 [B]; no copy of the buffers is made)
        -> ``(logits float32 [B, C], ready bool [B])``."""
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
    z = np.asarray(z)
    return np.concatenate([z.real, z.imag], -1)
