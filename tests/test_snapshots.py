"""Session snapshot records and stores (``server/core/snapshots.py``): encoding, damage detection,
fingerprints, the SQLite disk store and the Redis store against a real ``redis-server``. No JAX,
no server: the engine's use of them is in test_durability.py and test_server_restart.py."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, redis_server

from evssm.server.core.snapshots import (
    CorruptSnapshot,
    DiskStore,
    RedisStore,
    SnapshotRecord,
    StoreLocked,
    StoreUnavailable,
    decode,
    encode,
    token_key,
    weights_fingerprint,
)

TOKEN = "Xq3-a-resume-token-of-the-usual-length-Zk"


def record(events: int = 1000, words: int = 293, probs: bool = True, seed: int = 0,
           token: str = TOKEN) -> SnapshotRecord:
    rng = np.random.default_rng(seed)
    return SnapshotRecord(
        key=token_key(token), session="9f2c4e1ab07d3e55", model="small", fingerprint="ab" * 16,
        row=rng.integers(-2**31, 2**31 - 1, words, dtype=np.int64).astype(np.int32), events=events,
        last_t=events * 50 if events else None,
        probs=rng.dirichlet(np.ones(20)).astype(np.float32) if probs else None, top_k=3)


def same(a: SnapshotRecord, b: SnapshotRecord) -> bool:
    return (a.key, a.session, a.model, a.fingerprint, a.events, a.last_t, a.top_k, a.written) == \
        (b.key, b.session, b.model, b.fingerprint, b.events, b.last_t, b.top_k, b.written) and \
        np.array_equal(a.row, b.row) and a.row.dtype == np.int32 and \
        ((a.probs is None and b.probs is None) or np.array_equal(a.probs, b.probs))


# --- records ---------------------------------------------------------------------------------
@pytest.mark.parametrize("probs", [True, False])
def test_record_round_trip_is_exact(probs: bool) -> None:
    rec = record(probs=probs)
    back = decode(encode(rec))
    assert same(rec, back)
    empty = record(events=0, probs=False)
    assert same(empty, decode(encode(empty))) and decode(encode(empty)).last_t is None


def test_truncated_damaged_or_foreign_bytes_are_refused() -> None:
    data = encode(record())
    for cut in sorted({0, 1, 5, 17, len(data) // 2, len(data) - 200, len(data) - 1}):
        with pytest.raises(CorruptSnapshot):
            decode(data[:cut])
    rng = np.random.default_rng(1)
    for at in rng.integers(40, len(data), 20):  # a flipped bit in the body fails the checksum
        damaged = bytearray(data)
        damaged[at] ^= 0x10
        with pytest.raises(CorruptSnapshot):
            decode(bytes(damaged))
    for foreign in (b"", b"\x00" * 64, b"not msgpack at all \xff\xfe", b"\x93\x01\x02\x03"):
        with pytest.raises(CorruptSnapshot):
            decode(foreign)


def test_the_key_is_a_hash_and_no_record_holds_the_token() -> None:
    key = token_key(TOKEN)
    assert len(key) == 64 and int(key, 16) >= 0 and TOKEN not in key
    assert token_key(TOKEN + "x") != key
    assert TOKEN.encode() not in encode(record())


def test_fingerprint_changes_with_any_weight_or_the_config() -> None:
    rng = np.random.default_rng(0)
    arrays = [("params/a", rng.normal(size=(4, 3)).astype(np.float32)),
              ("params/b", rng.normal(size=7).astype(np.float32))]
    config = {"d_model": 16, "sensor": {"kind": "1d", "channels": 700}}
    base = weights_fingerprint(arrays, config)
    assert base == weights_fingerprint(list(reversed(arrays)), dict(reversed(config.items())))
    nudged = [(arrays[0][0], arrays[0][1].copy()), arrays[1]]
    nudged[0][1][2, 1] = np.nextafter(nudged[0][1][2, 1], np.float32(1))  # one ulp
    assert weights_fingerprint(nudged, config) != base
    assert weights_fingerprint(arrays, {**config, "d_model": 17}) != base
    assert weights_fingerprint([(arrays[0][0], arrays[0][1].astype(np.float64)), arrays[1]], config) != base


# --- disk ----------------------------------------------------------------------------------------
def age(directory: Path, key: str, seconds: float) -> None:
    """Make a record look ``seconds`` older (as if written that long ago)."""
    with sqlite3.connect(directory / DiskStore.FILE) as db:
        db.execute("UPDATE snapshots SET written = written - ? WHERE key = ?", (seconds, key))


def test_disk_store_put_get_delete(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, ttl_s=60)
    a, b = record(seed=1), record(seed=2, token="another")
    assert store.put([(a.key, encode(a)), (b.key, encode(b))]) == [True, True]
    assert same(decode(store.get(a.key)), a) and same(decode(store.get(b.key)), b)
    newer = record(events=2000, seed=3)
    store.put([(a.key, encode(newer))])
    assert decode(store.get(a.key)).events == 2000
    store.delete([a.key, a.key])  # deleting twice is harmless
    assert store.get(a.key) is None and store.get(b.key) is not None
    assert store.get("'; DROP TABLE snapshots; --") is None  # keys are parameters, never SQL
    assert 4000 < store.bytes_used() < 16000
    store.close()
    again = DiskStore(tmp_path, ttl_s=60)  # what was committed is there after a restart
    assert same(decode(again.get(b.key)), b)
    again.close()


def test_disk_store_is_one_server_per_directory(tmp_path: Path) -> None:
    first = DiskStore(tmp_path, ttl_s=60)
    with pytest.raises(StoreLocked, match=f"pid {os.getpid()}"):
        DiskStore(tmp_path, ttl_s=60)
    first.close()
    DiskStore(tmp_path, ttl_s=60).close()  # free again once the first is closed


def test_disk_store_expires_records_after_the_ttl(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, ttl_s=30)
    rec = record()
    store.put([(rec.key, encode(rec))])
    age(tmp_path, rec.key, 31)
    assert store.get(rec.key) is None
    store.close()


def test_disk_scan_counts_skips_and_cleans(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, ttl_s=60)
    good = [record(seed=i, token=f"t{i}") for i in range(3)]
    store.put([(r.key, encode(r)) for r in good])
    other = SnapshotRecord(**{**record(token="other").__dict__, "model": "dvs"})
    truncated, flipped, old = record(token="trunc"), record(token="flip"), record(token="old")
    damaged = bytearray(encode(flipped))
    damaged[-10] ^= 1
    store.put([(other.key, encode(other)), (truncated.key, encode(truncated)[:100]),
               (flipped.key, bytes(damaged)), (old.key, encode(old))])
    age(tmp_path, old.key, 120)
    report = store.scan(decode)
    assert report.valid == 4 and report.expired == 1
    assert sorted(report.corrupt) == sorted([truncated.key, flipped.key])
    assert report.models == {("small", "ab" * 16): 3, ("dvs", "ab" * 16): 1}
    for gone in (truncated, flipped, old):
        assert store.get(gone.key) is None
    with sqlite3.connect(tmp_path / DiskStore.FILE) as db:
        assert db.execute("SELECT count(*) FROM snapshots").fetchone()[0] == 4
    store.close()


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_a_damaged_database_is_moved_aside(tmp_path: Path, damage: str) -> None:
    store = DiskStore(tmp_path, ttl_s=60)
    recs = [record(seed=i, token=f"t{i}") for i in range(50)]
    store.put([(r.key, encode(r)) for r in recs])
    store.close()
    with sqlite3.connect(tmp_path / DiskStore.FILE) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    path = tmp_path / DiskStore.FILE
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:len(data) // 3])
    else:
        path.write_bytes(data[:100] + bytes(range(256)) * 40 + data[100 + 256 * 40:])
    store = DiskStore(tmp_path, ttl_s=60)
    assert store.damaged is not None and (tmp_path / store.damaged).exists()
    assert store.get(recs[0].key) is None  # a fresh database
    store.put([(recs[0].key, encode(recs[0]))])
    assert same(decode(store.get(recs[0].key)), recs[0])
    store.close()


def test_disk_writes_are_atomic_for_a_concurrent_reader(tmp_path: Path) -> None:
    """One thread rewrites a record over and over (two versions of different sizes) while
    another reads it: every read is one whole version, never a mix or a partial record."""
    store = DiskStore(tmp_path, ttl_s=60)
    versions = [encode(record(events=100, words=293)), encode(record(events=200, words=4000, seed=5))]
    key = token_key(TOKEN)
    store.put([(key, versions[0])])
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        i = 0
        while not stop.is_set():
            store.put([(key, versions[i % 2])])
            i += 1

    writer = threading.Thread(target=write)
    writer.start()
    seen = set()
    try:
        deadline = time.monotonic() + 1.5
        reads = 0
        while time.monotonic() < deadline and reads < 20000:
            data = store.get(key)
            assert data in versions, f"read {len(data or b'')} bytes: neither version"
            seen.add(decode(data).events)
            reads += 1
    except BaseException as e:
        errors.append(e)
    finally:
        stop.set()
        writer.join(10)
    assert not errors, errors[0]
    assert seen == {100, 200}
    store.close()


# --- Redis ---------------------------------------------------------------------------------------
@pytest.fixture
def redis_url(tmp_path: Path):
    with redis_server(tmp_path) as url:
        yield url


def test_redis_store_put_get_delete_ttl(redis_url: str) -> None:
    store = RedisStore(redis_url, ttl_s=30, owner="a")
    recs = [record(seed=i, token=f"t{i}") for i in range(5)]
    assert store.put([(r.key, encode(r)) for r in recs]) == [True] * 5
    for r in recs:
        assert same(decode(store.get(r.key)), r)
    ttl = store.client.pttl(RedisStore.PREFIX + recs[0].key)
    assert 25_000 < ttl <= 30_000
    assert store.memory_usage(recs[0].key) > recs[0].row.nbytes
    store.delete([recs[0].key])
    assert store.get(recs[0].key) is None and store.get(recs[1].key) is not None
    assert store.get(token_key("never written")) is None
    store.client.script_flush()  # scripts are loaded again when the server lost them
    assert store.put([(recs[0].key, encode(recs[0]))]) == [True]
    store.close()


def test_redis_writes_are_fenced_by_owner(redis_url: str) -> None:
    """A replica that lost a session to another can neither overwrite nor delete its record."""
    a = RedisStore(redis_url, ttl_s=30, owner="replica-a")
    b = RedisStore(redis_url, ttl_s=30, owner="replica-b")
    old, new = record(events=1000), record(events=3000, seed=1)
    assert a.put([(old.key, encode(old))]) == [True]
    assert b.put([(old.key, encode(new))]) == [False]  # not b's
    assert decode(a.get(old.key)).events == 1000
    assert b.put([(old.key, encode(old))], claim=True) == [True]  # b restored the session
    assert a.put([(old.key, encode(new))]) == [False]  # a's late write is refused
    a.delete([old.key])  # and so is a's deletion (eviction of its stale copy)
    assert decode(b.get(old.key)).events == 1000
    assert b.put([(old.key, encode(new))]) == [True]
    b.delete([old.key])
    assert b.get(old.key) is None
    a.close()
    b.close()


def test_redis_unreachable_is_a_store_error() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", ttl_s=30, owner="a", timeout_s=1)
    rec = record()
    for call in (lambda: store.put([(rec.key, encode(rec))]), lambda: store.get(rec.key),
                 lambda: store.delete([rec.key]), store.ping):
        with pytest.raises(StoreUnavailable, match="127.0.0.1"):
            call()
    with pytest.raises(ValueError, match="state-store"):
        RedisStore("redis://127.0.0.1:notaport/0", ttl_s=30, owner="a")
