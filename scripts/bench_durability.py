"""What session snapshots cost, and how fast 10,000 sessions are written and restored.

    .venv/bin/python scripts/bench_durability.py --out docs/bench/durability

1. Streaming throughput side by side: three ``evssm serve`` processes with the default model,
   started together and measured in turn (interleaved rounds): no snapshots, ``--state-dir``, and
   ``--state-store redis://`` (a ``redis-server`` started here), both at the default snapshot
   interval. ``evssm bench serve`` runs flat out against each: 64 sessions, 256-event packets.
2. 10,000 sessions, for each store: a server holding 10,000 sessions (one 64-event packet each);
   10,000 resumes of the live sessions (the baseline: connect, resume, one empty packet); SIGTERM
   (the drain snapshots every session; its log says how long that took); a new server on the
   same store (the state directory's scan); 10,000 resumes again, now each restored from its
   snapshot. Bytes per session on disk and in Redis.

Everything runs on this machine (loopback only); every process started here is stopped at the
end. Needs ``redis-server`` (Debian package ``redis-server``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from benchtools import free_port, wait_ready

EVSSM = [sys.executable, "-m", "evssm.cli"]


class Process:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, args: list[str], log: Path):
        self.log_path = log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        return self.proc.returncode


def serve(port: int, log: Path, *args: str) -> Process:
    return Process(EVSSM + ["serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "info",
                            *args], log)


def redis(port: int, directory: Path) -> Process:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found: apt-get install redis-server")
    proc = Process([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
                    "--appendonly", "no"], directory / "redis.log")
    import redis as redis_py

    for _ in range(200):
        try:
            if redis_command(port, "PING"):
                return proc
        except redis_py.exceptions.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def redis_command(port: int, *args: str) -> Any:
    import redis as redis_py

    client = redis_py.Redis(port=port, decode_responses=True)
    try:
        return client.execute_command(*args)
    finally:
        client.close()


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# --- 1. throughput -----------------------------------------------------------------------------
def throughput(out: Path, tmp: Path, rounds: int, duration: float) -> dict[str, Any]:
    redis_port = free_port()
    store = redis(redis_port, tmp)
    variants = {"none": [], "state-dir": ["--state-dir", str(tmp / "state")],
                "redis": ["--state-store", f"redis://127.0.0.1:{redis_port}/0"]}
    common = ["--max-sessions", "128", "--max-sessions-per-client", "128", "--batch-buckets", "1,8,64",
              "--length-buckets", "256", "--classify-length-buckets", "none"]  # one client: no cap
    servers: dict[str, tuple[Process, int]] = {}
    try:
        for name, extra in variants.items():
            port = free_port()
            servers[name] = (serve(port, tmp / f"serve-{name}.log", *common, *extra), port)
        for _, port in servers.values():
            wait_ready(f"http://127.0.0.1:{port}")
        results: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
                port = servers[name][1]
                print(f"round {r + 1}: {name}", file=sys.stderr, flush=True)
                proc = subprocess.run(EVSSM + ["bench", "serve", "--url", f"ws://127.0.0.1:{port}", "--sessions",
                                               "64", "--rate", "max", "--duration", str(duration),
                                               "--packet-events", "256"],
                                      capture_output=True, text=True, timeout=600)
                if proc.returncode != 0:
                    raise SystemExit(proc.stderr[-3000:])
                report = json.loads(proc.stdout)
                results[name].append(report["achieved_events_per_s"])
                (out / f"throughput_{name}_round{r + 1}.json").write_text(json.dumps(report, indent=2) + "\n")
        passes = {}
        for name, (_, port) in servers.items():
            m = metrics(f"http://127.0.0.1:{port}")
            count = m.get("evssm_snapshot_write_seconds_count", 0.0)
            passes[name] = {"write_batches": count,
                            "write_seconds_total": m.get("evssm_snapshot_write_seconds_sum", 0.0),
                            "snapshots_written": m.get('evssm_snapshots_written_total{model="event-mnist"}', 0.0)}
    finally:
        for proc, _ in servers.values():
            proc.stop()
        store.stop()
    median = {name: statistics.median(v) for name, v in results.items()}
    return {"rounds": results, "median_events_per_s": median,
            "ratio_to_none": {name: median[name] / median["none"] for name in median},
            "snapshot_writes": passes, "duration_s": duration, "sessions": 64, "packet_events": 256}


# --- 2. 10,000 sessions --------------------------------------------------------------------------
def packet(seq: int, rng: np.random.Generator, n: int = 64) -> bytes:
    t = np.cumsum(rng.integers(0, 200, n)).astype("<i8")
    return msgpack.packb({"type": "events", "seq": seq, "t": t.tobytes(),
                          "x": rng.integers(0, 34, n).astype("<u2").tobytes(),
                          "y": rng.integers(0, 34, n).astype("<u2").tobytes(),
                          "p": rng.integers(0, 2, n).astype("u1").tobytes()})


async def sessions(url: str, n: int, concurrency: int, tokens: list[str] | None) -> tuple[list[str], list[dict]]:
    """Open ``n`` sessions with one packet each (``tokens`` None), or resume ``tokens`` and send
    one empty packet; every connection is dropped without ``close`` (the session stays)."""
    from websockets.asyncio.client import connect

    out_tokens: list[str] = [""] * n
    opened: list[dict] = [{}] * n
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker(k: int) -> None:
        rng = np.random.default_rng(k)
        while not queue.empty():
            i = queue.get_nowait()
            async with connect(url + "/v1/stream", compression=None, max_size=2**24) as ws:
                open_frame = {"type": "open"} if tokens is None else {"type": "open", "resume": tokens[i]}
                await ws.send(msgpack.packb(open_frame))
                reply = msgpack.unpackb(await ws.recv())
                if reply["type"] != "opened":
                    raise SystemExit(f"session {i}: {reply}")
                out_tokens[i], opened[i] = reply["resume"], reply
                frame = packet(0, rng) if tokens is None else msgpack.packb(
                    {"type": "events", "seq": 0, "t": b"", "x": b"", "y": b"", "p": b""})
                await ws.send(frame)
                result = msgpack.unpackb(await ws.recv())
                if result["type"] != "result" or result["events"] != 64:
                    raise SystemExit(f"session {i}: {result}")
                ws.transport.abort()  # no close frame: the session stays for a resume

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return out_tokens, opened


def ten_thousand(out: Path, tmp: Path, n: int, concurrency: int) -> dict[str, Any]:
    report: dict[str, Any] = {"sessions": n, "concurrency": concurrency}
    redis_port = free_port()
    store = redis(redis_port, tmp)
    common = ["--max-sessions", str(n), "--max-sessions-per-client", str(n), "--batch-buckets", "1,8,64",
              "--length-buckets", "64,256", "--classify-length-buckets", "none", "--session-idle-timeout",
              "3600", "--drain-timeout", "300"]
    stores = {"state-dir": ["--state-dir", str(tmp / "state")],
              "redis": ["--state-store", f"redis://127.0.0.1:{redis_port}/0"]}
    try:
        for name, extra in stores.items():
            r: dict[str, Any] = {}
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            ws = f"ws://127.0.0.1:{port}"
            used_before = redis_command(redis_port, "INFO", "memory")["used_memory"] if name == "redis" else 0
            first = serve(port, tmp / f"10k-{name}-1.log", *common, *extra)
            wait_ready(url)
            t0 = time.perf_counter()
            tokens, _ = asyncio.run(sessions(ws, n, concurrency, None))
            r["open_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            _, opened = asyncio.run(sessions(ws, n, concurrency, tokens))
            r["resume_live_s"] = time.perf_counter() - t0
            assert not any(o["restored"] for o in opened)
            first.stop()
            drain = re.search(r"drain: (\d+) session snapshots written in ([\d.]+) s", first.log())
            assert drain and int(drain.group(1)) == n, first.log()[-2000:]
            r["drain_snapshot_s"] = float(drain.group(2))
            if name == "state-dir":
                import sqlite3

                db = sqlite3.connect(tmp / "state" / "snapshots.sqlite3")
                try:
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    assert db.execute("SELECT count(*) FROM snapshots").fetchone()[0] == n
                    r["bytes_per_record"] = db.execute("SELECT avg(length(data)) FROM snapshots").fetchone()[0]
                finally:
                    db.close()
                files = [p for p in (tmp / "state").iterdir() if p.name.startswith("snapshots.sqlite3")]
                r["bytes_per_session_on_disk"] = sum(f.stat().st_blocks * 512 for f in files) / n
            else:
                used = redis_command(redis_port, "INFO", "memory")["used_memory"]
                r["bytes_per_session_in_redis"] = (used - used_before) / n
                key = redis_command(redis_port, "KEYS", "evssm:session:*")[0]
                r["memory_usage_one_key"] = redis_command(redis_port, "MEMORY", "USAGE", key, "SAMPLES", "0")
            second = serve(port, tmp / f"10k-{name}-2.log", *common, *extra)
            wait_ready(url, 900)
            if name == "state-dir":
                deadline = time.monotonic() + 120
                while not (scan := re.search(r"scanned in ([\d.]+) s", second.log())):
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
                r["scan_s"] = float(scan.group(1))
            t0 = time.perf_counter()
            _, opened = asyncio.run(sessions(ws, n, concurrency, tokens))
            r["resume_restored_s"] = time.perf_counter() - t0
            assert all(o["restored"] and o["events"] == 64 for o in opened)
            m = metrics(url)
            r["restored_total"] = m['evssm_sessions_restored_total{model="event-mnist"}']
            second.stop()
            report[name] = r
            print(name, json.dumps(r), file=sys.stderr, flush=True)
    finally:
        store.stop()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/bench/durability", help="folder for the JSON reports")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per throughput run")
    parser.add_argument("--sessions", type=int, default=10_000, help="sessions snapshotted and restored")
    parser.add_argument("--concurrency", type=int, default=32, help="connections at a time")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-sessions", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="evssm-bench-durability-") as tmp:
        if not args.skip_throughput:
            (Path(tmp) / "t").mkdir()
            report = throughput(out, Path(tmp) / "t", args.rounds, args.duration)
            (out / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
            print(json.dumps(report["median_events_per_s"]), json.dumps(report["ratio_to_none"]))
        if not args.skip_sessions:
            (Path(tmp) / "s").mkdir()
            report = ten_thousand(out, Path(tmp) / "s", args.sessions, args.concurrency)
            (out / "sessions.json").write_text(json.dumps(report, indent=2) + "\n")
            print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
