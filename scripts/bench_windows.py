"""The cost of sliding windows: events/s of one windowed session against its lanes, over the server.
Prints one JSON object (and a Markdown table with ``--markdown``).

    .venv/bin/python scripts/bench_windows.py [--model dvs=config:dvs] [--events 200000] [--rounds 3]

``evssm serve`` (a random-init ``config:dvs``, the DVS-sized model, by default) on 127.0.0.1; one
WebSocket session streams ``--events`` synthetic events (128 x 128, uniform addresses, one event
per µs of stream time: 1 M events/s) in packets of ``--packet`` events with up to 8 packets in
flight, as fast as the server answers. Sessions: no window, then ``window: {"ms": T, "hop_ms":
T / L}`` for L = 1, 2, 4, 8 lanes, ``T`` = ``--window-ms`` (50 ms: 50,000 events, so every lane
restarts a few times in a run). Rounds interleave the settings, so each sees the same machine
state; best of ``--rounds``. ``ratio``: events/s against the session without a window.
Figures depend on the machine and its load: state both (the report holds the load average).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Any

import msgpack
import numpy as np
from benchtools import free_port, wait_ready

EVSSM = [sys.executable, "-m", "evssm.cli"]
LANES = (1, 2, 4, 8)
IN_FLIGHT = 8


async def one_session(url: str, model: str, t: np.ndarray, x: np.ndarray, y: np.ndarray, packet: int,
                      window: dict[str, Any] | None) -> float:
    """Events/s of one session streaming the whole recording (pipelined, ``IN_FLIGHT`` packets)."""
    from websockets.asyncio.client import connect

    frames = [msgpack.packb({"type": "events", "seq": i, "t": t[a:a + packet].astype("<i8").tobytes(),
                             "x": x[a:a + packet].astype("<u2").tobytes(),
                             "y": y[a:a + packet].astype("<u2").tobytes(),
                             "p": np.ones(len(t[a:a + packet]), "<u1").tobytes()})
              for i, a in enumerate(range(0, len(t), packet))]
    async with connect(f"{url}/v1/stream", max_size=None) as ws:
        opened = {"type": "open", "model": model, **({} if window is None else {"window": window})}
        await ws.send(msgpack.packb(opened))
        reply = msgpack.unpackb(await ws.recv())
        if reply["type"] != "opened":
            raise SystemExit(f"open refused: {reply}")
        start = time.perf_counter()
        sent = answered = 0
        while answered < len(frames):
            while sent < len(frames) and sent - answered < IN_FLIGHT:
                await ws.send(frames[sent])
                sent += 1
            reply = msgpack.unpackb(await ws.recv())
            if reply["type"] != "result":
                raise SystemExit(f"packet refused: {reply}")
            answered += 1
        seconds = time.perf_counter() - start
        await ws.send(msgpack.packb({"type": "close"}))
    return len(t) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dvs=config:dvs", help="NAME=SOURCE of the served model")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--packet", type=int, default=4096, help="events per packet")
    parser.add_argument("--window-ms", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    name = args.model.split("=", 1)[0]
    rng = np.random.default_rng(0)
    t = np.arange(args.events, dtype=np.int64)
    x, y = rng.integers(0, 128, args.events), rng.integers(0, 128, args.events)
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    server = subprocess.Popen(
        EVSSM + ["serve", "--port", str(port), "--model", args.model, "--max-sessions", "8",
                 "--batch-buckets", "1,2,4,8", "--length-buckets", f"256,{args.packet}",
                 "--classify-length-buckets", str(args.packet), "--log-level", "warning"],
        start_new_session=True)
    settings: list[tuple[str, dict[str, Any] | None]] = [("none", None)] + [
        (str(lanes), {"ms": args.window_ms, "hop_ms": args.window_ms / lanes}) for lanes in LANES]
    best: dict[str, float] = {}
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        asyncio.run(one_session(url, name, t[:args.packet], x, y, args.packet, None))  # warm-up
        for _ in range(args.rounds):
            for key, window in settings:
                rate = asyncio.run(one_session(url, name, t, x, y, args.packet, window))
                best[key] = max(best.get(key, 0.0), rate)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "model": args.model, "events": args.events, "packet": args.packet, "window_ms": args.window_ms,
        "rounds": args.rounds,
        "events_per_s": {k: round(v) for k, v in best.items()},
        "ratio": {k: round(v / best["none"], 3) for k, v in best.items()},
    }
    print(json.dumps(report, indent=1))
    if args.markdown:
        print("| lanes | events/s | vs no window |\n|---|---:|---:|")
        for key, _ in settings:
            print(f"| {key} | {best[key]:,.0f} | {best[key] / best['none']:.2f} |")


if __name__ == "__main__":
    main()
