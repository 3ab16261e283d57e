"""Prometheus metrics and the small rolling statistics behind ``GET /v1/stats`` and
``GET /v1/stats/history`` (no JAX).

Each app instance owns a fresh ``CollectorRegistry`` so several apps can live in one process
(tests). Names and labels are a contract with the dashboard; ``docs/metrics.md`` documents them.

The streaming path records once per step, not once per packet: :class:`ModelMetrics` holds each
model's labelled children (looked up once), and the per-packet histograms
(:class:`BatchHistogram`) take a step's values as one array, with exact bucket counts.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .cpu import CpuAccount

# Latency buckets: 0.25 ms .. 10 s, roughly x2 apart.
LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128,
                   0.256, 0.512, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STATS_WINDOW_S = 10.0
# The live page's recent past: one /v1/stats summary per HISTORY_INTERVAL_S over HISTORY_S.
HISTORY_INTERVAL_S = 1.0
HISTORY_S = 15 * 60

CONTENT_TYPE = CONTENT_TYPE_LATEST


class BatchHistogram(Collector):
    """A histogram with one label (``model``) that takes many observations at once.

    ``observe_many(label, values)`` adds a whole step's values (float64 [N]) with one
    ``searchsorted`` and ``bincount``: exact bucket counts, sum and count, as observing each value
    would give, for a cost that does not grow per packet in Python. Exposed as an ordinary
    Prometheus histogram.
    """

    def __init__(self, name: str, documentation: str, label: str, buckets: tuple[float, ...],
                 registry: CollectorRegistry):
        self.name, self.documentation, self.label = name, documentation, label
        self.bounds = np.asarray(buckets, np.float64)
        self._lock = threading.Lock()
        self._series: dict[str, list] = {}  # label -> [counts int64 [len(bounds) + 1], sum]
        registry.register(self)

    def init(self, value: str) -> None:
        with self._lock:
            self._series.setdefault(value, [np.zeros(len(self.bounds) + 1, np.int64), 0.0])

    def observe_many(self, value: str, values: np.ndarray) -> None:
        if values.size == 0:
            return
        # Bucket i counts values <= bounds[i] (le), the last one the rest (+Inf).
        index = np.searchsorted(self.bounds, values, side="left")
        add = np.bincount(index, minlength=len(self.bounds) + 1)
        total = float(values.sum())
        with self._lock:
            series = self._series.setdefault(value, [np.zeros(len(self.bounds) + 1, np.int64), 0.0])
            series[0] += add
            series[1] += total

    def collect(self) -> list[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            series = [(k, counts.copy(), total) for k, (counts, total) in self._series.items()]
        for value, counts, total in series:
            cumulative = np.cumsum(counts)
            buckets = [(_le(b), float(c)) for b, c in zip(self.bounds, cumulative[:-1], strict=True)]
            buckets.append(("+Inf", float(cumulative[-1])))
            family.add_metric([value], buckets, total)
        return [family]

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=[self.label])]


def _le(bound: float) -> str:
    return repr(float(bound))


class _Window:
    """Events and packet latencies of the last ``STATS_WINDOW_S`` seconds, for one model, kept
    as one entry per step: (time, events, latencies float64 [packets])."""

    def __init__(self, maxlen: int = 100_000):
        self.steps: deque[tuple[float, int, np.ndarray]] = deque(maxlen=maxlen)

    def add(self, now: float, events: int, latencies: np.ndarray) -> None:
        self.steps.append((now, events, latencies))
        self._prune(now)  # here too: without /v1/stats polls the window would fill to maxlen

    def _prune(self, now: float) -> None:
        while self.steps and self.steps[0][0] < now - STATS_WINDOW_S:
            self.steps.popleft()

    def latencies(self) -> np.ndarray:
        return np.concatenate([s[2] for s in self.steps]) if self.steps else np.zeros(0)

    def summary(self, now: float) -> dict[str, float | None]:
        self._prune(now)
        lat = self.latencies()
        if not lat.size:
            return {"events_per_s": 0.0, "packets_per_s": 0.0, "latency_p50_ms": None, "latency_p99_ms": None}
        events = sum(s[1] for s in self.steps)
        p50, p99 = np.percentile(lat, [50, 99]) * 1e3
        return {
            "events_per_s": events / STATS_WINDOW_S,
            "packets_per_s": lat.size / STATS_WINDOW_S,
            "latency_p50_ms": round(float(p50), 3),
            "latency_p99_ms": round(float(p99), 3),
        }


class ModelMetrics:
    """One model's labelled children, looked up once (a ``labels()`` call costs a lock and a
    dict lookup; the streaming path records a step's figures through these)."""

    def __init__(self, metrics: Metrics, model: str):
        self.model = model
        self.metrics = metrics
        self.events = metrics.events.labels(model=model)
        self.packets = metrics.packets.labels(model=model)
        self.steps = metrics.steps.labels(model=model)
        self.step_latency = metrics.step_latency.labels(model=model)
        self.batch_size = metrics.batch_size.labels(model=model)
        self.coalesced = metrics.coalesced.labels(model=model)
        self.steps_run = 0  # the same counts as plain ints, for /v1/stats
        self.chunks_coalesced = 0
        self.sessions_active = metrics.sessions_active.labels(model=model)
        self.slots_used = metrics.slots_used.labels(model=model)

    def session_live(self, slots: int) -> None:
        """A session became live (opened or restored) holding ``slots`` rows (a window's lanes)."""
        self.sessions_active.inc()
        self.slots_used.inc(slots)

    def session_gone(self, slots: int) -> None:
        """A live session holding ``slots`` rows was freed."""
        self.sessions_active.dec()
        self.slots_used.dec(slots)

    def step(self, seconds: float, batch: int, coalesced: int, queue_waits: np.ndarray) -> None:
        """One engine step over ``batch`` sessions' rows, ``coalesced`` more chunks of theirs
        joining them; ``queue_waits`` of the packets it started."""
        self.steps.inc()
        self.steps_run += 1
        self.step_latency.observe(seconds)
        self.batch_size.observe(batch)
        if coalesced:
            self.coalesced.inc(coalesced)
            self.chunks_coalesced += coalesced
        self.metrics.queue_wait.observe_many(self.model, queue_waits)

    def packets_done(self, events: int, latencies: np.ndarray) -> None:
        """A step's answered packets: ``events`` in all, ``latencies`` float64 [packets] (frame
        received to result sent, seconds)."""
        n = int(latencies.size)
        if not n:
            return
        self.packets.inc(n)
        self.events.inc(events)
        self.metrics.packet_latency.observe_many(self.model, latencies)
        self.metrics.window(self.model, time.monotonic(), events, latencies)


class Metrics:
    """All metrics of one server instance (``evssm_`` prefix)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        m = ["model"]
        self.events = Counter("evssm_events_total", "Events processed (streamed and classified).", m, registry=r)
        self.packets = Counter("evssm_packets_total", "Stream packets answered with a result.", m, registry=r)
        self.sessions_active = Gauge("evssm_sessions_active", "Live streaming sessions.", m, registry=r)
        self.packet_latency = BatchHistogram(
            "evssm_packet_latency_seconds", "Packet latency, frame received to result sent.", "model",
            LATENCY_BUCKETS, r)
        self.step_latency = Histogram(
            "evssm_step_latency_seconds", "Engine step latency (one jitted step over a batch).", m,
            buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("evssm_batch_size", "Sessions per engine step.", m,
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_wait = BatchHistogram(
            "evssm_queue_wait_seconds", "Time a validated packet waits before its first step.", "model",
            LATENCY_BUCKETS, r)
        self.rejected = Counter("evssm_rejected_packets_total", "Frames rejected with an error, by code.",
                                ["code"], registry=r)
        self.http_requests = Counter("evssm_http_requests_total", "HTTP requests by route and status.",
                                     ["route", "status"], registry=r)
        self.compilations = Counter("evssm_compilations_total", "XLA compilations (start-up and after).", m,
                                    registry=r)
        # Beyond the dashboard's contract.
        self.sessions_opened = Counter("evssm_sessions_opened_total", "Sessions opened.", m, registry=r)
        self.sessions_resumed = Counter("evssm_sessions_resumed_total", "Sessions re-attached by resume token.",
                                        m, registry=r)
        self.sessions_evicted = Counter("evssm_sessions_evicted_total", "Sessions evicted after the idle timeout.",
                                        m, registry=r)
        self.steps = Counter("evssm_steps_total", "Engine steps run.", m, registry=r)
        self.coalesced = Counter("evssm_coalesced_chunks_total",
                                 "Packet chunks stepped in the row of an earlier packet of their session "
                                 "in the same engine step (a readout after each; native step).", m,
                                 registry=r)
        self.queue_depth = Gauge("evssm_queue_depth", "Packets accepted and not yet answered.", m, registry=r)
        self.classify_streams = Counter("evssm_classify_streams_total", "Recordings classified over HTTP.", m,
                                        registry=r)
        self.state_bytes = Gauge("evssm_state_bytes_per_session", "Bytes of carried state per session.", m,
                                 registry=r)
        self.slots = Gauge("evssm_slots", "Session slots allocated on the device.", m, registry=r)
        self.slots_used = Gauge("evssm_slots_used", "Session slots held by live sessions (a sliding "
                                "window's session holds one per lane).", m, registry=r)
        self.non_finite = Counter("evssm_non_finite_outputs_total",
                                  "Answers withheld because the model's output was NaN or infinite "
                                  "(streamed packets and classified recordings).", m, registry=r)
        self.cropped = Counter("evssm_cropped_events_total",
                               "Events a declared crop removed before the model (streamed and classified).",
                               m, registry=r)
        self.filtered = Counter("evssm_filtered_events_total",
                                "Events the declared input filters removed before the model, by filter "
                                "(refractory, denoise, max_rate; streamed and classified).",
                                ["model", "filter"], registry=r)
        # Realtime sessions (open with realtime: true; server/api/live.py).
        self.session_lag = BatchHistogram(
            "evssm_session_lag_seconds", "How far a realtime session's answers trail its sensor's clock "
            "(answer sent - (newest event time + clock offset)), one observation per answer.", "model",
            LATENCY_BUCKETS, r)
        self.dropped_packets = Counter("evssm_dropped_packets_total",
                                       'Packets of realtime sessions dropped unstepped (overload "drop").', m,
                                       registry=r)
        self.dropped_events = Counter("evssm_dropped_events_total",
                                      'Events of realtime sessions dropped unstepped (overload "drop").', m,
                                      registry=r)
        self.ready = Gauge("evssm_ready", "1 when every model can stream (classify compiles after).", registry=r)
        # Session snapshots (--state-dir / --state-store).
        self.snapshots_written = Counter("evssm_snapshots_written_total", "Session snapshots written.", m,
                                         registry=r)
        self.snapshot_write_seconds = Histogram(
            "evssm_snapshot_write_seconds", "Time to encode and write one batch of snapshots (writer thread).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.sessions_restored = Counter("evssm_sessions_restored_total",
                                         "Sessions restored from a snapshot by resume token.", m, registry=r)
        self.snapshot_failures = Counter(
            "evssm_snapshot_failures_total", "Snapshots not written or not restored, by reason "
            "(store_error, corrupt, incompatible, taken_over).", ["reason"], registry=r)
        # evssm_process_resident_memory_bytes, _cpu_seconds_total, _open_fds, ... (Linux): what a
        # soak or an alert watches for growth.
        ProcessCollector(namespace="evssm", registry=r)
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}
        self._events_by_model: dict[str, int] = {}
        self._packets_by_model: dict[str, int] = {}
        self._streamed_events = 0  # events of answered packets, every model
        self.cpu: CpuAccount | None = None
        self.models: dict[str, ModelMetrics] = {}
        self._history: deque[dict] = deque(maxlen=int(HISTORY_S / HISTORY_INTERVAL_S))

    def init_model(self, model: str, state_bytes: int, slots: int) -> ModelMetrics:
        """Create the labelled series of a model so they show as 0 before traffic; returns its
        cached children."""
        for metric in (self.events, self.packets, self.compilations, self.sessions_opened, self.cropped,
                       self.sessions_resumed, self.sessions_evicted, self.steps, self.coalesced,
                       self.classify_streams,
                       self.non_finite, self.step_latency, self.batch_size, self.snapshots_written,
                       self.sessions_restored, self.dropped_packets, self.dropped_events):
            metric.labels(model=model)
        self.packet_latency.init(model)
        self.session_lag.init(model)
        self.queue_wait.init(model)
        self.sessions_active.labels(model=model).set(0)
        self.slots_used.labels(model=model).set(0)
        self.queue_depth.labels(model=model).set(0)
        self.state_bytes.labels(model=model).set(state_bytes)
        self.slots.labels(model=model).set(slots)
        with self._lock:
            self._windows.setdefault(model, _Window())
            self._events_by_model.setdefault(model, 0)
            self._packets_by_model.setdefault(model, 0)
        return self.model(model)

    def count_filtered(self, model: str, counts: dict[str, int]) -> None:
        """Events each input filter removed (a ``filtered`` map of a result or classify stream)."""
        for name, n in counts.items():
            if n:
                self.filtered.labels(model=model, filter=name).inc(n)

    def model(self, model: str) -> ModelMetrics:
        """``model``'s cached children (made on first use)."""
        children = self.models.get(model)
        if children is None:
            children = self.models[model] = ModelMetrics(self, model)
        return children

    def window(self, model: str, now: float, events: int, latencies: np.ndarray) -> None:
        """A step's answered packets into the ``/v1/stats`` window and totals."""
        with self._lock:
            self._windows.setdefault(model, _Window()).add(now, events, latencies)
            self._events_by_model[model] = self._events_by_model.get(model, 0) + events
            self._packets_by_model[model] = self._packets_by_model.get(model, 0) + int(latencies.size)
            self._streamed_events += events

    def account_cpu(self, cpu: CpuAccount) -> None:
        """Report ``cpu`` in ``/v1/stats`` (per event streamed) and as ``evssm_cpu_seconds_total``."""
        self.cpu = cpu
        cpu.register(self.registry)

    def classified(self, model: str, streams: int, events: int) -> None:
        self.classify_streams.labels(model=model).inc(streams)
        self.events.labels(model=model).inc(events)
        with self._lock:
            self._events_by_model[model] = self._events_by_model.get(model, 0) + events

    def stats(self, sessions_active: dict[str, int]) -> dict:
        """The ``/v1/stats`` body: totals and last-10-s rates and latencies, overall and per model."""
        now = time.monotonic()
        with self._lock:
            per_model = {}
            for name, window in self._windows.items():
                per_model[name] = {
                    "events_total": self._events_by_model.get(name, 0),
                    "packets_total": self._packets_by_model.get(name, 0),
                    "sessions_active": sessions_active.get(name, 0),
                    "steps_total": self.models[name].steps_run if name in self.models else 0,
                    "coalesced_total": self.models[name].chunks_coalesced if name in self.models else 0,
                    **window.summary(now),
                }
            # Pooled latency percentiles need the raw samples of every model.
            lat = np.concatenate([w.latencies() for w in self._windows.values()] or [np.zeros(0)])
            streamed = self._streamed_events
        p50 = p99 = None
        if lat.size:
            p50, p99 = (round(float(v), 3) for v in np.percentile(lat, [50, 99]) * 1e3)
        return {
            "time": time.time(),
            "window_s": STATS_WINDOW_S,
            "events_total": sum(m["events_total"] for m in per_model.values()),
            "packets_total": sum(m["packets_total"] for m in per_model.values()),
            "sessions_active": sum(sessions_active.values()),
            "events_per_s": sum(m["events_per_s"] for m in per_model.values()),
            "latency_p50_ms": p50,
            "latency_p99_ms": p99,
            "models": per_model,
            "cpu": None if self.cpu is None else self.cpu.report(streamed),
        }

    def record_history(self, sessions_active: dict[str, int]) -> None:
        """Keep the current :meth:`stats` as the newest sample of the history (the oldest one
        leaves once ``HISTORY_S`` is covered). Called once per ``HISTORY_INTERVAL_S``."""
        sample = self.stats(sessions_active)
        with self._lock:
            self._history.append(sample)

    def history(self) -> dict:
        """The ``/v1/stats/history`` body: the recorded samples, oldest first."""
        with self._lock:
            samples = list(self._history)
        return {"interval_s": HISTORY_INTERVAL_S, "window_s": HISTORY_S, "samples": samples}

    def render(self) -> bytes:
        return generate_latest(self.registry)
