"""Bounds on what one client can make the server hold: header time, request bodies, classify work.

- :func:`header_timeout_protocol`: uvicorn keeps a connection whose request headers never complete
  for ever (its ``timeout_keep_alive`` only runs between requests), so 1,000 sockets sending a byte
  now and then hold 1,000 descriptors. The returned protocol class closes a connection that has not
  completed a request's headers within the timeout of opening or of its previous response.
- :func:`read_body`: reads a request body while it streams in, and stops at the limit (a body is
  refused at ``max_bytes``, not after it was buffered whole) or at the deadline.
- :class:`ConnectionCap`: past ``--max-connections`` open connections, HTTP requests get 503, except
  the probes: half-sent request heads or idle WebSocket upgrades that fill the limit must not make
  a liveness probe restart a server that is fine (the header and open deadlines clear them).
- :class:`Gate`: at most ``limit`` holders at once; beyond that the caller answers "busy".
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Collection, Sized
from typing import Any

from starlette.requests import ClientDisconnect, Request

from evssm.models.wire import Code


def header_timeout_protocol(base: type[asyncio.Protocol], timeout: float) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol ``base`` (httptools or h11) with a header deadline.

    The deadline is armed when the connection opens and after every response; when it fires, a
    connection that is not in a request (headers incomplete, or idle and reading a new request)
    and was not upgraded to a WebSocket is closed.
    """

    class HeaderTimeoutProtocol(base):  # type: ignore[valid-type, misc]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # noqa: D102
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:  # noqa: D102
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = asyncio.get_running_loop().call_later(timeout, self._header_deadline)

        def _header_deadline(self) -> None:
            self._header_timer = None
            transport = self.transport
            if transport is None or transport.is_closing() or transport.get_protocol() is not self:
                return  # closed already, or a WebSocket now
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                return  # a request is being served: its headers arrived in time
            transport.close()

    HeaderTimeoutProtocol.__name__ = f"HeaderTimeout{base.__name__}"
    return HeaderTimeoutProtocol


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


async def read_body(request: Request, max_bytes: int, timeout: float) -> bytes:
    """The request body, read chunk by chunk. Raises :class:`BodyTooLarge` as soon as more than
    ``max_bytes`` arrived (or were declared in ``Content-Length``), :class:`BodyTimeout` if the
    whole body took longer than ``timeout`` seconds, ``ClientDisconnect`` if the client left."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    stream = request.stream().__aiter__()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BodyTimeout
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), remaining)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise BodyTimeout from None
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def send_json_error(send: Any, status: int, code: Code, message: str,
                          headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """Answer an HTTP request from ASGI middleware, before the app runs, with the contract's JSON
    error body ``{"error": CODE, "message": TEXT}``."""
    body = json.dumps({"error": str(code), "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class ConnectionCap:
    """ASGI middleware: an HTTP request on a path outside ``exempt`` gets 503 when more than
    ``limit`` connections are open (``connections``: uvicorn's set of open connections, this one
    included; set once the server exists). WebSockets are limited by the stream endpoint."""

    def __init__(self, app: Any, limit: int, exempt: Collection[str]):
        self.app = app
        self.limit = limit
        self.exempt = exempt
        self.connections: Sized = ()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and len(self.connections) > self.limit and \
                scope.get("path", "") not in self.exempt:
            await send_json_error(send, 503, Code.BUSY, f"{self.limit} connections are open; retry shortly",
                                  ((b"retry-after", b"1"), (b"connection", b"close")))
            return
        await self.app(scope, receive, send)


class Gate:
    """At most ``limit`` concurrent holders (single-threaded: the event loop)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self.refused = 0

    def try_enter(self) -> bool:
        if self.active >= self.limit:
            self.refused += 1
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1


__all__ = ["BodyTimeout", "BodyTooLarge", "ClientDisconnect", "ConnectionCap", "Gate", "header_timeout_protocol",
           "read_body", "send_json_error"]
