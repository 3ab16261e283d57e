"""Event-camera files: AEDAT 4, Prophesee EVT 2/3 and DAT, event-stream and CSV through the optional
``faery`` package (``pip install 'evssm[formats]'``), and the N-MNIST binary layout read with numpy.
Where a file does not state its sensor, the smallest standard sensor of its format that holds
every address is assumed (see :mod:`evssm.client.sources`, "Geometry")."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from evssm.models.events import Recording, SensorSpec

from .errors import SourceError
from .sample import Sample, checked_recording, sensor_of

# Sensors a format's files commonly come from, smallest first: the geometry guessed for a file
# that does not state it (Prophesee GenX320, Gen3 VGA, Gen4/IMX636 HD; ATIS; N-MNIST).
STANDARD_SENSORS: dict[str, tuple[tuple[int, int], ...]] = {
    "evt": ((320, 320), (640, 480), (1280, 720)),
    "dat": ((304, 240), (640, 480), (1280, 720)),
    "nmnist": ((34, 34), (304, 240)),
}


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
    return checked_recording(t, x, y, p if p.dtype == np.bool_ else p > 0,  # a DAT payload: > 0 is ON
                      where=where)


def _guess_sensor(rec: Recording, fmt: str) -> tuple[SensorSpec | None, str]:
    """The smallest standard sensor of ``fmt`` that holds every address, else the extent."""
    extent = sensor_of(rec)
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
    rec = checked_recording(t[keep], b[keep, 0].astype(np.uint16), b[keep, 1].astype(np.uint16),
                     (b[keep, 2] >> 7).astype(np.uint8), where=str(path))
    guessed, how = _guess_sensor(rec, "nmnist")
    return Sample(rec, name=path.name, sensor=guessed, geometry=how)
