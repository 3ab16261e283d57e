"""Run the inference server: ``evssm serve [--model NAME=DIR]... [options]``.

Every option can also be set with an ``EVSSM_*`` environment variable (``--max-sessions`` ->
``EVSSM_MAX_SESSIONS``; ``--model`` -> ``EVSSM_MODEL``, a comma-separated list). The command line
wins over the environment. With no model the project's default model is served.

SIGTERM (or Ctrl-C) drains: new sessions are refused, packets already received are finished and
answered, every session is snapshotted (with --state-dir or --state-store), then every WebSocket
is closed with 1001 and the process exits 0. A second Ctrl-C exits at once; a repeated SIGTERM
is ignored (the drain is bounded by --drain-timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from types import FrameType
from typing import Any

import uvicorn

from .core.engine import Engine
from .settings import Settings, env_name

log = logging.getLogger("evssm.server")


def _options() -> list[tuple[str, str]]:
    """(option, field) of every described setting, in the order Settings declares them."""
    return [("--" + name.replace("_", "-"), name)
            for name, info in Settings.model_fields.items() if info.description]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", metavar="NAME=DIR", default=argparse.SUPPRESS,
                        help="a model to serve (repeatable): DIR is a checkpoint folder (a run's "
                             "best/) or config:NAME (random init); NAME= is optional. Default: the "
                             f"project's default model. Env: {env_name('models')}")
    for option, field in _options():
        info = Settings.model_fields[field]
        default = info.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        # A None default is explained by the description itself ("default: max sessions").
        origin = f"env: {env_name(field)}" if default is None else \
            f"default: {shown}; env: {env_name(field)}"
        # A switch off by default is a flag (--access-log), and still takes a value (true|false).
        flag: dict[str, Any] = {"nargs": "?", "const": "true"} if default is False else {}
        parser.add_argument(option, dest=field, default=argparse.SUPPRESS, metavar=field.upper(),
                            help=f"{info.description} ({origin})", **flag)


def settings_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> Settings:
    """Options given on the command line, then ``EVSSM_*`` variables, then defaults."""
    overrides: dict[str, Any] = {field: getattr(args, field, None) for _, field in _options()}
    overrides["models"] = getattr(args, "model", None)
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
    # JAX says at INFO that it found no TPU; keep both to warnings unless debugging.
    if settings.log_level.lower() != "debug":
        logging.getLogger("absl").setLevel(logging.WARNING)
        logging.getLogger("jax").setLevel(logging.WARNING)

    from .api.limits import ConnectionCap
    from .api.security import OPEN_PATHS, KeyFileError, install_log_redaction
    from .app import create_app

    try:
        app = create_app(settings)
    except KeyFileError as e:
        print(f"evssm serve: {e}", file=sys.stderr)
        return 2
    cap = ConnectionCap(app, settings.max_connections, exempt=OPEN_PATHS)
    config = uvicorn.Config(cap, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            lifespan="on", access_log=settings.access_log, **uvicorn_options(settings))
    install_log_redaction()  # after uvicorn.Config configured its loggers
    if not settings.access_log:
        logging.getLogger("uvicorn.error").addFilter(ConnectionLines())
    server = DrainingServer(config, app.state.engine, settings.host, keys=settings.api_keys is not None)
    cap.connections = server.server_state.connections
    server.run()
    return server.exit_code


class ConnectionLines(logging.Filter):
    """Drops the lines uvicorn and websockets write per WebSocket connection at INFO (accepted,
    opened, closed): without the access log the server logs sessions, not connections."""

    _messages = frozenset({"connection open", "connection closed", '%s - "WebSocket %s" [accepted]'})

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and record.msg in self._messages)


def max_frame_bytes(max_packet_events: int) -> int:
    """The largest WebSocket frame: the largest valid packet in its widest form (JSON integer
    arrays, at most 48 bytes per 2-D event) plus room for the other fields. A bigger frame is
    closed with 1009 before it is buffered or decoded."""
    return max_packet_events * 48 + (64 << 10)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's limits for ``settings``: h11 (its request head is capped, 16 KiB by default,
    where httptools takes headers without limit) with a deadline for the head, the keep-alive
    timeout, the largest WebSocket frame (:func:`max_frame_bytes`, which also bounds what a
    compressed message inflates to), permessage-deflate only when asked, and forwarded headers
    only from the listed proxies (uvicorn would trust loopback's). The connection limit is
    :class:`~.limits.ConnectionCap`'s, not uvicorn's: uvicorn's also refuses the probes."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from .api.limits import header_timeout_protocol

    proxies = settings.forwarded_allow_ips
    return dict(http=header_timeout_protocol(H11Protocol, settings.header_timeout),
                h11_max_incomplete_event_size=16 << 10,
                timeout_keep_alive=settings.keep_alive_timeout,
                ws_max_size=max_frame_bytes(settings.max_packet_events),
                ws_per_message_deflate=settings.ws_compression,
                proxy_headers=bool(proxies), forwarded_allow_ips=proxies or "",
                timeout_graceful_shutdown=max(1, int(settings.drain_timeout)))


class DrainingServer(uvicorn.Server):
    """A ``uvicorn.Server`` whose first SIGTERM/SIGINT drains the engine before shutting down
    (uvicorn alone would cut open WebSockets with 1012 and drop in-flight packets)."""

    def __init__(self, config: uvicorn.Config, engine: Engine, host: str, keys: bool = False):
        super().__init__(config)
        self.engine = engine
        self.host = host
        self.keys = keys  # API keys are required: the ready line says so
        self.exit_code = 0
        self._announced = False
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

    def _announce_ready(self) -> None:
        """One line when every model is compiled: where the server is and a command to try."""
        port = next((sock.getsockname()[1] for server in self.servers for sock in server.sockets),
                    self.config.port)
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        host = f"[{host}]" if ":" in host else host
        keys = "; API keys required (clients: --api-key or EVSSM_API_KEY)" if self.keys else ""
        log.info("ready after %.0f s: serving %s on http://%s:%d (live page /dashboard)%s; try: "
                 "evssm stream sim --url ws://%s:%d", self.engine.ready_after_s or 0,
                 ", ".join(self.engine.runners), host, port, keys, host, port)

    async def on_tick(self, counter: int) -> bool:
        if self.engine.ready and not self._announced:
            self._announced = True
            self._announce_ready()
        if self.engine.load_error and not self.should_exit:
            log.error("exiting: the models did not load (--log-level debug shows the traceback)")
            self.exit_code = 1
            self.should_exit = True
        return await super().on_tick(counter)
