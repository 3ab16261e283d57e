"""Sizing figures per model: start-up, memory per session, snapshot bytes and Redis memory.

For docs/deployment.md, "Capacity": start-up time with an empty and a warm compilation cache,
the server's memory per live session, and snapshot bytes and Redis memory per session.

    .venv/bin/python scripts/bench_capacity.py --out docs/bench/capacity

For each model: ``evssm serve`` with an empty ``--compilation-cache`` folder (time to
``/readyz``), stopped, then again on the same folder (warm). The warm server keeps its snapshots
in a ``redis-server`` started here. It then holds ``--sessions`` sessions, each on its own open
WebSocket with one 64-event packet answered: the server's resident memory (``VmRSS``) before and
after gives the memory per live session; Redis's ``used_memory`` before and after, once the
snapshots are written, gives Redis memory per session, and one record's size the snapshot bytes.
A SIGTERM then drains it; its log says how long writing every session's snapshot took.

Events per second per core come from ``evssm bench model`` (see docs/deployment.md). Everything
runs on this machine, on loopback; every process started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from bench_durability import metrics, packet, redis, redis_command, serve
from benchtools import free_port, wait_ready

# model name -> `--model` value: the default model (event-mnist) and the DVS-sized one.
MODELS = {"event-mnist": "default", "dvs": "dvs=config:dvs"}


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (``VmRSS`` in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024


async def hold_sessions(ws_url: str, n: int, concurrency: int) -> list[Any]:
    """``n`` sessions, each on its own WebSocket with one 64-event packet answered; returns the
    open connections (the caller closes them)."""
    from websockets.asyncio.client import connect

    held: list[Any] = []
    todo = iter(range(n))

    async def worker(k: int) -> None:
        rng = np.random.default_rng(k)
        for i in todo:
            ws = await connect(ws_url + "/v1/stream", compression=None, max_size=2**24)
            held.append(ws)
            await ws.send(msgpack.packb({"type": "open"}))
            if (reply := msgpack.unpackb(await ws.recv()))["type"] != "opened":
                raise SystemExit(f"session {i}: {reply}")
            await ws.send(packet(0, rng))
            if (result := msgpack.unpackb(await ws.recv()))["type"] != "result":
                raise SystemExit(f"session {i}: {result}")

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return held


def measure(name: str, model: str, tmp: Path, n: int, concurrency: int) -> dict[str, Any]:
    cache, r = tmp / f"xla-{name}", {"model": name, "sessions": n}
    common = ["--model", model, "--compilation-cache", str(cache), "--max-sessions", str(n),
              "--max-sessions-per-client", str(n), "--max-connections", str(n + 64),
              "--snapshot-interval", "1"]
    redis_port = free_port()
    store = redis(redis_port, tmp)
    proc = None
    try:
        # Empty cache, then warm (and with the store, which the rest measures).
        for start, extra in (("cold", []), ("warm", ["--state-store", f"redis://127.0.0.1:{redis_port}/0"])):
            if proc is not None:
                proc.stop()
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            t0 = time.monotonic()
            proc = serve(port, tmp / f"{name}-{start}.log", *common, *extra)
            wait_ready(url, poll_s=0.1)
            r[f"start_{start}_s"] = time.monotonic() - t0
        redis_before = redis_command(redis_port, "INFO", "memory")["used_memory"]
        rss_before = rss_bytes(proc.proc.pid)

        async def fill() -> tuple[int, int]:
            held = await hold_sessions(f"ws://127.0.0.1:{port}", n, concurrency)
            await asyncio.sleep(3.0)  # two snapshot intervals: every session written
            rss, keys = rss_bytes(proc.proc.pid), int(redis_command(redis_port, "DBSIZE"))
            for ws in held:
                ws.transport.abort()  # no close: the sessions stay (and their snapshots)
            return rss, keys

        rss_after, keys = asyncio.run(fill())
        assert keys == n, f"{keys} snapshots in Redis for {n} sessions"
        redis_after = redis_command(redis_port, "INFO", "memory")["used_memory"]
        key = redis_command(redis_port, "KEYS", "evssm:session:*")[0]
        r.update(rss_ready_bytes=rss_before, rss_sessions_bytes=rss_after,
                 rss_per_session_bytes=(rss_after - rss_before) / n,
                 redis_per_session_bytes=(redis_after - redis_before) / n,
                 snapshot_bytes=int(redis_command(redis_port, "HSTRLEN", key, "data")),
                 sessions_active=sum(v for k, v in metrics(url).items()
                                     if k.startswith("evssm_sessions_active")))
        proc.stop()
        drain = re.search(r"drain: (\d+) session snapshots written in ([\d.]+) s", proc.log())
        assert drain, proc.log()[-2000:]
        r["drain_sessions"], r["drain_snapshot_s"] = int(drain.group(1)), float(drain.group(2))
        state = re.search(r"(\d+) B of state per session", proc.log())
        r["state_bytes"] = int(state.group(1)) if state else None
    finally:
        if proc is not None:
            proc.stop()
        store.stop()
    print(json.dumps(r), file=sys.stderr, flush=True)
    return r


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/bench/capacity", help="folder for the JSON report")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                        help="models to measure (default: all)")
    parser.add_argument("--sessions", type=int, default=1024, help="sessions held open per model")
    parser.add_argument("--concurrency", type=int, default=32, help="connections opened at a time")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="evssm-bench-capacity-") as tmp:
        report = [measure(m, MODELS[m], Path(tmp), args.sessions, args.concurrency) for m in args.models]
    (out / "capacity.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
