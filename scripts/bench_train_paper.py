"""Training throughput side by side: this trainer's compiled steps against the paper's reference
code, on the same batches of the same data.

    .venv/bin/python scripts/bench_train_paper.py --batches 8 --rounds 2 --out docs/bench/train_paper.json
    EVSSM_PAPER_CODE=/path/to/event-ssm EVSSM_PAPER_PYTHON=/path/to/venv/bin/python \\
        .venv/bin/python scripts/bench_train_paper.py

The configuration is ``task=shd`` (its model, batch 32) on ``dataset=spoken-digits`` (SHD's file
layout), with no augmentation; the first ``--batches`` training batches of epoch 0, each padded to
a multiple of ``--pad-unit`` events. Every shape is compiled (one untimed pass over the batches)
before ``--rounds`` timed passes. The figure is real (unpadded) events per second of compiled
training steps, each step timed to its metrics on the host:

- ``one-batch``: this trainer, each batch in one step (``train.length_groups=1``);
- ``grouped``: this trainer, each batch in ``--groups`` length-sorted groups
  (``train.length_groups``) with one optimiser update;
- ``paper``: the paper's ``training_step`` (``event_ssm/train_utils.py``) jitted as its
  ``run_training.py`` does on one device, its SHD ``medium`` model, the same rows at the same
  padded length (its inputs: token ``i`` with the gap to event ``i + 1`` in ms, length ``n - 1``).
  It runs in its own Python (``--paper-python`` / ``EVSSM_PAPER_PYTHON``) from a checkout of its
  repository (``--paper-code`` / ``EVSSM_PAPER_CODE``); without them it is skipped, with a
  message. Its code is never copied here.

The two trainer variants are timed in interleaved rounds in one process; the paper's code in a
second process right after. ``/proc/loadavg`` is recorded with each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def make_batches(count: int, pad_unit: int, seed: int) -> tuple[dict[str, Any], list[Any]]:
    """(the run's resolved configuration, the first ``count`` training batches of epoch 0)."""
    from evssm.models.input_pipeline import train_batches
    from evssm.models.train import load_task_config, open_data

    cfg = load_task_config(["task=shd", "dataset=spoken-digits", f"train.pad_unit={pad_unit}",
                            f"train.seed={seed}"])
    cfg["augment"] = {}
    data = open_data(cfg, None, None)
    t = cfg["train"]
    batches = []
    for batch in train_batches(data.train, t["batch_size"], len(data.train.class_names), pad_unit,
                               None, None, seed, 0):
        batches.append(batch)
        if len(batches) == count:
            break
    cfg["_train_ds"] = data.train
    return cfg, batches


def time_ours(cfg: dict[str, Any], batches: list[Any], groups: int, rounds: int
              ) -> dict[str, Any]:
    """Compile every shape of both variants, then ``rounds`` interleaved timed passes."""
    import jax

    from evssm.models.input_pipeline import length_groups
    from evssm.models.model import EventSSM
    from evssm.models.train import (
        DataMesh,
        TrainSteps,
        grouped_step,
        initial_state,
        make_optimizer,
        resolve_model_config,
    )

    t = dict(cfg["train"])
    model_cfg = resolve_model_config(cfg, cfg.pop("_train_ds"))
    mesh = DataMesh.create(t)
    tx, _ = make_optimizer(t, 100, t["batch_size"])
    steps = TrainSteps.compile(EventSSM(model_cfg), tx, dict(t, length_groups=groups), mesh)
    assert steps.parts is not None

    def one(state, batch):
        return steps.train(state, mesh.to_device(batch))

    def grouped(state, batch):
        parts = length_groups(batch, groups, t["pad_unit"])
        return grouped_step(steps.parts, state, [mesh.to_device(p) for p in parts])

    variants = {"one-batch": one, "grouped": grouped}
    states = {name: jax.device_put(initial_state(model_cfg, tx, t["seed"]), mesh.replicated)
              for name in variants}
    seconds: dict[str, float] = {name: 0.0 for name in variants}
    compile_s: dict[str, float] = {}
    for timed in [False] + [True] * rounds:
        for name, fn in variants.items():
            tic = time.perf_counter()
            for batch in batches:
                step_tic = time.perf_counter()
                states[name], metrics = fn(states[name], batch)
                jax.device_get(metrics)
                if timed:
                    seconds[name] += time.perf_counter() - step_tic
            if not timed:
                compile_s[name] = time.perf_counter() - tic
    events = rounds * sum(b.num_events for b in batches)
    slots = {"one-batch": sum(b.tokens.size for b in batches),
             "grouped": sum(p.tokens.size for b in batches
                            for p in length_groups(b, groups, t["pad_unit"]))}
    return {name: {"events_per_s": events / seconds[name], "seconds": seconds[name],
                   "steps": rounds * len(batches), "first_pass_s": compile_s[name],
                   "real_fraction": sum(b.num_events for b in batches) / slots[name]}
            for name in variants}


def paper_inputs(batches: list[Any], path: Path) -> None:
    """The batches in the paper's collate format (``event_stream_collate_fn``): token ``i``
    paired with the gap to event ``i + 1`` in ms, ``n - 1`` model events, -1 / 0 padding; the
    same padded length as this trainer's batch."""
    arrays: dict[str, np.ndarray] = {}
    for i, b in enumerate(batches):
        tokens = np.where(np.arange(b.tokens.shape[1] - 1)[None] < (b.lengths - 1)[:, None],
                          b.tokens[:, :-1], -1).astype(np.int32)
        steps = (b.gaps[:, 1:] / 1000.0).astype(np.float32)
        pad = ((0, 0), (0, 1))
        arrays[f"tokens{i}"] = np.pad(tokens, pad, constant_values=-1)
        arrays[f"steps{i}"] = np.pad(steps, pad)
        arrays[f"lengths{i}"] = np.maximum(b.lengths - 1, 0).astype(np.int32)
        arrays[f"targets{i}"] = b.targets
        arrays[f"events{i}"] = np.asarray(b.num_events)
    np.savez(path, count=len(batches), **arrays)


def time_paper(code: Path, python: str, inputs: Path, rounds: int) -> dict[str, Any]:
    proc = subprocess.run([python, str(HERE), "--paper-worker", str(inputs), "--rounds", str(rounds)],
                          cwd=code, env=dict(os.environ, PYTHONPATH=str(code)), capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"the paper's code failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def paper_worker(inputs: Path, rounds: int) -> None:
    """Run inside the paper's own Python, from its checkout: its SHD medium model, its optimiser
    and its ``training_step``, jitted as its ``run_training.py`` does on one device."""
    import jax
    from event_ssm.seq_model import BatchClassificationModel  # type: ignore[import-not-found]
    from event_ssm.ssm import init_S5SSM  # type: ignore[import-not-found]
    from event_ssm.train_utils import init_model_state, training_step  # type: ignore[import-not-found]
    from omegaconf import OmegaConf  # type: ignore[import-not-found]

    data = np.load(inputs)
    batches = [tuple(data[f"{k}{i}"] for k in ("tokens", "targets", "steps", "lengths"))
               for i in range(int(data["count"]))]
    events = sum(int(data[f"events{i}"]) for i in range(int(data["count"])))
    model = BatchClassificationModel(
        ssm=init_S5SSM(C_init="lecun_normal", dt_min=0.004, dt_max=0.1, conj_sym=False,
                       clip_eigs=False),
        num_classes=20, num_embeddings=700, discretization="async", d_model=96, d_ssm=128,
        ssm_block_size=8, num_stages=2, num_layers_per_stage=3, dropout=0.23,
        classification_mode="pool", prenorm=True, batchnorm=False, bn_momentum=0.95,
        pooling_stride=8, pooling_mode="avgpool", state_expansion_factor=1)
    opt = OmegaConf.create({"ssm_lr": 1.7e-5 * 32, "lr_factor": 10, "ssm_weight_decay": 0.0,
                            "weight_decay": 0.03, "schedule": "cosine", "total_steps": 100,
                            "warmup_steps": 10, "accumulation_steps": 1})
    key = jax.random.PRNGKey(1234)
    inputs0, _, steps0, lengths0 = batches[0]
    state = init_model_state(key, model, inputs0, steps0, lengths0, opt)
    step = jax.jit(training_step)
    dropout_key = jax.random.PRNGKey(0)
    seconds, first = 0.0, 0.0
    for timed in [False] + [True] * rounds:
        tic = time.perf_counter()
        for batch in batches:
            step_tic = time.perf_counter()
            step_key, dropout_key = jax.random.split(dropout_key)
            state, metrics = step(state, batch, step_key)
            jax.device_get(metrics)
            if timed:
                seconds += time.perf_counter() - step_tic
        if not timed:
            first = time.perf_counter() - tic
    print(json.dumps({"events_per_s": rounds * events / seconds, "seconds": seconds,
                      "steps": rounds * len(batches), "first_pass_s": first,
                      "jax": jax.__version__}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=8, help="training batches of epoch 0")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes over them")
    parser.add_argument("--groups", type=int, default=4, help="length groups of the grouped step")
    parser.add_argument("--pad-unit", type=int, default=1024, help="padding unit on both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paper-code", default=os.environ.get("EVSSM_PAPER_CODE"),
                        help="a checkout of the paper's repository (or EVSSM_PAPER_CODE)")
    parser.add_argument("--paper-python", default=os.environ.get("EVSSM_PAPER_PYTHON"),
                        help="the Python that runs it (or EVSSM_PAPER_PYTHON)")
    parser.add_argument("--out", help="write the JSON report here too")
    parser.add_argument("--paper-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.paper_worker:
        paper_worker(Path(args.paper_worker), args.rounds)
        return 0

    cfg, batches = make_batches(args.batches, args.pad_unit, args.seed)
    report: dict[str, Any] = {
        "config": "task=shd dataset=spoken-digits, no augmentation, batch 32",
        "pad_unit": args.pad_unit, "batches": len(batches), "rounds": args.rounds,
        "groups": args.groups, "shapes": sorted({int(b.tokens.shape[1]) for b in batches}),
        "events": sum(b.num_events for b in batches)}
    report["load_before"] = loadavg()
    report.update(time_ours(cfg, batches, args.groups, args.rounds))
    report["load_after_ours"] = loadavg()
    code, python = args.paper_code, args.paper_python
    if not code or not python or not Path(code, "event_ssm").is_dir() or not Path(python).exists():
        print("paper's code: skipped (set EVSSM_PAPER_CODE to a checkout of its repository and "
              "EVSSM_PAPER_PYTHON to a Python with its packages)", file=sys.stderr)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            paper_inputs(batches, Path(tmp, "batches.npz"))
            report["paper"] = time_paper(Path(code), python, Path(tmp, "batches.npz"), args.rounds)
        report["load_after_paper"] = loadavg()
        for name in ("one-batch", "grouped"):
            report[name]["vs_paper"] = report[name]["events_per_s"] / report["paper"]["events_per_s"]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
