"""Spiking Heidelberg Digits (SHD) and Spiking Speech Commands (SSC): the HDF5 files, read directly.

File layout (Cramer et al. 2020, https://zenkelab.org/datasets/), one file per split
(``shd_train.h5``, ``shd_test.h5``, ``ssc_train.h5``, ``ssc_valid.h5``, ``ssc_test.h5``)::

    spikes/times   vlen float16 [N]   spike times of sample i, seconds (not necessarily sorted)
    spikes/units   vlen uint16  [N]   channel (cochlea fibre) of each spike, 0..699
    labels         uint16 [N]         class index
    extra/keys     bytes [C]          class names, index = label (optional here)
    extra/speaker  uint16 [N]         speaker id (optional)

This is the one reader of the layout: the client reads single samples of such files through it
(``evssm stream shd_test.h5 --index 3``), so it needs NumPy and h5py only (h5py imported when a file
is opened). Samples are read lazily (one vlen row per ``ds[i]``); times are cast to float64 before scaling to
integer microseconds (float16 seconds has ~0.5 ms resolution near 1 s; scaling in float16 would
overflow), and events are sorted by time with a stable sort.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..dataset_facts import SHD_CHANNELS, SHD_CLASSES, SSC_CLASSES
from ..events import Recording, SensorSpec
from .base import XY_DTYPE, EventDataset, make_recording, missing_files_error

_HOW = "gunzip the .h5.gz files from https://zenkelab.org/datasets/"


class SpikesH5Dataset(EventDataset):
    """One split of an SHD-layout HDF5 file (see module docstring). 1-D sensor, ``channels`` wide.

    ``preload`` reads every sample into memory at once (faster iteration, more RAM); otherwise the
    file is opened on first access (once per process, so the data set can go to worker processes).
    """

    def __init__(self, path: str | os.PathLike[str], name: str, split: str, *,
                 channels: int = SHD_CHANNELS, class_names: Sequence[str] | None = None,
                 preload: bool = False):
        import h5py

        self.path = Path(path)
        self.name, self.split = name, split
        self.sensor = SensorSpec.one_d(channels)
        with h5py.File(self.path, "r") as f:
            for key in ("spikes/times", "spikes/units", "labels"):
                if key not in f:
                    raise ValueError(f"{self.path}: not an SHD-layout file, dataset {key!r} is missing")
            self._labels = np.asarray(f["labels"][()], dtype=np.int64)
            n = self._labels.shape[0]
            if f["spikes/times"].shape[0] != n or f["spikes/units"].shape[0] != n:
                raise ValueError(f"{self.path}: spikes/times, spikes/units and labels differ in length")
            keys = f["extra/keys"][()] if "extra/keys" in f else None
            self._times = self._units = None
            if preload:
                self._times = f["spikes/times"][()]
                self._units = f["spikes/units"][()]
        if keys is not None:
            names = tuple(k.decode() if isinstance(k, bytes) else str(k) for k in np.ravel(keys))
        elif class_names is not None:
            names = tuple(class_names)
        else:
            names = tuple(str(i) for i in range(int(self._labels.max(initial=-1)) + 1))
        self.class_names = names
        self.names_in_file = keys is not None  # class names read from extra/keys, not assumed
        if self._labels.size and (self._labels.min() < 0 or self._labels.max() >= len(names)):
            raise ValueError(f"{self.path}: labels outside 0..{len(names) - 1} (the classes in extra/keys)")
        self._file: Any = None
        self._pid = -1

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def _h5(self) -> Any:
        # h5py handles do not survive fork/pickle: (re)open once per process.
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, -1
        return state

    def _raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self._times is not None and self._units is not None:
            return self._times[i], self._units[i]
        f = self._h5()
        return f["spikes/times"][i], f["spikes/units"][i]

    def _get(self, i: int) -> tuple[Recording, int]:
        times, units = self._raw(i)
        if times.shape != units.shape:
            raise ValueError(f"{self.path}: sample {i} has {times.shape[0]} times but {units.shape[0]} units")
        units = np.asarray(units)
        if units.size and (units.min() < 0 or units.max() >= self.sensor.channels):
            raise ValueError(f"{self.path}: sample {i} has channel {int(units.max())}, "
                             f"outside 0..{self.sensor.channels - 1}")
        t_us = np.rint(np.asarray(times, dtype=np.float64) * 1e6).astype(np.int64)
        return make_recording(self.sensor, t_us, units.astype(XY_DTYPE)), int(self._labels[i])

    @property
    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def event_counts(self) -> np.ndarray:
        if self._units is not None:
            units = self._units
        else:
            units = self._h5()["spikes/units"][()]
        return np.array([u.shape[0] for u in units], dtype=np.int64)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _find(data_dir: Path, folder: str, filename: str, dataset: str) -> Path:
    """``data_dir/folder/filename``, or ``data_dir/filename``; else a FileNotFoundError."""
    for candidate in (data_dir / folder / filename, data_dir / filename):
        if candidate.is_file():
            return candidate
    raise missing_files_error(dataset, data_dir / folder, [filename], _HOW)


def load_shd(split: str, data_dir: Path, *, preload: bool = False) -> SpikesH5Dataset:
    """SHD ``split`` ("train" | "test") from ``data_dir/shd/shd_<split>.h5``."""
    path = _find(data_dir, "shd", f"shd_{split}.h5", "shd")
    return SpikesH5Dataset(path, "shd", split, class_names=SHD_CLASSES, preload=preload)


def load_ssc(split: str, data_dir: Path, *, preload: bool = False) -> SpikesH5Dataset:
    """SSC ``split`` ("train" | "valid" | "test") from ``data_dir/ssc/ssc_<split>.h5``."""
    path = _find(data_dir, "ssc", f"ssc_{split}.h5", "ssc")
    return SpikesH5Dataset(path, "ssc", split, class_names=SSC_CLASSES, preload=preload)


def write_spikes_h5(path: str | os.PathLike[str], times: Sequence[np.ndarray], units: Sequence[np.ndarray],
                    labels: Sequence[int] | np.ndarray, class_names: Sequence[str],
                    speakers: Sequence[int] | np.ndarray | None = None) -> None:
    """Write recordings in SHD's exact layout (times float16 seconds, units uint16, labels uint16).

    ``times[i]`` float seconds [n_i], ``units[i]`` ints [n_i]. Written to a temporary name first
    and renamed, so a reader never sees half a file.
    """
    import h5py

    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with h5py.File(tmp, "w") as f:
        g = f.create_group("spikes")
        dt_t = h5py.vlen_dtype(np.dtype(np.float16))
        dt_u = h5py.vlen_dtype(np.dtype(np.uint16))
        ds_t = g.create_dataset("times", (len(times),), dtype=dt_t)
        ds_u = g.create_dataset("units", (len(units),), dtype=dt_u)
        for i, (ti, ui) in enumerate(zip(times, units, strict=True)):
            ds_t[i] = np.asarray(ti, dtype=np.float16)
            ds_u[i] = np.asarray(ui, dtype=np.uint16)
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.uint16))
        extra = f.create_group("extra")
        extra.create_dataset("keys", data=np.array([n.encode() for n in class_names]))
        if speakers is not None:
            extra.create_dataset("speaker", data=np.asarray(speakers, dtype=np.uint16))
    os.replace(tmp, path)
