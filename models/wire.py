"""The wire contract between client and server, written once — NumPy only.

Both sides import this module: the server's API layer validates against it and the client
encodes and decodes with it. ``docs/protocol.md`` shows every frame; ``models/events.py`` holds
what an event *means* (sensor geometry, tokens, gaps), this module how it travels and what the
answers are called.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

import numpy as np

# --- endpoints and media types -------------------------------------------------------------------
STREAM_PATH = "/v1/stream"
CLASSIFY_PATH = "/v1/classify"
MODELS_PATH = "/v1/models"
STATS_PATH = "/v1/stats"

MSGPACK = "application/msgpack"
MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"})

FRAME_TYPES = ("open", "events", "reset", "close")  # what a client sends on /v1/stream
LIVE_FIELDS = ("decide", "results", "realtime", "overload", "max_lag_ms")  # an open's live-sensor fields


# --- error codes ---------------------------------------------------------------------------------
class Code(StrEnum):
    """Stable error codes (``"code"`` of an error frame, ``"error"`` of an HTTP error body)."""

    MALFORMED_FRAME = "malformed_frame"  # not msgpack/JSON, or not a map
    UNKNOWN_TYPE = "unknown_type"  # "type" missing or not one of open/events/reset/close
    INVALID_FIELD = "invalid_field"  # a non-column field missing or of the wrong type/value
    MISSING_COLUMN = "missing_column"  # t, x (and y, p for 2-D sensors) required
    INVALID_COLUMN = "invalid_column"  # a column that is not integers / a bin of the right size
    LENGTH_MISMATCH = "length_mismatch"  # columns of different lengths
    ADDRESS_OUT_OF_RANGE = "address_out_of_range"  # x/y/p outside the model's sensor
    TIMESTAMPS_DECREASING = "timestamps_decreasing"  # within a packet or against the session
    PACKET_TOO_LARGE = "packet_too_large"  # more events than --max-packet-events
    UNKNOWN_MODEL = "unknown_model"
    SERVER_FULL = "server_full"  # --max-sessions reached; WebSocket closed with 1013
    TOO_MANY_SESSIONS = "too_many_sessions"  # --max-sessions-per-client reached; closed with 1013
    NO_SESSION = "no_session"  # events/reset/close before open
    SESSION_ALREADY_OPEN = "session_already_open"  # open twice on one connection
    UNKNOWN_SESSION = "unknown_session"  # resume token unknown or its session expired
    SESSION_EXPIRED = "session_expired"  # the session was evicted after the idle timeout
    SESSION_RESUMED_ELSEWHERE = "session_resumed_elsewhere"  # another connection resumed it
    NOT_READY = "not_ready"  # models still loading/compiling; WebSocket closed with 1013
    DRAINING = "draining"  # shutting down; WebSocket closed with 1012
    SNAPSHOT_INCOMPATIBLE = "snapshot_incompatible"  # resume: the snapshot is for other weights
    STORE_UNAVAILABLE = "store_unavailable"  # resume: the snapshot store cannot be reached; retry
    NON_FINITE_OUTPUT = "non_finite_output"  # the model's answer is NaN or infinite: never sent
    INTERNAL_ERROR = "internal_error"
    # HTTP only
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    REQUEST_TOO_LARGE = "request_too_large"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNAUTHORIZED = "unauthorized"  # no or a wrong API key (HTTP 401; WebSocket closed with 1008)
    BUSY = "busy"  # --max-classify-requests at work, or --max-connections open: 503 with Retry-After
    REQUEST_TIMEOUT = "request_timeout"  # the body took longer than --body-timeout: 408


# The HTTP status of each code an HTTP endpoint answers with; every other code is a 400.
HTTP_STATUS: dict[Code, int] = {
    Code.UNKNOWN_MODEL: 404, Code.NOT_FOUND: 404, Code.METHOD_NOT_ALLOWED: 405,
    Code.REQUEST_TOO_LARGE: 413, Code.PACKET_TOO_LARGE: 413, Code.UNSUPPORTED_MEDIA_TYPE: 415,
    Code.NOT_READY: 503, Code.DRAINING: 503, Code.INTERNAL_ERROR: 500, Code.UNAUTHORIZED: 401,
    Code.BUSY: 503, Code.REQUEST_TIMEOUT: 408, Code.NON_FINITE_OUTPUT: 422,
}


def http_status(code: Code | str) -> int:
    """The HTTP status an error body with ``code`` goes out with."""
    try:
        return HTTP_STATUS.get(Code(code), 400)
    except ValueError:  # not a code of the contract
        return 400


TOP_K_MAX = 1000  # ``top_k`` of an open frame or a classify body: an integer in 0..TOP_K_MAX
MAX_MESSAGE = 400  # characters of an error message: a reply never grows with the bad input


def cap_message(message: str) -> str:
    """``message`` cut to :data:`MAX_MESSAGE` characters."""
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 3] + "..."


# WebSocket close codes (RFC 6455 section 7.4 and the IANA registry).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # end of a drain
CLOSE_POLICY_VIOLATION = 1008  # no or a wrong API key, a browser origin not allowed, no open in time
CLOSE_SERVICE_RESTART = 1012  # refused while draining: reconnect (elsewhere) later
CLOSE_TRY_AGAIN_LATER = 1013  # server_full / not_ready: retry later


# --- answers -------------------------------------------------------------------------------------
def class_order(probs: np.ndarray) -> np.ndarray:
    """Class indices by falling probability, ties by class index: int32 [..., C] of probs
    [..., C]. The order of ``top`` in every answer (streamed, restored or classified)."""
    return np.argsort(-np.asarray(probs), axis=-1, kind="stable").astype(np.int32, copy=False)


# --- event columns -------------------------------------------------------------------------------
# Each column's type, little-endian as a msgpack bin: t microseconds, x/y addresses, p polarity.
# Recordings in memory (models.data, the client's sources) use the same types.
COLUMN_DTYPES: dict[str, np.dtype] = {
    "t": np.dtype("<i8"),
    "x": np.dtype("<u2"),
    "y": np.dtype("<u2"),
    "p": np.dtype("u1"),
}

# The packed record layout t64 x16 y16 on8 (key ``records``): 13 bytes, little-endian, no padding,
# as event-camera tools (faery, AEStream) stream it over UDP.
RECORD_DTYPE = np.dtype([("t", "<u8"), ("x", "<u2"), ("y", "<u2"), ("on", "u1")])
assert RECORD_DTYPE.itemsize == 13


# --- frames the server sends -----------------------------------------------------------------------
# One frozen dataclass per frame: ``to_wire()`` is the map that goes out (its keys in the order the
# contract shows them, so the bytes never change), ``from_wire()`` reads one back and raises
# :class:`FrameError` naming what is wrong. ``docs/protocol.md`` shows each with an example.
class FrameError(ValueError):
    """A frame that does not hold what its type promises."""


def _int(msg: Mapping[str, Any], key: str) -> int:
    """An integer field; missing or null reads 0 (as every reader of the contract has)."""
    value = msg.get(key)
    return 0 if value is None else int(value)


def _counts(value: Any) -> dict[str, int] | None:
    """A map of integers (``filters``, ``filtered``), or None."""
    return None if value is None else {str(k): int(v) for k, v in dict(value).items()}


def _opt_int(msg: Mapping[str, Any], key: str) -> int | None:
    value = msg.get(key)
    return None if value is None else int(value)


def _check_type(cls_type: str, msg: Mapping[str, Any]) -> None:
    if msg.get("type") != cls_type:
        raise FrameError(f"expected {cls_type!r}, got {msg.get('type')!r}")


def _read(kind: str, msg: Mapping[str, Any], build: Any) -> Any:
    """``build()``, with what a malformed field raises turned into a :class:`FrameError`."""
    try:
        return build()
    except FrameError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise FrameError(f"malformed {kind} frame: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Opened:
    """``opened``: the session is open (or resumed, or restored from a snapshot). ``durable``:
    events sent its last snapshot covers (None: no snapshots kept); ``geometry``/``cropped`` only
    for a session that declared its source sensor; ``filters`` (the active input filters'
    parameters) and ``filtered`` (the events each removed from the stream so far, not in
    ``events``) only for a session that declared filters; ``live`` (its ``decide``, ``results``,
    ``realtime``, ``overload`` and ``max_lag_ms`` as ``open`` fields, sent at the top level)
    only for a session that declared any of them."""

    TYPE: ClassVar[str] = "opened"
    session: str
    resume: str | None
    resumed: bool
    restored: bool
    events: int
    t: int | None
    durable: int | None
    top_k: int
    model: dict[str, Any]
    geometry: dict[str, Any] | None = None
    cropped: int | None = None
    window: dict[str, Any] | None = None  # only for a windowed session: its window and ``lanes``
    filters: dict[str, int] | None = None
    filtered: dict[str, int] | None = None
    live: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "session": self.session, "resume": self.resume,
                               "resumed": self.resumed, "restored": self.restored, "events": self.events,
                               "t": self.t, "durable": self.durable, "top_k": self.top_k, "model": self.model}
        if self.geometry is not None:
            out.update(geometry=self.geometry, cropped=self.cropped)
        if self.window is not None:
            out["window"] = self.window
        if self.filters is not None:
            out.update(filters=self.filters, filtered=self.filtered)
        if self.live:
            out.update(self.live)
        return out

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> Opened:
        _check_type(cls.TYPE, msg)
        model, geometry = msg.get("model"), msg.get("geometry")
        return _read(cls.TYPE, msg, lambda: cls(
            session=str(msg.get("session", "")), resume=None if msg.get("resume") is None else str(msg["resume"]),
            resumed=bool(msg.get("resumed", False)), restored=bool(msg.get("restored", False)),
            events=_int(msg, "events"), t=_opt_int(msg, "t"), durable=_opt_int(msg, "durable"),
            top_k=_int(msg, "top_k"), model=dict(model) if isinstance(model, Mapping) else {},
            geometry=dict(geometry) if isinstance(geometry, Mapping) else None, cropped=_opt_int(msg, "cropped"),
            window=dict(msg["window"]) if isinstance(msg.get("window"), Mapping) else None,
            filters=_counts(msg.get("filters")), filtered=_counts(msg.get("filtered")),
            live={k: msg[k] for k in LIVE_FIELDS if k in msg} or None))


def _probs(value: Any) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):  # tolerated as float32 bin, though the contract says list
        return np.frombuffer(value, dtype="<f4").astype(float).tolist()
    return [float(v) for v in value]


@dataclass(frozen=True, slots=True)
class Decided:
    """A result's ``decision``: the top class changed to ``label`` and held (``prob`` and stream
    time ``t`` µs of the answer that completed it); sent once per change."""

    label: Any
    prob: float
    t: int

    def to_wire(self) -> dict[str, Any]:
        return {"label": self.label, "prob": self.prob, "t": self.t}

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> Decided:
        return cls(label=msg["label"], prob=float(msg["prob"]), t=int(msg["t"]))


@dataclass(frozen=True, slots=True)
class Dropped:
    """A result's ``dropped``: its packet was dropped unstepped (``overload: "drop"``); the
    session's totals of dropped packets and events, this one included."""

    packets: int
    events: int

    def to_wire(self) -> dict[str, int]:
        return {"packets": self.packets, "events": self.events}

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> Dropped:
        return cls(packets=int(msg["packets"]), events=int(msg["events"]))


@dataclass(frozen=True, slots=True)
class ResultFrame:
    """``result``: the answer to packet ``seq``. ``events``/``t``: the session's count and last
    timestamp after it; ``probs`` None (and ``top`` empty) until the model has a complete output
    window; ``top``: ``[label, probability]`` pairs by :func:`class_order`. ``cropped`` only for a
    session that declared its source sensor, ``durable`` only when the server keeps snapshots.
    ``window`` only for a windowed session once it has events: the events the answer covers,
    ``{"t0": first event's time, "events": count}``. ``filtered`` (events each input filter removed
    from this packet: ``refractory``, ``denoise``, ``max_rate``) only for a session that declared
    filters. ``decision`` when a ``decide`` session's class changed; ``lag_ms`` for a ``realtime`` session;
    ``dropped`` when the packet was dropped unstepped; ``compact``: ``probs``/``top`` left out
    (``results: "compact"``, a result without a decision; read back as None and [])."""

    TYPE: ClassVar[str] = "result"
    seq: int | None
    events: int
    t: int | None
    probs: list[float] | None
    top: list[list[Any]]
    cropped: int | None = None
    durable: int | None = None
    window: dict[str, int] | None = None
    filtered: dict[str, int] | None = None
    decision: Decided | None = None
    lag_ms: float | None = None
    dropped: Dropped | None = None
    compact: bool = False

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "seq": self.seq, "events": self.events, "t": self.t}
        if not self.compact:
            out.update(probs=self.probs, top=self.top)
        if self.cropped is not None:
            out["cropped"] = self.cropped
        if self.durable is not None:
            out["durable"] = self.durable
        if self.window is not None:
            out["window"] = self.window
        if self.filtered is not None:
            out["filtered"] = self.filtered
        if self.decision is not None:
            out["decision"] = self.decision.to_wire()
        if self.lag_ms is not None:
            out["lag_ms"] = self.lag_ms
        if self.dropped is not None:
            out["dropped"] = self.dropped.to_wire()
        return out

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> ResultFrame:
        return _read(cls.TYPE, msg, lambda: cls(
            seq=None if msg["seq"] is None else int(msg["seq"]), events=_int(msg, "events"), t=_opt_int(msg, "t"),
            probs=_probs(msg.get("probs")),
            top=[[entry[0], float(entry[1])] for entry in (msg.get("top") or [])],
            cropped=_opt_int(msg, "cropped"), durable=_opt_int(msg, "durable"), window=_window(msg),
            filtered=_counts(msg.get("filtered")),
            decision=None if msg.get("decision") is None else Decided.from_wire(msg["decision"]),
            lag_ms=None if msg.get("lag_ms") is None else float(msg["lag_ms"]),
            dropped=None if msg.get("dropped") is None else Dropped.from_wire(msg["dropped"]),
            compact="probs" not in msg))


def _window(msg: Mapping[str, Any]) -> dict[str, int] | None:
    """A result's ``window`` (``{"t0", "events"}``), None when absent."""
    w = msg.get("window")
    if w is None:
        return None
    return {"t0": int(w["t0"]), "events": int(w["events"])}


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """``error``: a frame (``seq``, when it had one) or the session failed; ``code`` a :class:`Code`."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    seq: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "seq": self.seq, "code": str(self.code), "message": cap_message(self.message)}

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> ErrorFrame:
        _check_type(cls.TYPE, msg)
        return _read(cls.TYPE, msg, lambda: cls(code=str(msg.get("code", "")), message=str(msg.get("message", "")),
                                                seq=_opt_int(msg, "seq")))


@dataclass(frozen=True, slots=True)
class ResetDone:
    """``reset_done``: the session's state is zeroed; it counts ``events`` (0) again."""

    TYPE: ClassVar[str] = "reset_done"
    session: str
    events: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "session": self.session, "events": self.events}

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> ResetDone:
        _check_type(cls.TYPE, msg)
        return _read(cls.TYPE, msg, lambda: cls(session=str(msg.get("session", "")), events=_int(msg, "events")))


@dataclass(frozen=True, slots=True)
class Closed:
    """``closed``: the session ended after ``events`` events; everything before was answered."""

    TYPE: ClassVar[str] = "closed"
    session: str
    events: int

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "session": self.session, "events": self.events}

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> Closed:
        _check_type(cls.TYPE, msg)
        return _read(cls.TYPE, msg, lambda: cls(session=str(msg.get("session", "")), events=_int(msg, "events")))


ServerFrame = Opened | ResultFrame | ErrorFrame | ResetDone | Closed  # what the server sends on /v1/stream
SERVER_FRAMES: tuple[type[ServerFrame], ...] = (Opened, ResultFrame, ErrorFrame, ResetDone, Closed)


# --- HTTP bodies -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HttpError:
    """The JSON body of every HTTP error: ``{"error": CODE, "message": TEXT}``, sent with
    :attr:`status` (:data:`HTTP_STATUS`; a 400 for the codes it does not list)."""

    code: str
    message: str

    @property
    def status(self) -> int:
        return http_status(self.code)

    def to_wire(self) -> dict[str, Any]:
        return {"error": str(self.code), "message": cap_message(self.message)}

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> HttpError:
        return _read("HTTP error", body, lambda: cls(code=str(body["error"]), message=str(body.get("message", ""))))


@dataclass(frozen=True, slots=True)
class Classified:
    """One recording's answer in a classify reply: as a stream's last ``result``, plus ``label``;
    ``filtered``: the events each input filter removed from the whole recording."""

    probs: list[float] | None
    label: Any
    events: int
    t: int | None
    top: list[list[Any]]
    cropped: int | None = None
    window: dict[str, int] | None = None  # a request with ``window``: the events answered for
    filtered: dict[str, int] | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"probs": self.probs, "label": self.label, "events": self.events, "t": self.t,
                               "top": self.top}
        if self.cropped is not None:
            out["cropped"] = self.cropped
        if self.window is not None:
            out["window"] = self.window
        if self.filtered is not None:
            out["filtered"] = self.filtered
        return out

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> Classified:
        return _read("classify result", msg, lambda: cls(
            probs=_probs(msg.get("probs")), label=msg.get("label"), events=_int(msg, "events"), t=_opt_int(msg, "t"),
            top=[[entry[0], float(entry[1])] for entry in (msg.get("top") or [])], cropped=_opt_int(msg, "cropped"),
            window=_window(msg), filtered=_counts(msg.get("filtered"))))


@dataclass(frozen=True, slots=True)
class ClassifyReply:
    """The body of a ``POST /v1/classify`` answer: the model and one :class:`Classified` per stream."""

    model: str
    results: list[Classified]

    def to_wire(self) -> dict[str, Any]:
        return {"model": self.model, "results": [r.to_wire() for r in self.results]}

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> ClassifyReply:
        return _read("classify reply", body, lambda: cls(
            model=str(body["model"]), results=[Classified.from_wire(r) for r in body["results"]]))
