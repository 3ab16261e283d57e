"""The EventSSM network: token encoder, stages of sequence layers, classification head.

Every layer takes a carried state and returns the new one, so one forward pass serves both forms:
``offline = forward(zero state, whole sequence)``; ``streaming = forward(carried state, packet)``.

Sequence layer (``d_in -> d_out``, stride ``s``)::

    skip = x
    if prenorm: x = Norm(x)
    y = SSM(x, dt)                         # d_out wide, at the pooled rate when s > 1
    g = Dense_d_out(Dropout(GELU(y)))
    x = Dropout(y * sigmoid(g))
    if s > 1: skip, dt = Pool(skip, dt)
    if d_in != d_out: skip = Dense_d_out(skip)
    x = skip + x
    if not prenorm: x = Norm(x)

Stage ``k`` has width ``H_k = H e^k`` and state ``P_k = P e^k``; its first layer maps
``H_{k-1} -> H_k`` and pools by ``s``. The head pools the final-rate outputs ``z_1 .. z_M``
(``pool``: mean; ``timepool``: ``sum z_m (dt_m + eps) / sum (dt_m + eps)``; ``last``) and applies
``Dense(num_classes)``. Before the first complete final-rate window there is no prediction.

Options that reproduce the paper's reference code (``ModelConfig``; default off):

- ``time_lookahead``: event ``i``'s token is paired with the gap to the *next* event,
  ``t_{i+1} - t_i``, and the last event has no time step yet (:func:`hold_last_token`). A session
  carries its last token until the next event arrives: one event of latency, and streaming still
  equals the offline form on every prefix.
- ``layer_norm_eps`` (LayerNorm's epsilon; BatchNorm keeps 1e-5) and ``gelu="tanh"`` (the tanh
  approximation of GELU).
- ``head_divisor="total_time"``: the timepool head divides ``sum z_m (dt_m + eps)`` by the total
  time of the stream's events ``T = sum_i dt_i``, trailing events that complete no final-rate
  window included, without eps. ``T`` is the completed windows' pooled time plus the partial
  windows' time carried by every strided layer, so it needs one more head word only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .pooling import TIMEPOOL_EPS, pool_state_shapes, pool_weights, pool_windows
from .ssm import S5SSM, DecayTable, ssm_state_shapes

Array = jax.Array
State = dict[str, Any]


def lengths_mask(lengths: Array, size: int) -> Array:
    """[B] -> bool [B, size]: True at real (non-padding) positions."""
    return jnp.arange(size)[None, :] < lengths[:, None]


def hold_last_token(tokens: Array, gaps: Array, lengths: Array, held: Array
                    ) -> tuple[Array, Array, Array, Array]:
    """One-event time look-ahead: pair each event's token with the gap to the next event.

    A session's raw events ``(token_i, gap_i = t_i - t_{i-1})`` become model events
    ``(token_{i-1}, gap_i)`` for ``i >= 1``: token ``i`` meets ``t_{i+1} - t_i``, and the last
    token waits in the state. ``held`` int32 [B] is that waiting token plus one (0: none yet, a
    fresh session). With a token held, a packet of ``n`` events gives ``n`` model events (the
    held token, then the packet's first ``n - 1``); without, ``n - 1`` (the first event has no
    predecessor, its gap is dropped).

    tokens, gaps int32 [B, L] (-1 / 0 padding), lengths [B] -> ``(tokens', gaps', lengths',
    held')`` of the same shapes. Model event ``j`` reads raw position ``k = j + start``
    (``start`` = 1 without a held token, else 0): its gap is ``gaps[k]``, its token
    ``tokens[k - 1]``, or the held token at ``k = 0``.
    """
    size = tokens.shape[1]
    start = (held == 0).astype(jnp.int32)  # [B]
    k = jnp.arange(size)[None, :] + start[:, None]  # [B, L]
    new_lengths = jnp.maximum(lengths - start, 0)
    real = lengths_mask(new_lengths, size)
    prev = jnp.take_along_axis(tokens, jnp.clip(k - 1, 0, size - 1), 1)
    new_tokens = jnp.where(real, jnp.where(k == 0, held[:, None] - 1, prev), -1)
    new_gaps = jnp.where(real, jnp.take_along_axis(gaps, jnp.clip(k, 0, size - 1), 1), 0)
    last = jnp.take_along_axis(tokens, jnp.clip(lengths - 1, 0, size - 1)[:, None], 1)[:, 0]
    new_held = jnp.where(lengths > 0, last + 1, held)
    return new_tokens, new_gaps, new_lengths, new_held


BATCH_NORM_EPS = 1e-5


class Norm(nn.Module):
    """LayerNorm, or BatchNorm whose statistics skip padding (running stats outside training)."""

    kind: str
    momentum: float = 0.9
    eps: float = BATCH_NORM_EPS

    @nn.compact
    def __call__(self, x: Array, mask: Array, train: bool) -> Array:
        """x [B, L, d], mask [B, L] -> [B, L, d]."""
        if self.kind == "layer":
            return nn.LayerNorm(epsilon=self.eps)(x)
        d = x.shape[-1]
        mean_v = self.variable("batch_stats", "mean", lambda: jnp.zeros(d, jnp.float32))
        var_v = self.variable("batch_stats", "var", lambda: jnp.ones(d, jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (d,))
        bias = self.param("bias", nn.initializers.zeros, (d,))
        if train:
            m = mask[..., None].astype(x.dtype)
            count = jnp.maximum(m.sum(), 1.0)
            mean = (x * m).sum((0, 1)) / count
            var = (jnp.square(x - mean) * m).sum((0, 1)) / count
            if not self.is_initializing():
                mean_v.value = self.momentum * mean_v.value + (1 - self.momentum) * mean
                var_v.value = self.momentum * var_v.value + (1 - self.momentum) * var
        else:
            mean, var = mean_v.value, var_v.value
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class SequenceLayer(nn.Module):
    """One S5 sequence layer with pooling stride ``stride`` (see module docstring)."""

    config: ModelConfig
    d_in: int
    d_out: int
    d_state: int
    stride: int

    def setup(self) -> None:
        cfg = self.config
        self.norm = Norm(cfg.norm, cfg.bn_momentum,
                         cfg.layer_norm_eps if cfg.norm == "layer" else BATCH_NORM_EPS)
        self.ssm = S5SSM(self.d_in, self.d_out, self.d_state, cfg.block_size, cfg.conj_sym,
                         cfg.clip_eigs, cfg.discretization, cfg.dt_min, cfg.dt_max,
                         cfg.step_rescale)
        self.gate = nn.Dense(self.d_out)
        self.skip_proj = nn.Dense(self.d_out) if self.d_in != self.d_out else None
        self.dropout = nn.Dropout(cfg.dropout)

    def features(self, x: Array, mask: Array, train: bool) -> tuple[Array, Array]:
        """Per-event inputs of the recurrence and of the pooling.

        x [B, L, d_in] -> ``(B~ u [B, L, P'] complex, pool_in [B, L, d_pool])``: ``pool_in`` is
        ``[u, x]`` with prenorm (the SSM's feed-through input and the skip), ``x`` without.
        For the first layer these depend on the token alone and can be tabulated.
        """
        if self.config.prenorm:
            u = self.norm(x, mask, train)
            return self.ssm.input_proj(u), jnp.concatenate([u, x], -1)
        return self.ssm.input_proj(x), x

    def __call__(self, features: tuple[Array, Array], times: Array, scale: float, lengths: Array,
                 state: State, train: bool, table: DecayTable | None = None
                 ) -> tuple[Array, Array, Array, State]:
        """features from :meth:`features`, times [B, L] (time steps ``dt = times * scale`` ms),
        lengths [B], state (batched) -> ``(x [B, W, d_out], dt [B, W] ms, lengths [B], state')``;
        W = L when stride is 1."""
        bu, pool_in = features
        dt = times * scale
        stride = self.stride
        batch = lengths.shape[0]
        if stride > 1:
            offsets = state["count"]
            ssm_state = {"s_last": state["s_last"], "s_first": state["s_first"]}
        else:
            offsets = jnp.zeros(batch, jnp.int32)
            ssm_state = {"s_last": state["s_last"], "s_first": state["s_last"]}
        window_states, new_ssm = self.ssm(bu, times, scale, lengths, offsets, ssm_state, stride,
                                          table)
        new_state: State = {"s_last": new_ssm["s_last"]}
        if stride > 1:
            w = pool_weights(dt, offsets, stride, self.config.pooling_mode)
            carry = {k: state[k] for k in ("sum_wx", "sum_w", "sum_dt")}
            pooled, dt, carry = pool_windows(pool_in, w, dt, lengths, offsets, carry, stride)
            total = offsets + lengths
            lengths = total // stride
            new_state.update(carry, s_first=new_ssm["s_first"], count=total % stride)
        else:
            pooled = pool_in
        if self.config.prenorm:
            u, skip = jnp.split(pooled, 2, axis=-1)
        else:
            u = skip = pooled
        deterministic = not train
        y = self.ssm.readout(window_states, u)
        act = nn.gelu(y, approximate=self.config.gelu == "tanh")
        g = self.gate(self.dropout(act, deterministic=deterministic))
        x = self.dropout(y * jax.nn.sigmoid(g), deterministic=deterministic)
        if self.skip_proj is not None:
            skip = self.skip_proj(skip)
        x = skip + x
        if not self.config.prenorm:
            x = self.norm(x, lengths_mask(lengths, x.shape[1]), train)
        return x, dt, lengths, new_state


def layer_plan(config: ModelConfig) -> list[tuple[int, int, int, int]]:
    """``(d_in, d_out, d_state, stride)`` of every sequence layer, in order."""
    plan = []
    for k in range(config.num_stages):
        for j in range(config.layers_per_stage):
            d_in = config.stage_width(k - 1) if j == 0 else config.stage_width(k)
            stride = config.pooling_stride if j == 0 else 1
            plan.append((d_in, config.stage_width(k), config.stage_state(k), stride))
    return plan


# Version of the carried state's layout (state_spec): a packed row, a snapshot, means the same
# only under the same version. 2: the head's running sums carry their Kahan compensation.
STATE_LAYOUT_VERSION = 2


def state_spec(config: ModelConfig) -> State:
    """Shapes and dtypes of one session's carried state (a pytree of ``(shape, dtype)``)."""
    layers = []
    for d_in, _, d_state, stride in layer_plan(config):
        num_states = d_state // 2 if config.conj_sym else d_state
        layer = {"s_last": ssm_state_shapes(num_states)["s_last"]}
        if stride > 1:
            layer.update(ssm_state_shapes(num_states))
            layer.update(pool_state_shapes(2 * d_in if config.prenorm else d_in))
            layer["count"] = ((), jnp.int32)
        layers.append(layer)
    width = config.stage_width(config.num_stages - 1)
    # The head's running sums grow with the stream: each carries its Kahan compensation
    # (``*_c``, see :func:`kahan_add`), so hours of windows add up as exactly as a few.
    head = {"sum_z": ((width,), jnp.float32), "sum_z_c": ((width,), jnp.float32),
            "sum_w": ((), jnp.float32), "sum_w_c": ((), jnp.float32),
            "last_z": ((width,), jnp.float32), "count": ((), jnp.int32)}
    if config.head_divisor == "total_time":
        head["sum_dt"] = ((), jnp.float32)  # pooled time of the completed final-rate windows
        head["sum_dt_c"] = ((), jnp.float32)
    spec: State = {"layers": layers, "head": head}
    if config.time_lookahead:
        spec["held"] = ((), jnp.int32)  # the last event's token + 1 (0: none yet)
    return spec


def is_spec_leaf(value: Any) -> bool:
    """True for a ``(shape, dtype)`` leaf of :func:`state_spec` (pass as ``is_leaf``)."""
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], tuple)


def init_state(config: ModelConfig, batch: int) -> State:
    """Zero carried state for ``batch`` sessions (leading axis ``batch`` on every leaf)."""
    return jax.tree.map(lambda sd: jnp.zeros((batch, *sd[0]), sd[1]), state_spec(config),
                        is_leaf=is_spec_leaf)


def fresh_state(config: ModelConfig, batch: int) -> State:
    """:func:`init_state` as NumPy zeros: inside a traced function its values stay known, so
    the layers take the layout of a packet that starts every window (pads and reshapes
    instead of gathers; :func:`~.pooling.known_zero`). The same results as :func:`init_state`."""
    return jax.tree.map(lambda sd: np.zeros((batch, *sd[0]), sd[1]), state_spec(config),
                        is_leaf=is_spec_leaf)


# Inter-event times (microseconds) whose first-layer decays are tabulated: covers the gaps
# inside a pooling window of any sensor faster than ~2,000 events/s.
DECAY_TABLE_SIZE = 8192


class InferenceTables(NamedTuple):
    """Per-model inference tables: ``bu`` [V, P'] complex, ``pool_in`` [V, d_pool], ``decay``."""

    bu: Array
    pool_in: Array
    decay: DecayTable


class EventSSM(nn.Module):
    """EventSSM classifier. See the module docstring."""

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        self.embed = nn.Embed(cfg.num_embeddings, cfg.d_model,
                              embedding_init=nn.initializers.normal(1.0))
        self.layers = [SequenceLayer(cfg, d_in, d_out, d_state, stride)
                       for d_in, d_out, d_state, stride in layer_plan(cfg)]
        self.head = nn.Dense(cfg.num_classes)

    def encode(self, tokens: Array) -> Array:
        """tokens int32 [B, L] (-1 = padding) -> embeddings [B, L, H] (zero for padding)."""
        x = self.embed(jnp.maximum(tokens, 0))
        return jnp.where((tokens >= 0)[..., None], x, 0.0)

    def token_tables(self, decay_size: int = DECAY_TABLE_SIZE) -> InferenceTables:
        """Inference-only tables (no dropout, BN running statistics) of the first layer: its
        per-token features, gathered per event instead of embedding + norm + projection, and
        its decays for inter-event times below ``decay_size`` microseconds."""
        tokens = jnp.arange(self.config.num_embeddings)[None, :]
        mask = jnp.ones(tokens.shape, bool)
        bu, pool_in = self.layers[0].features(self.encode(tokens), mask, False)
        return InferenceTables(bu[0], pool_in[0], self.layers[0].ssm.decay_table(decay_size))

    def __call__(self, tokens: Array, gaps: Array, lengths: Array, state: State,
                 train: bool = False, tables: InferenceTables | None = None
                 ) -> tuple[Array, Array, State]:
        """Advance a batch of sessions by one packet each.

        tokens int32 [B, L] (-1 padding), gaps int32 [B, L] (microseconds since the session's
        previous event, 0 for its first and for padding), lengths int32 [B], state (batched).
        Returns ``(logits [B, C], ready bool [B], state')``.
        """
        new_state: State = {}
        if self.config.time_lookahead:
            tokens, gaps, lengths, new_state["held"] = hold_last_token(tokens, gaps, lengths,
                                                                       state["held"])
        mask = lengths_mask(lengths, tokens.shape[1])
        if tables is None:
            feats = self.layers[0].features(self.encode(tokens), mask, train)
        else:
            safe = jnp.where(mask, tokens, 0)
            feats = (tables.bu[safe], tables.pool_in[safe])
        # The first layer reads integer microsecond gaps (so its decays can be tabulated);
        # later layers read pooled time steps in milliseconds.
        layers, head_state = self._run_layers(0, feats, gaps.astype(jnp.float32), 1e-3, lengths,
                                              state["layers"], state["head"], train, tables)
        divisor = head_state["sum_w"]
        if self.config.head_divisor == "total_time":
            divisor = self._total_time(layers, head_state)
        pooled = head_state["sum_z"] / jnp.where(divisor > 0, divisor, 1.0)[:, None]
        if self.config.head == "last":
            pooled = head_state["last_z"]
        logits = self.head(pooled)
        new_state.update(layers=layers, head=head_state)
        return logits, head_state["count"] > 0, new_state

    def _total_time(self, layers: list[State], head_state: State) -> Array:
        """``T = sum_i dt_i`` over every event seen [B]: the completed final-rate windows'
        pooled time plus the partial window of every strided layer (in layer order)."""
        total = head_state["sum_dt"]
        for layer, state in zip(self.layers, layers, strict=True):
            if layer.stride > 1:
                total = total + state["sum_dt"]
        return total

    def _run_layers(self, start: int, feats: Any, times: Array, scale: float, lengths: Array,
                    layer_states: list[State], head_state: State, train: bool,
                    tables: InferenceTables | None) -> tuple[list[State], State]:
        """Layers ``start ..`` and the head's running pool -> ``(their new states, head state)``.

        ``feats`` are layer ``start``'s per-event features (:meth:`SequenceLayer.features`).
        Outside training, the layers above a strided layer run only when some session completed
        one of its windows: with no new window their input is empty and their state, and the
        head's, stays as it was. Exact, and it spares small packets the deeper layers' weights
        (the bulk of a short packet's cost).
        """
        new_states: list[State] = []
        x: Array | None = None
        for i in range(start, len(self.layers)):
            layer = self.layers[i]
            if x is not None:  # above layer ``start``: the layer below has run
                if self.layers[i - 1].stride > 1 and not train and not self.is_initializing():
                    later, head_state = nn.cond(
                        jnp.any(lengths > 0), _continue_from(i, scale, tables), _unchanged,
                        self, x, times, lengths, layer_states[i - start:], head_state)
                    return new_states + later, head_state
                feats = layer.features(x, lengths_mask(lengths, x.shape[1]), train)
            table = tables.decay if (tables is not None and i == 0) else None
            x, times, lengths, layer_state = layer(feats, times, scale, lengths,
                                                   layer_states[i - start], train, table)
            scale = 1.0
            new_states.append(layer_state)
        assert x is not None, f"no layers from {start}"  # callers pass start < len(self.layers)
        return new_states, self._pool_head(x, times, lengths, head_state)

    def _pool_head(self, z: Array, dt: Array, lengths: Array, state: State) -> State:
        """Running pool of the final-rate outputs: z [B, M, d], dt [B, M], lengths [B]."""
        mask = lengths_mask(lengths, z.shape[1]).astype(z.dtype)
        w = mask * (dt + TIMEPOOL_EPS) if self.config.head == "timepool" else mask
        last_index = jnp.maximum(lengths - 1, 0)
        last = jnp.take_along_axis(z, last_index[:, None, None], axis=1)[:, 0]
        new = {"last_z": jnp.where((lengths > 0)[:, None], last, state["last_z"]),
               "count": state["count"] + lengths}
        new["sum_z"], new["sum_z_c"] = kahan_add(state["sum_z"], state["sum_z_c"],
                                                 jnp.einsum("bm,bmd->bd", w, z))
        new["sum_w"], new["sum_w_c"] = kahan_add(state["sum_w"], state["sum_w_c"], w.sum(1))
        if "sum_dt" in state:
            new["sum_dt"], new["sum_dt_c"] = kahan_add(state["sum_dt"], state["sum_dt_c"],
                                                       (mask * dt).sum(1))
        return new


def kahan_add(total: Array, comp: Array, inc: Array) -> tuple[Array, Array]:
    """Compensated (Kahan) summation step: ``(total', comp')`` of ``total + inc``.

    ``y = inc - comp;  t = total + y;  comp' = (t - total) - y;  total' = t``

    ``comp`` is the rounding error of the sum so far (negated on the next step), so ``total``
    stays within ~2 ulp of the exact sum however many terms it has had, where plain float32
    addition drifts by ~n ulp (measured: 0.5 % after 10^8 events, docs/benchmarks.md). XLA
    does not reassociate float arithmetic, so the compensation is computed as written; the
    native step computes the same.
    """
    y = inc - comp
    t = total + y
    return t, (t - total) - y


def _continue_from(start: int, scale: float, tables: InferenceTables | None):
    """Inference branch of :meth:`EventSSM._run_layers`: run layers ``start ..`` on ``x``."""

    def run(model: EventSSM, x: Array, times: Array, lengths: Array, layer_states: list[State],
            head_state: State) -> tuple[list[State], State]:
        feats = model.layers[start].features(x, lengths_mask(lengths, x.shape[1]), False)
        return model._run_layers(start, feats, times, scale, lengths, layer_states, head_state,
                                 False, tables)

    return run


def _unchanged(model: EventSSM, x: Array, times: Array, lengths: Array,
               layer_states: list[State], head_state: State) -> tuple[list[State], State]:
    """No session completed a window that reaches these layers: their state stays."""
    return layer_states, head_state
