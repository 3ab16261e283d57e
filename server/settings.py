"""Server settings: one dataclass, filled from command-line options and ``EVSSM_*`` variables.

Precedence: command line > environment > defaults. Every option of ``evssm serve`` has an
environment variable of the same name in upper case with an ``EVSSM_`` prefix (``--max-sessions``
-> ``EVSSM_MAX_SESSIONS``), so containers can be configured without a command line.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from evssm.models.config import STREAMING_BACKENDS

ENV_PREFIX = "EVSSM_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: ``source`` is a checkpoint directory or ``config:NAME`` (None: the
    project's default model); ``name`` is what clients ask for (None: the model config's name)."""

    name: str | None
    source: str | None

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """``NAME=SOURCE`` or ``SOURCE`` (``config:tiny``, ``/ckpt/dir``, ``default``)."""
        text = text.strip()
        name, sep, source = text.partition("=")
        if not sep or not _NAME.match(name):  # "a/b=c" is a path, not a name
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


@dataclass(frozen=True)
class Settings:
    """Everything ``create_app`` needs. Sizes are per model unless stated otherwise."""

    models: tuple[ModelSpec, ...] = ()  # empty: the default model
    host: str = "127.0.0.1"
    port: int = 8000
    max_sessions: int = 256  # live sessions over all models
    slots_per_model: int | None = None  # state rows per model on the device (None: max_sessions)
    max_packet_events: int = 65536
    session_idle_timeout: float = 300.0  # seconds without a packet before a session is evicted
    log_level: str = "info"
    # Shape buckets: every step is padded to one (batch, length) pair; all are compiled at start-up.
    batch_buckets: tuple[int, ...] = (1, 8, 64)
    length_buckets: tuple[int, ...] = (64, 256, 1024, 4096)
    # Offline classify: lengths beyond the streaming buckets, and the padded-batch event budget
    # (a (B, L) classify shape is compiled only where B * L <= classify_batch_events).
    classify_length_buckets: tuple[int, ...] = (16384, 65536)
    classify_batch_events: int = 262144
    max_classify_events: int = 1 << 22  # per request, over all streams
    max_classify_streams: int = 1024
    batch_wait_ms: float = 2.0  # how long a lone packet waits for company
    max_inflight: int = 64  # packets a connection may have awaiting results (then backpressure)
    default_top_k: int = 3
    drain_timeout: float = 30.0  # seconds a SIGTERM drain waits for in-flight packets
    backend: str = "auto"  # streaming step: native (C++ kernel, CPU), xla, or auto
    # Session snapshots (at most one store): a directory, or redis://HOST:PORT/DB shared by replicas.
    state_dir: str | None = None
    state_store: str | None = None
    snapshot_interval: float = 5.0  # seconds between snapshots of the sessions that changed

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid setting: {msg}")

        check(1 <= self.port <= 65535 or self.port == 0, "port must be in 1..65535 (0: any free port)")
        check(self.max_sessions >= 1, "max_sessions must be >= 1")
        check(self.slots_per_model is None or self.slots_per_model >= 1, "slots_per_model must be >= 1")
        check(self.max_packet_events >= 1, "max_packet_events must be >= 1")
        check(self.session_idle_timeout > 0, "session_idle_timeout must be > 0")
        check(bool(self.batch_buckets) and min(self.batch_buckets) >= 1, "batch_buckets must be >= 1")
        check(bool(self.length_buckets) and min(self.length_buckets) >= 1, "length_buckets must be >= 1")
        check(self.batch_wait_ms >= 0, "batch_wait_ms must be >= 0")
        check(self.max_inflight >= 1, "max_inflight must be >= 1")
        check(self.backend in STREAMING_BACKENDS,
              f"backend must be {', '.join(STREAMING_BACKENDS[:-1])} or {STREAMING_BACKENDS[-1]}, "
              f"not {self.backend!r}")
        check(self.classify_batch_events >= max(self.length_buckets),
              "classify_batch_events must be >= the largest length bucket")
        check(not (self.state_dir and self.state_store),
              "give state_dir (snapshots on disk) or state_store (Redis), not both")
        check(not self.state_store or self.state_store.split("://", 1)[0] in ("redis", "rediss", "unix"),
              f"state_store must be a redis://, rediss:// or unix:// URL, not {self.state_store!r}")
        check(self.snapshot_interval > 0, "snapshot_interval must be > 0")
        names = [m.name for m in self.models if m.name is not None]
        check(len(names) == len(set(names)), f"model names must be unique, got {names}")

    @property
    def max_length(self) -> int:
        """Events one session contributes to one step (longer packets take several steps)."""
        return max(self.length_buckets)

    @property
    def snapshots(self) -> bool:
        """Session snapshots are kept (a state dir or store is set)."""
        return bool(self.state_dir or self.state_store)

    @property
    def snapshot_ttl(self) -> float:
        """Seconds a snapshot outlives its last write: the idle timeout, plus room for the write
        to trail the session's last activity by up to two intervals."""
        return self.session_idle_timeout + 2 * self.snapshot_interval

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Settings from ``EVSSM_*`` variables, then ``overrides`` (None values are ignored)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + ("MODEL" if f.name == "models" else f.name.upper()))
            if raw is not None and raw.strip() != "":
                values[f.name] = _convert(f.name, raw)
        for k, v in overrides.items():
            if v is None:
                continue
            if isinstance(v, str) or (k == "models" and isinstance(v, (list, tuple))
                                      and all(isinstance(i, str) for i in v)):
                v = _convert(k, v)
            values[k] = v
        return cls(**values)


_FLOATS = {"session_idle_timeout", "batch_wait_ms", "drain_timeout", "snapshot_interval"}
_INT_TUPLES = {"batch_buckets", "length_buckets", "classify_length_buckets"}
_STRINGS = {"host", "log_level", "backend", "state_dir", "state_store"}


def _convert(name: str, raw: Any) -> Any:
    """Parse one setting from its text form (environment variable or option)."""
    try:
        if name == "models":
            items = [raw] if isinstance(raw, str) else list(raw)
            specs = [s.strip() for item in items for s in re.split(r"[,\n]", item) if s.strip()]
            return tuple(ModelSpec.parse(s) for s in specs)
        if name in _INT_TUPLES:
            return parse_ints(raw)
        if name in _FLOATS:
            return float(raw)
        if name in _STRINGS:
            return str(raw)
        return int(raw)
    except ValueError as e:
        raise ValueError(f"invalid setting {name}={raw!r}: {e}") from None
