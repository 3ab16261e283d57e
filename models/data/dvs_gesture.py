"""IBM DVS128 Gesture (Amir et al. 2017): 128x128 DVS, 11 classes, read directly in two layouts.

Files go under ``<data_dir>/dvs-gesture/``. Either layout is accepted (``format="auto"`` takes the
npy layout when its folders exist, else the AEDAT one):

**npy** (the common preprocessed layout, e.g. tonic's): one ``.npy`` array per gesture, float or int,
shape ``[n, 4]`` with columns ``x, y, p, t`` and ``t`` in **milliseconds**. Split folders
``ibmGestureTrain/`` and ``ibmGestureTest/`` (or ``train/`` and ``test/``), searched recursively.
The label (0..10) is taken, first match wins, from

1. the parent folder when its name is an integer: ``train/<label>/<anything>.npy``;
2. otherwise the last ``_``-separated field of the file name: ``<label>.npy`` (tonic:
   ``ibmGestureTrain/user01_fluorescent/3.npy``) or ``<user>_<lighting>_<k>_<label>.npy``.

**aedat** (the original release, folder ``DvsGesture/`` or the files directly in ``dvs-gesture/``):
``userXX_<lighting>.aedat`` (AEDAT 3.1), ``userXX_<lighting>_labels.csv`` (header
``class,startTime_usec,endTime_usec``; class 1..11), ``trials_to_train.txt`` and
``trials_to_test.txt`` (one ``.aedat`` file name per line). Each labelled interval is one sample:
the events with ``start <= t < end``, times shifted so the interval starts at 0, label ``class - 1``.

AEDAT 3.1: ASCII header lines starting with ``#``, the last ``#End Of ASCII Header\\r\\n``; then
packets of a 28-byte little-endian header (int16 eventType, int16 eventSource, int32 eventSize,
int32 eventTSOffset, int32 eventTSOverflow, int32 eventCapacity, int32 eventNumber, int32
eventValid) followed by ``eventNumber * eventSize`` bytes of events. Polarity events (type 1,
8 bytes): uint32 data (bit 0 valid, bit 1 polarity, bits 2..16 y, bits 17..31 x) and int32
timestamp (us); the full timestamp is ``timestamp | eventTSOverflow << 31``. Events with the
valid bit clear and packets of other types are skipped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..dataset_facts import DVS_GESTURE_CLASSES as CLASS_NAMES
from ..dataset_facts import DVS_GESTURE_SIZE
from ..events import Recording, SensorSpec
from .base import EventDataset, make_recording, missing_files_error

SENSOR = SensorSpec.two_d(*DVS_GESTURE_SIZE)
NPY_SPLIT_DIRS = {"train": ("ibmGestureTrain", "train"), "test": ("ibmGestureTest", "test")}
TRIAL_LISTS = {"train": "trials_to_train.txt", "test": "trials_to_test.txt"}
_HOW = "from the DVS128 Gesture release (IBM), unpacked"

POLARITY_EVENT = 1
_PACKET_HEADER = np.dtype([("type", "<i2"), ("source", "<i2"), ("size", "<i4"), ("ts_offset", "<i4"),
                           ("ts_overflow", "<i4"), ("capacity", "<i4"), ("number", "<i4"),
                           ("valid", "<i4")])
_END_OF_HEADER = b"#End Of ASCII Header"


# ---------------------------------------------------------------------------------------------
# AEDAT 3.1


def _skip_ascii_header(f: BinaryIO, path: Path) -> None:
    """Leave ``f`` at the first packet: after the line ``#End Of ASCII Header``."""
    while True:
        pos = f.tell()
        line = f.readline()
        if not line:
            raise ValueError(f"{path}: AEDAT file ends inside its ASCII header")
        if not line.startswith(b"#"):
            f.seek(pos)  # a header without the end marker: packets start here
            return
        if line.rstrip(b"\r\n") == _END_OF_HEADER:
            return


def read_aedat31(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All valid polarity events of an AEDAT 3.1 file: ``(t int64 us, x uint16, y uint16, p uint8)``.

    Events keep file order (AEDAT 3.1 packets are written in time order).
    """
    path = Path(path)
    ts, words = [], []
    with open(path, "rb") as f:
        _skip_ascii_header(f, path)
        while True:
            raw = f.read(_PACKET_HEADER.itemsize)
            if not raw:
                break
            if len(raw) < _PACKET_HEADER.itemsize:
                raise ValueError(f"{path}: truncated packet header at byte {f.tell() - len(raw)}")
            h = np.frombuffer(raw, dtype=_PACKET_HEADER)[0]
            size, number = int(h["size"]), int(h["number"])
            if size <= 0 or number < 0:
                raise ValueError(f"{path}: corrupt packet header (eventSize={size}, eventNumber={number})")
            payload = f.read(size * number)
            if len(payload) < size * number:
                raise ValueError(f"{path}: truncated packet (expected {size * number} bytes)")
            if int(h["type"]) != POLARITY_EVENT:
                continue
            if size != 8:
                raise ValueError(f"{path}: polarity events of {size} bytes, expected 8")
            ev = np.frombuffer(payload, dtype=[("data", "<u4"), ("ts", "<i4")])
            ev = ev[(ev["data"] & 1) == 1]  # valid mark
            words.append(ev["data"])
            ts.append(ev["ts"].astype(np.int64) | (np.int64(int(h["ts_overflow"])) << 31))
    if not ts:
        z = np.zeros(0, np.uint16)
        return np.zeros(0, np.int64), z, z, np.zeros(0, np.uint8)
    data = np.concatenate(words)
    t = np.concatenate(ts)
    x = ((data >> 17) & 0x7FFF).astype(np.uint16)
    y = ((data >> 2) & 0x7FFF).astype(np.uint16)
    p = ((data >> 1) & 1).astype(np.uint8)
    return t, x, y, p


def write_aedat31(path: str | os.PathLike[str], t: np.ndarray, x: np.ndarray, y: np.ndarray,
                  p: np.ndarray, *, events_per_packet: int = 4096) -> None:
    """Write polarity events as AEDAT 3.1 (the inverse of :func:`read_aedat31`; for tests and tools)."""
    t = np.asarray(t, np.int64)
    data = ((np.asarray(x, np.uint32) << 17) | (np.asarray(y, np.uint32) << 2)
            | (np.asarray(p, np.uint32) << 1) | 1).astype("<u4")
    with open(path, "wb") as f:
        f.write(b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n" + _END_OF_HEADER + b"\r\n")
        start = 0
        while start < t.size:
            # a packet holds events sharing one overflow epoch
            overflow = int(t[start] >> 31)
            stop = min(start + events_per_packet, t.size)
            stop = start + int(np.searchsorted(t[start:stop] >> 31, overflow, side="right"))
            n = stop - start
            header = np.array([(POLARITY_EVENT, 1, 8, 4, overflow, n, n, n)], dtype=_PACKET_HEADER)
            ev = np.empty(n, dtype=[("data", "<u4"), ("ts", "<i4")])
            ev["data"] = data[start:stop]
            ev["ts"] = (t[start:stop] & 0x7FFFFFFF).astype(np.int32)
            f.write(header.tobytes() + ev.tobytes())
            start = stop


# ---------------------------------------------------------------------------------------------
# data sets


class GestureNpyDataset(EventDataset):
    """Per-gesture ``.npy`` files (columns x, y, p, t in ms). Files are read on access."""

    def __init__(self, split: str, files: list[Path], labels: list[int]):
        self.name, self.split, self.sensor, self.class_names = "dvs-gesture", split, SENSOR, CLASS_NAMES
        self.files = files
        self._labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def _get(self, i: int) -> tuple[Recording, int]:
        a = np.load(self.files[i])
        if a.ndim != 2 or a.shape[1] < 4:
            raise ValueError(f"{self.files[i]}: expected an [n, 4] array (x, y, p, t), got shape {a.shape}")
        t_us = np.rint(a[:, 3].astype(np.float64) * 1000.0).astype(np.int64)
        rec = make_recording(SENSOR, t_us, a[:, 0], a[:, 1], a[:, 2] > 0)
        _check_range(rec, self.files[i])
        return rec, int(self._labels[i])

    @property
    def labels(self) -> np.ndarray:
        return self._labels.copy()


class GestureAedatDataset(EventDataset):
    """Labelled intervals of the original AEDAT 3.1 recordings.

    ``intervals`` rows: (file index, label, start_us, end_us). The last parsed file is kept in memory,
    so reading samples in order parses each file once.
    """

    def __init__(self, split: str, files: list[Path], intervals: np.ndarray):
        self.name, self.split, self.sensor, self.class_names = "dvs-gesture", split, SENSOR, CLASS_NAMES
        self.files = files
        self.intervals = intervals
        self._cached: tuple[int, tuple[np.ndarray, ...]] | None = None

    def __len__(self) -> int:
        return int(self.intervals.shape[0])

    def _events(self, k: int) -> tuple[np.ndarray, ...]:
        if self._cached is None or self._cached[0] != k:
            t, x, y, p = read_aedat31(self.files[k])
            order = np.argsort(t, kind="stable")
            self._cached = (k, (t[order], x[order], y[order], p[order]))
        return self._cached[1]

    def _get(self, i: int) -> tuple[Recording, int]:
        k, label, start, end = (int(v) for v in self.intervals[i])
        t, x, y, p = self._events(k)
        a, b = np.searchsorted(t, start, side="left"), np.searchsorted(t, end, side="left")
        rec = make_recording(SENSOR, t[a:b] - start, x[a:b], y[a:b], p[a:b], sort=False)
        _check_range(rec, self.files[k])
        return rec, label

    @property
    def labels(self) -> np.ndarray:
        return self.intervals[:, 1].astype(np.int64)


def _check_range(rec: Recording, path: Path) -> None:
    if len(rec) and (rec.x.max() >= SENSOR.width or rec.y.max() >= SENSOR.height):  # type: ignore[union-attr]
        raise ValueError(f"{path}: event address outside the 128x128 sensor "
                         f"(max x={int(rec.x.max())}, y={int(rec.y.max())})")  # type: ignore[union-attr]


_INT = re.compile(r"^\d+$")


def npy_label(path: Path) -> int:
    """Label of a per-gesture ``.npy`` file (see module docstring), 0..10."""
    if _INT.match(path.parent.name):
        label = int(path.parent.name)
    else:
        last = path.stem.rsplit("_", 1)[-1]
        if not _INT.match(last):
            raise ValueError(f"{path}: cannot tell the label; name the file <label>.npy or "
                             "<...>_<label>.npy, or put it in a folder named <label>")
        label = int(last)
    if not 0 <= label < len(CLASS_NAMES):
        raise ValueError(f"{path}: label {label} outside 0..{len(CLASS_NAMES) - 1}")
    return label


def _npy_dir(root: Path, split: str) -> Path | None:
    for name in NPY_SPLIT_DIRS[split]:
        if (root / name).is_dir():
            return root / name
    return None


def _aedat_dir(root: Path) -> Path | None:
    for d in (root / "DvsGesture", root):
        if (d / TRIAL_LISTS["train"]).is_file() or (d / TRIAL_LISTS["test"]).is_file():
            return d
    return None


def load_npy(split: str, directory: Path) -> GestureNpyDataset:
    files = sorted(directory.rglob("*.npy"))
    if not files:
        raise missing_files_error("dvs-gesture", directory, ["*.npy gesture arrays"], _HOW)
    return GestureNpyDataset(split, files, [npy_label(f) for f in files])


def load_aedat(split: str, directory: Path) -> GestureAedatDataset:
    trials = directory / TRIAL_LISTS[split]
    if not trials.is_file():
        raise missing_files_error("dvs-gesture", directory, [TRIAL_LISTS[split]], _HOW)
    names = [ln.strip() for ln in trials.read_text().splitlines() if ln.strip()]
    files: list[Path] = []
    rows: list[tuple[int, int, int, int]] = []
    missing: list[str] = []
    for name in names:
        aedat = directory / name
        csv = directory / (Path(name).stem + "_labels.csv")
        for f in (aedat, csv):
            if not f.is_file():
                missing.append(f.name)
        if not aedat.is_file() or not csv.is_file():
            continue
        table = np.loadtxt(csv, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
        for cls, start, end in table[:, :3]:
            if not 1 <= cls <= len(CLASS_NAMES):
                raise ValueError(f"{csv}: class {cls} outside 1..{len(CLASS_NAMES)}")
            rows.append((len(files), cls - 1, start, end))
        files.append(aedat)
    if missing:
        raise missing_files_error("dvs-gesture", directory, missing, f"listed in {trials.name}; " + _HOW)
    return GestureAedatDataset(split, files, np.array(rows, dtype=np.int64).reshape(-1, 4))


def load(split: str, data_dir: Path, *, format: str = "auto") -> EventDataset:  # noqa: A002
    """DVS128 Gesture ``split`` ("train" | "test") from ``data_dir/dvs-gesture/``.

    ``format``: "auto" (npy folders if present, else AEDAT), "npy" or "aedat".
    """
    root = data_dir / "dvs-gesture"
    if format not in ("auto", "npy", "aedat"):
        raise ValueError(f"dvs-gesture format must be 'auto', 'npy' or 'aedat', not {format!r}")
    if format in ("auto", "npy"):
        d = _npy_dir(root, split)
        if d is not None:
            return load_npy(split, d)
        if format == "npy":
            raise missing_files_error("dvs-gesture", root, [f"{NPY_SPLIT_DIRS[split][0]}/**/*.npy"], _HOW)
    d = _aedat_dir(root)
    if d is not None:
        return load_aedat(split, d)
    raise missing_files_error(
        "dvs-gesture", root,
        [f"DvsGesture/{TRIAL_LISTS[split]} with its userXX_<lighting>.aedat and _labels.csv files",
         f"or {NPY_SPLIT_DIRS[split][0]}/**/*.npy"], _HOW)
