"""Event sources: each file format round-trips through a small file written here; the simulated
sensor; source specs."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evssm.client import sources
from evssm.client.errors import SourceError
from evssm.client.sources import (
    DVS_GESTURE_SENSOR,
    Sample,
    SimulatedSensor,
    load_file,
    open_source,
    parse_sim_spec,
    save_events,
    source_count,
)
from evssm.models.events import Recording, SensorSpec


def rec_2d(n: int = 300, seed: int = 0, w: int = 128, h: int = 128) -> Recording:
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.integers(0, 500, n)).astype(np.int64) + 1_000
    return Recording(t, rng.integers(0, w, n).astype(np.uint16),
                     rng.integers(0, h, n).astype(np.uint16), rng.integers(0, 2, n).astype(np.uint8))


def rec_1d(n: int = 300, seed: int = 0, channels: int = 700) -> Recording:
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.integers(0, 500, n)).astype(np.int64)
    return Recording(t, rng.integers(0, channels, n).astype(np.uint16))


def assert_same(a: Recording, b: Recording) -> None:
    np.testing.assert_array_equal(a.t, b.t)
    assert a.t.dtype == np.int64
    np.testing.assert_array_equal(a.x, b.x)
    for name in ("y", "p"):
        va, vb = getattr(a, name), getattr(b, name)
        assert (va is None) == (vb is None)
        if va is not None:
            np.testing.assert_array_equal(va, vb)


# -- the client's own formats ------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
@pytest.mark.parametrize("make", [rec_1d, rec_2d])
def test_npy_npz_round_trip(tmp_path: Path, suffix: str, make: Any) -> None:
    rec = make()
    path = save_events(tmp_path / f"events{suffix}", rec, label=3)
    sample = open_source(str(path))
    assert_same(sample.recording, rec)
    assert sample.label == (3 if suffix == ".npz" else None)
    assert sample.sensor is not None and sample.sensor.kind == ("1d" if rec.y is None else "2d")


def test_npz_with_a_structured_array_and_bool_polarity(tmp_path: Path) -> None:
    rec = rec_2d(50)
    assert rec.y is not None and rec.p is not None
    arr = np.zeros(50, dtype=[("t", "<u8"), ("x", "<i2"), ("y", "<i2"), ("on", "?")])
    arr["t"], arr["x"], arr["y"], arr["on"] = rec.t, rec.x, rec.y, rec.p.astype(bool)
    np.savez(tmp_path / "s.npz", events=arr)
    assert_same(load_file(tmp_path / "s.npz").recording, rec)


def test_unsorted_events_are_sorted_stably(tmp_path: Path) -> None:
    t = np.array([5, 3, 3, 9], np.int64)
    x = np.array([0, 1, 2, 3], np.uint16)
    np.savez(tmp_path / "u.npz", t=t, x=x)
    got = load_file(tmp_path / "u.npz").recording
    np.testing.assert_array_equal(got.t, [3, 3, 5, 9])
    np.testing.assert_array_equal(got.x, [1, 2, 0, 3])


def test_bad_files_raise_source_error(tmp_path: Path) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((3, 3)))
    with pytest.raises(SourceError, match="N x 4"):
        load_file(tmp_path / "bad.npy")
    np.savez(tmp_path / "bad.npz", a=np.zeros(3))
    with pytest.raises(SourceError, match=r"expected arrays t \(microseconds\), x, .* y, p.*found arrays a"):
        load_file(tmp_path / "bad.npz")
    # An N x 4 array in another column order (t, x, y, p) is named as such, not misread.
    np.save(tmp_path / "order.npy", np.array([[0, 3, 5, 1], [150, 17, 5, 0], [420, 30, 9, 1]]))
    with pytest.raises(SourceError, match=r"columns x, y, p, t .* x outside 0\.\.127, p outside"):
        load_file(tmp_path / "order.npy")
    with pytest.raises(SourceError, match="no such file"):
        load_file(tmp_path / "missing.npy")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(SourceError, match="unknown format"):
        load_file(tmp_path / "x.txt")
    np.savez(tmp_path / "len.npz", t=np.arange(3), x=np.arange(2))
    with pytest.raises(SourceError, match="shape"):
        load_file(tmp_path / "len.npz")


# -- DVS Gesture ------------------------------------------------------------------------------


def test_dvs_gesture_npy_round_trip(tmp_path: Path) -> None:
    rec = rec_2d(400)
    assert rec.y is not None and rec.p is not None
    # The common tools' layout: N x 4 columns x, y, p, t with t in milliseconds.
    arr = np.stack([rec.x, rec.y, rec.p, rec.t / 1000.0], axis=1).astype(np.float64)
    folder = tmp_path / "user01_fluorescent"
    folder.mkdir()
    np.save(folder / "5.npy", arr)
    for fmt in (None, "dvs-npy"):
        sample = load_file(folder / "5.npy", fmt=fmt)
        assert_same(sample.recording, rec)
        assert sample.label == 5 and sample.label_name() == "left_arm_clockwise"
        assert sample.sensor == DVS_GESTURE_SENSOR
        assert sample.name == "user01_fluorescent/5.npy"


# -- SHD / SSC HDF5 -----------------------------------------------------------------------------


def write_shd(path: Path, recs: list[Recording], labels: list[int]) -> None:
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        # As the real files: ragged float16 seconds and uint16 units, one row per sample.
        times = f.create_dataset("spikes/times", (len(recs),), dtype=h5py.vlen_dtype(np.float16))
        units = f.create_dataset("spikes/units", (len(recs),), dtype=h5py.vlen_dtype(np.uint16))
        for i, r in enumerate(recs):
            times[i] = (r.t / 1e6).astype(np.float16)
            units[i] = r.x
        f.create_dataset("labels", data=np.asarray(labels, np.uint16))
        f.create_dataset("extra/keys", data=np.array([f"word{i}".encode() for i in range(20)]))


def test_shd_hdf5_round_trip(tmp_path: Path) -> None:
    recs = [rec_1d(200, seed=i) for i in range(3)]
    path = tmp_path / "shd_test.h5"
    write_shd(path, recs, [4, 0, 19])
    assert source_count(str(path)) == 3
    for i, r in enumerate(recs):
        sample = open_source(str(path), index=i)
        # float16 seconds hold ~3 significant digits: compare at that precision, exactly as read
        expect = np.rint(np.asarray((r.t / 1e6).astype(np.float16), np.float64) * 1e6)
        np.testing.assert_array_equal(sample.recording.t, np.sort(expect.astype(np.int64)))
        assert sample.recording.y is None
        assert sample.sensor == SensorSpec.one_d(700)
    sample = open_source(str(path), index=2)
    assert sample.label == 19 and sample.label_name() == "word19"
    assert sample.name == "shd_test.h5[2]"
    with pytest.raises(SourceError, match="out of range"):
        open_source(str(path), index=3)


def test_hdf5_float16_times_are_widened_before_scaling(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "one.h5"
    with h5py.File(path, "w") as f:
        times = f.create_dataset("spikes/times", (1,), dtype=h5py.vlen_dtype(np.float16))
        units = f.create_dataset("spikes/units", (1,), dtype=h5py.vlen_dtype(np.uint16))
        times[0] = np.array([0.5, 0.9995], np.float16)
        units[0] = np.array([1, 2], np.uint16)
        f.create_dataset("labels", data=np.array([1], np.uint16))
    got = load_file(path).recording.t
    # float16(0.9995) = 0.99951171875 s; scaled in float16 it would overflow to inf.
    np.testing.assert_array_equal(got, [500000, 999512])


def test_the_client_reads_shd_as_the_data_sets_do(tmp_path: Path) -> None:
    """One SHD reader: a sample the client streams is the data set's sample, event for event."""
    pytest.importorskip("h5py")
    from evssm.models.data import load_dataset
    from evssm.models.data.shd import write_spikes_h5

    rng = np.random.default_rng(5)
    times = [rng.uniform(0, 1, n) for n in (30, 0, 12)]
    units = [rng.integers(0, 700, t.size) for t in times]
    (tmp_path / "shd").mkdir()
    write_spikes_h5(tmp_path / "shd" / "shd_test.h5", times, units, [3, 0, 19],
                    [f"w{i}" for i in range(20)])
    data_set = load_dataset("shd", "test", tmp_path)
    for i in range(len(data_set)):
        rec, label = data_set[i]
        sample = open_source(str(tmp_path / "shd" / "shd_test.h5"), index=i)
        assert_same(sample.recording, rec)
        assert sample.label == label and sample.label_name() == data_set.class_names[label]


def test_an_shd_channel_beyond_the_sensor_is_named(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    from evssm.models.data.shd import write_spikes_h5

    path = tmp_path / "bad.h5"
    write_spikes_h5(path, [np.array([0.1, 0.2])], [np.array([3, 700])], [0], ["a"])
    with pytest.raises(SourceError, match="channel 700"):
        open_source(str(path))


def test_hdf5_without_h5py_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.h5"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(SourceError, match="needs h5py"):
        load_file(path)


# -- event-camera files through faery -----------------------------------------------------------


def faery_events(rec: Recording) -> np.ndarray:
    faery = pytest.importorskip("faery")
    assert rec.y is not None and rec.p is not None
    arr = np.zeros(len(rec), faery.EVENTS_DTYPE)
    arr["t"], arr["x"], arr["y"], arr["on"] = rec.t, rec.x, rec.y, rec.p.astype(bool)
    return arr


@pytest.mark.parametrize("name,version", [("cam.aedat4", None), ("evt3.raw", "evt3"),
                                          ("evt2.raw", "evt2"),
                                          ("cd.dat", "dat2"), ("cam.es", None),
                                          ("cam.csv", None)])
def test_camera_files_written_by_faery_read_back(tmp_path: Path, name: str,
                                                 version: str | None) -> None:
    """Every camera format faery writes reads back event for event, with the stated geometry."""
    faery = pytest.importorskip("faery")
    rec = rec_2d(700, w=346, h=260)
    path = tmp_path / name
    faery.events_stream_from_array(faery_events(rec), (346, 260)).to_file(
        path, version=version, zero_t0=False)
    sample = open_source(str(path))
    assert_same(sample.recording, rec)
    assert sample.sensor == SensorSpec.two_d(346, 260) and sample.geometry == "file"
    assert sample.declared_sensor == SensorSpec.two_d(346, 260)


def test_raw_without_geometry_is_guessed_and_overridden(tmp_path: Path) -> None:
    """An EVT file without a geometry line: the smallest standard Prophesee sensor that holds the
    addresses, or --sensor."""
    faery = pytest.importorskip("faery")
    rec = rec_2d(300, w=600, h=400)
    path = tmp_path / "nogeo.raw"
    faery.events_stream_from_array(faery_events(rec), (640, 480)).to_file(path, version="evt3")
    lines = path.read_bytes().split(b"\n")
    kept = [ln for ln in lines[:4] if not (b"geometry" in ln or b"format" in ln)]
    header_end = len(b"\n".join(lines[:4])) + 1
    path.write_bytes(b"\n".join(kept) + b"\n" + path.read_bytes()[header_end:])
    sample = load_file(path)
    assert sample.geometry == "guess" and sample.sensor == SensorSpec.two_d(640, 480)
    assert len(sample.recording) == 300
    given = load_file(path, sensor=SensorSpec.two_d(1280, 720))
    assert given.geometry == "option" and given.sensor == SensorSpec.two_d(1280, 720)
    assert_same(given.recording, sample.recording)
    with pytest.raises(SourceError, match="overflow|do not fit"):  # faery checks it first
        load_file(path, sensor=SensorSpec.two_d(320, 240))


def test_csv_without_geometry_is_an_extent(tmp_path: Path) -> None:
    pytest.importorskip("faery")
    path = tmp_path / "plain.csv"
    path.write_text("t,x,y,on\n10,3,4,1\n25,30,2,0\n")
    sample = load_file(path)
    np.testing.assert_array_equal(sample.recording.t, [10, 25])
    np.testing.assert_array_equal(sample.recording.p, [1, 0])
    assert sample.geometry == "extent" and sample.declared_sensor is None
    assert load_file(path, sensor=SensorSpec.two_d(64, 48)).declared_sensor == \
        SensorSpec.two_d(64, 48)


def test_camera_files_without_faery_say_what_to_install(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faery", None)
    for name in ("cam.aedat4", "cam.raw", "cam.dat", "cam.es", "cam.csv"):
        (tmp_path / name).write_bytes(b"% header\n")
        with pytest.raises(SourceError, match=r"pip install 'evssm\[formats\]'"):
            open_source(str(tmp_path / name))


def test_broken_camera_file_is_a_source_error(tmp_path: Path) -> None:
    pytest.importorskip("faery")
    (tmp_path / "junk.aedat4").write_bytes(b"not an aedat file at all")
    with pytest.raises(SourceError, match="cannot decode as aedat4"):
        open_source(str(tmp_path / "junk.aedat4"))


# -- N-MNIST binary layout ---------------------------------------------------------------------


def write_nmnist(path: Path, rec: Recording, overflow_after: int | None = None) -> None:
    """5 bytes per event: x, y, p << 7 | t >> 16, t >> 8, t (t < 2**23 us)."""
    rows = []
    assert rec.y is not None and rec.p is not None
    for i, (t, x, y, p) in enumerate(zip(rec.t, rec.x, rec.y, rec.p, strict=True)):
        if i == overflow_after:  # the layout's overflow marker (y = 240): later t += 2**13
            rows.append(bytes([0, 240, 0, 0, 0]))
        t = int(t) - (8192 if overflow_after is not None and i >= overflow_after else 0)
        rows.append(bytes([int(x), int(y), int(p) << 7 | (t >> 16) & 0x7F, (t >> 8) & 0xFF,
                           t & 0xFF]))
    path.write_bytes(b"".join(rows))


def test_nmnist_bin_round_trip_and_overflow_marker(tmp_path: Path) -> None:
    rec = rec_2d(300, w=34, h=34)
    write_nmnist(tmp_path / "a.bin", rec)
    sample = open_source(str(tmp_path / "a.bin"))
    assert_same(sample.recording, rec)
    assert sample.sensor == SensorSpec.two_d(34, 34) and sample.geometry == "guess"
    write_nmnist(tmp_path / "b.bin", rec, overflow_after=150)
    assert_same(load_file(tmp_path / "b.bin").recording, rec)
    (tmp_path / "c.bin").write_bytes(b"\0" * 7)
    with pytest.raises(SourceError, match="5-byte"):
        load_file(tmp_path / "c.bin")


def test_sensor_option_parsing() -> None:
    assert sources.parse_sensor("640x480") == SensorSpec.two_d(640, 480)
    assert sources.parse_sensor("700") == SensorSpec.one_d(700)
    with pytest.raises(SourceError, match="WIDTHxHEIGHT"):
        sources.parse_sensor("640by480")


# -- the project's data sets ------------------------------------------------------------------


def test_dataset_source(monkeypatch: pytest.MonkeyPatch) -> None:
    recs = [rec_1d(50, seed=i, channels=700) for i in range(4)]

    class Split(list):  # what evssm.models.data.load_dataset returns: (Recording, label) pairs
        sensor = SensorSpec.one_d(700)
        class_names = ("zero", "one", "two")

    calls: list[tuple[Any, ...]] = []

    def load_dataset(name: str, split: str, data_dir: Any) -> Split:
        calls.append((name, split, data_dir))
        return Split([(r, i % 3) for i, r in enumerate(recs)])

    fake = types.ModuleType("evssm.models.data")
    fake.load_dataset = load_dataset  # type: ignore[attr-defined]  # a stand-in module, set by hand
    monkeypatch.setitem(sys.modules, "evssm.models.data", fake)
    sample = open_source("dataset:tiny", index=2, split="train", data_dir="/d")
    assert calls[-1] == ("tiny", "train", "/d")
    assert_same(sample.recording, recs[2])
    assert sample.label == 2 and sample.label_name() == "two"
    assert sample.sensor == SensorSpec.one_d(700) and sample.name == "tiny/train[2]"
    assert source_count("dataset:tiny") == 4
    with pytest.raises(SourceError, match="out of range"):
        open_source("dataset:tiny", index=4)


# -- simulated sensor ---------------------------------------------------------------------------


@pytest.mark.parametrize("sensor", [SensorSpec.one_d(700), SensorSpec.two_d(32, 24)])
def test_simulated_sensor_rate_range_and_determinism(sensor: SensorSpec) -> None:
    sim = SimulatedSensor(sensor, 50_000, label=3, num_classes=5, seed=1)
    rec = sim.recording(2.0)
    assert abs(len(rec) - 100_000) < 2_000  # Poisson: sd ~ 316
    assert (np.diff(rec.t) >= 0).all() and rec.t[0] >= 0 and rec.t[-1] < 2_000_000
    if sensor.kind == "1d":
        assert rec.y is None and rec.x.max() < 700
    else:
        assert rec.y is not None and rec.p is not None
        assert rec.x.max() < 32 and rec.y.max() < 24 and set(np.unique(rec.p)) <= {0, 1}
    again = SimulatedSensor(sensor, 50_000, label=3, num_classes=5, seed=1).recording(2.0)
    assert_same(rec, again)
    more = sim.chunk(10_000)
    assert more.t.min() >= 2_000_000 and sim.now_us == 2_010_000
    exact = sim.take(256)
    assert len(exact) == 256 and exact.t[0] >= 2_010_000


def test_simulated_labels_are_distinguishable() -> None:
    """Classes differ in their address statistics, so a model can tell them apart."""
    hists = [np.bincount(SimulatedSensor(SensorSpec.one_d(100), 20_000, label=k, num_classes=4)
                         .recording(0.5).x, minlength=100) for k in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.abs(hists[a] / hists[a].sum() - hists[b] / hists[b].sum()).sum() > 0.3


@pytest.mark.parametrize("bad, named", [
    ("{0}=1, {0}=2", "{0} is given twice"),
    ("speed=3", "'speed=3' is not NAME=VALUE"),  # an unknown name
    ("{0}", "'{0}' is not NAME=VALUE"),          # no value
    ("{0}=fast", "{0} must be a finite number, got 'fast'"),
    ("{0}=nan", "{0} must be a finite number, got 'nan'"),
])
def test_name_value_lists_are_read_alike_by_every_option(bad: str, named: str) -> None:
    """``--filters``, ``--window``, ``--decide`` and ``sim:`` read NAME=VALUE lists with one
    reader: blanks allowed, and the same mistakes refused naming the part at fault."""
    import argparse

    from evssm.client.cli_options import filters_arg, window_option
    from evssm.client.live_options import _decide_arg
    from evssm.client.pairs import name_numbers

    assert name_numbers(" ms = 2 ,, hop_ms=0.5 ", ("ms", "hop_ms")) == {"ms": 2.0, "hop_ms": 0.5}
    for parse, name, error in ((lambda text: name_numbers(text, ("ms", "hop_ms")), "ms", ValueError),
                               (filters_arg, "max_rate", argparse.ArgumentTypeError),
                               (window_option, "hop", argparse.ArgumentTypeError),
                               (_decide_arg, "min_prob", argparse.ArgumentTypeError),
                               (lambda text: parse_sim_spec("sim:" + text), "rate", SourceError)):
        with pytest.raises(error, match=named.format(name)):
            parse(bad.format(name))
    assert filters_arg("max_rate = 2000000 ") == {"max_rate": 2_000_000}
    assert window_option("ms=100, hop_ms=2.5") == {"ms": 100, "hop_ms": 2.5}


def test_sim_spec() -> None:
    assert parse_sim_spec("sim") == sources.SIM_DEFAULTS
    s = parse_sim_spec("sim:rate=1000,duration=0.5,label=2")
    assert s["rate"] == 1000 and s["duration"] == 0.5 and s["label"] == 2
    with pytest.raises(SourceError, match="bad sim setting"):
        parse_sim_spec("sim:speed=3")
    sample = open_source("sim:rate=2000,duration=1,label=1,classes=3",
                         sensor=SensorSpec.two_d(16, 16))
    assert isinstance(sample, Sample) and sample.label == 1
    # The label is a movement pattern, not a class of any model: no correctness is judged.
    assert sample.synthetic and sample.is_correct(1) is None and sample.label_name(("a", "b")) is None
    assert sample.sensor == SensorSpec.two_d(16, 16) and 1800 < len(sample.recording) < 2200


def test_label_checks() -> None:
    s = Sample(rec_1d(5), label=2, class_names=("a", "b", "c"))
    assert s.is_correct("c", ("a", "b", "c")) and s.is_correct(2) and not s.is_correct("a", "abc")
    assert s.is_correct("C", ("A", "B", "C"))  # model names differ: compare by index
    named = Sample(rec_1d(5), label="yes")
    assert named.is_correct("yes") and not named.is_correct("no")
    assert Sample(rec_1d(5)).is_correct("a") is None


def test_stream_command_sensor_checks() -> None:
    from evssm.client.cli_options import check_sensor

    rec = rec_2d(50, w=640, h=480)
    model = SensorSpec.two_d(34, 34)
    assert "--sensor WxH" in (check_sensor(rec, model) or "")  # undeclared misfit: say the fix
    assert check_sensor(rec, model, SensorSpec.two_d(640, 480)) is None  # the server maps it
    assert "cannot be mapped" in (check_sensor(rec, SensorSpec.one_d(700),
                                               SensorSpec.two_d(640, 480)) or "")
