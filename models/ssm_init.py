"""HiPPO-N initialisation of the diagonal S5 state matrix (NumPy, float64).

The HiPPO-LegS matrix (size ``b``)::

    A_nk = -sqrt(2n+1) sqrt(2k+1)   n > k
           -(n+1)                   n = k
           0                        n < k

is the sum of a normal matrix and a rank-one term. Adding back ``p p^T`` with
``p_n = sqrt(n + 1/2)`` gives the normal matrix ``S = A + p p^T``, whose diagonal is constant
``-1/2``. ``S`` = ``-1/2 I`` + a skew-symmetric matrix, so ``-i S`` is Hermitian: its
eigendecomposition ``-i S = V diag(w) V^H`` gives ``S``'s eigenvalues ``-1/2 + i w`` and unitary
eigenvectors ``V``. The initial ``Lambda`` is ``Lambda_re = mean(diag S) = -1/2``,
``Lambda_im = w``.

For a state of size ``P`` and block size ``b`` the block is repeated ``P/b`` times (block-diagonal
``V``). With conjugate symmetry only the first ``b/2`` eigenpairs of each block are kept
(``P' = P/2`` states; the readout doubles the real part).
"""

from __future__ import annotations

import numpy as np


def hippo_legs(b: int) -> np.ndarray:
    """HiPPO-LegS matrix ``A`` [b, b]."""
    q = np.sqrt(2.0 * np.arange(b) + 1.0)
    a = -np.tril(np.outer(q, q), k=-1)
    return a - np.diag(np.arange(b) + 1.0)


def hippo_normal(b: int) -> np.ndarray:
    """The normal part ``S = A + p p^T`` [b, b], ``p_n = sqrt(n + 1/2)``."""
    p = np.sqrt(np.arange(b) + 0.5)
    return hippo_legs(b) + np.outer(p, p)


def hippo_n_block(b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigen-decomposition of one HiPPO-N block.

    Returns ``(lambda_re [b], lambda_im [b], V [b, b] complex)`` with ``S = V diag(Lambda) V^H``.
    """
    s = hippo_normal(b)
    lambda_re = np.full(b, np.mean(np.diag(s)))
    lambda_im, v = np.linalg.eigh(s * -1j)
    return lambda_re, lambda_im, v


def hippo_n_init(p: int, b: int, conj_sym: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block-diagonal HiPPO-N initialisation of a state of size ``p``.

    Returns ``(lambda_re [P'], lambda_im [P'], V [p, P'] complex)`` where ``P' = p/2`` with
    ``conj_sym`` (first ``b/2`` eigenpairs of every block) and ``p`` otherwise. ``V`` has
    orthonormal columns, so ``V^-1 = V^H``.
    """
    if p % b:
        raise ValueError(f"state size {p} is not a multiple of block size {b}")
    lre, lim, v = hippo_n_block(b)
    keep = b // 2 if conj_sym else b
    lre, lim, v = lre[:keep], lim[:keep], v[:, :keep]
    nblocks = p // b
    big_v = np.zeros((p, nblocks * keep), dtype=np.complex128)
    for j in range(nblocks):
        big_v[j * b:(j + 1) * b, j * keep:(j + 1) * keep] = v
    return np.tile(lre, nblocks), np.tile(lim, nblocks), big_v
