"""Sensor geometry adapter: map a source sensor's addresses onto a model's sensor — NumPy only.

A model reads one sensor (``W x H`` pixels, or ``C`` channels). A camera may be another: a
1280 x 720 Prophesee stream for a 128 x 128 DVS Gesture model. The adapter maps every event of the
*source* sensor to an address of the *model's* sensor before tokenising, per packet, with integer
arithmetic only (so the streaming and the offline path map an event identically, bit for bit).

**The mapping.** A transform is a crop rectangle of the source, a scaling mode and flips:

1. *Crop.* The rectangle ``[cx, cx + cw) x [cy, cy + ch)`` of the source (default: the whole
   sensor). Events outside it are removed and counted; they never reach the model. Inside,
   ``u = x - cx in 0..cw-1`` and ``v = y - cy in 0..ch-1``.
2. *Flips* (in the cropped frame): ``u <- cw - 1 - u`` (``flip_x``), ``v <- ch - 1 - v``
   (``flip_y``).
3. *Scale* onto the model's ``W x H``, pixel centre to pixel:

   - ``fit`` (the default): one factor ``s = min(W / cw, H / ch)`` for both axes, the scaled
     crop (``cw*s x ch*s``) centred: ``x' = floor((W - cw*s)/2 + (u + 1/2)*s)``, likewise
     ``y'`` with ``H``, ``ch``, ``v``. The aspect ratio is kept and every event lands inside
     ``0..W-1`` (because ``0 <= (u + 1/2)*s <= cw*s - s/2`` and ``(W - cw*s)/2 >= 0``).
   - ``stretch``: each axis its own factor, ``x' = floor((u + 1/2) * W / cw)``,
     ``y' = floor((v + 1/2) * H / ch)``: the crop fills the model's sensor.

   With ``s = n/d`` (integers: ``n/d = W/cw`` or ``H/ch``, whichever is smaller), the fit is
   computed exactly as ``x' = (W*d - cw*n + (2u + 1)*n) // (2d)``; stretch is the same formula
   with ``n/d = W/cw`` (then ``W*d - cw*n = 0``).

Polarity passes through. Many source pixels may share a model pixel when scaling down (their
events keep their own timestamps, so the model sees every event); scaling up spreads them.

**1-D sensors** (``C`` channels, e.g. a cochlea) are handled along one axis: a crop is a channel
range ``[c0, c0 + cw)``, ``flip_x`` reverses it, and ``fit`` and ``stretch`` coincide
(``c' = floor((u + 1/2) * C / cw)``). A 1-D source cannot feed a 2-D model nor the reverse: there
is no meaningful map between channels and pixels, so the adapter refuses (:class:`GeometryError`).

Declarations arrive as plain data (the wire's ``sensor`` and ``transform`` maps); see
:func:`sensor_from_dict`, :meth:`Transform.from_dict` and :func:`adapter_for`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np

from .events import EventError, SensorSpec, tokenize

SCALES = ("fit", "stretch")


class GeometryError(ValueError):
    """A sensor or transform declaration that cannot be used (the message says why)."""


@dataclass(frozen=True)
class Crop:
    """A rectangle of the source: ``x, y`` its first column and row, ``width x height`` its size
    (for a 1-D sensor: first channel ``x`` and ``width`` channels; ``y``/``height`` unused)."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class Transform:
    """How a source maps onto the model's sensor: an optional crop, ``fit`` or ``stretch``, flips."""

    crop: Crop | None = None
    scale: str = "fit"
    flip_x: bool = False
    flip_y: bool = False

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise GeometryError(f"transform.scale must be one of {list(SCALES)}, got {self.scale!r}")

    @classmethod
    def from_dict(cls, d: Any) -> Transform:
        """``{"crop": [x, y, w, h] | {"x", "y", "width", "height"}, "scale": "fit"|"stretch",
        "flip_x": bool, "flip_y": bool}``, every key optional (1-D crops: ``[x, w]``)."""
        if not isinstance(d, Mapping):
            raise GeometryError(f"transform must be a map, got {type(d).__name__}")
        unknown = set(d) - {"crop", "scale", "flip_x", "flip_y"}
        if unknown:
            raise GeometryError(f"transform has unknown keys {sorted(unknown)}; "
                                "use crop, scale, flip_x, flip_y")
        for key in ("flip_x", "flip_y"):
            if key in d and not isinstance(d[key], bool):
                raise GeometryError(f"transform.{key} must be true or false")
        scale = d.get("scale", "fit")
        if not isinstance(scale, str):
            raise GeometryError("transform.scale must be a string")
        crop = None if d.get("crop") is None else _crop_from(d["crop"])
        return cls(crop=crop, scale=scale, flip_x=d.get("flip_x", False),
                   flip_y=d.get("flip_y", False))

    def to_dict(self) -> dict[str, Any]:
        crop = None if self.crop is None else [self.crop.x, self.crop.y, self.crop.width,
                                                self.crop.height]
        return {"crop": crop, "scale": self.scale, "flip_x": self.flip_x, "flip_y": self.flip_y}


def _is_int(v: Any) -> TypeGuard[int | np.integer]:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _crop_from(value: Any) -> Crop:
    if isinstance(value, Mapping):
        keys = ("x", "y", "width", "height")
        value = [value.get(k, 0 if k in ("x", "y") else None) for k in keys]
    if not isinstance(value, (list, tuple)) or len(value) not in (2, 4):
        raise GeometryError("transform.crop must be [x, y, width, height] (or [x, width] for a "
                            "1-D sensor) or a map with those keys")
    if not all(_is_int(v) for v in value):
        raise GeometryError(f"transform.crop must hold integers, got {list(value)}")
    x, y, w, h = (value[0], 0, value[1], 1) if len(value) == 2 else value
    if x < 0 or y < 0 or w < 1 or h < 1:
        raise GeometryError(f"transform.crop {list(value)}: x, y must be >= 0 and width, height "
                            ">= 1")
    return Crop(int(x), int(y), int(w), int(h))


def sensor_from_dict(d: Any) -> SensorSpec:
    """A declared source sensor: ``{"width": W, "height": H}`` (2-D, two polarities),
    ``{"channels": C}`` (1-D), or a full ``{"kind", ...}`` map as models describe theirs."""
    if not isinstance(d, Mapping):
        raise GeometryError(f"sensor must be a map like {{\"width\": W, \"height\": H}}, got "
                            f"{type(d).__name__}")
    kind = d.get("kind") or ("1d" if "channels" in d and "width" not in d else "2d")
    keys = ("channels",) if kind == "1d" else ("width", "height")
    values = {k: d.get(k) for k in keys}
    sizes = {k: int(v) for k, v in values.items() if _is_int(v) and 0 < v <= 0xFFFF}
    if len(sizes) != len(keys):
        raise GeometryError(f"sensor sizes must be integers in 1..65535, got {values}")
    try:
        if kind == "1d":
            return SensorSpec.one_d(sizes["channels"])
        return SensorSpec.two_d(sizes["width"], sizes["height"])
    except ValueError as exc:
        raise GeometryError(f"sensor {dict(d)}: {exc}") from None


@dataclass(frozen=True)
class Axis:
    """The exact map of one axis: ``u -> (offset + (2u + 1) * n) // (2d)``, with crop start ``lo``,
    crop size ``size`` and a flip."""

    lo: int
    size: int
    flip: bool
    n: int
    d: int
    offset: int

    @classmethod
    def make(cls, lo: int, size: int, flip: bool, target: int, n: int, d: int) -> Axis:
        """An axis of a crop of ``size`` onto ``target`` cells at scale ``n/d``, centred."""
        return cls(lo, size, flip, n, d, target * d - size * n)

    def map(self, values: np.ndarray) -> np.ndarray:
        """Source coordinates (inside the crop) [N] -> model coordinates int64 [N]."""
        u = values.astype(np.int64) - self.lo
        if self.flip:
            u = (self.size - 1) - u
        return (self.offset + (2 * u + 1) * self.n) // (2 * self.d)

    def inside(self, values: np.ndarray) -> np.ndarray:
        v = values.astype(np.int64)
        return (v >= self.lo) & (v < self.lo + self.size)


@dataclass(frozen=True)
class Adapter:
    """Maps events of ``source`` onto ``target`` by ``transform`` (see the module docstring)."""

    source: SensorSpec
    target: SensorSpec
    transform: Transform
    ax: Axis
    ay: Axis | None  # None for 1-D sensors

    @property
    def crops(self) -> bool:
        """Whether some source addresses fall outside the crop (events can be removed)."""
        c = self.transform.crop
        if c is None:
            return False
        if self.source.kind == "1d":
            return (c.x, c.width) != (0, self.source.channels)
        return (c.x, c.y, c.width, c.height) != (0, 0, self.source.width, self.source.height)

    def check_source(self, x: np.ndarray, y: np.ndarray | None, p: np.ndarray | None) -> None:
        """Raise ``EventError("address_out_of_range")`` for addresses outside the source sensor
        (the declared one), before any mapping."""
        try:
            tokenize(self.source, x, y, p)  # the model's own range checks, on the source
        except EventError as e:
            raise EventError(e.code, f"{e.message} (the declared source sensor, "
                                     f"{_describe(self.source)})") from None

    def apply(self, x: np.ndarray, y: np.ndarray | None, p: np.ndarray | None
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """Map validated source addresses [N] -> ``(x', y', p', keep)``: the kept events'
        model addresses (uint16 x, y; p as given) and ``keep`` bool [N] (None: every event kept).
        """
        keep = None
        if self.crops:
            keep = self.ax.inside(x)
            if self.ay is not None and y is not None:
                keep &= self.ay.inside(y)
            x = x[keep]
            y = None if y is None else y[keep]
            p = None if p is None else p[keep]
        mx = self.ax.map(x).astype(np.uint16)
        my = None if self.ay is None or y is None else self.ay.map(y).astype(np.uint16)
        return mx, my, p, keep

    def describe(self) -> dict[str, Any]:
        """The resolved mapping, as plain data (echoed to clients)."""
        out: dict[str, Any] = {"sensor": self.source.to_dict(), "transform": self.transform.to_dict(),
                               "scale_x": self.ax.n / self.ax.d,
                               "offset_x": self.ax.offset / (2 * self.ax.d)}
        if self.ay is not None:  # x' = floor(offset_x + (u + 1/2) * scale_x), likewise y'
            out["scale_y"] = self.ay.n / self.ay.d
            out["offset_y"] = self.ay.offset / (2 * self.ay.d)
        return out


def build_adapter(source: SensorSpec, target: SensorSpec, transform: Transform | None = None
                  ) -> Adapter:
    """The adapter from ``source`` to ``target``; raises :class:`GeometryError` when the two are
    of different kinds or the crop leaves the source sensor."""
    transform = transform or Transform()
    if source.kind != target.kind:
        raise GeometryError(f"a {source.kind.upper()} source ({_describe(source)}) cannot be "
                            f"mapped onto the model's {target.kind.upper()} sensor "
                            f"({_describe(target)}): channels and pixels do not correspond")
    crop = transform.crop
    if source.kind == "1d":
        cx, cw = (0, source.channels) if crop is None else (crop.x, crop.width)
        if cx + cw > source.channels:
            raise GeometryError(f"transform.crop channels {cx}..{cx + cw - 1} leave the source's "
                                f"{source.channels} channels")
        return Adapter(source, target, transform,
                       Axis.make(cx, cw, transform.flip_x, target.channels, target.channels, cw),
                       None)
    cx, cy, cw, ch = ((0, 0, source.width, source.height) if crop is None
                      else (crop.x, crop.y, crop.width, crop.height))
    if cx + cw > source.width or cy + ch > source.height:
        raise GeometryError(f"transform.crop [{cx}, {cy}, {cw}, {ch}] leaves the "
                            f"{source.width}x{source.height} source sensor")
    w, h = target.width, target.height
    if transform.scale == "stretch":
        (nx, dx), (ny, dy) = (w, cw), (h, ch)
    else:  # fit: the smaller of w/cw and h/ch, for both axes
        nx, dx = (w, cw) if w * ch <= h * cw else (h, ch)
        ny, dy = nx, dx
    return Adapter(source, target, transform,
                   Axis.make(cx, cw, transform.flip_x, w, nx, dx),
                   Axis.make(cy, ch, transform.flip_y, h, ny, dy))


def adapter_for(target: SensorSpec, sensor: Any = None, transform: Any = None) -> Adapter | None:
    """The adapter a declaration asks for (``sensor``/``transform`` as the wire's maps, or None).

    None when nothing needs mapping: no declaration, or a declared sensor equal to the model's
    and no transform. A differing sensor without a transform gets the default (fit, centred).
    """
    if sensor is None and transform is None:
        return None
    source = target if sensor is None else sensor_from_dict(sensor)
    tf = None if transform is None else Transform.from_dict(transform)
    if source == target and (tf is None or tf == Transform()):
        return None
    return build_adapter(source, target, tf)


def _describe(sensor: SensorSpec) -> str:
    return (f"{sensor.channels} channels" if sensor.kind == "1d"
            else f"{sensor.width}x{sensor.height}")


__all__ = ["Adapter", "Axis", "Crop", "EventError", "GeometryError", "SCALES", "Transform",
           "adapter_for", "build_adapter", "sensor_from_dict"]
