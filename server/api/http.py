"""The HTTP side of the API: error bodies, ``POST /v1/classify``, the read-only routes
(models, health, readiness, metrics, stats, the live page) and the request counter."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from evssm.models.wire import (
    MSGPACK,
    MSGPACK_TYPES,
    STATS_PATH,
    Classified,
    ClassifyReply,
    Code,
    HttpError,
    class_order,
)

from ..core.engine import Engine
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..metrics import Metrics
from ..settings import Settings
from .decoding import Decoders
from .limits import BodyTimeout, BodyTooLarge, ClientDisconnect, Gate, read_body
from .outputs import NON_FINITE_ADVICE, withheld_non_finite
from .protocol import ClassifyLimits, ProtocolError, shorten

log = logging.getLogger("evssm.server.app")

STATIC_DIR = Path(__file__).parent.parent / "static"
CLASSIFY_RETRY_AFTER_S = 2  # Retry-After of a classify refused while its model's shapes compile


def http_error(code: Code, message: str, status: int | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error body of the contract (:class:`~evssm.models.wire.HttpError`), with its
    code's HTTP status unless ``status`` is given."""
    body = HttpError(code, message)
    return JSONResponse(body.to_wire(), status_code=status or body.status, headers=headers)


_ORIGIN_PATHS = ("checkpoint", "model_yaml")  # an imported model's origin: files on the server


def public_info(info: dict[str, Any]) -> dict[str, Any]:
    """A model's description for clients: where it was loaded from is the operator's business
    (logged at start-up), so a checkpoint's path on disk becomes ``"checkpoint"`` and an
    imported model's origin keeps its step and digests but not its files' paths."""
    out = dict(info)
    if not str(out.get("source", "")).startswith("random-init"):
        out["source"] = "checkpoint"
    if isinstance(out.get("origin"), dict):
        out["origin"] = {k: v for k, v in out["origin"].items() if k not in _ORIGIN_PATHS}
    return out


class HttpMetricsMiddleware:
    """Counts HTTP requests by route (known paths only, to bound cardinality) and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: set[str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")
            route = path if path in self.routes else "unmatched"
            self.metrics.http_requests.labels(route=route, status=str(status)).inc()


def _wants_msgpack(request: Request, content_type: str) -> bool:
    accept = request.headers.get("accept", "")
    return content_type in MSGPACK_TYPES or any(t in accept for t in MSGPACK_TYPES)


def _reply(body: dict[str, Any], msgpack_out: bool, status: int = 200) -> Response:
    if msgpack_out:
        return Response(msgpack.packb(body, use_bin_type=True), status_code=status, media_type=MSGPACK)
    return JSONResponse(body, status_code=status)


async def classify(request: Request, engine: Engine, settings: Settings, metrics: Metrics, gate: Gate,
                   decoders: Decoders) -> Response:
    """``POST /v1/classify``: whole recordings in one body, answered as their streams' last results."""
    # A declared type is required: a browser form may post to any site without a preflight, but
    # only as text/plain, form or multipart data (docs/deployment.md, "Security").
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in MSGPACK_TYPES and content_type != "application/json":
        given = f"content type {shorten(content_type)}" if content_type else "no content type"
        return http_error(Code.UNSUPPORTED_MEDIA_TYPE,
                          f"{given}: send Content-Type: application/json or application/msgpack")
    if engine.draining:
        return http_error(Code.DRAINING, "the server is shutting down")
    if not engine.ready:
        return http_error(Code.NOT_READY, engine.load_error or "models are loading and compiling; retry shortly")
    started = time.perf_counter()
    if not gate.try_enter():  # before the body is read: a refused request costs no memory
        return http_error(Code.BUSY, f"{gate.limit} classify requests are being served; retry shortly",
                          headers={"Retry-After": "1"})
    try:
        max_bytes = settings.max_body_bytes
        try:
            body = await read_body(request, max_bytes, settings.body_timeout)
        except BodyTooLarge:
            return http_error(Code.REQUEST_TOO_LARGE, f"request body over {max_bytes} bytes",
                              headers={"Connection": "close"})
        except BodyTimeout:
            return http_error(Code.REQUEST_TIMEOUT, f"the body took longer than {settings.body_timeout:g} s",
                              headers={"Connection": "close"})
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening
        limits = ClassifyLimits(max_streams=settings.max_classify_streams,
                                max_events=settings.max_classify_events, default_top_k=settings.default_top_k)
        try:
            req = await decoders.classify_body(body, content_type in MSGPACK_TYPES,
                                               {name: r.sensor for name, r in engine.runners.items()},
                                               engine.default_model, limits)
        except ProtocolError as e:
            return http_error(e.code, e.message)
        del body
        if not engine.classify_ready(req.model):  # streams are served; classify compiles after
            return http_error(Code.BUSY, f"model {req.model} is still compiling its classify shapes "
                              f"(streaming works now); retry in a few seconds",
                              headers={"Retry-After": str(CLASSIFY_RETRY_AFTER_S)})
        runner = engine.runners[req.model]
        n_streams = len(req.tokens)
        probs = np.zeros((0, 0), np.float32)
        ready = np.zeros(0, bool)
        if n_streams:
            probs, ready = await engine.classify(req.model, *req.inputs())
            bad = np.flatnonzero(ready & ~np.isfinite(probs).all(1))
            if bad.size:
                withheld_non_finite(metrics, req.model, f"classify stream(s) {bad.tolist()[:8]}")
                return http_error(Code.NON_FINITE_OUTPUT,
                                  f"{NON_FINITE_ADVICE}: stream {int(bad[0])} of the request")
        results: list[Classified] = []
        for i in range(n_streams):
            n = int(req.tokens[i].shape[0])
            window = None if req.windows is None else req.windows[i]
            if ready[i]:
                p = probs[i]
                order = class_order(p)[:min(req.top_k, p.shape[0])]
                results.append(Classified(p.tolist(), runner.labels[int(np.argmax(p))], n, req.last_t[i],
                                          [[runner.labels[j], float(p[j])] for j in order], req.cropped[i],
                                          window=window, filtered=req.filtered[i]))
            else:
                results.append(Classified(None, None, n, req.last_t[i], [], req.cropped[i], window=window,
                                          filtered=req.filtered[i]))
        if any(req.cropped):
            metrics.cropped.labels(model=req.model).inc(sum(c for c in req.cropped if c))
        for counts in req.filtered:
            if counts:
                metrics.count_filtered(req.model, counts)
        n_events = sum(int(t.shape[0]) for t in req.tokens)
        metrics.classified(req.model, n_streams, n_events)
        answered = [r.label for r in results if r.label is not None]
        log.info("classify %s: %d recording%s, %d events, %d answered%s, %.3f s", req.model,
                 n_streams, "" if n_streams == 1 else "s", n_events, len(answered),
                 f" ({answered[0]})" if len(answered) == 1 else "", time.perf_counter() - started)
        return _reply(ClassifyReply(req.model, results).to_wire(), _wants_msgpack(request, content_type))
    finally:
        gate.leave()


def add_read_routes(app: FastAPI, engine: Engine, metrics: Metrics) -> None:
    """The read-only routes: models, health, readiness, metrics, stats and the live page."""

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"default": engine.default_model, "ready": engine.ready,
                "models": [public_info(r.info) for r in engine.runners.values()]}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "ready": engine.ready, "draining": engine.draining,
                "uptime_s": round(time.monotonic() - engine.started_at, 3)}

    @app.get("/readyz")
    async def readyz() -> Response:
        if engine.draining:
            return http_error(Code.DRAINING, "the server is shutting down")
        if not engine.ready:
            return http_error(Code.NOT_READY, engine.load_error or "models are loading and compiling")
        return JSONResponse({"ready": True, "models": list(engine.runners), "startup_s": engine.ready_after_s,
                             "compilations": {n: r.compilations for n, r in engine.runners.items()},
                             "classify": {n: engine.classify_ready(n) for n in engine.runners}})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get(STATS_PATH)
    async def stats() -> dict[str, Any]:
        return {**metrics.stats(engine.sessions_by_model()), "recent": engine.recent_sessions()}

    @app.get("/v1/stats/history")
    async def stats_history() -> dict[str, Any]:
        return metrics.history()

    @app.get("/dashboard")
    async def dashboard() -> Response:
        page = STATIC_DIR / "dashboard.html"
        if not page.is_file():
            return http_error(Code.NOT_FOUND, "no dashboard page is installed (server/static/dashboard.html)")
        return FileResponse(page, media_type="text/html")
