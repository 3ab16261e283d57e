"""Augmentations: each does what it says and keeps recordings valid."""

from __future__ import annotations

import numpy as np
import pytest
from numeric import assert_close

from evssm.models.data import augment as A
from evssm.models.data import make_recording
from evssm.models.events import Recording, SensorSpec, time_gaps, tokenize

S1 = SensorSpec.one_d(700)
S2 = SensorSpec.two_d(34, 34)


def rec1(n: int = 2000, seed: int = 0) -> Recording:
    rng = np.random.default_rng(seed)
    return make_recording(S1, np.sort(rng.integers(0, 1_000_000, n)), rng.integers(0, 700, n))


def rec2(n: int = 2000, seed: int = 0) -> Recording:
    rng = np.random.default_rng(seed)
    return make_recording(S2, np.sort(rng.integers(0, 300_000, n)), rng.integers(0, 34, n),
                          rng.integers(0, 34, n), rng.integers(0, 2, n))


def assert_valid(rec: Recording, sensor: SensorSpec) -> None:
    assert rec.t.dtype == np.int64 and rec.x.dtype == np.uint16
    if sensor.kind == "2d":
        assert rec.y is not None and rec.p is not None
        assert rec.y.dtype == np.uint16 and rec.p.dtype == np.uint8
        assert len(rec.y) == len(rec.p) == len(rec.t)
    else:
        assert rec.y is None and rec.p is None
    assert len(rec.x) == len(rec.t)
    assert len(rec) == 0 or rec.t.min() >= 0
    tokenize(sensor, rec.x, rec.y, rec.p)  # raises on out-of-range addresses
    time_gaps(rec.t)  # raises on decreasing timestamps


def multiset(rec: Recording) -> list[tuple[int, ...]]:
    cols = [rec.t, rec.x] + ([rec.y, rec.p] if rec.y is not None else [])
    return sorted(zip(*(c.tolist() for c in cols), strict=True))


def test_crop() -> None:
    r = rec1()
    out = A.crop(r, np.random.default_rng(1), 500)
    assert len(out) == 500 and out.t[0] in r.t
    start = int(np.flatnonzero((r.t == out.t[0]) & (r.x == out.x[0]))[0])
    np.testing.assert_array_equal(out.x, r.x[start:start + 500])
    assert A.crop(r, np.random.default_rng(1), 5000) is r


def test_time_skew() -> None:
    r = rec1()
    out = A.time_skew(r, 1.5)
    assert out.t[0] == r.t[0]
    assert_close(out.t - out.t[0], (r.t - r.t[0]) * 1.5, atol=0.5)
    np.testing.assert_array_equal(out.x, r.x)
    assert_valid(out, S1)


def test_drop_chunk_removes_one_contiguous_run() -> None:
    r = rec1()
    out = A.drop_chunk(r, np.random.default_rng(2), 0.25)
    assert len(out) == 1500
    # the kept events are a prefix and a suffix of the original
    k = int(np.argmax((r.t[:len(out)] != out.t) | (r.x[:len(out)] != out.x)))
    np.testing.assert_array_equal(out.x[k:], r.x[k + 500:])
    assert_valid(out, S1)


def test_drop_events_rate() -> None:
    r = rec2(20_000)
    out = A.drop_events(r, np.random.default_rng(3), 0.3)
    assert abs(len(out) / len(r) - 0.7) < 0.02
    assert set(multiset(out)) <= set(multiset(r))
    assert_valid(out, S2)


@pytest.mark.parametrize("sensor, make", [(S1, rec1), (S2, rec2)])
def test_address_jitter(sensor: SensorSpec, make) -> None:
    r = make(5000)
    out = A.jitter_addresses(r, sensor, np.random.default_rng(4), 1.0)
    assert_valid(out, sensor)
    assert 0.85 * len(r) < len(out) <= len(r)  # only events pushed off the edge are lost
    moved = np.isin(out.t, r.t).mean()
    assert moved == 1.0  # times untouched
    # same t-order: each kept event is within a few addresses of an original one
    same = A.jitter_addresses(r, sensor, np.random.default_rng(4), 0.0)
    assert multiset(same) == multiset(r)


def test_roll_shift_drop_and_wrap() -> None:
    r = rec2()
    out = A.roll(r, S2, 5, -3)
    keep = (r.x + 5 < 34) & (r.y.astype(int) - 3 >= 0)
    np.testing.assert_array_equal(out.x, r.x[keep] + 5)
    np.testing.assert_array_equal(out.y, r.y[keep] - 3)
    np.testing.assert_array_equal(out.p, r.p[keep])
    wrapped = A.roll(r, S2, 5, -3, wrap=True)
    assert len(wrapped) == len(r)
    np.testing.assert_array_equal(wrapped.x, (r.x + 5) % 34)
    np.testing.assert_array_equal(wrapped.y, (r.y.astype(int) - 3) % 34)
    assert_valid(out, S2)
    assert_valid(wrapped, S2)
    one = A.roll(rec1(), S1, -10)
    assert_valid(one, S1)
    assert one.x.max() <= 689


def test_rotate() -> None:
    r = make_recording(S2, [0, 1, 2], [33, 20, 16], [16, 16, 17], [1, 0, 1])
    out = A.rotate(r, S2, 90.0)  # centre (16.5, 16.5): (33, 16) -> (17, 33), (20, 16) -> (17, 20)
    np.testing.assert_array_equal(out.x, [17, 17, 16])
    np.testing.assert_array_equal(out.y, [33, 20, 16])
    full = A.rotate(rec2(), S2, 30.0)
    assert_valid(full, S2)
    assert len(full) < 2000  # corners leave the sensor
    assert multiset(A.rotate(rec2(), S2, 0.0)) == multiset(rec2())
    with pytest.raises(ValueError, match="2-D"):
        A.rotate(rec1(), S1, 10.0)


def test_scale() -> None:
    r = make_recording(S2, [0, 1], [0, 20], [16, 16], [1, 1])
    out = A.scale(r, S2, 2.0)  # (0, 16) -> (-16.5, ..) dropped; (20, 16) -> (23.5 -> 24, 15.5 -> 16)
    assert len(out) == 1 and out.x[0] == 24 and out.y[0] == 16
    shrunk = A.scale(rec2(), S2, 0.5)
    assert len(shrunk) == 2000 and shrunk.x.min() >= 8 and shrunk.x.max() <= 25
    assert_valid(shrunk, S2)


@pytest.mark.parametrize("sensor, make", [(S1, rec1), (S2, rec2)])
def test_time_jitter_sorted_non_negative(sensor: SensorSpec, make) -> None:
    r = make()
    out = A.time_jitter(r, np.random.default_rng(5), 5000.0)
    assert len(out) == len(r) and out.t.min() >= 0
    assert_valid(out, sensor)
    assert not np.array_equal(out.t, r.t)
    assert abs(np.mean(out.t) - np.mean(r.t)) < 1000


@pytest.mark.parametrize("sensor, make", [(S1, rec1), (S2, rec2)])
def test_add_noise(sensor: SensorSpec, make) -> None:
    r = make()
    out = A.add_noise(r, sensor, np.random.default_rng(6), 300)
    assert len(out) == len(r) + 300 and out.t[0] >= r.t[0] and out.t[-1] <= r.t[-1]
    assert set(multiset(r)) <= set(multiset(out))
    assert_valid(out, sensor)


def test_cut_mix_fraction_and_window() -> None:
    a, b = rec2(3000, seed=1), rec2(1000, seed=2)
    b = Recording(b.t + 5_000_000, b.x, b.y, b.p)  # a different time base
    rng = np.random.default_rng(7)
    for _ in range(20):
        mixed, lam = A.cut_mix(a, b, rng, 0.5)
        assert_valid(mixed, S2)
        from_b = np.isin(mixed.t - a.t[0] + b.t[0], b.t) & ~np.isin(mixed.t, a.t)
        assert 0.0 <= lam <= 1.0
        if lam > 0:
            # lam is the event fraction from b; b's events sit in one window in a's time base
            n_b = round(lam * len(mixed))
            assert abs(from_b.sum() - n_b) <= max(2, 0.05 * n_b)
            assert mixed.t[0] >= a.t[0] and mixed.t[-1] <= max(a.t[-1], b.t[-1] - b.t[0] + a.t[0])
    one = A.cut_mix(a, Recording(np.zeros(0, np.int64), np.zeros(0, np.uint16), np.zeros(0, np.uint16),
                                 np.zeros(0, np.uint8)), rng)
    assert one[1] == 0.0 and len(one[0]) == len(a)


def test_cut_mix_whole_window_is_b() -> None:
    a, b = rec1(1000, seed=1), rec1(1000, seed=2)

    class Fixed:  # rng whose window covers everything
        def uniform(self, lo: float, hi: float) -> float:
            return 0.999999

        def integers(self, lo: int, hi: int) -> int:
            return 0

    mixed, lam = A.cut_mix(a, b, Fixed(), 0.999999)  # type: ignore[arg-type]
    assert lam > 0.99 and len(mixed) >= 999


@pytest.mark.parametrize("sensor, make", [(S1, rec1), (S2, rec2)])
def test_augment_entry_point_valid_and_deterministic(sensor: SensorSpec, make) -> None:
    cfg = A.AugmentConfig.default(sensor, crop_max_events=1500)
    r = make()
    outs = [A.augment(r, sensor, np.random.default_rng(s), cfg) for s in range(30)]
    for out in outs:
        assert_valid(out, sensor)
        assert len(out) <= 1500 * 1.05 + 1
    again = A.augment(r, sensor, np.random.default_rng(3), cfg)
    np.testing.assert_array_equal(again.t, outs[3].t)
    assert len({len(o) for o in outs}) > 5  # it does vary
    off = A.AugmentConfig()
    same = A.augment(r, sensor, np.random.default_rng(0), off)
    assert same is r


def test_augment_all_on_2d_every_transform() -> None:
    cfg = A.AugmentConfig(crop_max_events=800, time_skew_p=1, drop_chunk_p=1, drop_event_p=1, jitter_p=1,
                          scale_p=1, rotate_p=1, roll_p=1, roll_wrap=True, time_jitter_p=1, noise_p=1)
    for s in range(10):
        assert_valid(A.augment(rec2(seed=s), S2, np.random.default_rng(s), cfg), S2)
    cfg1 = A.AugmentConfig(time_skew_p=1, drop_chunk_p=1, drop_event_p=1, jitter_p=1, roll_p=1,
                           scale_p=1, rotate_p=1, time_jitter_p=1, noise_p=1)  # 2-D-only ones skipped
    assert_valid(A.augment(rec1(), S1, np.random.default_rng(0), cfg1), S1)


def test_empty_recording_survives_everything() -> None:
    empty = make_recording(S2, [], [], [], [])
    cfg = A.AugmentConfig(crop_max_events=10, time_skew_p=1, drop_chunk_p=1, drop_event_p=1, jitter_p=1,
                          scale_p=1, rotate_p=1, roll_p=1, time_jitter_p=1, noise_p=1)
    assert len(A.augment(empty, S2, np.random.default_rng(0), cfg)) == 0


def test_config_validation_and_from_dict() -> None:
    with pytest.raises(ValueError, match="probability"):
        A.AugmentConfig(drop_event_p=1.5)
    with pytest.raises(ValueError, match="unknown keys"):
        A.AugmentConfig.from_dict({"dorp_event_p": 0.1})
    cfg = A.AugmentConfig.from_dict({"roll_p": 0.0}, sensor="2d")
    assert cfg.roll_p == 0.0 and cfg.rotate_p == 0.5
    assert A.AugmentConfig.default("1d").rotate_p == 0.0
    assert A.AugmentConfig.from_dict(cfg.to_dict()) == cfg
