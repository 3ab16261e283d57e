"""Soak a server: sessions open, stream and close for --minutes, with classifies, RSS sampled.

--sessions workers each loop: open a session (every served model in turn), stream a random
recording of --packets packets of --packet-events events, close. Every --check-every-th session's
last answer is compared with POST /v1/classify of the same recording (the streaming invariant: a
wrong answer under load is counted as a mismatch). A classify worker posts --classify-streams
recordings to each model in turn, back to back (every --long-every-th request one long
recording). The server's resident memory is read from /metrics
(evssm_process_resident_memory_bytes) every --sample-s seconds; the report gives its trend in
MB/min, a least-squares line over the samples after --warmup-min minutes.

--serve "ARGS" starts `evssm serve ARGS` on a free port for the run (and stops it after), e.g.
--serve "--model a=default --model b=config:tiny"; otherwise --url names a running server.
The JSON report goes to stdout (and --out); progress, once a minute, to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from evssm import __version__
from evssm.models.events import Recording, SensorSpec

from .cli_options import add_server_options, explain
from .errors import ClientError, ServerUnavailable
from .http_api import aclassify
from .protocol import auth_headers, endpoint_url
from .session import AsyncStreamSession

RSS_METRIC = "evssm_process_resident_memory_bytes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    explain(parser, __doc__)
    add_server_options(parser, model=False, url_note="; a running server, unless --serve")
    parser.add_argument("--serve", default=None, metavar="ARGS", help="start `evssm serve ARGS` for the run")
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to run")
    parser.add_argument("--sessions", type=int, default=4, help="concurrent streaming workers")
    parser.add_argument("--packets", type=int, default=8, help="packets per session")
    parser.add_argument("--packet-events", type=int, default=256, help="events per packet")
    parser.add_argument("--check-every", type=int, default=5,
                        help="compare every Nth session's last answer with /v1/classify (0: never)")
    parser.add_argument("--classify-streams", type=int, default=4, help="recordings per classify request")
    parser.add_argument("--classify-events", type=int, default=4096, help="events per classified recording")
    parser.add_argument("--long-every", type=int, default=10,
                        help="every Nth classify request is one recording of --long-events (0: never)")
    parser.add_argument("--long-events", type=int, default=70_000,
                        help="events of a long recording (beyond the largest classify bucket, it is "
                             "streamed through scratch rows)")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--warmup-min", type=float, default=3.0, help="minutes left out of the trend")
    parser.add_argument("--out", default=None, help="also write the JSON report to this file")
    parser.add_argument("--seed", type=int, default=0)


@dataclass
class Tally:
    sessions: int = 0
    packets: int = 0
    events: int = 0
    classify_requests: int = 0
    classified_streams: int = 0
    checked: int = 0
    mismatches: int = 0
    busy_retries: int = 0  # classify answered 503 busy, retried
    errors: dict[str, int] = field(default_factory=dict)
    samples: list[tuple[float, float]] = field(default_factory=list)  # (minutes, RSS MB)

    def error(self, exc: BaseException) -> None:
        key = getattr(exc, "code", None) or type(exc).__name__
        self.errors[key] = self.errors.get(key, 0) + 1


def random_recording(rng: np.random.Generator, sensor: SensorSpec, n: int) -> Recording:
    t = np.cumsum(rng.integers(0, 200, n)).astype(np.int64)
    if sensor.kind == "1d":
        return Recording(t, rng.integers(0, sensor.channels, n))
    return Recording(t, rng.integers(0, sensor.width, n), rng.integers(0, sensor.height, n),
                     rng.integers(0, 2, n))


def trend_mb_per_min(samples: list[tuple[float, float]], after_min: float) -> float | None:
    """Least-squares slope of RSS (MB) against time (minutes) over samples after ``after_min``."""
    pts = np.array([s for s in samples if s[0] >= after_min], float)
    if len(pts) < 3:
        return None
    slope, _ = np.polyfit(pts[:, 0], pts[:, 1], 1)
    return float(slope)


async def _session_worker(i: int, url: str, models: list[dict], args: argparse.Namespace, tally: Tally,
                          deadline: float) -> None:
    rng = np.random.default_rng(args.seed * 1000 + i)
    n = args.packets * args.packet_events
    k = 0
    while time.monotonic() < deadline:
        model = models[(i + k) % len(models)]
        k += 1
        sensor = SensorSpec.from_dict(model["sensor"])
        rec = random_recording(rng, sensor, n)
        try:
            async with AsyncStreamSession(url, model=model["name"], reconnect=False, max_in_flight=4,
                                          api_key=args.api_key) as session:
                for a in range(0, n, args.packet_events):
                    await session.send(rec.slice(a, a + args.packet_events))
                results = await session.drain(timeout=120)
            tally.sessions += 1
            tally.packets += len(results)
            tally.events += n
            if args.check_every and tally.sessions % args.check_every == 0:
                (offline,) = await _classify_retrying(url, [rec], model["name"], args, tally)
                tally.checked += 1
                last = results[-1].probs
                if (last is None) != (offline.probs is None) or (
                        last is not None and not np.allclose(last, offline.probs, rtol=1e-3, atol=1e-5)):
                    tally.mismatches += 1
        except (ClientError, OSError, TimeoutError) as exc:
            tally.error(exc)
            await asyncio.sleep(0.5)


async def _classify_worker(url: str, models: list[dict], args: argparse.Namespace, tally: Tally,
                           deadline: float) -> None:
    rng = np.random.default_rng(args.seed + 7)
    k = 0
    while time.monotonic() < deadline:
        model = models[k % len(models)]
        k += 1
        sensor = SensorSpec.from_dict(model["sensor"])
        if args.long_every and k % args.long_every == 0:
            recs = [random_recording(rng, sensor, args.long_events)]
        else:
            recs = [random_recording(rng, sensor, args.classify_events) for _ in range(args.classify_streams)]
        try:
            await _classify_retrying(url, recs, model["name"], args, tally)
            tally.classify_requests += 1
            tally.classified_streams += len(recs)
        except (ClientError, OSError) as exc:
            tally.error(exc)
            await asyncio.sleep(0.5)


async def _classify_retrying(url: str, recs: list[Recording], model: str, args: argparse.Namespace,
                             tally: Tally) -> Any:
    """``aclassify``, retried after a ``busy`` (503 + Retry-After) as a well-behaved client does."""
    while True:
        try:
            return await aclassify(url, recs, model=model, api_key=args.api_key)
        except ServerUnavailable as exc:
            if exc.code != "busy":
                raise
            tally.busy_retries += 1
            await asyncio.sleep(0.2)


def read_rss_mb(http: str, headers: dict[str, str]) -> float:
    text = httpx.get(f"{http}/metrics", headers=headers, timeout=30).text
    for line in text.splitlines():
        if line.startswith(RSS_METRIC + " "):
            return float(line.split()[1]) / 2**20
    raise RuntimeError(f"the server's /metrics has no {RSS_METRIC} (Linux only)")


async def _sampler(http: str, args: argparse.Namespace, tally: Tally, start: float, deadline: float) -> None:
    headers = auth_headers(args.api_key)
    next_report = start + 60
    while True:
        now = time.monotonic()
        rss = await asyncio.to_thread(read_rss_mb, http, headers)
        tally.samples.append(((now - start) / 60, rss))
        if now >= next_report:
            next_report += 60
            print(f"soak {(now - start) / 60:5.1f} min: RSS {rss:7.1f} MB, {tally.sessions} sessions, "
                  f"{tally.classify_requests} classifies, {sum(tally.errors.values())} errors, "
                  f"{tally.mismatches} mismatches", file=sys.stderr, flush=True)
        if now >= deadline:
            return
        await asyncio.sleep(min(args.sample_s, max(0.0, deadline - now)))


async def soak(url: str, args: argparse.Namespace) -> dict[str, Any]:
    http = endpoint_url(url, "base").rstrip("/")
    listing = httpx.get(endpoint_url(url, "models"), headers=auth_headers(args.api_key), timeout=30).json()
    models = listing["models"]
    tally = Tally()
    start = time.monotonic()
    deadline = start + args.minutes * 60
    tasks = [_session_worker(i, url, models, args, tally, deadline) for i in range(args.sessions)]
    tasks.append(_classify_worker(url, models, args, tally, deadline))
    tasks.append(_sampler(http, args, tally, start, deadline))
    await asyncio.gather(*tasks)
    rss = [s[1] for s in tally.samples]
    return {
        "minutes": round((time.monotonic() - start) / 60, 2),
        "models": [m["name"] for m in models],
        "sessions": tally.sessions, "packets": tally.packets, "events": tally.events,
        "classify_requests": tally.classify_requests, "classified_streams": tally.classified_streams,
        "checked_against_classify": tally.checked, "mismatches": tally.mismatches, "errors": tally.errors,
        "classify_busy_retries": tally.busy_retries,
        "rss_mb": {"first": rss[0], "last": rss[-1], "max": max(rss), "min": min(rss)},
        "rss_trend_mb_per_min": trend_mb_per_min(tally.samples, 0.0),
        "rss_trend_after_warmup_mb_per_min": trend_mb_per_min(tally.samples, args.warmup_min),
        "warmup_min": args.warmup_min,
        "samples": [[round(t, 3), round(m, 1)] for t, m in tally.samples],
        "config": {k: getattr(args, k) for k in (
            "sessions", "packets", "packet_events", "check_every", "classify_streams", "classify_events",
            "long_every", "long_events", "sample_s", "serve")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "evssm": __version__,
    }


@contextlib.contextmanager
def _spawned(serve_args: str) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "evssm.cli", "serve", "--port", str(port), *shlex.split(serve_args)]
    proc = subprocess.Popen(cmd, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"evssm serve exited with {proc.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("evssm serve not ready after 900 s")
            time.sleep(0.5)
        yield f"ws://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def run(args: argparse.Namespace) -> int:
    if args.minutes <= 0 or args.sessions < 1 or args.packets < 1 or args.packet_events < 1:
        print("evssm bench soak: --minutes, --sessions, --packets and --packet-events must be > 0",
              file=sys.stderr)
        return 2
    with (_spawned(args.serve) if args.serve else contextlib.nullcontext(args.url)) as url:
        report = asyncio.run(soak(url, args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if not report["mismatches"] else 1
