"""Run every recorded benchmark in one go and write the JSON reports to an output folder.

    .venv/bin/python scripts/benchmarks.py --out docs/bench
    .venv/bin/python scripts/benchmarks.py --only serving --before ../old-checkout --out DIR

1. ``evssm bench model`` for the DVS, SHD and default (event-mnist) configurations, with the
   native streaming step and with XLA's;
2. the serving path (``serving.json``), side by side in one run: a real ``evssm serve`` (default
   model + a random-init DVS model) on 127.0.0.1, the bare FastAPI/uvicorn WebSocket echo
   (``scripts/ws_echo.py``: the web stack doing no work) and, with ``--before DIR``, the same
   ``evssm serve`` of another checkout (its own ``.venv``) — all started at once, measured in
   interleaved rounds:
   - the lone-packet round trip (one session, one packet in flight, packed binary records of 16
     and 256 events), against echo + the step's own time (``evssm bench model``, same run);
   - ``evssm bench serve`` flat out (1 and 64 sessions, 256-event packets, DVS and default
     model) and 64 real-time sessions of the default model (event-mnist rate), with each
     server's event-loop CPU per packet: the CPU time of the server's main thread (the thread
     that runs uvicorn's event loop), read from ``/proc/PID/task/PID/stat`` before and after the
     run, divided by the packets answered;
3. one epoch of ``evssm train task=event-mnist`` for the training throughput, and the SHD
   configuration's training throughput beside the paper's code run from a scratch copy when
   ``EVSSM_PAPER_CODE`` and ``EVSSM_PAPER_PYTHON`` name one (``scripts/bench_train_paper.py``;
   skipped with a message otherwise).

Everything runs on this machine, one measurement at a time; the servers are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from benchtools import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]
EVSSM = [sys.executable, "-m", "evssm.cli"]
EVENT_MNIST_RATE = 5700  # events/s of an event-mnist recording in real time (docs/datasets.md)
SERVE_ARGS = ["--model", "event-mnist=models/pretrained/event-mnist", "--model", "dvs=config:dvs",
              "--max-sessions", "300", "--batch-buckets", "1,8,64", "--length-buckets", "256",
              "--classify-length-buckets", "4096", "--log-level", "warning"]
RECORD = np.dtype([("t", "<u8"), ("x", "<u2"), ("y", "<u2"), ("on", "u1")])
CLOCK_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def run_json(args: list[str], out: Path, timeout: float, cwd: Path | None = None) -> dict:
    """Run ``args`` (in ``cwd``: ``python -m evssm.cli`` there runs that checkout's evssm) and
    keep the JSON it prints in ``out``."""
    print("$ evssm " + " ".join(args[3:]), file=sys.stderr, flush=True)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout)
    out.write_text(json.dumps(data, indent=2) + "\n")
    return data


class Server:
    """A server process on a free port: ``evssm serve`` of a checkout, or the echo baseline."""

    def __init__(self, name: str, command: list[str], cwd: Path, log: Path):
        self.name = name
        self.checkout = cwd  # where it runs from: its checkout's evssm
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}"
        command = command[:-1] + [str(self.port)] if command[-1] == "PORT" else \
            command + ["--port", str(self.port)]
        with open(log, "w") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def cpu(self) -> tuple[float, float]:
        """(main thread, whole process) CPU seconds so far. The main thread runs the event loop."""
        pid = self.proc.pid
        with open(f"/proc/{pid}/task/{pid}/stat") as f:
            main = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/stat") as f:
            whole = f.read().rsplit(")", 1)[1].split()
        # Fields 14 and 15 (utime, stime) are 12 and 13 after the command name.
        return ((int(main[11]) + int(main[12])) / CLOCK_TICK,
                (int(whole[11]) + int(whole[12])) / CLOCK_TICK)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def git_commit(checkout: Path) -> str | None:
    """The commit a checkout is at (what the figures belong to), if it is a git checkout."""
    done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return done.stdout.strip() or None


def serve_command(checkout: Path) -> list[str]:
    """``evssm serve`` of ``checkout`` with the benchmark's models and buckets; 256 loopback
    sessions come from one address, so a version with per-client caps gets them lifted."""
    python = checkout / ".venv" / "bin" / "python"
    command = [str(python if python.exists() else sys.executable), "-m", "evssm.cli", "serve",
               *SERVE_ARGS]
    if "max_sessions_per_client" in (checkout / "server" / "settings.py").read_text():
        command += ["--max-sessions-per-client", "300"]
    return command


# --- lone-packet round trip ---------------------------------------------------------------------
def record_frames(size: int, count: int, seed: int) -> list[bytes]:
    """``events`` frames of packed records (128 x 128 sensor, timestamps rising across frames)."""
    rng = np.random.default_rng(seed)
    frames, t = [], 10**9
    for seq in range(count):
        rec = np.zeros(size, RECORD)
        rec["t"] = t + np.cumsum(rng.integers(0, 20, size))
        t = int(rec["t"][-1])
        rec["x"], rec["y"] = rng.integers(0, 128, size), rng.integers(0, 128, size)
        rec["on"] = rng.integers(0, 2, size)
        frames.append(msgpack.packb({"type": "events", "seq": seq, "records": rec.tobytes()}))
    return frames


async def round_trips(ws_url: str, model: str, frames: list[bytes], warmup: int) -> list[float]:
    """Send each frame and wait for its answer before the next: seconds per round trip."""
    from websockets.asyncio.client import connect

    async with connect(ws_url + "/v1/stream", max_size=None) as ws:
        await ws.send(msgpack.packb({"type": "open", "model": model}))
        opened = msgpack.unpackb(await ws.recv())
        assert opened["type"] == "opened", opened
        times = []
        for i, frame in enumerate(frames):
            t0 = time.perf_counter()
            await ws.send(frame)
            answer = msgpack.unpackb(await ws.recv())
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        assert answer["type"] == "result", answer
        return times


# --- the serving comparison ------------------------------------------------------------------------
def load_run(server: Server, args: list[str], out: Path) -> dict[str, Any]:
    """``evssm bench serve`` against ``server``, with the server's CPU use over the run."""
    main0, whole0 = server.cpu()
    report = run_json(EVSSM + ["bench", "serve", "--url", server.ws] + args, out, 600)
    main1, whole1 = server.cpu()
    packets = max(report["packets"]["answered"], 1)
    report["server_cpu_proc"] = {  # read from /proc, for servers without /v1/stats' cpu block
        "loop_thread_s": round(main1 - main0, 2), "process_s": round(whole1 - whole0, 2),
        "loop_us_per_packet": round((main1 - main0) / packets * 1e6, 1),
        "process_us_per_packet": round((whole1 - whole0) / packets * 1e6, 1)}
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def serving(out: Path, before: Path | None, duration: float, rounds: int, workers: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    servers = [Server("echo", [sys.executable, str(ROOT / "scripts" / "ws_echo.py"), "PORT"], ROOT,
                      out / "echo.log"),
               Server("after", serve_command(ROOT), ROOT, out / "serve-after.log")]
    if before is not None:
        servers.append(Server("before", serve_command(before), before, out / "serve-before.log"))
    summary: dict[str, Any] = {"model": {}, "lone": {}, "flat_out": {}, "real_time": {},
                               "duration_s": duration, "rounds": rounds, "workers": workers,
                               "after": git_commit(ROOT),
                               "before": git_commit(before) if before else None,
                               "load_average": os.getloadavg()}
    try:
        for server in servers:  # compiled before anything is measured
            summary.setdefault("ready_after_s", {})[server.name] = wait_ready(server.url, 2400)
        model = run_json(EVSSM + ["bench", "model", "--configs", "dvs", "event-mnist", "--seconds",
                                  "2", "--packet-sizes", "16", "256", "--offline-length", "0",
                                  "--backend", "native"], out / "model.json", 1800)
        for name in ("dvs", "event-mnist"):
            figures = model["models"][name]
            summary["model"][name] = {
                "step_ms_p50": {size: figures["streaming_one_session"][f"packet_{size}"]["latency_ms_p50"]
                                for size in (16, 256)},
                "one_session_256_events_per_s": figures["streaming_one_session"]["packet_256"]["events_per_s"],
                "sessions_64_events_per_s": figures["streaming_many_sessions"]["events_per_s"]}

        # Lone-packet round trips, interleaved over the servers.
        for size in (16, 256):
            frames = record_frames(size, 1500, seed=size)
            samples: dict[str, list[float]] = {s.name: [] for s in servers}
            for r in range(rounds):
                for server in servers if r % 2 == 0 else servers[::-1]:
                    samples[server.name] += asyncio.run(round_trips(server.ws, "dvs", frames, 100))
            summary["lone"][size] = {name: {"p50_ms": round(1e3 * float(np.percentile(v, 50)), 4),
                                            "mean_ms": round(1e3 * float(np.mean(v)), 4),
                                            "p99_ms": round(1e3 * float(np.percentile(v, 99)), 4)}
                                     for name, v in samples.items()}
        (out / "serving.json").write_text(json.dumps(summary, indent=2) + "\n")

        # Flat out and real time, each server in turn, rounds interleaved.
        base = ["--duration", str(duration), "--packet-events", "256", "--workers", str(workers)]
        runs = [(f"{m}_{n}_max", ["--model", m, "--sessions", str(n), "--rate", "max"])
                for m in ("dvs", "event-mnist") for n in (1, 64)]
        runs.append(("event-mnist_64_realtime", ["--model", "event-mnist", "--sessions", "64",
                                                 "--rate", str(EVENT_MNIST_RATE), "--ramp", "2"]))
        evssm_servers = [s for s in servers if s.name != "echo"]
        for key, extra in runs:
            # The echo takes the 64-session DVS load too: the web stack's own loop CPU per packet.
            group = servers if key == "dvs_64_max" else evssm_servers
            results: dict[str, list[dict]] = {s.name: [] for s in group}
            for r in range(rounds):
                for server in group if r % 2 == 0 else group[::-1]:
                    results[server.name].append(
                        load_run(server, base + extra, out / f"serve_{key}_{server.name}_{r}.json"))
            section = summary["real_time" if "realtime" in key else "flat_out"]
            section[key] = {name: _summarise(reports) for name, reports in results.items()}
            (out / "serving.json").write_text(json.dumps(summary, indent=2) + "\n")
        summary["load_average_after"] = os.getloadavg()
        (out / "serving.json").write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        for server in servers:
            server.stop()
    print(json.dumps(summary, indent=2))


def _summarise(reports: list[dict]) -> dict[str, Any]:
    """Median over rounds of each figure (the rounds themselves kept for events/s)."""
    med = lambda f: round(statistics.median(f(r) for r in reports), 3)  # noqa: E731
    return {
        "events_per_s": med(lambda r: r["achieved_events_per_s"]),
        "events_per_s_rounds": [r["achieved_events_per_s"] for r in reports],
        "latency_p50_ms": med(lambda r: r["latency_ms"]["p50"]),
        "latency_p99_ms": med(lambda r: r["latency_ms"]["p99"]),
        "loop_us_per_packet": med(lambda r: r["server_cpu_proc"]["loop_us_per_packet"]),
        "process_us_per_packet": med(lambda r: r["server_cpu_proc"]["process_us_per_packet"]),
        "client_cpu_share": med(lambda r: r["client_cpu_share"]),
        "kept_up": [r["sessions"]["kept_up"] for r in reports],
        "errors": [r["errors"] for r in reports],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/bench", help="folder for the JSON reports")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load test")
    parser.add_argument("--only", choices=["model", "serving", "train"], action="append",
                        help="run only these parts (repeatable; default: all)")
    parser.add_argument("--before", type=Path, default=None, metavar="DIR",
                        help="another checkout (with its .venv) whose server runs side by side")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per serving figure")
    parser.add_argument("--workers", type=int, default=1, help="load-generator processes")
    args = parser.parse_args()
    parts = set(args.only or ["model", "serving", "train"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if "model" in parts:
        for backend, name in (("native", "model.json"), ("xla", "model-xla.json")):
            run_json(EVSSM + ["bench", "model", "--configs", "dvs", "shd", "event-mnist",
                              "--seconds", "2", "--backend", backend], out / name, 1800)
    if "serving" in parts:
        serving(out / "serving", args.before.resolve() if args.before else None, args.duration,
                args.rounds, args.workers)
    if "train" in parts:
        run_dir = Path(tempfile.mkdtemp(prefix="evssm-train-epoch-"))
        start = time.monotonic()
        subprocess.run(EVSSM + ["train", "task=event-mnist", "train.epochs=1", "--out",
                                str(run_dir), "--no-progress"], check=True, timeout=3600)
        record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
        record["wall_s_including_start_up"] = time.monotonic() - start
        (out / "train.json").write_text(json.dumps(record, indent=2) + "\n")
        train_beside_paper(out / "train_paper.json")
    return 0


def train_beside_paper(out: Path) -> None:
    """The SHD configuration's training throughput beside the paper's code
    (``scripts/bench_train_paper.py``), when ``EVSSM_PAPER_CODE`` (a scratch checkout of its
    repository) and ``EVSSM_PAPER_PYTHON`` (a Python with its packages) name one; else skipped
    with a message."""
    from bench_train_paper import paper_code

    if not paper_code(os.environ.get("EVSSM_PAPER_CODE"), os.environ.get("EVSSM_PAPER_PYTHON")):
        print("train beside the paper's code: skipped (set EVSSM_PAPER_CODE to a scratch "
              "checkout of its repository and EVSSM_PAPER_PYTHON to a Python with its packages; "
              "docs/benchmarks.md, \"Training\")", file=sys.stderr)
        return
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train_paper.py"), "--out",
                    str(out)], check=True, timeout=3600)


if __name__ == "__main__":
    sys.exit(main())
