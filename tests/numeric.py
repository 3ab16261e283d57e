"""Numeric comparisons for the tests: finite first, then close.

``np.testing.assert_allclose`` calls NaN equal to NaN (and inf equal to inf), so a comparison of
two broken answers passes. Every comparison in the suite goes through :func:`assert_close`, which
fails on any non-finite value before it compares.
"""

from __future__ import annotations

from typing import Any

import numpy as np


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
