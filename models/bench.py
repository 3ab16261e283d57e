"""Benchmark the model in-process: offline and streaming throughput, state size (JSON).

Figures per model config: offline forward events/s (batch 1 and batch 32), streaming events/s of
one session with state carried, by packet size, aggregate events/s of many sessions stepped
together through the session pool, and bytes of carried state per session. Random tokens with
short gaps (a fast sensor); every measurement runs after its compilation, for ``--seconds``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import machine
from .config import STREAMING_BACKENDS


def machine_info() -> dict[str, Any]:
    """:func:`evssm.models.machine.machine_info` (CPU model, cores, instruction sets) and JAX's
    backend, devices and version."""
    import jax

    return {**machine.machine_info(), "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "jax": jax.__version__}


def timed(fn: Callable[[], Any], seconds: float) -> tuple[int, float, list[float]]:
    """Run ``fn`` (which blocks until done) repeatedly for ``seconds``: (calls, elapsed, latencies)."""
    latencies = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - t0)
        if time.perf_counter() - start >= seconds:
            break
    return len(latencies), time.perf_counter() - start, latencies


def bench_config(name: str, seconds: float, packet_sizes: list[int], sessions: int,
                 offline_length: int, seed: int = 0, backend: str = "auto") -> dict[str, Any]:
    import jax

    from .config import load_model_config
    from .streaming import StreamingModel

    config = load_model_config(name)
    model = StreamingModel.from_config(config, seed=seed, backend=backend)
    rng = np.random.default_rng(seed)

    def inputs(batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = rng.integers(0, config.num_embeddings, (batch, length)).astype(np.int32)
        gaps = rng.integers(0, 20, (batch, length)).astype(np.int32)
        return tokens, gaps

    result: dict[str, Any] = {"config": config.to_dict(), "streaming_backend": model.backend,
                              "state_bytes_per_session":
                              model.state_bytes, "offline": {}, "streaming_one_session": {},
                              "streaming_many_sessions": {}}
    # Each measured call binds its inputs now (functools.partial), not the loop's variables.
    def classify(tokens: np.ndarray, gaps: np.ndarray, lengths: np.ndarray) -> None:
        jax.block_until_ready(model.classify(tokens, gaps, lengths))

    def step(state: list[Any], tokens: np.ndarray, gaps: np.ndarray, lengths: np.ndarray) -> None:
        state[0], logits, _ = model.step(state[0], tokens, gaps, lengths)
        jax.block_until_ready(logits)

    for batch in (1, 32) if offline_length > 0 else ():
        tokens, gaps = inputs(batch, offline_length)
        run = functools.partial(classify, tokens, gaps, np.full(batch, offline_length, np.int32))
        run()
        calls, elapsed, _ = timed(run, seconds)
        result["offline"][f"batch_{batch}"] = {
            "events_per_s": calls * batch * offline_length / elapsed,
            "sequence_events": offline_length, "calls": calls}
    for size in packet_sizes:
        tokens, gaps = inputs(1, size)
        step_one = functools.partial(step, [model.init_state(1)], tokens, gaps,
                                     np.array([size], np.int32))
        step_one()
        calls, elapsed, lat = timed(step_one, seconds)
        result["streaming_one_session"][f"packet_{size}"] = {
            "events_per_s": calls * size / elapsed, "calls": calls,
            "latency_ms_p50": 1e3 * float(np.percentile(lat, 50)),
            "latency_ms_p99": 1e3 * float(np.percentile(lat, 99))}
    size = 256
    tokens, gaps = inputs(sessions, size)
    lengths = np.full(sessions, size, np.int32)
    slots = np.arange(sessions, dtype=np.int32)
    pool = [model.init_state(sessions)]

    def step_many() -> None:
        pool[0], logits, _ = model.step_slots(pool[0], slots, tokens, gaps, lengths)
        jax.block_until_ready(logits)

    step_many()
    compilations = model.compilations
    calls, elapsed, lat = timed(step_many, seconds)
    result["streaming_many_sessions"] = {
        "sessions": sessions, "packet": size, "events_per_s": calls * sessions * size / elapsed,
        "calls": calls, "step_latency_ms_p50": 1e3 * float(np.percentile(lat, 50)),
        "step_latency_ms_p99": 1e3 * float(np.percentile(lat, 99)),
        "compilations_in_steady_state": model.compilations - compilations}
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", nargs="+", default=["dvs", "shd"],
                        help="model configs (configs/models/NAME.yaml) to benchmark")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--packet-sizes", type=int, nargs="+", default=[1, 16, 256, 4096],
                        help="packet sizes for the one-session streaming figure")
    parser.add_argument("--sessions", type=int, default=64,
                        help="sessions stepped together for the aggregate figure")
    parser.add_argument("--offline-length", type=int, default=4096,
                        help="events per recording for the offline figure (0: no offline figure)")
    parser.add_argument("--backend", choices=STREAMING_BACKENDS, default="auto",
                        help="streaming step: native (C++ kernel, CPU), xla, or auto (native "
                             "where it builds); the offline figures are always XLA's")
    parser.add_argument("--out", help="also write the JSON to this file")


def run(args: argparse.Namespace) -> int:
    from .config import load_model_config

    for name in args.configs:  # a misspelt name fails now, not after the others were measured
        load_model_config(name)
    report = {"benchmark": "evssm bench model", "command": " ".join(["evssm"] + sys.argv[1:]),
              "machine": machine_info(), "seconds_per_measurement": args.seconds, "models": {}}
    for name in args.configs:
        print(f"benchmarking {name} ...", file=sys.stderr)
        report["models"][name] = bench_config(name, args.seconds, args.packet_sizes,
                                              args.sessions, args.offline_length,
                                              backend=args.backend)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0
