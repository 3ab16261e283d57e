"""A recording from a source, with what the source knows of it (:class:`Sample`), and the checks
every file reader applies to the columns it reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evssm.models.events import Recording, SensorSpec

from .errors import SourceError

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


def checked_recording(t: Any, x: Any, y: Any = None, p: Any = None, *, where: str) -> Recording:
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


def sensor_of(rec: Recording) -> SensorSpec | None:
    """The smallest sensor that holds ``rec``'s addresses (a guess for files without geometry)."""
    if len(rec) == 0:
        return None
    if rec.y is None:
        return SensorSpec.one_d(int(rec.x.max()) + 1)
    return SensorSpec.two_d(int(rec.x.max()) + 1, int(rec.y.max()) + 1)


def label_of(value: Any) -> int | str | None:
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.size != 1:
        return None
    item = arr.reshape(()).item()
    if isinstance(item, bytes):
        return item.decode()
    return int(item) if isinstance(item, (int, np.integer)) else item


def fields_recording(arr: np.ndarray, where: str) -> Recording:
    names = arr.dtype.names or ()
    if "t" not in names or "x" not in names:
        raise SourceError(f"{where}: a structured event array needs fields t and x "
                          f"(has {', '.join(names) or 'none'})")
    y = arr["y"] if "y" in names else None
    p = arr["p"] if "p" in names else (arr["on"] if "on" in names else None)
    return checked_recording(arr["t"], arr["x"], y, p, where=where)
