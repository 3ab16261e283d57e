"""Checkpoints: a directory that needs nothing else to be loaded.

Layout::

    CHECKPOINT_DIR/
      evssm.json     format version, the full model config (incl. sensor and class names),
                     task name, training summary (step, epoch, metrics), and for an imported
                     model its origin (what it was converted from)
      variables/     orbax PyTree checkpoint of {"params": ..., "batch_stats": ...}

Loading checks, in order, and says which failed: the directory exists; ``evssm.json`` exists and
parses; its format version is one this code reads; the config is valid; the stored arrays are
complete and match the config's architecture.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from .config import ModelConfig

FORMAT_VERSION = 1
METADATA_FILE = "evssm.json"
VARIABLES_DIR = "variables"


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be loaded; the message says why."""


def abstract_variables(config: ModelConfig) -> dict[str, Any]:
    """Shapes/dtypes of a model's variables (no computation)."""
    from .model import EventSSM, init_state

    module = EventSSM(config)
    state = init_state(config, 1)
    x = jnp.zeros((1, 8), jnp.int32)
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, x,
                                                   jnp.array([8]), state))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def this_process_only() -> Any:
    """orbax options for a read or write by this process alone: in a multi-process training job
    one process writes the served checkpoint, and orbax must not wait for the others."""
    import orbax.checkpoint as ocp

    k = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=k, active_processes={k})


def save_checkpoint(directory: str | Path, config: ModelConfig, variables: dict[str, Any], *,
                    task: str | None = None, summary: dict[str, Any] | None = None,
                    origin: dict[str, Any] | None = None) -> Path:
    """Write ``variables`` (``params`` and ``batch_stats``) and metadata to ``directory``.

    orbax writes the whole checkpoint into a temporary folder and renames it into place; an
    existing checkpoint at ``directory`` is replaced.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    tree = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    meta = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "task": task,
            "summary": summary or {}}
    if origin is not None:
        meta["origin"] = origin
    handler, save_args = _served_checkpoint_types()
    with ocp.Checkpointer(handler(), multiprocessing_options=this_process_only()) as checkpointer:
        checkpointer.save(directory, args=save_args(jax.device_get(tree), meta), force=True)
    return directory


@functools.cache
def _served_checkpoint_types() -> tuple[type, type]:
    """An orbax handler for the served layout (``evssm.json`` beside ``variables/``) and its save
    arguments, registered with orbax once (orbax is imported only when checkpoints are written)."""
    import orbax.checkpoint as ocp

    class ServedCheckpointHandler(ocp.CheckpointHandler):
        def save(self, directory: Any, args: ServedSave) -> None:
            path = Path(directory)
            with ocp.StandardCheckpointer(multiprocessing_options=this_process_only()) as arrays:
                arrays.save(path / VARIABLES_DIR, args.tree)
            (path / METADATA_FILE).write_text(json.dumps(args.meta, indent=2, sort_keys=True))

        def restore(self, directory: Any, args: Any = None) -> Any:
            raise NotImplementedError("load_checkpoint() reads served checkpoints")

    @ocp.args.register_with_handler(ServedCheckpointHandler, for_save=True, for_restore=True)
    @dataclass
    class ServedSave(ocp.args.CheckpointArgs):
        tree: dict[str, Any]
        meta: dict[str, Any]

    return ServedCheckpointHandler, ServedSave


def update_summary(directory: str | Path, **fields: Any) -> None:
    """Add ``fields`` to the training summary in a checkpoint's ``evssm.json`` (written whole to a
    temporary file, then renamed over the old one)."""
    path = Path(directory) / METADATA_FILE
    meta = json.loads(path.read_text())
    meta["summary"] = {**meta.get("summary", {}), **fields}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's ``evssm.json``, checked; raises :class:`CheckpointError`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint directory at {directory}")
    meta_path = directory / METADATA_FILE
    if not meta_path.exists():
        hint = ""
        if (directory / "best" / METADATA_FILE).exists():  # `evssm train --out` writes best/ there
            hint = f"; it is a training run folder: its checkpoint is {directory / 'best'}"
        raise CheckpointError(f"{directory} is not an evssm checkpoint: {METADATA_FILE} is "
                              f"missing{hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path} is truncated or corrupt: {exc}") from exc
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{directory} has checkpoint format version {version!r}; this "
                              f"evssm reads version {FORMAT_VERSION}")
    try:
        meta["config"] = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta_path} holds an invalid model config: {exc}") from exc
    return meta


def load_checkpoint(directory: str | Path) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """Load ``(config, variables, metadata)`` from a checkpoint directory."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    meta = read_metadata(directory)
    config: ModelConfig = meta["config"]
    var_dir = directory / VARIABLES_DIR
    if not var_dir.is_dir():
        raise CheckpointError(f"{directory} is incomplete: {VARIABLES_DIR}/ is missing")
    target = abstract_variables(config)
    try:
        with ocp.StandardCheckpointer(multiprocessing_options=this_process_only()) as reader:
            variables = reader.restore(var_dir, target)
    except ValueError as exc:
        raise CheckpointError(f"{directory} does not match its config's architecture "
                              f"({config.name}): {exc}") from exc
    except Exception as exc:  # orbax raises many types for missing/corrupt files
        raise CheckpointError(f"{directory} is truncated or corrupt: {exc}") from exc
    # orbax may hand back the stored shapes rather than the target's: compare explicitly.
    want = dict(jax.tree.leaves_with_path(target))
    got = dict(jax.tree.leaves_with_path(variables))
    for path in sorted(set(want) | set(got), key=str):
        if path not in want or path not in got or want[path].shape != got[path].shape:
            name = jax.tree_util.keystr(path)
            shapes = (getattr(got.get(path), "shape", "absent"),
                      getattr(want.get(path), "shape", "absent"))
            raise CheckpointError(f"{directory} does not match its config's architecture "
                                  f"({config.name}): {name} is stored as {shapes[0]}, the config "
                                  f"needs {shapes[1]}")
    return config, variables, meta
