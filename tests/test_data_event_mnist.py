"""event-mnist: source digits, split, simulated DVS recordings, determinism, cache."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from evssm.models.data import event_mnist as em
from evssm.models.data import load_dataset
from evssm.models.events import recording_inputs

PARAMS = em.EventMnistParams()


@pytest.fixture(scope="module")
def first16() -> em.ArrayDataset:
    return em.build_split("test", PARAMS, np.arange(16), progress=False)


def test_source_digits_and_split() -> None:
    images, labels = em.mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), [500] * 10)
    train, test = em.split_rows("train"), em.split_rows("test")
    assert train.size == 4000 and test.size == 1000
    assert not set(train) & set(test)
    np.testing.assert_array_equal(np.bincount(labels[test]), [100] * 10)
    assert (np.diff(labels[train]) != 0).mean() > 0.5  # shuffled, not sorted by label
    np.testing.assert_array_equal(em.split_rows("test"), test)  # fixed


def test_recordings_are_valid_dvs_streams(first16: em.ArrayDataset) -> None:
    ds = first16
    assert ds.sensor.width == ds.sensor.height == 34 and ds.class_names == tuple("0123456789")
    images, labels = em.mnist_5k()
    np.testing.assert_array_equal(ds.labels, labels[em.split_rows("test")[:16]])
    counts = ds.event_counts()
    assert 1000 <= counts.mean() <= 2500, counts
    assert counts.min() > 300
    for rec, _ in ds:
        assert rec.t.dtype == np.int64 and rec.t.min() >= 0 and (np.diff(rec.t) >= 0).all()
        assert rec.t.max() < 360_000  # three ~100 ms saccades
        assert 0.3 < rec.p.mean() < 0.7  # ON and OFF both present
        recording_inputs(ds.sensor, rec)  # addresses in range, tokens and gaps valid


def test_events_follow_the_digit(first16: em.ArrayDataset) -> None:
    """Event counts per pixel correlate with the digit's edges, not with noise."""
    images, _ = em.mnist_5k()
    rows = em.split_rows("test")[:16]
    for (rec, _), row in zip(first16, rows, strict=True):
        counts = np.zeros((34, 34))
        np.add.at(counts, (rec.y, rec.x), 1)
        ink = np.zeros((34, 34))
        ink[3:31, 3:31] = images[row] > 64  # the digit at the triangle's mean position
        inside = counts[ink > 0].mean()
        far = counts[:, :2].mean()  # columns the digit never reaches: noise only
        assert inside > 10 * max(far, 0.05)


def test_three_saccades_are_visible(first16: em.ArrayDataset) -> None:
    rec, _ = first16[0]
    hist = np.histogram(rec.t, bins=np.arange(0, 330_001, 10_000))[0]
    # events pause where the motion stops (around 100 ms and 200 ms) and peak mid-saccade
    for stop in (10, 20):
        assert hist[stop - 1:stop + 1].sum() < 0.5 * hist[stop - 6:stop - 4].sum()


def test_single_sample_alone_equals_batch(first16: em.ArrayDataset) -> None:
    for i in (0, 7, 15):
        alone = em.build_split("test", PARAMS, [i], progress=False)[0][0]
        batched = first16[i][0]
        for col in ("t", "x", "y", "p"):
            np.testing.assert_array_equal(getattr(alone, col), getattr(batched, col))
    other = em.build_split("train", PARAMS, [0], progress=False)[0][0]
    assert len(other) != len(first16[0][0]) or not np.array_equal(other.t, first16[0][0].t)


def test_params_change_output_and_hash() -> None:
    loud = dataclasses.replace(PARAMS, threshold=0.3)
    assert loud.hash() != PARAMS.hash()
    a = em.build_split("test", PARAMS, [1], progress=False).event_counts()[0]
    b = em.build_split("test", loud, [1], progress=False).event_counts()[0]
    assert b > 1.3 * a


def test_cache_roundtrip_and_rebuild_on_param_change(tmp_path: Path) -> None:
    small = dataclasses.replace(PARAMS, train_per_class=2, test_per_class=1)
    ds = load_dataset("event-mnist", "test", tmp_path, params=small, progress=False)
    path = tmp_path / "event-mnist" / "test.npz"
    assert path.is_file() and len(ds) == 10
    assert em.cached_size(tmp_path, "test", small) == 10 and em.cached_size(tmp_path, "test") is None
    direct = em.build_split("test", small, progress=False)
    for i in range(10):
        np.testing.assert_array_equal(ds[i][0].t, direct[i][0].t)
        np.testing.assert_array_equal(ds[i][0].x, direct[i][0].x)
        assert ds[i][1] == direct[i][1]
    stamp = path.stat().st_mtime_ns
    again = load_dataset("event-mnist", "test", tmp_path, params=small, progress=False, limit=3)
    assert len(again) == 3 and path.stat().st_mtime_ns == stamp  # read, not rebuilt
    os.utime(path, ns=(stamp - 10**9, stamp - 10**9))
    changed = dataclasses.replace(small, noise_rate_hz=0.5)
    load_dataset("event-mnist", "test", tmp_path, params=changed, progress=False)
    assert path.stat().st_mtime_ns != stamp - 10**9  # stale hash: rebuilt
    assert em.cached_size(tmp_path, "test", changed) == 10


def test_no_cache_subset(tmp_path: Path) -> None:
    ds = load_dataset("event-mnist", "test", tmp_path, cache=False, limit=4, progress=False)
    assert len(ds) == 4 and not (tmp_path / "event-mnist").exists()
    with pytest.raises(ValueError, match="splits"):
        load_dataset("event-mnist", "dev", tmp_path)


def test_valid_split_is_carved_from_train_per_class(tmp_path: Path) -> None:
    """``valid`` holds 1/8 of each class of the train file, the same samples on every call and
    none of them in ``train``; ``train`` is the rest."""
    small = dataclasses.replace(PARAMS, train_per_class=16, test_per_class=1)
    opened = {split: load_dataset("event-mnist", split, tmp_path, params=small, progress=False)
              for split in ("train", "valid")}
    train, valid = opened["train"], opened["valid"]
    assert (len(train), len(valid)) == (140, 20) and (train.split, valid.split) == ("train", "valid")
    np.testing.assert_array_equal(np.bincount(valid.labels), [2] * 10)
    assert not set(train.indices) & set(valid.indices)
    assert sorted(set(train.indices) | set(valid.indices)) == list(range(160))
    again = load_dataset("event-mnist", "valid", tmp_path, params=small, progress=False)
    np.testing.assert_array_equal(again.indices, valid.indices)
    np.testing.assert_array_equal(again[3][0].t, valid[3][0].t)
    assert len(load_dataset("event-mnist", "train", tmp_path, params=small, progress=False,
                            limit=5)) == 5
    tiny = dataclasses.replace(PARAMS, train_per_class=4, test_per_class=1)
    with pytest.raises(ValueError, match="too few to carve"):
        load_dataset("event-mnist", "valid", tmp_path / "tiny", params=tiny, progress=False)
