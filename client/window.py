"""The two queues of a streaming session: packets in flight (sent, not yet answered) and answers
not yet read. Both are in packet order; neither knows of sockets."""

from __future__ import annotations

import collections
from collections.abc import Iterator

from .errors import ProtocolError, ServerError
from .ledger import Sent
from .protocol import Result


class InFlight:
    """Packets sent and not yet answered, oldest first: at most ``limit`` (backpressure)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.limit = limit
        self._sent: collections.deque[Sent] = collections.deque()

    def __len__(self) -> int:
        return len(self._sent)

    def __iter__(self) -> Iterator[Sent]:
        return iter(list(self._sent))

    @property
    def full(self) -> bool:
        return len(self._sent) >= self.limit

    @property
    def sizes(self) -> list[int]:
        """Events of each packet in flight, oldest first."""
        return [entry.n for entry in self._sent]

    def add(self, entry: Sent) -> None:
        self._sent.append(entry)

    def answer(self, seq: object) -> Sent:
        """The oldest packet, answered as ``seq``: answers come in packet order."""
        head = self._sent[0] if self._sent else None
        if head is None or head.seq != seq:
            raise ProtocolError(f"result for packet {seq} arrived, expected "
                                f"{head.seq if head else 'none'}")
        return self._sent.popleft()

    def find(self, seq: object) -> Sent | None:
        return next((entry for entry in self._sent if entry.seq == seq), None)

    def remove(self, entry: Sent) -> None:
        self._sent.remove(entry)

    def take(self, count: int) -> list[Sent]:
        """Remove and return the ``count`` oldest packets."""
        return [self._sent.popleft() for _ in range(count)]

    def push_front(self, entry: Sent) -> None:
        self._sent.appendleft(entry)


class ResultQueue:
    """Answers in packet order, until read: a :class:`Result`, or the :class:`ServerError` of a
    packet the server rejected (raised at its place in the order)."""

    def __init__(self) -> None:
        self._items: collections.deque[Result | ServerError] = collections.deque()

    def __len__(self) -> int:
        return len(self._items)

    def append(self, item: Result | ServerError) -> None:
        self._items.append(item)

    @property
    def error_next(self) -> bool:
        return bool(self._items) and isinstance(self._items[0], ServerError)

    def pop(self) -> Result:
        """The oldest answer; raises it if it is an error."""
        item = self._items.popleft()
        if isinstance(item, ServerError):
            raise item
        return item

    def poll(self) -> list[Result]:
        """The results at the head. An error at the head is raised; one behind results is kept for
        the next call, so no result is lost."""
        out: list[Result] = []
        while self._items:
            if self.error_next and out:
                break
            out.append(self.pop())
        return out
