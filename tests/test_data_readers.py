"""Real benchmark readers on small files written here in each exact format.

SHD/SSC: HDF5 with vlen float16 ``spikes/times`` (s), vlen uint16 ``spikes/units``, ``labels``,
``extra/keys``. DVS128 Gesture: per-gesture ``.npy`` (x, y, p, t ms) and the original AEDAT 3.1
recordings with label CSVs and trial lists.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest

from evssm.models.data import load_dataset
from evssm.models.data.dvs_gesture import CLASS_NAMES, read_aedat31, write_aedat31
from evssm.models.data.shd import write_spikes_h5
from evssm.models.events import recording_inputs

# ---------------------------------------------------------------------------------------------
# SHD / SSC


def _write_h5(path: Path, times: list[np.ndarray], units: list[np.ndarray], labels: list[int],
              keys: list[bytes] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        t = f.create_dataset("spikes/times", (len(times),), dtype=h5py.vlen_dtype(np.float16))
        u = f.create_dataset("spikes/units", (len(units),), dtype=h5py.vlen_dtype(np.uint16))
        for i in range(len(times)):
            t[i] = times[i].astype(np.float16)
            u[i] = units[i].astype(np.uint16)
        f.create_dataset("labels", data=np.array(labels, np.uint16))
        if keys is not None:
            f.create_dataset("extra/keys", data=np.array(keys))
            f.create_dataset("extra/speaker", data=np.arange(len(labels), dtype=np.uint16))


@pytest.fixture
def shd_files(tmp_path: Path) -> tuple[Path, dict[str, tuple]]:
    rng = np.random.default_rng(0)
    keys = [f"word{i}".encode() for i in range(20)]
    made = {}
    for split, n in (("train", 5), ("test", 3)):
        times = [rng.uniform(0, 1.2, rng.integers(1, 300)) for _ in range(n)]
        times[0] = np.array([0.5, 0.25, 0.25, 1.0, 0.0])  # unsorted, with a tie
        units = [rng.integers(0, 700, t.size) for t in times]
        units[0] = np.array([10, 699, 3, 0, 7])
        labels = list(rng.integers(0, 20, n))
        _write_h5(tmp_path / "shd" / f"shd_{split}.h5", times, units, labels, keys)
        made[split] = (times, units, labels)
    return tmp_path, made


def test_shd_reader_values_sorted_labels(shd_files: tuple[Path, dict]) -> None:
    data_dir, made = shd_files
    ds = load_dataset("shd", "train", data_dir)
    assert len(ds) == 5 and ds.sensor.channels == 700 and ds.split == "train"
    assert ds.class_names == tuple(f"word{i}" for i in range(20))
    times, units, labels = made["train"]
    np.testing.assert_array_equal(ds.labels, labels)
    rec, label = ds[0]
    assert label == labels[0] and rec.y is None and rec.p is None
    assert rec.t.dtype == np.int64
    np.testing.assert_array_equal(rec.t, [0, 250_000, 250_000, 500_000, 1_000_000])
    np.testing.assert_array_equal(rec.x, [7, 699, 3, 10, 0])  # stable: 699 before 3 (file order)
    for i in range(len(ds)):
        rec, label = ds[i]
        expect_t = np.rint(times[i].astype(np.float16).astype(np.float64) * 1e6).astype(np.int64)
        order = np.argsort(expect_t, kind="stable")
        np.testing.assert_array_equal(rec.t, expect_t[order])
        np.testing.assert_array_equal(rec.x, units[i][order])
        assert (np.diff(rec.t) >= 0).all()
        recording_inputs(ds.sensor, rec)  # tokens and gaps validate
    np.testing.assert_array_equal(ds.event_counts(), [t.size for t in times])
    assert len(load_dataset("shd", "test", data_dir)) == 3


def test_shd_preload_and_pickle_agree(shd_files: tuple[Path, dict]) -> None:
    data_dir, _ = shd_files
    lazy = load_dataset("shd", "train", data_dir)
    eager = load_dataset("shd", "train", data_dir, preload=True)
    clone = pickle.loads(pickle.dumps(lazy))
    for i in range(len(lazy)):
        for other in (eager, clone):
            np.testing.assert_array_equal(lazy[i][0].t, other[i][0].t)
            np.testing.assert_array_equal(lazy[i][0].x, other[i][0].x)


def test_shd_file_directly_in_data_dir(tmp_path: Path) -> None:
    _write_h5(tmp_path / "shd_test.h5", [np.array([0.1])], [np.array([5])], [3], None)
    ds = load_dataset("shd", "test", tmp_path)
    # No extra/keys: SHD's documented names (English 0..9, then German).
    assert ds.class_names[3] == "three" and ds[0][1] == 3
    assert len(ds.class_names) == 20 and ds.class_names[10] == "null"


def test_ssc_three_splits(tmp_path: Path) -> None:
    keys = [f"cmd{i}".encode() for i in range(35)]
    for k, split in enumerate(("train", "valid", "test")):
        _write_h5(tmp_path / "ssc" / f"ssc_{split}.h5", [np.array([0.5, 0.25])] * (k + 1),
                  [np.array([1, 2])] * (k + 1), [34] * (k + 1), keys)
    for k, split in enumerate(("train", "valid", "test")):
        ds = load_dataset("ssc", split, tmp_path)
        assert len(ds) == k + 1 and ds.num_classes == 35 and ds.name == "ssc"
        rec, label = ds[0]
        assert label == 34 and ds.class_names[label] == "cmd34"
        np.testing.assert_array_equal(rec.t, [250_000, 500_000])
        np.testing.assert_array_equal(rec.x, [2, 1])


def test_shd_bad_channel_is_reported(tmp_path: Path) -> None:
    _write_h5(tmp_path / "shd" / "shd_train.h5", [np.array([0.1])], [np.array([700])], [0], None)
    with pytest.raises(ValueError, match="channel 700"):
        load_dataset("shd", "train", tmp_path)[0]


def test_write_spikes_h5_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "shd" / "shd_train.h5"
    path.parent.mkdir()
    write_spikes_h5(path, [np.array([0.5, 0.1]), np.array([])], [np.array([3, 4]), np.array([])], [1, 0],
                    ["a", "b"], speakers=[7, 8])
    with h5py.File(path) as f:
        assert f["spikes/times"].dtype.metadata["vlen"] == np.float16
        assert f["labels"].dtype == np.uint16
    ds = load_dataset("shd", "train", tmp_path)
    assert ds.class_names == ("a", "b") and len(ds[1][0]) == 0
    np.testing.assert_array_equal(ds[0][0].x, [4, 3])


# ---------------------------------------------------------------------------------------------
# DVS128 Gesture: npy


def _gesture(rng: np.random.Generator, n: int) -> np.ndarray:
    t_ms = np.sort(rng.uniform(0, 6000, n))
    t_ms[[0, 1]] = t_ms[[1, 0]]  # one inversion: the reader must sort
    return np.stack([rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n), t_ms], 1)


def test_gesture_npy_tonic_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays = {}
    for split, folder in (("train", "ibmGestureTrain"), ("test", "ibmGestureTest")):
        for user in ("user01_led", "user02_natural"):
            for label in (0, 10, 4):
                a = _gesture(rng, 50)
                path = tmp_path / "dvs-gesture" / folder / user / f"{label}.npy"
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, a)
                arrays[(split, user, label)] = a
    ds = load_dataset("dvs-gesture", "train", tmp_path)
    assert len(ds) == 6 and ds.sensor.width == 128 and ds.class_names == CLASS_NAMES
    assert sorted(ds.labels.tolist()) == [0, 0, 4, 4, 10, 10]
    for i in range(len(ds)):
        rec, label = ds[i]
        f = ds.files[i]
        a = arrays[("train", f.parent.name, label)]
        t = np.rint(a[:, 3] * 1000).astype(np.int64)
        order = np.argsort(t, kind="stable")
        np.testing.assert_array_equal(rec.t, t[order])
        np.testing.assert_array_equal(rec.x, a[order, 0])
        np.testing.assert_array_equal(rec.y, a[order, 1])
        np.testing.assert_array_equal(rec.p, a[order, 2])
        assert rec.t.dtype == np.int64 and rec.p.dtype == np.uint8
        recording_inputs(ds.sensor, rec)
    assert len(load_dataset("dvs-gesture", "test", tmp_path, format="npy")) == 6


def test_gesture_npy_label_conventions(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    root = tmp_path / "dvs-gesture" / "train"
    (root / "7").mkdir(parents=True)
    np.save(root / "user03_lab_0_2.npy", _gesture(rng, 10))  # <user>_<lighting>_<k>_<label>
    np.save(root / "7" / "user03_lab_1.npy", _gesture(rng, 10))  # folder named by label wins
    ds = load_dataset("dvs-gesture", "train", tmp_path)
    assert dict(zip([f.name for f in ds.files], ds.labels.tolist(), strict=True)) == {
        "user03_lab_0_2.npy": 2, "user03_lab_1.npy": 7}
    np.save(root / "nolabel.npy", _gesture(rng, 10))
    with pytest.raises(ValueError, match="cannot tell the label"):
        load_dataset("dvs-gesture", "train", tmp_path)


# ---------------------------------------------------------------------------------------------
# DVS128 Gesture: AEDAT 3.1 written byte by byte

HEADER = (b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n#Start-Time: 2017-01-01 00:00:00\r\n"
          b"#End Of ASCII Header\r\n")


def _packet(ev_type: int, events: list[tuple[int, int]], overflow: int = 0) -> bytes:
    n = len(events)
    head = struct.pack("<hhiiiiii", ev_type, 1, 8, 4, overflow, n, n, n)
    return head + b"".join(struct.pack("<Ii", d, ts) for d, ts in events)


def _pol(x: int, y: int, p: int, valid: int = 1) -> int:
    return (x << 17) | (y << 2) | (p << 1) | valid


def test_read_aedat31_bit_layout_overflow_and_skips(tmp_path: Path) -> None:
    path = tmp_path / "a.aedat"
    path.write_bytes(HEADER
                     + _packet(1, [(_pol(127, 0, 1), 10), (_pol(3, 127, 0), 20), (_pol(5, 5, 1, valid=0), 25)])
                     + _packet(0, [(0x12345, 30)])  # special event: skipped
                     + _packet(1, [(_pol(64, 65, 0), 5)], overflow=1))  # t = 5 + 2**31
    t, x, y, p = read_aedat31(path)
    np.testing.assert_array_equal(t, [10, 20, 5 + 2**31])
    np.testing.assert_array_equal(x, [127, 3, 64])
    np.testing.assert_array_equal(y, [0, 127, 65])
    np.testing.assert_array_equal(p, [1, 0, 0])
    assert t.dtype == np.int64


def test_aedat_truncated_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "a.aedat"
    path.write_bytes(HEADER + _packet(1, [(_pol(1, 1, 1), 10)])[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_aedat31(path)


def test_write_aedat31_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    t = np.sort(rng.integers(0, 2**32, 1000))
    x, y, p = rng.integers(0, 128, 1000), rng.integers(0, 128, 1000), rng.integers(0, 2, 1000)
    write_aedat31(tmp_path / "b.aedat", t, x, y, p, events_per_packet=100)
    got = read_aedat31(tmp_path / "b.aedat")
    for a, b in zip(got, (t, x, y, p), strict=True):
        np.testing.assert_array_equal(a, b)


def test_gesture_aedat_layout(tmp_path: Path) -> None:
    root = tmp_path / "dvs-gesture" / "DvsGesture"
    root.mkdir(parents=True)
    # user01_led: events every 100 us from t=1000 to 10,000; two gestures
    ts = list(range(1000, 10_001, 100))
    ev = [(_pol(i % 128, (3 * i) % 128, i % 2), t) for i, t in enumerate(ts)]
    (root / "user01_led.aedat").write_bytes(HEADER + _packet(1, ev[:40]) + _packet(1, ev[40:]))
    (root / "user01_led_labels.csv").write_text(
        "class,startTime_usec,endTime_usec\n1,2000,3000\n11,5000,9050\n")
    (root / "user02_natural.aedat").write_bytes(HEADER + _packet(1, [(_pol(1, 2, 1), 7)], overflow=2))
    (root / "user02_natural_labels.csv").write_text("class,startTime_usec,endTime_usec\n5,0,8589934600\n")
    (root / "trials_to_train.txt").write_text("user01_led.aedat\n\n")
    (root / "trials_to_test.txt").write_text("user02_natural.aedat\n")

    ds = load_dataset("dvs-gesture", "train", tmp_path)
    assert len(ds) == 2 and ds.name == "dvs-gesture"
    np.testing.assert_array_equal(ds.labels, [0, 10])
    rec, label = ds[0]
    assert label == 0 and ds.class_names[label] == "hand_clapping"
    np.testing.assert_array_equal(rec.t, np.arange(0, 1000, 100))  # [2000, 3000) shifted to 0
    i0 = ts.index(2000)
    np.testing.assert_array_equal(rec.x, [(i0 + k) % 128 for k in range(10)])
    np.testing.assert_array_equal(rec.p, [(i0 + k) % 2 for k in range(10)])
    rec, label = ds[1]
    assert label == 10 and len(rec) == 41 and rec.t[0] == 0 and rec.t[-1] == 4000
    recording_inputs(ds.sensor, rec)

    test = load_dataset("dvs-gesture", "test", tmp_path, format="aedat")
    rec, label = test[0]
    assert label == 4 and rec.t.tolist() == [7 + 2 * 2**31] and rec.y.tolist() == [2]


def test_gesture_aedat_missing_recording_named(tmp_path: Path) -> None:
    root = tmp_path / "dvs-gesture"
    root.mkdir()
    (root / "trials_to_train.txt").write_text("user05_led.aedat\n")
    with pytest.raises(FileNotFoundError, match="user05_led.aedat, user05_led_labels.csv"):
        load_dataset("dvs-gesture", "train", tmp_path)
