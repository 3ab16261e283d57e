"""Where big requests are decoded: never on the event loop.

Decoding is C code that holds the GIL for its whole call (``json.loads`` of a 56 MB classify body
takes 0.6 s), so a thread only moves the stall, it does not remove it. Two bounded pools:

- classify bodies over :data:`INLINE_BODY_BYTES` are parsed in worker *processes* (numpy and msgpack
  only, started from a clean fork server, recycled every :data:`TASKS_PER_WORKER` bodies so the
  memory a huge parse leaves behind goes back to the system); the arrays come back pickled;
- WebSocket frames over :data:`INLINE_FRAME_BYTES` are decoded on threads: a frame is at most
  ``ws_max_size`` (a few MiB, sized for the largest valid packet), a short hold of the GIL, and
  its columns come back as arrays without a copy.

Each frame's decoding is timed on the CPU clock of the thread that does it (two clock reads), for
the ``decode`` part of the server's CPU account (``server/cpu.py``).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from evssm.models.events import SensorSpec

from .protocol import ClassifyLimits, ClassifyRequest, parse_classify

INLINE_FRAME_BYTES = 64 << 10
INLINE_BODY_BYTES = 256 << 10
WORKERS = 2  # per pool
TASKS_PER_WORKER = 32


class Decoders:
    """The decode pools of one server instance (created on first use, shut down with the app)."""

    def __init__(self) -> None:
        self._threads: ThreadPoolExecutor | None = None
        self._processes: ProcessPoolExecutor | None = None
        self._on_loop_s = 0.0  # CPU seconds of frame decoding on the event loop (its only writer)
        self._on_threads_s = 0.0  # and on decode threads (under the lock)
        self._lock = threading.Lock()

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds spent decoding frames so far: on the event loop, on decode threads."""
        with self._lock:
            return self._on_loop_s, self._on_threads_s

    async def frame(self, size: int, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``: inline for a small frame, on a decode thread for a big one."""
        if size <= INLINE_FRAME_BYTES:
            started = time.thread_time()
            try:
                return fn(*args)
            finally:
                self._on_loop_s += time.thread_time() - started
        if self._threads is None:
            self._threads = ThreadPoolExecutor(WORKERS, thread_name_prefix="evssm-decode")
        return await asyncio.get_running_loop().run_in_executor(self._threads, self._timed, fn, *args)

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a decode thread, its CPU time counted."""
        started = time.thread_time()
        try:
            return fn(*args)
        finally:
            spent = time.thread_time() - started
            with self._lock:
                self._on_threads_s += spent

    async def classify_body(self, body: bytes, is_msgpack: bool, sensors: dict[str, SensorSpec],
                            default_model: str | None, limits: ClassifyLimits) -> ClassifyRequest:
        """:func:`protocol.parse_classify`, in a worker process for a big body."""
        if len(body) <= INLINE_BODY_BYTES:
            return parse_classify(body, is_msgpack, sensors, default_model, limits)
        if self._processes is None:
            self._processes = ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("forkserver"),
                                                  max_tasks_per_child=TASKS_PER_WORKER,
                                                  initializer=_exit_with, initargs=(os.getpid(),))
        return await asyncio.get_running_loop().run_in_executor(
            self._processes, parse_classify, body, is_msgpack, sensors, default_model, limits)

    def shutdown(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown(wait=False, cancel_futures=True)


def _exit_with(server_pid: int) -> None:
    """Worker initializer: end this worker when the server process ends, however it ends.

    A pool's workers block reading their call queue, whose write end they hold themselves, so a
    server killed with SIGKILL would leave them (and the fork server they keep alive) running
    forever. A daemon thread waits on the server's pid file descriptor instead.
    """
    def watch() -> None:
        try:
            fd = os.pidfd_open(server_pid)
        except (AttributeError, OSError):  # no pidfd (old kernel): poll
            while _alive(server_pid):
                threading.Event().wait(1.0)
        else:
            select.select([fd], [], [])
        os._exit(0)

    threading.Thread(target=watch, name="evssm-exit-with-server", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

