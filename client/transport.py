"""The WebSocket under a streaming session: connecting, the ``open``/``opened`` handshake, and how a
refused or closed connection maps onto the client's typed errors."""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from evssm.models.wire import CLOSE_POLICY_VIOLATION, CLOSE_SERVICE_RESTART, CLOSE_TRY_AGAIN_LATER, Code

from .errors import (
    ClientCode,
    ConnectionLost,
    ServerFull,
    ServerUnavailable,
    Unauthorized,
    server_error,
)
from .protocol import SessionInfo, decode_frame

MAX_FRAME_BYTES = 16 * 2**20


class ConnectFailed(ConnectionLost):
    """The server could not be reached (refused, timed out, or the handshake failed)."""


def close_code(exc: ConnectionClosed) -> tuple[int | None, str]:
    """The close code and reason the server sent (None when the connection just broke)."""
    return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")


class Transport:
    """One session's connection to ``url``: replaced on every reconnect, never two at once."""

    def __init__(self, url: str, *, headers: dict[str, str], open_timeout: float) -> None:
        self.url = url
        self.headers = headers
        self.open_timeout = open_timeout
        self.ws: ClientConnection | None = None

    async def connect(self) -> ClientConnection:
        """A new connection (not yet the session's: see :meth:`adopt`)."""
        try:
            return await connect(self.url, open_timeout=self.open_timeout, compression=None,
                                 max_size=MAX_FRAME_BYTES, ping_interval=20, ping_timeout=60,
                                 close_timeout=2, additional_headers=self.headers)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 503:
                raise ServerUnavailable(ClientCode.UNAVAILABLE, f"{self.url} answered HTTP 503",
                                        status=status) from exc
            raise ConnectFailed(f"{self.url} refused the WebSocket upgrade: HTTP {status}") from exc
        except InvalidURI as exc:
            raise ValueError(f"invalid server URL {self.url!r}: {exc}") from exc
        except (TimeoutError, OSError, InvalidHandshake) as exc:
            raise ConnectFailed(f"cannot connect to {self.url}: {exc or type(exc).__name__}"
                                ) from exc

    async def handshake(self, ws: ClientConnection, open_frame: bytes) -> SessionInfo:
        """Send ``open`` and wait for ``opened`` (or a typed error)."""
        try:
            await ws.send(open_frame)
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
            code, reason = close_code(exc)
            if code == CLOSE_TRY_AGAIN_LATER:  # the contract's "server full, retry later"
                raise ServerFull(Code.SERVER_FULL, reason or "server full, retry later") from exc
            if code == CLOSE_SERVICE_RESTART:
                raise ServerUnavailable(Code.DRAINING, reason or "server restarting") from exc
            if code == CLOSE_POLICY_VIOLATION:
                raise Unauthorized(Code.UNAUTHORIZED, reason or "the server refused this client") from exc
            raise ConnectFailed(f"the server closed the connection while opening: {exc}") from exc
        except TimeoutError as exc:
            raise ConnectFailed(f"no 'opened' reply within {self.open_timeout} s") from exc

    async def adopt(self, ws: ClientConnection) -> None:
        """Make ``ws`` the session's connection, closing the one it replaces."""
        old, self.ws = self.ws, ws
        if old is not None:
            await old.close()

    async def send(self, frame: bytes) -> None:
        """Send on the session's connection; a drop is left to the reader, which reconnects and
        resends what is unanswered."""
        assert self.ws is not None
        try:
            await self.ws.send(frame)
        except ConnectionClosed:
            pass

    async def recv(self) -> bytes | str:
        assert self.ws is not None
        return await self.ws.recv()
