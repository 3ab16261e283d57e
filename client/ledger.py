"""The replay ledger of a streaming session: which answered packets a restored server may still
need, and what a resync after a dropped connection must send again. Pure bookkeeping: no socket,
no clock, no asyncio.

Counts are the server's: ``acked`` is the session's event count (kept and cropped) after the last
answered packet. With snapshots (``durable`` not None) the ledger keeps the answered packets after
the last snapshot; they end at ``acked`` and begin at ``base``::

    base = acked - kept_events,    durable <= base  (once trimmed)

A restored server holds ``served`` events with ``durable <= served``; the kept packets after
``served`` are replayed, then the unanswered ones (the in-flight window) are sent. A server whose
session stayed live holds ``served = acked + sizes of a prefix of the window``: that prefix was
processed, its answers lost. Without snapshots nothing is kept.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .errors import ClientCode, SessionExpired


@dataclass
class Sent:
    """A packet sent: kept in the in-flight window until answered (to be resent after a
    reconnect), then in the ledger until a snapshot covers it (to be replayed after a restore)."""

    seq: int
    frame: bytes
    n: int  # events
    sent_at: float  # time.perf_counter() of the first send
    recovering: bool = False  # an empty stand-in asking for a processed packet's lost answer


@dataclass(frozen=True)
class ResyncPlan:
    """What to send on a new connection, in order: a ``reset`` (when ``reset``), the kept packets
    ``replay`` (their answers dropped), then the window; its first ``processed`` packets were
    processed by the server already. ``restarted``: the server's state was reset or is new, so
    its ``durable`` says nothing of this stream."""

    reset: bool
    replay: tuple[Sent, ...]
    processed: int
    restarted: bool


class ReplayLedger:
    """Answered packets after the session's last snapshot, at most ``max_events`` events of them.

    Invariant: ``kept_events == sum(e.n for e in kept)`` and every kept packet holds events
    (an empty packet changes no state and is never replayed).
    """

    def __init__(self, max_events: int) -> None:
        if max_events < 0:
            raise ValueError("max_events must be >= 0")
        self.max_events = max_events
        self.acked = 0  # the server's event count after the last answered packet
        self.durable: int | None = None  # events the last snapshot covers; None: no snapshots
        self.unconfirmed_reset: int | None = None  # the count before a reset not yet confirmed
        # A reset was sent and no snapshot of the new stream is known yet: a restored state may
        # predate the reset.
        self.reset_unsnapshotted = False
        self.overflowed = False  # a packet no snapshot covered was dropped for room
        self._kept: collections.deque[Sent] = collections.deque()
        self.kept_events = 0

    # -- reading ----------------------------------------------------------------------------

    @property
    def base(self) -> int:
        """The event count before the first kept packet."""
        return self.acked - self.kept_events

    @property
    def kept(self) -> Iterator[Sent]:
        return iter(self._kept)

    @property
    def holds_whole_stream(self) -> bool:
        """Every answered event of the stream is kept, so a new session can replay it all."""
        return self.durable is not None and self.base == 0

    # -- the stream going on ----------------------------------------------------------------

    def start(self, events: int, durable: int | None) -> None:
        """The session opened (or resumed) at ``events`` (kept + cropped), snapshot at ``durable``."""
        self.acked = events
        self.durable = durable

    def answered(self, entry: Sent, events: int, durable: int | None) -> None:
        """``entry``'s answer came: the server's count is now ``events``; a result after a reset
        proves the reset was applied."""
        self.acked = events
        self.unconfirmed_reset = None
        self.note_durable(durable)
        self.keep(entry)

    def processed(self, entry: Sent) -> None:
        """The server processed ``entry`` but its answer was lost with the connection."""
        self.acked += entry.n
        self.keep(entry)

    def reset_sent(self) -> None:
        """A reset went out: the old stream will never be replayed."""
        self.unconfirmed_reset = self.acked
        self.acked = 0
        self.drop()
        if self.durable is not None:
            self.durable = 0
            self.reset_unsnapshotted = True

    def reset_confirmed(self) -> None:
        self.unconfirmed_reset = None

    def note_durable(self, durable: int | None) -> None:
        """The server's latest ``durable``: None drops everything kept (no snapshots, nothing to
        replay); a count only raises it (answers may report an older snapshot)."""
        if durable is None:
            self.durable = None
            self.drop()
        else:
            self.durable = max(self.durable or 0, durable)
            if self.durable > 0:
                self.reset_unsnapshotted = False

    def keep(self, entry: Sent) -> None:
        """Keep an answered packet for a replay, while the server reports snapshots."""
        if self.durable is None or entry.n == 0:
            return
        self._kept.append(entry)
        self.kept_events += entry.n
        self.trim()

    def trim(self) -> None:
        """Drop kept packets a snapshot covers, then the oldest beyond ``max_events``."""
        base = self.base
        covered = self.durable or 0
        while self._kept and (base + self._kept[0].n <= covered or self.kept_events > self.max_events):
            if base + self._kept[0].n > covered:
                self.overflowed = True
            dropped = self._kept.popleft()
            self.kept_events -= dropped.n
            base += dropped.n

    def drop(self) -> None:
        self._kept.clear()
        self.kept_events = 0

    # -- after a dropped connection ---------------------------------------------------------

    def plan(self, served: int, *, restored: bool, fresh: bool, window: Sequence[int]) -> ResyncPlan:
        """Which packets a server holding ``served`` events lacks; ``window`` holds the sizes of
        the unanswered packets in order. Raises :class:`SessionExpired` (``resume_mismatch``)
        when no packet boundary matches ``served``.

        Packets are atomic and processed in order. A live session holds
        ``acked + sum(window[:k])`` events for some ``k``: those ``k`` were processed. A restored
        one holds ``served`` in ``[durable, acked]``: the kept packets after ``served`` are
        replayed. While no snapshot of the stream is known after a reset (``durable`` still 0, or
        the reset not yet confirmed) a restored state may predate the reset: it is reset and the
        whole stream replayed. A new session (``fresh``) starts from zero the same way.
        """
        whole = fresh or (restored and (self.unconfirmed_reset is not None or self.reset_unsnapshotted))
        reset = restarted = False
        if whole:
            if self.base != 0:
                raise self.mismatch(served, window)
            if fresh:
                self.unconfirmed_reset = None  # a new session is zero already
                self.reset_unsnapshotted = False
            elif served or self.unconfirmed_reset is not None:
                reset = True
                self.reset_unsnapshotted = True
            served, restarted = 0, True
        elif self.unconfirmed_reset and served == self.unconfirmed_reset:
            # The reset sent just before the drop never arrived (the count is still the old one).
            reset = restarted = True
            served = 0
            self.reset_unsnapshotted = self.durable is not None
        replay: tuple[Sent, ...] = ()
        if served < self.acked:  # restored from an older state: replay answered packets
            if not (restored or whole):
                raise self.mismatch(served, window)
            kept = list(self._kept)
            count, start = self.base, 0
            while start < len(kept) and count < served:
                count += kept[start].n
                start += 1
            if count != served:
                raise self.mismatch(served, window)
            replay = tuple(kept[start:])
            served = self.acked
        count, prefix = self.acked, 0
        while prefix < len(window) and count < served:
            count += window[prefix]
            prefix += 1
        if count != served:
            raise self.mismatch(served, window)
        return ResyncPlan(reset=reset, replay=replay, processed=prefix, restarted=restarted)

    def replay_ends(self, sizes: Sequence[int]) -> list[int]:
        """The server's count after each of the replayed packets of ``sizes`` (they end at
        ``acked``)."""
        end = self.acked - sum(sizes)
        out: list[int] = []
        for n in sizes:
            end += n
            out.append(end)
        return out

    def finish(self, durable: int | None, *, restarted: bool) -> None:
        """The resync is done; ``durable`` is the new connection's ``opened`` count, which says
        nothing of a stream the resync reset (``restarted``)."""
        if durable is None:  # this server keeps no snapshots
            self.note_durable(None)
        elif not restarted:
            self.note_durable(durable)
        elif self.durable is None:
            self.durable = 0  # snapshots from now on; the stream's start is all that is known
        self.trim()

    def mismatch(self, served: int, window: Sequence[int]) -> SessionExpired:
        why = " (the replay buffer overflowed: raise max_replay_events)" if self.overflowed else ""
        return SessionExpired(
            ClientCode.RESUME_MISMATCH,
            f"the resumed session holds {served} events but the client accounts for "
            f"{self.acked} answered (it keeps those from {self.base} on) plus {sum(window)} "
            f"in flight{why}")
