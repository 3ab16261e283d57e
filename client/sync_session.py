"""The synchronous twin of :class:`~evssm.client.session.AsyncStreamSession`: the same session,
driven by a private event-loop thread, for callers without asyncio.

Typical use::

    with StreamSession("ws://127.0.0.1:8000") as session:
        for result in session.stream(packetize(recording, events=256)):
            ...
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any, TypeVar

from evssm.models.events import Recording

from .errors import NothingInFlight, SessionClosed
from .packets import Packet
from .protocol import Result, SessionInfo
from .resync import Resume
from .session import AsyncStreamSession

T = TypeVar("T")


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
