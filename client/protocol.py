"""The client's side of the wire contract (``evssm.models.wire``): msgpack frames, event columns, replies.

Event columns go out as msgpack ``bin`` of little-endian ``int64`` (t, microseconds), ``uint16``
(x, y) and ``uint8`` (p) by default: one memory copy per column, no per-integer encoding, which is
what keeps a small sensor-side board fast. ``binary=False`` sends plain integer arrays instead
(readable when debugging). ``y``/``p`` are left out when the recording has none (1-D sensors).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgpack
import numpy as np

from evssm.models.events import Recording, SensorSpec
from evssm.models.wire import (
    CLASSIFY_PATH,
    COLUMN_DTYPES,
    MODELS_PATH,
    STATS_PATH,
    STREAM_PATH,
    Decided,
    Dropped,
    FrameError,
    Opened,
    ResultFrame,
)

from .errors import ProtocolError


def _column_bytes(name: str, values: np.ndarray) -> np.ndarray:
    """``values`` as the column's wire type; refuses values it cannot hold (a cast would wrap)."""
    dtype = COLUMN_DTYPES[name]
    arr = np.asarray(values)
    if arr.dtype != dtype and arr.size:
        hi = int(np.iinfo(dtype).max)
        lo_v, hi_v = arr.min(), arr.max()
        if lo_v < 0 or hi_v > hi:
            bad = lo_v if lo_v < 0 else hi_v
            raise ValueError(f"column {name} holds {bad}, outside the wire range 0..{hi}")
    return np.ascontiguousarray(arr, dtype=dtype)


def event_columns(rec: Recording, *, binary: bool = True) -> dict[str, Any]:
    """The ``t``/``x``/``y``/``p`` columns of ``rec`` as msgpack-ready values.

    Raises ``ValueError`` if the columns differ in length or hold values the wire types cannot.
    """
    n = len(rec)
    t = np.ascontiguousarray(rec.t, dtype=COLUMN_DTYPES["t"])
    cols: dict[str, np.ndarray] = {"t": t}
    for name in ("x", "y", "p"):
        values = getattr(rec, name)
        if values is None:
            continue
        if len(values) != n:
            raise ValueError(f"column {name} has {len(values)} events, t has {n}")
        cols[name] = _column_bytes(name, values)
    if binary:
        return {k: v.tobytes() for k, v in cols.items()}
    return {k: v.tolist() for k, v in cols.items()}


def encode_events(seq: int, rec: Recording, *, binary: bool = True) -> bytes:
    """An ``events`` frame for packet ``seq``."""
    return msgpack.packb({"type": "events", "seq": seq, **event_columns(rec, binary=binary)})


def encode_message(msg_type: str, **fields: Any) -> bytes:
    """A control frame (``open``, ``reset``, ``close``); ``None`` fields are left out."""
    return msgpack.packb({"type": msg_type, **{k: v for k, v in fields.items() if v is not None}})


def sensor_declaration(sensor: SensorSpec) -> dict[str, int]:
    """The ``sensor`` a client declares for its source: ``{"width", "height"}`` or
    ``{"channels"}``."""
    if sensor.kind == "1d":
        return {"channels": sensor.channels}
    return {"width": sensor.width, "height": sensor.height}


def decode_frame(frame: bytes | str) -> dict[str, Any]:
    """Decode a server frame (msgpack binary, or JSON text) into a dict."""
    try:
        msg = json.loads(frame) if isinstance(frame, str) else msgpack.unpackb(frame, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"undecodable frame from the server: {exc}") from exc
    if not isinstance(msg, dict) or "type" not in msg:
        raise ProtocolError(f"server frame is not a typed message: {str(msg)[:200]}")
    return msg


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about the model behind a session (the ``model`` of ``opened``)."""

    name: str
    classes: tuple[str, ...]
    sensor: SensorSpec | None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ModelInfo:
        d = dict(d or {})
        sensor = d.get("sensor")
        try:
            spec = SensorSpec.from_dict(dict(sensor)) if isinstance(sensor, Mapping) else None
        except (TypeError, ValueError):
            spec = None
        classes = d.get("classes") or d.get("labels") or ()
        if isinstance(classes, int):  # a bare class count
            classes = [str(i) for i in range(classes)]
        return cls(name=str(d.get("name", "")), classes=tuple(str(c) for c in classes),
                   sensor=spec, raw=d)

    @property
    def min_events(self) -> int | None:
        """Events before the model's first answer (its downsampling); None when not told."""
        n = self.raw.get("downsampling")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None

    def too_few_events(self) -> str:
        """Why a recording got no answer: ``too few events for an answer (the model needs 64)``."""
        return "too few events for an answer" + (f" (the model needs {self.min_events})"
                                                 if self.min_events else "")


@dataclass(frozen=True)
class SessionInfo:
    """The server's ``opened`` reply: session id, resume token, events so far, model, and — when
    the session declared a source sensor — the resolved ``geometry`` and events ``cropped``.

    ``restored``: the session was resumed from a snapshot (the server had restarted, or another
    replica held it). ``durable``: the events sent (kept, cropped and filtered) its last snapshot
    covers; None when the server keeps no snapshots. ``filters``: the session's input filters
    (None: none), ``filtered``: events they removed from the stream so far (not in ``events``).
    ``live``: the live-sensor fields the session declared (``decide``, ``results``, ``realtime``,
    ``overload``, ``max_lag_ms``; None: none), as the server holds them.
    """

    session: str
    resume: str | None
    events: int
    model: ModelInfo
    cropped: int = 0
    geometry: dict[str, Any] | None = None
    restored: bool = False
    durable: int | None = None
    window: dict[str, Any] | None = None  # a windowed session's window, with its ``lanes``
    filters: dict[str, int] | None = None
    filtered: int = 0
    live: dict[str, Any] | None = None

    @property
    def sent(self) -> int:
        """Events of the stream the server holds: kept, cropped and filtered."""
        return self.events + self.cropped + self.filtered

    @classmethod
    def from_message(cls, msg: Mapping[str, Any]) -> SessionInfo:
        """Read an ``opened`` frame (:class:`~evssm.models.wire.Opened`)."""
        try:
            frame = Opened.from_wire(msg)
        except FrameError as exc:
            raise ProtocolError(str(exc)) from exc
        return cls(session=frame.session, resume=frame.resume, events=frame.events,
                   model=ModelInfo.from_dict(frame.model), cropped=frame.cropped or 0, geometry=frame.geometry,
                   restored=frame.restored, durable=frame.durable, window=frame.window,
                   filters=frame.filters, filtered=sum((frame.filtered or {}).values()), live=frame.live)


@dataclass(frozen=True)
class Result:
    """The server's answer to one packet.

    ``events`` is the session's total event count after the packet, ``t`` its last timestamp;
    ``cropped`` counts the events a declared crop removed (they are not in ``events``).
    ``probs`` is None while the network has no complete output window yet. ``latency_s`` is
    measured by the client from the packet's first send to the answer's arrival. ``lost`` marks a
    packet the server processed but whose answer was lost with a dropped connection (its
    ``probs``/``top`` are then unknown, not resent: resending would process the events twice).
    ``durable`` is the event count covered by the session's last snapshot when the server answered
    (None: the server keeps no snapshots). ``window``: for a windowed session, the events the
    answer covers, ``{"t0", "events"}``. ``filtered``: the events each input filter removed
    from this packet (None: the session has no filters).
    ``decision``: the class changed (a ``decide`` session);
    ``lag_ms``: how far the answer trails the sensor (a ``realtime`` session); ``dropped``: the
    packet was dropped unstepped, with the session's totals (``overload: "drop"``).
    ``probs``/``top`` are None/empty in a compact result without a decision.
    """

    seq: int
    events: int
    t: int | None
    probs: list[float] | None
    top: list[tuple[Any, float]]
    latency_s: float = 0.0
    lost: bool = False
    cropped: int = 0
    durable: int | None = None
    window: dict[str, int] | None = None
    filtered: dict[str, int] | None = None
    decision: Decided | None = None
    lag_ms: float | None = None
    dropped: Dropped | None = None

    @property
    def label(self) -> Any:
        """The most probable class (as the server names it), or None without a prediction."""
        return self.top[0][0] if self.top else None

    @classmethod
    def from_message(cls, msg: Mapping[str, Any], latency_s: float = 0.0) -> Result:
        """Read a ``result`` frame (:class:`~evssm.models.wire.ResultFrame`)."""
        try:
            frame = ResultFrame.from_wire(msg)
        except FrameError as exc:
            raise ProtocolError(str(exc)) from exc
        if frame.seq is None:  # the client numbers every packet it sends
            raise ProtocolError("malformed result frame: its seq is null")
        return cls(seq=frame.seq, events=frame.events, t=frame.t, probs=frame.probs,
                   top=[(label, p) for label, p in frame.top], latency_s=latency_s, cropped=frame.cropped or 0,
                   durable=frame.durable, window=frame.window, filtered=frame.filtered,
                   decision=frame.decision, lag_ms=frame.lag_ms, dropped=frame.dropped)

    @property
    def removed(self) -> int:
        """Events the input filters removed from this packet."""
        return sum((self.filtered or {}).values())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seq": self.seq, "events": self.events, "t": self.t, "probs": self.probs,
                               "top": [[label, p] for label, p in self.top],
                               "latency_ms": self.latency_s * 1e3, "lost": self.lost, "cropped": self.cropped,
                               "durable": self.durable, "window": self.window,
                               "decision": None if self.decision is None else self.decision.to_wire(),
                               "lag_ms": self.lag_ms,
                               "dropped": None if self.dropped is None else self.dropped.to_wire()}
        if self.filtered is not None:
            out["filtered"] = self.filtered
        return out


def endpoint_url(url: str, kind: str) -> str:
    """The full URL of an endpoint from a base ``url`` given as ``ws://``, ``http://`` or bare
    ``HOST:PORT``.

    ``kind``: ``"stream"`` (a ``ws``/``wss`` URL, path ``/v1/stream`` unless ``url`` has a path),
    ``"classify"``, ``"models"``, ``"stats"`` or ``"base"`` (``http``/``https``; a path in ``url`` is dropped,
    so the same ``--url`` works for both protocols).
    """
    if "://" not in url:
        url = "ws://" + url if kind == "stream" else "http://" + url
    parts = urlsplit(url)
    secure = parts.scheme in ("wss", "https")
    if parts.scheme not in ("ws", "wss", "http", "https"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {url!r}")
    if kind == "stream":
        scheme = "wss" if secure else "ws"
        path = parts.path if parts.path not in ("", "/") else STREAM_PATH
        return urlunsplit((scheme, parts.netloc, path, parts.query, ""))
    scheme = "https" if secure else "http"
    path = {"classify": CLASSIFY_PATH, "models": MODELS_PATH, "stats": STATS_PATH, "base": ""}[kind]
    return urlunsplit((scheme, parts.netloc, path, "", ""))


API_KEY_ENV = "EVSSM_API_KEY"


def auth_headers(api_key: str | None = None) -> dict[str, str]:
    """``Authorization: Bearer KEY`` for ``api_key`` (None: the ``EVSSM_API_KEY`` variable);
    no header when neither is set."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}
