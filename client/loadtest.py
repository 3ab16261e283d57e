"""Load-test a running server: N concurrent streaming sessions, JSON report.

Each session opens its own WebSocket session and plays a simulated sensor (for the served model's
sensor) at --rate events per second in real time for --duration seconds, in packets of
--packet-events events (or --packet-ms windows); --rate max sends flat out instead, each session
keeping --max-in-flight packets outstanding. The sessions run in one asyncio process, or spread
over --workers processes (session i in process i mod N) so that the load generator can out-run a
server on a many-core host. The run stops by itself: after --duration the sessions stop sending
and get --grace seconds for their last answers.

The JSON report gives the offered and achieved event rates, p50/p95/p99 packet latency (packet
sent to answer received), errors by code, and the share of sessions that kept up with real time:
a session keeps up when every packet due within the run was sent and answered within --max-lag
seconds of the moment its last event happened on the (simulated) sensor. It also reports the
load generator's own CPU use (all its processes): near one full core per process, the client,
not the server, may be the bottleneck. It records the machine (CPU model, cores, instruction
sets) and, read from the server's ``/v1/stats`` before and after the run, the split of the
server's CPU time over its parts (event loop, decoding, step threads, the native step's helper;
microseconds per event and share), also printed to stderr.
"""

# About 430 lines as one module on purpose: the options, one session's driver, the spread over
# processes and the report are one measurement, read together.

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from evssm import __version__
from evssm.models.dataset_facts import SHD_CHANNELS
from evssm.models.events import Recording
from evssm.models.machine import machine_info

from .cli_options import add_server_options, explain
from .errors import ClientError, ConnectionLost, ServerError, error_line, exit_code
from .packets import Packet
from .protocol import Result, SessionInfo, endpoint_url
from .server_cpu import cpu_split, read_stats, split_lines, step_counts
from .session import AsyncStreamSession
from .sources import SensorSpec, SimulatedSensor
from .stats import percentiles_ms
from .stream_command import RECONNECT_BACKOFF_S, RECONNECT_TIMEOUT_S

MAX_RATE_TIMESTAMPS = 100_000.0  # event rate written into timestamps when --rate max
BLOCK_PACKETS = 32  # packets of --packet-events drawn from the simulated sensor at once


def _rate(value: str) -> float | None:
    if value.strip().lower() == "max":
        return None
    rate = float(value)
    if rate <= 0:
        raise argparse.ArgumentTypeError("--rate must be > 0 events/s or 'max'")
    return rate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    explain(parser, __doc__)
    add_server_options(parser)
    parser.add_argument("--sessions", type=int, default=8, help="concurrent sessions N")
    parser.add_argument("--rate", type=_rate, default=10000.0, metavar="EVENTS_PER_S",
                        help="events per second each session offers in real time, or 'max'")
    parser.add_argument("--duration", type=float, default=10.0, metavar="S",
                        help="seconds each session sends for")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--packet-events", type=int, default=None, metavar="N",
                      help="events per packet (default 256 unless --packet-ms)")
    size.add_argument("--packet-ms", type=float, default=None, metavar="MS",
                      help="one packet per MS milliseconds of sensor time instead")
    parser.add_argument("--max-in-flight", type=int, default=4,
                        help="unanswered packets per session, at most (backpressure)")
    parser.add_argument("--max-lag", type=float, default=1.0, metavar="S",
                        help="a session keeps real time if every answer arrives within S seconds "
                             "of its packet's last event")
    parser.add_argument("--ramp", type=float, default=0.0, metavar="S",
                        help="spread the sessions' starts over S seconds")
    parser.add_argument("--grace", type=float, default=10.0, metavar="S",
                        help="seconds after --duration allowed for the last answers")
    parser.add_argument("--open-timeout", type=float, default=30.0, metavar="S",
                        help="seconds allowed to open a session")
    parser.add_argument("--reconnect-timeout", type=float, default=RECONNECT_TIMEOUT_S, metavar="S",
                        help="after a dropped connection a session keeps trying (with backoff) "
                             "for S seconds, long enough for a server to restart, then resumes "
                             "(default: %(default)g)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated sensors")
    parser.add_argument("--workers", type=int, default=1,
                        help="load-generator processes (the sessions are spread over them)")


@dataclass
class SessionReport:
    """What one load-test session saw."""

    opened: bool = False
    packets_sent: int = 0
    packets_answered: int = 0
    events_due: int = 0  # events the schedule asked for within the run
    events_sent: int = 0
    events_answered: int = 0
    latencies: list[float] = field(default_factory=list)
    max_lag_s: float = 0.0
    unanswered: int = 0
    unsent_due: int = 0  # packets that fell due within the run but could not be sent in time
    reconnects: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    began: float | None = None  # wall time the session's schedule started
    last_answer: float | None = None
    info: SessionInfo | None = None

    def kept_up(self, max_lag: float) -> bool:
        return (self.opened and self.unanswered == 0 and self.unsent_due == 0
                and not self.errors and self.max_lag_s <= max_lag)


@dataclass
class _Config:
    url: str
    model: str | None
    rate: float | None
    duration: float
    packet_events: int | None
    packet_us: int | None
    max_in_flight: int
    grace: float
    open_timeout: float
    seed: int
    api_key: str | None = None
    reconnect_timeout: float = RECONNECT_TIMEOUT_S


_waiting_said = False  # one line per process, however many sessions wait


def _say_waiting(left_s: float, cause: BaseException) -> None:
    global _waiting_said
    if not _waiting_said:
        _waiting_said = True
        print(f"evssm bench serve: sessions lost their connection ({cause}); each waits up to "
              f"{left_s:.0f} s for the server to come back, then resumes", file=sys.stderr,
              flush=True)


def _event_packets(sim: SimulatedSensor, size: int) -> Iterator[Recording]:
    """The sensor's stream in packets of ``size`` events, drawn ``BLOCK_PACKETS`` packets at a
    time: the same stream of events, without a draw's fixed cost per packet (the load
    generator's CPU is not the server's)."""
    while True:
        block = sim.take(size * BLOCK_PACKETS)
        for start in range(0, len(block), size):
            yield block.slice(start, start + size)


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, ServerError):
        return exc.code
    if isinstance(exc, ConnectionLost):
        return "connection_lost"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timeout"
    return type(exc).__name__


async def _run_session(index: int, cfg: _Config, start_at: float) -> SessionReport:
    """One session: open at ``start_at`` (monotonic), send on schedule until the run ends, collect
    answers until the grace period ends."""
    report = SessionReport()
    await asyncio.sleep(max(start_at - time.monotonic(), 0.0))
    session = AsyncStreamSession(cfg.url, model=cfg.model, max_in_flight=cfg.max_in_flight,
                                 open_timeout=cfg.open_timeout, top_k=1, api_key=cfg.api_key,
                                 reconnect_timeout=cfg.reconnect_timeout,
                                 on_reconnect_wait=_say_waiting, backoff=RECONNECT_BACKOFF_S)
    try:
        report.info = await session.open()
    except (ClientError, OSError) as exc:
        report.errors[_error_code(exc)] += 1
        return report
    report.opened = True
    sensor = report.info.model.sensor or SensorSpec.one_d(SHD_CHANNELS)
    classes = max(len(report.info.model.classes), 2)
    rate = cfg.rate or MAX_RATE_TIMESTAMPS
    sim = SimulatedSensor(sensor, rate, label=index % classes, num_classes=classes,
                          seed=cfg.seed * 100_003 + index)
    begin = report.began = time.monotonic()
    end = begin + cfg.duration
    counted = _event_packets(sim, cfg.packet_events or 256)
    due_at: dict[int, float] = {}  # packet index -> wall time its last event happened
    sizes: dict[int, int] = {}

    async def packets() -> Any:
        k = 0
        while True:
            if cfg.packet_us is not None:
                rec = sim.chunk(cfg.packet_us)
                due_us = sim.now_us  # a window is complete at its end
            else:
                rec = next(counted)
                due_us = int(rec.t[-1])  # at its last event
            due = begin + due_us / 1e6 if cfg.rate is not None else time.monotonic()
            if due > end:
                return
            now = time.monotonic()
            if now > end:
                # Behind schedule when the run ended: the rest of the schedule was never sent.
                left_s = cfg.duration - due_us / 1e6
                per_packet = len(rec) or 1
                report.events_due += len(rec) + int(rate * left_s)
                report.unsent_due += 1 + int(rate * left_s / per_packet)
                return
            if due > now:
                await asyncio.sleep(due - now)
            due_at[k], sizes[k] = due, len(rec)
            report.events_due += len(rec)
            report.packets_sent += 1
            report.events_sent += len(rec)
            yield Packet(rec, due_us, k)
            k += 1

    try:
        # A restart of the server is waited out (reconnect_timeout) on top of the run.
        async with asyncio.timeout(cfg.duration + cfg.grace + cfg.reconnect_timeout
                                   + (begin - time.monotonic())):
            async for item in session.stream(packets(), raise_errors=False):
                now = time.monotonic()
                if isinstance(item, ServerError):
                    report.errors[item.code] += 1
                    if item.seq is not None:
                        due_at.pop(item.seq, None)
                    continue
                assert isinstance(item, Result)
                due = due_at.pop(item.seq, now)
                report.packets_answered += 1
                report.events_answered += sizes.pop(item.seq, 0)
                report.last_answer = now
                if not item.lost:
                    report.latencies.append(item.latency_s)
                if cfg.rate is not None:
                    report.max_lag_s = max(report.max_lag_s, now - due)
    except TimeoutError:
        report.unanswered = len(due_at)
        if due_at:
            report.errors["timeout"] += len(due_at)
    except ClientError as exc:
        report.unanswered = len(due_at)
        report.errors[_error_code(exc)] += 1
    finally:
        report.reconnects = session.reconnects
        try:
            async with asyncio.timeout(5):
                await session.close()
        except (TimeoutError, ClientError, OSError):
            pass
    if cfg.rate is not None and due_at:  # never answered: lagging at least until now
        report.max_lag_s = max(report.max_lag_s, time.monotonic() - min(due_at.values()))
    return report


def _environment() -> dict[str, Any]:
    import httpx
    import msgpack
    import numpy
    import websockets

    return {
        "machine": platform.machine(), "platform": platform.platform(),
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "versions": {"evssm": __version__, "numpy": numpy.__version__,
                     "websockets": websockets.__version__, "httpx": httpx.__version__,
                     "msgpack": ".".join(map(str, msgpack.version))},
    }


def _config(args: argparse.Namespace) -> _Config:
    return _Config(url=args.url, model=args.model, rate=args.rate, duration=args.duration,
                   packet_events=None if args.packet_ms is not None else (args.packet_events or 256),
                   packet_us=None if args.packet_ms is None else max(int(args.packet_ms * 1e3), 1),
                   max_in_flight=args.max_in_flight, grace=args.grace,
                   open_timeout=args.open_timeout, seed=args.seed,
                   api_key=getattr(args, "api_key", None),
                   reconnect_timeout=getattr(args, "reconnect_timeout", RECONNECT_TIMEOUT_S))


async def _run_sessions(args: argparse.Namespace, indices: list[int], start: float
                        ) -> list[SessionReport]:
    """Sessions ``indices`` of the run, session i starting ``i * ramp step`` after wall time
    ``start`` (``time.time()``: one clock for every worker process)."""
    cfg = _config(args)
    offset = start - time.time()  # wall clock -> this process's monotonic clock
    begin = time.monotonic() + offset
    step = args.ramp / max(args.sessions - 1, 1) if args.ramp > 0 else 0.0
    tasks = [_run_session(i, cfg, begin + i * step) for i in indices]
    # Hard stop even if something misbehaves: every phase above is bounded, this bounds the sum.
    limit = (max(offset, 0.0) + args.ramp + args.open_timeout + args.duration + args.grace
             + cfg.reconnect_timeout + 30)
    async with asyncio.timeout(limit):
        return list(await asyncio.gather(*tasks))


def _worker(args: argparse.Namespace, indices: list[int], start: float
            ) -> tuple[list[SessionReport], float]:
    """One load-generator process: its sessions' reports and its CPU seconds."""
    cpu0 = time.process_time()
    reports = asyncio.run(_run_sessions(args, indices, start))
    return reports, time.process_time() - cpu0


def _spread(args: argparse.Namespace) -> tuple[list[SessionReport], list[float], float]:
    """Run the sessions over ``args.workers`` processes: reports in session order, each
    process's CPU seconds, and the wall time."""
    import concurrent.futures
    import multiprocessing

    workers = min(args.workers, args.sessions)
    shares = [list(range(w, args.sessions, workers)) for w in range(workers)]
    start = time.time() + 1.0 + 0.25 * workers  # processes start before the first session
    context = multiprocessing.get_context("spawn")  # no inherited event loop or sockets
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        done = list(pool.map(_worker, [args] * workers, shares, [start] * workers))
    wall = time.time() - start
    reports: list[SessionReport | None] = [None] * args.sessions
    for share, (part, _) in zip(shares, done, strict=True):
        for i, report in zip(share, part, strict=True):
            reports[i] = report
    return [r for r in reports if r is not None], [cpu for _, cpu in done], wall


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the load test described by ``args`` and return the report."""
    if args.sessions < 1 or args.duration <= 0 or args.workers < 1:
        raise ValueError("--sessions and --workers must be >= 1 and --duration > 0")
    cfg = _config(args)
    stats_before = await asyncio.to_thread(read_stats, args.url, cfg.api_key)
    stats_at = time.monotonic()
    if args.workers > 1:
        loop = asyncio.get_running_loop()
        reports, cpus, wall = await loop.run_in_executor(None, _spread, args)
    else:
        cpu0, wall0 = time.process_time(), time.monotonic()
        reports = await _run_sessions(args, list(range(args.sessions)), time.time())
        wall = time.monotonic() - wall0
        cpus = [time.process_time() - cpu0]
    cpu = sum(cpus)
    stats_after = await asyncio.to_thread(read_stats, args.url, cfg.api_key)
    server_cpu = cpu_split(stats_before, stats_after, time.monotonic() - stats_at)

    opened = [r for r in reports if r.opened]
    # Achieved rate over the whole run: first schedule start to last answer (drain included).
    starts = [r.began for r in opened if r.began is not None]
    ends = [r.last_answer for r in opened if r.last_answer is not None]
    span = (max(ends) - min(starts)) if starts and ends else 0.0
    answered = sum(r.events_answered for r in reports)
    errors: collections.Counter[str] = collections.Counter()
    for r in reports:
        errors.update(r.errors)
    kept = sum(r.kept_up(args.max_lag) for r in reports)
    info = next((r.info for r in opened if r.info is not None), None)
    latencies = [x for r in reports for x in r.latencies]
    per_session = [r.events_answered / args.duration for r in opened]
    warnings = []
    if max(cpus) / max(wall, 1e-9) > 0.85:
        warnings.append("a load-generator process used most of a CPU core: it may be the "
                        "bottleneck (try --workers)")
    if len(opened) < args.sessions:
        warnings.append(f"only {len(opened)} of {args.sessions} sessions opened")
    if server_cpu is None:
        warnings.append("the server's CPU split is missing: its /v1/stats could not be read or "
                        "has no cpu block")
    return {
        "benchmark": "serve",
        "url": endpoint_url(args.url, "stream"),
        "config": {"sessions": args.sessions, "rate_per_session": args.rate or "max",
                   "duration_s": args.duration, "packet_events": cfg.packet_events,
                   "packet_ms": args.packet_ms, "max_in_flight": args.max_in_flight,
                   "max_lag_s": args.max_lag, "ramp_s": args.ramp, "grace_s": args.grace,
                   "timestamp_rate": cfg.rate or MAX_RATE_TIMESTAMPS, "seed": args.seed,
                   "workers": args.workers},
        "model": None if info is None else {"name": info.model.name,
                                            "classes": len(info.model.classes),
                                            "sensor": None if info.model.sensor is None
                                            else info.model.sensor.to_dict()},
        "sessions": {"requested": args.sessions, "opened": len(opened),
                     "kept_up": kept if args.rate is not None else None,
                     "share_real_time": kept / args.sessions if args.rate is not None else None,
                     "reconnects": sum(r.reconnects for r in reports)},
        "offered_events_per_s": args.rate * args.sessions if args.rate is not None else None,
        "sent_events_per_s": round(sum(r.events_sent for r in reports) / args.duration, 1),
        "achieved_events_per_s": round(answered / span, 1) if span > 0 else 0.0,
        "achieved_events_per_s_per_session": {
            "min": round(min(per_session), 1), "median": round(statistics.median(per_session), 1),
            "max": round(max(per_session), 1)} if per_session else None,
        "events": {"due": sum(r.events_due for r in reports),
                   "sent": sum(r.events_sent for r in reports), "answered": answered},
        "packets": {"sent": sum(r.packets_sent for r in reports),
                    "answered": sum(r.packets_answered for r in reports),
                    "unanswered": sum(r.unanswered for r in reports),
                    "unsent_due": sum(r.unsent_due for r in reports)},
        "latency_ms": percentiles_ms(latencies),
        "session_max_lag_ms": percentiles_ms([r.max_lag_s for r in opened], (50, 99))
        if args.rate is not None else None,
        "errors": dict(errors),
        "wall_s": round(wall, 3),
        "measured_span_s": round(span, 3),
        "client_cpu_s": round(cpu, 3),
        # Cores the load generator used on average (all its processes), and its busiest one's.
        "client_cpu_share": round(cpu / wall, 3) if wall > 0 else None,
        "client_cpu_share_per_worker": [round(c / wall, 3) for c in cpus] if wall > 0 else None,
        # The server's CPU over the run, by part (its /v1/stats before and after).
        "server_cpu": server_cpu,
        # The server's engine steps over the run: how many packets shared each.
        "server_steps": step_counts(stats_before, stats_after),
        "warnings": warnings,
        "machine": machine_info(),
        "environment": _environment(),
    }


def run(args: argparse.Namespace) -> int:
    try:
        report = asyncio.run(bench(args))
    except ValueError as exc:
        print(f"evssm bench serve: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"evssm bench serve: {error_line(exc)}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        print("evssm bench serve: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(report, indent=2))
    if not report["sessions"]["opened"]:
        errors = ", ".join(f"{code} x{n}" for code, n in report["errors"].items()) or "none"
        print(f"evssm bench serve: no session opened at {report['url']} (errors: {errors}); "
              "is a server running there? Start one with 'evssm serve' or pass --url",
              file=sys.stderr)
        return 1
    if report["server_cpu"] is not None:
        print("\n".join(split_lines(report["server_cpu"], report["config"]["packet_events"])),
              file=sys.stderr)
    for warning in report["warnings"]:
        print(f"evssm bench serve: warning: {warning}", file=sys.stderr)
    return 0
