"""The wire contract between client and server, written once — NumPy only.

Both sides import this module: the server's API layer validates against it and the client
encodes and decodes with it. ``docs/protocol.md`` shows every frame; ``models/events.py`` holds
what an event *means* (sensor geometry, tokens, gaps), this module how it travels and what the
answers are called.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np

# --- endpoints and media types -------------------------------------------------------------------
STREAM_PATH = "/v1/stream"
CLASSIFY_PATH = "/v1/classify"
MODELS_PATH = "/v1/models"

MSGPACK = "application/msgpack"
MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"})

FRAME_TYPES = ("open", "events", "reset", "close")  # what a client sends on /v1/stream


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
