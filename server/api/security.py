"""Who may use the server: API keys, browser origins, client identity, secrets kept out of logs.

No JAX and no FastAPI routes here: the app asks these helpers and decides. The security model
(what each option protects against) is described in ``docs/deployment.md``.

- **API keys** (``--api-keys FILE``): one key per line, blank lines and ``#`` comments ignored.
  A request presents a key as ``Authorization: Bearer KEY``; a WebSocket may instead put it in the
  ``access_token`` query parameter (browsers cannot set headers on a WebSocket). Keys are compared
  in constant time against every configured key; a key is known to the rest of the server only by
  its *id* (a short hash), which is what sessions and logs carry.
- **Origins**: a browser sends ``Origin`` on every WebSocket upgrade. Same-origin pages (the
  ``Origin``'s host and port equal the ``Host`` the browser connected to) and listed origins are
  allowed; any other page is refused, so a web page cannot drive a server its visitor can reach.
  Clients that are not browsers send no ``Origin`` and are not affected.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from evssm.models.wire import Code

from .limits import send_json_error

log = logging.getLogger("evssm.server.security")

MIN_KEY_LENGTH = 16
_KEY_CHARS = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII without spaces: fits a header
_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


class KeyFileError(ValueError):
    """The API key file cannot be used (missing, empty, or a key that is not a key)."""


@dataclass(frozen=True)
class ApiKeys:
    """The configured keys, held as SHA-256 digests (a memory dump of the process shows no key)."""

    digests: tuple[bytes, ...]

    @classmethod
    def parse(cls, lines: Iterable[str], source: str = "the key file") -> ApiKeys:
        digests: list[bytes] = []
        for number, line in enumerate(lines, 1):
            key = line.strip()
            if not key or key.startswith("#"):
                continue
            if not _KEY_CHARS.match(key):
                raise KeyFileError(f"{source}, line {number}: a key must be printable ASCII without spaces")
            if len(key) < MIN_KEY_LENGTH:
                raise KeyFileError(f"{source}, line {number}: a key must have at least {MIN_KEY_LENGTH} "
                                   f"characters (make one with: python -c 'import secrets; "
                                   f"print(secrets.token_urlsafe(32))')")
            digests.append(_digest(key))
        if not digests:
            raise KeyFileError(f"{source} holds no key: refusing to start with authentication that "
                               f"nobody can pass (remove the option to serve without keys)")
        return cls(tuple(dict.fromkeys(digests)))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ApiKeys:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            mode = path.stat().st_mode
        except (OSError, UnicodeDecodeError) as e:
            raise KeyFileError(f"cannot read the API key file {path}: {e}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("the API key file %s is readable by other users (chmod 600 it)", path)
        return cls.parse(text.splitlines(), str(path))

    def identify(self, key: str | None) -> str | None:
        """The id of ``key`` if it is configured, else None. Constant time in the key's value:
        its digest is compared with every configured digest, without stopping at a match."""
        if not key:
            return None
        candidate = _digest(key)
        match: bytes | None = None
        for d in self.digests:
            if hmac.compare_digest(d, candidate):
                match = d
        return None if match is None else match.hex()[:12]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of header ``name`` (lower case) in an ASGI scope's header list."""
    for k, v in headers:
        if k == name:
            return v.decode("latin-1")
    return None


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The token of ``Authorization: Bearer TOKEN`` (scheme case-insensitive), else None."""
    value = header(headers, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def query_token(query_string: bytes) -> str | None:
    """The ``access_token`` query parameter, else None."""
    for k, v in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if k == "access_token":
            return v
    return None


def _host_port(scheme: str, netloc: str) -> str | None:
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if host is None:
        return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return host
    return f"{host}:{port}"


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a WebSocket upgrade carrying ``Origin: origin`` may proceed.

    No ``Origin``: not a browser (browsers always send one), allowed. ``*`` in ``allowed``: any.
    Otherwise the origin must be listed, or be the server's own: its host and port equal the
    ``Host`` header the browser sent (a page served by this server, e.g. ``/dashboard``, or by
    the proxy in front of it). ``null`` (sandboxed frames, local files) is allowed only if listed.
    """
    if origin is None:
        return True
    origin = origin.strip().lower()
    if "*" in allowed or origin in allowed:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or host is None:
        return False
    own = _host_port(parts.scheme, parts.netloc)
    # Host carries no scheme: compare with its port as given, or the origin scheme's default.
    return own is not None and own == _host_port(parts.scheme, host.strip().lower())


def normalize_origins(origins: Iterable[str]) -> tuple[str, ...]:
    """Lower case, no trailing slash: how browsers serialise an ``Origin``."""
    return tuple(o.strip().lower().rstrip("/") for o in origins if o.strip())


class RedactSecrets(logging.Filter):
    """Blanks API keys in log records, whichever logger wrote them: uvicorn logs every
    WebSocket's path with its query string (``access_token=KEY``), and at debug level the
    websockets handshake logs every request header (``Authorization: Bearer KEY``). The record's
    message is formatted, redacted and frozen (no arguments left), so no handler sees the key."""

    _access_token = re.compile(r"(access_token=)[^&\s\"']*", re.IGNORECASE)
    # "Authorization: Bearer KEY", "authorization=...", "(b'authorization', b'Bearer KEY')"
    _authorization = re.compile(
        r"(authorization['\"]?\s*[:=,]\s*(?:b?['\"])?)((?:bearer|basic|token)\s+)?[^\s'\",)\]]+",
        re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler's own error path
            return True
        lowered = text.lower()
        if "access_token=" in lowered or "authorization" in lowered:
            text = self._access_token.sub(r"\1***", text)
            record.msg, record.args = self._authorization.sub(r"\1\2***", text), ()
        return True


def install_log_redaction() -> None:
    """Redact secrets in every record that reaches a handler of the root or uvicorn's loggers
    (a handler's filter sees records of all loggers that propagate to it, at every level)."""
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactSecrets) for f in handler.filters):
                handler.addFilter(RedactSecrets())


OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes: always answer without a key
METRICS_PATHS = frozenset({"/metrics", "/v1/stats", "/v1/stats/history", "/dashboard"})  # open unless
# --public-metrics false


@dataclass(frozen=True)
class Access:
    """The access policy of one server instance (see module docstring)."""

    keys: ApiKeys | None
    allowed_origins: tuple[str, ...]
    open_paths: frozenset[str]

    @classmethod
    def create(cls, api_keys: str | None, allowed_origins: Iterable[str], public_metrics: bool) -> Access:
        return cls(keys=None if api_keys is None else ApiKeys.load(api_keys),
                   allowed_origins=normalize_origins(allowed_origins),
                   open_paths=OPEN_PATHS | METRICS_PATHS if public_metrics else OPEN_PATHS)

    def authenticate(self, scope: MutableMapping[str, Any]) -> tuple[bool, str | None]:
        """(allowed, API key id) of a request or WebSocket; always allowed without keys."""
        if self.keys is None:
            return True, None
        token = bearer_token(scope.get("headers", ()))
        if token is None and scope["type"] == "websocket":
            token = query_token(scope.get("query_string", b""))
        key_id = self.keys.identify(token)
        return key_id is not None, key_id

    def origin_ok(self, scope: MutableMapping[str, Any]) -> bool:
        headers = scope.get("headers", ())
        return origin_allowed(header(headers, b"origin"), header(headers, b"host"), self.allowed_origins)

    @staticmethod
    def principal(scope: MutableMapping[str, Any], key_id: str | None) -> str:
        """Who holds sessions, for per-client caps: the API key, or without keys the address."""
        if key_id is not None:
            return f"key:{key_id}"
        client = scope.get("client")
        return f"addr:{client[0] if client else 'unknown'}"


class AuthMiddleware:
    """HTTP requests need ``Authorization: Bearer KEY`` when keys are configured, except on
    :attr:`Access.open_paths`; a missing or wrong key gets 401 JSON before the app runs.
    WebSockets are checked by the stream endpoint (it answers with close code 1008)."""

    def __init__(self, app: Any, access: Access):
        self.app = app
        self.access = access

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path", "") not in self.access.open_paths:
            ok, _ = self.access.authenticate(scope)
            if not ok:
                await send_json_error(send, 401, Code.UNAUTHORIZED, "missing or invalid API key: evssm "
                                      "clients take --api-key KEY or EVSSM_API_KEY; others send "
                                      "Authorization: Bearer KEY", ((b"www-authenticate", b'Bearer realm="evssm"'),))
                return
        await self.app(scope, receive, send)
