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
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Generator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from evssm.models.wire import class_order

from .decoding import Decoders
from .durability import SnapshotIncompatible
from .engine import Engine
from .limits import BodyTimeout, BodyTooLarge, ClientDisconnect, Gate, read_body
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import HISTORY_INTERVAL_S, Metrics
from .protocol import (
    CLOSE_POLICY_VIOLATION,
    CLOSE_SERVICE_RESTART,
    CLOSE_TRY_AGAIN_LATER,
    MSGPACK,
    MSGPACK_TYPES,
    ClassifyLimits,
    Code,
    ProtocolError,
    adapt,
    cap_message,
    decode_events,
    decode_frame,
    encode_frame,
    error_frame,
    frame_type,
    parse_geometry,
    parse_open,
    parse_seq,
    prepare,
    shorten,
)
from .security import Access, AuthMiddleware
from .sessions import ClientFull, Close, Item, Packet, Reset, ServerFull, Session
from .settings import Settings
from .snapshots import StoreUnavailable
from .staging import Region

if TYPE_CHECKING:
    from evssm.models.streaming import StreamingModel

log = logging.getLogger("evssm.server.app")

STATIC_DIR = Path(__file__).parent / "static"
HTTP_STATUS = {  # HTTP status of each error code that HTTP endpoints return
    Code.UNKNOWN_MODEL: 404, Code.NOT_FOUND: 404, Code.METHOD_NOT_ALLOWED: 405,
    Code.REQUEST_TOO_LARGE: 413, Code.PACKET_TOO_LARGE: 413, Code.UNSUPPORTED_MEDIA_TYPE: 415,
    Code.NOT_READY: 503, Code.DRAINING: 503, Code.INTERNAL_ERROR: 500, Code.UNAUTHORIZED: 401,
    Code.BUSY: 503, Code.REQUEST_TIMEOUT: 408, Code.NON_FINITE_OUTPUT: 422,
}
CLASSIFY_RETRY_AFTER_S = 2  # Retry-After of a classify refused while its model's shapes compile
NON_FINITE_ADVICE = "the model's output is not finite (NaN or infinite); no answer is sent"


def withheld_non_finite(metrics: Metrics, model: str, whose: str) -> None:
    """Count and log an answer withheld because the model's output is not finite."""
    metrics.non_finite.labels(model=model).inc()
    log.error("model %s: non-finite output for %s; answered %s", model, whose, Code.NON_FINITE_OUTPUT)


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
FRAMES_PER_TURN = 16  # frames one connection handles before it lets the event loop run others


class _Resume:
    """Awaitable that finishes a coroutine which has already yielded ``pending`` to its caller
    (see :func:`_send_eagerly`): it hands ``pending`` on to the task awaiting it, and forwards
    what the task sends back, as ``await coro`` would have from the start."""

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any):
        self.coro, self.pending = coro, pending

    def __await__(self) -> Generator[Any, Any, Any]:
        pending = self.pending
        while True:
            try:
                value = yield pending
            except BaseException as exc:  # the task was cancelled, or the future failed
                try:
                    pending = self.coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    pending = self.coro.send(value)
                except StopIteration as stop:
                    return stop.value


async def _finish(resume: _Resume) -> None:
    await resume


def _send_eagerly(coro: Coroutine[Any, Any, Any]) -> asyncio.Task | None:
    """Run an ASGI send now, in the caller: None when it completed (the usual case: the server
    writes the message to the socket's buffer without waiting), else a task that finishes it
    (the socket's buffer is full: the client is not reading). Raises what the send raises.
    Eager start as asyncio's eager task factory does, without a task per message."""
    try:
        pending = coro.send(None)
    except StopIteration:
        return None
    return asyncio.ensure_future(_finish(_Resume(coro, pending)))


class _Reply:
    """A place in a connection's outbox: ``data`` is the encoded frame once known (a result's
    after its step); ``close`` = (code, reason) for the closing handshake."""

    __slots__ = ("conn", "binary", "data", "close")

    def __init__(self, conn: Connection, binary: bool):
        self.conn, self.binary = conn, binary
        self.data: bytes | str | None = None
        self.close: tuple[int, str] | None = None


class Connection:
    """One WebSocket connection: the session attached to it and an ordered outbox.

    Every reply (result, error, ack, notice, the final close) takes its place in the outbox in
    the order its request arrived; a result is filled in after its step. Ready replies at the
    head leave at once, sent by whoever filled them (no task per reply); a send that has to wait
    for the socket continues in a task and the replies behind it wait. Every queued reply counts
    against the connection's bound (``max_inflight``): past it the receive loop stops reading,
    which pushes back on the client through TCP, whatever the client sends.
    """

    def __init__(self, ws: WebSocket, bound: int):
        self.ws = ws
        self.session: Session | None = None
        self.principal: str | None = None  # the client's API key id, or its address without keys
        self.key_id: str | None = None  # the API key id (None: the server has no keys)
        self.binary = True  # encoding of server-initiated frames: the client's last frame's
        self.closing = False  # a close is queued: ignore further frames
        self.opened = False  # a session was opened or resumed here (the open deadline is met)
        self.bound = bound
        self._outbox: deque[_Reply] = deque()
        self._sending: asyncio.Task | None = None  # a send waiting for the socket
        self._dead = False  # a send failed or the client is gone: replies are dropped
        self._room: asyncio.Future[None] | None = None  # the receive loop waits for room
        self._flushed: asyncio.Future[None] | None = None  # stop() waits for the close to go

    @property
    def queued(self) -> int:
        """Replies queued and not yet handed to the socket (the bound counts these)."""
        return len(self._outbox) + (self._sending is not None)

    def reply(self, binary: bool | None = None) -> _Reply:
        """Reserve the next place in the outbox (filled later with :meth:`fill`)."""
        reply = _Reply(self, self.binary if binary is None else binary)
        self._outbox.append(reply)
        return reply

    def send(self, frame: dict[str, Any], binary: bool | None = None) -> None:
        """Queue a ready reply behind the earlier ones."""
        reply = self.reply(binary)
        self.fill(reply, encode_frame(frame, reply.binary))

    def fill(self, reply: _Reply, data: bytes | str) -> None:
        reply.data = data
        if self._outbox and self._outbox[0] is reply:
            self._flush()

    def close_after_flush(self, code: int, reason: str) -> None:
        if not self.closing:
            self.closing = True
            reply = self.reply()
            reply.close = (code, reason)
            self.fill(reply, b"")

    def detach(self, session: Session, frame: dict[str, Any] | None) -> None:
        """The engine took ``session`` away (evicted, resumed elsewhere, failed)."""
        if self.session is session:
            self.session = None
        if frame is not None and not self.closing:
            self.send(frame)

    async def wait_room(self) -> None:
        """Wait until one more reply fits the bound."""
        while self.queued >= self.bound and not self._dead:
            self._room = asyncio.get_running_loop().create_future()
            await self._room

    def _flush(self) -> None:
        """Hand the ready replies at the head of the outbox to the socket, in order."""
        outbox = self._outbox
        while self._sending is None and outbox and outbox[0].data is not None:
            reply = outbox.popleft()
            if self._dead:
                continue
            if reply.close is not None:
                self._dead = True  # nothing goes after the close
                coro = self.ws.close(code=reply.close[0], reason=reply.close[1])
            elif reply.binary:
                coro = self.ws.send_bytes(reply.data)  # type: ignore[arg-type]
            else:
                coro = self.ws.send_text(reply.data)  # type: ignore[arg-type]
            try:
                self._sending = _send_eagerly(coro)
            except Exception:
                self._dead = True
            if self._sending is not None:
                self._sending.add_done_callback(self._sent)
        if self._room is not None and not self._room.done() and (self.queued < self.bound or self._dead):
            self._room.set_result(None)
        if self._flushed is not None and not self._flushed.done() and self._sending is None and (
                self._dead or not outbox):
            self._flushed.set_result(None)

    def _sent(self, task: asyncio.Task) -> None:
        self._sending = None
        if task.cancelled() or task.exception() is not None:
            self._dead = True
        self._flush()

    async def stop(self) -> None:
        """The client is gone: wait (5 s at most) for a queued close to go out, then drop the rest."""
        if self.closing and (self._outbox or self._sending is not None):
            self._flushed = asyncio.get_running_loop().create_future()
            self._flush()
            try:
                await asyncio.wait_for(asyncio.shield(self._flushed), timeout=5.0)
            except (TimeoutError, asyncio.CancelledError):
                pass
        self._dead = True
        if self._sending is not None:
            self._sending.cancel()
        self._flush()


class OutputProcessor:
    """Builds and sends the frames of the scheduler's answers: the API layer's half of a step.

    A step's finished packets arrive together with their probabilities, readiness and class
    order as arrays (and, with snapshots, what each session's snapshots cover: ``durable``); the
    rows are turned into Python lists once per step, each packet's frame
    is encoded in its connection's encoding and put in its place in that connection's outbox,
    and the step's packet metrics are recorded once.
    """

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.labels: dict[str, tuple[str, ...]] = {}

    def model_loaded(self, model: str, labels: tuple[str, ...]) -> None:
        self.labels[model] = labels

    def results(self, model: str, sessions: list[Session], packets: list[Packet], probs: np.ndarray,
                ready: np.ndarray, order: np.ndarray, durable: np.ndarray | None) -> None:
        now = time.perf_counter()
        labels = self.labels[model]
        probs_rows, order_rows, ready_rows = probs.tolist(), order.tolist(), ready.tolist()
        durable_rows = None if durable is None else durable.tolist()
        # One vectorised check per step; a non-finite answer is never sent (NaN is not JSON).
        finite = np.isfinite(probs).all(1).tolist() if len(probs) else []
        latencies = np.empty(len(packets), np.float64)
        events = 0
        for i, (session, packet) in enumerate(zip(sessions, packets)):
            if ready_rows[i] and not finite[i]:
                withheld_non_finite(self.metrics, model, f"session {session.id}")
                frame = error_frame(Code.NON_FINITE_OUTPUT, f"{NON_FINITE_ADVICE}: reset the session "
                                    "(its state is unusable)", packet.seq)
            else:
                if ready_rows[i]:
                    row, best = probs_rows[i], order_rows[i][0]
                    top = [[labels[j], row[j]] for j in order_rows[i][:session.top_k]]
                    session.answer = (labels[best], row[best])
                else:
                    row, top = None, []
                frame = {"type": "result", "seq": packet.seq, "events": packet.events_after,
                         "t": packet.last_t, "probs": row, "top": top}
                if packet.cropped_after is not None:  # a session that declared its source sensor
                    frame["cropped"] = packet.cropped_after
                if durable_rows is not None:  # the server keeps snapshots
                    frame["durable"] = durable_rows[i]
            reply: _Reply = packet.reply
            reply.conn.fill(reply, encode_frame(frame, reply.binary))
            latencies[i] = now - packet.received
            events += packet.size
        self.metrics.model(model).packets_done(events, latencies)

    def reset_done(self, session: Session, item: Reset) -> None:
        reply: _Reply = item.reply
        reply.conn.fill(reply, encode_frame({"type": "reset_done", "session": session.id, "events": 0},
                                            reply.binary))

    def closed(self, session: Session, item: Close) -> None:
        reply: _Reply = item.reply
        reply.conn.fill(reply, encode_frame({"type": "closed", "session": session.id,
                                             "events": item.events}, reply.binary))

    def failed(self, session: Session, items: list[Item], reason: str) -> None:
        session.closing = True
        frame = error_frame(Code.INTERNAL_ERROR, reason)
        for item in items:
            reply: _Reply | None = item.reply
            if reply is not None:
                answer = {**frame, "seq": item.seq if isinstance(item, Packet) else None}
                reply.conn.fill(reply, encode_frame(answer, reply.binary))
        if session.attachment is not None:
            session.attachment.detach(session, error_frame(Code.INTERNAL_ERROR,
                                                           "session ended by an engine failure"))


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
                await self._events(msg, seq, received, size)
            elif kind == "open":
                await self._open(msg, binary)
            elif kind == "reset":
                self._reset()
            else:
                self._close()
        except ProtocolError as e:
            self.reject(e.code, e.message, e.seq if e.seq is not None else seq, binary)

    def reject(self, code: Code, message: str, seq: int | None, binary: bool) -> None:
        self.metrics.rejected.labels(code=str(code)).inc()
        self.conn.send(error_frame(code, message, seq), binary)

    def _session(self) -> Session:
        session = self.conn.session
        if session is None or session.closing:
            raise ProtocolError(Code.NO_SESSION, "no open session on this connection: send open first")
        if self.engine.draining:
            raise ProtocolError(Code.DRAINING, "the server is shutting down; not processed")
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
                    session = await engine.restore(req.resume, key_id=conn.key_id, owner=conn.principal)
                except SnapshotIncompatible as e:
                    raise ProtocolError(Code.SNAPSHOT_INCOMPATIBLE, str(e)) from None
                except StoreUnavailable as e:
                    self.reject(Code.STORE_UNAVAILABLE, f"{e}; retry shortly", None, binary)
                    return
                except ServerFull as e:
                    self._refuse_full(e, binary)
                    return
                restored = session is not None
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
            except ServerFull as e:
                self._refuse_full(e, binary)
                return
            session.geometry = geometry
        session.attachment = conn
        session.last_active = time.monotonic()
        conn.session = session
        conn.opened = True
        opened = {"type": "opened", "session": session.id, "resume": session.token,
                  "resumed": resumed, "restored": restored, "events": session.events,
                  "t": session.last_t, "durable": engine.durable(session), "top_k": session.top_k,
                  "model": public_info(engine.runners[session.model].info)}
        if session.geometry is not None:
            opened.update(geometry=session.geometry.describe(), cropped=session.cropped)
        conn.send(opened, binary)

    def _refuse_full(self, e: ServerFull, binary: bool) -> None:
        """``server_full`` or ``too_many_sessions`` (this client's cap), then close 1013."""
        if isinstance(e, ClientFull):
            self.reject(Code.TOO_MANY_SESSIONS, f"{e}; close some or retry later", None, binary)
            self.conn.close_after_flush(CLOSE_TRY_AGAIN_LATER, "too many sessions")
        else:
            self.reject(Code.SERVER_FULL, f"{e}; retry later", None, binary)
            self.conn.close_after_flush(CLOSE_TRY_AGAIN_LATER, "server full")

    async def _events(self, msg: dict[str, Any], seq: int | None, received: float, size: int) -> None:
        """Ingest: decode the columns, map a declared source sensor onto the model's, validate
        and tokenise them straight into the model's staging buffer, queue the packet. A rejected
        packet leaves nothing behind."""
        session = self._session()
        self.engine.expect(session.model)
        sensor = self.engine.runners[session.model].sensor
        geometry = session.geometry
        events = await self.decoders.frame(size, decode_events, msg,
                                           sensor if geometry is None else geometry.source,
                                           self.settings.max_packet_events)
        if self._session() is not session:  # taken away while decoding
            raise ProtocolError(Code.NO_SESSION, "the session left this connection while the packet was decoded")
        events, cropped = adapt(events, geometry)
        n = len(events)
        region: Region | None = None
        if n:
            staging = self.engine.staging[session.model]
            region = staging.reserve(n) or await staging.reserve_wait(n)
            try:
                if self._session() is not session:  # taken away while waiting for room
                    raise ProtocolError(Code.NO_SESSION, "the session ended while this packet waited")
                at = slice(region.start, region.start + n)
                prepare(events, sensor, session.last_t, staging.tokens[at], staging.gaps[at])
            except BaseException:
                staging.release(region)
                raise
            session.last_t = int(events.t[-1])
        # Accepted: from here to submit there is no await, so no other frame can interleave.
        session.events += n
        session.last_active = time.monotonic()
        if geometry is not None:
            session.cropped += cropped
            self.metrics.cropped.labels(model=session.model).inc(cropped)
        self.engine.submit(session, Packet(seq=seq, region=region, start=region.start if region else 0,
                                           size=n, events_after=session.events, last_t=session.last_t,
                                           received=received, reply=self.conn.reply(),
                                           cropped_after=None if geometry is None else session.cropped))

    def _reset(self) -> None:
        session = self._session()
        session.events, session.last_t, session.cropped, session.answer = 0, None, 0, None
        session.last_active = time.monotonic()
        self.engine.submit(session, Reset(reply=self.conn.reply()))

    def _close(self) -> None:
        session = self.conn.session
        if session is None or session.closing:
            raise ProtocolError(Code.NO_SESSION, "no open session on this connection: send open first")
        session.closing = True  # no more work, no resume; freed once everything before is answered
        self.conn.session = None
        self.engine.submit(session, Close(reply=self.conn.reply(), events=session.events))


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
    conn = Connection(ws, settings.max_inflight)
    conn.key_id, conn.principal = key_id, access.principal(ws.scope, key_id)
    handler = StreamHandler(engine, settings, metrics, conn, decoders)
    engine.connections.add(conn)
    # An upgraded socket that never opens a session would hold a connection for ever.
    deadline = asyncio.get_running_loop().call_later(settings.open_timeout, _open_deadline, conn,
                                                     settings.open_timeout)
    try:
        if engine.draining:
            handler.reject(Code.DRAINING, "the server is shutting down; reconnect later", None, True)
            conn.close_after_flush(CLOSE_SERVICE_RESTART, "draining")
        handled = 0
        while True:
            await conn.wait_room()  # backpressure: every queued reply counts
            handled += 1
            if handled % FRAMES_PER_TURN == 0:
                # Fairness: frames already queued are read, and most replies sent, without the
                # loop suspending, so a client that floods small frames would hold the event loop
                # for as long as its backlog lasts (other connections, /healthz). Let them in.
                await asyncio.sleep(0)
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
        deadline.cancel()
        engine.connections.discard(conn)
        session = conn.session
        if session is not None and session.attachment is conn:
            session.attachment = None  # kept until the idle timeout for a resume
            session.last_active = time.monotonic()
        await conn.stop()


def _open_deadline(conn: Connection, timeout: float) -> None:
    """Close a connection that has not opened (or resumed) a session within ``timeout`` s."""
    if not conn.opened and not conn.closing:
        conn.close_after_flush(CLOSE_POLICY_VIOLATION, f"no open frame within {timeout:g} s")


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
        if n_streams:
            probs, ready = await engine.classify(req.model, req.tokens, req.gaps)
            bad = np.flatnonzero(ready & ~np.isfinite(probs).all(1))
            if bad.size:
                withheld_non_finite(metrics, req.model, f"classify stream(s) {bad.tolist()[:8]}")
                return http_error(Code.NON_FINITE_OUTPUT,
                                  f"{NON_FINITE_ADVICE}: stream {int(bad[0])} of the request")
        results = []
        for i in range(n_streams):
            n = int(req.tokens[i].shape[0])
            if ready[i]:
                p = probs[i]
                order = class_order(p)[:min(req.top_k, p.shape[0])]
                results.append({"probs": p.tolist(), "label": runner.labels[int(np.argmax(p))], "events": n,
                                "t": req.last_t[i], "top": [[runner.labels[j], float(p[j])] for j in order]})
            else:
                results.append({"probs": None, "label": None, "events": n, "t": req.last_t[i], "top": []})
            if req.cropped[i] is not None:
                results[-1]["cropped"] = req.cropped[i]
        if any(req.cropped):
            metrics.cropped.labels(model=req.model).inc(sum(c for c in req.cropped if c))
        n_events = sum(int(t.shape[0]) for t in req.tokens)
        metrics.classified(req.model, n_streams, n_events)
        answered = [r["label"] for r in results if r["label"] is not None]
        log.info("classify %s: %d recording%s, %d events, %d answered%s, %.3f s", req.model,
                 n_streams, "" if n_streams == 1 else "s", n_events, len(answered),
                 f" ({answered[0]})" if len(answered) == 1 else "", time.perf_counter() - started)
        return _reply({"model": req.model, "results": results}, _wants_msgpack(request, content_type))
    finally:
        gate.leave()


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
                             "compilations": {n: r.compilations for n, r in engine.runners.items()},
                             "classify": {n: engine.classify_ready(n) for n in engine.runners}})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/stats")
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

    routes = {r.path for r in app.routes if hasattr(r, "path")}
    app.add_middleware(AuthMiddleware, access=access)  # inside the metrics: 401s are counted
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics, routes=routes)
    return app
