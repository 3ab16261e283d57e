"""Prometheus metrics and the small rolling statistics behind ``GET /v1/stats`` (no JAX).

Each app instance owns a fresh ``CollectorRegistry`` so several apps can live in one process
(tests). Names and labels are a contract with the dashboard; ``docs/metrics.md`` documents them.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency buckets: 0.25 ms .. 10 s, roughly x2 apart.
LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128,
                   0.256, 0.512, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STATS_WINDOW_S = 10.0

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Window:
    """Events and packet latencies of the last ``STATS_WINDOW_S`` seconds, for one model."""

    def __init__(self, maxlen: int = 200_000):
        self.samples: deque[tuple[float, int, float]] = deque(maxlen=maxlen)  # (time, events, latency)

    def add(self, now: float, events: int, latency: float) -> None:
        self.samples.append((now, events, latency))

    def summary(self, now: float) -> dict[str, float | None]:
        while self.samples and self.samples[0][0] < now - STATS_WINDOW_S:
            self.samples.popleft()
        if not self.samples:
            return {"events_per_s": 0.0, "packets_per_s": 0.0, "latency_p50_ms": None, "latency_p99_ms": None}
        lat = np.fromiter((s[2] for s in self.samples), dtype=np.float64, count=len(self.samples))
        events = sum(s[1] for s in self.samples)
        p50, p99 = np.percentile(lat, [50, 99]) * 1e3
        return {
            "events_per_s": events / STATS_WINDOW_S,
            "packets_per_s": len(self.samples) / STATS_WINDOW_S,
            "latency_p50_ms": round(float(p50), 3),
            "latency_p99_ms": round(float(p99), 3),
        }


class Metrics:
    """All metrics of one server instance (``evssm_`` prefix)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        m = ["model"]
        self.events = Counter("evssm_events_total", "Events processed (streamed and classified).", m, registry=r)
        self.packets = Counter("evssm_packets_total", "Stream packets answered with a result.", m, registry=r)
        self.sessions_active = Gauge("evssm_sessions_active", "Live streaming sessions.", m, registry=r)
        self.packet_latency = Histogram(
            "evssm_packet_latency_seconds", "Packet latency, frame received to result sent.", m,
            buckets=LATENCY_BUCKETS, registry=r)
        self.step_latency = Histogram(
            "evssm_step_latency_seconds", "Engine step latency (one jitted step over a batch).", m,
            buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("evssm_batch_size", "Sessions per engine step.", m,
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "evssm_queue_wait_seconds", "Time a validated packet waits before its first step.", m,
            buckets=LATENCY_BUCKETS, registry=r)
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
        self.queue_depth = Gauge("evssm_queue_depth", "Packets accepted and not yet answered.", m, registry=r)
        self.classify_streams = Counter("evssm_classify_streams_total", "Recordings classified over HTTP.", m,
                                        registry=r)
        self.state_bytes = Gauge("evssm_state_bytes_per_session", "Bytes of carried state per session.", m,
                                 registry=r)
        self.slots = Gauge("evssm_slots", "Session slots allocated on the device.", m, registry=r)
        self.cropped = Counter("evssm_cropped_events_total",
                               "Events a declared crop removed before the model (streamed and classified).",
                               m, registry=r)
        self.ready = Gauge("evssm_ready", "1 when every model is loaded and every bucket compiled.", registry=r)
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
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}
        self._events_by_model: dict[str, int] = {}
        self._packets_by_model: dict[str, int] = {}

    def init_model(self, model: str, state_bytes: int, slots: int) -> None:
        """Create the labelled series of a model so they show as 0 before traffic."""
        for metric in (self.events, self.packets, self.compilations, self.sessions_opened, self.cropped,
                       self.sessions_resumed, self.sessions_evicted, self.steps, self.classify_streams,
                       self.packet_latency, self.step_latency, self.batch_size, self.queue_wait,
                       self.snapshots_written, self.sessions_restored):
            metric.labels(model=model)
        self.sessions_active.labels(model=model).set(0)
        self.queue_depth.labels(model=model).set(0)
        self.state_bytes.labels(model=model).set(state_bytes)
        self.slots.labels(model=model).set(slots)
        with self._lock:
            self._windows.setdefault(model, _Window())
            self._events_by_model.setdefault(model, 0)
            self._packets_by_model.setdefault(model, 0)

    def packet_done(self, model: str, events: int, latency: float) -> None:
        """One packet's result was sent ``latency`` seconds after its frame arrived."""
        self.packets.labels(model=model).inc()
        self.events.labels(model=model).inc(events)
        self.packet_latency.labels(model=model).observe(latency)
        with self._lock:
            self._windows.setdefault(model, _Window()).add(time.monotonic(), events, latency)
            self._events_by_model[model] = self._events_by_model.get(model, 0) + events
            self._packets_by_model[model] = self._packets_by_model.get(model, 0) + 1

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
                    **window.summary(now),
                }
            # Pooled latency percentiles need the raw samples of every model.
            lat = [s[2] for w in self._windows.values() for s in w.samples]
        p50 = p99 = None
        if lat:
            p50, p99 = (round(float(v), 3) for v in np.percentile(np.asarray(lat), [50, 99]) * 1e3)
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
        }

    def render(self) -> bytes:
        return generate_latest(self.registry)
