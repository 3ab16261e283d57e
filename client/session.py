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

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from evssm.models.events import Recording, SensorSpec
from evssm.models.wire import CLOSE_POLICY_VIOLATION, CLOSE_SERVICE_RESTART, CLOSE_TRY_AGAIN_LATER, Code

from .errors import (
    ClientError,
    ConnectionLost,
    NothingInFlight,
    ProtocolError,
    ServerError,
    ServerFull,
    ServerUnavailable,
    SessionClosed,
    SessionExpired,
    Unauthorized,
    server_error,
)
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

T = TypeVar("T")

_EMPTY_COLUMNS = {"t": b"", "x": b""}


class ConnectFailed(ConnectionLost):
    """The server could not be reached (refused, timed out, or the handshake failed)."""


@dataclass
class _Pending:
    """A packet sent but not yet answered, kept so it can be resent after a reconnect (and, once
    answered, kept for a replay until a snapshot covers it)."""

    seq: int
    frame: bytes
    n: int
    sent_at: float
    recovering: bool = False  # an empty stand-in asking for a processed packet's lost answer


@dataclass(frozen=True)
class Resume:
    """One re-attachment of a session after its connection dropped.

    ``events`` is the server's count for the session when it re-attached (events sent, kept or
    cropped by a declared geometry); ``restored`` says it came from a snapshot (the server had
    restarted, or another replica took the session over); ``new_session`` that the session was
    gone and a new one was opened to replay the stream from its start. ``replayed`` events had been answered before and were sent again (the part the
    snapshot did not cover); ``resent`` packets were in flight and sent again.
    """

    at: float  # Unix time
    events: int
    restored: bool
    new_session: bool
    replayed: int
    resent: int


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
        max_replay_events: most answered events kept for a replay after a server restart (only
            when the server keeps snapshots); past it the oldest are dropped, and a restore from a
            snapshot older than what is kept fails with ``resume_mismatch``.
        replay_packet_events: events per packet when answered packets are sent again.
        api_key: the server's API key, sent as ``Authorization: Bearer KEY`` (None: the
            ``EVSSM_API_KEY`` variable, or no key).

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
                 max_replay_events: int = 1 << 22, replay_packet_events: int = 16384,
                 api_key: str | None = None):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if replay_packet_events < 1 or max_replay_events < 0:
            raise ValueError("replay_packet_events must be >= 1 and max_replay_events >= 0")
        self.url = endpoint_url(url, "stream")
        self.model = model
        self.top_k = top_k
        self.max_in_flight = max_in_flight
        self.reconnect = reconnect
        self.max_reconnect_attempts = max_reconnect_attempts
        self.reconnect_timeout = reconnect_timeout
        self.on_reconnect_wait = on_reconnect_wait
        self.backoff = backoff
        self.open_timeout = open_timeout
        self.binary = binary
        self.sensor = sensor
        self.transform = None if transform is None else dict(transform)
        self.max_replay_events = max_replay_events
        self.replay_packet_events = replay_packet_events
        self._headers = auth_headers(api_key)
        self.info: SessionInfo | None = None
        self.reconnects = 0  # successful re-attachments so far
        self.resumes: list[Resume] = []  # every re-attachment, in order
        self._resume = resume
        self._ws: ClientConnection | None = None
        self._connected = False
        self._closing = False
        self._closed = False
        self._failure: ClientError | None = None
        self._reader: asyncio.Task[None] | None = None
        self._next_seq = 0
        self._pending: collections.deque[_Pending] = collections.deque()
        self._results: collections.deque[Result | ServerError] = collections.deque()
        self._acked_events = 0  # the server's event count after the last answered packet
        self._unconfirmed_reset: int | None = None  # event count before a reset not yet confirmed
        # Answered packets after the last snapshot (``_durable`` events of the current stream);
        # they end at ``_acked_events``. ``_durable`` None: the server keeps no snapshots.
        self._kept: collections.deque[_Pending] = collections.deque()
        self._kept_events = 0
        self._kept_dropped = False  # the replay buffer overflowed at least once
        self._durable: int | None = None
        # A reset was sent and no snapshot of the new stream is known yet: a restored state may
        # predate the reset.
        self._reset_unsnapshotted = False
        self._send_lock: asyncio.Lock | None = None
        self._changed: asyncio.Event | None = None  # replaced on every notify (see _notify)

    # -- public API ------------------------------------------------------------------------

    @property
    def session_id(self) -> str | None:
        return self.info.session if self.info else None

    @property
    def resume_token(self) -> str | None:
        return self.info.resume if self.info else self._resume

    @property
    def acked_events(self) -> int:
        """Events of the stream the server has answered: its count, cropped events included."""
        return self._acked_events

    @property
    def in_flight(self) -> int:
        """Packets sent and not yet answered by the server."""
        return len(self._pending)

    @property
    def durable(self) -> int | None:
        """Events of the current stream covered by the server's last snapshot of the session
        (None: the server keeps no snapshots)."""
        return self._durable

    @property
    def replay_events(self) -> int:
        """Answered events kept for a replay after a restart (those after :attr:`durable`)."""
        return self._kept_events

    async def open(self) -> SessionInfo:
        """Connect and open the session (or resume it); returns the server's ``opened`` info."""
        if self._closed:
            raise SessionClosed("the session is closed")
        if self.info is not None:
            return self.info
        self._send_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        ws = await self._connect()
        try:
            info = await self._handshake(ws, self._resume)
        except BaseException:
            await ws.close()
            raise
        self._ws, self.info, self._connected = ws, info, True
        self._acked_events = info.events + info.cropped  # events sent: kept + cropped
        self._durable = info.durable
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
            if len(self._pending) >= self.max_in_flight or not self._connected:
                await changed.wait()
                continue
            async with self._send_lock:
                if len(self._pending) >= self.max_in_flight or not self._connected:
                    continue
                seq = self._next_seq
                self._next_seq += 1
                frame = msgpack.packb({"type": "events", "seq": seq, **columns})
                self._pending.append(_Pending(seq, frame, n, time.perf_counter()))
                await self._send_frame(frame)
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
        out: list[Result] = []
        while self._results:
            item = self._results[0]
            if isinstance(item, ServerError):
                if out:
                    break
                self._results.popleft()
                raise item
            out.append(self._results.popleft())  # type: ignore[arg-type]
        if not out:
            self._raise_if_failed()
        return out

    async def drain(self, timeout: float | None = None) -> list[Result]:
        """Wait for the answers of every packet in flight and return the unread results.

        An error met after some results is kept for the next call (see :meth:`poll`).
        """
        async def collect() -> list[Result]:
            out: list[Result] = []
            while self._pending or self._results:
                if out and self._results and isinstance(self._results[0], ServerError):
                    break
                out.append(await self._next_result())
            return out

        return await (collect() if timeout is None else asyncio.wait_for(collect(), timeout))

    async def results(self) -> AsyncIterator[Result]:
        """Iterate over results until every packet sent so far is answered."""
        while self._pending or self._results:
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
                if sender.done() and (sender.exception() is not None or not self._pending):
                    if sender.exception() is not None:
                        raise sender.exception()  # type: ignore[misc]
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
            if self._pending or not self._connected:
                await changed.wait()
                continue
            async with self._send_lock:
                if self._pending or not self._connected:
                    continue
                self._unconfirmed_reset = self._acked_events
                self._acked_events = 0
                self._drop_kept()  # the old stream will never be replayed
                if self._durable is not None:
                    self._durable = 0
                    self._reset_unsnapshotted = True
                await self._send_frame(encode_message("reset"))
                return

    async def close(self) -> None:
        """End the session on the server and close the connection. Unread results are dropped."""
        if self._closed:
            return
        self._closing = True
        ws = self._ws
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
        self._closed = True
        self._connected = False
        if self._failure is None:
            self._failure = SessionClosed("the session is closed")
        self._notify()

    async def __aenter__(self) -> AsyncStreamSession:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # -- internals -------------------------------------------------------------------------

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
        self._connected = False
        self._notify()

    async def _next_result(self) -> Result:
        while True:
            changed = self._wait_token()
            if self._results:
                item = self._results.popleft()
                if isinstance(item, ServerError):
                    raise item
                return item
            self._raise_if_failed()
            if not self._pending:
                raise NothingInFlight("no packet is waiting for an answer")
            await changed.wait()

    async def _send_frame(self, frame: bytes) -> None:
        assert self._ws is not None
        try:
            await self._ws.send(frame)
        except ConnectionClosed:
            pass  # the reader sees the drop, reconnects and resends what is unanswered

    async def _connect(self) -> ClientConnection:
        try:
            return await connect(self.url, open_timeout=self.open_timeout, compression=None,
                                 max_size=16 * 2**20, ping_interval=20, ping_timeout=60,
                                 close_timeout=2, additional_headers=self._headers)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 503:
                raise ServerUnavailable("unavailable", f"{self.url} answered HTTP 503",
                                        status=status) from exc
            raise ConnectFailed(f"{self.url} refused the WebSocket upgrade: HTTP {status}") from exc
        except InvalidURI as exc:
            raise ValueError(f"invalid server URL {self.url!r}: {exc}") from exc
        except (TimeoutError, OSError, InvalidHandshake) as exc:
            raise ConnectFailed(f"cannot connect to {self.url}: {exc or type(exc).__name__}"
                                ) from exc

    async def _handshake(self, ws: ClientConnection, resume: str | None,
                         model: str | None = None) -> SessionInfo:
        """Send ``open`` and wait for ``opened`` (or a typed error)."""
        try:
            sensor = None if self.sensor is None else sensor_declaration(self.sensor)
            await ws.send(encode_message("open", model=model or self.model, resume=resume,
                                         top_k=self.top_k, sensor=sensor,
                                         transform=self.transform))
            async with asyncio.timeout(self.open_timeout):
                while True:
                    msg = decode_frame(await ws.recv())
                    if msg["type"] == "opened":
                        return SessionInfo.from_message(msg)
                    if msg["type"] == "error":
                        raise server_error(str(msg.get("code")), str(msg.get("message", "")),
                                           seq=msg.get("seq"))
                    # anything else is a leftover of an earlier connection: skip it
        except ConnectionClosed as exc:
            code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")
            if code == CLOSE_TRY_AGAIN_LATER:  # the contract's "server full, retry later"
                raise ServerFull(Code.SERVER_FULL, reason or "server full, retry later") from exc
            if code == CLOSE_SERVICE_RESTART:
                raise ServerUnavailable(Code.DRAINING, reason or "server restarting") from exc
            if code == CLOSE_POLICY_VIOLATION:
                raise Unauthorized(Code.UNAUTHORIZED, reason or "the server refused this client") from exc
            raise ConnectFailed(f"the server closed the connection while opening: {exc}") from exc
        except TimeoutError as exc:
            raise ConnectFailed(f"no 'opened' reply within {self.open_timeout} s") from exc

    async def _read_loop(self) -> None:
        try:
            while True:
                assert self._ws is not None
                try:
                    frame = await self._ws.recv()
                except ConnectionClosed as exc:
                    if self._closing:
                        return
                    code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")
                    if code == CLOSE_TRY_AGAIN_LATER:
                        raise ServerUnavailable("unavailable", "the server closed the session "
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
            entry = self._pending[0] if self._pending else None
            if entry is None or entry.seq != msg.get("seq"):
                raise ProtocolError(f"result for packet {msg.get('seq')} arrived, expected "
                                    f"{entry.seq if entry else 'none'}")
            self._pending.popleft()
            result = Result.from_message(msg, time.perf_counter() - entry.sent_at)
            self._acked_events = result.events + result.cropped
            self._unconfirmed_reset = None  # a result after a reset proves it was applied
            self._note_durable(result.durable)
            self._keep(entry)
            self._results.append(result)
        elif kind == "error":
            seq = msg.get("seq")
            err = server_error(str(msg.get("code")), str(msg.get("message", "")), seq=seq)
            entry = next((p for p in self._pending if p.seq == seq), None) if seq is not None \
                else None
            if entry is not None and err.code == "draining" and self.reconnect:
                pass  # not processed; the server closes after its drain, and it is sent again
            elif entry is not None:
                self._pending.remove(entry)
                if entry.recovering:  # the server would not answer the stand-in: answer lost
                    self._results.append(self._lost_result(entry))
                else:
                    self._results.append(err)
            elif isinstance(err, (ServerUnavailable, SessionExpired)):
                raise err  # the session is gone from this connection: fail, do not queue
            else:
                self._results.append(err)
        elif kind == "reset_done":
            self._unconfirmed_reset = None
        # "opened" is handled by the handshake; "closed" and unknown types need nothing
        self._notify()

    # -- the replay buffer -----------------------------------------------------------------

    def _note_durable(self, durable: int | None) -> None:
        if durable is None:  # the server keeps no snapshots: keep nothing
            self._durable = None
            self._drop_kept()
        else:
            self._durable = max(self._durable or 0, durable)
            if self._durable > 0:
                self._reset_unsnapshotted = False

    def _keep(self, entry: _Pending) -> None:
        """Keep an answered packet for a replay, while the server reports snapshots."""
        if self._durable is None or entry.n == 0:
            return
        self._kept.append(entry)
        self._kept_events += entry.n
        self._trim()

    def _trim(self) -> None:
        """Drop kept packets a snapshot covers, then the oldest beyond ``max_replay_events``."""
        base = self._acked_events - self._kept_events  # the count before the first kept packet
        while self._kept and (base + self._kept[0].n <= (self._durable or 0)
                              or self._kept_events > self.max_replay_events):
            if base + self._kept[0].n > (self._durable or 0):
                self._kept_dropped = True
            dropped = self._kept.popleft()
            self._kept_events -= dropped.n
            base += dropped.n

    def _drop_kept(self) -> None:
        self._kept.clear()
        self._kept_events = 0

    def _lost_result(self, entry: _Pending) -> Result:
        return Result(seq=entry.seq, events=self._acked_events, t=None, probs=None, top=[],
                      latency_s=time.perf_counter() - entry.sent_at, lost=True)

    async def _reconnect(self, cause: BaseException) -> None:
        """Re-attach to the same session after a drop and resend what the server lacks."""
        self._connected = False
        self._notify()
        delay, largest = self.backoff
        last: BaseException = cause
        assert self.info is not None and self._send_lock is not None
        started = time.monotonic()
        attempt = 0
        while self._may_retry(attempt, started):
            if attempt:
                if attempt == 1 and self.on_reconnect_wait is not None:
                    self.on_reconnect_wait(self._retry_left(started), last)
                await asyncio.sleep(delay if self.reconnect_timeout is None
                                    else min(delay, max(self._retry_left(started), 0.0)))
                delay = min(delay * 2, largest)
            attempt += 1
            try:
                ws = await self._connect()
            except (ConnectFailed, ServerUnavailable) as exc:
                last = exc
                continue
            fresh = False
            try:
                try:
                    info = await self._handshake(ws, self.info.resume)
                except SessionExpired as exc:
                    # The session is gone, with no usable snapshot (the server died before its
                    # first one): if the client still holds the whole stream, a new session
                    # replays it from the start. Only where the server keeps snapshots.
                    if exc.code not in ("unknown_session", "snapshot_incompatible") or \
                            self._durable is None or self._acked_events != self._kept_events:
                        raise
                    info = await self._handshake(ws, None, self.info.model.name or None)
                    fresh = True
            except (ConnectFailed, ServerUnavailable) as exc:
                last = exc
                await ws.close()
                continue
            except BaseException:
                await ws.close()
                raise
            async with self._send_lock:
                old, self._ws = self._ws, ws
                if old is not None:
                    await old.close()
                try:
                    resume = await self._resync(info, fresh)
                except ConnectionClosed as exc:  # gone again while replaying: start over
                    last = exc
                    continue
                self.info = info
                self._connected = True
            self.reconnects += 1
            self.resumes.append(resume)
            self._notify()
            return
        tried = (f"{attempt} reconnect attempts" if self.reconnect_timeout is None else
                 f"{attempt} reconnect attempts in {time.monotonic() - started:.0f} s")
        raise ConnectionLost(f"connection lost and {tried} failed; last: {last}") from last

    def _retry_left(self, started: float) -> float:
        """Seconds left to reconnect (``reconnect_timeout`` counts from the drop)."""
        assert self.reconnect_timeout is not None
        return self.reconnect_timeout - (time.monotonic() - started)

    def _may_retry(self, attempt: int, started: float) -> bool:
        """Another reconnect attempt is allowed: the first always; then within the attempts or
        the time allowed."""
        if attempt == 0:
            return True
        if self.reconnect_timeout is None:
            return attempt < self.max_reconnect_attempts
        return self._retry_left(started) > 0

    async def _resync(self, info: SessionInfo, fresh: bool) -> Resume:
        """Work out which packets the server holds; send again what it lacks.

        Packets are atomic and processed in order. A session that stayed live on its server holds
        ``E`` events: the acknowledged count plus the sizes of a prefix of the unanswered packets.
        That prefix was processed: resending it would apply it twice. Its answers are lost, except
        the last one, which is the session's current state: an empty packet with the same ``seq``
        asks for it.

        A session restored from a snapshot may hold fewer events than were acknowledged, but never
        fewer than the last ``durable`` seen: the kept answered packets after ``E`` are replayed
        first (their answers dropped), then the unanswered ones are sent. While no snapshot of
        the current stream is known after a reset (``durable`` still 0, or the reset not yet
        confirmed) the restored state may predate the reset, so it is reset and the whole stream
        is replayed; a new session (``fresh``) starts from zero the same way.
        """
        assert self._ws is not None
        served = info.events + info.cropped  # every event sent, kept or cropped
        base = self._acked_events - self._kept_events  # the count before the first kept packet
        whole = fresh or (info.restored and (self._unconfirmed_reset is not None
                                             or self._reset_unsnapshotted))
        reset_again = False  # the server's state (and its ``durable``) may predate our reset
        if whole:
            if base != 0:
                raise self._mismatch(served)
            if fresh:
                self._unconfirmed_reset = None  # a new session is zero already
                self._reset_unsnapshotted = False
            elif served or self._unconfirmed_reset is not None:
                await self._ws.send(encode_message("reset"))
                self._reset_unsnapshotted = True
            served = 0
        elif self._unconfirmed_reset and served == self._unconfirmed_reset:
            # The reset sent just before the drop never arrived (the count is still the old one).
            await self._ws.send(encode_message("reset"))
            served = 0
            reset_again = True
            self._reset_unsnapshotted = self._durable is not None
        replayed = 0
        if served < self._acked_events:  # restored from an older state: replay answered packets
            if not (info.restored or whole):
                raise self._mismatch(served)
            kept = list(self._kept)
            count, start = base, 0
            while start < len(kept) and count < served:
                count += kept[start].n
                start += 1
            if count != served:
                raise self._mismatch(served)
            replayed = await self._replay(kept[start:])
            served = self._acked_events
        count, prefix = self._acked_events, 0
        pending = list(self._pending)
        while prefix < len(pending) and count < served:
            count += pending[prefix].n
            prefix += 1
        if count != served:
            raise self._mismatch(served)
        for i, entry in enumerate(pending[:prefix]):  # processed, answers lost
            self._pending.popleft()
            self._acked_events += entry.n
            self._keep(entry)
            if i < prefix - 1:
                self._results.append(self._lost_result(entry))
            else:  # the last one's answer is the current state: ask for it with an empty packet
                self._pending.appendleft(_Pending(
                    entry.seq, msgpack.packb({"type": "events", "seq": entry.seq, **_EMPTY_COLUMNS}),
                    0, entry.sent_at, recovering=True))
        if info.durable is None:  # this server keeps no snapshots
            self._note_durable(None)
        elif not (whole or reset_again):
            self._note_durable(info.durable)
        elif self._durable is None:
            self._durable = 0  # snapshots from now on; the stream's start is all that is known
        self._trim()
        for entry in list(self._pending):
            await self._send_frame(entry.frame)
        return Resume(at=time.time(), events=info.events + info.cropped, restored=info.restored,
                      new_session=fresh,
                      replayed=replayed, resent=len(self._pending))

    async def _replay(self, entries: list[_Pending]) -> int:
        """Send answered packets again, merged into packets of at most ``replay_packet_events``
        events, within the in-flight window, and drop their answers. Runs in the reader task
        before anything else is sent on the new connection. Returns the events sent."""
        assert self._ws is not None
        chunks = _merge_packets(entries, self.replay_packet_events)
        ends = np.cumsum([n for _, _, n in chunks]) + (self._acked_events - sum(e.n for e in entries))
        sent = answered = 0
        while answered < len(chunks):
            while sent < len(chunks) and sent - answered < self.max_in_flight:
                await self._ws.send(chunks[sent][1])
                sent += 1
            msg = decode_frame(await self._ws.recv())
            if msg["type"] == "result":
                count = int(msg.get("events") or 0) + int(msg.get("cropped") or 0)
                if msg.get("seq") != chunks[answered][0] or count != int(ends[answered]):
                    raise ProtocolError(f"replayed packet {chunks[answered][0]} answered as "
                                        f"{msg.get('seq')} at {count} events, expected "
                                        f"{int(ends[answered])}")
                answered += 1
                if msg.get("durable") is not None and self._durable is not None:
                    self._note_durable(int(msg["durable"]))
            elif msg["type"] == "error":
                raise SessionExpired("resume_mismatch", "the server refused a replayed packet: "
                                     f"{msg.get('code')}: {msg.get('message')}")
            elif msg["type"] == "reset_done":
                self._unconfirmed_reset = None
        return int(sum(e.n for e in entries))

    def _mismatch(self, served: int) -> SessionExpired:
        base = self._acked_events - self._kept_events
        in_flight = sum(p.n for p in self._pending)
        why = (" (the replay buffer overflowed: raise max_replay_events)" if self._kept_dropped
               else "")
        return SessionExpired(
            "resume_mismatch",
            f"the resumed session holds {served} events but the client accounts for "
            f"{self._acked_events} answered (it keeps those from {base} on) plus {in_flight} "
            f"in flight{why}")


def _merge_packets(entries: list[_Pending], limit: int) -> list[tuple[int, bytes, int]]:
    """``(seq, frame, events)`` of packets that carry ``entries``' events in order, merging
    neighbours up to ``limit`` events (a larger packet stays whole); a merged packet takes its last
    packet's ``seq``."""
    out: list[tuple[int, bytes, int]] = []
    group: list[_Pending] = []
    size = 0

    def flush() -> None:
        messages = [msgpack.unpackb(e.frame) for e in group]
        columns: dict[str, Any] = {}
        for key in messages[0]:
            if key in ("type", "seq"):
                continue
            parts = [m[key] for m in messages]
            columns[key] = (b"".join(parts) if isinstance(parts[0], bytes)
                            else [v for part in parts for v in part])
        seq = group[-1].seq
        out.append((seq, msgpack.packb({"type": "events", "seq": seq, **columns}), size))

    for entry in entries:
        if group and size + entry.n > limit:
            flush()
            group, size = [], 0
        group.append(entry)
        size += entry.n
    if group:
        flush()
    return out


class StreamSession:
    """Synchronous streaming session: the asyncio session driven by a private event-loop thread.

    Same parameters and semantics as :class:`AsyncStreamSession`; calls block. The thread keeps
    the connection alive (pings, reconnects) between calls. Use it from one thread at a time.
    """

    def __init__(self, url: str, **options: Any):
        self._options = options
        self._url = url
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: AsyncStreamSession | None = None

    # -- plumbing --------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._loop is None:
            coro.close()
            raise SessionClosed("the session is not open; call open() first")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def _s(self) -> AsyncStreamSession:
        if self._session is None:
            raise SessionClosed("the session is not open; call open() first")
        return self._session

    # -- public API ------------------------------------------------------------------------

    @property
    def info(self) -> SessionInfo | None:
        return self._session.info if self._session else None

    @property
    def session_id(self) -> str | None:
        return self._session.session_id if self._session else None

    @property
    def resume_token(self) -> str | None:
        return self._session.resume_token if self._session else None

    @property
    def in_flight(self) -> int:
        return self._session.in_flight if self._session else 0

    @property
    def reconnects(self) -> int:
        return self._session.reconnects if self._session else 0

    @property
    def resumes(self) -> list[Resume]:
        """Every re-attachment after a dropped connection (see :class:`Resume`)."""
        return list(self._session.resumes) if self._session else []

    @property
    def durable(self) -> int | None:
        return self._session.durable if self._session else None

    @property
    def replay_events(self) -> int:
        return self._session.replay_events if self._session else 0

    def open(self) -> SessionInfo:
        """Start the loop thread, connect and open the session."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever,
                                            name="evssm-stream-session", daemon=True)
            self._thread.start()

        async def make_and_open() -> SessionInfo:
            # Created on the loop's thread: its asyncio objects belong to that loop.
            if self._session is None:
                self._session = AsyncStreamSession(self._url, **self._options)
            return await self._session.open()

        try:
            return self._run(make_and_open())
        except BaseException:
            self._stop_loop()
            self._session = None  # bound to the stopped loop; a retry starts afresh
            raise

    def send(self, events: Recording | Packet) -> int:
        """Send one packet; blocks while the in-flight window is full. Returns its ``seq``."""
        return self._run(self._s.send(events))

    def recv(self, timeout: float | None = None) -> Result:
        """The next result in order (blocks); see :meth:`AsyncStreamSession.recv`."""
        return self._run(self._s.recv(timeout))

    def poll(self) -> list[Result]:
        """Results that have arrived, without waiting."""
        async def poll() -> list[Result]:
            return self._s.poll()
        return self._run(poll())

    def drain(self, timeout: float | None = None) -> list[Result]:
        """Wait for every packet in flight to be answered; return the unread results."""
        return self._run(self._s.drain(timeout))

    def results(self) -> Iterator[Result]:
        """Iterate over results until every packet sent so far is answered."""
        while True:
            try:
                yield self.recv()
            except NothingInFlight:
                return

    def stream(self, packets: Iterable[Recording | Packet]) -> Iterator[Result]:
        """Send ``packets`` (pipelined within the window) and yield their results in order.

        Results are yielded between sends; pace the iterable (see :func:`packets.paced`) for
        real-time replay.
        """
        for packet in packets:
            self.send(packet)
            yield from self.poll()
        yield from self.results()

    def reset(self) -> None:
        """Zero the session's state (after the packets in flight are answered)."""
        self._run(self._s.reset())

    def close(self) -> None:
        """Close the session and stop the loop thread."""
        if self._session is not None and self._loop is not None:
            try:
                self._run(self._session.close(), timeout=30)
            finally:
                self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._loop.close()
            self._loop = None
            self._thread = None

    def __enter__(self) -> StreamSession:
        self.open()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
