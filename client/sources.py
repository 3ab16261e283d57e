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

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evssm.models.dataset_facts import DVS_GESTURE_CLASSES, DVS_GESTURE_SIZE, SHD_CHANNELS
from evssm.models.events import Recording, SensorSpec

from .camera_files import STANDARD_SENSORS, load_camera_file, load_nmnist
from .errors import SourceError
from .sample import GEOMETRY_SOURCES, Sample, checked_recording, fields_recording, label_of, sensor_of
from .simulated import SIM_DEFAULTS, SimulatedSensor, parse_sim_spec

if TYPE_CHECKING:
    from evssm.models.data.shd import SpikesH5Dataset

# Readers live by file family (camera_files, simulated, sample); this module picks one per source.
__all__ = [
    "FORMATS", "GEOMETRY_SOURCES", "SIM_DEFAULTS", "STANDARD_SENSORS", "Sample", "SimulatedSensor",
    "dataset_size", "hdf5_size", "load_camera_file", "load_dataset_sample", "load_dvs_gesture",
    "load_file", "load_hdf5", "load_nmnist", "load_npy", "load_npz", "open_source", "parse_sensor",
    "parse_sim_spec", "save_events", "source_count",
]

DVS_GESTURE_SENSOR = SensorSpec.two_d(*DVS_GESTURE_SIZE)

FORMATS = ("npy", "npz", "dvs-npy", "hdf5", "aedat4", "evt", "dat", "es", "csv", "nmnist")
_SUFFIX_FORMATS = {".npy": "npy", ".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5",
                   ".aedat4": "aedat4", ".aedat": "aedat4", ".raw": "evt", ".dat": "dat",
                   ".es": "es", ".csv": "csv", ".bin": "nmnist"}


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
        rec = fields_recording(arr, str(path))
        return Sample(rec, name=path.name, sensor=sensor_of(rec))
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
        label = label_of(z["label"]) if "label" in keys else None
        if {"t", "x"} <= keys:
            rec = checked_recording(z["t"], z["x"], z["y"] if "y" in keys else None,
                             z["p"] if "p" in keys else None, where=str(path))
        else:
            structured = [k for k in z.files if z[k].dtype.names]
            if not structured:
                raise SourceError(f"{path}: expected arrays t (microseconds), x, and for a 2-D "
                                  f"sensor y, p (or one structured array with those fields); "
                                  f"found arrays {', '.join(sorted(keys)) or 'none'}")
            rec = fields_recording(z[structured[0]], str(path))
    return Sample(rec, label=label, name=path.name, sensor=sensor_of(rec))


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
    rec = checked_recording(t_us, x, y, p, where=str(path))
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
        samples = load_dataset(name, split, data_dir)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise SourceError(f"data set {name!r} split {split!r}: {exc}") from exc
    n = len(samples)
    if not -n <= index < n:
        raise SourceError(f"data set {name}/{split}: sample {index} out of range (holds {n})")
    rec, label = samples[index]
    sensor = samples.sensor
    return Sample(rec, label=label_of(label), name=f"{name}/{split}[{index}]", sensor=sensor,
                  class_names=tuple(samples.class_names), geometry="format")


def dataset_size(name: str, split: str = "test", data_dir: str | Path | None = None) -> int:
    """How many samples a project data set split holds."""
    from evssm.models.data import load_dataset

    return len(load_dataset(name, split, data_dir))


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
