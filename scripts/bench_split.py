"""Where a served packet's CPU goes: the server's CPU split by part, DVS model, in one run.

    .venv/bin/python scripts/bench_split.py --rounds 3 --out docs/bench/split

Starts ``evssm serve`` (the benchmark's models and buckets, as ``scripts/benchmarks.py``) and
the bare WebSocket echo (``scripts/ws_echo.py``) on 127.0.0.1, then in order:

- ``evssm bench model --configs dvs`` (native step, 256-event packets): the in-process step,
  once per round (it moves by a third between minutes on a shared machine), the median of the
  rounds being the reference of the ratios;
- the lone-packet round trip (one session, one 256-event packet in flight, packed records),
  against the echo and the server, rounds interleaved;
- ``evssm bench serve --model dvs --rate max --packet-events 256`` with 1 and with 64 sessions,
  rounds interleaved: throughput, and the server's CPU split by part over each run (the
  ``server_cpu`` block the load test reads from ``/v1/stats``).

``--variant NAME:VAR=VALUE,...`` runs one more server per variant with those environment
variables (e.g. ``--variant spin20:EVSSM_NATIVE_SPIN_US=20``), measured in the same interleaved
rounds as the plain one (``evssm``): a before/after comparison in one run. ``--before DIR`` runs one
more server, ``before``: ``evssm serve`` of another checkout (its ``.venv`` if it has one), loaded
by that checkout's ``evssm bench serve``, in the same rounds: this version against an earlier one.

Writes every report and ``summary.json`` (the machine, the load average before and after each
run, medians over the rounds) to the output folder, and prints the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchmarks import EVSSM, ROOT, Server, git_commit, record_frames, round_trips, run_json, serve_command
from benchtools import wait_ready

from evssm.models.machine import machine_info


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def lone(servers: list[Server], rounds: int, frames: int) -> dict[str, Any]:
    """Lone 256-event round trips, p50 and mean in ms per server over the rounds."""
    packets = record_frames(256, frames, seed=256)
    samples: dict[str, list[float]] = {s.name: [] for s in servers}
    for r in range(rounds):
        for server in servers if r % 2 == 0 else servers[::-1]:
            samples[server.name] += asyncio.run(round_trips(server.ws, "dvs", packets, 100))
    return {name: {"p50_ms": round(1e3 * float(np.percentile(v, 50)), 4),
                   "mean_ms": round(1e3 * float(np.mean(v)), 4),
                   "p99_ms": round(1e3 * float(np.percentile(v, 99)), 4)} for name, v in samples.items()}


def flat_out(server: Server, sessions: int, duration: float, out: Path,
             max_in_flight: int | None = None) -> dict[str, Any]:
    """``evssm bench serve`` flat out against ``server``, by the load generator of the server's
    own checkout (the ``before`` server's is its checkout's); its default window of packets in
    flight unless ``max_in_flight``."""
    before = load()
    window = [] if max_in_flight is None else ["--max-in-flight", str(max_in_flight)]
    report = run_json(EVSSM + ["bench", "serve", "--url", server.ws, "--model", "dvs", "--sessions",
                               str(sessions), "--rate", "max", "--duration", str(duration),
                               "--packet-events", "256", *window], out, 600, cwd=server.checkout)
    report["load_average"] = {"before": before, "after": load()}
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def summarise(reports: list[dict[str, Any]], in_process: float) -> dict[str, Any]:
    """Medians over the rounds: events/s, its ratio to the in-process step, p50/p99, and the
    server's CPU per part in µs per event and share."""
    med = lambda f: round(statistics.median(f(r) for r in reports), 4)  # noqa: E731
    rates = [r["achieved_events_per_s"] for r in reports]
    parts = reports[0]["server_cpu"]["parts"]
    return {
        "client_us_per_packet": med(lambda r: 1e6 * r["client_cpu_s"] / max(r["packets"]["answered"], 1)),
        "events_per_s": med(lambda r: r["achieved_events_per_s"]), "events_per_s_rounds": rates,
        "ratio_to_in_process": round(statistics.median(rates) / in_process, 3),
        # Packets answered per engine step (above 1: a session's packets shared steps).
        "packets_per_step": med(lambda r: (r.get("server_steps") or {}).get("packets_per_step") or 0.0),
        "latency_p50_ms": med(lambda r: r["latency_ms"]["p50"]),
        "latency_p99_ms": med(lambda r: r["latency_ms"]["p99"]),
        "server_cores": med(lambda r: r["server_cpu"]["server_cores"]),
        "client_cpu_share": med(lambda r: r["client_cpu_share"]),
        "us_per_event": med(lambda r: r["server_cpu"]["us_per_event"]),
        "parts_us_per_event": {p: med(lambda r, p=p: r["server_cpu"]["parts"][p]["us_per_event"])
                               for p in parts},
        "parts_share": {p: med(lambda r, p=p: r["server_cpu"]["parts"][p]["share"]) for p in parts},
        "load_average": [r["load_average"] for r in reports],
    }


def variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition(":")
    env = dict(a.split("=", 1) for a in assignments.split(",") if a)
    if not name or not env:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME:VAR=VALUE[,VAR=VALUE]")
    return name, env


def in_process_step(out: Path) -> dict[str, float]:
    """``evssm bench model`` of the DVS model's native step: one session's events/s and p50 per
    256-event packet, and 64 sessions' events/s."""
    model = run_json(EVSSM + ["bench", "model", "--configs", "dvs", "--seconds", "2",
                              "--packet-sizes", "256", "--offline-length", "0", "--backend",
                              "native"], out, 1800)
    dvs = model["models"]["dvs"]
    one = dvs["streaming_one_session"]["packet_256"]
    return {"one_session_events_per_s": one["events_per_s"], "step_ms_p50": one["latency_ms_p50"],
            "sessions_64_events_per_s": dvs["streaming_many_sessions"]["events_per_s"]}


def start(name: str, env: dict[str, str], out: Path) -> Server:
    """``evssm serve`` with ``env`` added to this process's environment."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return Server(name, serve_command(ROOT), ROOT, out / f"serve-{name}.log")
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/bench/split"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    parser.add_argument("--lone-frames", type=int, default=1400)
    parser.add_argument("--variant", type=variant, action="append", default=[],
                        help="NAME:VAR=VALUE,...: one more server with these environment variables")
    parser.add_argument("--before", type=Path, default=None, metavar="DIR",
                        help="one more server: evssm serve of the checkout DIR")
    parser.add_argument("--sessions", type=lambda text: [int(n) for n in text.split(",")],
                        default=[1, 64], help="session counts of the flat-out runs (default 1,64)")
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help="packets in flight per session (default: evssm bench serve's)")
    args = parser.parse_args()
    if not set(args.sessions) <= {1, 64}:
        parser.error("--sessions: 1 and/or 64 (the in-process step is measured for those)")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    servers = [Server("echo", [sys.executable, str(ROOT / "scripts" / "ws_echo.py"), "PORT"], ROOT,
                      out / "echo.log"),
               start("evssm", {}, out)]
    servers += [start(name, env, out) for name, env in args.variant]
    if args.before is not None:
        before = args.before.resolve()
        servers.append(Server("before", serve_command(before), before, out / "serve-before.log"))
    summary: dict[str, Any] = {"commit": git_commit(ROOT), "machine": machine_info(),
                               "before": str(args.before) if args.before else None,
                               "variants": {name: env for name, env in args.variant},
                               "load_average_start": load(), "rounds": args.rounds,
                               "duration_s": args.duration, "max_in_flight": args.max_in_flight}
    try:
        for server in servers:
            wait_ready(server.url, 2400)
        summary["load_average_ready"] = load()
        steps = [in_process_step(out / "model_0.json")]
        step_p50 = steps[0]["step_ms_p50"]
        summary["lone_256"] = lone(servers, args.rounds, args.lone_frames)
        echo = summary["lone_256"]["echo"]["p50_ms"]
        summary["lone_256"]["over_echo_plus_step_ms"] = {
            s.name: round(summary["lone_256"][s.name]["p50_ms"] - echo - step_p50, 4)
            for s in servers[1:]}
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in range(args.rounds):
            if r:
                steps.append(in_process_step(out / f"model_{r}.json"))
            for n in args.sessions if r % 2 == 0 else args.sessions[::-1]:
                for server in servers[1:] if r % 2 == 0 else servers[:0:-1]:
                    runs.setdefault((server.name, n), []).append(
                        flat_out(server, n, args.duration, out / f"serve_{server.name}_{n}_{r}.json",
                                 args.max_in_flight))
                    time.sleep(1.0)
        summary["in_process"] = {key: statistics.median(s[key] for s in steps) for key in steps[0]}
        summary["in_process"]["rounds"] = steps
        in_process = {1: summary["in_process"]["one_session_events_per_s"],
                      64: summary["in_process"]["sessions_64_events_per_s"]}
        summary["flat_out"] = {f"{name}_{n}": summarise(reports, in_process[n])
                               for (name, n), reports in runs.items()}
        summary["load_average_end"] = load()
    finally:
        for server in servers:
            server.stop()
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
