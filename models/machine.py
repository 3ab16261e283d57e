"""The machine a benchmark ran on: CPU model, core counts and instruction sets.

Throughput figures from two machines compare only when each names its CPU, so every benchmark
report carries :func:`machine_info`. This module imports only NumPy and the standard library:
the JAX-free client (``evssm bench serve``) can record the same fields as ``evssm bench model``.
"""

from __future__ import annotations

import os
import platform
from importlib import import_module
from typing import Any

import numpy as np

CPUINFO = "/proc/cpuinfo"
# Lines of /proc/cpuinfo that name the processor: x86 says "model name"; ARM kernels say
# "Model" or "Hardware" for the board, or nothing beyond "CPU part" codes.
_MODEL_KEYS = ("model name", "Model", "Hardware", "cpu model")


def cpu_model(cpuinfo: str = CPUINFO) -> str:
    """The processor's name as the kernel reports it (Linux), else the platform's answer (on
    macOS and Windows ``platform.processor()``), else the architecture (``x86_64``)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in _MODEL_KEYS and value.strip():
                    return value.strip()
    except OSError:
        pass  # not Linux (or no /proc): the platform module's name follows
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, as a container or ``taskset`` limits
    it), where the system says; else every core."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def instruction_sets() -> list[str]:
    """SIMD instruction sets the CPU and the operating system both support, by NumPy's run-time
    detection (e.g. ``AVX2``, ``AVX512F``, ``FMA3`` on x86; ``NEON``, ``ASIMD``, ``SVE`` on Arm),
    in NumPy's order. Empty if this NumPy does not expose its detection."""
    # NumPy keeps the table in its core extension (``numpy._core`` from 2.0, ``numpy.core``
    # before); ``numpy.show_runtime`` prints the same table.
    for name in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            features = getattr(import_module(name), "__cpu_features__", None)
        except ImportError:
            continue
        if isinstance(features, dict):
            return [str(k) for k, present in features.items() if present]
    return []


def machine_info() -> dict[str, Any]:
    """What a benchmark report records of its machine (JSON-ready)."""
    return {
        "cpu": cpu_model(),
        "architecture": platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "instruction_sets": instruction_sets(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
