"""The FastAPI app: WebSocket streaming, HTTP classification, health, metrics (no JAX).

``create_app(settings)`` builds one independent server instance (own engine, own metrics
registry). The wire contract is in ``docs/protocol.md``; this module maps frames and requests onto
the engine and never lets bad input reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from .metrics import HISTORY_INTERVAL_S, Metrics
from .decoding import Decoders
from .limits import BodyTimeout, BodyTooLarge, ClientDisconnect, Gate, read_body
from .protocol import (CLOSE_POLICY_VIOLATION, CLOSE_SERVICE_RESTART, CLOSE_TRY_AGAIN_LATER, MSGPACK,
                       MSGPACK_TYPES, ClassifyLimits, Code, ProtocolError, adapt, cap_message, decode_events,
                       decode_frame, encode_frame, error_frame, frame_type, parse_geometry, parse_open,
                       parse_seq, prepare, shorten)
from .security import Access, AuthMiddleware
from .sessions import ClientFull, Close, Packet, Reset, ServerFull, Session
from .settings import Settings

if TYPE_CHECKING:
    from evssm.models.streaming import StreamingModel

log = logging.getLogger("evssm.server.app")

STATIC_DIR = Path(__file__).parent / "static"
HTTP_STATUS = {  # HTTP status of each error code that HTTP endpoints return
    Code.UNKNOWN_MODEL: 404, Code.NOT_FOUND: 404, Code.METHOD_NOT_ALLOWED: 405,
    Code.REQUEST_TOO_LARGE: 413, Code.PACKET_TOO_LARGE: 413, Code.UNSUPPORTED_MEDIA_TYPE: 415,
    Code.NOT_READY: 503, Code.DRAINING: 503, Code.INTERNAL_ERROR: 500, Code.UNAUTHORIZED: 401,
    Code.BUSY: 503, Code.REQUEST_TIMEOUT: 408,
}


def http_error(code: Code, message: str, status: int | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error body of the contract: ``{"error": CODE, "message": TEXT}``."""
    return JSONResponse({"error": str(code), "message": cap_message(message)},
                        status_code=status or HTTP_STATUS.get(code, 400), headers=headers)


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


# --- WebSocket connections -------------------------------------------------------------------
class _CloseMarker:
    def __init__(self, code: int, reason: str):
        self.code, self.reason = code, reason


class Connection:
    """One WebSocket connection: the session attached to it and an ordered outbox.

    Every reply (result, error, ack) is queued in the order its request arrived, as a future the
    scheduler resolves or a ready frame; one sender task sends them in that order. The connection
    holds at most ``max_inflight`` replies not yet sent: the receive loop takes a credit before it
    reads each frame and the reply to that frame gives it back once sent, so a client that does
    not read its replies stops being read (TCP pushes back) instead of growing the server. Frames
    the server sends on its own (``session_expired``, ``session_resumed_elsewhere``) take no
    credit; there is at most one per session attached here, and attaching takes an ``open``.
    """

    def __init__(self, ws: WebSocket, metrics: Metrics, max_inflight: int):
        self.ws = ws
        self.metrics = metrics
        self.session: Session | None = None
        self.principal: str | None = None  # the client's API key id, or its address without keys
        self.key_id: str | None = None  # the API key id (None: the server has no keys)
        self.binary = True  # encoding of server-initiated frames: the client's last frame's
        self.closing = False  # a close is queued: ignore further frames
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        self._credits = asyncio.Semaphore(max_inflight)
        self._held = False  # a credit taken for the frame being handled, not yet given to a reply
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

    async def take_credit(self) -> None:
        """Before reading a frame: wait until fewer than ``max_inflight`` replies are unsent."""
        await self._credits.acquire()
        self._held = True

    def settle(self) -> None:
        """After handling a frame: a credit its handling did not pass to a reply goes back."""
        if self._held:
            self._held = False
            self._credits.release()

    def reply(self, frame: dict[str, Any] | asyncio.Future, binary: bool | None = None,
              packet: tuple[str, int, float] | None = None) -> None:
        """Queue the reply to the frame being handled; it carries that frame's credit.
        ``packet`` = (model, events, received) for a result's latency metric."""
        credit, self._held = self._held, False
        self._outbox.put_nowait((frame, self.binary if binary is None else binary, packet, credit))

    def send(self, frame: dict[str, Any]) -> None:
        """Queue a frame the server sends on its own (no credit)."""
        self._outbox.put_nowait((frame, self.binary, None, False))

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

    async def _send_loop(self) -> None:
        dead = False  # after a failed send, keep consuming (and returning credits) without sending
        while True:
            entry = await self._outbox.get()
            if isinstance(entry, _CloseMarker):
                if not dead:
                    try:
                        await self.ws.close(code=entry.code, reason=entry.reason)
                    except Exception:
                        pass
                return
            frame, binary, packet, credit = entry
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
                if credit:
                    self._credits.release()


class StreamHandler:
    """Dispatches the frames of one connection (``open``, ``events``, ``reset``, ``close``).

    Big frames are decoded off the event loop (``decoding.Decoders``); the connection's next frame
    is read only after this one is handled, so its frames stay in order.
    """

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics, conn: Connection,
                 decoders: Decoders):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.conn = conn
        self.decoders = decoders

    async def handle(self, data: bytes | str, received: float) -> None:
        binary = not isinstance(data, str)
        self.conn.binary = binary
        size = len(data)
        seq: int | None = None
        try:
            msg = await self.decoders.frame(size, decode_frame, data)
            kind = frame_type(msg)
            seq = parse_seq(msg)
            if kind == "events":
                await self._events(msg, seq, binary, received, size)
            elif kind == "open":
                self._open(msg, binary)
            elif kind == "reset":
                self._reset(binary)
            else:
                self._close(binary)
        except ProtocolError as e:
            self.reject(e.code, e.message, e.seq if e.seq is not None else seq, binary)

    def reject(self, code: Code, message: str, seq: int | None, binary: bool) -> None:
        self.metrics.rejected.labels(code=str(code)).inc()
        self.conn.reply(error_frame(code, message, seq), binary)

    def _session(self) -> Session:
        session = self.conn.session
        if session is None or session.closing:
            raise ProtocolError(Code.NO_SESSION, "no open session on this connection: send open first")
        return session

    def _open(self, msg: dict[str, Any], binary: bool) -> None:
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
        if resumed:
            session = engine.resume(req.resume)
            # A token opened under another API key is as unknown as a wrong token.
            if session is None or session.key_id != conn.key_id:
                raise ProtocolError(Code.UNKNOWN_SESSION, "no live session has this resume token "
                                    "(it was closed, or evicted after the idle timeout)")
            if req.model is not None and req.model != session.model:
                raise ProtocolError(Code.INVALID_FIELD, f"the session streams to model "
                                    f"{shorten(session.model)}, not {shorten(req.model)}")
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
            model = engine.default_model if req.model is None else req.model
            if model not in engine.runners:
                raise ProtocolError(Code.UNKNOWN_MODEL,
                                    f"unknown model {shorten(model)}; served: {sorted(engine.runners)}")
            geometry = parse_geometry(msg, engine.runners[model].sensor)
            try:
                session = engine.open(model, req.top_k, owner=conn.principal, key_id=conn.key_id)
            except ClientFull as e:
                self.reject(Code.TOO_MANY_SESSIONS, f"{e}; close some or retry later", None, binary)
                conn.close_after_flush(CLOSE_TRY_AGAIN_LATER, "too many sessions")
                return
            except ServerFull as e:
                self.reject(Code.SERVER_FULL, f"{e}; retry later", None, binary)
                conn.close_after_flush(CLOSE_TRY_AGAIN_LATER, "server full")
                return
            session.geometry = geometry
        session.attachment = conn
        session.last_active = time.monotonic()
        conn.session = session
        opened = {"type": "opened", "session": session.id, "resume": session.token,
                  "resumed": resumed, "events": session.events, "t": session.last_t,
                  "top_k": session.top_k, "model": public_info(engine.runners[session.model].info)}
        if session.geometry is not None:
            opened.update(geometry=session.geometry.describe(), cropped=session.cropped)
        conn.reply(opened, binary)

    async def _events(self, msg: dict[str, Any], seq: int | None, binary: bool, received: float,
                      size: int) -> None:
        conn = self.conn
        session = self._session()
        if self.engine.draining:
            raise ProtocolError(Code.DRAINING, "the server is shutting down; packet not processed")
        runner = self.engine.runners[session.model]
        geometry = session.geometry
        source = runner.sensor if geometry is None else geometry.source
        events = await self.decoders.frame(size, decode_events, msg, source,
                                           self.settings.max_packet_events)
        if conn.session is not session or session.closing:  # taken away while decoding
            raise ProtocolError(Code.NO_SESSION, "the session left this connection while the packet was decoded")
        if self.engine.draining:
            raise ProtocolError(Code.DRAINING, "the server is shutting down; packet not processed")
        events, cropped = adapt(events, geometry)
        tokens, gaps = prepare(events, runner.sensor, session.last_t)
        # Accepted: from the session check to submit there is no await, so nothing interleaves.
        n = len(events)
        if n:
            session.last_t = int(events.t[-1])
        session.events += n
        session.last_active = time.monotonic()
        reply = asyncio.get_running_loop().create_future()
        self.engine.submit(session, Packet(seq=seq, tokens=tokens, gaps=gaps, events_after=session.events,
                                           last_t=session.last_t, received=received, reply=reply))
        if geometry is not None:
            session.cropped += cropped
            self.metrics.cropped.labels(model=session.model).inc(cropped)
            reply = _with_fields(reply, cropped=session.cropped)
        conn.reply(reply, binary, packet=(session.model, n, received))

    def _reset(self, binary: bool) -> None:
        session = self._session()
        if self.engine.draining:
            raise ProtocolError(Code.DRAINING, "the server is shutting down")
        session.events, session.last_t, session.cropped = 0, None, 0
        session.last_active = time.monotonic()
        reply = asyncio.get_running_loop().create_future()
        self.engine.submit(session, Reset(reply=reply))
        self.conn.reply(reply, binary)

    def _close(self, binary: bool) -> None:
        session = self._session()
        reply = asyncio.get_running_loop().create_future()
        self.engine.submit(session, Close(reply=reply))
        session.closing = True  # no more work, no resume; freed once everything before is answered
        self.conn.session = None
        self.conn.reply(reply, binary)


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


async def _refuse(ws: WebSocket, code: int, reason: str) -> None:
    """Accept only to close at once with ``code``: the client learns why, nothing was read."""
    await ws.accept()
    await ws.close(code=code, reason=reason)


async def _serve_stream(ws: WebSocket, engine: Engine, settings: Settings, metrics: Metrics,
                        access: Access, decoders: Decoders) -> None:
    allowed, key_id = access.authenticate(ws.scope)
    if not allowed:
        metrics.rejected.labels(code=str(Code.UNAUTHORIZED)).inc()
        await _refuse(ws, CLOSE_POLICY_VIOLATION, "missing or invalid API key")
        return
    if not access.origin_ok(ws.scope):
        metrics.rejected.labels(code=str(Code.UNAUTHORIZED)).inc()
        await _refuse(ws, CLOSE_POLICY_VIOLATION, "origin not allowed")
        return
    if len(engine.connections) >= settings.max_connections:
        await _refuse(ws, CLOSE_TRY_AGAIN_LATER, "too many connections")
        return
    await ws.accept()
    conn = Connection(ws, metrics, settings.max_inflight)
    conn.key_id, conn.principal = key_id, access.principal(ws.scope, key_id)
    handler = StreamHandler(engine, settings, metrics, conn, decoders)
    engine.connections.add(conn)
    conn.start()
    try:
        if engine.draining:
            handler.reject(Code.DRAINING, "the server is shutting down; reconnect later", None, True)
            conn.close_after_flush(CLOSE_SERVICE_RESTART, "draining")
        while True:
            if not conn.closing:
                await conn.take_credit()  # backpressure: at most max_inflight unsent replies
            try:
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
            finally:
                conn.settle()
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


async def _classify(request: Request, engine: Engine, settings: Settings, metrics: Metrics, gate: Gate,
                    decoders: Decoders) -> Response:
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in MSGPACK_TYPES and content_type not in ("application/json", ""):
        return http_error(Code.UNSUPPORTED_MEDIA_TYPE,
                          f"content type {shorten(content_type)}: send application/json or application/msgpack")
    if engine.draining:
        return http_error(Code.DRAINING, "the server is shutting down")
    if not engine.ready:
        return http_error(Code.NOT_READY, engine.load_error or "models are loading and compiling; retry shortly")
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
        runner = engine.runners[req.model]
        n_streams = len(req.tokens)
        if n_streams:
            probs, ready = await engine.classify(req.model, req.tokens, req.gaps)
        results = []
        for i in range(n_streams):
            n = int(req.tokens[i].shape[0])
            if ready[i]:
                p = probs[i]
                order = np.argsort(-p, kind="stable")[:min(req.top_k, p.shape[0])]
                results.append({"probs": p.tolist(), "label": runner.labels[int(np.argmax(p))], "events": n,
                                "t": req.last_t[i], "top": [[runner.labels[j], float(p[j])] for j in order]})
            else:
                results.append({"probs": None, "label": None, "events": n, "t": req.last_t[i], "top": []})
            if req.cropped[i] is not None:
                results[-1]["cropped"] = req.cropped[i]
        if any(req.cropped):
            metrics.cropped.labels(model=req.model).inc(sum(c for c in req.cropped if c))
        metrics.classified(req.model, n_streams, sum(int(t.shape[0]) for t in req.tokens))
        return _reply({"model": req.model, "results": results}, _wants_msgpack(request, content_type))
    finally:
        gate.leave()


def create_app(settings: Settings | None = None, *,
               models: dict[str, "StreamingModel"] | None = None) -> FastAPI:
    """A new server instance. ``models`` (name -> loaded model) replaces ``settings.models``
    (tests and embedding: reuse a loaded model's compiled executables)."""
    settings = settings or Settings.from_env()
    access = Access.create(settings.api_keys, settings.allowed_origins, settings.public_metrics)
    metrics = Metrics()
    engine = Engine(settings, metrics, models)
    gate = Gate(settings.max_classify_requests)
    decoders = Decoders()

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

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket) -> None:
        await _serve_stream(ws, engine, settings, metrics, access, decoders)

    @app.post("/v1/classify")
    async def classify(request: Request) -> Response:
        return await _classify(request, engine, settings, metrics, gate, decoders)

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
                             "compilations": {n: r.compilations for n, r in engine.runners.items()}})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        return metrics.stats(engine.sessions_by_model())

    @app.get("/v1/stats/history")
    async def stats_history() -> dict[str, Any]:
        return metrics.history()

    @app.get("/dashboard")
    async def dashboard() -> Response:
        page = STATIC_DIR / "dashboard.html"
        if not page.is_file():
            return http_error(Code.NOT_FOUND, "no dashboard page is installed (server/static/dashboard.html)")
        return FileResponse(page, media_type="text/html")

    routes = {r.path for r in app.routes if hasattr(r, "path")}
    app.add_middleware(AuthMiddleware, access=access)  # inside the metrics: 401s are counted
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics, routes=routes)
    return app
