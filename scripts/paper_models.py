"""How exactly imported reference models reproduce the reference code, and what the options cost.

    .venv/bin/python scripts/paper_models.py [--fixtures DIR] [--bench] [--out FILE]

1. Imports every fixture of ``DIR`` (default ``../shared/fixtures/seed-checkpoints`` beside the
   repository: folders holding ``checkpoint/``, ``model.yaml`` and ``reference.npz``) with
   ``evssm import seed`` into a temporary folder, then reports the largest |logit difference|
   against the reference code's logits: the offline form (XLA), and every recording streamed in
   ``--packetisations`` random packetisations through the native step and through XLA's.
2. With ``--bench``: streaming throughput of one session, by packet size, of models with the
   reference options against the same weights without them, per backend, measured side by side
   (interleaved rounds: the median round, and the 10th-percentile call time, which other jobs
   on a shared machine disturb least; then the ratio with / without). Models: the imported
   SHD fixture (the published SHD architecture) and the published DVS architecture (random
   weights; the DVS fixture is a small version of it).

Prints JSON (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TASKS = {"shd": "shd", "ssc": "ssc", "dvs-mini": "dvs-gesture"}
TOLERANCE = {"shd": 1e-5, "ssc": 1e-5, "dvs-mini": 1e-4}
MAX_PACKET = 1536
OFF = {"time_lookahead": False, "layer_norm_eps": 1e-5, "gelu": "erf", "head_divisor": "weights"}


def accuracy(name: str, folder: Path, out: Path, packetisations: int) -> dict[str, Any]:
    from evssm.models.events import recording_inputs
    from evssm.models.seed_import import import_seed, load_reference_outputs
    from evssm.models.streaming import StreamingModel, random_packet_sizes

    import_seed(folder / "checkpoint", folder / "model.yaml", TASKS[name], out, progress=False)
    models = {b: StreamingModel.load(out, backend=b) for b in ("native", "xla")}
    sensor = models["xla"].config.sensor
    recordings, want = load_reference_outputs(folder / "reference.npz", sensor)
    inputs = [recording_inputs(sensor, r) for r in recordings]
    tokens = np.full((len(inputs), max(len(r) for r in recordings)), -1, np.int32)
    gaps = np.zeros(tokens.shape, np.int32)
    for i, (t, g) in enumerate(inputs):
        tokens[i, :len(t)], gaps[i, :len(g)] = t, g
    offline, _ = models["xla"].classify(tokens, gaps, np.array([len(t) for t, _ in inputs]))
    report: dict[str, Any] = {"recordings": [len(r) for r in recordings],
                              "tolerance": TOLERANCE.get(name),
                              "offline_xla": float(np.abs(np.asarray(offline) - want).max())}
    rng = np.random.default_rng(0)
    for backend, model in models.items():
        worst = 0.0
        for _ in range(packetisations):
            for i, (t, g) in enumerate(inputs):
                got, _ = model.stream(t, g, random_packet_sizes(rng, len(t), MAX_PACKET), MAX_PACKET)
                worst = max(worst, float(np.abs(got - want[i]).max()))
        report[f"streamed_{backend}"] = worst
    return report


def throughput(models: dict[str, Any], sizes: list[int], seconds: float, rounds: int
               ) -> dict[str, Any]:
    """One session's streaming speed per packet size for each model in ``models`` (same
    weights), measured in interleaved rounds. ``events_per_s``: the median round;
    ``events_per_s_p10_call``: from the 10th-percentile call time over all rounds (robust to other
    jobs on the machine); ``ratio``: with / without options of each figure."""
    from evssm.models.bench import timed

    rng = np.random.default_rng(1)
    vocab = next(iter(models.values())).config.num_embeddings
    result: dict[str, Any] = {}
    for size in sizes:
        tokens = rng.integers(0, vocab, (1, size)).astype(np.int32)
        gaps = rng.integers(0, 20, (1, size)).astype(np.int32)
        lengths = np.array([size], np.int32)
        rates: dict[str, list[float]] = {k: [] for k in models}
        calls: dict[str, list[float]] = {k: [] for k in models}
        states = {k: m.init_state(1) for k, m in models.items()}
        for _ in range(rounds):
            for key, model in models.items():
                # Bound now (defaults), not looked up when called: the loop moves on.
                def step(model: Any = model, key: str = key, states: dict[str, Any] = states,
                         tokens: np.ndarray = tokens, gaps: np.ndarray = gaps,
                         lengths: np.ndarray = lengths) -> None:
                    states[key], logits, _ = model.step(states[key], tokens, gaps, lengths)
                    np.asarray(logits)

                step()
                n, elapsed, latencies = timed(step, seconds)
                rates[key].append(n * size / elapsed)
                calls[key] += latencies
        figures = {k: {"events_per_s": statistics.median(rates[k]),
                       "events_per_s_p10_call": size / float(np.percentile(calls[k], 10)),
                       "calls": len(calls[k])} for k in models}
        result[f"packet_{size}"] = {
            **figures,
            "ratio_with_to_without": {
                f: figures["with_options"][f] / figures["without_options"][f]
                for f in ("events_per_s", "events_per_s_p10_call")}}
    return result


def bench(shd_checkpoint: Path, args: argparse.Namespace) -> dict[str, Any]:
    from evssm.models.checkpoint import load_checkpoint
    from evssm.models.config import load_model_config
    from evssm.models.seed_import import REFERENCE_LAYER_NORM_EPS, REFERENCE_OPTIONS
    from evssm.models.streaming import StreamingModel, init_variables

    shd_config, shd_vars, _ = load_checkpoint(shd_checkpoint)
    dvs = load_model_config("dvs")
    dvs_config = dvs.replace(**REFERENCE_OPTIONS, layer_norm_eps=REFERENCE_LAYER_NORM_EPS,
                             head_divisor="total_time")
    cases = {"shd (imported fixture)": (shd_config, shd_vars),
             "dvs (published architecture, random weights)": (dvs_config,
                                                              init_variables(dvs_config, 0))}
    report: dict[str, Any] = {}
    for label, (config, variables) in cases.items():
        plain = config.replace(**OFF)
        for backend in ("native", "xla"):
            print(f"benchmarking {label}, {backend} ...", file=sys.stderr, flush=True)
            models = {"with_options": StreamingModel(config, variables, backend=backend),
                      "without_options": StreamingModel(plain, variables, backend=backend)}
            assert all(m.backend == backend for m in models.values())
            report[f"{label} / {backend}"] = throughput(models, args.packet_sizes, args.seconds,
                                                        args.rounds)
    return report


def main() -> int:
    shared = Path(os.environ.get("EVSSM_SHARED_DIR") or REPO.parent / "shared")
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--fixtures", type=Path, default=shared / "fixtures" / "seed-checkpoints")
    parser.add_argument("--packetisations", type=int, default=3,
                        help="random packetisations of every recording, per backend")
    parser.add_argument("--bench", action="store_true", help="also measure throughput")
    parser.add_argument("--packet-sizes", type=int, nargs="+", default=[16, 256, 4096])
    parser.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds per figure")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if not args.fixtures.is_dir():
        raise SystemExit(f"no fixtures at {args.fixtures} (pass --fixtures DIR)")
    from evssm.models.bench import machine_info

    report: dict[str, Any] = {"command": " ".join(sys.argv), "machine": machine_info(),
                              "max_abs_logit_difference": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for folder in sorted(p for p in args.fixtures.iterdir() if p.name in TASKS):
            print(f"importing and checking {folder.name} ...", file=sys.stderr, flush=True)
            report["max_abs_logit_difference"][folder.name] = accuracy(
                folder.name, folder, Path(tmp) / folder.name, args.packetisations)
        if args.bench:
            report["streaming_throughput"] = {
                "seconds_per_measurement": args.seconds, "rounds": args.rounds,
                "native_threads": os.environ.get("EVSSM_NATIVE_THREADS", "default"),
                "models": bench(Path(tmp) / "shd", args)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
