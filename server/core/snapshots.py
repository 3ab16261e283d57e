"""Session snapshots: the record, its encoding, and the stores that keep it (no JAX).

A snapshot holds what a session needs to go on after its server is gone: the packed state row,
the event count and last timestamp the row covers, the last probabilities (so that an empty packet
is answered at once), top-k, the declared source sensor and the count its crop removed, the id of
the API key that opened the session (only that key may resume it; never the key itself), the
model's name and a fingerprint of the model's weights (a row is meaningless under other weights),
and the API layer's live-sensor state as plain data (decisions, drop counts; absent in older records).
A windowed session's record holds its ``L`` lanes' rows one after another and the window (spec
and lane state, as plain data; absent in older records, which hold one row).
Nothing here knows of sessions, slots or the scheduler; the engine's glue is
:mod:`evssm.server.core.durability`.

Longer than 400 lines for a reason: the record's format and the two stores that keep it (SQLite,
Redis) are one contract, checked together by ``tests/test_snapshots.py``.

**Keys.** A snapshot is stored under the SHA-256 of the session's resume token, never the token:
whoever can read the store (a backup of the state directory, a shared Redis) must not be able to
take over a stream. The token holds 144 random bits, so a plain hash cannot be inverted by search.

**Integrity.** A record is a msgpack envelope ``[MAGIC, VERSION, crc32(body), body]`` around a
msgpack body; a truncated or damaged record fails to decode with :class:`CorruptSnapshot`.

**Stores.** Both are blocking byte stores with a time to live, used from the engine's writer and
reader threads:

- :class:`DiskStore`: one SQLite database per state directory, one row per session, each batch
  of records written in one transaction. One file per session (a temporary file renamed over
  the old one) was the first design and is just as atomic, but costs four system calls and a new
  inode per record: measured on the build machine, 10-15 times the time per record of a
  transaction's row, which at 10,000 busy sessions would keep the writer busy for most of every
  snapshot interval (docs/benchmarks.md). Lookups on resume are one indexed ``SELECT``. A lock
  file keeps a second server off the same directory.
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
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgpack
import numpy as np

log = logging.getLogger("evssm.server.snapshots")

MAGIC = "evssm-snapshot"
VERSION = 1


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
    """One session's snapshot. ``row`` int32 [words] (a window's ``L`` rows: [L * words]);
    ``probs`` float32 [C] or None (no complete final-rate window yet)."""

    key: str  # token_key(resume token)
    session: str  # the session id (logs only)
    model: str
    fingerprint: str
    row: np.ndarray
    events: int  # events of the current stream (since open or the last reset) the row covers
    last_t: int | None  # the last of those events' timestamp
    probs: np.ndarray | None
    top_k: int
    cropped: int = 0  # events of the stream a declared crop removed (not in ``events``)
    geometry: dict[str, Any] | None = None  # the declared source: {"sensor", "transform"}
    key_id: str | None = None  # the id of the API key that opened the session (None: no keys)
    live: dict[str, Any] | None = None  # the API layer's live-sensor state as plain data (None: none)
    written: float = field(default_factory=time.time)  # Unix time
    filters: dict[str, Any] | None = None  # the input filters' spec and state after ``events``
    # (``server/live/filtering.py``; None: no filters); ``cropped`` and ``events`` exclude what they removed
    window: dict[str, Any] | None = None  # a sliding window's spec and lane state after ``events``
    # (``server/api/windows.py``; None: no window); ``row`` then holds its lanes' rows one after another

    @property
    def lanes(self) -> int:
        """How many state rows ``row`` holds (a window's lanes; 1 without a window)."""
        state = self.window.get("state") if self.window else None
        counts = state.get("counts") if isinstance(state, dict) else None
        return len(counts) if isinstance(counts, list) and counts else 1


def encode(rec: SnapshotRecord) -> bytes:
    """The record's bytes: ``[MAGIC, VERSION, crc32(body), body]`` as msgpack."""
    body = msgpack.packb({
        "key": rec.key, "session": rec.session, "model": rec.model, "fingerprint": rec.fingerprint,
        "row": np.ascontiguousarray(rec.row, "<i4").tobytes(), "events": rec.events,
        "last_t": rec.last_t,
        "probs": None if rec.probs is None else np.ascontiguousarray(rec.probs, "<f4").tobytes(),
        "top_k": rec.top_k, "cropped": rec.cropped, "geometry": rec.geometry, "key_id": rec.key_id,
        "live": rec.live, "written": rec.written, "filters": rec.filters, "window": rec.window,
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
            top_k=int(d["top_k"]), cropped=int(d["cropped"]),
            geometry=None if d["geometry"] is None else dict(d["geometry"]),
            key_id=None if d.get("key_id") is None else str(d["key_id"]),
            live=None if d.get("live") is None else dict(d["live"]), written=float(d["written"]),
            filters=None if d.get("filters") is None else dict(d["filters"]),
            window=None if d.get("window") is None else dict(d["window"]))
    except Exception as e:
        raise CorruptSnapshot(f"malformed snapshot body ({type(e).__name__}: {e})") from None
    if rec.events < 0 or rec.cropped < 0 or rec.row.size == 0:
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
    corrupt: list[str] = field(default_factory=list)  # keys of damaged records (deleted)
    expired: int = 0
    models: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, fingerprint) -> n
    seconds: float = 0.0


class DiskStore:
    """The snapshots of one server in an SQLite database, ``DIR/snapshots.sqlite3`` (see the
    module docstring for why not one file per session).

    One row per session: key, record, time written. Batches are written in one transaction (WAL
    journal, ``synchronous=NORMAL``): a reader sees a record whole or not at all; a crashed process
    loses nothing that was committed, a crashed host at most the last transactions, and the
    database is never left half written. A record older than ``ttl_s`` is expired: not returned,
    and deleted by the next :meth:`scan`. A database SQLite cannot read is moved aside
    (``snapshots.sqlite3.damaged-<time>``) and a new one started. A lock file keeps a second
    server off the directory.
    """

    FILE = "snapshots.sqlite3"

    def __init__(self, directory: str | Path, ttl_s: float):
        self.root = Path(directory)
        self.path = self.root / self.FILE
        self.ttl_s = ttl_s
        self.description = f"state dir {self.root}"
        self.damaged: str | None = None  # the name a damaged database was moved to
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.root / "lock", "a+")
        except OSError as e:
            raise StoreUnavailable(f"cannot use state dir {self.root}: {e.strerror or e}") from None
        self._take_lock()
        try:
            self._open()
        except sqlite3.DatabaseError as e:
            self.damaged = f"{self.FILE}.damaged-{int(time.time())}"
            log.warning("%s: %s is damaged (%s); moved aside as %s, starting with no snapshots",
                        self.description, self.FILE, e, self.damaged)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(str(self.path) + suffix, self.root / (self.damaged + suffix))
            self._open()
        except OSError as e:
            raise StoreUnavailable(f"cannot use {self.path}: {e.strerror or e}") from None

    def _take_lock(self) -> None:
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "another process"
            self._lock_file.close()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise StoreLocked(f"state dir {self.root} is in use by {holder}; "
                                  "each server needs its own directory") from None
            raise
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"evssm serve (pid {os.getpid()})\n")
        self._lock_file.flush()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _open(self) -> None:
        """Open (or create) the database, checking it: raises sqlite3.DatabaseError if damaged."""
        self._w = self._connect()  # writes (the writer thread) ...
        try:
            self._w.execute("PRAGMA journal_mode=WAL")
            check = self._w.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            self._w.execute("CREATE TABLE IF NOT EXISTS snapshots "
                            "(key TEXT PRIMARY KEY, data BLOB NOT NULL, written REAL NOT NULL)")
        except BaseException:
            self._w.close()
            raise
        self._r = self._connect()  # ... and reads (the reader thread), each behind its own lock
        self._w_lock = threading.Lock()
        self._r_lock = threading.Lock()

    def _write(self, what: str, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with self._w_lock:
            try:
                self._w.execute("BEGIN")
                self._w.executemany(sql, rows)
                self._w.execute("COMMIT")
            except sqlite3.Error as e:
                with contextlib.suppress(sqlite3.Error):
                    self._w.execute("ROLLBACK")
                raise StoreUnavailable(f"{self.description}: {what} failed: {e}") from None

    def put(self, items: list[tuple[str, bytes]], *, claim: bool = False) -> list[bool]:
        now = time.time()
        self._write("write", "INSERT INTO snapshots (key, data, written) VALUES (?, ?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET data = excluded.data, written = excluded.written",
                    [(key, data, now) for key, data in items])
        return [True] * len(items)

    def get(self, key: str) -> bytes | None:
        with self._r_lock:
            try:
                row = self._r.execute("SELECT data, written FROM snapshots WHERE key = ?", (key,)).fetchone()
            except sqlite3.Error as e:
                raise StoreUnavailable(f"{self.description}: read failed: {e}") from None
        if row is None or time.time() - row[1] > self.ttl_s:
            return None
        return bytes(row[0])

    def delete(self, keys: list[str]) -> None:
        self._write("delete", "DELETE FROM snapshots WHERE key = ?", [(key,) for key in keys])

    def scan(self, check: Callable[[bytes], SnapshotRecord]) -> ScanReport:
        """Check every record with ``check`` (raises CorruptSnapshot): count the valid ones by
        (model, fingerprint); delete damaged and expired records."""
        t0 = time.perf_counter()
        report = ScanReport()
        now = time.time()
        drop: list[str] = []
        with self._r_lock:
            rows = self._r.execute("SELECT key, data, written FROM snapshots").fetchall()
        for key, data, written in rows:
            if now - written > self.ttl_s:
                drop.append(key)
                report.expired += 1
                continue
            try:
                rec = check(bytes(data))
                if rec.key != key:
                    raise CorruptSnapshot(f"record of key {rec.key[:12]}... stored under {key[:12]}...")
            except CorruptSnapshot as e:
                drop.append(key)
                report.corrupt.append(key)
                log.warning("%s: snapshot %s... skipped and deleted: %s", self.description, key[:12], e)
                continue
            report.valid += 1
            report.models[(rec.model, rec.fingerprint)] = report.models.get((rec.model, rec.fingerprint), 0) + 1
        if drop:
            self.delete(drop)
        report.seconds = time.perf_counter() - t0
        return report

    def bytes_used(self) -> int:
        """Bytes the database takes (pages in use; for the benchmarks)."""
        with self._r_lock:
            pages, free, size = (self._r.execute(f"PRAGMA {p}").fetchone()[0]
                                 for p in ("page_count", "freelist_count", "page_size"))
        return (pages - free) * size

    def close(self) -> None:
        for name in ("_r", "_w"):
            with contextlib.suppress(AttributeError, sqlite3.Error):
                getattr(self, name).close()
        with contextlib.suppress(OSError):
            self._lock_file.close()  # releases the lock


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
