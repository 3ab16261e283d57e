"""The trainer's steps on synthetic batches (no data set): the loss, a train step, an eval step,
as train() jits them (models/train.py, compile_steps)."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import pytest
from numeric import assert_close, assert_finite, seeded_rng

from evssm.models.config import ModelConfig, load_model_config
from evssm.models.input_pipeline import Batch, length_groups
from evssm.models.model import EventSSM
from evssm.models.train import (
    EpochSums,
    PartSteps,
    compile_steps,
    cross_entropy,
    eval_step,
    grouped_step,
    initial_state,
    loss_fn,
    make_optimizer,
)

# Dropout 0 and layer norm: the training pass computes the inference logits, so the loss can be
# computed by hand from eval_step's logits.
CONFIG = dict(d_model=16, d_state=16, block_size=8, num_stages=1, layers_per_stage=2,
              pooling_stride=4, dropout=0.0, num_classes=4)
TRAIN = {"ssm_base_lr": 1e-3, "accumulation": 1, "epochs": 1, "warmup_epochs": 0,
         "schedule": "constant", "lr_factor": 4, "weight_decay": 0.0, "ssm_weight_decay": 0.0}
BATCH, LENGTH = 8, 32
SEED = 5


@pytest.fixture(scope="module")
def steps() -> tuple[ModelConfig, Any, Any, Any]:
    """(config, optimiser, jitted train step, jitted eval step): compiled once for the file."""
    config = load_model_config("tiny", CONFIG)
    tx, _ = make_optimizer(TRAIN, steps_per_epoch=10, global_batch=BATCH)
    train_fn, eval_fn = compile_steps(EventSSM(config), tx, SEED)
    return config, tx, train_fn, eval_fn


def synthetic_batch(config: ModelConfig) -> dict[str, np.ndarray]:
    """Random recordings with one-hot targets; row 0 is empty (never ready), the last row is
    padding (weight 0), the others hold 16..32 events."""
    rng = seeded_rng("train-steps-batch")
    lengths = rng.integers(16, LENGTH + 1, BATCH).astype(np.int32)
    lengths[0] = 0
    tokens = rng.integers(0, config.num_embeddings, (BATCH, LENGTH)).astype(np.int32)
    gaps = rng.integers(1, 2000, (BATCH, LENGTH)).astype(np.int32)
    for b in range(BATCH):
        tokens[b, lengths[b]:] = -1
        gaps[b, lengths[b]:] = 0
    gaps[:, 0] = 0
    labels = rng.integers(0, config.num_classes, BATCH).astype(np.int32)
    weights = np.ones(BATCH, np.float32)
    weights[-1] = 0.0
    return {"tokens": tokens, "gaps": gaps, "lengths": lengths,
            "targets": np.eye(config.num_classes, dtype=np.float32)[labels], "labels": labels,
            "weights": weights}


def run_steps(steps: tuple[ModelConfig, Any, Any, Any], seed: int, count: int
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``count`` train steps on the synthetic batch from the state initialised by ``seed``."""
    config, tx, train_fn, _ = steps
    state, batch, history = initial_state(config, tx, seed), synthetic_batch(config), []
    for _ in range(count):
        state, metrics = train_fn(state, batch)
        history.append(jax.device_get(metrics))
    return state, history


def test_cross_entropy_by_hand() -> None:
    """softmax([0, ln 3]) = [1/4, 3/4]: CE is ln 4 for the first class, ln(4/3) for the second,
    and their mean for a half-and-half soft target."""
    logits = np.array([[0.0, math.log(3.0)]] * 3, np.float32)
    targets = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], np.float32)
    got = assert_finite(cross_entropy(logits, targets))
    assert_close(got, [math.log(4.0), math.log(4.0 / 3.0), 0.5 * math.log(4.0) + 0.5 * math.log(4.0 / 3.0)],
                 rtol=1e-6)


def test_eval_step_logits_and_readiness(steps) -> None:
    config, tx, _, eval_fn = steps
    state, batch = initial_state(config, tx, SEED), synthetic_batch(config)
    logits, ready = eval_fn(state["params"], state["batch_stats"], batch)
    assert logits.shape == (BATCH, config.num_classes) and ready.shape == (BATCH,)
    assert ready.dtype == bool
    assert_finite(logits)
    # An empty recording reaches no head; every row with 16+ events (4 pooled windows) does.
    assert not ready[0] and ready[1:].all()
    # The unjitted step gives the same answer.
    plain = eval_step(state["params"], state["batch_stats"], batch, module=EventSSM(config))
    assert_close(np.asarray(plain[0]), np.asarray(logits), rtol=1e-5, atol=1e-6)


def test_loss_is_the_weighted_cross_entropy_by_hand(steps) -> None:
    """loss = sum_b w_b CE_b / sum_b w_b with w = weights * ready; correct and count likewise."""
    config, tx, _, eval_fn = steps
    state, batch = initial_state(config, tx, SEED), synthetic_batch(config)
    logits, ready = (np.asarray(a) for a in eval_fn(state["params"], state["batch_stats"], batch))
    z = logits.astype(np.float64)
    log_p = z - z.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    w = batch["weights"] * ready
    expected = float((w * -log_p[np.arange(BATCH), batch["labels"]]).sum() / w.sum())
    loss, (_, correct, count) = loss_fn(state["params"], state["batch_stats"], batch,
                                        jax.random.PRNGKey(0), module=EventSSM(config))
    assert_close(float(loss), expected, rtol=1e-5)
    assert float(count) == w.sum() == BATCH - 2  # the empty row and the padding row count for 0
    assert float(correct) == float(((logits.argmax(-1) == batch["labels"]) * w).sum())


def test_train_step_lowers_the_loss_with_finite_metrics(steps) -> None:
    state, history = run_steps(steps, SEED, 8)
    for metrics in history:
        assert_finite(metrics["loss"])
        assert float(metrics["count"]) == BATCH - 2
        assert 0 <= float(metrics["correct"]) <= BATCH - 2
        assert int(metrics["events"]) == int(synthetic_batch(steps[0])["lengths"].sum())
    losses = [float(m["loss"]) for m in history]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * losses[0], losses
    assert int(state["step"]) == 8
    for leaf in jax.tree.leaves(state["params"]):
        assert_finite(leaf)
    sums = EpochSums()
    for metrics in history:
        sums.add(metrics)
    assert sums.count == 8 * (BATCH - 2) and sums.events == 8 * int(history[0]["events"])
    assert_close(sums.mean_loss, float(np.mean(losses)), rtol=1e-6)  # equal counts: the plain mean


def test_same_seed_same_parameters(steps) -> None:
    a, _ = run_steps(steps, SEED, 3)
    b, _ = run_steps(steps, SEED, 3)
    c, _ = run_steps(steps, SEED + 1, 3)
    leaves_a, leaves_b = jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert_finite(x)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Another seed starts elsewhere: the comparison above can fail.
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(leaves_a, jax.tree.leaves(c["params"]), strict=True))


@pytest.mark.parametrize("groups,accumulation", [(2, 1), (4, 2)])
def test_grouped_step_makes_the_one_batch_update(steps, groups: int, accumulation: int) -> None:
    """The batch cut into length-sorted groups, each padded to its own length, gives the update
    of the whole batch in one step (no dropout: equal up to float order), also when the
    optimiser accumulates steps; the groups hold less padding than the batch."""
    config = steps[0]
    tx, _ = make_optimizer(dict(TRAIN, accumulation=accumulation), steps_per_epoch=10,
                           global_batch=BATCH)
    train_fn, _ = compile_steps(EventSSM(config), tx, SEED)
    parts_fn = PartSteps.compile(EventSSM(config), tx, SEED)
    batch = synthetic_batch(config)
    parts = length_groups(Batch(**batch), groups, pad_unit=8)
    assert sum(p.tokens.size for p in parts) < batch["tokens"].size
    whole, grouped = initial_state(config, tx, SEED), initial_state(config, tx, SEED)
    for _ in range(2 * accumulation):
        whole, m_whole = train_fn(whole, batch)
        grouped, m_grouped = grouped_step(parts_fn, grouped, [vars(p) for p in parts])
        for key in ("loss", "correct", "count", "events"):
            assert_finite(m_grouped[key])
            assert_close(float(m_grouped[key]), float(m_whole[key]), rtol=1e-5, err_msg=key)
    assert int(grouped["step"]) == int(whole["step"]) == 2 * accumulation
    init = jax.tree.leaves(initial_state(config, tx, SEED)["params"])
    moved = 0
    for x, y, x0 in zip(jax.tree.leaves(grouped["params"]), jax.tree.leaves(whole["params"]),
                        init, strict=True):
        assert_finite(x)
        # Adam divides by sqrt(v): a near-zero gradient's float-order difference shows at a few
        # 1e-5 after a few steps; a wrong update would be off by about a step (1e-3 and more).
        assert_close(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-4)
        moved += not np.array_equal(np.asarray(y), np.asarray(x0))
    assert moved > 10  # trained parameters are compared, not two initialisations


def test_fresh_state_takes_the_padded_layout_with_the_same_results(monkeypatch) -> None:
    """A NumPy zero state (fresh_state, known at trace time) makes the strided layers of the
    training pass pad and reshape instead of gathering; logits and gradients equal those from
    init_state's traced zeros. Long enough rows (512 events, stride 4, two stages) that both strided layers take
    the block layout, with rows of different lengths and an empty one."""
    from evssm.models import pooling
    from evssm.models.model import fresh_state, init_state

    padded = []
    real_fresh = pooling._pool_windows_fresh
    monkeypatch.setattr(pooling, "_pool_windows_fresh",
                        lambda *a: padded.append(1) or real_fresh(*a))
    config = load_model_config("tiny", dict(CONFIG, num_stages=2, pooling_stride=4))
    module = EventSSM(config)
    rng = seeded_rng("fresh-state-batch")
    length = 512
    lengths = np.array([0, 100, 333, 512], np.int32)
    tokens = rng.integers(0, config.num_embeddings, (4, length)).astype(np.int32)
    gaps = rng.integers(1, 3000, (4, length)).astype(np.int32)
    for b, n in enumerate(lengths):
        tokens[b, n:], gaps[b, n:] = -1, 0
    variables = initial_state(config, make_optimizer(TRAIN, 10, 4)[0], SEED)
    params = variables["params"]

    def loss(p: Any, fresh: bool) -> Any:
        # Built inside the traced function, as the train and eval steps do.
        state = fresh_state(config, 4) if fresh else init_state(config, 4)
        # The training pass (no dropout here): every layer runs, none under a cond.
        (logits, ready, _), _ = module.apply({"params": p, "batch_stats": {}}, tokens, gaps,
                                             lengths, state, train=True, mutable=["batch_stats"])
        return (logits * ready[:, None]).sum(), logits

    for fresh in (True, False):  # the padded layout is taken only for the NumPy state
        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True),
                                     static_argnums=1)(params, fresh)
        if fresh:
            want_logits, want_grads = logits, grads
            assert len(padded) == 2  # both strided layers took it
        else:
            assert len(padded) == 2
            assert_close(np.asarray(want_logits), np.asarray(logits), rtol=1e-5, atol=1e-6)
            for x, y in zip(jax.tree.leaves(want_grads), jax.tree.leaves(grads), strict=True):
                assert_close(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(want_logits)).max() > 0


def test_grouped_gradient_is_the_batch_mean_gradient(steps) -> None:
    """Before the optimiser: the groups' summed gradients over the batch's weighted count equal
    the gradient of the batch-mean loss (no dropout), within float32 order."""
    config, tx = steps[0], steps[1]
    module = EventSSM(config)
    state = initial_state(config, tx, SEED)
    batch = synthetic_batch(config)
    parts_fn = PartSteps.compile(module, tx, SEED)
    sums = parts_fn.zero(state["params"])
    for index, part in enumerate(length_groups(Batch(**batch), 4, pad_unit=8)):
        _, sums = parts_fn.part(state["params"], state["batch_stats"], state["step"], sums,
                                vars(part), index)
    key = jax.random.PRNGKey(0)
    want = jax.grad(lambda p: loss_fn(p, state["batch_stats"], batch, key, module=module)[0])(
        state["params"])
    assert float(sums["count"]) == BATCH - 2
    leaves = jax.tree.leaves(want)
    assert len(leaves) > 10 and any(np.abs(np.asarray(g)).max() > 0 for g in leaves)
    for got, g in zip(jax.tree.leaves(sums["grads"]), leaves, strict=True):
        assert_close(np.asarray(got) / float(sums["count"]), np.asarray(g), rtol=1e-4, atol=1e-7)
