"""One WebSocket connection's ordered outbox (the API layer; the only writer to the socket).

Every reply (result, error, ack, notice, the final close) takes its place in the outbox in the
order its request arrived; a result is filled in after its step. Ready replies at the head leave
at once, sent by whoever filled them (no task per reply); a send that has to wait for the socket
continues in a task and the replies behind it wait.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine, Generator
from typing import Any

from fastapi import WebSocket

from evssm.models.wire import CLOSE_GOING_AWAY, ErrorFrame, ServerFrame

from ..core.sessions import Session
from .protocol import encode_frame


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


class Reply:
    """A place in a connection's outbox: ``data`` is the encoded frame once known (a result's
    after its step); ``close`` = (code, reason) for the closing handshake."""

    __slots__ = ("conn", "binary", "data", "close")

    def __init__(self, conn: Connection, binary: bool):
        self.conn, self.binary = conn, binary
        self.data: bytes | str | None = None
        self.close: tuple[int, str] | None = None

    def answer(self, frame: ServerFrame) -> None:
        """Fill this place with ``frame``, encoded as the request that reserved it was."""
        self.conn.fill(self, encode_frame(frame.to_wire(), self.binary))


class Connection:
    """One WebSocket connection: the session attached to it and an ordered outbox (module
    docstring). Every queued reply counts against the connection's bound (``max_inflight``):
    past it the receive loop stops reading, which pushes back on the client through TCP,
    whatever the client sends.
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
        self._outbox: deque[Reply] = deque()
        self._sending: asyncio.Task | None = None  # a send waiting for the socket
        self._dead = False  # a send failed or the client is gone: replies are dropped
        self._room: asyncio.Future[None] | None = None  # the receive loop waits for room
        self._flushed: asyncio.Future[None] | None = None  # stop() waits for the close to go

    @property
    def queued(self) -> int:
        """Replies queued and not yet handed to the socket (the bound counts these)."""
        return len(self._outbox) + (self._sending is not None)

    def reply(self, binary: bool | None = None) -> Reply:
        """Reserve the next place in the outbox (filled later with :meth:`fill`)."""
        reply = Reply(self, self.binary if binary is None else binary)
        self._outbox.append(reply)
        return reply

    def send(self, frame: ServerFrame, binary: bool | None = None) -> None:
        """Queue a ready reply behind the earlier ones."""
        self.reply(binary).answer(frame)

    def fill(self, reply: Reply, data: bytes | str) -> None:
        reply.data = data
        if self._outbox and self._outbox[0] is reply:
            self._flush()

    def close_after_flush(self, code: int, reason: str) -> None:
        if not self.closing:
            self.closing = True
            reply = self.reply()
            reply.close = (code, reason)
            self.fill(reply, b"")

    def going_away(self) -> None:
        """The server drains: close with 1001 once everything queued is sent."""
        self.close_after_flush(CLOSE_GOING_AWAY, "server shutting down")

    def detach(self, session: Session, notice: ErrorFrame | None) -> None:
        """``session`` was taken away (evicted, resumed elsewhere, failed): forget it and send
        ``notice`` if given."""
        if self.session is session:
            self.session = None
        if notice is not None and not self.closing:
            self.send(notice)

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
            data = reply.data
            if self._dead or data is None:
                continue
            if reply.close is not None:
                self._dead = True  # nothing goes after the close
                coro = self.ws.close(code=reply.close[0], reason=reply.close[1])
            elif isinstance(data, bytes):
                coro = self.ws.send_bytes(data)
            else:
                coro = self.ws.send_text(data)
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
