"""Building and loading the native kernels' extension module (no JAX: the API layer uses its
packet ingest, the model code its streaming step; ``models/native.py`` explains the step).

The extension (``kernels/streaming_step.cc``) is compiled on first use with the machine's C++
compiler (``$CXX``, else ``g++``) for the machine's own instruction set and cached in
``$EVSSM_CACHE_DIR`` (default ``~/.cache/evssm``).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from types import ModuleType

KERNEL_SOURCE = Path(__file__).parent / "kernels" / "streaming_step.cc"
MODULE_NAME = "evssm_native_step"  # PyInit_evssm_native_step in the source
# The input filters' pass (models/filters.py), a module of its own built the same way.
FILTERS_SOURCE = Path(__file__).parent / "kernels" / "filters.cc"
FILTERS_MODULE = "evssm_native_filters"
COMPILE_FLAGS = ["-std=c++17", "-O3", "-ffast-math", "-fopenmp-simd", "-fno-strict-aliasing",
                 "-fPIC", "-w"]

log = logging.getLogger("evssm.models.native")
_lock = threading.Lock()
_library: ModuleType | None = None
_extensions: dict[str, ModuleType] = {}


class NativeUnavailable(RuntimeError):
    """The native step cannot run here (no compiler, failed build, not a CPU backend)."""


def cache_dir() -> Path:
    return Path(os.environ.get("EVSSM_CACHE_DIR") or Path.home() / ".cache" / "evssm")


def build_library(source: Path = KERNEL_SOURCE) -> Path:
    """Compile the kernel ``source`` (once per source and target) -> the shared library's path.

    The target instruction set is ``$EVSSM_NATIVE_ARCH`` (a ``-march`` value; default
    ``native``, this machine's own). A library already in the cache is used without a compiler,
    so an image can ship one built for a named target (``x86-64-v3``: AVX2 and FMA).
    Compiled with ``-ffast-math`` (so the exponentials, sines and erf of a row vectorise) but
    linked without it: a library linked with it would switch the whole process's FPU to flush
    denormals to zero.
    """
    arch = os.environ.get("EVSSM_NATIVE_ARCH") or "native"
    include = sysconfig.get_paths()["include"]
    flags = [*COMPILE_FLAGS, f"-march={arch}", f"-I{include}"]
    abi = sysconfig.get_config_var("EXT_SUFFIX") or sys.version
    key = hashlib.sha256("\0".join([source.read_text(), abi, *flags]).encode()
                         ).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{arch}-{key}.so"
    if target.exists():
        return target
    cxx = os.environ.get("CXX") or "g++"
    if not (Path(include) / "Python.h").exists():
        raise NativeUnavailable(f"no Python headers in {include} to build the native step "
                                "(install python3-dev)")
    if shutil.which(cxx) is None:
        raise NativeUnavailable(f"no C++ compiler {cxx!r} on PATH to build the native step "
                                "(install g++ or set $CXX, or use the xla backend)")
    log.info("building the native streaming step for -march=%s into %s (once)", arch, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            obj, lib = Path(tmp) / "step.o", Path(tmp) / "step.so"
            _run([cxx, *flags, "-c", str(source), "-o", str(obj)])
            try:  # glibc's vector maths (libmvec) where there is one
                _run([cxx, "-shared", str(obj), "-o", str(lib), "-lmvec", "-lm"])
            except NativeUnavailable:
                _run([cxx, "-shared", str(obj), "-o", str(lib), "-lm"])
            os.replace(lib, target)  # atomic: concurrent builders all end with a whole library
    except OSError as exc:
        raise NativeUnavailable(f"cannot build the native step in {target.parent}: {exc}") from exc
    return target


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise NativeUnavailable(f"building the native step failed: {' '.join(cmd)}\n"
                                f"{done.stderr.strip()[-2000:]}")


def load_library() -> ModuleType:
    """Build (if needed) and import the kernel's extension module, once per process."""
    global _library
    with _lock:
        if _library is not None:
            return _library
        _library = _import(build_library(), MODULE_NAME)
        return _library


def load_extension(source: Path, module_name: str) -> ModuleType:
    """Build (if needed) and import another kernel's extension module (its ``PyInit_`` function
    named ``module_name``), once per process."""
    with _lock:
        if module_name in _extensions:
            return _extensions[module_name]
        module = _extensions[module_name] = _import(build_library(source), module_name)
        return module


def _import(path: Path, module_name: str) -> ModuleType:
    try:
        loader = importlib.machinery.ExtensionFileLoader(module_name, str(path))
        spec = importlib.util.spec_from_file_location(module_name, path, loader=loader)
        if spec is None:
            raise ImportError(f"no module spec for {path}")
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except (ImportError, OSError) as exc:
        raise NativeUnavailable(f"cannot load the native module {path}: {exc}") from exc
    return module



def loaded() -> ModuleType | None:
    """The extension module if this process has loaded it already (never builds: safe on an
    event loop), else None."""
    return _library
