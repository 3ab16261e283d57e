"""Event sources: recordings from files, from the project's data sets, or from a simulated sensor.

Every source gives a :class:`Sample`: a :class:`~evssm.models.events.Recording` (``t`` int64
microseconds, ``x``, and ``y``/``p`` for 2-D sensors) with its label and sensor geometry when the
source knows them. Formats:

- ``.npy`` structured array with fields ``t``, ``x`` and optionally ``y``, ``p`` (the client's own
  format, written by :func:`save_events`); ``.npz`` with arrays ``t``, ``x``, ``y``?, ``p``?
  (and optional ``label``), or one structured array.
- DVS128 Gesture ``.npy`` as the common tools lay it out: an ``N x 4`` array of columns
  ``x, y, p, t`` with ``t`` in milliseconds, the file name (``3.npy``) being the class index.
- SHD/SSC HDF5 (``spikes/times`` in seconds, ``spikes/units``, ``labels``): one sample by index.
  Needs ``h5py`` (installed with ``evssm[train]``).
- Event-camera files through the optional ``faery`` package (``pip install 'evssm[formats]'``):
  AEDAT 4 (``.aedat4``, iniVation), Prophesee EVT 2.0 / 2.1 / 3.0 (``.raw``) and DAT (``.dat``,
  event types ``cd`` and ``2d``), event-stream (``.es``) and CSV (``.csv``: ``t,x,y,on`` with a
  header line, ``t`` in microseconds).
- The N-MNIST binary layout (``.bin``, read with numpy): 5 bytes per event, ``x`` (8 bit),
  ``y`` (8 bit), then polarity (1 bit) and ``t`` (23 bit, microseconds), big-endian.

**Geometry.** ``Sample.sensor`` is the source sensor and ``Sample.geometry`` says where it came
from: ``"file"`` (stated by the file: AEDAT4, ES, EVT/DAT with a geometry header), ``"format"``
(fixed by the data set: DVS Gesture, SHD/SSC, the project's data sets), ``"guess"`` (a file that
does not state it: the smallest standard sensor of its format that holds every address, e.g.
640 x 480 or 1280 x 720 for Prophesee files, 34 x 34 for N-MNIST), ``"option"`` (given by the
caller, ``--sensor WxH``), or ``"extent"`` (the smallest box holding the addresses of a file with
no known geometry: ``.npy``/``.npz``/CSV). A client declares every geometry but ``"extent"`` to
the server, which maps it onto the model's sensor.
- ``dataset:NAME`` — the project's offline data sets (needs the model extra).
- ``sim:rate=R,duration=S,label=K,...`` — a simulated sensor (:class:`SimulatedSensor`): ``label``
  picks one of ``classes`` movement patterns, not a class of the served model, so no correctness
  is reported for it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evssm.models.dataset_facts import DVS_GESTURE_CLASSES, DVS_GESTURE_SIZE, SHD_CHANNELS
from evssm.models.events import Recording, SensorSpec

from .errors import SourceError

if TYPE_CHECKING:
    from evssm.models.data.shd import SpikesH5Dataset

DVS_GESTURE_SENSOR = SensorSpec.two_d(*DVS_GESTURE_SIZE)

FORMATS = ("npy", "npz", "dvs-npy", "hdf5", "aedat4", "evt", "dat", "es", "csv", "nmnist")
_SUFFIX_FORMATS = {".npy": "npy", ".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5",
                   ".aedat4": "aedat4", ".aedat": "aedat4", ".raw": "evt", ".dat": "dat",
                   ".es": "es", ".csv": "csv", ".bin": "nmnist"}
# Sensors a format's files commonly come from, smallest first: the geometry guessed for a file
# that does not state it (Prophesee GenX320, Gen3 VGA, Gen4/IMX636 HD; ATIS; N-MNIST).
STANDARD_SENSORS: dict[str, tuple[tuple[int, int], ...]] = {
    "evt": ((320, 320), (640, 480), (1280, 720)),
    "dat": ((304, 240), (640, 480), (1280, 720)),
    "nmnist": ((34, 34), (304, 240)),
}
GEOMETRY_SOURCES = ("file", "format", "guess", "option", "extent")


@dataclass
class Sample:
    """One labelled recording. ``label`` is a class index or name (None if unknown).

    ``synthetic``: the label is a simulated sensor's pattern index, a class of no model, so no
    correctness is judged against a prediction.
    """

    recording: Recording
    label: int | str | None = None
    name: str = ""
    sensor: SensorSpec | None = None
    class_names: tuple[str, ...] = field(default=())
    geometry: str = "extent"  # where ``sensor`` came from (see the module docstring)
    synthetic: bool = False

    @property
    def declared_sensor(self) -> SensorSpec | None:
        """The sensor a client declares to the server: known geometries only, not an extent."""
        return None if self.geometry == "extent" else self.sensor

    def label_name(self, model_classes: Sequence[str] = ()) -> str | None:
        """The label as a class name: from the source's names, else the model's, else as is."""
        if self.label is None or self.synthetic:
            return None
        if isinstance(self.label, (int, np.integer)):
            for names in (self.class_names, model_classes):
                if 0 <= self.label < len(names):
                    return str(names[int(self.label)])
        return str(self.label)

    def is_correct(self, prediction: Any, model_classes: Sequence[str] = ()) -> bool | None:
        """Whether ``prediction`` (a class name or index, as the server gives it) is this
        sample's label; None when either is unknown. Indices are compared when both sides have
        one (data sets and models share the class order); names otherwise."""
        if self.label is None or prediction is None or self.synthetic:
            return None
        pred_index: int | None = None
        if isinstance(prediction, (int, np.integer)):
            pred_index = int(prediction)
        elif str(prediction) in model_classes:
            pred_index = list(model_classes).index(str(prediction))
        if isinstance(self.label, (int, np.integer)) and pred_index is not None:
            return pred_index == int(self.label)
        pred_name = (model_classes[pred_index] if pred_index is not None
                     and 0 <= pred_index < len(model_classes) else str(prediction))
        return pred_name == self.label_name(model_classes)


# -- helpers ----------------------------------------------------------------------------------


def _recording(t: Any, x: Any, y: Any = None, p: Any = None, *, where: str) -> Recording:
    """A validated Recording (int64 t; int addresses; equal lengths; non-decreasing time)."""
    cols = {"t": np.asarray(t), "x": np.asarray(x)}
    if y is not None:
        cols["y"] = np.asarray(y)
    if p is not None:
        cols["p"] = np.asarray(p)
    n = cols["t"].shape[0]
    for name, values in cols.items():
        if values.ndim != 1 or values.shape[0] != n:
            raise SourceError(f"{where}: column {name} has shape {values.shape}, expected ({n},)")
    if ("y" in cols) != ("p" in cols):
        raise SourceError(f"{where}: a 2-D recording needs both y and p")
    t64 = cols["t"].astype(np.int64)
    order = None
    if n > 1 and (np.diff(t64) < 0).any():
        order = np.argsort(t64, kind="stable")  # sensors interleave slightly; the model needs order

    def column(name: str) -> np.ndarray | None:
        if name not in cols:
            return None
        arr = cols[name]
        if name == "p" and arr.dtype == np.bool_:
            arr = arr.astype(np.uint8)
        if not np.issubdtype(arr.dtype, np.integer):
            if arr.size and not np.array_equal(arr, np.round(arr)):
                raise SourceError(f"{where}: column {name} holds non-integer addresses")
            arr = arr.astype(np.int64)
        return arr if order is None else arr[order]
    x_col = column("x")
    assert x_col is not None
    return Recording(t64 if order is None else t64[order], x_col, column("y"), column("p"))


def _sensor_of(rec: Recording) -> SensorSpec | None:
    """The smallest sensor that holds ``rec``'s addresses (a guess for files without geometry)."""
    if len(rec) == 0:
        return None
    if rec.y is None:
        return SensorSpec.one_d(int(rec.x.max()) + 1)
    return SensorSpec.two_d(int(rec.x.max()) + 1, int(rec.y.max()) + 1)


def _label_of(value: Any) -> int | str | None:
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.size != 1:
        return None
    item = arr.reshape(()).item()
    if isinstance(item, bytes):
        return item.decode()
    return int(item) if isinstance(item, (int, np.integer)) else item


def _fields_recording(arr: np.ndarray, where: str) -> Recording:
    names = arr.dtype.names or ()
    if "t" not in names or "x" not in names:
        raise SourceError(f"{where}: a structured event array needs fields t and x "
                          f"(has {', '.join(names) or 'none'})")
    y = arr["y"] if "y" in names else None
    p = arr["p"] if "p" in names else (arr["on"] if "on" in names else None)
    return _recording(arr["t"], arr["x"], y, p, where=where)


# -- files --------------------------------------------------------------------------------------


def save_events(path: str | Path, rec: Recording, *, label: int | str | None = None) -> Path:
    """Write ``rec`` in the client's own formats: ``.npy`` (one structured array with fields
    ``t`` int64, ``x``, ``y``, ``p``) or ``.npz`` (one array per column, plus ``label``)."""
    path = Path(path)
    cols: list[tuple[str, Any, np.ndarray]] = [("t", np.int64, rec.t), ("x", np.uint16, rec.x)]
    if rec.y is not None and rec.p is not None:
        cols += [("y", np.uint16, rec.y), ("p", np.uint8, rec.p)]
    if path.suffix == ".npz":
        arrays: dict[str, Any] = {name: np.asarray(v, dtype) for name, dtype, v in cols}
        if label is not None:
            arrays["label"] = np.asarray(label)
        np.savez(path, **arrays)
    elif path.suffix == ".npy":
        arr = np.empty(len(rec), dtype=[(name, dtype) for name, dtype, _ in cols])
        for name, _, v in cols:
            arr[name] = v
        np.save(path, arr)
    else:
        raise SourceError(f"{path}: save_events writes .npy or .npz")
    return path


def load_npy(path: str | Path) -> Sample:
    """A ``.npy`` event file: a structured array (t, x, y?, p?), or a DVS Gesture ``N x 4`` array
    (see :func:`load_dvs_gesture`)."""
    path = Path(path)
    arr = np.load(path, allow_pickle=False)
    if arr.dtype.names:
        rec = _fields_recording(arr, str(path))
        return Sample(rec, name=path.name, sensor=_sensor_of(rec))
    if arr.ndim == 2 and arr.shape[1] == 4:
        return _dvs_gesture(arr, path)
    raise SourceError(f"{path}: expected a structured event array or an N x 4 DVS Gesture array, "
                      f"got shape {arr.shape} dtype {arr.dtype}")


def load_npz(path: str | Path) -> Sample:
    """A ``.npz`` with arrays ``t``, ``x``, ``y``?, ``p``? (and ``label``?), or holding one
    structured event array."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        label = _label_of(z["label"]) if "label" in keys else None
        if {"t", "x"} <= keys:
            rec = _recording(z["t"], z["x"], z["y"] if "y" in keys else None,
                             z["p"] if "p" in keys else None, where=str(path))
        else:
            structured = [k for k in z.files if z[k].dtype.names]
            if not structured:
                raise SourceError(f"{path}: expected arrays t (microseconds), x, and for a 2-D "
                                  f"sensor y, p (or one structured array with those fields); "
                                  f"found arrays {', '.join(sorted(keys)) or 'none'}")
            rec = _fields_recording(z[structured[0]], str(path))
    return Sample(rec, label=label, name=path.name, sensor=_sensor_of(rec))


def _dvs_gesture(arr: np.ndarray, path: Path) -> Sample:
    x, y, p, t_ms = (arr[:, i] for i in range(4))
    width, height = DVS_GESTURE_SIZE
    bad = [f"{name} outside 0..{hi - 1}" for name, col, hi in (("x", x, width), ("y", y, height),
                                                                ("p", p, 2))
           if col.size and (col.min() < 0 or col.max() >= hi)]
    if bad:  # most likely another column order, such as t, x, y, p
        raise SourceError(f"{path}: an N x 4 .npy is read as DVS128 Gesture columns x, y, p, t "
                          f"(t in milliseconds), but {', '.join(bad)}; save other recordings as "
                          "a structured array with fields t, x, y, p (evssm.client.save_events) "
                          "or an .npz with arrays t, x, y, p")
    t_us = np.rint(np.asarray(t_ms, dtype=np.float64) * 1000.0).astype(np.int64)
    rec = _recording(t_us, x, y, p, where=str(path))
    label = int(path.stem) if path.stem.isdigit() else None
    return Sample(rec, label=label, name=str(Path(path.parent.name) / path.name),
                  sensor=DVS_GESTURE_SENSOR, class_names=DVS_GESTURE_CLASSES, geometry="format")


def load_dvs_gesture(path: str | Path) -> Sample:
    """A DVS128 Gesture ``.npy``: ``N x 4`` columns ``x, y, p, t`` with ``t`` in milliseconds
    (as the common tools save one sample per file, named by its class index, e.g. ``3.npy``)."""
    path = Path(path)
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise SourceError(f"{path}: a DVS Gesture file is an N x 4 array, got {arr.shape}")
    return _dvs_gesture(arr, path)


def _spikes_file(path: Path) -> SpikesH5Dataset:
    """The SHD-layout file at ``path``, read by the data sets' own reader; a SourceError when h5py
    is missing or the file is not of that layout."""
    from evssm.models.data.shd import SpikesH5Dataset

    try:
        return SpikesH5Dataset(path, path.name, "file")
    except ImportError as exc:
        raise SourceError("reading SHD/SSC HDF5 files needs h5py: pip install h5py "
                          "(or evssm[train])") from exc
    except (KeyError, OSError, ValueError) as exc:
        raise SourceError(f"{path}: not an SHD/SSC HDF5 file ({exc})") from exc


def hdf5_size(path: str | Path) -> int:
    """How many samples an SHD/SSC HDF5 file holds."""
    spikes = _spikes_file(Path(path))
    spikes.close()
    return len(spikes)


def load_hdf5(path: str | Path, index: int = 0) -> Sample:
    """Sample ``index`` of an SHD/SSC HDF5 file (``spikes/times`` seconds, ``spikes/units``
    channels, ``labels``; class names from ``extra/keys`` when present)."""
    path = Path(path)
    spikes = _spikes_file(path)
    try:
        n = len(spikes)
        if not -n <= index < n:
            raise SourceError(f"{path}: sample {index} out of range (file holds {n})")
        rec, label = spikes[index]
    except (KeyError, OSError, ValueError) as exc:
        if isinstance(exc, SourceError):
            raise
        raise SourceError(f"{path}[{index}]: {exc}") from exc
    finally:
        spikes.close()
    return Sample(rec, label=label, name=f"{path.name}[{index}]", sensor=spikes.sensor,
                  class_names=spikes.class_names if spikes.names_in_file else (), geometry="format")


def _faery(what: str) -> Any:
    try:
        import faery
    except ImportError as exc:
        raise SourceError(f"reading {what} files needs the optional faery package: "
                          "pip install 'evssm[formats]'") from exc
    return faery


def _faery_recording(chunks: Iterable[np.ndarray], where: str, on: str = "on") -> Recording:
    """One Recording from faery's event arrays (fields t, x, y and ``on``)."""
    parts = [c for c in chunks if len(c)]
    if not parts:
        return Recording(np.zeros(0, np.int64), np.zeros(0, np.uint16), np.zeros(0, np.uint16),
                         np.zeros(0, np.uint8))
    # Column by column: numpy concatenates plain columns far faster than structured records.
    t, x, y, p = (np.concatenate([c[name] for c in parts]) for name in ("t", "x", "y", on))
    return _recording(t, x, y, p if p.dtype == np.bool_ else p > 0,  # a DAT payload: > 0 is ON
                      where=where)


def _guess_sensor(rec: Recording, fmt: str) -> tuple[SensorSpec | None, str]:
    """The smallest standard sensor of ``fmt`` that holds every address, else the extent."""
    extent = _sensor_of(rec)
    if extent is None:
        return None, "extent"
    for w, h in STANDARD_SENSORS.get(fmt, ()):
        if extent.width <= w and extent.height <= h:
            return SensorSpec.two_d(w, h), "guess"
    return extent, "extent"


def _stated(decoder_cls: Any, path: Path, fallback: tuple[int, int]) -> tuple[Any, bool]:
    """A faery EVT/DAT decoder and whether the file states its geometry (else ``fallback``)."""
    try:
        return decoder_cls(path, None, None), True
    except RuntimeError as exc:
        if "size" not in str(exc):
            raise
        return decoder_cls(path, fallback, None), False


def _csv_geometry(path: Path) -> tuple[int, int] | None:
    """The geometry a CSV header states as faery writes it (``t,x@W,y@H,on``), else None."""
    with open(path, "rb") as f:
        header = f.readline(256).decode("ascii", "replace")
    w, h = re.search(r"x@(\d+)", header), re.search(r"y@(\d+)", header)
    return (int(w.group(1)), int(h.group(1))) if w and h else None


def load_camera_file(path: str | Path, fmt: str, sensor: SensorSpec | None = None) -> Sample:
    """An event-camera file read by faery: ``fmt`` one of ``aedat4``, ``evt``, ``dat``, ``es``,
    ``csv``. ``sensor`` is the caller's geometry for files that do not state theirs."""
    faery = _faery({"aedat4": "AEDAT4", "evt": "Prophesee EVT (.raw)", "dat": "Prophesee DAT",
                    "es": "event-stream (.es)", "csv": "CSV event"}[fmt])
    path = Path(path)
    fallback = (sensor.width, sensor.height) if sensor is not None and sensor.kind == "2d" \
        else (1280, 720)
    stated: tuple[int, int] | None = None
    try:
        if fmt == "evt":
            decoder, known = _stated(faery.evt.Decoder, path, fallback)
            with decoder:
                stated = tuple(decoder.dimensions) if known else None
                chunks = [packet["events"] for packet in decoder if "events" in packet]
            rec = _faery_recording(chunks, str(path))
        elif fmt == "dat":
            decoder, known = _stated(faery.dat.Decoder, path, fallback)
            with decoder:
                if decoder.event_type not in ("cd", "2d"):  # both are (t, x, y, polarity)
                    raise SourceError(f"{path}: DAT events of type {decoder.event_type!r} are "
                                      "not address events (expected cd or 2d)")
                stated = tuple(decoder.dimensions) if known else None
                chunks = list(decoder)
            rec = _faery_recording(chunks, str(path), on="payload")
        elif fmt == "csv":
            stated = _csv_geometry(path)
            # faery checks addresses against the size: the largest a uint16 address allows
            size = stated or ((sensor.width, sensor.height) if sensor is not None
                              and sensor.kind == "2d" else (0xFFFF, 0xFFFF))
            stream = faery.events_stream_from_file(path, file_type="csv", dimensions_fallback=size)
            rec = _faery_recording(stream, str(path))
        else:
            stream = faery.events_stream_from_file(path, file_type="aedat" if fmt == "aedat4"
                                                   else "es")
            rec = _faery_recording(stream, str(path))
            stated = tuple(stream.dimensions())
    except SourceError:
        raise
    except Exception as exc:  # faery's decoders raise plain exceptions for broken files
        raise SourceError(f"{path}: cannot decode as {fmt}: {exc}") from exc
    if stated is not None:
        return Sample(rec, name=path.name, sensor=SensorSpec.two_d(*stated), geometry="file")
    guessed, how = _guess_sensor(rec, fmt)
    return Sample(rec, name=path.name, sensor=guessed, geometry=how)


def load_nmnist(path: str | Path) -> Sample:
    """An N-MNIST-layout ``.bin`` (ATIS recordings: N-MNIST, N-Caltech101).

    Each event is 5 bytes ``b0..b4``: ``x = b0``, ``y = b1``, ``p = b2 >> 7``,
    ``t = (b2 & 0x7f) << 16 | b3 << 8 | b4`` microseconds. A row with ``y = 240`` is the
    layout's timestamp-overflow marker: it is not an event, and adds ``2**13`` us to every later
    timestamp (as the data set's own reader does).
    """
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 5:
        raise SourceError(f"{path}: {raw.size} bytes is not a whole number of 5-byte N-MNIST "
                          "events")
    b = raw.reshape(-1, 5).astype(np.int64)
    t = ((b[:, 2] & 0x7F) << 16) | (b[:, 3] << 8) | b[:, 4]
    overflow = b[:, 1] == 240
    if overflow.any():
        t = t + (np.cumsum(overflow) << 13)
    keep = ~overflow
    rec = _recording(t[keep], b[keep, 0].astype(np.uint16), b[keep, 1].astype(np.uint16),
                     (b[keep, 2] >> 7).astype(np.uint8), where=str(path))
    guessed, how = _guess_sensor(rec, "nmnist")
    return Sample(rec, name=path.name, sensor=guessed, geometry=how)


def load_file(path: str | Path, *, index: int = 0, fmt: str | None = None,
              sensor: SensorSpec | None = None) -> Sample:
    """Load an event file, its format from ``fmt`` or the file's suffix (see :data:`FORMATS`).
    ``index`` picks the sample of a many-sample file (HDF5). ``sensor`` (``--sensor``) sets the
    source geometry, overriding the file's; addresses beyond it are an error."""
    sample = _load_file(Path(path), index, fmt, sensor)
    if sensor is not None:
        problem = _outside(sample.recording, sensor)
        if problem:
            raise SourceError(f"{path}: {problem}")
        sample.sensor, sample.geometry = sensor, "option"
    return sample


def _outside(rec: Recording, sensor: SensorSpec) -> str | None:
    """Why ``rec`` does not fit ``sensor`` (None when it does)."""
    if len(rec) == 0:
        return None
    if (rec.y is None) != (sensor.kind == "1d"):
        return (f"the recording is {'1-D' if rec.y is None else '2-D'} but the sensor given is "
                f"{sensor.kind.upper()}")
    if sensor.kind == "1d":
        if int(rec.x.max()) >= sensor.channels:
            return f"channel {int(rec.x.max())} is beyond the {sensor.channels} channels given"
        return None
    assert rec.y is not None
    if int(rec.x.max()) >= sensor.width or int(rec.y.max()) >= sensor.height:
        return (f"addresses up to {int(rec.x.max())}x{int(rec.y.max())} do not fit the "
                f"{sensor.width}x{sensor.height} sensor given")
    return None


def parse_sensor(text: str) -> SensorSpec:
    """``WxH`` (a 2-D sensor, e.g. ``640x480``) or ``C`` (a 1-D sensor of C channels)."""
    w, sep, h = text.lower().partition("x")
    try:
        if not sep:
            return SensorSpec.one_d(int(w))
        return SensorSpec.two_d(int(w), int(h))
    except ValueError:
        raise SourceError(f"bad sensor {text!r}: use WIDTHxHEIGHT (e.g. 640x480) or CHANNELS"
                          ) from None


def _load_file(path: Path, index: int, fmt: str | None, sensor: SensorSpec | None) -> Sample:
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file")
    fmt = fmt or _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt == "npy":
        return load_npy(path)
    if fmt == "npz":
        return load_npz(path)
    if fmt == "dvs-npy":
        return load_dvs_gesture(path)
    if fmt == "hdf5":
        return load_hdf5(path, index)
    if fmt in ("aedat4", "evt", "dat", "es", "csv"):
        return load_camera_file(path, fmt, sensor)
    if fmt == "nmnist":
        return load_nmnist(path)
    raise SourceError(f"{path}: unknown format (suffix {path.suffix!r}); "
                      f"use one of {', '.join(FORMATS)}")


# -- the project's data sets ------------------------------------------------------------------


def load_dataset_sample(name: str, split: str = "test", index: int = 0,
                        data_dir: str | Path | None = None) -> Sample:
    """Sample ``index`` of one of the project's offline data sets
    (``evssm.models.data.load_dataset``; imported here only, since it needs the model extra)."""
    try:
        from evssm.models.data import load_dataset
    except ImportError as exc:
        raise SourceError(f"data set {name!r} needs the project's data sets "
                          f"(evssm.models.data, installed with evssm[train]): {exc}") from exc
    try:
        samples: Sequence[Any] = load_dataset(name, split, data_dir)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise SourceError(f"data set {name!r} split {split!r}: {exc}") from exc
    n = len(samples)
    if not -n <= index < n:
        raise SourceError(f"data set {name}/{split}: sample {index} out of range (holds {n})")
    rec, label = samples[index]
    sensor = getattr(samples, "sensor", None)
    return Sample(rec, label=_label_of(label), name=f"{name}/{split}[{index}]", sensor=sensor,
                  class_names=tuple(getattr(samples, "class_names", ()) or ()),
                  geometry="extent" if sensor is None else "format")


def dataset_size(name: str, split: str = "test", data_dir: str | Path | None = None) -> int:
    """How many samples a project data set split holds."""
    from evssm.models.data import load_dataset

    return len(load_dataset(name, split, data_dir))


# -- simulated sensor -------------------------------------------------------------------------


class SimulatedSensor:
    """A sensor that emits a labelled event stream at a chosen mean rate (a Poisson process).

    Each class has its own address pattern, so a stream carries its label: on a 1-D sensor a
    band of channels sweeping at a class-specific speed and start; on a 2-D sensor a blob moving
    in a class-specific direction, polarity 1 on its leading half. Deterministic given ``seed``.
    """

    def __init__(self, sensor: SensorSpec, rate: float, *, label: int = 0, num_classes: int = 10,
                 seed: int = 0, t0_us: int = 0):
        if rate <= 0:
            raise ValueError("rate must be > 0 events/s")
        if not 0 <= label < num_classes:
            raise ValueError(f"label must be in 0..{num_classes - 1}")
        self.sensor = sensor
        self.rate = float(rate)
        self.label = label
        self.num_classes = num_classes
        self._rng = np.random.default_rng([seed, label])
        self._t = int(t0_us)  # start of the next chunk, us

    def _addresses(self, t_us: np.ndarray) -> tuple[np.ndarray, ...]:
        phase = t_us.astype(np.float64) / 1e6  # seconds
        frac = self.label / self.num_classes
        n = t_us.shape[0]
        if self.sensor.kind == "1d":
            c = self.sensor.channels
            center = c * frac + c * (0.2 + 0.6 * frac) * phase
            x = np.rint(center + self._rng.normal(0.0, max(c / 40, 1.0), n)).astype(np.int64) % c
            return (x.astype(np.uint16),)
        w, h = self.sensor.width, self.sensor.height
        angle = 2 * math.pi * frac
        speed = 0.5 * min(w, h)  # pixels per second
        cx = (w / 2 + speed * phase * math.cos(angle)) % w
        cy = (h / 2 + speed * phase * math.sin(angle)) % h
        dx = self._rng.normal(0.0, max(w / 16, 1.0), n)
        dy = self._rng.normal(0.0, max(h / 16, 1.0), n)
        x = np.rint(cx + dx).astype(np.int64) % w
        y = np.rint(cy + dy).astype(np.int64) % h
        leading = dx * math.cos(angle) + dy * math.sin(angle) > 0
        return x.astype(np.uint16), y.astype(np.uint16), leading.astype(np.uint8)

    def _window(self, start_us: int, span_us: int) -> Recording:
        n = int(self._rng.poisson(self.rate * span_us / 1e6))
        t = np.sort(self._rng.integers(start_us, start_us + max(span_us, 1), n, dtype=np.int64))
        return Recording(t, *self._addresses(t))

    @property
    def now_us(self) -> int:
        """Stream time reached so far: the end of the last chunk, or the last event taken."""
        return self._t

    def chunk(self, span_us: int) -> Recording:
        """The events of the next ``span_us`` microseconds of the stream."""
        rec = self._window(self._t, span_us)
        self._t += span_us
        return rec

    def take(self, count: int) -> Recording:
        """The next ``count`` events exactly (their span follows from the rate)."""
        gaps = self._rng.exponential(1e6 / self.rate, count)
        t = self._t + np.floor(np.cumsum(gaps)).astype(np.int64)
        if count:
            self._t = int(t[-1])
        return Recording(t, *self._addresses(t))

    def chunks(self, span_us: int) -> Iterator[Recording]:
        """An endless sequence of consecutive ``span_us`` chunks."""
        while True:
            yield self.chunk(span_us)

    def recording(self, duration_s: float) -> Recording:
        """``duration_s`` seconds of the stream."""
        return self.chunk(int(round(duration_s * 1e6)))

    def sample(self, duration_s: float) -> Sample:
        """A :class:`Sample` of ``duration_s`` seconds; its label is the pattern index (see the
        class docstring), which no model was trained on, so it is marked ``synthetic``."""
        return Sample(self.recording(duration_s), label=self.label, synthetic=True,
                      name=f"sim(pattern {self.label} of {self.num_classes}, {self.rate:g} events/s)",
                      sensor=self.sensor, geometry="format")


SIM_DEFAULTS: dict[str, float] = {"rate": 20000.0, "duration": 2.0, "label": 0.0, "classes": 10.0,
                                  "seed": 0.0}


def parse_sim_spec(spec: str) -> dict[str, float]:
    """``sim`` or ``sim:rate=R,duration=S,label=K,classes=C,seed=N`` -> the settings."""
    settings = dict(SIM_DEFAULTS)
    _, _, body = spec.partition(":")
    for part in filter(None, (s.strip() for s in body.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key not in settings:
            raise SourceError(f"bad sim setting {part!r}; use {', '.join(SIM_DEFAULTS)} as key=value")
        try:
            settings[key] = float(value)
        except ValueError as exc:
            raise SourceError(f"sim setting {key} must be a number, got {value!r}") from exc
    return settings


def open_source(spec: str, *, index: int = 0, fmt: str | None = None,
                data_dir: str | Path | None = None, split: str = "test",
                sensor: SensorSpec | None = None, source_sensor: SensorSpec | None = None
                ) -> Sample:
    """A sample from a source spec: a file path, ``dataset:NAME``, or ``sim[:key=value,...]``.

    ``sensor`` is the geometry the simulated sensor emits for (normally the served model's); a
    SHD-like 700-channel sensor when not given. ``source_sensor`` (``--sensor``) sets a file's
    geometry (see :func:`load_file`).
    """
    if spec == "sim" or spec.startswith("sim:"):
        s = parse_sim_spec(spec)
        sim = SimulatedSensor(sensor or SensorSpec.one_d(SHD_CHANNELS), s["rate"],
                              label=int(s["label"]), num_classes=int(s["classes"]),
                              seed=int(s["seed"]))
        return sim.sample(s["duration"])
    if spec.startswith("dataset:"):
        return load_dataset_sample(spec.split(":", 1)[1], split, index, data_dir)
    return load_file(spec, index=index, fmt=fmt, sensor=source_sensor)


def source_count(spec: str, *, fmt: str | None = None, data_dir: str | Path | None = None,
                 split: str = "test") -> int:
    """How many samples a source spec holds (1 for single-recording files and ``sim``)."""
    if spec.startswith("dataset:"):
        return dataset_size(spec.split(":", 1)[1], split, data_dir)
    if spec == "sim" or spec.startswith("sim:"):
        return 1
    if (fmt or _SUFFIX_FORMATS.get(Path(spec).suffix.lower())) == "hdf5":
        return hdf5_size(spec)
    return 1
