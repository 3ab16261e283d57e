"""What the core hands the API layer: plain records of numbers, arrays and sessions (no wire).

A scheduler's :meth:`~.scheduler.Scheduler.update_from_result` returns one :class:`StepOutputs`
per step (and ``submit`` one for the work it could answer at once); the engine reports the
sessions it ends as :class:`Ended`. The API layer's output processor is the one place that turns
them into frames (``server/api/outputs.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from .sessions import Close, Item, Packet, Reset, Session


class EndReason(Enum):
    """Why the core ended a session its client did not close (the API layer names each)."""

    EXPIRED = "expired"  # idle longer than the idle timeout: evicted
    TAKEN_OVER = "taken_over"  # another server restored it from the shared snapshot store
    FAILED = "failed"  # a device call failed: its state is unknown


@dataclass(frozen=True, slots=True)
class Ended:
    """``session`` was ended by the core for ``reason``; ``detail`` says what happened, and
    ``unanswered`` are its items that will never be answered otherwise (in order)."""

    session: Session
    reason: EndReason
    detail: str = ""
    unanswered: tuple[Item, ...] = ()


@dataclass(slots=True)
class Answered:
    """Packets answered together, in order per session: row ``i`` of ``probs`` float32 [N, C],
    ``ready`` bool [N] and ``order`` int32 [N, C] (classes by falling probability) is the state
    after ``packets[i]``; ``durable`` int64 [N] the events sent that the session's snapshots
    cover then (None: the server keeps no snapshots)."""

    sessions: list[Session]
    packets: list[Packet]
    probs: np.ndarray
    ready: np.ndarray
    order: np.ndarray
    durable: np.ndarray | None


@dataclass(slots=True)
class StepOutputs:
    """Everything one step (or one submit) of a model finished, for the API layer to answer.

    One batch of ``answered`` rows per step (a windowed session's answer is its chosen lane's
    row), and the resets, closes and ended sessions it completed, each in order per
    session. Replies have their places in each connection's outbox already, so the order between
    these lists does not reach the wire."""

    model: str
    answered: list[Answered] = field(default_factory=list)
    reset: list[tuple[Session, Reset]] = field(default_factory=list)
    closed: list[tuple[Session, Close]] = field(default_factory=list)
    ended: list[Ended] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.answered or self.reset or self.closed or self.ended)


class OutputSink(Protocol):
    """Where the outputs of steps go (the API layer's ``OutputProcessor``); the event loop."""

    def model_loaded(self, model: str, labels: tuple[str, ...]) -> None:
        """``model`` is served; its classes are ``labels`` (the engine calls this once)."""
        ...

    def emit(self, outputs: StepOutputs) -> None:
        """Answer what ``outputs`` finished."""
        ...

    def ended(self, record: Ended) -> None:
        """Tell the client of ``record.session`` (if one is attached) why it ended."""
        ...
