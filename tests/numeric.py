"""Numeric comparisons for the tests (finite first, then close) and their random seeds.

``np.testing.assert_allclose`` calls NaN equal to NaN (and inf equal to inf), so a comparison of
two broken answers passes. Every comparison in the suite goes through :func:`assert_close`, which
fails on any non-finite value before it compares.

Random inputs come from :func:`seeded_rng`, seeded by a name: the same case in every run, so a
failure replays by running the test again (conftest.py prints the seeds a failed test drew).
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

# (name, seed) of every generator the running test drew; conftest.py clears it before each test
# and prints it under a failed one.
drawn_seeds: list[tuple[str, int]] = []


def stable_seed(*parts: object) -> int:
    """A 32-bit seed of ``parts`` (joined by ``/``): their text's CRC-32, the same in every process
    and on every machine. (``hash`` of a str is salted per process by ``PYTHONHASHSEED``, so a
    case seeded by it cannot be replayed.)"""
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def seeded_rng(*parts: object) -> np.random.Generator:
    """``np.random.default_rng(stable_seed(*parts))``, recorded in :data:`drawn_seeds`."""
    seed = stable_seed(*parts)
    drawn_seeds.append(("/".join(str(p) for p in parts), seed))
    return np.random.default_rng(seed)


def assert_finite(value: Any, what: str = "value") -> np.ndarray:
    """``value`` as an array; fails naming the first non-finite entry."""
    array = np.asarray(value)
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))
        first = tuple(int(i) for i in bad[0])
        raise AssertionError(f"{what}: {len(bad)} non-finite entries, first at {first}: "
                             f"{array[first]}")
    return array


def assert_close(actual: Any, desired: Any, rtol: float = 1e-7, atol: float = 0.0,
                 err_msg: str = "") -> None:
    """Both finite, then ``np.testing.assert_allclose(actual, desired, rtol, atol)``."""
    a = assert_finite(actual, f"actual {err_msg}".strip())
    d = assert_finite(desired, f"desired {err_msg}".strip())
    np.testing.assert_allclose(a, d, rtol=rtol, atol=atol, err_msg=err_msg)
