"""Run every recorded benchmark in one go and write the JSON reports to an output folder.

    .venv/bin/python scripts/benchmarks.py --out docs/bench

1. ``evssm bench model`` for the DVS, SHD and default (event-mnist) configurations, with the
   native streaming step and with XLA's;
2. a real ``evssm serve`` (default model + a random-init DVS model) on 127.0.0.1, then
   ``evssm bench serve``: one session and 64 sessions flat out with 256-event packets (both
   models), and 1/16/64/256 sessions at the event-mnist recordings' real-time rate;
3. one epoch of ``evssm train task=event-mnist`` for the training throughput.

Everything runs on this machine, one step at a time; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

EVSSM = [sys.executable, "-m", "evssm.cli"]
EVENT_MNIST_RATE = 5700  # events/s of an event-mnist recording in real time (docs/datasets.md)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_json(args: list[str], out: Path, timeout: float) -> dict:
    print("$ evssm " + " ".join(args[3:]), file=sys.stderr, flush=True)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout)
    out.write_text(json.dumps(data, indent=2) + "\n")
    return data


def wait_ready(url: str, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"server at {url} not ready after {timeout} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/bench", help="folder for the JSON reports")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load test")
    parser.add_argument("--skip-train", action="store_true", help="no training epoch")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    for backend, name in (("native", "model.json"), ("xla", "model-xla.json")):
        run_json(EVSSM + ["bench", "model", "--configs", "dvs", "shd", "event-mnist",
                          "--seconds", "2", "--backend", backend], out / name, 1800)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        EVSSM + ["serve", "--port", str(port), "--model", "event-mnist=models/pretrained/event-mnist",
                 "--model", "dvs=config:dvs", "--max-sessions", "300", "--max-sessions-per-client", "300",
                 "--batch-buckets", "1,8,64",
                 "--length-buckets", "256", "--classify-length-buckets", "4096",
                 "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        ready_s = wait_ready(url, 900)
        (out / "serve_startup.json").write_text(json.dumps({"ready_after_s": ready_s}) + "\n")
        ws = f"ws://127.0.0.1:{port}"
        load = EVSSM + ["bench", "serve", "--url", ws, "--duration", str(args.duration),
                        "--packet-events", "256"]
        for model in ("dvs", "event-mnist"):
            for sessions in (1, 64):
                run_json(load + ["--model", model, "--sessions", str(sessions), "--rate", "max"],
                         out / f"serve_{model}_{sessions}_max.json", 600)
        for sessions in (1, 16, 64, 256):
            run_json(load + ["--model", "event-mnist", "--sessions", str(sessions),
                             "--rate", str(EVENT_MNIST_RATE), "--ramp", "2"],
                     out / f"serve_event-mnist_{sessions}_realtime.json", 600)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)

    if not args.skip_train:
        run_dir = Path(tempfile.mkdtemp(prefix="evssm-train-epoch-"))
        start = time.monotonic()
        subprocess.run(EVSSM + ["train", "task=event-mnist", "train.epochs=1", "--out",
                                str(run_dir), "--no-progress"], check=True, timeout=3600)
        record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
        record["wall_s_including_start_up"] = time.monotonic() - start
        (out / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
