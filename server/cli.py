"""Run the inference server: ``evssm serve [--model NAME=CHECKPOINT_DIR]... [options]``.

Every option can also be set with an ``EVSSM_*`` environment variable (``--max-sessions`` ->
``EVSSM_MAX_SESSIONS``; ``--model`` -> ``EVSSM_MODEL``, a comma-separated list). The command line
wins over the environment. With no model the project's default model is served.

SIGTERM (or Ctrl-C) drains: new sessions are refused, packets already received are finished and
answered, every session is snapshotted (with --state-dir or --state-store), then every WebSocket
is closed with 1001 and the process exits 0. A second Ctrl-C exits
at once; a repeated SIGTERM is ignored (the drain is bounded by --drain-timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from types import FrameType
from typing import Any

import uvicorn

from .engine import Engine
from .settings import ENV_PREFIX, Settings

log = logging.getLogger("evssm.server")

# (option, Settings field, type for --help, help)
_OPTIONS: list[tuple[str, str, str]] = [
    ("--host", "host", "interface to listen on"),
    ("--port", "port", "TCP port"),
    ("--max-sessions", "max_sessions", "live sessions over all models; then open gets server_full"),
    ("--max-packet-events", "max_packet_events", "events per packet; more gets packet_too_large"),
    ("--session-idle-timeout", "session_idle_timeout", "seconds without a packet before a session is evicted"),
    ("--log-level", "log_level", "debug, info, warning, error"),
    ("--batch-buckets", "batch_buckets", "sessions per step, comma-separated shape buckets"),
    ("--length-buckets", "length_buckets", "events per session per step, comma-separated shape buckets"),
    ("--classify-length-buckets", "classify_length_buckets",
     "extra recording lengths for POST /v1/classify's offline form"),
    ("--classify-batch-events", "classify_batch_events", "largest padded batch (B*L) of one classify call"),
    ("--max-classify-events", "max_classify_events", "events per classify request"),
    ("--max-classify-streams", "max_classify_streams", "recordings per classify request"),
    ("--batch-wait-ms", "batch_wait_ms", "how long a lone packet waits for other sessions' packets"),
    ("--max-inflight", "max_inflight", "packets a connection may have awaiting results"),
    ("--slots-per-model", "slots_per_model", "device state rows per model (default: max sessions)"),
    ("--drain-timeout", "drain_timeout", "seconds a SIGTERM drain waits for in-flight packets"),
    ("--backend", "backend", "streaming step: native (C++ kernel, CPU only; built on first use), "
                             "xla, or auto (native where it builds)"),
    ("--state-dir", "state_dir", "keep session snapshots in this directory: a restarted server "
                                 "resumes its sessions (one server per directory)"),
    ("--state-store", "state_store", "keep session snapshots in Redis, redis://HOST:PORT/DB: "
                                     "replicas sharing it resume each other's sessions"),
    ("--snapshot-interval", "snapshot_interval", "seconds between snapshots of the sessions that "
                                                 "changed (all are written on SIGTERM)"),
]


def _env_name(field: str) -> str:
    return ENV_PREFIX + ("MODEL" if field == "models" else field.upper())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    parser.add_argument("--model", action="append", metavar="NAME=CHECKPOINT_DIR", default=argparse.SUPPRESS,
                        help="a model to serve (repeatable); SOURCE is a checkpoint directory or "
                             "config:NAME (random init); NAME= is optional. Default: the project's "
                             f"default model. Env: {_env_name('models')}")
    for option, field, help_text in _OPTIONS:
        default = getattr(defaults, field)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument(option, dest=field, default=argparse.SUPPRESS, metavar=field.upper(),
                            help=f"{help_text} (default: {shown}; env: {_env_name(field)})")
    parser.add_argument("--compilation-cache", default=argparse.SUPPRESS, metavar="DIR", help="persistent XLA compilation cache: faster restarts "
                                            f"(env: {ENV_PREFIX}COMPILATION_CACHE)")


def settings_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> Settings:
    overrides: dict[str, Any] = {field: getattr(args, field, None) for _, field, _ in _OPTIONS}
    if getattr(args, "model", None):
        overrides["models"] = args.model
    return Settings.from_env(env, **overrides)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"evssm serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # orbax logs every checkpoint step through absl at INFO; keep it to warnings unless debugging.
    if settings.log_level.lower() != "debug":
        logging.getLogger("absl").setLevel(logging.WARNING)
    cache = getattr(args, "compilation_cache", None) or os.environ.get(ENV_PREFIX + "COMPILATION_CACHE")
    if cache:  # read by JAX when it is first imported (by the runner)
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)

    from .app import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        lifespan="on", ws_max_size=max(16 << 20, settings.max_packet_events * 128),
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout)))
    server = DrainingServer(config, app.state.engine)
    server.run()
    return server.exit_code


class DrainingServer(uvicorn.Server):
    """A ``uvicorn.Server`` whose first SIGTERM/SIGINT drains the engine before shutting down
    (uvicorn alone would cut open WebSockets with 1012 and drop in-flight packets)."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine
        self.exit_code = 0
        self._drain_started = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        loop = self._loop
        if loop is None or (self._drain_started and sig == signal.SIGINT):
            super().handle_exit(sig, frame)  # Ctrl-C twice: uvicorn's own, immediate shutdown
            return
        if self._drain_started:
            return  # a repeated SIGTERM (e.g. sent to the process group as well) changes nothing
        self._drain_started = True
        log.info("received %s: draining", signal.Signals(sig).name)
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

    async def _drain(self) -> None:
        try:
            await self.engine.drain()
        finally:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.engine.load_error and not self.should_exit:
            log.error("exiting: %s", self.engine.load_error)
            self.exit_code = 1
            self.should_exit = True
        return await super().on_tick(counter)
