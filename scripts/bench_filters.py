"""Input filters' cost: nanoseconds per input event of each filter and of the whole chain, native
pass and NumPy reference, on synthetic 1280 x 720 streams at several rates and on real camera
recordings. Prints one JSON object (and a Markdown table with ``--markdown``).

    .venv/bin/python scripts/bench_filters.py [--data ../shared/data/real] [--rounds 3]

Synthetic stream: ``--seconds`` of events at each of ``--rates`` (events/s, integer µs times, so
at 20 M/s some 20 events share each microsecond): 90 % from a blob crossing the sensor (correlated
activity, what the background filter keeps) and 10 % uniform noise over the sensor (what it
removes). Real recordings (``--data``, read with the client's file readers, read-only): the
Prophesee Gen3 EVT2 (640 x 480) and Gen4.1 EVT3 (1280 x 720) bursts, where present.

Filters: ``refractory_us`` 500, ``denoise_us`` 2000, ``max_rate`` 1 M events/s, each alone and
all three chained; ``removed`` is the fraction of the stream each removes (of the reference's
events where the native pass cannot be built, and then no native figure). The native pass runs
in packets of ``--packet`` events through ``FilterBank.apply`` (the cost a session pays, Python
overhead included), best of ``--rounds``; the reference on the first ``--reference-events``
events (it is a specification, loops and all).

Served (``served_ns`` of the chain): what a session's packet costs the server's ingest with
filters, per input event: ``server/live/filtering.py``'s ``filter_packet`` (the source's
addresses and times checked, tokens, the native pass, an undo record) and the kept events picked
out of the columns. The difference to ``native_ns`` is what serving adds (with snapshots too: a
snapshot copies the state once per ``--snapshot-interval``, not per packet).
Figures depend on the machine and its load: state both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from evssm.models.events import SensorSpec
from evssm.models.filters import FilterBank, FilterSpec
from evssm.server.live.filtering import filter_packet

SPECS = {
    "refractory": FilterSpec(refractory_us=500),
    "denoise": FilterSpec(denoise_us=2000),
    "max_rate": FilterSpec(max_rate=1_000_000),
    "chain": FilterSpec(refractory_us=500, denoise_us=2000, max_rate=1_000_000),
}
REAL = {"prophesee-gen3-evt2.raw": (640, 480), "prophesee-gen41-evt3.raw": (1280, 720)}


def synthetic(rate: int, seconds: float, width: int, height: int, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
    """``rate * seconds`` events -> (t int64, tokens int32), times sorted integer µs."""
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    t = np.sort(rng.integers(0, int(seconds * 1e6), n)).astype(np.int64)
    signal = rng.random(n) < 0.9
    # The blob: 40 px wide, its centre crossing the sensor once in the stream's span.
    cx = 20 + (width - 40) * t / max(1, int(seconds * 1e6))
    x = np.where(signal, cx + rng.normal(0, 10, n), rng.integers(0, width, n))
    y = np.where(signal, height / 2 + rng.normal(0, 10, n), rng.integers(0, height, n))
    x = np.clip(np.round(x), 0, width - 1).astype(np.int64)
    y = np.clip(np.round(y), 0, height - 1).astype(np.int64)
    p = rng.integers(0, 2, n)
    return t, (x + width * (y + height * p)).astype(np.int32)


def per_event_ns(bank: FilterBank, t: np.ndarray, tok: np.ndarray, packet: int, rounds: int
                 ) -> tuple[float, float]:
    """Best of ``rounds`` over the stream in packets -> (ns per input event, fraction removed)."""
    best, removed = float("inf"), 0
    for _ in range(rounds):
        state = bank.new_state()
        start = time.perf_counter()
        for lo in range(0, t.size, packet):
            bank.apply(state, t[lo:lo + packet], tok[lo:lo + packet])
        best = min(best, time.perf_counter() - start)
        removed = state.removed.total
    return best / max(1, t.size) * 1e9, removed / max(1, t.size)


def served_ns(bank: FilterBank, sensor: SensorSpec, t: np.ndarray, tok: np.ndarray, packet: int,
              rounds: int) -> float:
    """Best of ``rounds``: ns per input event of the served pass over the stream in packets, the
    columns ``x``, ``y``, ``p`` as a client sends them (uint16, uint16, uint8)."""
    w, h = (sensor.width, sensor.height) if sensor.kind == "2d" else (sensor.channels, 1)
    x = (tok % w).astype(np.uint16)
    y = ((tok // w) % h).astype(np.uint16) if sensor.kind == "2d" else None
    p = (tok // (w * h)).astype(np.uint8) if sensor.kind == "2d" else None
    best = float("inf")
    for _ in range(rounds):
        state = bank.new_state()
        start = time.perf_counter()
        for lo in range(0, t.size, packet):
            at = slice(lo, lo + packet)
            cols = (t[at], x[at], None if y is None else y[at], None if p is None else p[at])
            out = filter_packet(bank, state, None, *cols)
            if out.keep is not None:
                cols = tuple(None if c is None else c[out.keep] for c in cols)  # type: ignore[assignment]
        best = min(best, time.perf_counter() - start)
    return best / max(1, t.size) * 1e9


def measure(name: str, sensor: SensorSpec, t: np.ndarray, tok: np.ndarray, args: argparse.Namespace
            ) -> dict[str, Any]:
    row: dict[str, Any] = {"stream": name, "events": int(t.size),
                           "span_ms": round(float(t[-1] - t[0]) / 1000, 3) if t.size else 0.0}
    ref_n = min(t.size, args.reference_events)
    for filt, spec in SPECS.items():
        ref_ns, removed = per_event_ns(FilterBank(spec, sensor, native=False), t[:ref_n], tok[:ref_n],
                                       args.packet, 1)
        native = FilterBank(spec, sensor)  # None where no compiler builds the pass
        native_ns = None
        if native.native:
            native_ns, removed = per_event_ns(native, t, tok, args.packet, args.rounds)
        row[filt] = {"native_ns": None if native_ns is None else round(native_ns, 1),
                     "reference_ns": round(ref_ns, 1), "removed": round(removed, 4)}
        if filt == "chain" and native.native:
            row[filt]["served_ns"] = round(served_ns(native, sensor, t, tok, args.packet, args.rounds), 1)
    return row


def load_real(path: Path, geometry: tuple[int, int]) -> tuple[SensorSpec, np.ndarray, np.ndarray]:
    from evssm.client.sources import load_file

    rec = load_file(path).recording
    width, height = geometry
    assert rec.y is not None and rec.p is not None, f"{path} is not a 2-D recording"
    tok = rec.x.astype(np.int64) + width * (rec.y.astype(np.int64) + height * rec.p.astype(np.int64))
    return SensorSpec("2d", width=width, height=height), rec.t.astype(np.int64), tok.astype(np.int32)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| stream | events | " + " | ".join(f"{f} native / ref ns (removed)" for f in SPECS) + " |",
             "|---|---:|" + "---:|" * len(SPECS)]
    for r in rows:
        cells = [f"{'-' if r[f]['native_ns'] is None else round(r[f]['native_ns'])} / "
                 f"{r[f]['reference_ns']:.0f} ({100 * r[f]['removed']:.0f} %)" for f in SPECS]
        lines.append(f"| {r['stream']} | {r['events']:,} | " + " | ".join(cells) + " |")
    lines += ["", "| stream | chain native ns | served ns |", "|---|---:|---:|"]
    for r in rows:
        c = r["chain"]
        if "served_ns" in c:
            lines.append(f"| {r['stream']} | {c['native_ns']:.0f} | {c['served_ns']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="folder of the real recordings (skipped when absent)")
    ap.add_argument("--rates", type=int, nargs="+", default=[1_000_000, 5_000_000, 20_000_000],
                    help="synthetic stream rates, events/s")
    ap.add_argument("--seconds", type=float, default=0.2, help="synthetic stream span")
    ap.add_argument("--packet", type=int, default=10_000, help="events per packet")
    ap.add_argument("--rounds", type=int, default=3, help="native runs; the best counts")
    ap.add_argument("--reference-events", type=int, default=100_000,
                    help="events the NumPy reference runs on (it loops in Python)")
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    args = ap.parse_args()
    if args.packet < 1 or args.rounds < 1 or args.seconds <= 0 or min(args.rates) < 1:
        print("bench_filters: --packet, --rounds, --seconds and --rates must be positive", file=sys.stderr)
        return 2
    rows = []
    camera = SensorSpec("2d", width=1280, height=720)
    for rate in args.rates:
        t, tok = synthetic(rate, args.seconds, camera.width, camera.height)
        rows.append(measure(f"synthetic 1280x720 {rate / 1e6:g} M/s", camera, t, tok, args))
    dvs = SensorSpec("2d", width=128, height=128)  # the DVS model's own sensor, no adapter
    t, tok = synthetic(args.rates[0], args.seconds, dvs.width, dvs.height)
    rows.append(measure(f"synthetic 128x128 {args.rates[0] / 1e6:g} M/s", dvs, t, tok, args))
    if args.data is not None and args.data.is_dir():
        for name, geometry in REAL.items():
            if (args.data / name).exists():
                sensor, t, tok = load_real(args.data / name, geometry)
                rows.append(measure(name, sensor, t, tok, args))
    report = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "python": platform.python_version()},
              "packet": args.packet, "rounds": args.rounds,
              "filters": {k: v.to_dict() for k, v in SPECS.items()}, "rows": rows}
    print(json.dumps(report, indent=1))
    if args.markdown:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
