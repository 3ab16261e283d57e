"""Multi-process data parallelism for the trainer: joining a job, launching one on this machine.

A job is ``n`` processes, each holding a replica of the parameters and feeding ``1/n`` of every
global batch; gradients are averaged by XLA's collectives (gloo between CPU processes, NCCL between
GPUs). A process joins through ``jax.distributed`` when its environment names the job with the
standard variables::

    JAX_COORDINATOR_ADDRESS=host:port   process 0's address, reachable from every process
    JAX_NUM_PROCESSES=n                 processes in the job
    JAX_PROCESS_ID=k                    this process, 0 .. n-1

(or, with ``EVSSM_DISTRIBUTED=1`` and none of them, whatever ``jax.distributed`` detects from the
cluster, e.g. SLURM's variables). ``evssm train --processes N`` sets them for ``N`` processes on
this machine (docs/training.md).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

COORDINATOR = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "JAX_NUM_PROCESSES"
PROCESS_ID = "JAX_PROCESS_ID"
AUTO = "EVSSM_DISTRIBUTED"


def maybe_initialize() -> None:
    """Join the job the environment names (nothing to do for a single process).

    Must run before JAX computes anything. On CPU the cross-process collectives go through gloo.
    """
    if not (os.environ.get(COORDINATOR) or os.environ.get(AUTO)):
        return
    import jax

    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {}
    if os.environ.get(COORDINATOR):
        missing = [v for v in (NUM_PROCESSES, PROCESS_ID) if not os.environ.get(v)]
        if missing:
            raise SystemExit(f"evssm train: {COORDINATOR} is set but {' and '.join(missing)} "
                             f"is not; set all three to join a job")
        try:
            kwargs = {"coordinator_address": os.environ[COORDINATOR],
                      "num_processes": int(os.environ[NUM_PROCESSES]),
                      "process_id": int(os.environ[PROCESS_ID])}
        except ValueError:
            raise SystemExit(f"evssm train: {NUM_PROCESSES} and {PROCESS_ID} must be integers") from None
        if not 0 <= kwargs["process_id"] < kwargs["num_processes"]:
            raise SystemExit(f"evssm train: {PROCESS_ID}={kwargs['process_id']} is not in "
                             f"0..{kwargs['num_processes'] - 1}")
    jax.distributed.initialize(**kwargs)


def global_max(value: int) -> int:
    """The largest ``value`` over the job's processes (``value`` itself for one process)."""
    import jax

    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def barrier(name: str) -> None:
    """Wait until every process of the job reaches ``name`` (nothing for one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def gather_rows(array: Any) -> np.ndarray:
    """A batch-sharded global array [B, ...] as one host array on every process."""
    import jax

    if jax.process_count() == 1:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_local(argv: Sequence[str], processes: int) -> int:
    """Run ``evssm train argv`` as ``processes`` processes of one job on this machine.

    Process 0 prints as a single process would; the others print only errors. If one process
    fails the others are stopped (a collective would wait for it forever). Returns the first
    non-zero exit code, else 0.
    """
    base = dict(os.environ, **{COORDINATOR: f"127.0.0.1:{free_port()}",
                               NUM_PROCESSES: str(processes)})
    children = []
    for k in range(processes):
        env = dict(base, **{PROCESS_ID: str(k)})
        args = [sys.executable, "-m", "evssm.cli", "train", *argv]
        if k:
            args.append("--no-progress")
        children.append(subprocess.Popen(args, env=env,
                                         stdout=None if k == 0 else subprocess.DEVNULL))
    code = 0
    try:
        while children:
            for child in list(children):
                rc = child.poll()
                if rc is None:
                    continue
                children.remove(child)
                if rc and not code:
                    code = rc
                    for other in children:
                        other.send_signal(signal.SIGTERM)
            time.sleep(0.2)
    except KeyboardInterrupt:
        for child in children:
            child.send_signal(signal.SIGINT)
        for child in children:
            child.wait()
        return 130
    return code
