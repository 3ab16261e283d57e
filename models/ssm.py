"""The S5 state-space layer for asynchronous events, with carried state.

One implementation serves both forms: a call takes an initial state and returns the final state.
The offline form is a call with a zero state and the whole sequence as one packet.

Per event ``i`` with time step ``dt_i`` (milliseconds) and input ``u_i`` [H_in]::

    Lambda     = Lambda_re + i Lambda_im                       (Lambda_re <= -1e-4 with clip_eigs)
    Delta      = step_rescale * exp(log_step)                  [P']
    Lambda_bar = exp(Lambda * Delta * dt_i)                    (all discretisations)
    gain       = (Lambda_bar - 1) / Lambda                     zoh
               = 1                                             dirac
               = (exp(Lambda * Delta) - 1) / Lambda            async (independent of dt)
    s_i        = Lambda_bar_i * s_{i-1} + gain * (B~ u_i)
    y_i        = c * Re(C~ s_i) + D u_i                        (c = 2 with conj_sym, else 1)

With pooling stride ``s > 1`` the layer emits one output per complete window of ``s`` events
(window ``w`` = events ``ws .. ws+s-1`` in the stream's global event count), reading the state at
the window's *first* event: ``y_w = c * Re(C~ s_{ws}) + D Pool(u)_w``. Only those states are
needed, so the recurrence is evaluated block-wise: the ``s`` transitions between two window starts
are folded into one affine map ``(A, B)`` (vectorised over the whole packet), and only the short
chain of block maps is scanned sequentially.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .pooling import known_zero
from .ssm_init import hippo_n_init

Array = jax.Array

# Sequential scans beat the parallel associative scan on CPU for packet-sized inputs
# (docs/architecture.md, "How it is measured"); on accelerators, or for long offline sequences,
# the parallel scan wins.
PARALLEL_SCAN_MIN_LENGTH_CPU = 4096

# Strided packets with (events x blocks) up to this use masked reductions and a membership
# matmul instead of a padded block layout (the deeper, already-pooled layers).
SHORT_PACKET_CELLS = 4096


def cexp(z: Array) -> Array:
    """``exp(z) = e^Re(z) (cos Im(z) + i sin Im(z))`` for finite complex z, in real arithmetic.

    XLA's complex ``exp`` (with its special-value handling) runs ~1.5-2x slower on CPU, and the
    exponentials of the decays are a large share of a packet's work.
    """
    mag = jnp.exp(z.real)
    return jax.lax.complex(mag * jnp.cos(z.imag), mag * jnp.sin(z.imag))


def input_gain(lambda_: Array, delta: Array, dt: Array, mode: str) -> Array:
    """Input gain of every event: lambda_ [P'] complex, delta [P'], dt [...] (ms) ->
    ``[..., P']`` for ``zoh``, ``[P']`` otherwise (the only gain that depends on dt is zoh's)."""
    step = lambda_ * delta
    if mode == "zoh":
        return (cexp(step * dt[..., None]) - 1.0) / lambda_
    if mode == "dirac":
        return jnp.ones_like(step)
    if mode == "async":
        return (cexp(step) - 1.0) / lambda_
    raise ValueError(f"unknown discretization {mode!r}")


def discretize(lambda_: Array, delta: Array, dt: Array, mode: str) -> tuple[Array, Array]:
    """Transition and input gain of every event.

    lambda_ [P'] complex, delta [P'] float, dt [...] float (ms) -> ``(Lambda_bar [..., P'],
    gain [..., P'] or [P'])``, both complex.
    """
    return cexp(lambda_ * delta * dt[..., None]), input_gain(lambda_, delta, dt, mode)


def _combine(left: tuple[Array, Array], right: tuple[Array, Array]) -> tuple[Array, Array]:
    """Compose affine maps ``s -> A s + B``: first ``left``, then ``right``."""
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def chain_scan(a: Array, b: Array, s0: Array) -> Array:
    """States of ``s_k = a_k s_{k-1} + b_k`` from ``s_{-1} = s0``.

    a, b [B, K, P'] complex, s0 [B, P'] -> [B, K, P'].
    """
    k = a.shape[1]
    if jax.default_backend() == "cpu" and k < PARALLEL_SCAN_MIN_LENGTH_CPU:
        # A plain rolled loop: XLA CPU compiles a small while loop into one kernel, which beats
        # both the doubling scan (one fusion per level) and unrolled bodies several-fold
        # (measured: K = 17, 128 states: 5 us against 19 us; K = 257: 33 us against 300 us).
        def step(s: Array, ab: tuple[Array, Array]) -> tuple[Array, Array]:
            s = ab[0] * s + ab[1]
            return s, s

        _, states = jax.lax.scan(step, s0, (a.swapaxes(0, 1), b.swapaxes(0, 1)))
        return states.swapaxes(0, 1)
    if k <= 64:
        # Short chains on accelerators: a Hillis-Steele doubling scan, log2(K) vectorised steps
        # instead of K dependent loop iterations.
        shift = 1
        while shift < k:
            pad = [(0, 0), (shift, 0), (0, 0)]
            a_prev = jnp.pad(a[:, :-shift], pad, constant_values=1.0)
            b_prev = jnp.pad(b[:, :-shift], pad)
            a, b = _combine((a_prev, b_prev), (a, b))
            shift *= 2
        return a * s0[:, None] + b
    b = b.at[:, 0].add(a[:, 0] * s0)
    return jax.lax.associative_scan(_combine, (a, b), axis=1)[1]


class DecayTable(NamedTuple):
    """``exp(step * k * scale)`` for integer times ``k < size`` [size, P'] (complex)."""

    values: Array

    @classmethod
    def build(cls, step: Array, scale: float, size: int) -> DecayTable:
        return cls(cexp(step * (jnp.arange(size, dtype=jnp.float32) * scale)[:, None]))


def decay(step: Array, times: Array, scale: float, table: DecayTable | None) -> Array:
    """``exp(step * times * scale)``: step [P'] complex, times [...] -> [..., P'].

    With a table and integer-valued times (microseconds), a packet whose times all fall inside
    the table gathers instead of exponentiating — the same values, computed once per model.
    """
    def direct() -> Array:
        return cexp(step * (times * scale)[..., None])

    if table is None:
        return direct()
    values = table.values
    return jax.lax.cond(jnp.all(times < values.shape[0]),
                        lambda: values[times.astype(jnp.int32)], direct)


def window_states(step: Array, b: Array, times: Array, scale: float, n: Array, off: Array,
                  s_last: Array, s_first: Array, stride: int, table: DecayTable | None = None
                  ) -> tuple[Array, Array, Array]:
    """SSM states at the first event of every window touched by a packet, for B sessions.

    step [P'] = Lambda * Delta; b [B, L, P'] gained inputs ``gain * B~ u``; times [B, L] time
    steps (``dt = times * scale`` ms); n [B] real events (later rows are padding); off [B] events
    of the current window seen before the packet (global count mod stride); s_last [B, P'] state
    after the previous event; s_first [B, P'] state at the current window's first event.

    Returns ``(S [B, W, P'], s_last' [B, P'], s_first' [B, P'])``, ``W = ceil((L+stride-1)/stride)``:
    ``S[:, w]`` is the state at the first event of window ``w`` of the packet's pooling grid
    (window 0 starts ``off`` events before the packet).

    Events are grouped so that every block of ``stride`` positions *ends* at a window's first
    event (event i at position ``off + i + stride - 1``; empty positions are the identity). A
    block's map is ``s -> A s + sum_j E_j b_j`` with ``E_j = exp(step * (time from event j to the
    block's end))`` and ``A = exp(step * block span)`` — one vectorised exponential (or table
    gather) per event instead of a chain of products — and the short chain of block maps is
    scanned. With stride 1 the blocks are the events themselves (no regrouping).
    """
    batch, length = times.shape
    real_ev = jnp.arange(length)[None, :] < n[:, None]  # [B, L]
    if stride == 1 and length > 0:
        # off is 0: block k is event k, A_k = exp(step * dt_k); padding is the identity.
        t = jnp.where(real_ev, times, 0.0)
        bb = jnp.where(real_ev[..., None], b, 0.0)
        states = chain_scan(decay(step, t, scale, table), bb, s_last)  # [B, L, P']
        return states, states[:, -1], states[:, -1]
    nwin = -(-(length + stride - 1) // stride)
    nblk = nwin + 1
    if length * nblk <= SHORT_PACKET_CELLS:
        # Short packets (deeper strided layers): no block layout (mostly empty slots). Time
        # sums and block sums are masked reductions and one small matmul with the 0/1
        # block-membership matrix; exponentials only at real events, one fusion for all.
        t = jnp.where(real_ev, times, 0.0)
        blk = (jnp.arange(length)[None, :] + off[:, None] + (stride - 1)) // stride  # [B, L]
        later = jnp.arange(length)[None, :] > jnp.arange(length)[:, None]  # [i, j]: j > i
        same = (blk[:, :, None] == blk[:, None, :]) & later[None]
        suffix_ev = jnp.where(same, t[:, None, :], 0.0).sum(2)  # time after event i, in block
        member = blk[:, None, :] == jnp.arange(nblk)[None, :, None]  # [B, nblk, L]
        span = jnp.where(member, t[:, None, :], 0.0).sum(2)  # [B, nblk]
        decays = decay(step, jnp.concatenate([suffix_ev, span], 1), scale, table)
        eb = jnp.where(real_ev[..., None], decays[:, :length] * b, 0.0)
        sums = jnp.einsum("bkl,blp->bkp", member.astype(jnp.float32),
                          jnp.concatenate([eb.real, eb.imag], -1))
        p = b.shape[-1]
        blk_b = jax.lax.complex(sums[..., :p], sums[..., p:])
        span_decay = decays[:, length:]
    else:
        # Times (small) in the block layout: suffix sums within blocks, block spans.
        if known_zero(off):
            # Every packet starts a window (a fresh state, as in training): the layout is the
            # packet shifted by stride - 1, a pad instead of a gather (and of its scatter in
            # the backward pass).
            shift = ((0, 0), (stride - 1, nblk * stride - length - (stride - 1)))
            tb = jnp.pad(jnp.where(real_ev, times, 0.0), shift).reshape(batch, nblk, stride)
            bb = jnp.pad(jnp.where(real_ev[..., None], b, 0.0), (*shift, (0, 0)))
        else:
            src = jnp.arange(nblk * stride)[None, :] - off[:, None] - (stride - 1)
            real = (src >= 0) & (src < n[:, None])
            src = jnp.clip(src, 0, length - 1)
            tb = jnp.where(real, jnp.take_along_axis(times, src, 1), 0.0)
            tb = tb.reshape(batch, nblk, stride)
            bb = jnp.where(real[..., None], jnp.take_along_axis(b, src[..., None], 1), 0.0)
        suffix = jnp.flip(jnp.cumsum(jnp.flip(tb, -1), -1), -1) - tb  # time after event j
        span = suffix[..., 0] + tb[..., 0]
        bb = bb.reshape(batch, nblk, stride, -1)
        blk_b = (decay(step, suffix, scale, table) * bb).sum(2)
        span_decay = decay(step, span, scale, table)
    states = chain_scan(span_decay, blk_b, s_last)  # [B, nblk, P']
    # Block 0 ends before the packet when off > 0: window 0 started in an earlier packet.
    states = states.at[:, 0].set(jnp.where((off > 0)[:, None], s_first, states[:, 0]))
    next_window = (off + n) // stride
    s_first = jnp.take_along_axis(states, next_window[:, None, None], 1)[:, 0]
    return states[:, :nwin], states[:, -1], s_first


class S5SSM(nn.Module):
    """Diagonal complex S5 SSM ``d_in -> d_out`` with block-diagonal HiPPO-N initialisation.

    Parameters (complex ones stored as trailing real/imaginary pairs): ``Lambda_re``,
    ``Lambda_im`` [P'], ``B`` (= B~) [P', d_in, 2], ``C`` (= C~) [d_out, P', 2], ``D`` [d_in] or
    [d_out, d_in], ``log_step`` [P'].
    """

    d_in: int
    d_out: int
    d_state: int
    block_size: int
    conj_sym: bool = False
    clip_eigs: bool = False
    discretization: str = "async"
    dt_min: float = 0.001
    dt_max: float = 0.1
    step_rescale: float = 1.0

    def setup(self) -> None:
        lre, lim, v = hippo_n_init(self.d_state, self.block_size, self.conj_sym)
        vinv = v.conj().T  # [P', P]
        self.lambda_re = self.param("Lambda_re", lambda _: jnp.asarray(lre, jnp.float32))
        self.lambda_im = self.param("Lambda_im", lambda _: jnp.asarray(lim, jnp.float32))

        # Initialisers stay traceable: Flax shape-checks them with jax.eval_shape.
        def init_b(key: Array) -> Array:
            b = nn.initializers.lecun_normal()(key, (self.d_state, self.d_in))  # [P, d_in]
            bt = jnp.asarray(vinv, jnp.complex64) @ b.astype(jnp.complex64)  # B~ = V^-1 B
            return jnp.stack([bt.real, bt.imag], -1)

        def init_c(key: Array) -> Array:
            c = nn.initializers.lecun_normal()(key, (self.d_out, self.d_state, 2))
            ct = (c[..., 0] + 1j * c[..., 1]) @ jnp.asarray(v, jnp.complex64)  # C~ = C V
            return jnp.stack([ct.real, ct.imag], -1).astype(jnp.float32)

        def init_log_step(key: Array) -> Array:
            return jax.random.uniform(key, (lre.shape[0],), jnp.float32,
                                      np.log(self.dt_min), np.log(self.dt_max))

        self.b = self.param("B", init_b)
        self.c = self.param("C", init_c)
        if self.d_in == self.d_out:
            self.d = self.param("D", nn.initializers.normal(1.0), (self.d_in,))
        else:
            self.d = self.param("D", nn.initializers.glorot_normal(), (self.d_out, self.d_in))
        self.log_step = self.param("log_step", init_log_step)

    @property
    def readout_scale(self) -> float:
        return 2.0 if self.conj_sym else 1.0

    def lambda_(self) -> Array:
        lre = jnp.minimum(self.lambda_re, -1e-4) if self.clip_eigs else self.lambda_re
        return lre + 1j * self.lambda_im

    def input_proj(self, u: Array) -> Array:
        """``B~ u``: u [..., d_in] -> [..., P'] complex.

        One real matmul ``u [Re B~; Im B~]^T`` [..., 2P'] (one XLA op, not two).
        """
        p = self.b.shape[0]
        w = jnp.concatenate([self.b[..., 0], self.b[..., 1]], 0).T  # [d_in, 2P']
        y = u @ w
        return jax.lax.complex(y[..., :p], y[..., p:])

    def readout(self, s: Array, u: Array) -> Array:
        """``c Re(C~ s) + D u``: s [..., P'] complex, u [..., d_in] -> [..., d_out].

        One real matmul: ``[Re s, Im s] [c Re C~, -c Im C~]^T``, with ``[u] [D^T]`` appended to
        both factors when D is a matrix.
        """
        c = self.readout_scale
        parts, weights = [s.real, s.imag], [c * self.c[..., 0].T, -c * self.c[..., 1].T]
        if self.d.ndim == 2:
            parts.append(u)
            weights.append(self.d.T)
        y = jnp.concatenate(parts, -1) @ jnp.concatenate(weights, 0)
        return y + u * self.d if self.d.ndim == 1 else y

    def delta(self) -> Array:
        """``Delta = step_rescale * exp(log_step)`` [P']."""
        return self.step_rescale * jnp.exp(self.log_step)

    def step_size(self) -> Array:
        """``Lambda * Delta`` [P'] complex."""
        return self.lambda_() * self.delta()

    def decay_table(self, size: int) -> DecayTable:
        """Decays of integer microsecond times below ``size`` (first layer, inference)."""
        return DecayTable.build(self.step_size(), 1e-3, size)

    def __call__(self, bu: Array, times: Array, scale: float, lengths: Array, offsets: Array,
                 state: dict[str, Array], stride: int, table: DecayTable | None = None
                 ) -> tuple[Array, dict[str, Array]]:
        """States at window starts for a batch of packets.

        bu [B, L, P'] complex (``B~ u`` per event), times [B, L] (``dt = times * scale`` ms),
        lengths [B], offsets [B] (events of the current window already seen)
        -> ``(S [B, W, P'], new state)``.
        """
        lambda_, delta = self.lambda_(), self.delta()
        gain = input_gain(lambda_, delta, times * scale, self.discretization)
        states, s_last, s_first = window_states(lambda_ * delta, gain * bu, times, scale, lengths,
                                                offsets, state["s_last"], state["s_first"], stride,
                                                table)
        return states, {"s_last": s_last, "s_first": s_first}


def ssm_state_shapes(num_states: int) -> dict[str, Any]:
    """Carried SSM state of one session: state after the last event and at the window's start."""
    return {"s_last": ((num_states,), jnp.complex64), "s_first": ((num_states,), jnp.complex64)}
