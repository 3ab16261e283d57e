"""``/v1/stream``: a WebSocket connection's frames (``open``, ``events``, ``reset``, ``close``).

Big frames are decoded off the event loop (``decoding.Decoders``); a connection's next frame is
read only after this one is handled, so its frames stay in order. Bad input is answered with an
error frame and changes nothing; the engine sees only validated work.

Over 400 lines on purpose: one connection's frames in one class, opening as named steps (resume,
restore, geometry, window, filters, live fields) and one ingest path in which every declared
field acts in order, with no await between a packet's acceptance and its submission. The live
fields' own state is ``live.py`` and ``windows.py``; decoding and validation ``protocol.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
from fastapi import WebSocket

from evssm.models.wire import (
    CLOSE_POLICY_VIOLATION,
    CLOSE_SERVICE_RESTART,
    CLOSE_TRY_AGAIN_LATER,
    Code,
    ErrorFrame,
    Opened,
)

from ..core.durability import SnapshotIncompatible
from ..core.engine import Engine
from ..core.sessions import ClientFull, LanesRefused, Packet, Reset, ServerFull, Session
from ..core.snapshots import StoreUnavailable
from ..core.staging import Region
from ..live.filtering import spec_of
from ..metrics import Metrics
from ..settings import Settings
from .connection import Connection
from .decoding import Decoders
from .http import public_info
from .live import SessionLive, check_resume, drop_packet, live_of, parse_live
from .protocol import (
    OpenRequest,
    ProtocolError,
    adapt,
    apply_filters,
    decode_events,
    decode_frame,
    frame_type,
    parse_filter_field,
    parse_geometry,
    parse_open,
    parse_seq,
    parse_window_field,
    prepare,
    shorten,
)
from .security import Access
from .windows import SessionWindow, Staged, WindowError, describe

log = logging.getLogger("evssm.server.app")

FRAMES_PER_TURN = 16  # frames one connection handles before it lets the event loop run others


class _Refused(Exception):
    """An ``open`` answered with an error frame and a close (the connection is done)."""


class StreamHandler:
    """Dispatches the frames of one connection (module docstring)."""

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
        except _Refused:
            pass

    def reject(self, code: Code, message: str, seq: int | None, binary: bool) -> None:
        self.metrics.rejected.labels(code=str(code)).inc()
        self.conn.send(ErrorFrame(code, message, seq), binary)

    def _session(self) -> Session:
        session = self.conn.session
        if session is None or not session.open:
            raise ProtocolError(Code.NO_SESSION, "no open session on this connection: send open first")
        if self.engine.draining:
            raise ProtocolError(Code.DRAINING, "the server is shutting down; not processed")
        return session

    # --- open: a new session, or a resumed one (live here, or restored from its snapshot) ---------
    async def _open(self, msg: dict[str, Any], binary: bool) -> None:
        conn = self.conn
        req = parse_open(msg, self.settings.default_top_k)
        live = parse_live(msg)
        if conn.session is not None and conn.session.open:
            raise ProtocolError(Code.SESSION_ALREADY_OPEN,
                                f"session {conn.session.id} is open on this connection; close it first")
        self._check_serving(binary)
        if req.resume is not None:
            session, restored = await self._resume(msg, req, req.resume, binary)
        else:
            session, restored = self._new_session(msg, req, binary), False
            session.live = None if live is None else SessionLive(live)
        self._attach(session)
        conn.send(self._opened(session, resumed=req.resume is not None, restored=restored), binary)

    def _check_serving(self, binary: bool) -> None:
        """Refuse an open while draining (close 1012) or while models load (close 1013)."""
        if self.engine.draining:
            self.reject(Code.DRAINING, "the server is shutting down; reconnect later", None, binary)
            self.conn.close_after_flush(CLOSE_SERVICE_RESTART, "draining")
            raise _Refused
        if not self.engine.ready:
            message = self.engine.load_error or "models are loading and compiling; retry shortly"
            self.reject(Code.NOT_READY, message, None, binary)
            self.conn.close_after_flush(CLOSE_TRY_AGAIN_LATER, "not ready")
            raise _Refused

    async def _resume(self, msg: dict[str, Any], req: OpenRequest, token: str, binary: bool
                      ) -> tuple[Session, bool]:
        """The session of ``token``, live here or restored from its snapshot, taken over from any
        other connection; its ``top_k`` follows the frame's. Returns it and whether it was restored."""
        session = self.engine.resume(token)
        restored = False
        if session is None:  # not live here: perhaps a snapshot of it is (restart, other replica)
            session = await self._restore(token, binary)
            restored = session is not None
        # A token opened under another API key is as unknown as a wrong token.
        if session is None or session.key_id != self.conn.key_id:
            raise ProtocolError(Code.UNKNOWN_SESSION, "no live session has this resume token "
                                "(it was closed, or evicted after the idle timeout)")
        self._check_same_stream(msg, req, session)
        check_resume(msg, session)
        previous = session.attachment
        if isinstance(previous, Connection) and previous is not self.conn:
            previous.detach(session, ErrorFrame(Code.SESSION_RESUMED_ELSEWHERE,
                                                f"session {session.id} was resumed by another connection"))
        if "top_k" in msg:
            session.top_k = req.top_k
        self.metrics.sessions_resumed.labels(model=session.model).inc()
        return session, restored

    async def _restore(self, token: str, binary: bool) -> Session | None:
        """The session of ``token`` restored from its snapshot (None: none to restore)."""
        try:
            return await self.engine.restore(token, key_id=self.conn.key_id, owner=self.conn.principal,
                                             window=SessionWindow.restore)
        except SnapshotIncompatible as e:
            raise ProtocolError(Code.SNAPSHOT_INCOMPATIBLE, str(e)) from None
        except StoreUnavailable as e:
            self.reject(Code.STORE_UNAVAILABLE, f"{e}; retry shortly", None, binary)
            raise _Refused from None
        except ServerFull as e:
            self._refuse_full(e, binary)
            raise _Refused from None

    def _check_same_stream(self, msg: dict[str, Any], req: OpenRequest, session: Session) -> None:
        """A resume may repeat the session's model and source geometry, never change them."""
        if req.model is not None and req.model != session.model:
            raise ProtocolError(Code.INVALID_FIELD, f"the session streams to model "
                                f"{shorten(session.model)}, not {shorten(req.model)}")
        if ("sensor" in msg or "transform" in msg) and \
                parse_geometry(msg, self.engine.runners[session.model].sensor) != session.geometry:
            raise ProtocolError(Code.INVALID_FIELD, "the session was opened with another sensor "
                                "or transform; a resume must declare the same (or none)")
        if "window" in msg and parse_window_field(msg["window"]) != \
                (None if session.window is None else session.window.spec):
            raise ProtocolError(Code.INVALID_FIELD, "the session was opened with another window "
                                "(or none); a resume must declare the same (or none)")
        if "filters" in msg and spec_of(self._filters(msg, session.model, session.geometry)) != \
                spec_of(session.filters):
            raise ProtocolError(Code.INVALID_FIELD, f"the session was opened with filters "
                                f"{spec_of(session.filters)}; a resume must declare the same (or none)")

    def _new_session(self, msg: dict[str, Any], req: OpenRequest, binary: bool) -> Session:
        """A new session of the requested (or default) model with the declared source geometry."""
        engine = self.engine
        model = engine.default_model if req.model is None else req.model
        if model is None or model not in engine.runners:
            raise ProtocolError(Code.UNKNOWN_MODEL,
                                f"unknown model {shorten(model)}; served: {sorted(engine.runners)}")
        geometry = parse_geometry(msg, engine.runners[model].sensor)
        spec = parse_window_field(msg.get("window"))
        filters = self._filters(msg, model, geometry)
        try:
            session = engine.open(model, req.top_k, owner=self.conn.principal, key_id=self.conn.key_id,
                                  lanes=None if spec is None else spec.lanes)
        except ServerFull as e:
            self._refuse_full(e, binary)
            raise _Refused from None
        except LanesRefused as e:
            raise ProtocolError(Code.INVALID_FIELD, f"window: {e}") from None
        session.geometry = geometry
        session.window = None if spec is None else SessionWindow(spec)
        if filters is not None:
            session.filters, session.filter_state = filters, filters.new_state()
        return session

    def _filters(self, msg: dict[str, Any], model: str, geometry: Any) -> Any:
        """The bank an open's ``filters`` declare, over the source (declared, else the model's) sensor."""
        return parse_filter_field(msg.get("filters"), self.engine.runners[model].sensor
                                  if geometry is None else geometry.source)

    def _attach(self, session: Session) -> None:
        session.attachment = self.conn
        session.last_active = time.monotonic()
        self.conn.session = session
        self.conn.opened = True

    def _opened(self, session: Session, *, resumed: bool, restored: bool) -> Opened:
        geometry = session.geometry
        return Opened(session=session.id, resume=session.token, resumed=resumed, restored=restored,
                      events=session.events, t=session.last_t, durable=self.engine.durable(session),
                      top_k=session.top_k, model=public_info(self.engine.runners[session.model].info),
                      geometry=None if geometry is None else geometry.describe(),
                      cropped=None if geometry is None else session.cropped,
                      window=None if session.window is None else describe(session.window.spec),
                      filters=spec_of(session.filters),
                      filtered=None if session.filters is None else session.filter_state.removed.to_dict(),
                      live=None if (live := live_of(session)) is None else live.options.to_dict())

    def _refuse_full(self, e: ServerFull, binary: bool) -> None:
        """``server_full`` or ``too_many_sessions`` (this client's cap), then close 1013."""
        if isinstance(e, ClientFull):
            self.reject(Code.TOO_MANY_SESSIONS, f"{e}; close some or retry later", None, binary)
            self.conn.close_after_flush(CLOSE_TRY_AGAIN_LATER, "too many sessions")
        else:
            self.reject(Code.SERVER_FULL, f"{e}; retry later", None, binary)
            self.conn.close_after_flush(CLOSE_TRY_AGAIN_LATER, "server full")

    # --- events, reset, close ------------------------------------------------------------------------
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
        live = live_of(session)
        newest = int(events.t[-1]) if live is not None and len(events) else None
        if newest is not None and live is not None and live.late(received, time.perf_counter(), newest):
            drop_packet(self.engine, self.metrics, session, live, events, seq, received, self.conn.reply)
            return
        staging = self.engine.staging[session.model]
        window = session.window
        room: Region | None = None
        if session.filters is not None and len(events):
            # The filters advance the session's state in place: room for every event (and a
            # window's zero-gap copies, at most one per lane) comes first, so no await falls between
            # them and the commit below (where another packet of the session could run); the room
            # is cut to what they keep.
            most = len(events) + (0 if window is None else window.lanes)
            room = staging.reserve(most) or await staging.reserve_wait(most)
        filtered = None
        region: Region | None = None
        lanes = None
        try:
            if self._session() is not session:  # taken away while waiting for room
                raise ProtocolError(Code.NO_SESSION, "the session ended while this packet waited")
            if session.filters is not None:
                events, filtered = apply_filters(events, session.filters, session.filter_state, session.last_t)
            events, cropped = adapt(events, geometry)
            n = len(events)
            staged, refused = _stage_window(window, events.t)
            if n:
                size = n + (0 if staged is None else staged.extra)
                if room is not None:
                    staging.shrink(room, size)
                region, room = room or staging.reserve(size) or await staging.reserve_wait(size), None
                if self._session() is not session:  # taken away while waiting for room
                    raise ProtocolError(Code.NO_SESSION, "the session ended while this packet waited")
                at = slice(region.start, region.start + n)
                prepare(events, sensor, session.last_t, staging.tokens[at], staging.gaps[at])
                if refused is not None:  # what prepare took and the window did not (never expected)
                    raise refused
                if staged is not None:
                    lanes = staged.rows(staging.tokens, staging.gaps, region.start, n)
        except BaseException:
            staging.release(room or region)
            if filtered is not None:  # refused after the filters ran: as if they had not
                filtered.undo.revert(session.filter_state)
            raise
        staging.release(room)  # the filters kept nothing
        if n:
            session.last_t = int(events.t[-1])
        elif staged is not None:
            lanes = staged.rows(np.zeros(0, np.int32), np.zeros(0, np.int32), 0, 0)
        if staged is not None and window is not None:
            window.commit(staged)
        # Accepted: from here to submit there is no await, so no other frame can interleave.
        session.events += n
        session.last_active = time.monotonic()
        if newest is not None and live is not None:
            live.arrived(received, newest)
        if geometry is not None:
            session.cropped += cropped
            self.metrics.cropped.labels(model=session.model).inc(cropped)
        if filtered is not None:
            self.metrics.count_filtered(session.model, filtered.counts.to_dict())
        keep_undo = filtered is not None and self.engine.durable(session) is not None
        self.engine.submit(session, Packet(seq=seq, region=region, start=region.start if region else 0,
                                           size=n, events_after=session.events, last_t=session.last_t,
                                           received=received, reply=self.conn.reply(),
                                           cropped_after=None if geometry is None else session.cropped,
                                           lanes=lanes, sent_t=newest,
                                           filtered=None if filtered is None else filtered.counts,
                                           # with snapshots: how the ledger takes it out of the state
                                           filters_undo=filtered.undo if filtered and keep_undo else None,
                                           window_after=None if window is None else window.state))

    def _reset(self) -> None:
        session = self._session()
        session.events, session.last_t, session.cropped, session.answer = 0, None, 0, None
        if session.window is not None:
            session.window.reset()
        if session.filters is not None:  # a new stream: its filters start afresh
            session.filter_state = session.filters.new_state()
        session.last_active = time.monotonic()
        live = live_of(session)
        if live is not None:
            live.restart_clock()
        self.engine.submit(session, Reset(reply=self.conn.reply()))

    def _close(self) -> None:
        session = self.conn.session
        if session is None or not session.open:
            raise ProtocolError(Code.NO_SESSION, "no open session on this connection: send open first")
        self.conn.session = None
        self.engine.close(session, self.conn.reply())


def _stage_window(window: SessionWindow | None, t: np.ndarray) -> tuple[Staged | None, ProtocolError | None]:
    """A windowed session's packet planned onto its lanes, or why the window refuses it (times
    that go back: ``prepare`` names the event at fault first)."""
    if window is None:
        return None, None
    try:
        return window.preview(t), None
    except WindowError as e:
        return None, ProtocolError(Code.TIMESTAMPS_DECREASING, str(e))


async def _refuse(ws: WebSocket, code: int, reason: str) -> None:
    """Accept only to close at once with ``code``: the client learns why, nothing was read."""
    await ws.accept()
    await ws.close(code=code, reason=reason)


async def serve_stream(ws: WebSocket, engine: Engine, settings: Settings, metrics: Metrics,
                       access: Access, decoders: Decoders) -> None:
    """One ``/v1/stream`` connection, from the upgrade to the last frame sent."""
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
