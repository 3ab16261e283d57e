"""The data-set interface: registry, load_dataset, ArrayDataset, errors, import weight."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evssm.models.data import (
    DATA_DIR_ENV,
    ArrayDataset,
    ClassSubset,
    EventDataset,
    Subset,
    dataset_names,
    default_data_dir,
    load_dataset,
    make_recording,
    pack_recordings,
)
from evssm.models.events import Recording, SensorSpec


def test_names_and_specs() -> None:
    assert dataset_names() == ["event-mnist", "spoken-digits", "shd", "ssc", "dvs-gesture"]
    from evssm.models.data import DATASETS

    assert DATASETS["ssc"].splits == ("train", "valid", "test")
    assert DATASETS["dvs-gesture"].sensor == SensorSpec.two_d(128, 128)
    assert DATASETS["shd"].sensor.channels == 700


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv(DATA_DIR_ENV)
    assert default_data_dir() == Path("~/.cache/evssm/data").expanduser()


def test_unknown_name_and_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown data set 'nope'"):
        load_dataset("nope", "train", tmp_path)
    with pytest.raises(ValueError, match="splits"):
        load_dataset("shd", "valid", tmp_path)


@pytest.mark.parametrize("name, split, expect", [
    ("shd", "train", ["shd_train.h5", "shd"]),
    ("ssc", "valid", ["ssc_valid.h5", "ssc"]),
    ("dvs-gesture", "test", ["trials_to_test.txt", "ibmGestureTest", "dvs-gesture"]),
])
def test_missing_files_say_what_goes_where(tmp_path: Path, name: str, split: str, expect: list[str]) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, split, tmp_path)
    msg = str(err.value)
    for word in expect + [str(tmp_path), "--data-dir", DATA_DIR_ENV]:
        assert word in msg, (word, msg)


def test_missing_files_via_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "d"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "d" / "shd")):
        load_dataset("shd")


def _recs() -> list[Recording]:
    s = SensorSpec.two_d(4, 4)
    return [make_recording(s, [5, 1, 3], [0, 1, 2], [3, 2, 1], [1, 0, 1]),
            make_recording(s, [], [], [], []),
            make_recording(s, [7], [3], [3], [0])]


def test_make_recording_sorts_stably_and_types() -> None:
    r = make_recording(SensorSpec.one_d(10), [3, 1, 3, 0], [1, 2, 3, 4])
    assert r.t.dtype == np.int64 and r.x.dtype == np.uint16 and r.y is None and r.p is None
    np.testing.assert_array_equal(r.t, [0, 1, 3, 3])
    np.testing.assert_array_equal(r.x, [4, 2, 1, 3])  # the two t=3 keep their order
    with pytest.raises(ValueError, match="needs y and p"):
        make_recording(SensorSpec.two_d(2, 2), [0], [0])


def test_array_dataset() -> None:
    recs = _recs()
    ds = ArrayDataset("toy", "train", SensorSpec.two_d(4, 4), ["a", "b"], *pack_recordings(recs),
                      labels=np.array([1, 0, 1]))
    assert isinstance(ds, EventDataset) and len(ds) == 3 and ds.num_classes == 2
    rec, label = ds[0]
    assert label == 1 and rec.t.dtype == np.int64 and rec.p.dtype == np.uint8
    np.testing.assert_array_equal(rec.t, [1, 3, 5])
    np.testing.assert_array_equal(rec.y, [2, 1, 3])
    assert len(ds[1][0]) == 0 and ds[-1][1] == 1
    np.testing.assert_array_equal(ds.event_counts(), [3, 0, 1])
    np.testing.assert_array_equal(ds.labels, [1, 0, 1])
    with pytest.raises(IndexError):
        ds[3]
    assert [label for _, label in ds] == [1, 0, 1]
    sub = ds.take([2, 0])
    assert len(sub) == 2 and sub[0][1] == 1 and len(sub[1][0]) == 3
    view = Subset(ds, [2, 0, 1], split="valid")  # counts from the base's, not by reading samples
    np.testing.assert_array_equal(view.event_counts(), [len(r) for r, _ in view])
    np.testing.assert_array_equal(view.event_counts(), [1, 3, 0])
    again = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(again[0][0].x, rec.x)
    with pytest.raises(ValueError, match="offsets"):
        ArrayDataset("toy", "train", SensorSpec.one_d(3), ["a"], np.zeros(2, np.int64), np.zeros(2, np.uint16),
                     None, None, np.array([0, 1]), np.array([0]))


def test_class_subset_keeps_and_relabels_classes() -> None:
    s = SensorSpec.one_d(4)
    recs = [make_recording(s, [i], [i % 4]) for i in range(6)]
    ds = ArrayDataset("toy", "train", s, ["a", "b", "c"], *pack_recordings(recs),
                      labels=np.array([2, 0, 1, 2, 0, 1]))
    sub = ClassSubset(ds, [2, 0])  # "c" becomes class 0, "a" class 1
    assert sub.class_names == ("c", "a") and len(sub) == 4
    np.testing.assert_array_equal(sub.labels, [0, 1, 0, 1])
    assert [int(r.t[0]) for r, _ in sub] == [0, 1, 3, 4] and [lab for _, lab in sub] == [0, 1, 0, 1]
    for bad in ([0], [0, 0], [0, 3], [-1, 1]):
        with pytest.raises(ValueError, match="at least two distinct class indices"):
            ClassSubset(ds, bad)


def test_carved_valid_split_is_stratified_and_seeded_by_class_alone() -> None:
    from evssm.models.data.base import carve_valid

    labels = np.random.default_rng(3).integers(0, 3, 240)
    held = carve_valid(labels, 0.125)
    counts = np.bincount(labels, minlength=3)
    np.testing.assert_array_equal(np.bincount(labels[held], minlength=3), counts // 8)
    assert np.all(np.diff(held) > 0)
    np.testing.assert_array_equal(carve_valid(labels, 0.125), held)
    # Which recordings of a class are held out depends on that class's members only.
    other = labels.copy()
    other[other == 2] = 1
    mine = held[labels[held] == 0]
    np.testing.assert_array_equal(carve_valid(other, 0.125)[other[carve_valid(other, 0.125)] == 0],
                                  mine)
    with pytest.raises(ValueError, match="too few"):
        carve_valid(np.array([0, 0, 1, 1]), 0.125)


def test_import_is_numpy_only() -> None:
    """The client imports evssm.models.data: no JAX/Flax, and h5py/tqdm/mlxtend only when used."""
    code = ("import sys, evssm.models.data, evssm.models.data.augment, evssm.models.data.build; "
            "bad = [m for m in ('jax', 'flax', 'h5py', 'tqdm', 'mlxtend', 'scipy') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_jax_anywhere_in_data_package() -> None:
    import evssm.models.data as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "import jax" not in text and "from jax" not in text and "flax" not in text, path


def test_limit_works_for_every_reader(tmp_path: Path) -> None:
    import h5py

    (tmp_path / "shd").mkdir()
    with h5py.File(tmp_path / "shd" / "shd_test.h5", "w") as f:
        t = f.create_dataset("spikes/times", (4,), dtype=h5py.vlen_dtype(np.float16))
        u = f.create_dataset("spikes/units", (4,), dtype=h5py.vlen_dtype(np.uint16))
        for i in range(4):
            t[i] = np.array([0.25 * i], np.float16)
            u[i] = np.array([i], np.uint16)
        f.create_dataset("labels", data=np.array([3, 2, 1, 0], np.uint16))
    ds = load_dataset("shd", "test", tmp_path, limit=2)
    assert isinstance(ds, Subset) and len(ds) == 2 and ds.name == "shd"
    np.testing.assert_array_equal(ds.labels, [3, 2])
    assert ds[1][0].x.tolist() == [1] and ds[-1][1] == 2
    assert len(load_dataset("shd", "test", tmp_path, limit=10)) == 4
    assert len(load_dataset("shd", "test", tmp_path, limit=None)) == 4


def test_data_set_facts_name_every_class_and_the_reference_configs_use_them() -> None:
    from evssm.models.config import ModelConfig, load_model_config
    from evssm.models.data import DATASETS
    from evssm.models.dataset_facts import CLASS_NAMES, class_names_of

    for name, names in CLASS_NAMES.items():
        assert DATASETS[name].num_classes == len(names) == len(set(names)), name
    # The model configs of the reference tasks answer with the data sets' names.
    for config, dataset in (("shd", "shd"), ("ssc", "ssc"), ("dvs", "dvs-gesture")):
        cfg = load_model_config(config)
        assert cfg.labels == class_names_of(dataset) and cfg.num_classes == len(cfg.labels)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # a checkpoint keeps the list
    assert load_model_config("dvs").labels[:2] == ("hand_clapping", "right_hand_wave")
    base = load_model_config("tiny").to_dict()
    with pytest.raises(ValueError, match="no class names known for data set 'mnist'"):
        ModelConfig.from_dict({**base, "class_names": "mnist"})
    with pytest.raises(ValueError, match="class_names must have num_classes entries"):
        ModelConfig.from_dict({**base, "class_names": "ssc"})  # 35 names for tiny's 20 classes
