"""Wire protocol of the inference server: frames, event columns, error codes (no JAX).

Everything a client can send is decoded and validated here, so that bad input is rejected with a
stable error code *before* it reaches the engine (a rejected packet never touches session state).
The contract's codes, column types and record layout are ``evssm.models.wire`` (shared with the
client); ``docs/protocol.md`` has an example of every frame.

Event columns come in three encodings:

- msgpack/JSON arrays of integers;
- msgpack ``bin`` of little-endian ``int64`` (``t``, microseconds), ``uint16`` (``x``, ``y``),
  ``uint8`` (``p``);
- one ``bin`` of packed 13-byte records ``t64 x16 y16 on8`` (key ``records``), the layout
  event-camera tools (faery, AEStream) stream over UDP. For a 1-D sensor ``x`` is the channel and
  ``y``/``on`` are ignored.

A client may declare its source sensor and a transform (``sensor``/``transform`` of ``open`` or of
a classify request); :func:`parse_geometry` turns them into an adapter and :func:`adapt` maps a
packet's decoded events onto the model's sensor before :func:`prepare` tokenises them (the
mathematics is in ``evssm.models.geometry``).

Over 400 lines on purpose: everything a client can send, stream or classify, is validated in this
one module, so one field gets one error message and one code wherever it comes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from evssm.models import native_build
from evssm.models.events import EventError, SensorSpec, time_gaps, tokenize
from evssm.models.filters import FilterBank, FilterError, FilterState
from evssm.models.geometry import Adapter, GeometryError, adapter_for
from evssm.models.wire import COLUMN_DTYPES, FRAME_TYPES, RECORD_DTYPE, TOP_K_MAX, Code

from ..live.filtering import Filtered, filter_packet, parse_filters
from ..live.windows import WindowError, WindowSpec
from .windows import window_suffix


class ProtocolError(Exception):
    """A request the server rejects; becomes an error frame or a 4xx JSON body."""

    def __init__(self, code: Code, message: str, seq: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.seq = seq

    def __reduce__(self) -> tuple[Any, ...]:  # raised in a decode worker process, re-raised here
        return (ProtocolError, (self.code, self.message, self.seq))


# --- frames --------------------------------------------------------------------------------------
def decode_frame(data: bytes | str) -> dict[str, Any]:
    """Decode one WebSocket frame: ``bytes`` are msgpack, ``str`` is JSON. Returns the map."""
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            msg = msgpack.unpackb(data, raw=False)
        else:
            msg = json.loads(data)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        kind = "msgpack" if isinstance(data, (bytes, bytearray, memoryview)) else "JSON"
        raise ProtocolError(Code.MALFORMED_FRAME,
                            f"frame is not valid {kind}: {type(e).__name__} {e}".rstrip()) from None
    if not isinstance(msg, dict):
        raise ProtocolError(Code.MALFORMED_FRAME, f"frame must be a map, got {type(msg).__name__}")
    return msg


def frame_type(msg: dict[str, Any]) -> str:
    """The frame's ``type``; ``unknown_type`` unless it is one of :data:`FRAME_TYPES`."""
    kind = msg.get("type")
    if kind not in FRAME_TYPES:
        raise ProtocolError(Code.UNKNOWN_TYPE,
                            f"type must be one of {list(FRAME_TYPES)}, got {shorten(kind)}", _seq_or_none(msg))
    return kind


def encode_frame(frame: dict[str, Any], binary: bool) -> bytes | str:
    """Encode an outgoing frame as msgpack (``binary``) or JSON text."""
    if binary:
        return msgpack.packb(frame, use_bin_type=True)
    return json.dumps(frame, separators=(",", ":"))


MAX_ECHO = 60  # characters of a client's value quoted in a message


def shorten(value: Any, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` cut to ``limit`` characters: how an error message quotes a client's value."""
    if isinstance(value, (str, bytes, bytearray)) and len(value) > 4 * limit:
        value = value[:4 * limit]  # repr of a huge value is never built
    elif isinstance(value, (list, tuple, dict)) and len(value) > limit:
        return f"<{type(value).__name__} of {len(value)} items>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _seq_or_none(msg: dict[str, Any]) -> int | None:
    seq = msg.get("seq")
    return seq if _is_int(seq) else None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_seq(msg: dict[str, Any]) -> int | None:
    """The optional client sequence number of a frame (echoed in the reply)."""
    seq = msg.get("seq")
    if seq is None or _is_int(seq):
        return seq
    raise ProtocolError(Code.INVALID_FIELD, f"seq must be an integer, got {type(seq).__name__}")


@dataclass(frozen=True)
class OpenRequest:
    model: str | None
    resume: str | None
    top_k: int


def parse_open(msg: dict[str, Any], default_top_k: int = 3, max_top_k: int = TOP_K_MAX) -> OpenRequest:
    """Validate an ``open`` frame's fields (``model``, ``resume``, ``top_k``; all optional)."""
    model, resume, top_k = msg.get("model"), msg.get("resume"), msg.get("top_k", default_top_k)
    if model is not None and not isinstance(model, str):
        raise ProtocolError(Code.INVALID_FIELD, "model must be a string")
    if resume is not None and not isinstance(resume, str):
        raise ProtocolError(Code.INVALID_FIELD, "resume must be a string (a resume token)")
    if top_k is None:
        top_k = default_top_k
    if not _is_int(top_k) or not 0 <= top_k <= max_top_k:
        raise ProtocolError(Code.INVALID_FIELD, f"top_k must be an integer in 0..{max_top_k}")
    return OpenRequest(model=model, resume=resume, top_k=top_k)


# --- event columns -------------------------------------------------------------------------------
@dataclass
class Events:
    """Decoded, not yet validated event columns (views of the frame where it can): ``t`` int64
    or uint64 [N]; ``x``, ``y``, ``p`` [N] or None."""

    t: np.ndarray
    x: np.ndarray
    y: np.ndarray | None
    p: np.ndarray | None

    def __len__(self) -> int:
        return int(self.t.shape[0])


def _column(name: str, value: Any) -> np.ndarray:
    """One column from an array of integers or a little-endian ``bin``."""
    dtype = COLUMN_DTYPES[name]
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) % dtype.itemsize:
            raise ProtocolError(Code.INVALID_COLUMN,
                                f"column {name}: a bin of {len(value)} bytes is not a whole number "
                                f"of {dtype.itemsize}-byte {dtype.name} values")
        return np.frombuffer(value, dtype=dtype)
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(Code.INVALID_COLUMN,
                            f"column {name} must be an array of integers or a bin, "
                            f"got {type(value).__name__}")
    if not value:
        return np.zeros(0, np.int64)
    # Exactly int: numpy would read True as 1 and 2.0 as an integer column; bool is an int subclass.
    kinds = set(map(type, value))
    if kinds != {int}:
        names = sorted(k.__name__ for k in kinds - {int})
        raise ProtocolError(Code.INVALID_COLUMN, f"column {name} must hold integers only, found {names}")
    try:
        return np.asarray(value, dtype=np.int64)
    except OverflowError:
        raise ProtocolError(Code.INVALID_COLUMN, f"column {name} has values beyond int64") from None


def _records(value: Any, max_events: int | None) -> Events:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ProtocolError(Code.INVALID_COLUMN,
                            f"records must be a bin of packed t64 x16 y16 on8 records, "
                            f"got {type(value).__name__}")
    if len(value) % RECORD_DTYPE.itemsize:
        raise ProtocolError(Code.INVALID_COLUMN,
                            f"records: {len(value)} bytes is not a whole number of 13-byte records")
    n = len(value) // RECORD_DTYPE.itemsize
    _check_size(n, max_events)
    rec = np.frombuffer(value, dtype=RECORD_DTYPE)
    # Views, no copies; t is uint64 here (prepare rejects values beyond int64).
    return Events(t=rec["t"], x=rec["x"], y=rec["y"], p=rec["on"])


def _check_size(n: int, max_events: int | None) -> None:
    if max_events is not None and n > max_events:
        raise ProtocolError(Code.PACKET_TOO_LARGE,
                            f"packet has {n} events, more than the limit of {max_events}")


def _bin_len(name: str, value: Any) -> int | None:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value) // COLUMN_DTYPES[name].itemsize
    return len(value) if isinstance(value, (list, tuple)) else None


def decode_events(msg: dict[str, Any], sensor: SensorSpec, max_events: int | None = None) -> Events:
    """Decode the event columns of an ``events`` frame or a classify stream.

    Raises :class:`ProtocolError` with ``missing_column``, ``invalid_column``, ``length_mismatch``
    or ``packet_too_large``. Addresses and timestamps are validated by :func:`prepare`.
    """
    if "records" in msg:
        if "t" in msg:
            raise ProtocolError(Code.INVALID_FIELD, "send either columns (t, x, ...) or records, not both")
        return _records(msg["records"], max_events)
    names = ("t",) + sensor.columns
    missing = [c for c in names if c not in msg or msg[c] is None]
    if missing:
        raise ProtocolError(Code.MISSING_COLUMN,
                            f"missing column(s) {missing}; a {sensor.kind} sensor needs {list(names)}")
    # Reject an oversized packet before converting anything (cheap for bins and lists alike).
    size = _bin_len("t", msg["t"])
    if size is not None:
        _check_size(size, max_events)
    cols = {c: _column(c, msg[c]) for c in names}
    lengths = {c: int(a.shape[0]) for c, a in cols.items()}
    if len(set(lengths.values())) > 1:
        raise ProtocolError(Code.LENGTH_MISMATCH, f"columns differ in length: {lengths}")
    return Events(t=cols["t"], x=cols["x"], y=cols.get("y"), p=cols.get("p"))


# --- source geometry ------------------------------------------------------------------------------
def parse_geometry(msg: dict[str, Any], model_sensor: SensorSpec, where: str = "") -> Adapter | None:
    """The adapter a frame's ``sensor``/``transform`` declare for a model (None: nothing to map).
    Raises ``invalid_field`` for a declaration that cannot be used."""
    try:
        return adapter_for(model_sensor, msg.get("sensor"), msg.get("transform"))
    except GeometryError as e:
        raise ProtocolError(Code.INVALID_FIELD, f"{where}{e}") from None


def parse_filter_field(value: Any, source: SensorSpec, where: str = "") -> FilterBank | None:
    """The filters a frame's ``filters`` declare over the ``source`` sensor (None: none);
    ``invalid_field`` naming the field for a declaration that cannot be used."""
    try:
        return parse_filters(value, source)
    except FilterError as e:
        raise ProtocolError(Code.INVALID_FIELD, f"{where}{e}") from None


def parse_window_field(value: Any) -> WindowSpec | None:
    """The sliding window a frame's ``window`` declares (None: none); ``invalid_field`` naming
    what is wrong with a declaration that cannot be used."""
    if value is None:
        return None
    try:
        return WindowSpec.from_dict(value)
    except WindowError as e:
        raise ProtocolError(Code.INVALID_FIELD, str(e)) from None


def apply_filters(events: Events, bank: FilterBank, state: FilterState, last_t: int | None
                  ) -> tuple[Events, Filtered]:
    """``events`` (on the source sensor) less what the filters remove, and the filters' outcome;
    ``state`` advances (``Filtered.undo`` reverts it for a packet refused later)."""
    try:
        out = filter_packet(bank, state, last_t, events.t, events.x, events.y, events.p)
    except EventError as e:
        raise ProtocolError(Code(e.code), e.message) from None
    except FilterError as e:
        raise ProtocolError(Code.INVALID_COLUMN, str(e)) from None
    keep = out.keep
    if keep is None:
        return events, out
    return Events(t=events.t[keep], x=events.x[keep], y=None if events.y is None else events.y[keep],
                  p=None if events.p is None else events.p[keep]), out


def adapt(events: Events, adapter: Adapter | None) -> tuple[Events, int]:
    """``events`` on the model's sensor, and how many the crop removed.

    Addresses are checked against the declared source sensor (``address_out_of_range``). When a
    crop may remove events, the packet's timestamps are checked whole first, so a decreasing
    timestamp is reported even on an event the crop removes; removed events then never reach the
    session (its state, event count or last timestamp).
    """
    if adapter is None:
        return events, 0
    try:
        adapter.check_source(events.x, events.y, events.p)
        if adapter.crops:
            time_gaps(events.t)
    except EventError as e:
        raise ProtocolError(Code(e.code), e.message) from None
    x, y, p, keep = adapter.apply(events.x, events.y, events.p)
    t = events.t if keep is None else events.t[keep]
    return Events(t=t, x=x, y=y, p=p), len(events) - int(t.shape[0])


def check_int64(t: np.ndarray) -> None:
    """``invalid_column`` when ``t`` (uint64 from packed records) holds a time beyond int64."""
    if t.dtype == np.uint64 and t.size and t.max() > np.iinfo(np.int64).max:
        raise ProtocolError(Code.INVALID_COLUMN, "records: t beyond int64")


def check_times(t: np.ndarray, last_t: int | None) -> None:
    """The ingest's checks of a packet's times alone (``t`` int64/uint64 [N]): within int64, and
    non-decreasing from ``last_t`` (``invalid_column``, ``timestamps_decreasing``)."""
    check_int64(t)
    try:
        time_gaps(t, last_t)
    except EventError as e:
        raise ProtocolError(Code(e.code), e.message) from None


def prepare(events: Events, sensor: SensorSpec, last_t: int | None,
            tokens: np.ndarray | None = None, gaps: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Validate addresses and timestamps and tokenise; return ``(tokens int32 [N], gaps int32
    [N])``, written into ``tokens``/``gaps`` when given (a staging buffer's region: the packet
    goes there with no copy in between). With output buffers, and the native kernels' module
    loaded, one pass over the columns in C does it all (``ingest`` in
    ``models/kernels/streaming_step.cc``); it refuses what it does not take, and the NumPy
    reference below (a few whole-column operations) then validates, names the fault, or does
    the work. ``tests/test_native.py`` holds the two equal.

    ``last_t`` is the session's last accepted timestamp (None at a stream's start or after reset).
    A rejected packet raises before its ``tokens``/``gaps`` are of any use (the caller drops
    them); nothing else is written.
    """
    if tokens is not None and gaps is not None:
        fast = native_build.loaded()  # the native kernels' module, once a model has loaded it
        if fast is not None:
            two_d = sensor.kind == "2d"
            if fast.ingest(events.t, events.x, events.y if two_d else None,
                           events.p if two_d else None, sensor.width if two_d else sensor.channels,
                           sensor.height, last_t, tokens, gaps):
                return tokens, gaps
            # Invalid, or a column type it does not take: the reference below decides.
    t = events.t
    check_int64(t)
    try:
        tokens = tokenize(sensor, events.x, events.y, events.p, out=tokens)
        gaps = time_gaps(t, last_t, out=gaps)
    except EventError as e:
        raise ProtocolError(e.code, e.message) from None
    return tokens, gaps


# --- classify bodies -------------------------------------------------------------------------------
@dataclass
class ClassifyRequest:
    """A decoded, validated classify body: ``tokens``/``gaps`` int32 [n_i] per stream."""

    model: str
    top_k: int
    tokens: list[np.ndarray]
    gaps: list[np.ndarray]
    last_t: list[int | None]
    events: int  # events decoded (before a declared crop)
    cropped: list[int | None]  # per stream: events its declared crop removed (None: nothing declared)
    filtered: list[dict[str, int] | None] = field(default_factory=list)  # per stream: events each
    # filter removed (None: no filters declared)
    # With a top-level ``window``: per stream, its last window ({"t0", "events"}; None: no events).
    windows: list[dict[str, int] | None] | None = None

    def inputs(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """What the model classifies: each stream, or with a window its last window's events as a
        stream of their own (its first gap 0)."""
        if self.windows is None:
            return self.tokens, self.gaps
        tokens, gaps = [], []
        for tok, gap, w in zip(self.tokens, self.gaps, self.windows, strict=True):
            k = 0 if w is None else w["events"]
            gap = gap[gap.shape[0] - k:].copy()
            gap[:1] = 0
            tokens.append(tok[tok.shape[0] - k:])
            gaps.append(gap)
        return tokens, gaps


@dataclass(frozen=True)
class ClassifyLimits:
    max_streams: int
    max_events: int
    default_top_k: int


def parse_classify(body: bytes, is_msgpack: bool, sensors: dict[str, SensorSpec], default_model: str | None,
                   limits: ClassifyLimits) -> ClassifyRequest:
    """Decode and validate a ``POST /v1/classify`` body. Raises :class:`ProtocolError`, whose
    message names the stream at fault. Pure (big bodies are parsed in a worker process)."""
    try:
        data = msgpack.unpackb(body, raw=False) if is_msgpack else json.loads(body)
    except Exception as e:
        raise ProtocolError(Code.MALFORMED_FRAME,
                            f"body is not valid {'msgpack' if is_msgpack else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise ProtocolError(Code.MALFORMED_FRAME, "body must be a map with a 'streams' array")
    model = data.get("model", None)
    if model is None:
        model = default_model
    elif not isinstance(model, str):
        raise ProtocolError(Code.INVALID_FIELD, f"model must be a string, got {type(model).__name__}")
    if model not in sensors:
        raise ProtocolError(Code.UNKNOWN_MODEL, f"unknown model {shorten(model)}; served: {sorted(sensors)}")
    streams = data.get("streams")
    if not isinstance(streams, list):
        raise ProtocolError(Code.INVALID_FIELD, "streams must be an array of {t, x, y?, p?} maps")
    if len(streams) > limits.max_streams:
        raise ProtocolError(Code.REQUEST_TOO_LARGE,
                            f"{len(streams)} streams, more than the limit of {limits.max_streams}")
    top_k = data.get("top_k", limits.default_top_k)
    if not _is_int(top_k) or not 0 <= top_k <= TOP_K_MAX:
        raise ProtocolError(Code.INVALID_FIELD, f"top_k must be an integer in 0..{TOP_K_MAX}")
    window = parse_window_field(data.get("window"))
    sensor = sensors[model]
    req = ClassifyRequest(model=model, top_k=top_k, tokens=[], gaps=[], last_t=[], events=0, cropped=[],
                          windows=None if window is None else [])
    for i, stream in enumerate(streams):
        try:
            if not isinstance(stream, dict):
                raise ProtocolError(Code.INVALID_FIELD, "a stream must be a map of columns")
            # A stream's own sensor/transform override the request's.
            declared = {k: stream[k] if k in stream else data.get(k) for k in ("sensor", "transform", "filters")}
            geometry = parse_geometry(declared, sensor)
            events = decode_events(stream, sensor if geometry is None else geometry.source,
                                   limits.max_events)
            req.events += len(events)
            if req.events > limits.max_events:
                raise ProtocolError(Code.REQUEST_TOO_LARGE,
                                    f"more than {limits.max_events} events in one request")
            bank = parse_filter_field(declared["filters"], sensor if geometry is None else geometry.source)
            counts = None
            if bank is not None:  # a fresh stream: as a session's first packets
                events, filtered = apply_filters(events, bank, bank.new_state(), None)
                counts = filtered.counts.to_dict()
            events, removed = adapt(events, geometry)
            tok, gap = prepare(events, sensor, None)
        except ProtocolError as e:
            raise ProtocolError(e.code, f"streams[{i}]: {e.message}") from None
        req.tokens.append(tok)
        req.gaps.append(gap)
        req.last_t.append(int(events.t[-1]) if len(events) else None)
        req.cropped.append(None if geometry is None else removed)
        req.filtered.append(counts)
        if req.windows is not None and window is not None:
            count, t0 = window_suffix(window, events.t)
            req.windows.append(None if t0 is None else {"t0": t0, "events": count})
    return req
