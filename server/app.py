"""The FastAPI app: WebSocket streaming, HTTP classification, health, metrics (no JAX).

``create_app(settings)`` builds one independent server instance: its engine (``server/core/``,
which knows nothing of the wire) and the API layer around it (``server/api/``: the stream
handler, the HTTP routes and the output processor that turns the core's records into frames).
The wire contract is in ``docs/protocol.md`` and ``evssm.models.wire``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from evssm.models.wire import CLASSIFY_PATH, STREAM_PATH, Code

from .api.decoding import Decoders
from .api.http import HttpMetricsMiddleware, add_read_routes, classify, http_error
from .api.limits import Gate
from .api.outputs import OutputProcessor
from .api.security import Access, AuthMiddleware
from .api.stream import serve_stream
from .core.engine import Engine
from .cpu import CpuAccount
from .metrics import HISTORY_INTERVAL_S, Metrics
from .settings import Settings

if TYPE_CHECKING:
    from evssm.models.streaming import StreamingModel

log = logging.getLogger("evssm.server.app")


def create_app(settings: Settings | None = None, *,
               models: dict[str, StreamingModel] | None = None) -> FastAPI:
    """A new server instance. ``models`` (name -> loaded model) replaces ``settings.models``
    (tests and embedding: reuse a loaded model's compiled executables)."""
    settings = settings or Settings.from_env()
    access = Access.create(settings.api_keys, settings.allowed_origins, settings.public_metrics)
    metrics = Metrics()
    engine = Engine(settings, metrics, OutputProcessor(metrics), models)
    gate = Gate(settings.max_classify_requests)
    decoders = Decoders()
    cpu = CpuAccount(decoders.cpu_seconds, engine.cpu_threads)
    metrics.account_cpu(cpu)

    async def record_history() -> None:
        """The one writer of the stats history: a sample per interval, on the loop's clock."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += HISTORY_INTERVAL_S
            await asyncio.sleep(max(0.0, due - loop.time()))
            metrics.record_history(engine.sessions_by_model())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cpu.start()  # this is the event-loop thread
        engine.start()
        recorder = asyncio.create_task(record_history(), name="evssm-stats-history")
        try:
            yield
        finally:
            recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recorder
            await engine.stop()
            decoders.shutdown()

    app = FastAPI(title="evssm", summary="Streaming inference for event-based state-space models",
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.classify_gate = gate

    @app.exception_handler(StarletteHTTPException)
    async def _http_exc(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: Code.NOT_FOUND, 405: Code.METHOD_NOT_ALLOWED}.get(exc.status_code, Code.INVALID_FIELD)
        return http_error(code, str(exc.detail), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_exc(request: Request, exc: RequestValidationError) -> JSONResponse:
        return http_error(Code.INVALID_FIELD, str(exc.errors()), 422)

    @app.exception_handler(Exception)
    async def _any_exc(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return http_error(Code.INTERNAL_ERROR, "internal server error", 500)

    @app.websocket(STREAM_PATH)
    async def stream(ws: WebSocket) -> None:
        await serve_stream(ws, engine, settings, metrics, access, decoders)

    @app.post(CLASSIFY_PATH)
    async def classify_route(request: Request) -> Response:
        return await classify(request, engine, settings, metrics, gate, decoders)

    add_read_routes(app, engine, metrics)

    routes = {r.path for r in app.routes if hasattr(r, "path")}
    app.add_middleware(AuthMiddleware, access=access)  # inside the metrics: 401s are counted
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics, routes=routes)
    return app
