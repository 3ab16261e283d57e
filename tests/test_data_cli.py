"""`evssm data` (list, build, info) and the count-histogram baseline."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from evssm.cli import main
from evssm.models.data import ArrayDataset, make_recording, pack_recordings
from evssm.models.data import baseline as B
from evssm.models.data import event_mnist as em
from evssm.models.data.build import dataset_stats
from evssm.models.events import SensorSpec


def _shd(data_dir: Path) -> None:
    (data_dir / "shd").mkdir(parents=True)
    with h5py.File(data_dir / "shd" / "shd_train.h5", "w") as f:
        t = f.create_dataset("spikes/times", (3,), dtype=h5py.vlen_dtype(np.float16))
        u = f.create_dataset("spikes/units", (3,), dtype=h5py.vlen_dtype(np.uint16))
        for i in range(3):
            t[i] = np.linspace(0, 0.5 * (i + 1), 10 * (i + 1)).astype(np.float16)
            u[i] = np.arange(10 * (i + 1), dtype=np.uint16)
        f.create_dataset("labels", data=np.array([0, 1, 1], np.uint16))
        f.create_dataset("extra/keys", data=np.array([b"zero", b"one"]))


def test_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _shd(tmp_path)
    assert main(["data", "list", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for word in ("event-mnist", "spoken-digits", "shd", "ssc", "dvs-gesture", "not built", "missing",
                 "3 samples", "shd_train.h5"):
        assert word in out, word


def test_info_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _shd(tmp_path)
    assert main(["data", "info", "shd", "--data-dir", str(tmp_path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples"] == 3 and stats["total_events"] == 60
    assert stats["events_per_sample"] == {"mean": 20.0, "median": 20.0, "min": 10.0, "max": 30.0}
    assert stats["class_balance"] == {"zero": 1, "one": 2}
    assert stats["duration_ms"]["max"] == pytest.approx(1500.0, abs=1)
    assert main(["data", "info", "shd", "--data-dir", str(tmp_path)]) == 0
    assert "events_per_sample" in capsys.readouterr().out


def test_missing_and_build_real_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "info", "ssc", "--split", "valid", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "ssc_valid.h5" in err and "--data-dir" in err
    assert main(["data", "build", "shd", "--data-dir", str(tmp_path)]) == 1
    _shd(tmp_path)
    assert main(["data", "build", "shd", "--split", "train", "--data-dir", str(tmp_path)]) == 0
    assert "nothing to build" in capsys.readouterr().out


def test_build_event_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    small = dataclasses.replace(em.EventMnistParams(), train_per_class=1, test_per_class=1)
    monkeypatch.setattr(em, "EventMnistParams", lambda: small)
    monkeypatch.setattr(em.build, "__kwdefaults__", {**em.build.__kwdefaults__, "params": small})
    monkeypatch.setattr(em.cached_size, "__defaults__", (small,))
    assert main(["data", "build", "event-mnist", "--split", "test", "--data-dir", str(tmp_path)]) == 0
    assert (tmp_path / "event-mnist" / "test.npz").is_file()
    assert main(["data", "list", "--data-dir", str(tmp_path)]) == 0
    assert "10 samples" in capsys.readouterr().out
    assert main(["data", "build", "event-mnist", "--split", "nope", "--data-dir", str(tmp_path)]) == 1


def test_dataset_stats_rates() -> None:
    s = SensorSpec.one_d(4)
    recs = [make_recording(s, [0, 500_000, 1_000_000], [0, 1, 2]), make_recording(s, [], [])]
    ds = ArrayDataset("toy", "test", s, ["a", "b"], *pack_recordings(recs), labels=np.array([1, 1]))
    st = dataset_stats(ds)
    assert st["events_per_second"]["mean"] == pytest.approx(3.0)
    assert st["class_balance"] == {"a": 0, "b": 2}


def _toy(n: int, seed: int, sensor: SensorSpec) -> ArrayDataset:
    """Class c fires mostly at addresses of block c (learnable from counts alone)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    recs = []
    for c in labels:
        k = 200
        if sensor.kind == "1d":
            x = np.where(rng.random(k) < 0.6, rng.integers(c * 10, c * 10 + 10, k), rng.integers(0, 30, k))
            recs.append(make_recording(sensor, np.sort(rng.integers(0, 10**6, k)), x))
        else:
            x = np.where(rng.random(k) < 0.6, rng.integers(c * 10, c * 10 + 10, k), rng.integers(0, 30, k))
            recs.append(make_recording(sensor, np.sort(rng.integers(0, 10**6, k)), x, rng.integers(0, 30, k),
                                       rng.integers(0, 2, k)))
    return ArrayDataset("toy", "x", sensor, ["a", "b", "c"], *pack_recordings(recs), labels=labels)


@pytest.mark.parametrize("sensor", [SensorSpec.one_d(30), SensorSpec.two_d(30, 30)])
def test_baseline_learns_toy_task(sensor: SensorSpec) -> None:
    res = B.evaluate(_toy(150, 0, sensor), _toy(60, 1, sensor), time_bins=2, steps=150)
    assert res["softmax_regression_acc"] > 0.9 and res["nearest_centroid_acc"] > 0.9
    assert res["chance"] == pytest.approx(1 / 3, abs=1e-3)
    assert res["features"] == 2 * (30 if sensor.kind == "1d" else 2 * 30 * 30)


def test_count_features_and_pooling() -> None:
    s = SensorSpec.two_d(128, 128)
    assert B.spatial_pool(s) == 3 and B.spatial_pool(SensorSpec.two_d(34, 34)) == 1
    rec = make_recording(s, [0, 10, 20, 30], [0, 127, 3, 3], [0, 127, 2, 2], [0, 1, 1, 1])
    ds = ArrayDataset("toy", "x", s, ["a"], *pack_recordings([rec]), labels=np.array([0]))
    f, y = B.count_features(ds, time_bins=2, pool=4)
    assert f.shape == (1, 2 * 2 * 32 * 32) and f.sum() == 4
    a = 2 * 32 * 32
    assert f[0, 0] == 1  # t=0: bin 0, p 0, cell (0, 0)
    assert f[0, 32 * 32 + 31 * 32 + 31] == 1  # t=10: bin 0 (10 * 2 // 31), p 1, cell (31, 31)
    assert f[0, a + 32 * 32 + 0] == 2  # t=20, 30: bin 1, p 1, (3, 2) pools into cell (0, 0)


def test_baseline_module_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert B.main(["shd", "--data-dir", str(tmp_path)]) == 1
    assert "shd_train.h5" in capsys.readouterr().err
