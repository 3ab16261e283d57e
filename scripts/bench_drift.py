"""Float32 accumulation drift on long streams, against float64 references. Prints one JSON object.

    .venv/bin/python scripts/bench_drift.py [--events 100000000] [--rate 1e6] [--config tiny]

Three carried quantities grow or persist with the stream; each is measured at 10^4, 10^5, ...
events up to ``--events``:

1. The head's running pool (``sum_w``, the divisor of the timepool head, and ``sum_z`` beside
   it), read from the real streaming step's carried state (``--backend``, default native) on a
   stream at ``--rate`` events/s (Poisson arrivals, integer microseconds). Its float64
   reference is exact arithmetic on the same gaps: ``sum_m (dt_m + eps)`` over the completed
   final-rate windows, ``dt_m`` the window's summed gaps in ms. ``rel_err`` = |f32 - f64| / f64.
2. A partial pooling window (``sum_w``, ``sum_dt`` of a strided layer): reset at every window,
   so its error is that of ``stride`` additions at any stream length (the same read-out).
3. The SSM recurrence ``s_i = exp(Lambda Delta dt_i) s_{i-1} + g b_i`` for the slowest state
   of the config (largest ``Lambda_re Delta``, the longest memory), complex64 against
   complex128, on the same gaps and unit inputs (``jax.lax.scan`` with x64 enabled here only).
   Its error stays bounded when the decay is strong; bursts of equal timestamps (no decay)
   make it a plain sum.

Figures depend on the machine only through time; the errors are deterministic per ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EPS = 1e-6  # models/pooling.py TIMEPOOL_EPS


def checkpoints(total: int) -> list[int]:
    points, n = [], 10_000
    while n < total:
        points.append(n)
        n *= 10
    return points + [total]


def head_drift(config_name: str, backend: str, total: int, rate: float, packet: int,
               seed: int) -> dict:
    """Items 1 and 2 of the module docstring on the real step."""
    from evssm.models.streaming import load_model

    model = load_model(f"config:{config_name}", backend=backend)
    cfg = model.config
    if cfg.head != "timepool" or cfg.pooling_mode != "timepool":
        raise SystemExit(f"--config {config_name}: needs a timepool head and pooling")
    down = cfg.downsampling
    offsets = model.layout.offsets
    head_w, head_z = offsets["head"]["sum_w"], offsets["head"]["sum_z"]
    width = cfg.stage_width(cfg.num_stages - 1)
    first = offsets["layers"][0]
    rng = np.random.default_rng(seed)
    state = model.init_state(1)
    ref_sum_w = 0.0  # float64: completed final-rate windows' (dt + eps)
    window_us = 0  # integer us of the current final-rate window (exact)
    in_window = 0
    rows, done, started = [], 0, time.perf_counter()
    marks = checkpoints(total)
    lengths = np.array([packet], np.int32)
    for mark in marks:
        while done < mark:
            n = min(packet, mark - done)
            gaps = np.minimum(rng.poisson(1e6 / rate, n), np.iinfo(np.int32).max).astype(np.int32)
            if done == 0:
                gaps[0] = 0
            tokens = rng.integers(0, cfg.num_embeddings, n).astype(np.int32)
            tok = np.full((1, packet), -1, np.int32)
            gap = np.zeros((1, packet), np.int32)
            tok[0, :n], gap[0, :n] = tokens, gaps
            lengths[0] = n
            state, logits, _ = model.step(state, tok, gap, lengths)
            # float64 reference of the head's divisor, window by window (integer us: exact).
            g = gaps.astype(np.int64)
            pos = 0
            while pos < n:
                take = min(down - in_window, n - pos)
                window_us += int(g[pos:pos + take].sum())
                in_window += take
                pos += take
                if in_window == down:
                    ref_sum_w += window_us * 1e-3 + EPS
                    window_us, in_window = 0, 0
            done += n
        row = np.asarray(state)[0]
        f32 = row[:model.layout.float_words].view(np.float32)
        sum_w = float(f32[head_w])
        sum_z = f32[head_z:head_z + width]
        part_dt = float(f32[first["sum_dt"]]) if "sum_dt" in first else 0.0
        ref_part = window_us * 1e-3 if cfg.num_stages == 1 else None
        rows.append({
            "events": done, "stream_s": None,
            "head_sum_w": sum_w, "head_sum_w_f64": ref_sum_w,
            "head_sum_w_rel_err": abs(sum_w - ref_sum_w) / ref_sum_w if ref_sum_w else 0.0,
            "head_sum_z_finite": bool(np.isfinite(sum_z).all()),
            "logits_finite": bool(np.isfinite(np.asarray(logits)).all()),
            "window_sum_dt_abs_err_ms": None if ref_part is None else abs(part_dt - ref_part),
            "elapsed_s": round(time.perf_counter() - started, 1)})
    return {"config": config_name, "backend": model.backend, "downsampling": down,
            "rate": rate, "packet": packet, "points": rows}


def slowest_state(config_name: str) -> tuple[complex, complex]:
    """``(Lambda Delta, async gain)`` of the first layer's slowest state (largest
    ``Lambda_re Delta``: the longest memory), in float64."""
    from evssm.models.streaming import load_model

    model = load_model(f"config:{config_name}", backend="xla")
    ssm = model.variables["params"]["layers_0"]["ssm"]
    lre = np.asarray(ssm["Lambda_re"], np.float64)
    if model.config.clip_eigs:
        lre = np.minimum(lre, -1e-4)
    delta = model.config.step_rescale * np.exp(np.asarray(ssm["log_step"], np.float64))
    k = int(np.argmax(lre * delta))
    lam = complex(lre[k], float(np.asarray(ssm["Lambda_im"])[k])) * delta[k]
    return lam, (np.exp(lam) - 1) / lam


def recurrence_drift(lam: complex, gain: complex, total: int, rate: float, seed: int,
                     chunk: int) -> dict:
    """Item 3 of the module docstring: the slowest state, complex64 vs complex128."""
    import jax

    jax.config.update("jax_enable_x64", True)  # after every model is loaded (float32 models)
    import jax.numpy as jnp

    def run(dtype, real):
        step = jnp.asarray(lam, dtype)
        g = jnp.asarray(gain, dtype)

        def body(s, dt_ms):
            s = jnp.exp(step * dt_ms.astype(real)) * s + g
            return s, None

        return jax.jit(lambda s, dts: jax.lax.scan(body, s, dts)[0])

    f32, f64 = run(jnp.complex64, jnp.float32), run(jnp.complex128, jnp.float64)
    rng = np.random.default_rng(seed)
    s32, s64 = jnp.zeros((), jnp.complex64), jnp.zeros((), jnp.complex128)
    rows, done = [], 0
    for mark in checkpoints(total):
        while done < mark:
            n = min(chunk, mark - done)
            dts = rng.poisson(1e6 / rate, n) * 1e-3
            s32, s64 = f32(s32, jnp.asarray(dts, jnp.float32)), f64(s64, jnp.asarray(dts))
            done += n
        a, b = complex(s32), complex(s64)
        rows.append({"events": done, "abs_state_f64": abs(b),
                     "rel_err": abs(a - b) / max(abs(b), 1e-30)})
    return {"lambda_delta_per_ms": [lam.real, lam.imag], "rate": rate, "points": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000_000, help="stream length")
    parser.add_argument("--rate", type=float, default=1e6, help="events per second")
    parser.add_argument("--config", default="tiny", help="configs/models/NAME.yaml")
    parser.add_argument("--backend", default="native", choices=["native", "xla"])
    parser.add_argument("--packet", type=int, default=4096, help="events per step")
    parser.add_argument("--recurrence-events", type=int, default=10_000_000,
                        help="stream length of the recurrence measurement (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "head": head_drift(args.config, args.backend, args.events, args.rate, args.packet,
                              args.seed)}
    if args.recurrence_events:
        lam, gain = slowest_state(args.config)
        for rate in (args.rate, 1e9):  # 1e9 events/s: bursts of equal timestamps (no decay)
            out.setdefault("recurrence", []).append(
                recurrence_drift(lam, gain, args.recurrence_events, rate, args.seed, 1 << 20))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
