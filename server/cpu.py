"""Where the server's CPU time goes, part by part, per event streamed (no JAX).

The parts are disjoint, so they add up to the process's CPU time:

- ``event_loop``: the event-loop thread (frames in and out, ingest, planning, answers, metrics),
  less the decoding done on it;
- ``decode``: decoding frames and their event columns (``api/decoding.Decoders``), on the loop
  or on the decode threads;
- ``step``: the models' step threads (zeroing and restoring rows, the native or XLA step,
  softmax and class order; work XLA hands to its own threads counts under ``other``);
- ``native_helper``: the native step's helper threads (their spinning between jobs included);
- ``other``: the rest of the process (classification, the snapshot writer, XLA's and the web
  server's other threads, garbage collection).

A thread's time is read from its own CPU clock, by Linux thread id, when a report is asked for:
the step path pays nothing, the loop two clock reads per decode. ``us_per_event`` divides a
part's seconds by the events streamed (answered packets' events) so far; ``evssm bench serve``
takes the difference of two reports, so that a run splits a packet's cost into its parts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

PARTS = ("event_loop", "decode", "step", "native_helper", "other")
# Linux's clock id of a thread's CPU clock (the kernel's MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED),
# as glibc's pthread_getcpuclockid builds it): readable from any thread of the process.
_PER_THREAD, _SCHED = 4, 2


def thread_cpu_seconds(tid: int) -> float | None:
    """CPU seconds used by thread ``tid`` (a Linux thread id of this process), or None where
    it cannot be read (the thread is gone, not Linux)."""
    try:
        return time.clock_gettime((~tid << 3) | _PER_THREAD | _SCHED)
    except (OSError, OverflowError, ValueError, AttributeError):
        return None


# () -> seconds decoding on the event loop, and on decode threads (cumulative).
DecodeSeconds = Callable[[], tuple[float, float]]
# () -> {"step": [tid, ...], "native_helper": [tid, ...]}: the threads of those parts now.
PartThreads = Callable[[], dict[str, list[int]]]


class CpuAccount(Collector):
    """The server's CPU seconds per part (see module), cumulative and never decreasing; a
    Prometheus collector of ``evssm_cpu_seconds_total{part}``."""

    def __init__(self, decode: DecodeSeconds, threads: PartThreads):
        self._decode = decode
        self._threads = threads
        self._loop_tid: int | None = None
        self._lock = threading.Lock()
        self._by_tid: dict[int, float] = {}  # a thread's last reading, kept once it has ended
        self._last = dict.fromkeys(PARTS, 0.0)

    def start(self) -> None:
        """Call on the event-loop thread: its time is the ``event_loop`` part's."""
        self._loop_tid = threading.get_native_id()

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(self)

    def _thread(self, tid: int) -> float:
        now = thread_cpu_seconds(tid)
        if now is not None:
            self._by_tid[tid] = now
        return self._by_tid.get(tid, 0.0)

    def seconds(self) -> dict[str, float]:
        """Cumulative CPU seconds per part (:data:`PARTS`) and of the whole ``process``."""
        with self._lock:
            process = time.process_time()
            on_loop, on_threads = self._decode()
            threads = self._threads()
            loop = self._thread(self._loop_tid) if self._loop_tid is not None else 0.0
            parts = {
                "event_loop": loop - on_loop,
                "decode": on_loop + on_threads,
                "step": sum(self._thread(t) for t in threads.get("step", [])),
                "native_helper": sum(self._thread(t) for t in set(threads.get("native_helper", []))),
            }
            parts["other"] = process - sum(parts.values())
            # Clocks read one after another can disagree by a little: a counter never goes back.
            for part in PARTS:
                self._last[part] = max(self._last[part], parts[part])
            return {**self._last, "process": process}

    def report(self, events: int) -> dict[str, object]:
        """The ``cpu`` block of ``/v1/stats``: ``events`` streamed so far, the process's CPU
        seconds, and per part its seconds, microseconds per event and share of the process."""
        seconds = self.seconds()
        process = seconds.pop("process")
        return {
            "events": events,
            "process_s": round(process, 6),
            "parts": {part: {"seconds": round(s, 6),
                             "us_per_event": round(s / events * 1e6, 4) if events else None,
                             "share": round(s / process, 4) if process > 0 else None}
                      for part, s in seconds.items()},
        }

    def collect(self) -> list[CounterMetricFamily]:
        family = self.describe()[0]
        seconds = self.seconds()
        for part in PARTS:
            family.add_metric([part], seconds[part])
        return [family]

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily("evssm_cpu_seconds", "CPU seconds of the server process by "
                                    "part: event_loop, decode, step, native_helper, other.",
                                    labels=["part"])]
