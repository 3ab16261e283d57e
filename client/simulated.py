"""A simulated sensor: labelled event streams at a chosen rate, for tests, demos and load tests
(``sim:rate=R,duration=S,label=K,...`` sources)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from evssm.models.events import Recording, SensorSpec

from .errors import SourceError
from .pairs import name_numbers
from .sample import Sample


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
        leading = np.asarray(dx * math.cos(angle) + dy * math.sin(angle) > 0)
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
    _, _, body = spec.partition(":")
    try:
        return {**SIM_DEFAULTS, **name_numbers(body, SIM_DEFAULTS)}
    except ValueError as exc:
        raise SourceError(f"bad sim setting: {exc}") from None
