"""Import a checkpoint of the paper's reference implementation (``event-ssm``):
``evssm import seed CHECKPOINT --config MODEL_YAML --task shd|ssc|dvs-gesture --out DIR``.

The reference trainer saves its whole ``TrainState`` with ``flax.training.checkpoints`` (a
``checkpoint_N/`` folder written through orbax, or, from older flax, one msgpack file
``checkpoint_N``) and no model configuration: the architecture comes from the reference code's
model YAML (hydra format: ``model.ssm_init`` and ``model.ssm``), the classes and the sensor from
the task. The import

1. reads the checkpoint (``flax.training.checkpoints.restore_checkpoint``) and the YAML;
2. builds the evssm :class:`~evssm.models.config.ModelConfig`, with the options that make
   evssm compute what the reference code computes (``time_lookahead``, ``gelu="tanh"``, with
   LayerNorm ``layer_norm_eps=1e-6``, with a timepool head ``head_divisor="total_time"``);
3. maps every variable to evssm's (:func:`convert_variables`): names and layer indices,
   BatchNorm running statistics, ``log_step [P', 1] -> [P']``, and for a 2-D sensor the token
   table rebuilt one-to-one (:func:`token_table`); every shape is checked against the config and
   every stored variable must be used, so a YAML that does not fit the checkpoint is named;
4. writes an ordinary evssm checkpoint (``evssm.json`` records where it came from, under
   ``origin``) and loads it back as a check.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .config import ModelConfig
from .data.base import make_recording
from .dataset_facts import DVS_GESTURE_CLASSES, DVS_GESTURE_SIZE, SHD_CHANNELS, SHD_CLASSES, SSC_CLASSES
from .events import Recording, SensorSpec


@dataclass(frozen=True)
class TaskSpec:
    """What ``--task`` fixes: the sensor, the classes and the data set ``evssm eval`` reads."""

    sensor: SensorSpec
    num_classes: int
    dataset: str
    class_names: tuple[str, ...] = ()


TASKS: dict[str, TaskSpec] = {
    "shd": TaskSpec(SensorSpec.one_d(SHD_CHANNELS), len(SHD_CLASSES), "shd", SHD_CLASSES),
    "ssc": TaskSpec(SensorSpec.one_d(SHD_CHANNELS), len(SSC_CLASSES), "ssc", SSC_CLASSES),
    "dvs-gesture": TaskSpec(SensorSpec.two_d(*DVS_GESTURE_SIZE), len(DVS_GESTURE_CLASSES),
                            "dvs-gesture", DVS_GESTURE_CLASSES),
}

# The reference code's behaviours, as evssm model options (docs/paper-models.md); the
# LayerNorm epsilon only with LayerNorm, the divisor only with the timepool head.
REFERENCE_OPTIONS: dict[str, Any] = {"time_lookahead": True, "gelu": "tanh"}
REFERENCE_LAYER_NORM_EPS = 1e-6

# model.ssm keys of the reference YAML -> (ModelConfig field, value map or type).
SSM_KEYS: dict[str, tuple[str, Any]] = {
    "discretization": ("discretization", str),
    "d_model": ("d_model", int),
    "d_ssm": ("d_state", int),
    "ssm_block_size": ("block_size", int),
    "num_stages": ("num_stages", int),
    "num_layers_per_stage": ("layers_per_stage", int),
    "dropout": ("dropout", float),
    "classification_mode": ("head", {"pool": "pool", "timepool": "timepool", "last": "last"}),
    "prenorm": ("prenorm", bool),
    "batchnorm": ("norm", {True: "batch", False: "layer"}),
    "bn_momentum": ("bn_momentum", float),
    "step_rescale": ("step_rescale", float),
    "pooling_stride": ("pooling_stride", int),
    # The reference's "last" keeps the window's first event (evssm calls that "first").
    "pooling_mode": ("pooling_mode", {"last": "first", "avgpool": "avgpool",
                                      "timepool": "timepool"}),
    "state_expansion_factor": ("state_expansion_factor", int),
}
INIT_KEYS: dict[str, tuple[str, Any]] = {
    "dt_min": ("dt_min", float),
    "dt_max": ("dt_max", float),
    "conj_sym": ("conj_sym", bool),
    "clip_eigs": ("clip_eigs", bool),
}
# Keys that shape only training or initialisation (and one the reference code never reads).
IGNORED_KEYS = {"C_init", "pooling_every_n_layers"}


class SeedImportError(ValueError):
    """The inputs cannot be imported; the message names what does not fit."""


@dataclass
class SeedCheckpoint:
    """What evssm needs of a reference ``TrainState``: nested dicts of NumPy arrays."""

    path: Path
    step: int | None
    params: dict[str, Any]
    batch_stats: dict[str, Any]


# --- reading ------------------------------------------------------------------------------------
def read_seed_checkpoint(path: str | Path) -> SeedCheckpoint:
    """Restore a reference checkpoint: a folder holding ``checkpoint_N`` entries (the latest is
    read), a ``checkpoint_N/`` orbax folder, or a ``checkpoint_N`` msgpack file."""
    from flax.training import checkpoints

    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise SeedImportError(f"no checkpoint at {path}")
    try:
        restored = checkpoints.restore_checkpoint(str(path), target=None)
    except Exception as exc:  # msgpack, orbax and OS errors all mean "not a checkpoint"
        raise SeedImportError(f"{path} is not a readable flax checkpoint: "
                              f"{type(exc).__name__}: {exc}") from exc
    if restored is None:
        raise SeedImportError(f"{path} holds no flax checkpoint (no checkpoint_N folder or file)")
    if not isinstance(restored, dict) or not isinstance(restored.get("params"), dict):
        keys = sorted(restored) if isinstance(restored, dict) else type(restored).__name__
        raise SeedImportError(f"{path} is not a reference TrainState checkpoint: it has no "
                              f"'params' (found {keys})")
    model_state = restored.get("model_state") or {}
    to_numpy = lambda tree: _map_leaves(tree, np.asarray)  # noqa: E731
    step = restored.get("step")
    return SeedCheckpoint(path, None if step is None else int(np.asarray(step)),
                          to_numpy(restored["params"]),
                          to_numpy(model_state.get("batch_stats") or {}))


def read_seed_model_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{"ssm": {...}, "ssm_init": {...}}`` of a reference model YAML (hydra's
    ``# @package _global_`` header is a YAML comment; ``model:`` may be omitted)."""
    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SeedImportError(f"cannot read the model YAML {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise SeedImportError(f"{path} is not valid YAML: {exc}") from exc
    model = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("ssm"), dict):
        raise SeedImportError(f"{path} is not a reference model config: it needs model.ssm "
                              "and model.ssm_init (configs/model/*/*.yaml of the reference code)")
    unknown = sorted(set(model) - {"ssm", "ssm_init"})
    if unknown:
        raise SeedImportError(f"{path}: unknown sections under model: {unknown}")
    return {"ssm": dict(model["ssm"]), "ssm_init": dict(model.get("ssm_init") or {})}


# --- configuration --------------------------------------------------------------------------------
def config_from_seed(model_yaml: dict[str, dict[str, Any]], task: str, *,
                     name: str | None = None) -> ModelConfig:
    """The evssm config of a reference model YAML for ``task``, with the reference options."""
    if task not in TASKS:
        raise SeedImportError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    spec = TASKS[task]
    fields: dict[str, Any] = {}
    for section, table in (("ssm", SSM_KEYS), ("ssm_init", INIT_KEYS)):
        values = model_yaml.get(section, {})
        unknown = sorted(set(values) - set(table) - IGNORED_KEYS)
        if unknown:
            raise SeedImportError(f"model.{section} has keys this importer does not know: "
                                  f"{unknown} (known: {sorted(set(table) | IGNORED_KEYS)})")
        for key, value in values.items():
            if key in IGNORED_KEYS:
                continue
            field_name, convert = table[key]
            fields[field_name] = _convert(f"model.{section}.{key}", value, convert)
    missing = sorted(k for k in ("d_model", "d_ssm", "ssm_block_size", "num_stages",
                                 "num_layers_per_stage") if k not in model_yaml.get("ssm", {}))
    if missing:
        raise SeedImportError(f"model.ssm lacks {missing}")
    if fields.get("num_stages", 0) > 2 and fields.get("state_expansion_factor", 1) > 1:
        # The reference widens stage k to H e^min(k, 1) then H e^(k-1): not evssm's H e^k.
        raise SeedImportError("the reference code's stage widths for more than two stages with "
                              "state_expansion_factor > 1 are not evssm's (H e^k); not importable")
    fields.update(REFERENCE_OPTIONS)
    if fields.get("norm", "layer") == "layer":
        fields["layer_norm_eps"] = REFERENCE_LAYER_NORM_EPS
    if fields.get("head", "pool") == "timepool":
        fields["head_divisor"] = "total_time"
    try:
        return ModelConfig(sensor=spec.sensor, num_classes=spec.num_classes,
                           class_names=spec.class_names, name=name or f"{task}-reference",
                           **fields)
    except (TypeError, ValueError) as exc:
        raise SeedImportError(f"the model YAML gives an invalid evssm config: {exc}") from exc


def _convert(key: str, value: Any, convert: Any) -> Any:
    if isinstance(value, str) and "${" in value:
        raise SeedImportError(f"{key} is a hydra interpolation ({value}); resolve it first")
    if isinstance(convert, dict):
        if value not in convert:
            raise SeedImportError(f"{key}={value!r} is not one of {sorted(convert, key=str)}")
        return convert[value]
    if convert is bool and not isinstance(value, bool):
        raise SeedImportError(f"{key} must be true or false, not {value!r}")
    try:
        converted = convert(value)
    except (TypeError, ValueError) as exc:
        raise SeedImportError(f"{key}={value!r} is not a {convert.__name__}") from exc
    if convert is int and converted != value:
        raise SeedImportError(f"{key}={value!r} is not an integer")
    return converted


# --- variables ------------------------------------------------------------------------------------
def token_table(table: np.ndarray, sensor: SensorSpec) -> np.ndarray:
    """evssm's embedding table from the reference's [V, H] one.

    A 1-D sensor's tokens are the channels in both. A 2-D sensor's reference token is
    ``x*y + W*H*p`` (many-to-one); evssm's is ``x + W*y + W*H*p`` (one-to-one), so
    ``E[x + W*y + W*H*p] = E_ref[x*y + W*H*p]`` for every address: every pixel reads the row
    the reference code reads for it.
    """
    if sensor.kind == "1d":
        return table
    w, h = sensor.width, sensor.height
    x, y, p = np.meshgrid(np.arange(w), np.arange(h), np.arange(2), indexing="ij")
    new = np.empty((2 * w * h, table.shape[1]), table.dtype)
    new[x + w * y + w * h * p] = table[x * y + w * h * p]
    return new


def variable_map(config: ModelConfig) -> Iterator[tuple[tuple[str, ...], tuple[str, ...]]]:
    """``(evssm path, reference path)`` of every variable (paths under ``params`` or
    ``batch_stats``, first element the collection)."""
    from .model import layer_plan

    yield ("params", "embed", "embedding"), ("params", "encoder", "encoder", "embedding")
    for i, (d_in, d_out, _, _) in enumerate(layer_plan(config)):
        stage, j = divmod(i, config.layers_per_stage)
        ref = ("encoder", f"stages_{stage}", f"SequenceLayer_{j}")
        ours = f"layers_{i}"
        for leaf in ("B", "C", "D", "Lambda_re", "Lambda_im", "log_step"):
            yield ("params", ours, "ssm", leaf), ("params", *ref, "S5SSM_0", leaf)
        for leaf in ("kernel", "bias"):
            yield ("params", ours, "gate", leaf), ("params", *ref, "Dense_0", leaf)
            if d_in != d_out:
                yield ("params", ours, "skip_proj", leaf), ("params", *ref, "Dense_1", leaf)
        if config.norm == "layer":
            for leaf in ("scale", "bias"):
                yield (("params", ours, "norm", "LayerNorm_0", leaf),
                       ("params", *ref, "LayerNorm_0", leaf))
        else:
            for leaf in ("scale", "bias"):
                yield ("params", ours, "norm", leaf), ("params", *ref, "BatchNorm_0", leaf)
            for leaf in ("mean", "var"):
                yield (("batch_stats", ours, "norm", leaf),
                       ("batch_stats", *ref, "BatchNorm_0", leaf))
    for leaf in ("kernel", "bias"):
        yield ("params", "head", leaf), ("params", "decoder", leaf)


def convert_variables(config: ModelConfig, ckpt: SeedCheckpoint) -> dict[str, Any]:
    """evssm's ``{"params", "batch_stats"}`` from a reference checkpoint, every shape checked
    against ``config`` and every stored variable used; raises :class:`SeedImportError`."""
    import jax

    from .checkpoint import abstract_variables

    source = {"params": _flatten(ckpt.params), "batch_stats": _flatten(ckpt.batch_stats)}
    _check_task(source["params"], config)
    want = {tuple(_key(k) for k in path): leaf.shape for path, leaf in
            jax.tree.leaves_with_path(abstract_variables(config))}
    out: dict[tuple[str, ...], np.ndarray] = {}
    used: set[tuple[str, ...]] = set()
    for ours, ref in variable_map(config):
        collection, ref_path = ref[0], ref[1:]
        if ref_path not in source[collection]:
            raise SeedImportError(f"the checkpoint has no {'/'.join(ref)}, which the YAML's "
                                  f"architecture needs ({_describe(config)})")
        value = source[collection][ref_path]
        used.add(ref)
        if ours[-1] == "log_step":
            value = value.reshape(value.shape[:1]) if value.ndim == 2 and value.shape[1] == 1 \
                else value
        if ours[-1] == "embedding":
            value = token_table(value, config.sensor)
        if ours not in want:
            raise SeedImportError(f"internal: evssm has no variable {'/'.join(ours)}")
        if tuple(value.shape) != tuple(want[ours]):
            raise SeedImportError(
                f"{'/'.join(ref)} is stored as {tuple(value.shape)} but the YAML's architecture "
                f"({_describe(config)}) needs {tuple(want[ours])} for it: the YAML does not fit "
                "this checkpoint")
        out[ours] = np.asarray(value, np.float32)
    unused = sorted("/".join((c, *p)) for c in source for p in source[c] if (c, *p) not in used)
    if unused:
        shown = ", ".join(unused[:4]) + (f" and {len(unused) - 4} more" if len(unused) > 4 else "")
        raise SeedImportError(f"the checkpoint has variables the YAML's architecture "
                              f"({_describe(config)}) does not use: {shown}; the YAML does not "
                              "fit this checkpoint")
    missing = sorted("/".join(p) for p in want if p not in out)
    if missing:
        raise SeedImportError(f"internal: no reference variable for {missing}")
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for path, value in out.items():
        node = variables
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return variables


def _check_task(params: dict[tuple[str, ...], np.ndarray], config: ModelConfig) -> None:
    """The checkpoint's token table and classes against the task's sensor and classes."""
    table = params.get(("encoder", "encoder", "embedding"))
    if table is not None and (table.ndim != 2 or table.shape[0] != config.num_embeddings):
        sensor = config.sensor
        what = (f"{sensor.channels} channels" if sensor.kind == "1d"
                else f"a {sensor.width}x{sensor.height} sensor with 2 polarities")
        raise SeedImportError(f"the checkpoint's token table has shape {tuple(table.shape)}; the "
                              f"task's {what} needs {config.num_embeddings} rows: wrong --task?")
    bias = params.get(("decoder", "bias"))
    if bias is not None and bias.shape != (config.num_classes,):
        raise SeedImportError(f"the checkpoint's decoder has {bias.shape[0]} classes; the task "
                              f"has {config.num_classes}: wrong --task?")


def _describe(config: ModelConfig) -> str:
    return (f"d_model={config.d_model}, d_ssm={config.d_state}, block={config.block_size}, "
            f"{config.num_stages}x{config.layers_per_stage} layers, "
            f"expansion={config.state_expansion_factor}, conj_sym={config.conj_sym}, "
            f"norm={config.norm}, classes={config.num_classes}")


def _key(k: Any) -> str:
    return str(getattr(k, "key", getattr(k, "name", k)))


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], np.ndarray]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for k, v in tree.items():
        flat.update(_flatten(v, (*prefix, str(k))))
    return flat


def _map_leaves(tree: Any, fn: Callable[[Any], Any]) -> Any:
    return {k: _map_leaves(v, fn) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def load_reference_outputs(path: str | Path, sensor: SensorSpec
                           ) -> tuple[list[Recording], np.ndarray]:
    """Recordings and the reference code's logits on them, from an ``.npz`` holding
    ``rec{i}_t`` (microseconds), ``rec{i}_x`` (and ``rec{i}_y``, ``rec{i}_p`` for a 2-D sensor)
    and ``logits`` [N, C]: what a check of an import compares against."""
    data = np.load(path)
    logits = np.asarray(data["logits"], np.float32)
    recordings = []
    for i in range(logits.shape[0]):
        cols = [data[f"rec{i}_{c}"] for c in ("x", "y", "p")] if sensor.kind == "2d" \
            else [data[f"rec{i}_x"], None, None]
        recordings.append(make_recording(sensor, data[f"rec{i}_t"], *cols))
    return recordings, logits


# --- the import -----------------------------------------------------------------------------------
def import_seed(checkpoint: str | Path, model_yaml: str | Path, task: str, out: str | Path, *,
                name: str | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Import a reference checkpoint into an evssm checkpoint directory ``out``."""
    from .checkpoint import load_checkpoint, save_checkpoint

    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SeedImportError(f"{out} exists and is not empty; pass --force to replace it")
    with _Stages(progress) as stage:
        stage("reading the model YAML")
        yaml_path = Path(model_yaml).expanduser()
        config = config_from_seed(read_seed_model_yaml(yaml_path), task, name=name)
        stage("reading the checkpoint")
        ckpt = read_seed_checkpoint(checkpoint)
        stage("mapping variables")
        variables = convert_variables(config, ckpt)
        stage("writing the evssm checkpoint")
        spec = TASKS[task]
        origin = {
            "format": "event-ssm TrainState (flax.training.checkpoints)",
            "checkpoint": str(ckpt.path), "step": ckpt.step,
            "model_yaml": str(yaml_path.absolute()),
            "model_yaml_sha256": hashlib.sha256(yaml_path.read_bytes()).hexdigest(),
            "task": task, "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        save_checkpoint(out, config, variables, task=spec.dataset, origin=origin,
                        summary={"dataset": spec.dataset, "step": ckpt.step,
                                 "imported_from": "event-ssm"})
        stage("checking it loads")
        load_checkpoint(out)
    return out


class _Stages:
    """A progress bar over the import's stages (stderr), or nothing when disabled."""

    COUNT = 5

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: Any = None
        self.started = False

    def __enter__(self) -> Callable[[str], None]:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.COUNT, file=sys.stderr, dynamic_ncols=True,
                            bar_format="{desc:<32} {bar} {n_fmt}/{total_fmt} [{elapsed}]")
        return self.stage

    def stage(self, text: str) -> None:
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.started = True
            self.bar.set_description_str(text)

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self.bar is not None:
            if exc_type is None:
                self.bar.update(1)
                self.bar.set_description_str("done")
            self.bar.close()


# --- command line ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Import a checkpoint of the paper's reference implementation (event-ssm) into an evssm "
        "checkpoint directory, which `evssm serve --model NAME=DIR` and `evssm eval DIR` then "
        "use like any other. The architecture comes from the reference code's model YAML, the "
        "classes and sensor from --task.")
    parser.add_argument("checkpoint", help="the reference checkpoint: a folder holding "
                        "checkpoint_N, a checkpoint_N/ folder, or a checkpoint_N msgpack file")
    parser.add_argument("--config", required=True, metavar="MODEL_YAML",
                        help="the reference code's model YAML used to train it "
                             "(configs/model/{shd,ssc,dvs}/*.yaml there)")
    parser.add_argument("--task", required=True, choices=sorted(TASKS),
                        help="what the model classifies (sensor and classes)")
    parser.add_argument("--out", required=True, help="evssm checkpoint directory to write")
    parser.add_argument("--name", help="model name recorded in the config "
                        "(default: TASK-reference)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError

    try:
        out = import_seed(args.checkpoint, args.config, args.task, args.out, name=args.name,
                          overwrite=args.force, progress=not args.quiet)
    except (SeedImportError, CheckpointError) as exc:
        print(f"evssm import seed: {exc}", file=sys.stderr)
        return 2
    print(f"imported {args.checkpoint} as {out} ({args.task}); serve it with "
          f"`evssm serve --model {args.task}={out}`")
    return 0
