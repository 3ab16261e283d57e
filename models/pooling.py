"""Event pooling over windows of ``s`` consecutive events, with a carried partial window.

Window ``w`` holds events ``ws .. ws+s-1`` of the stream's global event count; a window produces
its output once its last event has arrived (a trailing incomplete window produces nothing yet).
Every mode is a weighted mean with pooled time step ``sum dt``::

    first     w_j = 1 at the window's first event, else 0   (the value at the first event)
    avgpool   w_j = 1                                         (mean)
    timepool  w_j = dt_j + eps, eps = 1e-6                    (time-weighted mean)

    Pool(x)_w = sum_j w_j x_j / sum_j w_j,        Pool(dt)_w = sum_j dt_j

The partial sums of the current window (``sum w x``, ``sum w``, ``sum dt``) are the carried state,
so a window split across packets pools exactly as if it had arrived in one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

TIMEPOOL_EPS = 1e-6

# Packets with (events x windows) up to this pool by a membership matmul (no gathers).
SHORT_PACKET_CELLS = 4096


def known_zero(value: Any) -> bool:
    """True when ``value`` is known at trace time to be all zero: a NumPy array (part of a fresh
    state built on the host, :func:`~.model.fresh_state`), not a traced value."""
    return isinstance(value, np.ndarray) and not value.any()


def pool_weights(dt: Array, offsets: Array, stride: int, mode: str) -> Array:
    """Per-event pooling weights: dt [B, L] ms, offsets [B] -> [B, L]."""
    if mode == "avgpool":
        return jnp.ones_like(dt)
    if mode == "timepool":
        return dt + TIMEPOOL_EPS
    if mode == "first":
        index = offsets[:, None] + jnp.arange(dt.shape[1])[None, :]
        return (index % stride == 0).astype(dt.dtype)
    raise ValueError(f"unknown pooling mode {mode!r}")


def pool_windows(x: Array, w: Array, dt: Array, n: Array, off: Array, carry: dict[str, Array],
                 stride: int) -> tuple[Array, Array, dict[str, Array]]:
    """Pool B sessions' packets into windows.

    x [B, L, d], w [B, L], dt [B, L]; n [B] real events; off [B] events of the current window
    already seen; carry: ``sum_wx`` [B, d], ``sum_w`` [B], ``sum_dt`` [B].
    Returns ``(pooled [B, W, d], pooled_dt [B, W], carry')`` with
    ``W = ceil((L + stride - 1) / stride)``; windows ``0 .. (off + n) // stride - 1`` are
    complete, later rows are undefined.
    """
    batch, length, d = x.shape
    nwin = -(-(length + stride - 1) // stride)
    real = jnp.arange(length)[None, :] < n[:, None]
    if length * (nwin + 1) <= SHORT_PACKET_CELLS:
        # Short packets: window sums of [w x, w, dt] as one matmul with the 0/1
        # window-membership matrix (no gathers); the carried partial sums join window 0.
        win = (jnp.arange(length)[None, :] + off[:, None]) // stride  # [B, L]
        member = (win[:, None, :] == jnp.arange(nwin + 1)[None, :, None]) & real[:, None, :]
        cols = jnp.concatenate([w[..., None] * x, w[..., None], dt[..., None]], -1)
        first = (jnp.arange(nwin + 1) == 0)[None, :, None]
        prior = jnp.concatenate([carry["sum_wx"], carry["sum_w"][:, None],
                                 carry["sum_dt"][:, None]], -1)[:, None, :]
        sums = jnp.einsum("bwl,blc->bwc", member.astype(x.dtype), cols) + jnp.where(
            first, prior, 0.0)  # [B, nwin + 1, d + 2]
        m = (off + n) // stride  # complete windows; window m is the new partial one
        new = jnp.take_along_axis(sums, m[:, None, None], 1)[:, 0]
        sum_w = sums[..., d]
        pooled = sums[..., :d] / jnp.where(sum_w > 0, sum_w, 1.0)[..., None]
        new_carry = {"sum_wx": new[:, :d], "sum_w": new[:, d], "sum_dt": new[:, d + 1]}
        return pooled[:, :nwin], sums[:, :nwin, d + 1], new_carry
    if all(known_zero(a) for a in (off, *carry.values())):
        return _pool_windows_fresh(x, w, dt, n, stride)
    return jax.vmap(_pool_windows_one, in_axes=(0, 0, 0, 0, 0, 0, None))(
        x, w, dt, n, off, carry, stride)


def _pool_windows_fresh(x: Array, w: Array, dt: Array, n: Array, stride: int
                        ) -> tuple[Array, Array, dict[str, Array]]:
    """:func:`pool_windows` when every packet starts a window with nothing carried (offsets
    known to be zero at trace time, as in training): the window layout is the packet padded to
    whole windows, a reshape instead of a gather."""
    batch, length, d = x.shape
    nwin = -(-(length + stride - 1) // stride)
    real = jnp.arange(length)[None, :] < n[:, None]
    pad = ((0, 0), (0, (nwin + 1) * stride - length))
    wb = jnp.pad(jnp.where(real, w, 0.0), pad).reshape(batch, nwin + 1, stride)
    dtb = jnp.pad(jnp.where(real, dt, 0.0), pad).reshape(batch, nwin + 1, stride)
    xb = jnp.pad(x, (*pad, (0, 0))).reshape(batch, nwin + 1, stride, d)
    sum_wx = jnp.einsum("bws,bwsd->bwd", wb, xb)
    sum_w, sum_dt = wb.sum(2), dtb.sum(2)
    pooled = sum_wx / jnp.where(sum_w > 0, sum_w, 1.0)[..., None]
    m = (n // stride)[:, None]  # complete windows; window m is the new partial one
    new_carry = {"sum_wx": jnp.take_along_axis(sum_wx, m[..., None], 1)[:, 0],
                 "sum_w": jnp.take_along_axis(sum_w, m, 1)[:, 0],
                 "sum_dt": jnp.take_along_axis(sum_dt, m, 1)[:, 0]}
    return pooled[:, :nwin], sum_dt[:, :nwin], new_carry


def _pool_windows_one(x: Array, w: Array, dt: Array, n: Array, off: Array,
                      carry: dict[str, Array], stride: int
                      ) -> tuple[Array, Array, dict[str, Array]]:
    """:func:`pool_windows` for one session (x [L, d]) through a window-aligned layout."""
    length = x.shape[0]
    nwin = -(-(length + stride - 1) // stride)
    pos = jnp.arange((nwin + 1) * stride)
    src = pos - off
    real = (src >= 0) & (src < n)
    src = jnp.clip(src, 0, length - 1)
    wb = jnp.where(real, w[src], 0.0).reshape(nwin + 1, stride)
    dtb = jnp.where(real, dt[src], 0.0).reshape(nwin + 1, stride)
    xb = x[src].reshape(nwin + 1, stride, -1)
    sum_wx = jnp.einsum("ws,wsd->wd", wb, xb).at[0].add(carry["sum_wx"])
    sum_w = wb.sum(1).at[0].add(carry["sum_w"])
    sum_dt = dtb.sum(1).at[0].add(carry["sum_dt"])
    pooled = sum_wx / jnp.where(sum_w > 0, sum_w, 1.0)[:, None]
    m = (off + n) // stride  # complete windows; window m is the new partial one
    new_carry = {"sum_wx": sum_wx[m], "sum_w": sum_w[m], "sum_dt": sum_dt[m]}
    return pooled[:nwin], sum_dt[:nwin], new_carry


def pool_state_shapes(width: int) -> dict[str, tuple[tuple[int, ...], jnp.dtype]]:
    """Carried partial window of one session."""
    return {"sum_wx": ((width,), jnp.float32), "sum_w": ((), jnp.float32),
            "sum_dt": ((), jnp.float32)}
