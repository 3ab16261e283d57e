"""Tokenisation and time steps (NumPy, no JAX)."""

from __future__ import annotations

import numpy as np
import pytest

from evssm.models.events import EventError, SensorSpec, time_gaps, tokenize, untokenize


def test_2d_tokenisation_is_one_to_one_over_the_sensor() -> None:
    sensor = SensorSpec.two_d(34, 17)
    x, y, p = np.meshgrid(np.arange(34), np.arange(17), np.arange(2), indexing="ij")
    tokens = tokenize(sensor, x.ravel(), y.ravel(), p.ravel())
    assert tokens.min() == 0 and tokens.max() == sensor.num_tokens - 1
    assert len(np.unique(tokens)) == 34 * 17 * 2 == sensor.num_tokens
    back = untokenize(sensor, tokens)
    for col, want in zip(back, (x.ravel(), y.ravel(), p.ravel()), strict=True):
        np.testing.assert_array_equal(col, want)


def test_1d_tokenisation_and_range_errors() -> None:
    sensor = SensorSpec.one_d(700)
    np.testing.assert_array_equal(tokenize(sensor, np.arange(700)), np.arange(700))
    with pytest.raises(EventError) as err:
        tokenize(sensor, np.array([3, 700]))
    assert err.value.code == "address_out_of_range" and "700" in str(err.value)
    with pytest.raises(EventError):
        tokenize(SensorSpec.two_d(4, 4), np.array([0]), np.array([4]), np.array([0]))


def test_time_gaps_causal_and_checked() -> None:
    t = np.array([10, 10, 15, 2_000_000_000_000], np.int64)
    np.testing.assert_array_equal(time_gaps(t), [0, 0, 5, np.iinfo(np.int32).max])
    np.testing.assert_array_equal(time_gaps(t[:3], last_t=4), [6, 0, 5])
    with pytest.raises(EventError) as err:
        time_gaps(np.array([5, 4]))
    assert err.value.code == "timestamps_decreasing"
    with pytest.raises(EventError):
        time_gaps(np.array([5]), last_t=6)
