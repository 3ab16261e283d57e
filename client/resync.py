"""The resync policy of a streaming session: how long to keep reconnecting after a drop, and what to
send on the new connection so the server's state ends exactly where the client's stream is.

The decisions are the ledger's (:meth:`ReplayLedger.plan`); this module carries them out on the
socket: a ``reset`` where the plan says so, the kept packets merged into larger ones (by the
streaming invariant they give the same state; their answers are dropped), then the window.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from .errors import ClientCode, ProtocolError, SessionExpired
from .ledger import ReplayLedger, Sent
from .protocol import Result, SessionInfo, decode_frame, encode_message
from .window import InFlight, ResultQueue

_EMPTY_COLUMNS = {"t": b"", "x": b""}


@dataclass(frozen=True)
class Resume:
    """One re-attachment of a session after its connection dropped.

    ``events`` is the server's count for the session when it re-attached (events sent: kept,
    cropped by a declared geometry or removed by its input filters, ``filtered`` of them once the
    replay is done); ``restored`` says it came from a snapshot (the server had
    restarted, or another replica took the session over); ``new_session`` that the session was
    gone and a new one was opened to replay the stream from its start. ``replayed`` events had
    been answered before and were sent again (the part the snapshot did not cover); ``resent``
    packets were in flight and sent again.
    """

    at: float  # Unix time
    events: int
    restored: bool
    new_session: bool
    replayed: int
    resent: int
    filtered: int = 0


class Retries:
    """Reconnect attempts after one drop: the first at once, then pauses doubling from
    ``backoff[0]`` to ``backoff[1]`` seconds, for ``max_attempts`` attempts or, when ``timeout``
    is set, for ``timeout`` seconds from the drop."""

    def __init__(self, max_attempts: int, timeout: float | None, backoff: tuple[float, float]) -> None:
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.delay, self.largest = backoff
        self.started = time.monotonic()
        self.attempt = 0

    def left(self) -> float:
        """Seconds left to try (infinite when attempts are counted instead)."""
        if self.timeout is None:
            return math.inf
        return self.timeout - (time.monotonic() - self.started)

    def allowed(self) -> bool:
        if self.attempt == 0:
            return True
        if self.timeout is None:
            return self.attempt < self.max_attempts
        return self.left() > 0

    async def pause(self) -> None:
        await asyncio.sleep(self.delay if self.timeout is None else min(self.delay, max(self.left(), 0.0)))
        self.delay = min(self.delay * 2, self.largest)

    def describe(self) -> str:
        if self.timeout is None:
            return f"{self.attempt} reconnect attempts"
        return f"{self.attempt} reconnect attempts in {time.monotonic() - self.started:.0f} s"


def lost_result(entry: Sent, events: int) -> Result:
    """The answer of a packet the server processed but whose answer was lost."""
    return Result(seq=entry.seq, events=events, t=None, probs=None, top=[],
                  latency_s=time.perf_counter() - entry.sent_at, lost=True)


def merge_packets(entries: Sequence[Sent], limit: int) -> list[tuple[int, bytes, int]]:
    """``(seq, frame, events)`` of packets that carry ``entries``' events in order, merging
    neighbours up to ``limit`` events (a larger packet stays whole); a merged packet takes its last
    packet's ``seq``."""
    out: list[tuple[int, bytes, int]] = []
    group: list[Sent] = []
    size = 0

    def flush() -> None:
        messages = [msgpack.unpackb(e.frame) for e in group]
        columns: dict[str, Any] = {}
        for key in messages[0]:
            if key in ("type", "seq"):
                continue
            parts = [m[key] for m in messages]
            columns[key] = (b"".join(parts) if isinstance(parts[0], bytes)
                            else [v for part in parts for v in part])
        seq = group[-1].seq
        out.append((seq, msgpack.packb({"type": "events", "seq": seq, **columns}), size))

    for entry in entries:
        if group and size + entry.n > limit:
            flush()
            group, size = [], 0
        group.append(entry)
        size += entry.n
    if group:
        flush()
    return out


async def replay(ws: ClientConnection, entries: Sequence[Sent], ledger: ReplayLedger, *,
                 max_in_flight: int, packet_events: int, filtered: int = 0) -> tuple[int, int]:
    """Send answered packets again, merged into packets of at most ``packet_events`` events,
    within the in-flight window, and drop their answers. Runs before anything else is sent on the
    new connection. ``filtered``: events the session's input filters had removed before. Returns
    the events sent and the events the filters had removed after the replay."""
    chunks = merge_packets(entries, packet_events)
    ends = ledger.replay_ends([n for _, _, n in chunks])
    sent = answered = 0
    while answered < len(chunks):
        while sent < len(chunks) and sent - answered < max_in_flight:
            await ws.send(chunks[sent][1])
            sent += 1
        msg = decode_frame(await ws.recv())
        if msg["type"] == "result":
            filtered += sum(int(v) for v in (msg.get("filtered") or {}).values())
            count = int(msg.get("events") or 0) + int(msg.get("cropped") or 0) + filtered
            if msg.get("seq") != chunks[answered][0] or count != ends[answered]:
                raise ProtocolError(f"replayed packet {chunks[answered][0]} answered as "
                                    f"{msg.get('seq')} at {count} events, expected {ends[answered]}")
            answered += 1
            if msg.get("durable") is not None and ledger.durable is not None:
                ledger.note_durable(int(msg["durable"]))
        elif msg["type"] == "error":
            raise SessionExpired(ClientCode.RESUME_MISMATCH, "the server refused a replayed packet: "
                                 f"{msg.get('code')}: {msg.get('message')}")
        elif msg["type"] == "reset_done":
            ledger.reset_confirmed()
    return sum(e.n for e in entries), filtered


async def resync(ws: ClientConnection, info: SessionInfo, *, fresh: bool, ledger: ReplayLedger,
                 window: InFlight, results: ResultQueue, replay_packet_events: int) -> Resume:
    """Bring the server's session (``info``, on ``ws``) to the client's stream: the plan's reset
    and replay, then the window. Of the window's packets the server processed, the answers are
    lost, except the last one's, which is the session's current state: an empty packet with the
    same ``seq`` asks for it."""
    plan = ledger.plan(info.sent, restored=info.restored, fresh=fresh, window=window.sizes)
    if plan.reset:
        await ws.send(encode_message("reset"))
    replayed, filtered = 0, 0 if plan.reset else info.filtered
    if plan.replay:
        replayed, filtered = await replay(ws, plan.replay, ledger, max_in_flight=window.limit,
                                          packet_events=replay_packet_events, filtered=filtered)
    processed = window.take(plan.processed)
    for i, entry in enumerate(processed):
        ledger.processed(entry)
        if i < len(processed) - 1:
            results.append(lost_result(entry, ledger.acked))
        else:
            frame = msgpack.packb({"type": "events", "seq": entry.seq, **_EMPTY_COLUMNS})
            window.push_front(Sent(entry.seq, frame, 0, entry.sent_at, recovering=True))
    ledger.finish(info.durable, restarted=plan.restarted)
    for entry in window:
        try:
            await ws.send(entry.frame)
        except ConnectionClosed:
            break  # the reader sees the drop and resyncs again
    return Resume(at=time.time(), events=info.sent, restored=info.restored,
                  new_session=fresh, replayed=replayed, resent=len(window), filtered=filtered)
