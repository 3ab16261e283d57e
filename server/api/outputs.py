"""The one place that turns the core's plain records into frames (``StepOutputs``, ``Ended``).

A step's finished packets arrive together with their probabilities, readiness and class order as
arrays (and, with snapshots, what each session's snapshots cover: ``durable``); the rows are turned
into Python lists once per step, each packet's frame is encoded in its connection's encoding and
put in its place in that connection's outbox, and the step's packet metrics are recorded once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np

from evssm.models.wire import Closed, Code, ErrorFrame, ResetDone, ResultFrame

from ..core.outputs import Answered, Ended, EndReason, StepOutputs
from ..core.sessions import Packet
from ..metrics import Metrics
from .connection import Connection, Reply
from .live import SessionLive, live_of

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
        # Resets first: a session's packets answered in the same step came after its reset (a
        # plan zeroes before it steps), and its decisions must start afresh before them.
        for session, reset in outputs.reset:
            live = live_of(session)
            if live is not None:
                live.reset()
            _reply(reset.reply).answer(ResetDone(session.id))
        for answered in outputs.answered:
            self._results(outputs.model, answered)
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
        lags: list[float] = []
        events = 0
        for i, (session, packet) in enumerate(zip(answered.sessions, packets, strict=True)):
            frame: ErrorFrame | ResultFrame
            if ready_rows[i] and not finite[i]:
                withheld_non_finite(self.metrics, model, f"session {session.id}")
                frame = ErrorFrame(Code.NON_FINITE_OUTPUT, f"{NON_FINITE_ADVICE}: reset the session "
                                   "(its state is unusable)", packet.seq)
            else:
                answer = None
                if ready_rows[i]:
                    row, best = probs_rows[i], order_rows[i][0]
                    top = [[labels[j], row[j]] for j in order_rows[i][:session.top_k]]
                    answer = session.answer = (labels[best], row[best])
                else:
                    row, top = None, []
                frame = ResultFrame(packet.seq, packet.events_after, packet.last_t, row, top,
                                    packet.cropped_after, None if durable_rows is None else durable_rows[i],
                                    _window(packet),
                                    filtered=None if packet.filtered is None else packet.filtered.to_dict())
                live = live_of(session)
                if live is not None:
                    frame = self._live(frame, live, packet, now, answer, lags)
            _reply(packet.reply).answer(frame)
            latencies[i] = now - packet.received
            events += packet.size
        self.metrics.model(model).packets_done(events, latencies)
        if lags:
            self.metrics.session_lag.observe_many(model, np.asarray(lags, np.float64) / 1000)

    def _live(self, frame: ResultFrame, live: SessionLive, packet: Packet, now: float,
              answer: tuple[str, float] | None, lags: list[float]) -> ResultFrame:
        """``frame`` with a live session's decision, lag (also added to ``lags``, ms) and drops;
        compact when it carries no decision (``server/api/live.py``)."""
        # The packet's newest event as the sensor sent it: the filters or the crop may have
        # removed it (or all of the packet) before the model.
        t_us = packet.last_t if packet.sent_t is None else packet.sent_t
        decision, lag_ms, dropped = live.answered(packet, t_us, now, answer)
        if lag_ms is not None:
            lags.append(lag_ms)
        return replace(frame, decision=decision, lag_ms=lag_ms, dropped=dropped,
                       compact=live.options.compact and decision is None)


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
