"""The FastAPI app: WebSocket streaming, HTTP classification, health, metrics (no JAX).

``create_app(settings)`` builds one independent server instance (own engine, own metrics
registry). The wire contract is in ``docs/protocol.md``; this module maps frames and requests onto
the engine and never lets bad input reach it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

import msgpack
import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .engine import Engine
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .protocol import (CLOSE_SERVICE_RESTART, CLOSE_TRY_AGAIN_LATER, MSGPACK, MSGPACK_TYPES, Code,
                       ProtocolError, adapt, decode_events, decode_frame, encode_frame, error_frame,
                       frame_type, parse_geometry, parse_open, parse_seq, prepare)
from .durability import SnapshotIncompatible
from .sessions import Close, Packet, Reset, ServerFull, Session
from .settings import Settings
from .snapshots import StoreUnavailable

if TYPE_CHECKING:
    from evssm.models.streaming import StreamingModel

log = logging.getLogger("evssm.server.app")

STATIC_DIR = Path(__file__).parent / "static"
HTTP_STATUS = {  # HTTP status of each error code that HTTP endpoints return
    Code.UNKNOWN_MODEL: 404, Code.NOT_FOUND: 404, Code.METHOD_NOT_ALLOWED: 405,
    Code.REQUEST_TOO_LARGE: 413, Code.PACKET_TOO_LARGE: 413, Code.UNSUPPORTED_MEDIA_TYPE: 415,
    Code.NOT_READY: 503, Code.DRAINING: 503, Code.INTERNAL_ERROR: 500,
}


def http_error(code: Code, message: str, status: int | None = None) -> JSONResponse:
    """The JSON error body of the contract: ``{"error": CODE, "message": TEXT}``."""
    return JSONResponse({"error": str(code), "message": message}, status_code=status or HTTP_STATUS.get(code, 400))


# --- WebSocket connections -------------------------------------------------------------------
class _CloseMarker:
    def __init__(self, code: int, reason: str):
        self.code, self.reason = code, reason


class Connection:
    """One WebSocket connection: the session attached to it and an ordered outbox.

    Every reply (result, error, ack) is queued in the order its request arrived, as a future the
    scheduler resolves or a ready frame; one sender task sends them in that order. A bounded number
    of packets may await results (``max_inflight``); beyond that the receive loop stops reading,
    which pushes back on the client through TCP.
    """

    def __init__(self, ws: WebSocket, metrics: Metrics, max_inflight: int):
        self.ws = ws
        self.metrics = metrics
        self.session: Session | None = None
        self.binary = True  # encoding of server-initiated frames: the client's last frame's
        self.closing = False  # a close is queued: ignore further frames
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        self._inflight = asyncio.Semaphore(max_inflight)
        self._sender: asyncio.Task | None = None

    def start(self) -> None:
        self._sender = asyncio.create_task(self._send_loop())

    async def stop(self) -> None:
        """Wait for a queued close to go out, else stop sending (the client is gone)."""
        if self._sender is None:
            return
        if not self.closing:
            self._sender.cancel()
        try:
            await asyncio.wait_for(self._sender, timeout=5.0)
        except (asyncio.CancelledError, asyncio.TimeoutError, Exception):
            pass

    def send(self, frame: dict[str, Any] | asyncio.Future, binary: bool | None = None,
             packet: tuple[str, int, float] | None = None) -> None:
        """Queue a reply. ``packet`` = (model, events, received) for a result's latency metric."""
        self._outbox.put_nowait((frame, self.binary if binary is None else binary, packet))

    def close_after_flush(self, code: int, reason: str) -> None:
        if not self.closing:
            self.closing = True
            self._outbox.put_nowait(_CloseMarker(code, reason))

    def detach(self, session: Session, frame: dict[str, Any] | None) -> None:
        """The engine took ``session`` away (evicted, resumed elsewhere, failed)."""
        if self.session is session:
            self.session = None
        if frame is not None and not self.closing:
            self.send(frame)

    async def acquire_inflight(self) -> None:
        await self._inflight.acquire()

    def release_inflight(self) -> None:
        self._inflight.release()

    async def _send_loop(self) -> None:
        dead = False  # after a failed send, keep consuming (and releasing permits) without sending
        while True:
            entry = await self._outbox.get()
            if isinstance(entry, _CloseMarker):
                if not dead:
                    try:
                        await self.ws.close(code=entry.code, reason=entry.reason)
                    except Exception:
                        pass
                return
            frame, binary, packet = entry
            try:
                if isinstance(frame, asyncio.Future):
                    frame = await frame
                if not dead:
                    try:
                        data = encode_frame(frame, binary)
                        if binary:
                            await self.ws.send_bytes(data)
                        else:
                            await self.ws.send_text(data)
                    except Exception:
                        dead = True
                    else:
                        if packet is not None and frame.get("type") == "result":
                            model, events, received = packet
                            self.metrics.packet_done(model, events, time.perf_counter() - received)
            finally:
                if packet is not None:
                    self.release_inflight()


class StreamHandler:
    """Dispatches the frames of one connection (``open``, ``events``, ``reset``, ``close``)."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics, conn: Connection):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.conn = conn

    async def handle(self, data: bytes | str, received: float) -> None:
        binary = not isinstance(data, str)
        self.conn.binary = binary
        seq: int | None = None
        try:
            msg = decode_frame(data)
            kind = frame_type(msg)
            seq = parse_seq(msg)
            if kind == "events":
                await self._events(msg, seq, binary, received)
            elif kind == "open":
                await self._open(msg, binary)
            elif kind == "reset":
                self._reset(binary)
            else:
                self._close(binary)
        except ProtocolError as e:
            self.reject(e.code, e.message, e.seq if e.seq is not None else seq, binary)

    def reject(self, code: Code, message: str, seq: int | None, binary: bool) -> None:
        self.metrics.rejected.labels(code=str(code)).inc()
        self.conn.send(error_frame(code, message, seq), binary)

    def _session(self) -> Session:
        session = self.conn.session
        if session is None or session.closing:
            raise ProtocolError(Code.NO_SESSION, "no open session on this connection: send open first")
        return session

    async def _open(self, msg: dict[str, Any], binary: bool) -> None:
        engine, conn = self.engine, self.conn
        req = parse_open(msg, self.settings.default_top_k)
        if conn.session is not None and not conn.session.closing:
            raise ProtocolError(Code.SESSION_ALREADY_OPEN,
                                f"session {conn.session.id} is open on this connection; close it first")
        if engine.draining:
            self.reject(Code.DRAINING, "the server is shutting down; reconnect later", None, binary)
            conn.close_after_flush(CLOSE_SERVICE_RESTART, "draining")
            return
        if not engine.ready:
            message = engine.load_error or "models are loading and compiling; retry shortly"
            self.reject(Code.NOT_READY, message, None, binary)
            conn.close_after_flush(CLOSE_TRY_AGAIN_LATER, "not ready")
            return
        resumed = req.resume is not None
        restored = False
        if resumed:
            session = engine.resume(req.resume)
            if session is None:  # not live here: perhaps a snapshot of it is (restart, other replica)
                try:
                    session = await engine.restore(req.resume)
                except SnapshotIncompatible as e:
                    raise ProtocolError(Code.SNAPSHOT_INCOMPATIBLE, str(e)) from None
                except StoreUnavailable as e:
                    self.reject(Code.STORE_UNAVAILABLE, f"{e}; retry shortly", None, binary)
                    return
                except ServerFull as e:
                    self.reject(Code.SERVER_FULL, f"{e}; retry later", None, binary)
                    conn.close_after_flush(CLOSE_TRY_AGAIN_LATER, "server full")
                    return
                restored = session is not None
            if session is None:
                raise ProtocolError(Code.UNKNOWN_SESSION, "no live session has this resume token "
                                    "(it was closed, or evicted after the idle timeout)")
            if req.model is not None and req.model != session.model:
                raise ProtocolError(Code.INVALID_FIELD,
                                    f"the session streams to model {session.model!r}, not {req.model!r}")
            if ("sensor" in msg or "transform" in msg) and \
                    parse_geometry(msg, engine.runners[session.model].sensor) != session.geometry:
                raise ProtocolError(Code.INVALID_FIELD, "the session was opened with another sensor "
                                    "or transform; a resume must declare the same (or none)")
            previous = session.attachment
            if previous is not None and previous is not conn:
                previous.detach(session, error_frame(Code.SESSION_RESUMED_ELSEWHERE,
                                                     f"session {session.id} was resumed by another connection"))
            if "top_k" in msg:
                session.top_k = req.top_k
            self.metrics.sessions_resumed.labels(model=session.model).inc()
        else:
            model = req.model or engine.default_model
            if model not in engine.runners:
                raise ProtocolError(Code.UNKNOWN_MODEL,
                                    f"unknown model {model!r}; served: {sorted(engine.runners)}")
            geometry = parse_geometry(msg, engine.runners[model].sensor)
            try:
                session = engine.open(model, req.top_k)
            except ServerFull as e:
                self.reject(Code.SERVER_FULL, f"{e}; retry later", None, binary)
                conn.close_after_flush(CLOSE_TRY_AGAIN_LATER, "server full")
                return
            session.geometry = geometry
        session.attachment = conn
        session.last_active = time.monotonic()
        conn.session = session
        opened = {"type": "opened", "session": session.id, "resume": session.token,
                  "resumed": resumed, "restored": restored, "events": session.events,
                  "t": session.last_t, "durable": session.durable, "top_k": session.top_k,
                  "model": engine.runners[session.model].info}
        if session.geometry is not None:
            opened.update(geometry=session.geometry.describe(), cropped=session.cropped)
        conn.send(opened, binary)

    async def _events(self, msg: dict[str, Any], seq: int | None, binary: bool, received: float) -> None:
        conn = self.conn
        await conn.acquire_inflight()  # backpressure: at most max_inflight packets awaiting results
        try:
            session = self._session()
            if self.engine.draining:
                raise ProtocolError(Code.DRAINING, "the server is shutting down; packet not processed")
            runner = self.engine.runners[session.model]
            source = runner.sensor if session.geometry is None else session.geometry.source
            events = decode_events(msg, source, self.settings.max_packet_events)
            events, cropped = adapt(events, session.geometry)
            tokens, gaps = prepare(events, runner.sensor, session.last_t)
        except BaseException:
            conn.release_inflight()
            raise
        # Accepted: from here to submit there is no await, so no other frame can interleave.
        n = len(events)
        if n:
            session.last_t = int(events.t[-1])
        session.events += n
        session.cropped += cropped  # 0 without a declared geometry
        session.last_active = time.monotonic()
        reply = asyncio.get_running_loop().create_future()
        self.engine.submit(session, Packet(seq=seq, tokens=tokens, gaps=gaps, events_after=session.events,
                                           last_t=session.last_t, received=received, reply=reply,
                                           cropped_after=session.cropped))
        if session.geometry is not None:
            self.metrics.cropped.labels(model=session.model).inc(cropped)
            reply = _with_fields(reply, cropped=session.cropped)
        conn.send(reply, binary, packet=(session.model, n, received))

    def _reset(self, binary: bool) -> None:
        session = self._session()
        if self.engine.draining:
            raise ProtocolError(Code.DRAINING, "the server is shutting down")
        session.events, session.last_t, session.cropped = 0, None, 0
        session.last_active = time.monotonic()
        reply = asyncio.get_running_loop().create_future()
        self.engine.submit(session, Reset(reply=reply))
        self.conn.send(reply, binary)

    def _close(self, binary: bool) -> None:
        session = self._session()
        reply = asyncio.get_running_loop().create_future()
        self.engine.submit(session, Close(reply=reply))
        session.closing = True  # no more work, no resume; freed once everything before is answered
        self.conn.session = None
        self.conn.send(reply, binary)


def _with_fields(reply: asyncio.Future, **fields: Any) -> asyncio.Future:
    """A future for ``reply``'s frame with ``fields`` added when it is a ``result``."""
    out = reply.get_loop().create_future()

    def done(f: asyncio.Future) -> None:
        if out.done():
            return
        if f.cancelled():
            out.cancel()
        elif f.exception() is not None:
            out.set_exception(f.exception())  # type: ignore[arg-type]
        else:
            frame = f.result()
            out.set_result({**frame, **fields} if frame.get("type") == "result" else frame)

    reply.add_done_callback(done)
    return out


async def _serve_stream(ws: WebSocket, engine: Engine, settings: Settings, metrics: Metrics) -> None:
    await ws.accept()
    conn = Connection(ws, metrics, settings.max_inflight)
    handler = StreamHandler(engine, settings, metrics, conn)
    engine.connections.add(conn)
    conn.start()
    try:
        if engine.draining:
            handler.reject(Code.DRAINING, "the server is shutting down; reconnect later", None, True)
            conn.close_after_flush(CLOSE_SERVICE_RESTART, "draining")
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            received = time.perf_counter()
            if conn.closing:
                continue  # a close is on its way; the client's late frames are moot
            data = message.get("bytes")
            if data is None:
                data = message.get("text", "")
            try:
                await handler.handle(data, received)
            except Exception:  # a bug must not kill the connection
                log.exception("unexpected error handling a frame")
                handler.reject(Code.INTERNAL_ERROR, "internal error handling the frame", None, conn.binary)
    except Exception:  # the socket died under us
        pass
    finally:
        engine.connections.discard(conn)
        session = conn.session
        if session is not None and session.attachment is conn:
            session.attachment = None  # kept until the idle timeout for a resume
            session.last_active = time.monotonic()
        await conn.stop()


# --- HTTP ------------------------------------------------------------------------------------
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


async def _classify(request: Request, engine: Engine, settings: Settings, metrics: Metrics) -> Response:
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in MSGPACK_TYPES and content_type not in ("application/json", ""):
        return http_error(Code.UNSUPPORTED_MEDIA_TYPE,
                          f"content type {content_type!r}: send application/json or application/msgpack")
    max_bytes = settings.max_classify_events * 96 + (1 << 20)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        return http_error(Code.REQUEST_TOO_LARGE, f"request body over {max_bytes} bytes")
    body = await request.body()
    if len(body) > max_bytes:
        return http_error(Code.REQUEST_TOO_LARGE, f"request body over {max_bytes} bytes")
    try:
        data = msgpack.unpackb(body, raw=False) if content_type in MSGPACK_TYPES else json.loads(body)
    except Exception as e:
        return http_error(Code.MALFORMED_FRAME, f"body is not valid {'msgpack' if content_type in MSGPACK_TYPES else 'JSON'}: {e}")
    if not isinstance(data, dict):
        return http_error(Code.MALFORMED_FRAME, "body must be a map with a 'streams' array")
    if engine.draining:
        return http_error(Code.DRAINING, "the server is shutting down")
    if not engine.ready:
        return http_error(Code.NOT_READY, engine.load_error or "models are loading and compiling; retry shortly")
    model = data.get("model") or engine.default_model
    if not isinstance(model, str):
        return http_error(Code.INVALID_FIELD, "model must be a string")
    if model not in engine.runners:
        return http_error(Code.UNKNOWN_MODEL, f"unknown model {model!r}; served: {sorted(engine.runners)}")
    streams = data.get("streams")
    if not isinstance(streams, list):
        return http_error(Code.INVALID_FIELD, "streams must be an array of {t, x, y?, p?} maps")
    if len(streams) > settings.max_classify_streams:
        return http_error(Code.REQUEST_TOO_LARGE,
                          f"{len(streams)} streams, more than the limit of {settings.max_classify_streams}")
    top_k = data.get("top_k", settings.default_top_k)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 0 <= top_k <= 1000:
        return http_error(Code.INVALID_FIELD, "top_k must be an integer in 0..1000")
    runner = engine.runners[model]
    tokens, gaps, last_t, cropped = [], [], [], []
    total = 0
    for i, stream in enumerate(streams):
        try:
            if not isinstance(stream, dict):
                raise ProtocolError(Code.INVALID_FIELD, "a stream must be a map of columns")
            # A stream's own sensor/transform override the request's.
            declared = {k: stream[k] if k in stream else data.get(k) for k in ("sensor", "transform")}
            geometry = parse_geometry(declared, runner.sensor)
            source = runner.sensor if geometry is None else geometry.source
            events = decode_events(stream, source, settings.max_classify_events)
            total += len(events)
            if total > settings.max_classify_events:
                return http_error(Code.REQUEST_TOO_LARGE,
                                  f"more than {settings.max_classify_events} events in one request")
            events, removed = adapt(events, geometry)
            tok, gap = prepare(events, runner.sensor, None)
        except ProtocolError as e:
            return http_error(e.code, f"streams[{i}]: {e.message}")
        tokens.append(tok)
        gaps.append(gap)
        last_t.append(int(events.t[-1]) if len(events) else None)
        cropped.append(None if geometry is None else removed)
    probs, ready = await engine.classify(model, tokens, gaps) if streams else (np.zeros((0, 0)), np.zeros(0))
    results = []
    for i in range(len(streams)):
        n = int(tokens[i].shape[0])
        if ready[i]:
            p = probs[i]
            order = np.argsort(-p, kind="stable")[:min(top_k, p.shape[0])]
            results.append({"probs": p.tolist(), "label": runner.labels[int(np.argmax(p))], "events": n,
                            "t": last_t[i], "top": [[runner.labels[j], float(p[j])] for j in order]})
        else:
            results.append({"probs": None, "label": None, "events": n, "t": last_t[i], "top": []})
        if cropped[i] is not None:
            results[-1]["cropped"] = cropped[i]
    if any(cropped):
        metrics.cropped.labels(model=model).inc(sum(c for c in cropped if c))
    metrics.classified(model, len(streams), sum(int(t.shape[0]) for t in tokens))
    return _reply({"model": model, "results": results}, _wants_msgpack(request, content_type))


def create_app(settings: Settings | None = None, *,
               models: dict[str, "StreamingModel"] | None = None) -> FastAPI:
    """A new server instance. ``models`` (name -> loaded model) replaces ``settings.models``
    (tests and embedding: reuse a loaded model's compiled executables)."""
    settings = settings or Settings.from_env()
    metrics = Metrics()
    engine = Engine(settings, metrics, models)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="evssm", summary="Streaming inference for event-based state-space models",
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = engine

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

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket) -> None:
        await _serve_stream(ws, engine, settings, metrics)

    @app.post("/v1/classify")
    async def classify(request: Request) -> Response:
        return await _classify(request, engine, settings, metrics)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"default": engine.default_model, "ready": engine.ready,
                "models": [r.info for r in engine.runners.values()]}

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
                             "compilations": {n: r.compilations for n, r in engine.runners.items()}})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        return metrics.stats(engine.sessions_by_model())

    @app.get("/dashboard")
    async def dashboard() -> Response:
        page = STATIC_DIR / "dashboard.html"
        if not page.is_file():
            return http_error(Code.NOT_FOUND, "no dashboard page is installed (server/static/dashboard.html)")
        return FileResponse(page, media_type="text/html")

    routes = {r.path for r in app.routes if hasattr(r, "path")}
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics, routes=routes)
    return app
