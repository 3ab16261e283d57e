"""The states of a streaming session and the moves between them (one table, checked on every
move)::

    NEW -> OPEN <-> RECONNECTING
            |            |
            +--> FAILED  +--> FAILED
    any but CLOSED -> CLOSING -> CLOSED
"""

from __future__ import annotations

from enum import Enum


class SessionState(Enum):
    """Where a session is. ``send`` and ``reset`` go out only when ``OPEN``; every other state
    makes them wait (``NEW``, ``RECONNECTING``, ``CLOSING``) or raise (``FAILED``, ``CLOSED``)."""

    NEW = "new"  # not opened yet (or its open failed: open() may be called again)
    OPEN = "open"  # connected and attached to the server's session
    RECONNECTING = "reconnecting"  # the connection dropped; re-attaching and resyncing
    FAILED = "failed"  # a failure ended it (the session's failure says which); close() remains
    CLOSING = "closing"  # close() under way (or the caller walked away): a drop ends the reader
    CLOSED = "closed"


TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.NEW: frozenset({SessionState.OPEN, SessionState.CLOSING}),
    SessionState.OPEN: frozenset({SessionState.RECONNECTING, SessionState.FAILED, SessionState.CLOSING}),
    SessionState.RECONNECTING: frozenset({SessionState.OPEN, SessionState.FAILED, SessionState.CLOSING}),
    SessionState.FAILED: frozenset({SessionState.CLOSING}),
    SessionState.CLOSING: frozenset({SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
}


def moved(state: SessionState, to: SessionState) -> SessionState:
    """``to``, when the table allows the move from ``state``; a move it does not allow is a bug in
    the session, not its caller's."""
    if to not in TRANSITIONS[state]:
        raise RuntimeError(f"session state {state.value} -> {to.value} is not allowed")
    return to
