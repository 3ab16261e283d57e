"""The one place that turns the core's plain records into frames (``StepOutputs``, ``Ended``).

A step's finished packets arrive together with their probabilities, readiness and class order as
arrays (and, with snapshots, what each session's snapshots cover: ``durable``); the rows are turned
into Python lists once per step, each packet's frame is encoded in its connection's encoding and
put in its place in that connection's outbox, and the step's packet metrics are recorded once.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from evssm.models.wire import Closed, Code, ErrorFrame, ResetDone, ResultFrame

from ..core.outputs import Answered, Ended, EndReason, StepOutputs
from ..core.sessions import Packet
from ..metrics import Metrics
from .connection import Connection, Reply

log = logging.getLogger("evssm.server.app")

NON_FINITE_ADVICE = "the model's output is not finite (NaN or infinite); no answer is sent"
FAILED_NOTICE = "session ended by an engine failure"
# The code a client is told for each way the core ends a session its client did not close.
END_CODES: dict[EndReason, Code] = {
    EndReason.EXPIRED: Code.SESSION_EXPIRED,
    EndReason.TAKEN_OVER: Code.SESSION_RESUMED_ELSEWHERE,
    EndReason.FAILED: Code.INTERNAL_ERROR,
}


def withheld_non_finite(metrics: Metrics, model: str, whose: str) -> None:
    """Count and log an answer withheld because the model's output is not finite."""
    metrics.non_finite.labels(model=model).inc()
    log.error("model %s: non-finite output for %s; answered %s", model, whose, Code.NON_FINITE_OUTPUT)


class OutputProcessor:
    """The API layer's half of a step: answers what the core finished (the core's ``OutputSink``)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.labels: dict[str, tuple[str, ...]] = {}

    def model_loaded(self, model: str, labels: tuple[str, ...]) -> None:
        self.labels[model] = labels

    def emit(self, outputs: StepOutputs) -> None:
        for answered in outputs.answered:
            self._results(outputs.model, answered)
        for session, reset in outputs.reset:
            _reply(reset.reply).answer(ResetDone(session.id))
        for session, close in outputs.closed:
            _reply(close.reply).answer(Closed(session.id, close.events))
        for record in outputs.ended:
            self.ended(record)

    def ended(self, record: Ended) -> None:
        """Answer the ended session's unanswered items with errors and tell its client why."""
        session, code = record.session, END_CODES[record.reason]
        for item in record.unanswered:
            if item.reply is not None:
                seq = item.seq if isinstance(item, Packet) else None
                _reply(item.reply).answer(ErrorFrame(code, record.detail, seq))
        conn = session.attachment
        if isinstance(conn, Connection):
            message = FAILED_NOTICE if record.reason is EndReason.FAILED else record.detail
            conn.detach(session, ErrorFrame(code, message))

    def _results(self, model: str, answered: Answered) -> None:
        now = time.perf_counter()
        labels = self.labels[model]
        probs, packets = answered.probs, answered.packets
        probs_rows, order_rows, ready_rows = probs.tolist(), answered.order.tolist(), answered.ready.tolist()
        durable_rows = None if answered.durable is None else answered.durable.tolist()
        # One vectorised check per step; a non-finite answer is never sent (NaN is not JSON).
        finite = np.isfinite(probs).all(1).tolist() if len(probs) else []
        latencies = np.empty(len(packets), np.float64)
        events = 0
        for i, (session, packet) in enumerate(zip(answered.sessions, packets, strict=True)):
            frame: ErrorFrame | ResultFrame
            if ready_rows[i] and not finite[i]:
                withheld_non_finite(self.metrics, model, f"session {session.id}")
                frame = ErrorFrame(Code.NON_FINITE_OUTPUT, f"{NON_FINITE_ADVICE}: reset the session "
                                   "(its state is unusable)", packet.seq)
            else:
                if ready_rows[i]:
                    row, best = probs_rows[i], order_rows[i][0]
                    top = [[labels[j], row[j]] for j in order_rows[i][:session.top_k]]
                    session.answer = (labels[best], row[best])
                else:
                    row, top = None, []
                frame = ResultFrame(packet.seq, packet.events_after, packet.last_t, row, top,
                                    packet.cropped_after, None if durable_rows is None else durable_rows[i],
                                    _window(packet),
                                    filtered=None if packet.filtered is None else packet.filtered.to_dict())
            _reply(packet.reply).answer(frame)
            latencies[i] = now - packet.received
            events += packet.size
        self.metrics.model(model).packets_done(events, latencies)


def _window(packet: Packet) -> dict[str, int] | None:
    """A windowed session's result: the events its answer covers (None before any event)."""
    lanes = packet.lanes
    if lanes is None or lanes.t0 is None:
        return None
    return {"t0": lanes.t0, "events": lanes.events}


def _reply(handle: object) -> Reply:
    """A work item's ``reply``: the place its answer takes in a connection's outbox."""
    assert isinstance(handle, Reply), "an answered item has a place in an outbox"
    return handle
