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

All three are timed in interleaved rounds: the trainer's variants in this process, the paper's
code in a second process that waits while this one runs. ``/proc/loadavg`` is recorded after
each round.
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


def paper_code(code: str | None, python: str | None) -> bool:
    """``code`` is a checkout of the paper's repository and ``python`` a Python to run it."""
    return bool(code and python and Path(code, "event_ssm").is_dir() and Path(python).exists())


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


def our_passes(cfg: dict[str, Any], batches: list[Any], groups: int) -> dict[str, Any]:
    """``{variant: pass}``: each pass runs the batches once through that variant's compiled
    steps and returns the seconds of its steps, each timed to its metrics on the host."""
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
    parts_fn = steps.parts
    assert parts_fn is not None

    def one(state, batch):
        return steps.train(state, mesh.to_device(batch))

    def grouped(state, batch):
        parts = length_groups(batch, steps.groups, t["pad_unit"])
        return grouped_step(parts_fn, state, [mesh.to_device(p) for p in parts])

    def make_pass(fn):
        box = [jax.device_put(initial_state(model_cfg, tx, t["seed"]), mesh.replicated)]

        def run_pass() -> float:
            seconds = 0.0
            for batch in batches:
                tic = time.perf_counter()
                box[0], metrics = fn(box[0], batch)
                jax.device_get(metrics)
                seconds += time.perf_counter() - tic
            return seconds
        return run_pass

    return {"one-batch": make_pass(one), "grouped": make_pass(grouped)}


def real_fractions(batches: list[Any], groups: int, pad_unit: int) -> dict[str, float]:
    from evssm.models.input_pipeline import length_groups

    events = sum(b.num_events for b in batches)
    return {"one-batch": events / sum(b.tokens.size for b in batches),
            "grouped": events / sum(p.tokens.size for b in batches
                                    for p in length_groups(b, groups, pad_unit))}


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
    arrays["count"] = np.asarray(len(batches))
    np.savez(path, **arrays)


class PaperWorker:
    """The paper's code in its own Python: started (and its shapes compiled) once, then one
    timed pass over the batches per :meth:`run_pass`."""

    def __init__(self, code: Path, python: str, inputs: Path):
        self.proc = subprocess.Popen(
            [python, str(HERE), "--paper-worker", str(inputs)], cwd=code,
            env=dict(os.environ, PYTHONPATH=str(code)), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        self.info = self._read()  # after the compiling pass

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise SystemExit(f"the paper's code failed (exit {self.proc.wait()}); see its stderr")

    def run_pass(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("pass\n")
        self.proc.stdin.flush()
        return float(self._read()["seconds"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def paper_worker(inputs: Path) -> None:
    """Run inside the paper's own Python, from its checkout: its SHD medium model, its optimiser
    and its ``training_step``, jitted as its ``run_training.py`` does on one device. One
    untimed pass (compiling every shape), then a timed pass per ``pass`` line on stdin."""
    import jax
    from event_ssm.seq_model import BatchClassificationModel  # type: ignore[import-not-found]
    from event_ssm.ssm import init_S5SSM  # type: ignore[import-not-found]
    from event_ssm.train_utils import init_model_state, training_step  # type: ignore[import-not-found]
    from omegaconf import OmegaConf  # type: ignore[import-not-found]

    data = np.load(inputs)
    batches = [tuple(data[f"{k}{i}"] for k in ("tokens", "targets", "steps", "lengths"))
               for i in range(int(data["count"]))]
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
    inputs0, _, steps0, lengths0 = batches[0]
    state = init_model_state(jax.random.PRNGKey(1234), model, inputs0, steps0, lengths0, opt)
    step = jax.jit(training_step)
    box = [state, jax.random.PRNGKey(0)]

    def run_pass() -> float:
        seconds = 0.0
        for batch in batches:
            tic = time.perf_counter()
            step_key, box[1] = jax.random.split(box[1])
            box[0], metrics = step(box[0], batch, step_key)
            jax.device_get(metrics)
            seconds += time.perf_counter() - tic
        return seconds

    print(json.dumps({"first_pass_s": run_pass(), "jax": jax.__version__}), flush=True)
    for line in sys.stdin:
        if line.strip() == "pass":
            print(json.dumps({"seconds": run_pass()}), flush=True)


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
        paper_worker(Path(args.paper_worker))
        return 0

    cfg, batches = make_batches(args.batches, args.pad_unit, args.seed)
    report: dict[str, Any] = {
        "config": "task=shd dataset=spoken-digits, no augmentation, batch 32",
        "pad_unit": args.pad_unit, "batches": len(batches), "rounds": args.rounds,
        "groups": args.groups, "shapes": sorted({int(b.tokens.shape[1]) for b in batches}),
        "events": sum(b.num_events for b in batches), "load": [loadavg()]}
    passes = our_passes(cfg, batches, args.groups)
    code, python = args.paper_code, args.paper_python
    paper = None
    have_paper = paper_code(code, python)
    if not have_paper:
        print("paper's code: skipped (set EVSSM_PAPER_CODE to a checkout of its repository and "
              "EVSSM_PAPER_PYTHON to a Python with its packages)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        if have_paper:
            paper_inputs(batches, Path(tmp, "batches.npz"))
            paper = PaperWorker(Path(code), python, Path(tmp, "batches.npz"))
            passes["paper"] = paper.run_pass
        first = {name: fn() for name, fn in passes.items() if name != "paper"}  # compiles
        if paper is not None:
            first["paper"] = paper.info["first_pass_s"]
        seconds = {name: 0.0 for name in passes}
        for _ in range(args.rounds):  # interleaved
            for name, fn in passes.items():
                seconds[name] += fn()
            report["load"].append(loadavg())
        if paper is not None:
            paper.close()
    events = args.rounds * report["events"]
    fractions = real_fractions(batches, args.groups, args.pad_unit)
    for name in passes:
        report[name] = {"events_per_s": events / seconds[name], "seconds": seconds[name],
                        "steps": args.rounds * len(batches), "first_pass_s": first[name],
                        "real_fraction": fractions.get(name)}
    if paper is not None:
        report["paper"]["jax"] = paper.info["jax"]
        for name in ("one-batch", "grouped"):
            report[name]["vs_paper"] = report[name]["events_per_s"] / report["paper"]["events_per_s"]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
