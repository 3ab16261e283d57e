"""Sessions and their device slots (no JAX).

A session is one client's stream: a row (*slot*) of its model's state pool on the device, host-side
metadata (last accepted timestamp, events accepted) and a queue of work items (kept by the
scheduler) that runs strictly in order.

Slot lifecycle, the invariants the engine relies on:

- a slot is owned by at most one live session (``SlotPool.allocate`` never hands out an owned
  slot);
- a slot is freed exactly once, by its owner, and only when the owner has no queued or running
  work (``SlotPool.free`` raises on a double or foreign free);
- a freed slot is *dirty* until zeroed: a session that receives a dirty slot starts with a
  ``Reset`` item, so the device zeroes the row before the session's first step (a session restored
  from a snapshot starts with a ``Restore`` item instead, which overwrites the whole row).
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np


class SlotError(RuntimeError):
    """A slot lifecycle invariant would be broken (a bug, never a client error)."""


class LanesRefused(ValueError):
    """A session asked for more rows than this server can step or snapshot (the message says why)."""


class SlotPool:
    """The free/owned bookkeeping of one model's ``n`` state rows."""

    def __init__(self, n: int):
        self.n = n
        self._free: deque[int] = deque(range(n))  # FIFO: a freed row rests before reuse
        self._owner: dict[int, str] = {}
        self._dirty: set[int] = set()

    def allocate(self, owner: str) -> tuple[int, bool]:
        """A free slot for ``owner`` and whether it must be zeroed before use."""
        if not self._free:
            raise SlotError("no free slot")
        slot = self._free.popleft()
        if slot in self._owner:
            raise SlotError(f"slot {slot} is free and owned by {self._owner[slot]}")
        self._owner[slot] = owner
        return slot, slot in self._dirty

    def free(self, slot: int, owner: str) -> None:
        """Return ``owner``'s slot; it is dirty until :meth:`zeroed`."""
        if self._owner.get(slot) != owner:
            raise SlotError(f"slot {slot} freed by {owner}, but owned by {self._owner.get(slot)}")
        del self._owner[slot]
        self._dirty.add(slot)
        self._free.append(slot)

    def zeroed(self, slot: int) -> None:
        self._dirty.discard(slot)

    def is_dirty(self, slot: int) -> bool:
        return slot in self._dirty


# --- work items ----------------------------------------------------------------------------------
@dataclass(eq=False, slots=True)
class Packet:
    """An accepted events packet: its tokens and gaps lie in the model's staging buffer at
    ``start .. start + size`` (``region`` holds them there until the packet is stepped; None for an
    empty packet). Written by the API layer when accepted; the scheduler only reads it.
    ``reply`` is the API layer's handle for the answer (opaque to the scheduler)."""

    seq: int | None
    region: Any  # staging.Region | None
    start: int
    size: int
    events_after: int  # the session's event count once this packet is in
    last_t: int | None  # the session's last timestamp once this packet is in
    received: float  # perf_counter() when its frame arrived
    reply: Any
    cropped_after: int | None = None  # the session's cropped count once this packet is in (None:
    # no source sensor declared)
    lanes: LaneRows | None = None  # a session with several rows: what each steps (None: one row)
    sent_t: int | None = None  # a realtime session's packet: its newest event as sent, before any
    # filter or crop removed it (what its answer's lag is measured from)
    filtered: Any = None  # models.filters.FilterCounts: what the session's filters removed from
    # this packet (None: the session has no filters)
    filters_undo: Any = None  # server.live.filtering.Undo: how to take this packet out of the
    # session's filter state (the ledger rebuilds the state a snapshot holds with it)
    window_after: Any = None  # a windowed session's lane state once this packet is in (the API
    # layer's; the ledger pairs the last stepped packet's with the rows a snapshot reads)


@dataclass(frozen=True, slots=True)
class LaneRows:
    """What one packet of ``n`` events does to a session's ``L`` rows (its lanes). Row ``j`` steps
    the packet's last ``sizes[j]`` events (``0 < sizes[j] <= n`` when ``n > 0``), after zeroing
    when ``resets[j]``. ``copies[j]`` (staging index, or -1) holds its first event again with a
    zero gap: a restarted row starts a stream, whose first gap is 0, while the other rows read the
    event's real gap in place (the scheduler steps that one event alone, then the rest in place).
    ``answer``: the row whose state answers the packet; ``t0``/``events``: what it covers (``t0``
    None before any event). Plain data: the API layer plans it, the scheduler steps it."""

    sizes: tuple[int, ...]
    resets: tuple[bool, ...]
    copies: tuple[int, ...]
    answer: int
    t0: int | None
    events: int


@dataclass(eq=False, slots=True)
class Reset:
    """Zero the session's state (``reply`` None: the internal zeroing of a dirty slot)."""

    reply: Any


@dataclass(eq=False, slots=True)
class Close:
    """End the session once everything before it is answered (``events``: the count it ends on)."""

    reply: Any
    events: int


@dataclass(eq=False, slots=True)
class Restore:
    """Write a snapshot's state rows into the session's slots (the first item of a session restored
    from a snapshot). ``row`` int32 [words], or [L, words] for a window's ``L`` lanes (in slot
    order); ``probs`` float32 [C] or None (no complete final-rate window yet): the answer, set on
    every slot; ``events``/``last_t``/``cropped``: what the rows cover."""

    row: np.ndarray
    events: int
    last_t: int | None
    probs: np.ndarray | None
    cropped: int = 0
    reply: Any = None  # never answered: the API layer answers the resume itself
    filters: Any = None  # the snapshot's FilterState (None: no filters)
    window: Any = None  # the snapshot's lane state (the API layer's; None: no window)


Item = Packet | Reset | Close | Restore


@dataclass(frozen=True, slots=True)
class Captured:
    """What a snapshot of a session holds besides its state row, taken by the scheduler when the
    row was read: the state after ``events`` events (``cropped`` more removed by a declared crop;
    ``last_t`` the last one's timestamp) of the session's ``epoch``-th stream (resets so far),
    ``version`` (changes of the row so far), ``probs`` float32 [C] or None, and the session's
    ``last_active`` then."""

    session: Session
    version: int
    epoch: int
    active: float
    events: int
    last_t: int | None
    cropped: int
    probs: np.ndarray | None
    filters: Any = None  # the FilterState after those events (None: no filters, or a fresh stream)
    window: Any = None  # the window's lane state after those events (None: no window, or a fresh stream)


class Client(Protocol):
    """The core's view of a client connection (the API layer's ``Connection``)."""

    def going_away(self) -> None:
        """The server is draining: close the connection once what is queued for it is sent."""
        ...


class SessionStatus(Enum):
    """Where a session is in its life: ``OPEN`` takes work; ``CLOSING`` (closed by its client,
    evicted, taken over or failed) takes none and cannot be resumed, and is released once its
    queued work is answered; ``RELEASED``: its slot is free and the table has forgotten it."""

    OPEN = "open"
    CLOSING = "closing"
    RELEASED = "released"


@dataclass(eq=False)
class Session:
    """One client's stream. Each field has one writer:

    - ``id``, ``token``, ``model``, ``slot``, ``owner``, ``key_id``, ``opened``: the
      :class:`SessionTable`, when it creates the session;
    - ``status``: the :class:`SessionTable` (:meth:`SessionTable.end`, :meth:`SessionTable.release`);
    - ``events``, ``last_t``, ``cropped``, ``geometry``, ``top_k``, ``filters``, ``filter_state``:
      the API layer's stream handler (what the client has sent and declared); a restored session's
      start as its snapshot's, set by the table at creation;
    - ``attachment``, ``last_active``: the API layer (the connection it streams on, its activity);
    - ``answer``: the API layer (its output processor sets it from each result, knowing the
      labels; the stream handler clears it on a reset);
    - ``live``: the API layer's live-sensor state (decisions, lag; ``server/api/live.py``),
      opaque here; a snapshot holds its ``to_dict()``, and a session restored from one starts
      with that plain map until the API layer takes it up.

    The scheduler keeps the session's work queue and its model's per-slot arrays (probabilities,
    readiness) itself, keyed by ``slot``. A session with several rows (a sliding window's lanes)
    holds ``slots`` (``slot`` is the first) and counts as that many sessions toward the limits;
    ``window`` is the API layer's planner of them (None: one row)."""

    id: str
    token: str  # the resume secret; never shown to anyone but the session's client
    model: str
    slot: int
    top_k: int
    status: SessionStatus = SessionStatus.OPEN
    events: int = 0  # events accepted (validated, queued or done)
    last_t: int | None = None  # timestamp of the last accepted event
    attachment: Client | None = None
    last_active: float = field(default_factory=time.monotonic)
    geometry: Any = None  # the declared source's adapter (evssm.models.geometry.Adapter) or None
    cropped: int = 0  # events the declared crop removed since the session's start or last reset
    owner: str | None = None  # who holds it, for per-client caps: API key id or client address
    key_id: str | None = None  # the API key that opened it; only that key may resume it
    opened: float = field(default_factory=time.monotonic)
    answer: tuple[str, float] | None = None  # top class and its probability after the last result
    slots: tuple[int, ...] = ()  # every row it holds, ``slot`` first (set by the table)
    window: Any = None  # the API layer's lane planner (its stream handler writes it)
    filters: Any = None  # the declared input filters (evssm.models.filters.FilterBank) or None
    filter_state: Any = None  # their FilterState after the last accepted packet (advanced in place
    # by the stream handler; a new one after a reset)
    live: Any = None  # the API layer's live-sensor state, or a restored snapshot's plain map

    def __post_init__(self) -> None:
        if not self.slots:
            self.slots = (self.slot,)

    @property
    def open(self) -> bool:
        """It takes work (not closing, not released)."""
        return self.status is SessionStatus.OPEN


class ServerFull(Exception):
    pass


class ClientFull(ServerFull):
    """One client (API key, or address without keys) holds its maximum of sessions."""


class SessionTable:
    """Every live session, its slot and its resume token. Single-threaded (the event loop)."""

    def __init__(self, max_sessions: int, slots_per_model: dict[str, int]):
        self.max_sessions = max_sessions
        self.pools = {name: SlotPool(n) for name, n in slots_per_model.items()}
        self.sessions: dict[str, Session] = {}
        self._by_token: dict[str, Session] = {}
        self._by_owner: dict[str, int] = {}  # live sessions per owner (a session of L lanes: L)
        self._held = 0  # slots of live sessions: what counts toward max_sessions

    def __len__(self) -> int:
        return len(self.sessions)

    def counts(self) -> dict[str, int]:
        out = {name: 0 for name in self.pools}
        for s in self.sessions.values():
            out[s.model] += 1
        return out

    def open(self, model: str, top_k: int, *, owner: str | None = None, owner_limit: int | None = None,
             key_id: str | None = None, lanes: int = 1) -> Session:
        """A new session with ``lanes`` slots; raises :class:`ServerFull` when it would pass
        ``max_sessions`` and :class:`ClientFull` when ``owner`` would pass ``owner_limit`` (a
        session of ``L`` lanes counts as ``L`` sessions toward both).

        When a slot is dirty (``pools[model].is_dirty(slot)``), the scheduler zeroes it before
        the session's first step.
        """
        return self._add(model, top_k, secrets.token_hex(8), secrets.token_urlsafe(24), owner=owner,
                         owner_limit=owner_limit, key_id=key_id, lanes=lanes)

    def restore(self, model: str, top_k: int, sid: str, token: str, *, owner: str | None = None,
                owner_limit: int | None = None, key_id: str | None = None, events: int = 0,
                last_t: int | None = None, cropped: int = 0, geometry: Any = None,
                filters: tuple[Any, Any] | None = None, lanes: int = 1) -> Session:
        """A session restored from a snapshot: the same id (unless a live session has it) and
        token, and the counts the snapshot holds (the baseline its next packet is checked
        against); its ``Restore`` item writes the whole row, so a dirty slot needs no zeroing.
        ``filters``: the snapshot's (FilterBank, FilterState); ``lanes``: its window's rows. The same
        limits and errors as :meth:`open`."""
        session = self._add(model, top_k, sid, token, owner=owner, owner_limit=owner_limit, key_id=key_id,
                            lanes=lanes)
        session.events, session.last_t, session.cropped, session.geometry = events, last_t, cropped, geometry
        if filters is not None:
            session.filters, session.filter_state = filters
        return session

    def _add(self, model: str, top_k: int, sid: str, token: str, *, owner: str | None,
             owner_limit: int | None, key_id: str | None, lanes: int = 1) -> Session:
        pool = self.pools[model]
        each = "" if lanes == 1 else f" (a session of {lanes} window lanes counts as {lanes})"
        if self._held + lanes > self.max_sessions or len(pool._free) < lanes:
            raise ServerFull(f"the server holds its maximum of {self.max_sessions} sessions{each}")
        if owner is not None and owner_limit is not None and self._by_owner.get(owner, 0) + lanes > owner_limit:
            raise ClientFull(f"this client holds its maximum of {owner_limit} sessions{each}")
        if token in self._by_token:
            raise SlotError("a live session holds this token already")
        while sid in self.sessions:
            sid = secrets.token_hex(8)
        slots = tuple(pool.allocate(sid)[0] for _ in range(lanes))
        session = Session(id=sid, token=token, model=model, slot=slots[0], top_k=top_k, owner=owner,
                          key_id=key_id, slots=slots)
        if owner is not None:
            self._by_owner[owner] = self._by_owner.get(owner, 0) + lanes
        self._held += lanes
        self.sessions[sid] = session
        self._by_token[session.token] = session
        return session

    def knows(self, token: str) -> bool:
        """A session (live, or closing and not yet released) holds this token."""
        return token in self._by_token

    def by_token(self, token: str) -> Session | None:
        session = self._by_token.get(token)
        if session is None or not session.open:
            return None
        # Constant-time compare: the dict lookup found it, the compare guards against misuse.
        return session if secrets.compare_digest(session.token, token) else None

    @staticmethod
    def end(session: Session) -> bool:
        """The session takes no more work and cannot be resumed (closed by its client, evicted,
        taken over, failed). True if it was open."""
        if session.status is not SessionStatus.OPEN:
            return False
        session.status = SessionStatus.CLOSING
        return True

    def release(self, session: Session, idle: bool) -> None:
        """Free the session's slot and forget it. Exactly once; only when it has no work
        (``idle``: the scheduler says none is queued or running)."""
        if session.status is SessionStatus.RELEASED:
            raise SlotError(f"session {session.id} released twice")
        if not idle:
            raise SlotError(f"session {session.id} released with work queued or running")
        for slot in session.slots:
            self.pools[session.model].free(slot, session.id)
        self._held -= len(session.slots)
        session.status = SessionStatus.RELEASED
        self.sessions.pop(session.id, None)
        self._by_token.pop(session.token, None)
        if session.owner is not None:
            left = self._by_owner.pop(session.owner, 1) - len(session.slots)
            if left:
                self._by_owner[session.owner] = left
