"""Training-time augmentations of event recordings (NumPy; docs/architecture.md, "Training").

Every function takes a :class:`Recording` and returns a new, valid one: ``t`` int64, sorted, >= 0
when the input's was; addresses inside the sensor (events a geometric transform moves off the
sensor are dropped, never clipped onto the border); column dtypes kept. Randomness comes only from
the ``rng`` argument.

:func:`augment` applies the per-sample transforms of an :class:`AugmentConfig`, each with its
probability, in a fixed order: crop, time skew, drop chunk, drop events, address jitter, scale,
rotate, roll, time jitter, noise. :func:`cut_mix` mixes two samples (the trainer calls it, since it
needs a second sample and mixes the labels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..events import Recording, SensorSpec


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (``*_p``, per recording) and strengths. All off by default: see :meth:`default`.

    - ``crop_max_events``: a random contiguous window of at most this many events (always applied
      to longer recordings; None = no crop).
    - ``time_skew_max`` (>= 1): timestamps scaled about the first event by a factor drawn
      log-uniformly in ``[1/max, max]``.
    - ``drop_chunk_max``: a contiguous run of up to this fraction of the events is removed.
    - ``drop_event_max``: each event is removed with a probability drawn in ``[0, max]``.
    - ``jitter_std``: per-event Gaussian address jitter, channels (1-D) or pixels in x and y (2-D).
    - ``scale_max``: 2-D, positions scaled about the centre by a factor in ``[1-max, 1+max]``.
    - ``rotate_max_deg``: 2-D, rotation about the centre by an angle in ``[-max, max]`` degrees.
    - ``roll_max``: shift by an integer in ``[-max, max]`` per axis, as a fraction of the sensor
      size; ``roll_wrap`` wraps around the border instead of dropping.
    - ``time_jitter_std_us``: per-event Gaussian timestamp jitter (re-sorted, kept >= 0).
    - ``noise_max``: uniform noise events, up to this fraction of the recording's event count.
    - ``cut_mix_p`` / ``cut_mix_max``: read by the trainer for :func:`cut_mix` (window fraction).
    """

    crop_max_events: int | None = None
    time_skew_p: float = 0.0
    time_skew_max: float = 1.2
    drop_chunk_p: float = 0.0
    drop_chunk_max: float = 0.1
    drop_event_p: float = 0.0
    drop_event_max: float = 0.1
    jitter_p: float = 0.0
    jitter_std: float = 1.0
    scale_p: float = 0.0
    scale_max: float = 0.15
    rotate_p: float = 0.0
    rotate_max_deg: float = 15.0
    roll_p: float = 0.0
    roll_max: float = 0.1
    roll_wrap: bool = False
    time_jitter_p: float = 0.0
    time_jitter_std_us: float = 100.0
    noise_p: float = 0.0
    noise_max: float = 0.05
    cut_mix_p: float = 0.0
    cut_mix_max: float = 0.3

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("_p") and not 0.0 <= v <= 1.0:
                raise ValueError(f"augment: {f.name} is a probability, got {v}")
        if self.time_skew_max < 1.0:
            raise ValueError(f"augment: time_skew_max must be >= 1, got {self.time_skew_max}")
        for name in ("drop_chunk_max", "drop_event_max", "cut_mix_max", "scale_max"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"augment: {name} must be in [0, 1), got {getattr(self, name)}")
        if self.crop_max_events is not None and self.crop_max_events < 1:
            raise ValueError("augment: crop_max_events must be >= 1 or None")

    @classmethod
    def default(cls, sensor: SensorSpec | str, **overrides: Any) -> AugmentConfig:
        """Sane defaults for a sensor kind ("1d" audio cochleas, "2d" event cameras)."""
        kind = sensor if isinstance(sensor, str) else sensor.kind
        base: dict[str, Any]
        if kind == "1d":
            base = dict(time_skew_p=0.5, drop_chunk_p=0.3, drop_event_p=0.5, jitter_p=0.5, jitter_std=1.0,
                        time_jitter_p=0.3, noise_p=0.3, cut_mix_p=0.5)
        elif kind == "2d":
            base = dict(time_skew_p=0.5, drop_chunk_p=0.3, drop_event_p=0.5, jitter_p=0.3, jitter_std=0.5,
                        scale_p=0.5, rotate_p=0.5, roll_p=0.5, time_jitter_p=0.3, noise_p=0.3, cut_mix_p=0.5)
        else:
            raise ValueError(f"sensor kind must be '1d' or '2d', got {kind!r}")
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], sensor: SensorSpec | str | None = None) -> AugmentConfig:
        """From a config mapping; starts from :meth:`default` for ``sensor`` when given."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"augment: unknown keys {unknown}; known: {sorted(known)}")
        return cls.default(sensor, **d) if sensor is not None else cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# helpers


def _select(rec: Recording, keep: np.ndarray) -> Recording:
    """Events where ``keep`` (bool [N] or index array) holds, order kept."""
    cut = lambda a: None if a is None else a[keep]  # noqa: E731
    return Recording(rec.t[keep], rec.x[keep], cut(rec.y), cut(rec.p))


def _sorted(t: np.ndarray, x: np.ndarray, y: np.ndarray | None, p: np.ndarray | None) -> Recording:
    order = np.argsort(t, kind="stable")
    cut = lambda a: None if a is None else a[order]  # noqa: E731
    return Recording(t[order], x[order], cut(y), cut(p))


def _concat(a: Recording, b: Recording) -> Recording:
    """Merge two recordings by time (stable: on equal times a's events come first)."""
    cat = lambda u, v: None if u is None or v is None else np.concatenate([u, v.astype(u.dtype)])  # noqa: E731
    return _sorted(np.concatenate([a.t, b.t.astype(a.t.dtype)]), np.concatenate([a.x, b.x.astype(a.x.dtype)]),
                   cat(a.y, b.y), cat(a.p, b.p))


def _move(rec: Recording, sensor: SensorSpec, x: np.ndarray, y: np.ndarray | None) -> Recording:
    """New addresses (float or int, rounded); events landing off the sensor are dropped."""
    xi = np.rint(x).astype(np.int64)
    if sensor.kind == "1d":
        keep = (xi >= 0) & (xi < sensor.channels)
        return Recording(rec.t[keep], xi[keep].astype(rec.x.dtype))
    assert y is not None and rec.y is not None and rec.p is not None
    yi = np.rint(y).astype(np.int64)
    keep = (xi >= 0) & (xi < sensor.width) & (yi >= 0) & (yi < sensor.height)
    return Recording(rec.t[keep], xi[keep].astype(rec.x.dtype), yi[keep].astype(rec.y.dtype), rec.p[keep])


def _need_2d(sensor: SensorSpec, what: str) -> None:
    if sensor.kind != "2d":
        raise ValueError(f"{what} needs a 2-D sensor")


def _rows(rec: Recording, what: str) -> np.ndarray:
    """The recording's ``y`` column, which a 2-D transform needs."""
    if rec.y is None:
        raise ValueError(f"{what} needs 2-D events (a y column)")
    return rec.y


# ---------------------------------------------------------------------------------------------
# transforms


def crop(rec: Recording, rng: np.random.Generator, max_events: int) -> Recording:
    """A random contiguous window of ``max_events`` events (the recording itself if shorter)."""
    n = len(rec)
    if n <= max_events:
        return rec
    start = int(rng.integers(0, n - max_events + 1))
    return rec.slice(start, start + max_events)


def time_skew(rec: Recording, factor: float) -> Recording:
    """Stretch (``factor`` > 1) or compress time about the first event; order is kept."""
    if len(rec) == 0:
        return rec
    t0 = rec.t[0]
    t = t0 + np.rint((rec.t - t0).astype(np.float64) * factor).astype(np.int64)
    return Recording(t, rec.x, rec.y, rec.p)


def drop_chunk(rec: Recording, rng: np.random.Generator, fraction: float) -> Recording:
    """Remove a random contiguous run of ``round(fraction * N)`` events."""
    n = len(rec)
    k = int(round(fraction * n))
    if k <= 0:
        return rec
    start = int(rng.integers(0, n - k + 1))
    keep = np.ones(n, bool)
    keep[start:start + k] = False
    return _select(rec, keep)


def drop_events(rec: Recording, rng: np.random.Generator, fraction: float) -> Recording:
    """Remove each event independently with probability ``fraction``."""
    return _select(rec, rng.random(len(rec)) >= fraction)


def jitter_addresses(rec: Recording, sensor: SensorSpec, rng: np.random.Generator, std: float) -> Recording:
    """Per-event Gaussian jitter of the channel (1-D) or of x and y (2-D), rounded; off-sensor dropped."""
    x = rec.x + std * rng.standard_normal(len(rec))
    y = None if sensor.kind == "1d" else _rows(rec, "jitter") + std * rng.standard_normal(len(rec))
    return _move(rec, sensor, x, y)


def roll(rec: Recording, sensor: SensorSpec, dx: int, dy: int = 0, *, wrap: bool = False) -> Recording:
    """Shift every address by ``(dx, dy)`` (1-D: ``dx`` channels); wrap around or drop off-sensor."""
    x = rec.x.astype(np.int64) + dx
    if sensor.kind == "1d":
        return _move(rec, sensor, x % sensor.channels if wrap else x, None)
    y = _rows(rec, "roll").astype(np.int64) + dy
    if wrap:
        x, y = x % sensor.width, y % sensor.height
    return _move(rec, sensor, x, y)


def rotate(rec: Recording, sensor: SensorSpec, angle_deg: float) -> Recording:
    """Rotate 2-D positions about the sensor centre by ``angle_deg``; off-sensor events dropped."""
    _need_2d(sensor, "rotate")
    a = np.deg2rad(angle_deg)
    cx, cy = (sensor.width - 1) / 2, (sensor.height - 1) / 2
    u, v = rec.x - cx, _rows(rec, "rotate") - cy
    return _move(rec, sensor, cx + np.cos(a) * u - np.sin(a) * v, cy + np.sin(a) * u + np.cos(a) * v)


def scale(rec: Recording, sensor: SensorSpec, factor: float) -> Recording:
    """Scale 2-D positions about the sensor centre by ``factor``; off-sensor events dropped."""
    _need_2d(sensor, "scale")
    cx, cy = (sensor.width - 1) / 2, (sensor.height - 1) / 2
    return _move(rec, sensor, cx + factor * (rec.x - cx), cy + factor * (_rows(rec, "scale") - cy))


def time_jitter(rec: Recording, rng: np.random.Generator, std_us: float) -> Recording:
    """Per-event Gaussian timestamp jitter, rounded to us, kept >= 0, then re-sorted (stable)."""
    if len(rec) == 0:
        return rec
    t = rec.t + np.rint(std_us * rng.standard_normal(len(rec))).astype(np.int64)
    if rec.t.min() >= 0:
        t = np.maximum(t, 0)
    return _sorted(t, rec.x, rec.y, rec.p)


def add_noise(rec: Recording, sensor: SensorSpec, rng: np.random.Generator, count: int) -> Recording:
    """Merge ``count`` events uniform in time (over the recording's span) and address."""
    if count <= 0 or len(rec) == 0:
        return rec
    t = rng.integers(rec.t[0], rec.t[-1] + 1, count, dtype=np.int64)
    if sensor.kind == "1d":
        noise = Recording(t, rng.integers(0, sensor.channels, count).astype(rec.x.dtype))
    else:
        noise = Recording(t, rng.integers(0, sensor.width, count).astype(rec.x.dtype),
                          rng.integers(0, sensor.height, count).astype(rec.y.dtype),  # type: ignore[union-attr]
                          rng.integers(0, 2, count).astype(rec.p.dtype))  # type: ignore[union-attr]
    return _concat(rec, noise)


def cut_mix(a: Recording, b: Recording, rng: np.random.Generator, max_fraction: float = 0.3,
            ) -> tuple[Recording, float]:
    """Replace a random time window of ``a`` with the same window of ``b``.

    Times are taken relative to each recording's first event; the window covers a fraction drawn
    in ``[0, max_fraction]`` of ``a``'s duration. Returns ``(mixed, lam)`` with ``lam`` the fraction
    of the mixed recording's events that came from ``b``: the target is
    ``(1 - lam) * onehot(label_a) + lam * onehot(label_b)``.
    """
    if len(a) == 0 or len(b) == 0:
        return a, 0.0
    dur = int(a.t[-1] - a.t[0])
    width = int(round(rng.uniform(0.0, max_fraction) * dur))
    start = int(rng.integers(0, dur - width + 1))
    ra, rb = a.t - a.t[0], b.t - b.t[0]
    keep_a = (ra < start) | (ra >= start + width)
    take_b = (rb >= start) & (rb < start + width)
    part_b = _select(b, take_b)
    part_b = Recording(part_b.t - b.t[0] + a.t[0], part_b.x, part_b.y, part_b.p)
    mixed = _concat(_select(a, keep_a), part_b)
    return mixed, (len(part_b) / len(mixed) if len(mixed) else 0.0)


# ---------------------------------------------------------------------------------------------
# entry point


def augment(rec: Recording, sensor: SensorSpec, rng: np.random.Generator, cfg: AugmentConfig) -> Recording:
    """Apply ``cfg``'s per-sample transforms, each with its probability (order in module docstring)."""
    on = lambda p: p > 0 and rng.random() < p  # noqa: E731
    if cfg.crop_max_events is not None:
        rec = crop(rec, rng, cfg.crop_max_events)
    if on(cfg.time_skew_p):
        rec = time_skew(rec, float(np.exp(rng.uniform(-1, 1) * np.log(cfg.time_skew_max))))
    if on(cfg.drop_chunk_p):
        rec = drop_chunk(rec, rng, rng.uniform(0, cfg.drop_chunk_max))
    if on(cfg.drop_event_p):
        rec = drop_events(rec, rng, rng.uniform(0, cfg.drop_event_max))
    if on(cfg.jitter_p):
        rec = jitter_addresses(rec, sensor, rng, cfg.jitter_std)
    if sensor.kind == "2d":
        if on(cfg.scale_p):
            rec = scale(rec, sensor, 1 + rng.uniform(-cfg.scale_max, cfg.scale_max))
        if on(cfg.rotate_p):
            rec = rotate(rec, sensor, rng.uniform(-cfg.rotate_max_deg, cfg.rotate_max_deg))
    if on(cfg.roll_p):
        if sensor.kind == "1d":
            m = int(round(cfg.roll_max * sensor.channels))
            rec = roll(rec, sensor, int(rng.integers(-m, m + 1)), wrap=cfg.roll_wrap)
        else:
            mx, my = int(round(cfg.roll_max * sensor.width)), int(round(cfg.roll_max * sensor.height))
            rec = roll(rec, sensor, int(rng.integers(-mx, mx + 1)), int(rng.integers(-my, my + 1)),
                       wrap=cfg.roll_wrap)
    if on(cfg.time_jitter_p):
        rec = time_jitter(rec, rng, cfg.time_jitter_std_us)
    if on(cfg.noise_p):
        rec = add_noise(rec, sensor, rng, int(round(rng.uniform(0, cfg.noise_max) * len(rec))))
    return rec
