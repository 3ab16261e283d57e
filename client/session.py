"""Streaming sessions over the WebSocket endpoint: :class:`AsyncStreamSession` and its synchronous
twin :class:`StreamSession`.

A session sends event packets in order and receives one result per packet, in order. It keeps at
most ``max_in_flight`` packets unanswered (``send`` waits for room: backpressure, so a sensor faster
than the server cannot grow memory without bound). When the connection drops it reconnects by
itself, re-attaches to the same server session with the resume token, and resends exactly the
packets the server had not processed: the ``events`` count of the server's ``opened`` reply says how
many of the unanswered packets it already consumed, so none is applied twice.

When the server keeps session snapshots (``evssm serve --state-dir`` or ``--state-store``), every
result says how many of the session's events its last snapshot covers (``durable``), and the
session also keeps the packets answered after that point (at most ``max_replay_events`` events).
If the server died and a restarted server or another replica restores the session from an older
snapshot, the ``opened`` reply's count is at or after ``durable``: the session sends the answered
packets after it again (merged into larger packets, which by the streaming invariant gives the same
state; their answers are dropped), then the unanswered ones, and the stream goes on exactly as if
it had never been cut. Without snapshots nothing extra is kept.

Typical use::

    async with AsyncStreamSession("ws://127.0.0.1:8000") as session:
        async for result in session.stream(packetize(recording, events=256)):
            print(result.seq, result.top)

    with StreamSession("ws://127.0.0.1:8000") as session:
        for result in session.stream(packetize(recording, events=256)):
            ...
"""

# Over 400 lines on purpose: this is the session's public API (open, send, recv, poll, drain,
# results, stream, reset, close, each documented) and the reader task that owns the connection's
# lifetime. Its parts live beside it: transport.py (the socket), window.py (in-flight packets and
# unread answers), ledger.py (the replay ledger), resync.py (the resync policy), state.py.

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import msgpack
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from evssm.models.events import Recording, SensorSpec
from evssm.models.wire import CLOSE_TRY_AGAIN_LATER, Code

from .errors import (
    ClientCode,
    ClientError,
    ConnectionLost,
    NothingInFlight,
    ProtocolError,
    ServerError,
    ServerUnavailable,
    SessionClosed,
    SessionExpired,
    server_error,
)
from .ledger import ReplayLedger, Sent
from .packets import Packet
from .protocol import (
    Result,
    SessionInfo,
    auth_headers,
    decode_frame,
    encode_message,
    endpoint_url,
    event_columns,
    sensor_declaration,
)
from .resync import Resume, Retries, lost_result, resync
from .state import SessionState, moved
from .transport import ConnectFailed, Transport, close_code
from .window import InFlight, ResultQueue

__all__ = ["AsyncStreamSession", "ConnectFailed", "Resume", "SessionState"]


# Codes that end a session on this connection when not tied to a packet; codes a new session can
# replace when the client still holds the whole stream.
_GONE = (Code.UNKNOWN_SESSION, Code.SNAPSHOT_INCOMPATIBLE)


def _as_recording(packet: Recording | Packet | Any) -> Recording:
    if isinstance(packet, Recording):
        return packet
    if isinstance(packet, Packet):
        return packet.events
    raise TypeError(f"expected a Recording or Packet, got {type(packet).__name__}")


class AsyncStreamSession:
    """One streaming session with the server (asyncio).

    Parameters:
        url: the server, ``ws://HOST:PORT`` (path ``/v1/stream`` is added), or a full URL.
        model: model name; None for the server's default.
        resume: a resume token of a live session to re-attach to instead of opening a new one.
        top_k: how many ``top`` classes the server returns per result (None: server default).
        max_in_flight: most packets sent and not yet answered; ``send`` waits beyond that.
        reconnect: reconnect and resume by itself after a dropped connection.
        max_reconnect_attempts: attempts per drop before giving up with :class:`ConnectionLost`
            (when ``reconnect_timeout`` is None).
        reconnect_timeout: seconds to keep trying after a drop instead of a number of attempts
            (a restarting server may take minutes to load and compile); None: count attempts.
        on_reconnect_wait: called once per drop when the first attempt fails, with the seconds
            left to try and the failure (``evssm stream`` says there that it is waiting, and why).
        backoff: (first, largest) delay in seconds between reconnect attempts, doubling.
        open_timeout: seconds to wait for the connection and the ``opened`` reply.
        binary: send columns as little-endian ``bin`` (fast) rather than integer arrays.
        sensor: the source's sensor, declared in ``open`` so that the server maps it onto the
            model's (None: the source is the model's sensor).
        transform: how the server maps it (``{"crop", "scale", "flip_x", "flip_y"}``; see the
            protocol); None for the default (fit, centred).
        filters: input filters the server applies to the source's events before the model
            (``{"refractory_us", "denoise_us", "max_rate"}``; see the protocol); None: none.
        max_replay_events: most answered events kept for a replay after a server restart (only
            when the server keeps snapshots); past it the oldest are dropped, and a restore from a
            snapshot older than what is kept fails with ``resume_mismatch``.
        replay_packet_events: events per packet when answered packets are sent again.
        api_key: the server's API key, sent as ``Authorization: Bearer KEY`` (None: the
            ``EVSSM_API_KEY`` variable, or no key).
        open_fields: more fields of the ``open`` frame, sent again on every resume: ``decide``,
            ``results``, ``realtime``, ``overload``, ``max_lag_ms`` (docs/protocol.md).

    Results and errors come back through :meth:`recv` (and :meth:`poll`, :meth:`drain`,
    :meth:`results`, :meth:`stream`) in packet order; a packet the server rejected raises its
    :class:`~evssm.client.errors.ServerError` at its place in that order, and the session stays
    usable. Results are kept until read, so read them (or use :meth:`stream`) on long streams.
    One task at a time should read results.
    """

    def __init__(self, url: str, *, model: str | None = None, resume: str | None = None,
                 top_k: int | None = None, max_in_flight: int = 8, reconnect: bool = True,
                 max_reconnect_attempts: int = 8, reconnect_timeout: float | None = None,
                 on_reconnect_wait: Callable[[float, BaseException], None] | None = None,
                 backoff: tuple[float, float] = (0.05, 2.0),
                 open_timeout: float = 10.0, binary: bool = True,
                 sensor: SensorSpec | None = None, transform: Mapping[str, Any] | None = None,
                 filters: Mapping[str, int] | None = None, max_replay_events: int = 1 << 22,
                 replay_packet_events: int = 16384,
                 api_key: str | None = None, window: Mapping[str, Any] | None = None,
                 open_fields: Mapping[str, Any] | None = None):
        self._window = InFlight(max_in_flight)
        if replay_packet_events < 1 or max_replay_events < 0:
            raise ValueError("replay_packet_events must be >= 1 and max_replay_events >= 0")
        self.url = endpoint_url(url, "stream")
        self.model = model
        self.top_k = top_k
        self.reconnect = reconnect
        self.max_reconnect_attempts = max_reconnect_attempts
        self.reconnect_timeout = reconnect_timeout
        self.on_reconnect_wait = on_reconnect_wait
        self.backoff = backoff
        self.open_timeout = open_timeout
        self.binary = binary
        self.sensor = sensor
        self.transform = None if transform is None else dict(transform)
        self.sliding_window = None if window is None else dict(window)  # the open frame's ``window``
        self.filters = None if filters is None else dict(filters)
        self.open_fields = dict(open_fields or {})
        self.max_replay_events = max_replay_events
        self.replay_packet_events = replay_packet_events
        self.info: SessionInfo | None = None
        self.reconnects = 0  # successful re-attachments so far
        self.resumes: list[Resume] = []  # every re-attachment, in order
        self._resume = resume
        self._transport = Transport(self.url, headers=auth_headers(api_key), open_timeout=open_timeout)
        self._state = SessionState.NEW
        self._failure: ClientError | None = None  # raised by every call once set
        self._reader: asyncio.Task[None] | None = None
        self._next_seq = 0
        self._results = ResultQueue()
        self._ledger = ReplayLedger(max_replay_events)
        self._filtered = 0  # events the session's input filters removed from the stream, as answered
        self._send_lock: asyncio.Lock | None = None
        self._changed: asyncio.Event | None = None  # replaced on every notify (see _notify)

    # -- public API ------------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def max_in_flight(self) -> int:
        """Most packets sent and not yet answered; ``send`` waits beyond that."""
        return self._window.limit

    @property
    def session_id(self) -> str | None:
        return self.info.session if self.info else None

    @property
    def resume_token(self) -> str | None:
        return self.info.resume if self.info else self._resume

    @property
    def acked_events(self) -> int:
        """Events of the stream the server has answered: its count, cropped events included."""
        return self._ledger.acked

    @property
    def in_flight(self) -> int:
        """Packets sent and not yet answered by the server."""
        return len(self._window)

    @property
    def durable(self) -> int | None:
        """Events of the current stream covered by the server's last snapshot of the session
        (None: the server keeps no snapshots)."""
        return self._ledger.durable

    @property
    def replay_events(self) -> int:
        """Answered events kept for a replay after a restart (those after :attr:`durable`)."""
        return self._ledger.kept_events

    async def open(self) -> SessionInfo:
        """Connect and open the session (or resume it); returns the server's ``opened`` info."""
        if self._state is SessionState.CLOSED:
            raise SessionClosed("the session is closed")
        if self.info is not None:
            return self.info
        self._send_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        ws = await self._transport.connect()
        try:
            info = await self._transport.handshake(ws, self._open_frame(self._resume))
        except BaseException:
            await ws.close()
            raise
        await self._transport.adopt(ws)
        self.info = info
        self._filtered = info.filtered
        self._ledger.start(info.sent, info.durable)  # events sent: kept, cropped and filtered
        self._to(SessionState.OPEN)
        self._reader = asyncio.create_task(self._read_loop(), name=f"evssm-reader-{info.session}")
        return info

    async def send(self, events: Recording | Packet) -> int:
        """Send one packet of events; returns its ``seq``.

        Waits while ``max_in_flight`` packets are unanswered and while reconnecting. Raises
        ``ValueError`` for columns the wire cannot carry, or the session's failure.
        """
        columns = event_columns(_as_recording(events), binary=self.binary)  # before waiting
        n = len(_as_recording(events))
        self._require_open()
        assert self._send_lock is not None
        while True:
            changed = self._wait_token()
            self._raise_if_failed()
            if self._window.full or self._state is not SessionState.OPEN:
                await changed.wait()
                continue
            async with self._send_lock:
                if self._window.full or self._state is not SessionState.OPEN:
                    continue
                seq = self._next_seq
                self._next_seq += 1
                frame = msgpack.packb({"type": "events", "seq": seq, **columns})
                self._window.add(Sent(seq, frame, n, time.perf_counter()))
                await self._transport.send(frame)
                return seq

    async def recv(self, timeout: float | None = None) -> Result:
        """The next result in packet order (waits for it).

        Raises the packet's :class:`ServerError` if the server rejected it,
        :class:`NothingInFlight` if no packet awaits an answer, ``TimeoutError`` after
        ``timeout`` seconds, or the session's failure (e.g. :class:`ConnectionLost`).
        """
        if timeout is None:
            return await self._next_result()
        return await asyncio.wait_for(self._next_result(), timeout)

    def poll(self) -> list[Result]:
        """The results that have arrived, without waiting. An error at the head is raised; one
        behind results is kept for the next call, so no result is lost."""
        out = self._results.poll()
        if not out:
            self._raise_if_failed()
        return out

    async def drain(self, timeout: float | None = None) -> list[Result]:
        """Wait for the answers of every packet in flight and return the unread results.

        An error met after some results is kept for the next call (see :meth:`poll`).
        """
        async def collect() -> list[Result]:
            out: list[Result] = []
            while self._window or self._results:
                if out and self._results.error_next:
                    break
                out.append(await self._next_result())
            return out

        return await (collect() if timeout is None else asyncio.wait_for(collect(), timeout))

    async def results(self) -> AsyncIterator[Result]:
        """Iterate over results until every packet sent so far is answered."""
        while self._window or self._results:
            yield await self._next_result()

    async def stream(self, packets: Iterable[Recording | Packet] | AsyncIterable[Recording | Packet],
                     *, raise_errors: bool = True) -> AsyncIterator[Any]:
        """Send ``packets`` (pipelined, within the in-flight window) and yield their results in
        order as they arrive. Pacing is the iterable's business (see :func:`packets.apaced`).

        A packet the server rejects raises its :class:`ServerError`, ending the stream; with
        ``raise_errors=False`` the error is yielded in the result's place and streaming goes on
        (items are then ``Result | ServerError``).
        """
        self._require_open()

        async def produce() -> None:
            if isinstance(packets, AsyncIterable):
                async for packet in packets:
                    await self.send(packet)
            else:
                for packet in packets:
                    await self.send(packet)

        sender = asyncio.create_task(produce())
        sender.add_done_callback(lambda _: self._notify())
        try:
            while True:
                changed = self._wait_token()
                if self._results:
                    try:
                        item: Result | ServerError = await self._next_result()
                    except ServerError as exc:
                        if raise_errors:
                            raise
                        item = exc
                    yield item
                    continue
                if sender.done():
                    failed = sender.exception()
                    if failed is not None:
                        raise failed
                    if not self._window:
                        self._raise_if_failed()
                        return
                self._raise_if_failed()
                await changed.wait()
        finally:
            if not sender.done():
                sender.cancel()
                try:
                    await sender
                except (asyncio.CancelledError, Exception):
                    pass

    async def reset(self) -> None:
        """Zero the session's state (a new recording on the same session). Waits until every
        packet in flight is answered first, so the reset falls between known packets."""
        self._require_open()
        assert self._send_lock is not None
        while True:
            changed = self._wait_token()
            self._raise_if_failed()
            if self._window or self._state is not SessionState.OPEN:
                await changed.wait()
                continue
            async with self._send_lock:
                if self._window or self._state is not SessionState.OPEN:
                    continue
                self._ledger.reset_sent()
                await self._transport.send(encode_message("reset"))
                return

    async def close(self) -> None:
        """End the session on the server and close the connection. Unread results are dropped."""
        if self._state is SessionState.CLOSED:
            return
        if self._state is not SessionState.CLOSING:
            self._to(SessionState.CLOSING)
        ws = self._transport.ws
        if ws is not None:
            try:
                await ws.send(encode_message("close"))
            except ConnectionClosed:
                pass
            await ws.close()
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        self._to(SessionState.CLOSED)
        if self._failure is None:
            self._failure = SessionClosed("the session is closed")
        self._notify()

    async def __aenter__(self) -> AsyncStreamSession:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # -- state -----------------------------------------------------------------------------

    def _to(self, state: SessionState) -> None:
        self._state = moved(self._state, state)

    @property
    def _ws(self) -> ClientConnection | None:
        return self._transport.ws

    @property
    def _closing(self) -> bool:
        return self._state in (SessionState.CLOSING, SessionState.CLOSED)

    @_closing.setter
    def _closing(self, value: bool) -> None:
        """``True``: walk away without closing the server's session (the connection may then be
        dropped without a reconnect; tests use it to leave a session for a resume)."""
        if value and not self._closing:
            self._to(SessionState.CLOSING)

    def _notify(self) -> None:
        """Wake every waiter: set the current event and start a new one for later waiters."""
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def _wait_token(self) -> asyncio.Event:
        # Take the event *before* testing a condition, so a notify in between is not missed.
        assert self._changed is not None
        return self._changed

    def _require_open(self) -> None:
        if self.info is None:
            raise SessionClosed("the session is not open; call open() first")

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _fail(self, exc: ClientError) -> None:
        if self._failure is None:
            self._failure = exc
        if self._state in (SessionState.OPEN, SessionState.RECONNECTING):
            self._to(SessionState.FAILED)
        self._notify()

    async def _next_result(self) -> Result:
        while True:
            changed = self._wait_token()
            if self._results:
                return self._results.pop()
            self._raise_if_failed()
            if not self._window:
                raise NothingInFlight("no packet is waiting for an answer")
            await changed.wait()

    def _open_frame(self, resume: str | None, model: str | None = None) -> bytes:
        sensor = None if self.sensor is None else sensor_declaration(self.sensor)
        return encode_message("open", model=model or self.model, resume=resume, top_k=self.top_k,
                              sensor=sensor, transform=self.transform, window=self.sliding_window,
                              filters=self.filters, **self.open_fields)

    # -- the reader ------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    frame = await self._transport.recv()
                except ConnectionClosed as exc:
                    if self._closing:
                        return
                    code, reason = close_code(exc)
                    if code == CLOSE_TRY_AGAIN_LATER:
                        raise ServerUnavailable(ClientCode.UNAVAILABLE, "the server closed the session "
                                                f"(1013: {reason or 'try again later'})") from exc
                    if not self.reconnect:
                        raise ConnectionLost(f"connection lost: {exc}") from exc
                    await self._reconnect(exc)
                    continue
                self._dispatch(decode_frame(frame))
        except asyncio.CancelledError:
            raise
        except ClientError as exc:
            self._fail(exc)
        except Exception as exc:  # never die silently: waiters would hang
            self._fail(ProtocolError(f"reader failed: {exc!r}"))

    def _dispatch(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "result":
            entry = self._window.answer(msg.get("seq"))
            result = Result.from_message(msg, time.perf_counter() - entry.sent_at)
            self._filtered += result.removed
            self._ledger.answered(entry, result.events + result.cropped + self._filtered, result.durable)
            self._results.append(result)
        elif kind == "error":
            seq = msg.get("seq")
            err = server_error(str(msg.get("code")), str(msg.get("message", "")), seq=seq)
            sent = self._window.find(seq) if seq is not None else None
            if sent is not None and err.code == Code.DRAINING and self.reconnect:
                pass  # not processed; the server closes after its drain, and it is sent again
            elif sent is not None:
                self._window.remove(sent)
                if sent.recovering:  # the server would not answer the stand-in: answer lost
                    self._results.append(lost_result(sent, self._ledger.acked))
                else:
                    self._results.append(err)
            elif isinstance(err, (ServerUnavailable, SessionExpired)):
                raise err  # the session is gone from this connection: fail, do not queue
            else:
                self._results.append(err)
        elif kind == "reset_done":
            self._ledger.reset_confirmed()
            self._filtered = 0
        # "opened" is handled by the handshake; "closed" and unknown types need nothing
        self._notify()

    async def _reconnect(self, cause: BaseException) -> None:
        """Re-attach to the same session after a drop and resend what the server lacks."""
        self._to(SessionState.RECONNECTING)
        self._notify()
        last: BaseException = cause
        assert self.info is not None and self._send_lock is not None
        retries = Retries(self.max_reconnect_attempts, self.reconnect_timeout, self.backoff)
        while retries.allowed():
            if retries.attempt:
                if retries.attempt == 1 and self.on_reconnect_wait is not None:
                    self.on_reconnect_wait(retries.left(), last)
                await retries.pause()
            retries.attempt += 1
            try:
                ws = await self._transport.connect()
            except (ConnectFailed, ServerUnavailable) as exc:
                last = exc
                continue
            try:
                info, fresh = await self._attach(ws, self.info)
            except (ConnectFailed, ServerUnavailable) as exc:
                last = exc
                await ws.close()
                continue
            except BaseException:
                await ws.close()
                raise
            async with self._send_lock:
                await self._transport.adopt(ws)
                try:
                    resume = await resync(ws, info, fresh=fresh, ledger=self._ledger,
                                          window=self._window, results=self._results,
                                          replay_packet_events=self.replay_packet_events)
                except ConnectionClosed as exc:  # gone again while replaying: start over
                    last = exc
                    continue
                self.info, self._filtered = info, resume.filtered
                if self._state is SessionState.RECONNECTING:
                    self._to(SessionState.OPEN)
            self.reconnects += 1
            self.resumes.append(resume)
            self._notify()
            return
        raise ConnectionLost(f"connection lost and {retries.describe()} failed; last: {last}") from last

    async def _attach(self, ws: ClientConnection, was: SessionInfo) -> tuple[SessionInfo, bool]:
        """Resume session ``was`` on ``ws``; ``True`` beside the info when it was gone, with no
        usable snapshot (the server died before its first one), and a new session was opened to
        replay the stream from its start: only where the server keeps snapshots and the client
        still holds the whole stream."""
        try:
            return await self._transport.handshake(ws, self._open_frame(was.resume)), False
        except SessionExpired as exc:
            if exc.code not in _GONE or not self._ledger.holds_whole_stream:
                raise
        return await self._transport.handshake(ws, self._open_frame(None, was.model.name or None)), True
