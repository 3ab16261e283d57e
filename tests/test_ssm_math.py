"""The SSM's initialisation and discretisation against independent NumPy computations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numeric import assert_close

from evssm.models import pooling, ssm
from evssm.models.ssm import cexp, discretize, window_states
from evssm.models.ssm_init import hippo_legs, hippo_n_init


def test_hippo_legs_matrix_entries() -> None:
    a = hippo_legs(4)
    for n in range(4):
        for k in range(4):
            want = (-np.sqrt(2 * n + 1) * np.sqrt(2 * k + 1) if n > k
                    else -(n + 1) if n == k else 0.0)
            assert a[n, k] == pytest.approx(want)


@pytest.mark.parametrize("b", [4, 8, 16])
def test_hippo_n_eigenvalues_match_numpy_eig(b: int) -> None:
    """Eigenvalues of the normal part S = A + p p^T, computed with a general eigensolver."""
    n = np.arange(b)
    s = np.where(n[:, None] > n[None, :], -np.sqrt(2 * n[:, None] + 1) * np.sqrt(2 * n[None, :] + 1), 0.0)
    s = s - np.diag(n + 1.0) + np.outer(np.sqrt(n + 0.5), np.sqrt(n + 0.5))
    want = np.linalg.eigvals(s)
    lre, lim, v = hippo_n_init(b, b, conj_sym=False)
    got = lre + 1j * lim
    def by_imag(z: np.ndarray) -> np.ndarray:  # the real parts are all -1/2
        return z[np.argsort(z.imag)]

    assert_close(by_imag(got), by_imag(want), atol=1e-8)
    assert_close(lre, -0.5)
    # V diagonalises S and is unitary.
    assert_close(v @ np.diag(got) @ v.conj().T, s, atol=1e-8)
    assert_close(v.conj().T @ v, np.eye(b), atol=1e-10)


def test_block_diagonal_and_conj_sym() -> None:
    lre, lim, v = hippo_n_init(32, 8, conj_sym=True)
    assert lre.shape == lim.shape == (16,) and v.shape == (32, 16)
    block = hippo_n_init(8, 8, conj_sym=False)
    assert_close(lim[:4], block[1][:4])
    assert_close(lim[4:8], block[1][:4])  # repeated per block
    assert np.all(v[8:, :4] == 0) and np.all(v[:8, 4:] == 0)


@pytest.mark.parametrize("mode", ["zoh", "dirac", "async"])
def test_discretisation_formulas(mode: str) -> None:
    rng = np.random.default_rng(0)
    lam = -rng.uniform(0.1, 1.0, 6) + 1j * rng.normal(size=6)
    delta = rng.uniform(0.001, 0.1, 6)
    dt = rng.uniform(0, 5, 7)
    bar, gain = discretize(jnp.asarray(lam, jnp.complex64), jnp.asarray(delta, jnp.float32),
                           jnp.asarray(dt, jnp.float32), mode)
    want_bar = np.exp(lam[None] * delta[None] * dt[:, None])
    want_gain = {"zoh": (want_bar - 1) / lam, "dirac": np.ones(6),
                 "async": (np.exp(lam * delta) - 1) / lam}[mode]
    assert_close(np.asarray(bar), want_bar, rtol=1e-5, atol=1e-6)
    assert_close(np.broadcast_to(np.asarray(gain), np.shape(want_gain)), want_gain,
                               rtol=1e-5, atol=1e-6)


def test_real_arithmetic_complex_exp_equals_exp() -> None:
    """``cexp`` (used for every decay) is the complex exponential up to float32 rounding."""
    rng = np.random.default_rng(1)
    z = (-rng.uniform(0, 20, 1000) + 1j * rng.uniform(-300, 300, 1000)).astype(np.complex64)
    got = np.asarray(cexp(jnp.asarray(z)))
    assert_close(got, np.exp(z.astype(np.complex128)), rtol=2e-6, atol=1e-6)
    assert_close(got, np.asarray(jnp.exp(jnp.asarray(z))), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("short", [True, False])
@pytest.mark.parametrize("stride,off", [(1, 0), (4, 0), (4, 3), (5, 2)])
def test_window_states_equal_the_sequential_recurrence(stride: int, off: int, short: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Block-folded states at window starts equal a plain loop of s_i = a_i s_{i-1} + b_i
    (both the short-packet membership-matmul path and the block-layout path)."""
    if not short:
        monkeypatch.setattr(ssm, "SHORT_PACKET_CELLS", 0)
    rng = np.random.default_rng(stride + off)
    p, length, n = 6, 23, 19
    step = (-rng.uniform(0.1, 1, p) + 1j * rng.normal(size=p)) * 0.1
    times = rng.uniform(0, 3, length)
    b = rng.normal(size=(length, p)) + 1j * rng.normal(size=(length, p))
    s_last = rng.normal(size=p) + 1j * rng.normal(size=p)
    s_first = rng.normal(size=p) + 1j * rng.normal(size=p)
    states, new_last, new_first = window_states(
        jnp.asarray(step, jnp.complex64), jnp.asarray(b[None], jnp.complex64),
        jnp.asarray(times[None], jnp.float32), 1.0, jnp.array([n]), jnp.array([off]),
        jnp.asarray(s_last[None], jnp.complex64), jnp.asarray(s_first[None], jnp.complex64),
        stride)
    s = s_last.copy()
    seq = []
    for i in range(n):
        s = np.exp(step * times[i]) * s + b[i]
        seq.append(s.copy())
    assert_close(np.asarray(new_last[0]), seq[-1], rtol=1e-4, atol=1e-4)
    # Window w starts at packet event w*stride - off (window 0 earlier when off > 0).
    for w in range(states.shape[1]):
        first = w * stride - off
        if first < 0:
            want = s_first
        elif first < n:
            want = seq[first]
        else:
            continue
        assert_close(np.asarray(states[0, w]), want, rtol=1e-4, atol=1e-4)
    nxt = ((off + n) // stride) * stride - off
    if 0 <= nxt < n:
        assert_close(np.asarray(new_first[0]), seq[nxt], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride", [3, 4])
def test_pool_windows_paths_agree(stride: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Window pooling by membership matmul (short packets) equals the window-aligned layout."""
    rng = np.random.default_rng(stride)
    batch, length, d = 3, 11, 5
    x = jnp.asarray(rng.normal(size=(batch, length, d)), jnp.float32)
    dt = jnp.asarray(rng.uniform(0, 2, (batch, length)), jnp.float32)
    n, off = jnp.array([11, 7, 0]), jnp.array([0, stride - 1, 1])
    carry = {"sum_wx": jnp.asarray(rng.normal(size=(batch, d)), jnp.float32),
             "sum_w": jnp.array([0.0, 1.5, 0.7], jnp.float32),
             "sum_dt": jnp.array([0.0, 2.0, 0.3], jnp.float32)}
    w = pooling.pool_weights(dt, off, stride, "timepool")
    short = pooling.pool_windows(x, w, dt, n, off, carry, stride)
    monkeypatch.setattr(pooling, "SHORT_PACKET_CELLS", 0)
    long = pooling.pool_windows(x, w, dt, n, off, carry, stride)
    complete = (off + n) // stride
    for b in range(batch):
        k = int(complete[b])
        assert_close(np.asarray(short[0][b, :k]), np.asarray(long[0][b, :k]),
                                   rtol=1e-5, atol=1e-6)
        assert_close(np.asarray(short[1][b, :k]), np.asarray(long[1][b, :k]),
                                   rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(short[2]), jax.tree.leaves(long[2]), strict=True):
        assert_close(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
