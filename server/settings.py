"""Server settings: one pydantic-settings model, filled from command-line options and ``EVSSM_*``
variables.

Precedence: command line > environment > defaults. Every option of ``evssm serve`` has an
environment variable of the same name in upper case with an ``EVSSM_`` prefix (``--max-sessions``
-> ``EVSSM_MAX_SESSIONS``; ``--model`` -> ``EVSSM_MODEL``), so containers can be configured
without a command line. Each field's ``description`` is its ``--help`` line (``server/cli.py``
makes one option per described field). Empty variables count as unset.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Self

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from evssm.models.config import STREAMING_BACKENDS
from evssm.models.xla_cache import cache_folder

ENV_PREFIX = "EVSSM_"
MODEL_ENV = ENV_PREFIX + "MODEL"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: ``source`` is a checkpoint directory or ``config:NAME`` (None: the
    project's default model); ``name`` is what clients ask for (None: the model config's name)."""

    name: str | None
    source: str | None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``NAME=SOURCE`` or ``SOURCE`` (``config:tiny``, ``/ckpt/dir``, ``default``)."""
        text = text.strip()
        head, sep, source = text.partition("=")
        name: str | None = head
        if not sep or not _NAME.match(head):  # "a/b=c" is a path, not a name
            name, source = None, text
        if not source:
            raise ValueError(f"empty model source in {text!r}")
        return cls(name=name, source=None if source == "default" else source)


def parse_ints(text: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """``"1,8,64"`` -> ``(1, 8, 64)``, sorted and de-duplicated (``"none"`` -> ``()``)."""
    if isinstance(text, str) and text.strip().lower() == "none":
        return ()
    if isinstance(text, str):
        items = [int(s) for s in re.split(r"[,\s]+", text.strip()) if s]
    else:
        items = [int(v) for v in text]
    return tuple(sorted(set(items)))


# Comma-separated in a variable or an option; no JSON decoding of the text first.
Buckets = Annotated[tuple[int, ...], NoDecode]


class Settings(BaseSettings):
    """Everything ``create_app`` needs. Sizes are per model unless stated otherwise.

    ``Settings(**values)`` reads ``EVSSM_*`` variables for what ``values`` leaves out;
    :meth:`from_env` reads a given mapping instead and words errors for a command line.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True,
                                      extra="forbid", validate_by_name=True, validate_by_alias=True)

    # empty: the default model. Its variable is EVSSM_MODEL (singular, like the option).
    models: Annotated[tuple[ModelSpec, ...], NoDecode] = Field((), validation_alias=MODEL_ENV)
    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    max_sessions: int = Field(
        256, ge=1, description="live sessions over all models; then open gets server_full")
    max_packet_events: int = Field(
        65536, ge=1, description="events per packet; more gets packet_too_large")
    session_idle_timeout: float = Field(
        300.0, gt=0, description="seconds without a packet before a session is evicted")
    log_level: str = Field("info", description="debug, info, warning, error")
    access_log: bool = Field(
        False, description="log every HTTP request and WebSocket connection (uvicorn's access log; "
                           "health probes included); without it the log has one line per session "
                           "and per classify request")
    # Shape buckets: every step is padded to one (batch, length) pair; all are compiled at start-up.
    batch_buckets: Buckets = Field((1, 8, 64), description="sessions per step, comma-separated shape buckets")
    length_buckets: Buckets = Field(
        (64, 256, 1024, 4096), description="events per session per step, comma-separated shape buckets")
    # Offline classify: lengths beyond the streaming buckets, and the padded-batch event budget
    # (a (B, L) classify shape is compiled only where B * L <= classify_batch_events).
    classify_length_buckets: Buckets = Field(
        (16384, 65536), description="extra recording lengths for POST /v1/classify's offline form")
    classify_batch_events: int = Field(
        262144, description="largest padded batch (B*L) of one classify call")
    max_classify_events: int = Field(1 << 22, ge=1, description="events per classify request")
    max_classify_streams: int = Field(1024, ge=1, description="recordings per classify request")
    # Under load steps batch by themselves (the next step gathers what arrives while one runs).
    batch_wait_ms: float = Field(
        0.0, ge=0, description="how long a packet may wait for other sessions' packets when no "
                               "step is running (a lone session never waits)")
    max_inflight: int = Field(
        64, ge=1, description="replies a connection may have queued (results, errors, acks); then "
                              "the server stops reading from it")
    # Accepted, not yet stepped events per model (tokens and gaps, 8 bytes each). At least twice
    # max_packet_events is used.
    staging_events: int = Field(
        1 << 21, ge=2, description="accepted, not yet stepped events per model; then packets wait "
                                   "for room")
    slots_per_model: int | None = Field(
        None, ge=1, description="device state rows per model (default: max sessions)")
    drain_timeout: float = Field(
        30.0, ge=0, description="seconds a SIGTERM drain waits for in-flight packets")
    backend: str = Field("auto", description="streaming step: native (C++ kernel, CPU only; built on "
                                             "first use), xla, or auto (native where it builds)")
    compilation_cache: str | None = Field(
        None, description="folder of the persistent XLA compilation cache, which makes restarts "
                          "compile almost nothing (default: ~/.cache/evssm/xla, or "
                          "$EVSSM_CACHE_DIR/xla; 'none': off)")
    default_top_k: int = Field(3, ge=0)
    # Who may connect and how much one client may hold (docs/deployment.md, "Security").
    api_keys: str | None = Field(
        None, description="FILE of API keys, one per line ('#' comments): every request then needs "
                          "'Authorization: Bearer KEY' (WebSocket: or ?access_token=KEY); the "
                          "variable holds the file's path, not keys")
    public_metrics: bool = Field(
        True, description="true: /metrics, /v1/stats and /dashboard answer without a key; false: "
                          "they need one too")
    allowed_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="comma-separated browser origins (https://app.example) that may open "
                        "WebSockets besides the server's own pages; '*': any")
    max_sessions_per_client: int | None = Field(
        None, ge=1, description="live sessions per API key, or per client address without keys "
                                "(default: a quarter of --max-sessions, at least 8)")
    max_connections: int = Field(
        1000, ge=1, description="open HTTP and WebSocket connections; then HTTP 503 / WebSocket "
                                "close 1013 (/healthz and /readyz still answer)")
    header_timeout: float = Field(
        10.0, gt=0, description="seconds a connection may take to send a request's headers")
    open_timeout: float = Field(
        10.0, gt=0, description="seconds a WebSocket may take to open (or resume) a session; "
                                "then it is closed with 1008")
    ws_compression: bool = Field(
        False, description="negotiate WebSocket permessage-deflate (off: a small compressed "
                           "frame can inflate to megabytes of work); inflated messages are "
                           "bounded by the frame limit either way")
    forwarded_allow_ips: str | None = Field(
        None, description="comma-separated addresses or networks (10.0.0.0/8) of proxies whose "
                          "X-Forwarded-For/-Proto are trusted, '*': any (default: none; the "
                          "socket's peer is the client)")
    keep_alive_timeout: int = Field(
        5, ge=1, description="seconds an idle HTTP keep-alive connection is kept")
    max_classify_requests: int = Field(
        2, ge=1, description="classify requests served at once; more get 503 with Retry-After")
    body_timeout: float = Field(
        60.0, gt=0, description="seconds a client may take to send a classify request's body "
                                "(then 408)")
    # Session snapshots (docs/protocol.md, "Resuming after a restart"): at most one store.
    state_dir: str | None = Field(
        None, description="keep session snapshots in this directory: a restarted server resumes "
                          "its sessions (one server per directory)")
    state_store: str | None = Field(
        None, description="keep session snapshots in Redis, redis://HOST:PORT/DB: replicas sharing "
                          "it resume each other's sessions")
    snapshot_interval: float = Field(
        5.0, gt=0, description="seconds between snapshots of the sessions that changed (all are "
                               "written on SIGTERM)")

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: Any) -> Any:
        """``"a=config:tiny, /ckpt/b"`` (a variable) or a list of such (repeated ``--model``)."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            specs = [s.strip() for item in value for s in re.split(r"[,\n]", item) if s.strip()]
            return tuple(ModelSpec.parse(s) for s in specs)
        return value

    @field_validator("batch_buckets", "length_buckets", "classify_length_buckets", mode="before")
    @classmethod
    def _parse_buckets(cls, value: Any) -> Any:
        return parse_ints(value) if isinstance(value, (str, list, tuple)) else value

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _parse_origins(cls, value: Any) -> Any:
        """``"https://a.example, https://b.example"`` or a list of such."""
        items = [value] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(v, str) for v in items):
            return tuple(o for item in items for o in re.split(r"[,\s]+", item) if o)
        return value

    @field_validator("batch_buckets", "length_buckets")
    @classmethod
    def _non_empty_buckets(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or min(value) < 1:
            raise ValueError("needs at least one bucket, each >= 1")
        return value

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in STREAMING_BACKENDS:
            raise ValueError(f"backend must be {', '.join(STREAMING_BACKENDS[:-1])} or "
                             f"{STREAMING_BACKENDS[-1]}, not {value!r}")
        return value

    @field_validator("state_store")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value and value.split("://", 1)[0] not in ("redis", "rediss", "unix"):
            raise ValueError(f"state_store must be a redis://, rediss:// or unix:// URL, not {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.state_dir and self.state_store:
            raise ValueError("give state_dir (snapshots on disk) or state_store (Redis), not both")
        if self.classify_batch_events < max(self.length_buckets):
            raise ValueError("classify_batch_events must be >= the largest length bucket")
        names = [m.name for m in self.models if m.name is not None]
        if len(names) != len(set(names)):
            raise ValueError(f"model names must be unique, got {names}")
        return self

    @property
    def sessions_per_client(self) -> int:
        """Live sessions one API key (or, without keys, one client address) may hold. Default: a
        quarter of ``max_sessions``, but never fewer than 8 (small servers are not split)."""
        if self.max_sessions_per_client is not None:
            return min(self.max_sessions_per_client, self.max_sessions)
        return max(self.max_sessions // 4, min(self.max_sessions, 8))

    @property
    def max_body_bytes(self) -> int:
        """Largest classify request body: room for ``max_classify_events`` events as JSON."""
        return self.max_classify_events * 96 + (1 << 20)

    @property
    def max_length(self) -> int:
        """Events one session contributes to one step (longer packets take several steps)."""
        return max(self.length_buckets)

    @property
    def compilation_cache_dir(self) -> str | None:
        """The persistent XLA compilation cache's folder (None: off), per user by default."""
        return cache_folder(self.compilation_cache)

    @property
    def snapshots(self) -> bool:
        """Session snapshots are kept (a state dir or store is set)."""
        return bool(self.state_dir or self.state_store)

    @property
    def snapshot_ttl(self) -> float:
        """Seconds a snapshot outlives its last write: the idle timeout, plus room for the write
        to trail the session's last activity by up to two intervals."""
        return self.session_idle_timeout + 2 * self.snapshot_interval

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes``, validated (the environment is not read again)."""
        return type(self).model_validate({**dict(self), **changes})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``overrides`` (None values are ignored), then ``EVSSM_*`` variables of
        ``env`` (default: the process environment), then defaults.

        Raises ``ValueError`` naming each bad setting, its value and where it came from.
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            if env is None:
                return cls(**given)
            from_env = {("models" if k == MODEL_ENV else k): v for k, v in _MappingEnv(cls, env)().items()}
            return cls.model_validate({**from_env, **given})
        except ValidationError as e:
            raise ValueError(explain(e, given)) from None


class _MappingEnv(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]):
        self._mapping = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._mapping, self.case_sensitive, self.env_ignore_empty,
                              self.env_parse_none_str)


def env_name(field: str) -> str:
    """The variable of a setting: ``max_sessions`` -> ``EVSSM_MAX_SESSIONS``."""
    return MODEL_ENV if field == "models" else ENV_PREFIX + field.upper()


def explain(error: ValidationError, given: Mapping[str, Any]) -> str:
    """One line per bad setting: ``invalid setting port='eighty' (EVSSM_PORT): ...``."""
    lines = []
    for item in error.errors(include_url=False):
        loc = [str(p) for p in item["loc"]]
        field = "models" if loc[:1] == [MODEL_ENV] else (loc[0] if loc else "")
        where = (("--model" if field == "models" else "--" + field.replace("_", "-"))
                 if field in given else env_name(field))
        message = str(item["msg"]).removeprefix("Value error, ")
        if field:
            value = item.get("input")
            lines.append(f"invalid setting {field}={value!r} ({where}): {message}")
        else:  # a check across settings
            lines.append(f"invalid settings: {message}")
    return "\n".join(lines)
