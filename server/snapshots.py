"""Session snapshots: the record, its encoding, and the stores that keep it (no JAX).

A snapshot holds what a session needs to go on after its server is gone: the packed state row,
the event count and last timestamp the row covers, the last probabilities (so that an empty packet
is answered at once), top-k, the model's name and a fingerprint of the model's weights (a row is
meaningless under other weights). Nothing here knows of sessions, slots or the scheduler; the
engine's glue is :mod:`evssm.server.durability`.

**Keys.** A snapshot is stored under the SHA-256 of the session's resume token, never the token:
whoever can read the store (a backup of the state directory, a shared Redis) must not be able to
take over a stream. The token holds 144 random bits, so a plain hash cannot be inverted by search.

**Integrity.** A record is a msgpack envelope ``[MAGIC, VERSION, crc32(body), body]`` around a
msgpack body; a truncated or damaged record fails to decode with :class:`CorruptSnapshot`.

**Stores.** Both are blocking byte stores with a time to live, used from the engine's writer and
reader threads:

- :class:`DiskStore`: one file per session, ``DIR/sessions/<key>.snap``, written to a temporary
  file and renamed over the old one (atomic: a reader sees the old or the new record, never a
  mix). One file per session keeps a damaged record to itself, makes a lookup on resume one
  ``open`` and a deletion one ``unlink``; 10,000 sessions are 10,000 small files (measured in
  docs/benchmarks.md). A lock file keeps a second server off the same directory.
- :class:`RedisStore`: one hash per session (``data``, ``owner``) with a TTL. Writes are fenced by
  owner: a server writes or deletes a session's record only while it owns it (it opened or last
  restored the session), so a replica that lost a session to another cannot overwrite it with an
  older state.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import msgpack
import numpy as np

log = logging.getLogger("evssm.server.snapshots")

MAGIC = "evssm-snapshot"
VERSION = 1
_KEY = re.compile(r"^[0-9a-f]{64}$")


class CorruptSnapshot(ValueError):
    """A record that cannot be decoded (truncated, damaged, or not a snapshot)."""


class StoreUnavailable(RuntimeError):
    """The store cannot be reached or written (the message says which and why)."""


class StoreLocked(RuntimeError):
    """The state directory is in use by another server."""


def token_key(token: str) -> str:
    """The store key of a resume token: SHA-256, hex (see the module docstring for why)."""
    return hashlib.sha256(token.encode()).hexdigest()


def weights_fingerprint(arrays: Iterable[tuple[str, np.ndarray]], config: Mapping[str, Any]) -> str:
    """SHA-256 (first 32 hex digits) over a model's config and every named array's dtype, shape
    and bytes, in name order: equal exactly when a state row means the same under both models."""
    h = hashlib.sha256(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, array in sorted(arrays, key=lambda item: item[0]):
        a = np.ascontiguousarray(array)
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]


@dataclass(frozen=True, eq=False)
class SnapshotRecord:
    """One session's snapshot. ``row`` int32 [words]; ``probs`` float32 [C] or None (no complete
    final-rate window yet)."""

    key: str  # token_key(resume token)
    session: str  # the session id (logs only)
    model: str
    fingerprint: str
    row: np.ndarray
    events: int  # events of the current stream (since open or the last reset) the row covers
    last_t: int | None  # the last of those events' timestamp
    probs: np.ndarray | None
    top_k: int
    written: float = field(default_factory=time.time)  # Unix time


def encode(rec: SnapshotRecord) -> bytes:
    """The record's bytes: ``[MAGIC, VERSION, crc32(body), body]`` as msgpack."""
    body = msgpack.packb({
        "key": rec.key, "session": rec.session, "model": rec.model, "fingerprint": rec.fingerprint,
        "row": np.ascontiguousarray(rec.row, "<i4").tobytes(), "events": rec.events,
        "last_t": rec.last_t,
        "probs": None if rec.probs is None else np.ascontiguousarray(rec.probs, "<f4").tobytes(),
        "top_k": rec.top_k, "written": rec.written,
    })
    return msgpack.packb([MAGIC, VERSION, zlib.crc32(body), body])


def decode(data: bytes) -> SnapshotRecord:
    """The record in ``data``; raises :class:`CorruptSnapshot` saying what is wrong."""
    try:
        envelope = msgpack.unpackb(data)
    except Exception as e:  # msgpack raises several types on truncated or foreign bytes
        raise CorruptSnapshot(f"not a snapshot ({type(e).__name__}: {e})") from None
    if not (isinstance(envelope, list) and len(envelope) == 4 and envelope[0] == MAGIC):
        raise CorruptSnapshot("not a snapshot (no evssm-snapshot envelope)")
    _, version, crc, body = envelope
    if version != VERSION:
        raise CorruptSnapshot(f"snapshot format version {version!r}; this server reads {VERSION}")
    if not isinstance(body, bytes) or zlib.crc32(body) != crc:
        raise CorruptSnapshot("checksum mismatch (the record is damaged)")
    try:
        d = msgpack.unpackb(body)
        probs = d["probs"]
        rec = SnapshotRecord(
            key=str(d["key"]), session=str(d["session"]), model=str(d["model"]),
            fingerprint=str(d["fingerprint"]), row=np.frombuffer(d["row"], "<i4").astype(np.int32),
            events=int(d["events"]), last_t=None if d["last_t"] is None else int(d["last_t"]),
            probs=None if probs is None else np.frombuffer(probs, "<f4").astype(np.float32),
            top_k=int(d["top_k"]), written=float(d["written"]))
    except Exception as e:
        raise CorruptSnapshot(f"malformed snapshot body ({type(e).__name__}: {e})") from None
    if rec.events < 0 or rec.row.size == 0:
        raise CorruptSnapshot(f"implausible snapshot (events {rec.events}, {rec.row.size} words)")
    return rec


class SnapshotStore(Protocol):
    """A byte store of snapshots by key, with a time to live. Calls block: run them off the
    event loop (the engine has one writer and one reader thread)."""

    description: str  # where the snapshots are, for logs (no secrets)

    def put(self, items: list[tuple[str, bytes]], *, claim: bool = False) -> list[bool]:
        """Write ``(key, record)`` pairs. False for a key another server owns (left as it is),
        unless ``claim`` (this server takes the session over). Raises StoreUnavailable."""
        ...

    def get(self, key: str) -> bytes | None:
        """The record under ``key`` (None: none, or expired). Raises StoreUnavailable."""
        ...

    def delete(self, keys: list[str]) -> None:
        """Delete the records this server owns. Raises StoreUnavailable."""
        ...

    def close(self) -> None: ...


# --- disk ----------------------------------------------------------------------------------------
@dataclass
class ScanReport:
    """What :meth:`DiskStore.scan` found."""

    valid: int = 0
    corrupt: list[str] = field(default_factory=list)  # file names moved aside
    expired: int = 0
    models: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, fingerprint) -> n
    seconds: float = 0.0


class DiskStore:
    """One file per session under ``directory/sessions`` (see the module docstring).

    A record older than ``ttl_s`` (by the file's modification time) is expired: not returned and
    deleted. Writes are atomic (temporary file, then ``os.replace``) but not ``fsync``-ed: a
    crashed *process* loses nothing that was written; a crashed *host* may lose the last
    seconds, and a torn file fails its checksum and is skipped.
    """

    SUFFIX = ".snap"

    def __init__(self, directory: str | Path, ttl_s: float):
        self.root = Path(directory)
        self.dir = self.root / "sessions"
        self.ttl_s = ttl_s
        self.description = f"state dir {self.root}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.root / "lock", "a+")
        except OSError as e:
            raise StoreUnavailable(f"cannot use state dir {self.root}: {e.strerror or e}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise StoreLocked(f"state dir {self.root} is in use by {holder}; "
                                  "each server needs its own directory") from None
            raise
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"evssm serve (pid {os.getpid()})\n")
        self._lock.flush()

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):  # keys are SHA-256 hex: nothing else may become a path
            raise ValueError(f"invalid snapshot key {key!r}")
        return self.dir / (key + self.SUFFIX)

    def put(self, items: list[tuple[str, bytes]], *, claim: bool = False) -> list[bool]:
        for key, data in items:
            path = self._path(key)
            tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except OSError as e:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise StoreUnavailable(f"cannot write {path}: {e.strerror or e}") from None
        return [True] * len(items)

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                age = time.time() - os.fstat(f.fileno()).st_mtime
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreUnavailable(f"cannot read {path}: {e.strerror or e}") from None
        if age > self.ttl_s:
            self.delete([key])
            return None
        return data

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            with contextlib.suppress(OSError):
                self._path(key).unlink()

    def quarantine(self, key: str) -> str:
        """Move a damaged record aside (``<key>.snap.corrupt``, kept for inspection until it is
        older than the TTL); returns its new name."""
        path = self._path(key)
        target = path.with_name(path.name + ".corrupt")
        with contextlib.suppress(OSError):
            os.replace(path, target)
        return target.name

    def scan(self, check: Callable[[bytes], SnapshotRecord]) -> ScanReport:
        """Check every record with ``check`` (raises CorruptSnapshot): count the valid ones by
        (model, fingerprint), move damaged ones aside, delete expired records, leftover
        temporary files and old quarantined files."""
        t0 = time.perf_counter()
        report = ScanReport()
        now = time.time()
        with os.scandir(self.dir) as entries:
            names = [(e.name, e.stat().st_mtime) for e in entries if e.is_file()]
        for name, mtime in names:
            path = self.dir / name
            if name.endswith(".tmp") or (name.endswith(".corrupt") and now - mtime > self.ttl_s):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            if not name.endswith(self.SUFFIX):
                continue
            key = name[:-len(self.SUFFIX)]
            if not _KEY.match(key):
                continue
            if now - mtime > self.ttl_s:
                self.delete([key])
                report.expired += 1
                continue
            try:
                rec = check(path.read_bytes())
                if rec.key != key:
                    raise CorruptSnapshot(f"record of key {rec.key[:12]}... stored under {key[:12]}...")
            except FileNotFoundError:
                continue
            except CorruptSnapshot as e:
                report.corrupt.append(self.quarantine(key))
                log.warning("%s: snapshot %s skipped: %s", self.description, name, e)
                continue
            report.valid += 1
            report.models[(rec.model, rec.fingerprint)] = report.models.get((rec.model, rec.fingerprint), 0) + 1
        report.seconds = time.perf_counter() - t0
        return report

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._lock.close()  # releases the lock


# --- Redis ---------------------------------------------------------------------------------------
# KEYS[1] = record; ARGV = owner, data, ttl_ms, claim ("1"/"0"). Writes unless another owns it.
_PUT = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if ARGV[4] == '1' or not owner or owner == ARGV[1] then
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'data', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""
# KEYS[1] = record; ARGV[1] = owner. Deletes only this owner's record.
_DELETE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisStore:
    """One Redis hash per session, ``evssm:session:<key>`` = {data, owner}, expiring ``ttl_s``
    after its last write; writes and deletes fenced by ``owner`` (see the module docstring)."""

    PREFIX = "evssm:session:"

    def __init__(self, url: str, ttl_s: float, owner: str, *, timeout_s: float = 5.0):
        import redis  # the server extra's dependency; only needed with --state-store

        self._errors: tuple[type[BaseException], ...] = (redis.exceptions.ConnectionError,
                                                         redis.exceptions.TimeoutError)
        self._redis_error = redis.exceptions.RedisError
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                               socket_connect_timeout=timeout_s)
        except ValueError as e:
            raise ValueError(f"invalid --state-store URL: {e}") from None
        kw = self.client.connection_pool.connection_kwargs
        where = kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', '?')}"
        self.description = f"Redis {where} db {kw.get('db', 0)}"  # no password in logs
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.owner = owner
        self._put = self.client.register_script(_PUT)
        self._delete = self.client.register_script(_DELETE)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self._redis_error as e:
            raise StoreUnavailable(f"{self.description}: {what} failed: {e}") from None

    def ping(self) -> None:
        self._call("PING", self.client.ping)

    def put(self, items: list[tuple[str, bytes]], *, claim: bool = False) -> list[bool]:
        def run() -> list[bool]:
            pipe = self.client.pipeline(transaction=False)
            for key, data in items:
                self._put(keys=[self.PREFIX + key], args=[self.owner, data, self.ttl_ms, int(claim)],
                          client=pipe)
            return [bool(r) for r in pipe.execute()]
        return self._call("write", run) if items else []

    def get(self, key: str) -> bytes | None:
        return self._call("read", lambda: self.client.hget(self.PREFIX + key, "data"))

    def delete(self, keys: list[str]) -> None:
        def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                self._delete(keys=[self.PREFIX + key], args=[self.owner], client=pipe)
            pipe.execute()
        if keys:
            self._call("delete", run)

    def memory_usage(self, key: str) -> int | None:
        """Bytes Redis uses for one record (``MEMORY USAGE``), for the benchmarks."""
        return self._call("MEMORY USAGE", lambda: self.client.memory_usage(self.PREFIX + key, samples=0))

    def close(self) -> None:
        self.client.close()


def open_store(*, state_dir: str | None, state_store: str | None, ttl_s: float,
               owner: str) -> SnapshotStore:
    """The store a server's settings name (exactly one of ``state_dir``, ``state_store``)."""
    if state_dir:
        return DiskStore(state_dir, ttl_s)
    assert state_store
    return RedisStore(state_store, ttl_s, owner)
