"""The persistent XLA compilation cache, shared by the server and the trainer.

A program compiled once is kept in a folder and loaded by the next process that needs it: a
restarted server loads its start-up programs, and a re-run of ``evssm train`` loads its train and
eval steps (one per padded shape) instead of compiling them. Default folder
``$EVSSM_CACHE_DIR/xla`` (``~/.cache/evssm/xla``); ``none`` or ``off`` turns it off.
"""

from __future__ import annotations

import os
from pathlib import Path

from .native_build import cache_dir

OFF = ("none", "off")


def cache_folder(setting: str | None) -> str | None:
    """The folder a setting names: None -> the default, ``none``/``off`` -> None (no cache)."""
    if setting is None:
        return str(cache_dir() / "xla")
    return None if setting.strip().lower() in OFF else setting


def use_compilation_cache(folder: str | None) -> str | None:
    """Keep compiled XLA programs in ``folder`` (None: no persistent cache), every one however
    quick to compile: a restart then loads the start-up programs instead of compiling them.
    JAX opens its cache once per process, at its first compilation; a process that compiled
    before keeps the folder it had. Returns the folder in use."""
    import jax

    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", folder)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder
