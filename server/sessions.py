"""Sessions and their device slots (no JAX).

A session is one client's stream: a row (*slot*) of its model's state pool on the device, host-side
metadata (last accepted timestamp, events accepted, last probabilities) and a queue of work items
that the scheduler runs strictly in order.

Slot lifecycle, the invariants the engine relies on:

- a slot is owned by at most one live session (``SlotPool.allocate`` never hands out an owned
  slot);
- a slot is freed exactly once, by its owner, and only when the owner has no queued or running
  work (``SlotPool.free`` raises on a double or foreign free);
- a freed slot is *dirty* until zeroed: a session that receives a dirty slot starts with a
  ``Zero`` item, so the device zeroes the row before the session's first step (a session restored
  from a snapshot starts with a ``Restore`` item instead, which overwrites the whole row).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class SlotError(RuntimeError):
    """A slot lifecycle invariant would be broken (a bug, never a client error)."""


class SlotPool:
    """The free/owned bookkeeping of one model's ``n`` state rows."""

    def __init__(self, n: int):
        self.n = n
        self._free: deque[int] = deque(range(n))  # FIFO: a freed row rests before reuse
        self._owner: dict[int, str] = {}
        self._dirty: set[int] = set()

    @property
    def used(self) -> int:
        return len(self._owner)

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

    def owner(self, slot: int) -> str | None:
        return self._owner.get(slot)


# --- work items ----------------------------------------------------------------------------------
@dataclass(eq=False)
class Packet:
    """A validated events packet. ``tokens``/``gaps`` int32 [N]; stepped in chunks of at most
    the largest length bucket (``offset`` events done)."""

    seq: int | None
    tokens: np.ndarray
    gaps: np.ndarray
    events_after: int  # the session's event count once this packet is in
    last_t: int | None  # the session's last timestamp once this packet is in
    received: float  # perf_counter() when its frame arrived
    reply: asyncio.Future | None
    cropped_after: int = 0  # the session's cropped count once this packet is in
    enqueued: float = 0.0
    offset: int = 0
    started: bool = False

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(eq=False)
class Reset:
    """Zero the session's state (``reply`` None: the internal zeroing of a dirty slot)."""

    reply: asyncio.Future | None
    received: float = 0.0


@dataclass(eq=False)
class Close:
    """End the session once everything before it is answered."""

    reply: asyncio.Future | None


@dataclass(eq=False)
class Restore:
    """Write a snapshot's state row into the session's slot (the first item of a session restored
    from a snapshot). ``row`` int32 [words]; ``probs`` float32 [C] or None; ``events``/``last_t``
    what the row covers."""

    row: np.ndarray
    events: int
    last_t: int | None
    probs: np.ndarray | None
    cropped: int = 0


Item = Packet | Reset | Close | Restore


class Attachment(Protocol):
    """What a session knows of the connection it is attached to (see ``app.Connection``)."""

    def detach(self, session: "Session", frame: dict[str, Any] | None) -> None:
        """Forget ``session`` (evicted, resumed elsewhere, failed) and send ``frame`` if given."""
        ...


@dataclass(eq=False)
class Session:
    id: str
    token: str  # the resume secret; never shown to anyone but the session's client
    model: str
    slot: int
    top_k: int
    queue: deque[Item] = field(default_factory=deque)
    in_step: bool = False  # a chunk of the head packet is in the running step
    queued: bool = False  # in the scheduler's ready queue
    events: int = 0  # events accepted (validated, queued or done)
    last_t: int | None = None  # timestamp of the last accepted event
    probs: np.ndarray | None = None  # after the last *processed* packet (None: no prediction yet)
    done_events: int = 0  # events processed
    done_t: int | None = None
    attachment: Attachment | None = None
    last_active: float = field(default_factory=time.monotonic)
    closing: bool = False  # close requested or evicted: no new items
    released: bool = False
    geometry: Any = None  # the declared source's adapter (evssm.models.geometry.Adapter) or None
    cropped: int = 0  # events the declared crop removed since the session's start or last reset
    # Snapshots (durability.py). ``version`` counts changes of the row and the done_* fields (a
    # processed packet, a reset, a restore); ``epoch`` counts resets applied; ``durable`` is the
    # event count of the current epoch covered by the last completed snapshot write (None: this
    # server keeps no snapshots). ``snap_version``/``snap_active``: what that write covered.
    version: int = 0
    epoch: int = 0
    durable: int | None = None
    snap_version: int = -1
    snap_active: float = 0.0
    done_cropped: int = 0  # ``cropped`` once the processed packets are in (what a snapshot covers)

    @property
    def idle(self) -> bool:
        """No queued or running work."""
        return not self.queue and not self.in_step

    @property
    def settled(self) -> bool:
        """The slot's row is exactly the state after ``done_events``: no device call of this
        session is running or awaiting its results, no packet is half stepped, and no restore is
        pending. Only then may the row be read for a snapshot (on the step thread, whose FIFO
        order puts the read before any step planned later)."""
        if self.in_step:
            return False
        if not self.queue:
            return True
        head = self.queue[0]
        return not (isinstance(head, Restore) or (isinstance(head, Packet) and head.started))


class ServerFull(Exception):
    pass


class SessionTable:
    """Every live session, its slot and its resume token. Single-threaded (the event loop)."""

    def __init__(self, max_sessions: int, slots_per_model: dict[str, int]):
        self.max_sessions = max_sessions
        self.pools = {name: SlotPool(n) for name, n in slots_per_model.items()}
        self.sessions: dict[str, Session] = {}
        self._by_token: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    def count(self, model: str) -> int:
        return sum(1 for s in self.sessions.values() if s.model == model)

    def counts(self) -> dict[str, int]:
        out = {name: 0 for name in self.pools}
        for s in self.sessions.values():
            out[s.model] += 1
        return out

    def open(self, model: str, top_k: int) -> Session:
        """A new session with a slot; raises :class:`ServerFull` at ``max_sessions``.

        When the slot is dirty, the session's first item zeroes it.
        """
        pool = self.pools[model]
        if len(self.sessions) >= self.max_sessions or not pool._free:
            raise ServerFull(f"the server holds its maximum of {self.max_sessions} sessions")
        sid = secrets.token_hex(8)
        while sid in self.sessions:
            sid = secrets.token_hex(8)
        slot, dirty = pool.allocate(sid)
        session = Session(id=sid, token=secrets.token_urlsafe(24), model=model, slot=slot, top_k=top_k)
        if dirty:
            session.queue.append(Reset(reply=None))
        self.sessions[sid] = session
        self._by_token[session.token] = session
        return session

    def restore(self, model: str, top_k: int, sid: str, token: str) -> Session:
        """A session restored from a snapshot: the same id (unless a live session has it) and
        token, a slot (dirty or not: the restore writes the whole row); raises ServerFull."""
        pool = self.pools[model]
        if len(self.sessions) >= self.max_sessions or not pool._free:
            raise ServerFull(f"the server holds its maximum of {self.max_sessions} sessions")
        while sid in self.sessions:
            sid = secrets.token_hex(8)
        slot, _ = pool.allocate(sid)
        session = Session(id=sid, token=token, model=model, slot=slot, top_k=top_k)
        self.sessions[sid] = session
        self._by_token[token] = session
        return session

    def knows(self, token: str) -> bool:
        """A session (live, or closing and not yet released) holds this token."""
        return token in self._by_token

    def by_token(self, token: str) -> Session | None:
        session = self._by_token.get(token)
        if session is None or session.closing or session.released:
            return None
        # Constant-time compare: the dict lookup found it, the compare guards against misuse.
        return session if secrets.compare_digest(session.token, token) else None

    def release(self, session: Session) -> None:
        """Free the session's slot and forget it. Exactly once; only when it has no work."""
        if session.released:
            raise SlotError(f"session {session.id} released twice")
        if not session.idle:
            raise SlotError(f"session {session.id} released with work queued or running")
        self.pools[session.model].free(session.slot, session.id)
        session.released = True
        session.closing = True
        session.attachment = None
        self.sessions.pop(session.id, None)
        self._by_token.pop(session.token, None)
