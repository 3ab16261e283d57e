"""Typed exceptions of the client.

Every error a caller can meet derives from :class:`ClientError`. Errors the server reports (a
WebSocket ``error`` frame, an HTTP ``{"error": CODE}`` body, or the "server full" close code) are
:class:`ServerError` subclasses carrying the contract's stable ``code``; :func:`server_error` picks
the subclass from the code, so callers can ``except InvalidEvents`` or test ``err.code``.
"""

from __future__ import annotations

from enum import StrEnum

from evssm.models.wire import Code


class ClientCode(StrEnum):
    """Codes the client gives errors the server did not name (beside the contract's :class:`Code`)."""

    RESUME_MISMATCH = "resume_mismatch"  # a resumed session's count matches no packet boundary
    UNAVAILABLE = "unavailable"  # HTTP 503 or close code 1013 without an error frame


class ClientError(Exception):
    """Base class of every error raised by :mod:`evssm.client`."""


class ServerError(ClientError):
    """The server rejected a request. ``code`` is the contract's error code
    (:class:`evssm.models.wire.Code`, listed in docs/protocol.md).

    ``seq`` is the packet the error answers (None for errors not tied to a packet); ``status`` is
    the HTTP status for errors from the HTTP API.
    """

    def __init__(self, code: str, message: str = "", *, seq: int | None = None,
                 status: int | None = None):
        self.code = code
        self.message = message
        self.seq = seq
        self.status = status
        where = f" (packet {seq})" if seq is not None else ""
        super().__init__(f"{code}: {message}{where}" if message else f"{code}{where}")


class InvalidEvents(ServerError):
    """A packet or stream was rejected as malformed; the session's state is untouched."""


class UnknownModel(ServerError):
    """The requested model is not served."""


class ServerUnavailable(ServerError):
    """The server cannot take the request now (full, still loading, shutting down): retry later."""


class ServerFull(ServerUnavailable):
    """The server has no room for another session; retry later."""


class Unauthorized(ServerError):
    """The server wants an API key and got none or a wrong one (``--api-key`` / ``EVSSM_API_KEY``)."""


class SessionExpired(ServerError):
    """A resume token no longer names a live session (the server dropped or forgot it)."""


# Codes of the contract mapped to the subclass that carries them; other codes (no_session,
# internal_error, ...) get ServerError itself.
_CODE_CLASSES: dict[str, type[ServerError]] = {
    **dict.fromkeys(
        (Code.MALFORMED_FRAME, Code.UNKNOWN_TYPE, Code.INVALID_FIELD, Code.MISSING_COLUMN,
         Code.INVALID_COLUMN, Code.LENGTH_MISMATCH, Code.ADDRESS_OUT_OF_RANGE,
         Code.TIMESTAMPS_DECREASING, Code.PACKET_TOO_LARGE, Code.REQUEST_TOO_LARGE,
         Code.UNSUPPORTED_MEDIA_TYPE),
        InvalidEvents),
    Code.UNKNOWN_MODEL: UnknownModel,
    **dict.fromkeys((Code.SERVER_FULL, Code.TOO_MANY_SESSIONS), ServerFull),
    **dict.fromkeys((Code.NOT_READY, Code.DRAINING, Code.BUSY, Code.STORE_UNAVAILABLE), ServerUnavailable),
    Code.UNAUTHORIZED: Unauthorized,
    **dict.fromkeys((Code.UNKNOWN_SESSION, Code.SESSION_EXPIRED, Code.SESSION_RESUMED_ELSEWHERE,
                     Code.SNAPSHOT_INCOMPATIBLE, ClientCode.RESUME_MISMATCH), SessionExpired),
}


def server_error(code: str, message: str = "", *, seq: int | None = None,
                 status: int | None = None) -> ServerError:
    """Build the typed exception for a server error ``code``."""
    cls = _CODE_CLASSES.get(code, ServerError)
    return cls(code, message, seq=seq, status=status)


class ConnectionLost(ClientError):
    """The connection dropped and could not be re-established (or reconnecting was disabled)."""


class ProtocolError(ClientError):
    """The server sent something the contract does not allow (e.g. a result out of order)."""


class NothingInFlight(ClientError):
    """A result was awaited but no packet is waiting for one."""


class SessionClosed(ClientError):
    """The session was used after :meth:`close` (or before :meth:`open`)."""


class SourceError(ClientError, ValueError):
    """An event source could not be read or does not hold what was asked for."""


def error_line(exc: ClientError) -> str:
    """The one line a command prints for ``exc``: its message, and for a refused key what to do."""
    text = str(exc)
    if isinstance(exc, Unauthorized) and "--api-key" not in text:
        text += " (give the server's key with --api-key KEY or the EVSSM_API_KEY variable)"
    return text


def exit_code(exc: ClientError) -> int:
    """1 when the server or the network failed (unreachable, full, busy, broken), 2 when the
    user's input, options or key were wrong."""
    failed = (ConnectionLost, ProtocolError, ServerUnavailable)
    return 1 if isinstance(exc, failed) or type(exc) is ServerError else 2
