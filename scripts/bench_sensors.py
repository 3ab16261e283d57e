"""Real sensors: reading speed per format, the real N-MNIST sample on the default model, and
real-time replay of real camera recordings to a served DVS-sized model. Prints one JSON object.

    .venv/bin/python scripts/bench_sensors.py --data ../shared/data/real [--rounds 5]

1. Reading: ``evssm.client.sources.open_source`` (faery's decoders, then columns, sorting checks
   and int64 time) against faery's own decoding of the same file into its event arrays,
   interleaved rounds on one process, best of ``--rounds``; events/s and the ratio.
2. ``evssm serve`` (the shipped default model as ``mnist``, a random-init ``config:dvs`` as
   ``dvs``) on 127.0.0.1; ``evssm classify`` and ``evssm stream`` of the real N-MNIST sample to the
   default model: prediction and probability.
3. ``evssm stream FILE --speed 1 --packet-ms MS`` of the Gen3 EVT2 and the DVXplorer recordings to
   ``dvs``: one session paced at the recording's own rate. ``lag_s`` = wall time minus recording
   time at the end (0 means it kept up), with the packet latencies.

The server is stopped at the end. Figures depend on the machine and its load: state both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchtools import free_port, wait_ready

EVSSM = [sys.executable, "-m", "evssm.cli"]
FILES = {"aedat4": "dvxplorer-sample.aedat4", "evt2": "prophesee-gen3-evt2.raw",
         "evt3": "prophesee-gen41-evt3.raw", "dat": "ncars-sample.dat",
         "nmnist": "nmnist-sample.bin"}


def faery_decode(path: Path, fmt: str) -> int:
    """faery's own decoding into its event arrays, kept in memory as a reader must (the
    reference); events decoded."""
    import faery

    if fmt == "dat":  # faery's file reader refuses the "2d" event type; its DAT decoder reads it
        with faery.dat.Decoder(path, (304, 240), None) as decoder:
            chunks = list(decoder)
    else:
        chunks = list(faery.events_stream_from_file(path))
    return sum(len(c) for c in chunks)


def reading(data: Path, rounds: int) -> dict[str, Any]:
    from evssm.client.sources import open_source

    best: dict[str, dict[str, float]] = {k: {} for k in FILES}
    counts: dict[str, int] = {}
    for _ in range(rounds):  # interleaved: both readers see the same machine state
        for fmt, name in FILES.items():
            path = data / name
            start = time.perf_counter()
            counts[fmt] = len(open_source(str(path)).recording)
            ours = time.perf_counter() - start
            best[fmt]["evssm"] = min(best[fmt].get("evssm", 1e9), ours)
            if fmt != "nmnist":  # faery does not read the N-MNIST layout
                start = time.perf_counter()
                assert faery_decode(path, fmt) == counts[fmt]
                best[fmt]["faery"] = min(best[fmt].get("faery", 1e9), time.perf_counter() - start)
    out = {}
    for fmt, times in best.items():
        row: dict[str, Any] = {"file": FILES[fmt], "events": counts[fmt],
                               "evssm_events_per_s": round(counts[fmt] / times["evssm"])}
        if "faery" in times:
            row["faery_events_per_s"] = round(counts[fmt] / times["faery"])
            row["evssm_over_faery_time"] = round(times["evssm"] / times["faery"], 2)
        out[fmt] = row
    return out


def evssm(*args: str, timeout: float = 900) -> dict[str, Any]:
    print("$ evssm " + " ".join(args), file=sys.stderr, flush=True)
    proc = subprocess.run(EVSSM + list(args), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"failed: evssm {' '.join(args)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def served(data: Path, packet_ms: float) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        EVSSM + ["serve", "--port", str(port), "--model", "mnist=models/pretrained/event-mnist",
                 "--model", "dvs=config:dvs", "--max-sessions", "4", "--batch-buckets", "1",
                 "--length-buckets", "256,4096", "--classify-length-buckets", "4096",
                 "--log-level", "warning"], start_new_session=True)
    try:
        startup = wait_ready(url, 1800)
        nmnist = str(data / FILES["nmnist"])
        classified = evssm("classify", nmnist, "--url", url, "--model", "mnist", "--json",
                           "--top", "10")["results"][0]
        streamed = evssm("stream", nmnist, "--url", url, "--model", "mnist", "--json", "--fast",
                         "--top", "10")
        replay = {}
        for fmt in ("evt2", "aedat4"):
            out = evssm("stream", str(data / FILES[fmt]), "--url", url, "--model", "dvs", "--json",
                        "--speed", "1", "--packet-ms", str(packet_ms))
            replay[FILES[fmt]] = {
                "events": out["events"], "recording_s": out["recording_s"], "wall_s": out["wall_s"],
                "lag_s": round(out["wall_s"] - out["recording_s"], 4),
                "recording_events_per_s": round(out["events"] / out["recording_s"]),
                "served_events_per_s": out["events_per_s"], "packets": out["packets"],
                "latency_ms": out["latency_ms"], "sensor": out["sensor"],
                "sensor_from": out["sensor_from"]}
        return {
            "startup_s": round(startup, 1),
            "nmnist_default_model": {
                "classify": {k: classified[k] for k in ("events", "prediction", "probability",
                                                        "top")},
                "stream": {k: streamed[k] for k in ("events", "prediction", "probability")},
            },
            "realtime_replay_dvs": {"packet_ms": packet_ms, **replay},
        }
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/real", help="folder of the recordings")
    parser.add_argument("--rounds", type=int, default=5, help="reading rounds (best of)")
    parser.add_argument("--packet-ms", type=float, default=1.0,
                        help="packet window of the real-time replays, milliseconds")
    parser.add_argument("--skip-serve", action="store_true", help="reading speed only")
    args = parser.parse_args()
    data = Path(args.data)
    import faery

    report: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "numpy": np.__version__,
                    "faery": faery.__version__, "load_avg": os.getloadavg()},
        "reading": reading(data, args.rounds),
    }
    if not args.skip_serve:
        report.update(served(data, args.packet_ms))
    report["machine"]["load_avg_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
