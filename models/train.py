"""Train an EventSSM model: ``evssm train task=NAME [model=NAME] [key=value ...] [--out DIR]``.

Configuration: a task (``configs/tasks/NAME.yaml``) names its data set, its default model
(``configs/models/NAME.yaml``), training settings and augmentations. Any key can be overridden on
the command line: ``model.d_model=32``, ``train.epochs=3``, ``augment.cut_mix_p=0``,
``dataset=...``, ``data_dir=...``. The resolved configuration is saved with the run.

Optimisation (docs/architecture.md, "Training"): softmax cross-entropy on soft targets; AdamW in two groups —
``B``, ``Lambda_re``, ``Lambda_im`` at ``ssm_lr = ssm_base_lr * batch_size * accumulation`` with
``ssm_weight_decay``, everything else at ``ssm_lr * lr_factor`` with ``weight_decay`` — warm-up then
cosine decay (or constant), gradient accumulation. Data-parallel over every device of the job
(batch sharded, parameters replicated): this process's, or several processes' joined through
``jax.distributed`` (``--processes N`` here, or the JAX_* variables on a cluster; see
:mod:`.distributed` and docs/training.md).

The run directory holds ``config.yaml``, ``metrics.jsonl``, TensorBoard events in ``tb/``, the best
checkpoint by validation accuracy in ``best/`` (a checkpoint ``evssm serve`` and ``evssm eval``
load), ``train_state/`` for ``--resume``, and ``test.json``: ``best/`` measured once on the test
split when the schedule is done.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import os
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, cast

import numpy as np
import yaml

from . import distributed
from .config import ModelConfig, configs_dir, load_model_config, parse_value
from .data.augment import AugmentConfig

SSM_PARAMS = ("B", "Lambda_re", "Lambda_im")
COMPILATION_CACHE_ENV = "EVSSM_COMPILATION_CACHE"  # the server's setting of the same name
SECTIONS = ("train", "augment")


# --- configuration -------------------------------------------------------------------------
def load_task_config(overrides: list[str]) -> dict[str, Any]:
    """Resolve ``task=NAME``, ``model=NAME`` and dotted ``key=value`` overrides into one dict:
    ``{"task", "dataset", "data_dir", "model": ModelConfig dict, "train": {...},
    "augment": {...}}``."""
    pairs: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"evssm train: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        pairs[key.strip()] = parse_value(value)
    task_name = str(pairs.pop("task", "event-mnist"))
    task_path = configs_dir() / "tasks" / f"{task_name}.yaml"
    if not task_path.exists():
        names = sorted(p.stem for p in (configs_dir() / "tasks").glob("*.yaml"))
        raise SystemExit(f"evssm train: no task {task_name!r}; available: {', '.join(names)}")
    task = yaml.safe_load(task_path.read_text())
    model_name = str(pairs.pop("model", task["model"]))
    model_overrides = {k[len("model."):]: v for k, v in pairs.items() if k.startswith("model.")}
    resolved: dict[str, Any] = {
        "task": task_name,
        "dataset": pairs.pop("dataset", task["dataset"]),
        "data_dir": pairs.pop("data_dir", None),
        "classes": parse_classes(pairs.pop("classes", None)),
        "model_name": model_name,
        "train": dict(task.get("train", {})),
        "augment": dict(task.get("augment", {})),
    }
    for key, value in pairs.items():
        section, _, name = key.partition(".")
        if section == "model":
            continue
        if section not in SECTIONS or not name:
            raise SystemExit(f"evssm train: unknown key {key!r} (use task=, model=, dataset=, "
                             f"data_dir=, classes=, model.KEY=, train.KEY=, augment.KEY=)")
        if section == "train" and name not in resolved["train"]:
            raise SystemExit(f"evssm train: unknown key {key}{_did_you_mean(key, resolved['train'], 'train.')}")
        resolved[section][name] = value
    # Checked before any data is read: a misspelt key must not cost a data set load first.
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)} - {"sensor", "num_classes", "class_names"}
    augment_keys = {f.name for f in dataclasses.fields(AugmentConfig)}
    for section, given, known in (("model", model_overrides, model_keys), ("augment", resolved["augment"],
                                                                          augment_keys)):
        unknown = sorted(set(given) - known)
        if unknown:
            key = f"{section}.{unknown[0]}"
            raise SystemExit(f"evssm train: unknown key {key}{_did_you_mean(key, known, section + '.')}")
    resolved["model_overrides"] = model_overrides
    return resolved


def _did_you_mean(key: str, known: Collection[str], prefix: str) -> str:
    """``"; did you mean model.d_model?"`` (the closest known key), else the known keys."""
    names = [prefix + k for k in sorted(known)]
    close = difflib.get_close_matches(key, names, n=1)
    return f"; did you mean {close[0]}?" if close else f"; known: {', '.join(names)}"


def parse_classes(value: Any) -> list[int] | None:
    """``classes=3,8`` or ``classes=[3, 8]``: train on those classes only (a reduced task)."""
    if value is None:
        return None
    items = value if isinstance(value, list) else str(value).split(",")
    try:
        return [int(c) for c in items]
    except (TypeError, ValueError):
        raise SystemExit(f"evssm train: classes= takes class indices like 3,8; got {value!r}") from None


def open_split(cfg: dict[str, Any], split: str, limit: int | None):
    """``split`` of the run's data set: only ``cfg["classes"]`` (relabelled) when it names
    some, then the first ``limit`` samples."""
    from .data import ClassSubset, Subset, load_dataset

    if not cfg.get("classes"):
        return load_dataset(cfg["dataset"], split, cfg["data_dir"], limit=limit)
    try:
        ds = ClassSubset(load_dataset(cfg["dataset"], split, cfg["data_dir"]), cfg["classes"])
    except ValueError as exc:
        raise SystemExit(f"evssm train: {exc}") from None
    return ds if limit is None or limit >= len(ds) else Subset(ds, np.arange(limit))


# --- optimisation --------------------------------------------------------------------------
def make_optimizer(train: dict[str, Any], steps_per_epoch: int, global_batch: int):
    """Two-group AdamW with warm-up + cosine (or constant) schedule and accumulation."""
    import jax
    import optax

    ssm_lr = train["ssm_base_lr"] * global_batch * train["accumulation"]
    total = max(1, train["epochs"] * steps_per_epoch)
    warmup = min(total - 1, train["warmup_epochs"] * steps_per_epoch)

    def schedule(peak: float):
        if train["schedule"] == "constant":
            return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)),
                                         optax.constant_schedule(peak)], [warmup])
        if train["schedule"] != "cosine":
            raise SystemExit(f"evssm train: schedule must be cosine or constant, "
                             f"got {train['schedule']!r}")
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=0.0)

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "ssm" if getattr(path[-1], "key", None) in SSM_PARAMS else "other",
            params)

    tx = optax.multi_transform({
        "ssm": optax.adamw(schedule(ssm_lr), weight_decay=train["ssm_weight_decay"]),
        "other": optax.adamw(schedule(ssm_lr * train["lr_factor"]),
                             weight_decay=train["weight_decay"]),
    }, labels)
    if train["accumulation"] > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=train["accumulation"])
    return tx, ssm_lr


# --- the steps -----------------------------------------------------------------------------
# Module-level and explicit in what they read; train() binds the module, the optimiser and the
# seed with functools.partial and jits them (compile_steps), donating the training state.
def cross_entropy(logits, targets):
    """Softmax cross-entropy with soft targets: logits, targets [B, C] -> [B]."""
    import jax

    return -(targets * jax.nn.log_softmax(logits)).sum(-1)


def loss_sums(params: Any, batch_stats: Any, batch: dict[str, Any], key: Any, *, module: Any
              ) -> tuple[Any, tuple[Any, Any, Any]]:
    """The un-normalised loss of ``module`` (an :class:`~.model.EventSSM`) on a training batch,
    dropout drawn from ``key``: with ``w_b = weights_b * ready_b`` (a padding row or a recording
    too short to reach the head counts for nothing),

        S = sum_b w_b CE(logits_b, targets_b)

    -> ``(S, (batch_stats', correct, count))``: the updated batch statistics, the weighted count
    of rows whose argmax is the label, and ``sum_b w_b``. ``batch`` holds tokens, gaps int32
    [B, L], lengths int32 [B], targets float32 [B, C], labels int32 [B], weights [B]. ``w`` does
    not depend on the parameters, so the gradients of several parts' ``S`` add up to the whole
    batch's."""
    from .model import fresh_state

    state0 = fresh_state(module.config, batch["tokens"].shape[0])
    (logits, ready, _), updates = module.apply(
        {"params": params, "batch_stats": batch_stats}, batch["tokens"], batch["gaps"],
        batch["lengths"], state0, train=True, rngs={"dropout": key}, mutable=["batch_stats"])
    w = batch["weights"] * ready
    total = (w * cross_entropy(logits, batch["targets"])).sum()
    correct = ((logits.argmax(-1) == batch["labels"]) * w).sum()
    return total, (updates.get("batch_stats", batch_stats), correct, w.sum())


def loss_fn(params: Any, batch_stats: Any, batch: dict[str, Any], key: Any, *, module: Any
            ) -> tuple[Any, tuple[Any, Any, Any]]:
    """The batch-mean loss ``S / max(sum_b w_b, 1)`` (see :func:`loss_sums`), with the same
    auxiliary results."""
    import jax.numpy as jnp

    total, (batch_stats, correct, count) = loss_sums(params, batch_stats, batch, key, module=module)
    return total / jnp.maximum(count, 1.0), (batch_stats, correct, count)


def zero_sums(params: Any) -> dict[str, Any]:
    """The sums a step gathers over its parts, before the first: gradients shaped like
    ``params``, loss, correct and counted rows, events."""
    import jax
    import jax.numpy as jnp

    return {"grads": jax.tree.map(jnp.zeros_like, params), "loss": jnp.zeros((), jnp.float32),
            "correct": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.float32),
            "events": jnp.zeros((), jnp.int32)}


def part_step(params: Any, batch_stats: Any, step: Any, sums: dict[str, Any],
              batch: dict[str, Any], part: Any, *, module: Any, seed: int
              ) -> tuple[Any, dict[str, Any]]:
    """Add one part of a step's batch to ``sums``: the gradient of its :func:`loss_sums`, its
    loss, correct and counted rows and events -> ``(batch_stats', sums')``. Part ``p`` of step
    ``n`` draws dropout from ``fold_in(fold_in(PRNGKey(seed), n), p)``, so a run and its
    resumption draw the same masks."""
    import jax

    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), step), part)
    (total, (batch_stats, correct, count)), grads = jax.value_and_grad(loss_sums, has_aux=True)(
        params, batch_stats, batch, key, module=module)
    add = {"grads": grads, "loss": total, "correct": correct, "count": count,
           "events": batch["lengths"].sum()}
    return batch_stats, jax.tree.map(lambda a, b: a + b, sums, add)


def apply_sums(state: dict[str, Any], sums: dict[str, Any], *, tx: Any
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One optimiser step from a whole batch's sums: the gradient of the batch-mean loss is
    ``sum_parts grad S_p / max(sum_b w_b, 1)``. ``state``: params, batch_stats, opt_state, step
    (int32), epoch, best_accuracy -> ``(state', {"loss", "correct", "count", "events"})``."""
    import jax
    import jax.numpy as jnp

    scale = 1.0 / jnp.maximum(sums["count"], 1.0)
    new = apply_gradients(state, jax.tree.map(lambda g: g * scale, sums["grads"]), tx)
    return new, {"loss": sums["loss"] * scale, "correct": sums["correct"],
                 "count": sums["count"], "events": sums["events"]}


def apply_gradients(state: dict[str, Any], grads: Any, tx: Any) -> dict[str, Any]:
    """``state`` after one optimiser update by ``grads`` (shaped like its params): params,
    opt_state and step advanced, the rest as it was."""
    import optax

    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state,
                step=state["step"] + 1)


def train_step(state: dict[str, Any], batch: dict[str, Any], *, module: Any, tx: Any, seed: int
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One optimiser step on ``batch`` taken whole: the gradient of :func:`loss_fn`'s batch-mean
    loss; the dropout key is ``fold_in(PRNGKey(seed), step)``, so a run and its resumption draw
    the same masks. ``state`` as in :func:`apply_sums` -> ``(state', {"loss", "correct",
    "count", "events"})``."""
    import jax

    key = jax.random.fold_in(jax.random.PRNGKey(seed), state["step"])
    (loss, (batch_stats, correct, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["batch_stats"], batch, key, module=module)
    new = apply_gradients(dict(state, batch_stats=batch_stats), grads, tx)
    return new, {"loss": loss, "correct": correct, "count": count,
                 "events": batch["lengths"].sum()}


def eval_step(params: Any, batch_stats: Any, batch: dict[str, Any], *, module: Any
              ) -> tuple[Any, Any]:
    """Inference (no dropout, running batch statistics) on a batch from a zero state
    -> ``(logits float32 [B, C], ready bool [B])``."""
    from .model import fresh_state

    state0 = fresh_state(module.config, batch["tokens"].shape[0])
    logits, ready, _ = cast(tuple[Any, Any, Any], module.apply(
        {"params": params, "batch_stats": batch_stats},
        batch["tokens"], batch["gaps"], batch["lengths"], state0))
    return logits, ready


def compile_steps(module: Any, tx: Any, seed: int) -> tuple[Any, Any]:
    """``(train_step, eval_step)`` jitted with ``module``, ``tx`` and ``seed`` bound; the train
    step donates its state (argument 0), whose buffers the new state reuses."""
    import jax

    return (jax.jit(functools.partial(train_step, module=module, tx=tx, seed=seed),
                    donate_argnums=0),
            jax.jit(functools.partial(eval_step, module=module)))


@dataclasses.dataclass(frozen=True)
class PartSteps:
    """A step taken in parts (:func:`grouped_step`): :func:`zero_sums`, :func:`part_step` and
    :func:`apply_sums`, jitted with ``module``, ``tx`` and ``seed`` bound; the part step donates
    the sums, the apply step the state."""

    zero: Any
    part: Any
    apply: Any

    @classmethod
    def compile(cls, module: Any, tx: Any, seed: int) -> PartSteps:
        import jax

        return cls(jax.jit(zero_sums),
                   jax.jit(functools.partial(part_step, module=module, seed=seed),
                           donate_argnums=3),
                   jax.jit(functools.partial(apply_sums, tx=tx), donate_argnums=0))


def grouped_step(steps: PartSteps, state: dict[str, Any], parts: list[dict[str, Any]]
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One optimiser step on a batch given as ``parts`` (its rows in groups, each padded to its
    own length): the parts' loss gradients add up to the whole batch's, so the update is
    :func:`train_step`'s on the whole batch, up to float order and dropout masks. The batch
    statistics (BatchNorm) are updated part after part."""
    sums = steps.zero(state["params"])
    batch_stats = state["batch_stats"]
    for index, part in enumerate(parts):
        batch_stats, sums = steps.part(state["params"], batch_stats, state["step"], sums, part,
                                       index)
    return steps.apply(dict(state, batch_stats=batch_stats), sums)


@dataclasses.dataclass
class EpochSums:
    """Running sums of an epoch's step metrics: the loss weighted by each step's count, the
    correct and counted rows, the events read."""

    loss: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    events: int = 0

    def add(self, metrics: dict[str, Any]) -> None:
        """Add one step's metrics (host values of :func:`train_step`'s second result)."""
        self.loss += float(metrics["loss"]) * float(metrics["count"])
        self.correct += float(metrics["correct"])
        self.count += float(metrics["count"])
        self.events += int(metrics["events"])

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)


# --- the run -------------------------------------------------------------------------------
# The keys most runs change, with what they mean; every key is in the task and model YAML files.
MAIN_KEYS = {
    "train.epochs": "passes over the training set",
    "train.batch_size": "recordings per step",
    "train.ssm_base_lr": "SSM learning rate per recording (x batch_size x accumulation)",
    "train.lr_factor": "learning rate of the other parameters, relative to the SSM's",
    "train.weight_decay": "AdamW weight decay of the other parameters",
    "train.warmup_epochs": "linear warm-up before the schedule",
    "train.schedule": "cosine or constant",
    "train.max_events": "longer recordings are cut to this many events",
    "train.seed": "initialisation, shuffling and augmentation",
    "model.d_model": "features per event (H)",
    "model.d_state": "complex SSM states per layer (P)",
    "model.num_stages": "stages; each pools events by pooling_stride",
    "model.layers_per_stage": "SSM layers per stage",
    "model.pooling_stride": "events pooled into one by a stage's first layer",
    "model.dropout": "dropout rate",
}


def _keys_help(task: str = "event-mnist") -> str:
    """``--help``'s list of the main keys, with the values of ``task`` (NumPy/YAML only)."""
    cfg = yaml.safe_load((configs_dir() / "tasks" / f"{task}.yaml").read_text())
    model = yaml.safe_load((configs_dir() / "models" / f"{cfg['model']}.yaml").read_text())
    values = {**{f"train.{k}": v for k, v in cfg["train"].items()},
              **{f"model.{k}": v for k, v in model.items()}}
    tasks = ", ".join(sorted(p.stem for p in (configs_dir() / "tasks").glob("*.yaml")))
    lines = [f"main keys (value in task={task}):"]
    lines += [f"  {key + '=' + str(values.get(key)):<26} {meaning}" for key, meaning in MAIN_KEYS.items()]
    lines += ["", f"tasks: {tasks}.",
              "Every key: configs/tasks/TASK.yaml (train.*, augment.*), configs/models/MODEL.yaml (model.*).",
              "A quick run (minutes on a CPU; README, \"A model of your own\"):",
              "  evssm train task=event-mnist model.d_model=32 model.d_state=32 train.epochs=3"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _keys_help()
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="task=NAME, model=NAME, dataset=NAME, data_dir=DIR, model.KEY=V, "
                             "train.KEY=V, augment.KEY=V (see below)")
    parser.add_argument("--out", help="run directory (default: runs/TASK-TIMESTAMP)")
    parser.add_argument("--data-dir", help="where data sets live (or EVSSM_DATA_DIR)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last saved epoch")
    parser.add_argument("--limit-train", type=int, help="use only the first N training samples")
    parser.add_argument("--limit-valid", type=int, help="use only the first N validation samples")
    parser.add_argument("--limit-test", type=int, help="use only the first N test samples")
    parser.add_argument("--processes", type=int, default=1,
                        help="data-parallel processes on this machine (one job; CPU collectives "
                             "over gloo); across machines set JAX_COORDINATOR_ADDRESS, "
                             "JAX_NUM_PROCESSES and JAX_PROCESS_ID instead (docs/training.md)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--compilation-cache", default=os.environ.get(COMPILATION_CACHE_ENV),
                        metavar="DIR|off",
                        help="persistent XLA compilation cache: a re-run loads its compiled steps "
                             f"instead of compiling them (or ${COMPILATION_CACHE_ENV}; default "
                             "$EVSSM_CACHE_DIR/xla, i.e. ~/.cache/evssm/xla; off: none)")


def process_argv(args: argparse.Namespace, out: Path) -> list[str]:
    """``evssm train`` arguments of one process of a ``--processes`` job: the same run, in one
    run directory for all."""
    argv = [*args.overrides, "--out", str(out)]
    for flag, value in (("--data-dir", args.data_dir), ("--limit-train", args.limit_train),
                        ("--compilation-cache", args.compilation_cache),
                        ("--limit-valid", args.limit_valid), ("--limit-test", args.limit_test)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + ["--resume"] * args.resume + ["--no-progress"] * args.no_progress


def run(args: argparse.Namespace) -> int:
    """``evssm train``: a mistake in the arguments or the data exits 2 with one line of advice."""
    try:
        return _run(args)
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        print(exc.code, file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    cfg = load_task_config(args.overrides)
    if args.data_dir:
        cfg["data_dir"] = args.data_dir
    out = Path(args.out or f"runs/{cfg['task']}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.processes < 1:
        raise SystemExit(f"evssm train: --processes must be at least 1, got {args.processes}")
    if args.processes > 1:
        if os.environ.get(distributed.COORDINATOR):
            raise SystemExit("evssm train: --processes starts its own job; it cannot be combined "
                             f"with {distributed.COORDINATOR}")
        if cfg["train"]["batch_size"] % args.processes:
            raise SystemExit(f"evssm train: train.batch_size={cfg['train']['batch_size']} is not "
                             f"divisible by --processes {args.processes}")
        return distributed.launch_local(process_argv(args, out), args.processes)
    return train(cfg, out, resume=args.resume, limit_train=args.limit_train,
                 limit_valid=args.limit_valid, limit_test=args.limit_test,
                 progress=not args.no_progress, compilation_cache=args.compilation_cache)


class EpochBar:
    """An epoch's tqdm progress bar whose rate and ETA leave out a first step that compiles.

    With ``compiling``, the bar says "compiling" until the first step is done; then a new bar
    starts with that step counted (``initial=1``) and its clock at zero, so the estimate is
    (steps left) x (time per compiled step), not a figure inflated by the compilation. The
    compiling bar's line stays, with the time the compilation took.
    """

    def __init__(self, total: int, desc: str, *, compiling: bool, **options: Any):
        from tqdm import tqdm

        self._new = lambda **extra: tqdm(total=total, desc=desc, **options, **extra)  # noqa: E731
        self.compiling = compiling
        self.bar = self._new(postfix="compiling") if compiling else self._new()

    def step(self, **postfix: str) -> None:
        """One step done; ``postfix`` shown after the bar."""
        if self.compiling:
            self.compiling = False
            self.bar.close()
            self.bar = self._new(initial=1)
        else:
            self.bar.update(1)
        self.bar.set_postfix(postfix)

    def close(self) -> None:
        self.bar.close()


# --- one run: set-up, the epoch loop, the test -----------------------------------------------
def train(cfg: dict[str, Any], out: Path, *, resume: bool = False, limit_train: int | None = None,
          limit_valid: int | None = None, limit_test: int | None = None, progress: bool = True,
          stop_after: int | None = None, compilation_cache: str | None = None) -> int:
    """Train per ``cfg`` (from :func:`load_task_config`) into ``out``; returns an exit code.

    ``best/`` is the epoch with the highest accuracy on ``train.valid_split``; once the last epoch
    is done, ``best/`` is measured on the test split, once, and the figure is recorded in its
    ``evssm.json`` summary and in ``out/test.json``. ``stop_after`` ends the run after that many
    epochs without changing its schedule (the run can be continued with ``resume``); the test is
    measured only by the run that completes the schedule. ``compilation_cache``: the persistent
    XLA cache's folder (:mod:`.xla_cache`; None: the default, ``off``: none).

    In a job of several processes (:mod:`.distributed`) every process runs this function, feeds
    its shard of every global batch and holds the same parameters; process 0 alone writes.
    """
    distributed.maybe_initialize()
    import jax

    from .model import EventSSM
    from .xla_cache import cache_folder, use_compilation_cache

    use_compilation_cache(cache_folder(compilation_cache))

    t = cfg["train"]
    data = open_data(cfg, limit_train, limit_valid)
    model_cfg = resolve_model_config(cfg, data.train)
    mesh = DataMesh.create(t)
    log = open_run_log(out, cfg, primary=mesh.shard[0] == 0)
    steps_per_epoch = max(1, len(data.train) // t["batch_size"] // t["accumulation"])
    tx, ssm_lr = make_optimizer(t, steps_per_epoch, t["batch_size"])
    states = state_manager(out)
    state, start_epoch = initial_state(model_cfg, tx, t["seed"]), 0
    if resume:
        state, start_epoch = restore_state(states, state, out)
        log.say(f"resuming {out} at epoch {start_epoch}")
    state = jax.device_put(state, mesh.replicated)
    steps = TrainSteps.compile(EventSSM(model_cfg), tx, t, mesh)

    log.say(f"training {model_cfg.name} on {cfg['dataset']}: {len(data.train)} train / "
            f"{len(data.valid)} {t['valid_split']} samples, {mesh.devices} device(s) in "
            f"{mesh.shard[1]} process(es), ssm_lr {ssm_lr:.2e}, batches in "
            f"{steps.groups} length group(s), run directory {out}")
    if model_cfg.norm == "batch" and steps.groups > 1:
        log.say("note: with BatchNorm each length group is normalised with its own statistics, "
                "not the whole batch's; train.length_groups=1 keeps whole batches")
    last_epoch = t["epochs"] if stop_after is None else min(t["epochs"], stop_after)
    for epoch in range(start_epoch, last_epoch):
        # The run's first step compiles the train step: kept out of the rate and the ETA.
        state, sums, seconds = run_epoch(steps, state, data, mesh, t, epoch,
                                         compiling=epoch == start_epoch,
                                         show=progress and log.primary)
        valid = measure(steps.eval, state, data.valid, mesh, t, model_cfg.num_classes)
        record = {"epoch": epoch + 1, "step": int(state["step"]),
                  "train_loss": sums.mean_loss, "train_accuracy": sums.accuracy,
                  "train_events_per_s": sums.events / seconds, "train_seconds": seconds,
                  "valid_loss": valid["loss"], "valid_accuracy": valid["accuracy"]}
        log.say(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} acc "
                f"{record['train_accuracy']:.4f} ({record['train_events_per_s']:,.0f} events/s) | "
                f"{t['valid_split']} loss {valid['loss']:.4f} acc {valid['accuracy']:.4f}")
        state = end_epoch(log, states, state, record, model_cfg)
    states.close()
    log.close()
    log.say(f"best {t['valid_split']} accuracy {float(state['best_accuracy']):.4f}; "
            f"checkpoint {out / 'best'}")
    if int(state["epoch"]) < t["epochs"]:
        return 0  # stopped early on purpose: the run that finishes the schedule tests
    measure_test_split(steps.eval, cfg, out, data.test_split, limit_test, mesh, log)
    return 0


@dataclasses.dataclass(frozen=True)
class RunData:
    """A run's training and validation sets, its augmentations (None: none) and the split it
    tests on once at the end (the validation split where the data set has no test split)."""

    train: Any  # EventDataset
    valid: Any
    augment: AugmentConfig | None
    test_split: str


def open_data(cfg: dict[str, Any], limit_train: int | None, limit_valid: int | None) -> RunData:
    from .data import DATASETS

    t = cfg["train"]
    train_ds = open_split(cfg, "train", limit_train)
    augment = AugmentConfig.from_dict(cfg["augment"], train_ds.sensor) if cfg["augment"] else None
    test_split = "test" if "test" in DATASETS[cfg["dataset"]].splits else t["valid_split"]
    return RunData(train_ds, open_split(cfg, t["valid_split"], limit_valid), augment, test_split)


def resolve_model_config(cfg: dict[str, Any], train_ds: Any) -> ModelConfig:
    """The named model with the run's overrides, shaped to the data set (sensor, classes);
    also stored in ``cfg["model"]`` (so ``config.yaml`` holds it)."""
    base = load_model_config(cfg["model_name"])
    model_cfg = ModelConfig.from_dict({
        **base.to_dict(), **cfg["model_overrides"], "sensor": train_ds.sensor.to_dict(),
        "num_classes": len(train_ds.class_names), "class_names": list(train_ds.class_names)})
    cfg["model"] = model_cfg.to_dict()
    return model_cfg


@dataclasses.dataclass(frozen=True)
class DataMesh:
    """Every device of the job (every process's) in one mesh: batches are sharded along its
    ``data`` axis, the training state is replicated. ``shard``: (this process, processes)."""

    data: Any  # NamedSharding
    replicated: Any
    devices: int
    shard: tuple[int, int]

    @classmethod
    def create(cls, t: dict[str, Any]) -> DataMesh:
        """The job's mesh; the batch sizes of ``t`` must divide over its devices."""
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        devices = jax.devices()
        for size, name in ((t["batch_size"], "train.batch_size"),
                           (t["eval_batch_size"], "train.eval_batch_size")):
            if size % len(devices):
                raise SystemExit(f"evssm train: {name}={size} is not divisible by the "
                                 f"{len(devices)} devices of the job")
        mesh = Mesh(np.array(devices), ("data",))
        return cls(NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec()),
                   len(devices), (jax.process_index(), jax.process_count()))

    def rows(self, global_batch: int) -> slice:
        """This process's rows of a global batch of ``global_batch`` rows."""
        rows = global_batch // self.shard[1]
        return slice(self.shard[0] * rows, (self.shard[0] + 1) * rows)

    def to_device(self, batch: Any) -> dict[str, Any]:
        """This process's rows of a global batch, as global arrays sharded over the job; every
        process pads its rows to the longest shard's length (one shape for all)."""
        import jax

        from .input_pipeline import pad_batch

        batch = pad_batch(batch, distributed.global_max(batch.tokens.shape[1]))
        return {k: jax.make_array_from_process_local_data(self.data, getattr(batch, k))
                for k in ("tokens", "gaps", "lengths", "targets", "labels", "weights")}


def initial_state(model_cfg: ModelConfig, tx: Any, seed: int) -> dict[str, Any]:
    """The training state before the first step: parameters and batch statistics initialised
    from ``seed``, the optimiser's state, step and epoch 0, no best accuracy yet."""
    import jax.numpy as jnp

    from .streaming import init_variables

    variables = init_variables(model_cfg, seed)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"],
            "opt_state": tx.init(variables["params"]), "step": jnp.zeros((), jnp.int32),
            "epoch": jnp.zeros((), jnp.int32), "best_accuracy": jnp.zeros((), jnp.float32)}


def state_manager(out: Path) -> Any:
    """The orbax manager of ``out/train_state``: the training state after each epoch (step =
    epoch). It keeps the latest, writes each one beside it and removes the older only once the
    new one is complete. Every process reads it (on resume); process 0 alone writes it."""
    import orbax.checkpoint as ocp

    from .checkpoint import this_process_only

    (out / "train_state").mkdir(parents=True, exist_ok=True)
    return ocp.CheckpointManager(
        (out / "train_state").absolute(),
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(1), enable_async_checkpointing=False,
            multiprocessing_options=this_process_only(), create=False))


def restore_state(states: Any, template: dict[str, Any], out: Path) -> tuple[dict[str, Any], int]:
    """The last saved training state (shaped like ``template``) and the epoch it ended."""
    import orbax.checkpoint as ocp

    if states.latest_step() is None:
        raise SystemExit(f"evssm train: --resume but {out}/train_state holds no saved epoch")
    state = states.restore(states.latest_step(), args=ocp.args.StandardRestore(template))
    return state, int(state["epoch"])


def run_epoch(steps: TrainSteps, state: dict[str, Any], data: RunData, mesh: DataMesh,
              t: dict[str, Any], epoch: int, *, compiling: bool, show: bool
              ) -> tuple[dict[str, Any], EpochSums, float]:
    """One pass over the training set (this process's rows of every global batch) with a
    progress bar -> ``(state', sums, seconds)``. With ``train.length_groups`` G > 1 each batch
    is taken in G length-sorted groups (:func:`grouped_step`): each process sorts its own rows,
    and group g of the global batch is every process's group g."""
    import jax

    from .input_pipeline import length_groups, prefetch, train_batches

    num_classes = len(data.train.class_names)
    batches = prefetch(train_batches(data.train, t["batch_size"], num_classes, t["pad_unit"],
                                     t["max_events"], data.augment, t["seed"], epoch, mesh.shard))
    bar = EpochBar(len(data.train) // t["batch_size"], f"epoch {epoch + 1}", compiling=compiling,
                   disable=not show, file=sys.stderr, dynamic_ncols=True)
    sums = EpochSums()
    t0 = time.perf_counter()
    for batch in batches:
        if steps.parts is None:
            state, metrics = steps.train(state, mesh.to_device(batch))
        else:
            parts = length_groups(batch, steps.groups, t["pad_unit"])
            state, metrics = grouped_step(steps.parts, state, [mesh.to_device(p) for p in parts])
        sums.add(jax.device_get(metrics))
        rate = sums.events / (time.perf_counter() - t0)
        bar.step(loss=f"{sums.mean_loss:.3f}", acc=f"{sums.accuracy:.3f}", ev_s=f"{rate:,.0f}")
    bar.close()
    return state, sums, time.perf_counter() - t0


@dataclasses.dataclass(frozen=True)
class TrainSteps:
    """A run's jitted steps: the whole-batch train step, the eval step, the length groups a batch
    is taken in (:func:`length_groups_of`) and their part steps (None when ``groups`` is 1)."""

    train: Any
    eval: Any
    groups: int
    parts: PartSteps | None

    @classmethod
    def compile(cls, module: Any, tx: Any, t: dict[str, Any], mesh: DataMesh) -> TrainSteps:
        train_fn, eval_fn = compile_steps(module, tx, t["seed"])
        groups = length_groups_of(t, mesh.devices)
        return cls(train_fn, eval_fn, groups,
                   PartSteps.compile(module, tx, t["seed"]) if groups > 1 else None)


def length_groups_of(t: dict[str, Any], devices: int) -> int:
    """The groups a batch is taken in: the most, up to ``train.length_groups``, that cut
    ``train.batch_size`` into equal groups whose size the job's devices divide (each group is
    sharded over them)."""
    groups = int(t.get("length_groups", 1))
    if groups < 1:
        raise SystemExit(f"evssm train: train.length_groups must be at least 1, got {groups}")
    batch = t["batch_size"]
    while batch % groups or (batch // groups) % devices:
        groups -= 1
    return groups


def measure(eval_fn: Any, variables: dict[str, Any], dataset: Any, mesh: DataMesh,
            t: dict[str, Any], num_classes: int) -> dict[str, float]:
    """Loss and accuracy of ``variables`` on every sample of ``dataset``, taken in order of
    length (the metrics do not depend on the order; batches of similar lengths need less
    padding): each process feeds its rows of every batch; the logits are gathered on all."""
    from .evaluate import classification_metrics
    from .input_pipeline import eval_batches, eval_order

    logits, labels, weights = [], [], []
    mine = mesh.rows(t["eval_batch_size"])
    order = eval_order(dataset, t["max_events"])
    for batch in eval_batches(dataset, t["eval_batch_size"], num_classes, t["pad_unit"],
                              t["max_events"], order):
        lg, ready = eval_fn(variables["params"], variables["batch_stats"],
                            mesh.to_device(batch.rows(mine)))
        logits.append(distributed.gather_rows(lg))
        labels.append(batch.labels)
        weights.append(batch.weights * distributed.gather_rows(ready))
    return classification_metrics(np.concatenate(logits), np.concatenate(labels),
                                  np.concatenate(weights))


def end_epoch(log: RunLog, states: Any, state: dict[str, Any], record: dict[str, Any],
              model_cfg: ModelConfig) -> dict[str, Any]:
    """After an epoch: the state's epoch and best accuracy (the later epoch wins a tie; the
    first epoch is always a best), ``best/`` when it is one, the record and the training state
    written; then every process waits for process 0's writes (a process that resumes or tests
    next reads them)."""
    import jax.numpy as jnp

    epoch = record["epoch"]
    state = dict(state, epoch=jnp.asarray(epoch, jnp.int32))
    if record["valid_accuracy"] >= float(state["best_accuracy"]) or epoch == 1:
        state["best_accuracy"] = jnp.asarray(record["valid_accuracy"], jnp.float32)
        log.save_best(model_cfg, state, record)
    log.record(record)
    log.save_state(states, epoch, state)
    distributed.barrier(f"evssm-epoch-{epoch}")
    return state


def measure_test_split(eval_fn: Any, cfg: dict[str, Any], out: Path, split: str, limit: int | None,
              mesh: DataMesh, log: RunLog) -> None:
    """The test split, measured once, on the checkpoint chosen on the validation split."""
    import jax

    from .checkpoint import load_checkpoint

    valid_split = cfg["train"]["valid_split"]
    config, best, meta = load_checkpoint(out / "best")
    result = measure(eval_fn, jax.device_put(best, mesh.replicated),
                     open_split(cfg, split, limit), mesh, cfg["train"], config.num_classes)
    test = {"split": split, "selected_on": valid_split, "epoch": meta["summary"].get("epoch"),
            "accuracy": result["accuracy"], "loss": result["loss"],
            "samples": int(result["count"])}
    log.write_test(test)
    note = " (the split that selected it)" if split == valid_split else ""
    log.say(f"{split} accuracy of best/ (epoch {test['epoch']}): {test['accuracy']:.4f} on "
            f"{test['samples']} samples{note}")


class RunLog:
    """What a process other than 0 of a job writes to the run directory and says: nothing.
    Process 0's :class:`PrimaryRunLog` writes; every process calls the same methods."""

    primary = False

    def say(self, text: str) -> None:
        """A line for whoever runs the job (stderr)."""

    def save_best(self, config: ModelConfig, state: dict[str, Any], record: dict[str, Any]
                  ) -> None:
        """``best/``: the state's variables, with ``record`` in its summary."""

    def record(self, record: dict[str, Any]) -> None:
        """An epoch's record: a line of ``metrics.jsonl`` and TensorBoard scalars."""

    def save_state(self, states: Any, epoch: int, state: dict[str, Any]) -> None:
        """The training state after ``epoch``, into the orbax manager ``states``."""

    def write_test(self, test: dict[str, Any]) -> None:
        """The test figure: ``test.json`` and the summary of ``best/``."""

    def close(self) -> None:
        """Close the files; :meth:`say` still works."""


class PrimaryRunLog(RunLog):
    """Process 0's run log: writes ``config.yaml`` when opened, then ``metrics.jsonl`` (appended,
    so a resumed run continues it), ``tb/``, ``best/``, ``train_state/`` and ``test.json``."""

    primary = True

    def __init__(self, out: Path, cfg: dict[str, Any]):
        from tensorboardX import SummaryWriter

        self.out, self.cfg = out, cfg
        out.mkdir(parents=True, exist_ok=True)
        resolved = {k: v for k, v in cfg.items() if k != "model_overrides"}
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        self.writer = SummaryWriter(str(out / "tb"))
        self.metrics = (out / "metrics.jsonl").open("a")

    def say(self, text: str) -> None:
        print(text, file=sys.stderr)

    def save_best(self, config: ModelConfig, state: dict[str, Any], record: dict[str, Any]
                  ) -> None:
        import jax

        from .checkpoint import save_checkpoint

        summary = {**record, "dataset": self.cfg["dataset"],
                   "valid_split": self.cfg["train"]["valid_split"]}
        save_checkpoint(self.out / "best", config, jax.device_get(state), task=self.cfg["task"],
                        summary=summary)

    def record(self, record: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for key, value in record.items():
            if key not in ("epoch", "step"):
                self.writer.add_scalar(key, value, record["epoch"])

    def save_state(self, states: Any, epoch: int, state: dict[str, Any]) -> None:
        import jax
        import orbax.checkpoint as ocp

        states.save(epoch, args=ocp.args.StandardSave(jax.device_get(state)))

    def write_test(self, test: dict[str, Any]) -> None:
        from .checkpoint import update_summary

        update_summary(self.out / "best", test=test)
        (self.out / "test.json").write_text(json.dumps(test, indent=2) + "\n")

    def close(self) -> None:
        self.writer.close()
        self.metrics.close()


def open_run_log(out: Path, cfg: dict[str, Any], *, primary: bool) -> RunLog:
    """Process 0's :class:`PrimaryRunLog` (which writes ``config.yaml`` now), else a silent one."""
    return PrimaryRunLog(out, cfg) if primary else RunLog()
