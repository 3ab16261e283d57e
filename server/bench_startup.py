"""Benchmark start-up: seconds from launching ``evssm serve`` to ready, cold and warm (JSON).

Each run starts a real ``evssm serve`` on a free loopback port and polls ``/readyz``: *ready*
is when it answers 200 (every model can stream), *classify ready* when it also reports every
model's classify shapes compiled. The first run uses an empty XLA compilation cache folder
(cold), the next ones the folder the first filled (warm), as a restart or a second replica
would. Each server is stopped with SIGTERM after its run. The server's log lines that say what
each phase cost are kept in the output. The machine, versions and load average are printed with
the figures: absolute times on a shared machine drift.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PHASE_LOG = re.compile(r"evssm\.server\.engine: (.*)$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", default=None, metavar="NAME=SOURCE",
                        help="a model to serve (repeatable; as evssm serve --model); default: the "
                             "project's default model")
    parser.add_argument("--warm-runs", type=int, default=1, metavar="N",
                        help="runs after the cold one, with the cache it filled")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="compilation cache folder for the runs; it must be empty or absent "
                             "(default: a new temporary folder, removed afterwards)")
    parser.add_argument("--backend", default=None, help="streaming step: native, xla or auto "
                                                        "(default: the server's)")
    parser.add_argument("--until", choices=("classify", "ready"), default="classify",
                        help="end each run when classify is ready too, or as soon as the server "
                             "is ready (streams are served)")
    parser.add_argument("--timeout", type=float, default=900.0, metavar="S",
                        help="seconds a run may take")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_command(args: argparse.Namespace, port: int, cache: Path) -> list[str]:
    cmd = [sys.executable, "-m", "evssm.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--compilation-cache", str(cache), "--log-level", "info"]
    for spec in args.model or ():
        cmd += ["--model", spec]
    if args.backend:
        cmd += ["--backend", args.backend]
    return cmd


def time_start(args: argparse.Namespace, cache: Path, label: str, log_path: Path) -> dict[str, Any]:
    """One run: launch, poll ``/readyz`` until every model streams, then classifies; stop."""
    import httpx

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(_serve_command(args, port, cache), stdout=log, stderr=subprocess.STDOUT,
                                env=env)
    ready_s: float | None = None
    body: dict[str, Any] = {}
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"evssm serve exited with {proc.returncode}; its log: {log_path}")
            if time.perf_counter() - started > args.timeout:
                raise RuntimeError(f"not done within {args.timeout:g} s; log: {log_path}")
            with contextlib.suppress(httpx.TransportError):
                r = httpx.get(f"{base}/readyz", timeout=5)
                if r.status_code == 200:
                    body = r.json()
                    if ready_s is None:
                        ready_s = time.perf_counter() - started
                    if args.until == "ready" or all(body.get("classify", {}).values()):
                        break
            time.sleep(0.05)
        classify_s = time.perf_counter() - started if args.until == "classify" else None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    phases = [m.group(1) for line in log_path.read_text(errors="replace").splitlines()
              if (m := PHASE_LOG.search(line))]
    return {"cache": label, "ready_s": round(ready_s or 0.0, 2),
            "classify_ready_s": None if classify_s is None else round(classify_s, 2),
            "server_ready_after_s": body.get("startup_s"), "compilations": body.get("compilations"),
            "models": body.get("models"), "phases": phases}


def environment() -> dict[str, Any]:
    from evssm import __version__
    from evssm.models.bench import machine_info

    return {**machine_info(), "evssm": __version__, "load_average_1m_at_start": os.getloadavg()[0]}


def run(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        if args.cache_dir is None:
            cache = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="evssm-xla-")))
        else:
            cache = Path(args.cache_dir)
            if cache.exists() and any(cache.iterdir()):
                print(f"evssm bench startup: {cache} is not empty; a cold run needs an empty "
                      "folder", file=sys.stderr)
                return 2
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="evssm-startup-logs-")))
        out: dict[str, Any] = {"bench": "startup", "environment": environment(),
                               "config": {"models": args.model or ["default"],
                                          "backend": args.backend or "server default"},
                               "runs": []}
        try:
            for i in range(1 + max(args.warm_runs, 0)):
                label = "cold" if i == 0 else "warm"
                out["runs"].append(time_start(args, cache, label, logs / f"serve-{i}.log"))
                print(f"{label}: ready {out['runs'][-1]['ready_s']} s, classify ready "
                      f"{out['runs'][-1]['classify_ready_s']} s", file=sys.stderr, flush=True)
        except RuntimeError as e:
            print(f"evssm bench startup: {e}", file=sys.stderr)
            log = logs / f"serve-{len(out['runs'])}.log"
            if log.exists():
                print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            return 1
        out["environment"]["load_average_1m_at_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))
    return 0
