"""Trainer, checkpoints and evaluation, on tiny models for a few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from numeric import assert_close

from evssm.cli import main as cli_main
from evssm.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from evssm.models.config import load_model_config
from evssm.models.streaming import StreamingModel, init_variables
from evssm.models.train import EpochBar, load_task_config, train

TINY = ["task=event-mnist", "model.d_model=16", "model.d_state=16", "model.num_stages=1",
        "model.layers_per_stage=2", "model.pooling_stride=16", "train.batch_size=16",
        "train.pad_unit=1024", "train.max_events=2048", "train.eval_batch_size=32",
        "train.warmup_epochs=0", "train.ssm_base_lr=2e-4"]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_epoch_bar_says_compiling_and_times_only_compiled_steps() -> None:
    """The first step (compiling) shows "compiling" and stays out of the rate and the ETA."""
    import io
    import time

    out = io.StringIO()
    bar = EpochBar(100, "epoch 1", compiling=True, file=out, mininterval=0)
    assert "compiling" in out.getvalue() and "?" in out.getvalue()  # no ETA before a step
    time.sleep(1.0)  # the compiling step
    bar.step(loss="1.000")
    for _ in range(4):
        time.sleep(0.02)
        bar.step(loss="0.500")
    d = bar.bar.format_dict
    assert (d["n"], d["initial"]) == (5, 1)
    assert 0.05 < d["elapsed"] < 0.9  # the clock started after the compiling step
    rate = (d["n"] - d["initial"]) / d["elapsed"]  # tqdm's own rate without smoothing
    with_compile = (d["total"] - d["n"]) * (1.0 + d["elapsed"]) / d["n"]
    assert (d["total"] - d["n"]) / rate < with_compile / 2  # what the ETA was before
    bar.close()
    last = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert "5/100" in last and "compiling" not in last and "loss=0.500" in last
    # Later epochs compile nothing: one bar, no "compiling".
    out = io.StringIO()
    bar = EpochBar(3, "epoch 2", compiling=False, file=out, mininterval=0)
    bar.step(loss="0.1")
    bar.close()
    assert "compiling" not in out.getvalue() and "1/3" in out.getvalue()

def final_state(run: Path, epochs: int = 2) -> dict:
    """The training state a run saved after its last epoch."""
    import orbax.checkpoint as ocp

    # orbax keeps only the latest epoch's training state (written beside, then the old removed).
    steps = sorted(p.name for p in (run / "train_state").iterdir() if p.name.isdigit())
    assert steps == [str(epochs)], steps
    with ocp.CheckpointManager((run / "train_state").absolute()) as states:
        return states.restore(states.latest_step())


def test_overrides_resolve_and_unknown_keys_fail() -> None:
    cfg = load_task_config(TINY + ["train.epochs=3", "augment.noise_p=0.5", "dataset=event-mnist"])
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["ssm_base_lr"] == pytest.approx(2e-4)
    assert cfg["model_overrides"]["d_model"] == 16 and cfg["augment"]["noise_p"] == 0.5
    for key, closest in (("train.epochz", "train.epochs"), ("model.d_modl", "model.d_model"),
                         ("augment.noise_pp", "augment.noise_p")):
        with pytest.raises(SystemExit, match=f"unknown key {key}; did you mean {closest}"):
            load_task_config([f"{key}=3"])
    with pytest.raises(SystemExit, match="no task"):
        load_task_config(["task=nope"])
    assert load_task_config(["classes=3,8"])["classes"] == [3, 8]
    assert load_task_config(["classes=[1, 2]"])["classes"] == [1, 2]
    assert load_task_config([])["classes"] is None
    with pytest.raises(SystemExit, match="class indices"):
        load_task_config(["classes=three"])


@pytest.mark.parametrize("args, message", [
    (["--processes", "0"], "--processes must be at least 1"),
    (["train.batch_size=15", "--processes", "2"], "not divisible by --processes 2"),
    (["classes=1,x"], "classes= takes class indices"),
    (["classes=1,1"], "at least two distinct class indices"),
])
def test_bad_arguments_exit_2_with_advice(args: list[str], message: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "evssm.cli", "train", *TINY, *args, "--out",
                           str(tmp_path / "run"), "--limit-train", "8", "--no-progress"],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "best").exists()


def test_checkpoint_round_trips_exactly(tmp_path: Path) -> None:
    config = load_model_config("tiny", {"norm": "batch"})
    variables = init_variables(config, 3)
    save_checkpoint(tmp_path / "ck", config, variables, task="unit")
    config2, loaded, meta = load_checkpoint(tmp_path / "ck")
    assert config2 == config and meta["task"] == "unit"
    flat = jax.tree.leaves_with_path(variables)
    flat2 = dict(jax.tree.leaves_with_path(loaded))
    assert len(flat) == len(flat2) and len(flat) > 10
    for path, leaf in flat:
        np.testing.assert_array_equal(np.asarray(flat2[path]), np.asarray(leaf))


def test_checkpoint_errors_say_what_is_wrong(tmp_path: Path) -> None:
    config = load_model_config("tiny")
    good = save_checkpoint(tmp_path / "good", config, init_variables(config, 0))
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="evssm.json is missing$"):
        load_checkpoint(tmp_path / "empty")
    # A training run folder instead of its best/ checkpoint: the error names the checkpoint.
    subprocess.run(["cp", "-r", str(good), str(tmp_path / "empty" / "best")], check=True)
    with pytest.raises(CheckpointError, match=f"training run folder: its checkpoint is "
                                              f"{tmp_path / 'empty' / 'best'}"):
        load_checkpoint(tmp_path / "empty")
    meta = json.loads((good / "evssm.json").read_text())

    def variant(name: str, text: str) -> Path:
        d = tmp_path / name
        subprocess.run(["cp", "-r", str(good), str(d)], check=True)
        (d / "evssm.json").write_text(text)
        return d

    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(variant("trunc", json.dumps(meta)[:40]))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(variant("version", json.dumps({**meta, "format_version": 99})))
    other = dict(meta, config=dict(meta["config"], d_model=24))
    with pytest.raises(CheckpointError, match="does not match its config's architecture"):
        load_checkpoint(variant("arch", json.dumps(other)))
    broken = variant("novars", json.dumps(meta))
    subprocess.run(["rm", "-r", str(broken / "variables")], check=True)
    with pytest.raises(CheckpointError, match="variables/ is missing"):
        load_checkpoint(broken)


@pytest.mark.slow
def test_training_learns_resumes_reproducibly_and_evaluates(tmp_path: Path, capsys) -> None:
    """Loss falls; 1 epoch + resume equals 2 epochs straight (same seed, CPU); the best
    checkpoint serves and `evssm eval` finds both forms in agreement."""
    overrides = TINY + ["train.epochs=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    kwargs = dict(limit_train=96, limit_valid=32, limit_test=24, progress=False)
    assert train(load_task_config(overrides), straight, **kwargs) == 0
    metrics = read_metrics(straight)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"]
    assert (straight / "config.yaml").exists() and list((straight / "tb").iterdir())
    # best/ was chosen on the validation split; the test split was measured once, on best/.
    test = json.loads((straight / "test.json").read_text())
    best = max(metrics, key=lambda m: (m["valid_accuracy"], m["epoch"]))
    assert test["selected_on"] == "valid" and test["split"] == "test" and test["samples"] == 24
    assert test["epoch"] == best["epoch"] and 0.0 <= test["accuracy"] <= 1.0
    summary = json.loads((straight / "best" / "evssm.json").read_text())["summary"]
    assert summary["test"] == test and summary["valid_split"] == "valid"

    # The same run, stopped after epoch 1 and resumed.
    assert train(load_task_config(overrides), split, stop_after=1, **kwargs) == 0
    assert [m["epoch"] for m in read_metrics(split)] == [1]
    assert not (split / "test.json").exists()  # tested only by the run that ends the schedule
    assert train(load_task_config(overrides), split, resume=True, **kwargs) == 0
    assert [m["epoch"] for m in read_metrics(split)] == [1, 2]
    assert json.loads((split / "test.json").read_text()) == test


    final_a, final_b = final_state(straight), final_state(split)
    leaves_a, leaves_b = jax.tree.leaves(final_a["params"]), jax.tree.leaves(final_b["params"])
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    model = StreamingModel.load(straight / "best")
    assert model.info["trained"] and model.config.sensor.width == 34
    capsys.readouterr()
    code = cli_main(["eval", str(straight / "best"), "--limit", "24", "--batch-size", "8",
                     "--packet-events", "100", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["forms_agree"] and result["samples"] == 24
    assert result["offline"]["accuracy"] == result["streaming"]["accuracy"]


def test_compilation_cache_folder(monkeypatch, tmp_path: Path) -> None:
    """`--compilation-cache`: the default is under $EVSSM_CACHE_DIR, `off`/`none` turn it off."""
    from evssm.models.xla_cache import cache_folder

    monkeypatch.setenv("EVSSM_CACHE_DIR", str(tmp_path))
    assert cache_folder(None) == str(tmp_path / "xla")
    assert cache_folder("off") is None and cache_folder(" None ") is None
    assert cache_folder("/data/xla") == "/data/xla"


@pytest.mark.slow
def test_data_parallel_over_forced_host_devices(tmp_path: Path) -> None:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    out = tmp_path / "dp"
    proc = subprocess.run(
        [sys.executable, "-m", "evssm.cli", "train", *TINY, "train.epochs=1", "--out", str(out),
         "--limit-train", "32", "--limit-valid", "16", "--limit-test", "16", "--no-progress",
         "--compilation-cache", str(tmp_path / "xla")],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 device(s)" in proc.stderr
    assert any((tmp_path / "xla").iterdir()), "the run kept its compiled steps"
    assert read_metrics(out)[0]["train_loss"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("grouped", [False, True], ids=["one-batch", "length-groups"])
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path: Path,
                                                                  grouped: bool) -> None:
    """`evssm train --processes 2`: two processes on loopback (gloo collectives), each feeding
    half of every global batch, end with the parameters of one process fed the whole batch; the
    run directory is written once. In length groups (each process sorts its own rows, so the
    groups differ from one process's) the masks of dropout differ: compared without dropout."""
    overrides = TINY + ["train.epochs=1"]
    if grouped:
        overrides += ["train.length_groups=4", "model.dropout=0"]
    limits = ["--limit-train", "32", "--limit-valid", "16", "--limit-test", "16"]
    two = tmp_path / "two"
    proc = subprocess.run(
        [sys.executable, "-m", "evssm.cli", "train", *overrides, "--out", str(two), *limits,
         "--no-progress", "--processes", "2"],
        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 device(s) in 2 process(es)" in proc.stderr
    assert proc.stderr.count("epoch 1: train loss") == 1  # process 0 reports, the other is quiet
    one = tmp_path / "one"
    assert train(load_task_config(overrides), one, limit_train=32, limit_valid=16, limit_test=16,
                 progress=False) == 0

    a, b = final_state(two, epochs=1), final_state(one, epochs=1)
    assert int(a["step"]) == int(b["step"]) == 2
    leaves_a = jax.tree.leaves_with_path(a["params"])
    leaves_b = dict(jax.tree.leaves_with_path(b["params"]))
    assert len(leaves_a) == len(leaves_b) > 10
    seed = load_task_config(overrides)["train"]["seed"]
    config = StreamingModel.load(one / "best").config
    init = dict(jax.tree.leaves_with_path(init_variables(config, seed)["params"]))
    moved = 0
    for path, x in leaves_a:
        x, y = np.asarray(x), np.asarray(leaves_b[path])
        assert np.isfinite(x).all() and np.isfinite(y).all(), jax.tree_util.keystr(path)
        assert_close(x, y, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
        moved += not np.array_equal(y, np.asarray(init[path]))
    assert moved > 10  # the comparison is of trained parameters, not of two initialisations
    metrics_a, metrics_b = read_metrics(two), read_metrics(one)
    assert len(metrics_a) == 1  # one writer
    assert metrics_a[0]["train_loss"] == pytest.approx(metrics_b[0]["train_loss"], rel=1e-4)
    assert metrics_a[0]["valid_accuracy"] == metrics_b[0]["valid_accuracy"]
    test_a = json.loads((two / "test.json").read_text())
    assert test_a["samples"] == 16 and test_a["accuracy"] == json.loads(
        (one / "test.json").read_text())["accuracy"]
