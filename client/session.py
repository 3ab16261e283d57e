"""Streaming sessions over the WebSocket endpoint: :class:`AsyncStreamSession` and its synchronous
twin :class:`StreamSession`.

A session sends event packets in order and receives one result per packet, in order. It keeps at
most ``max_in_flight`` packets unanswered (``send`` waits for room: backpressure, so a sensor faster
than the server cannot grow memory without bound). When the connection drops it reconnects by
itself, re-attaches to the same server session with the resume token, and resends exactly the
packets the server had not processed: the ``events`` count of the server's ``opened`` reply says how
many of the unanswered packets it already consumed, so none is applied twice.

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
from dataclasses import dataclass
from typing import (Any, AsyncIterable, AsyncIterator, Coroutine, Iterable, Iterator, Mapping,
                    TypeVar)

import msgpack
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
from .protocol import (Result, SessionInfo, auth_headers, decode_frame, encode_message, endpoint_url,
                       event_columns, sensor_declaration)

T = TypeVar("T")

_EMPTY_COLUMNS = {"t": b"", "x": b""}


class ConnectFailed(ConnectionLost):
    """The server could not be reached (refused, timed out, or the handshake failed)."""


@dataclass
class _Pending:
    """A packet sent but not yet answered, kept so it can be resent after a reconnect."""

    seq: int
    frame: bytes
    n: int
    sent_at: float
    recovering: bool = False  # an empty stand-in asking for a processed packet's lost answer


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
        max_reconnect_attempts: attempts per drop before giving up with :class:`ConnectionLost`.
        backoff: (first, largest) delay in seconds between reconnect attempts, doubling.
        open_timeout: seconds to wait for the connection and the ``opened`` reply.
        binary: send columns as little-endian ``bin`` (fast) rather than integer arrays.
        sensor: the source's sensor, declared in ``open`` so that the server maps it onto the
            model's (None: the source is the model's sensor).
        transform: how the server maps it (``{"crop", "scale", "flip_x", "flip_y"}``; see the
            protocol); None for the default (fit, centred).
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
                 max_reconnect_attempts: int = 8, backoff: tuple[float, float] = (0.05, 2.0),
                 open_timeout: float = 10.0, binary: bool = True,
                 sensor: SensorSpec | None = None, transform: Mapping[str, Any] | None = None,
                 api_key: str | None = None):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.url = endpoint_url(url, "stream")
        self.model = model
        self.top_k = top_k
        self.max_in_flight = max_in_flight
        self.reconnect = reconnect
        self.max_reconnect_attempts = max_reconnect_attempts
        self.backoff = backoff
        self.open_timeout = open_timeout
        self.binary = binary
        self.sensor = sensor
        self.transform = None if transform is None else dict(transform)
        self._headers = auth_headers(api_key)
        self.info: SessionInfo | None = None
        self.reconnects = 0  # successful re-attachments so far
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
    def in_flight(self) -> int:
        """Packets sent and not yet answered by the server."""
        return len(self._pending)

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

    async def __aenter__(self) -> "AsyncStreamSession":
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

    async def _handshake(self, ws: ClientConnection, resume: str | None) -> SessionInfo:
        """Send ``open`` and wait for ``opened`` (or a typed error)."""
        try:
            sensor = None if self.sensor is None else sensor_declaration(self.sensor)
            await ws.send(encode_message("open", model=self.model, resume=resume,
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
            self._results.append(result)
        elif kind == "error":
            seq = msg.get("seq")
            err = server_error(str(msg.get("code")), str(msg.get("message", "")), seq=seq)
            entry = next((p for p in self._pending if p.seq == seq), None) if seq is not None \
                else None
            if entry is not None:
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
        for attempt in range(self.max_reconnect_attempts):
            if attempt:
                await asyncio.sleep(delay)
                delay = min(delay * 2, largest)
            try:
                ws = await self._connect()
            except (ConnectFailed, ServerUnavailable) as exc:
                last = exc
                continue
            try:
                info = await self._handshake(ws, self.info.resume)
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
                await self._resync(info)
                self._connected = True
            self.reconnects += 1
            self._notify()
            return
        raise ConnectionLost(f"connection lost and {self.max_reconnect_attempts} reconnect "
                             f"attempts failed; last: {last}") from last

    async def _resync(self, info: SessionInfo) -> None:
        """Work out which unanswered packets the server processed before the drop; resend the rest.

        Packets are atomic and processed in order, so the server's event count ``E`` is the
        acknowledged count plus the sizes of a prefix of the unanswered packets. That prefix was
        processed: resending it would apply it twice. Its answers are lost, except the last one,
        which is the session's current state: an empty packet with the same ``seq`` asks for it.
        """
        served = info.events + info.cropped  # every event sent, kept or cropped
        assert self._ws is not None
        if self._unconfirmed_reset and served == self._unconfirmed_reset:
            # The reset sent just before the drop never arrived (the count is still the old one).
            await self._send_frame(encode_message("reset"))
            served = 0
        count, prefix = self._acked_events, 0
        pending = list(self._pending)
        while prefix < len(pending) and count < served:
            count += pending[prefix].n
            prefix += 1
        if count != served:
            raise SessionExpired(
                "resume_mismatch",
                f"the resumed session holds {served} events but the client accounts for "
                f"{self._acked_events} answered plus {sum(p.n for p in pending)} in flight")
        for entry in pending[: max(prefix - 1, 0)]:
            self._pending.remove(entry)
            self._acked_events += entry.n
            self._results.append(self._lost_result(entry))
        if prefix:
            last = pending[prefix - 1]
            last.frame = msgpack.packb({"type": "events", "seq": last.seq, **_EMPTY_COLUMNS})
            last.n = 0
            last.recovering = True
        self._acked_events = served
        for entry in list(self._pending):
            await self._send_frame(entry.frame)


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

    def __enter__(self) -> "StreamSession":
        self.open()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
