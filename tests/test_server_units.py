"""Server units without a model or sockets: protocol decoding, settings, slots, buckets, metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import msgpack
import numpy as np
import pytest

from evssm.models.events import SensorSpec
from evssm.server.metrics import Metrics
from evssm.server.protocol import (RECORD_DTYPE, Code, ProtocolError, decode_events, decode_frame,
                                   frame_type, parse_open, parse_seq, prepare)
from evssm.server.sessions import SessionTable, SlotError, SlotPool
from evssm.server.settings import ModelSpec, Settings, parse_ints

D1 = SensorSpec.one_d(700)
D2 = SensorSpec.two_d(34, 34)


def code_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)
    return str(info.value.code)


# --- frames ------------------------------------------------------------------------------------
def test_decode_frame_msgpack_json_and_garbage():
    assert decode_frame(msgpack.packb({"type": "open"})) == {"type": "open"}
    assert decode_frame(json.dumps({"type": "reset"})) == {"type": "reset"}
    assert code_of(decode_frame, b"\xc1\x00") == "malformed_frame"
    assert code_of(decode_frame, "{not json") == "malformed_frame"
    assert code_of(decode_frame, msgpack.packb([1, 2])) == "malformed_frame"
    assert code_of(frame_type, {"type": "nope"}) == "unknown_type"
    assert code_of(frame_type, {}) == "unknown_type"
    assert code_of(parse_seq, {"seq": "1"}) == "invalid_field"
    assert code_of(parse_seq, {"seq": True}) == "invalid_field"
    assert parse_seq({"seq": 7}) == 7 and parse_seq({}) is None
    assert code_of(parse_open, {"top_k": -1}) == "invalid_field"
    assert code_of(parse_open, {"model": 3}) == "invalid_field"
    assert parse_open({"model": "m", "resume": "r"}).top_k == 3


def test_columns_lists_bins_and_records_decode_alike():
    rng = np.random.default_rng(0)
    t = np.cumsum(rng.integers(0, 100, 50)).astype(np.int64)
    x, y, p = rng.integers(0, 34, 50), rng.integers(0, 34, 50), rng.integers(0, 2, 50)
    lists = {"t": t.tolist(), "x": x.tolist(), "y": y.tolist(), "p": p.tolist()}
    bins = {"t": t.astype("<i8").tobytes(), "x": x.astype("<u2").tobytes(),
            "y": y.astype("<u2").tobytes(), "p": p.astype("u1").tobytes()}
    rec = np.zeros(50, RECORD_DTYPE)
    rec["t"], rec["x"], rec["y"], rec["on"] = t, x, y, p
    packed = {"records": rec.tobytes()}
    outs = [prepare(decode_events(m, D2), D2, None) for m in (lists, bins, packed)]
    for tok, gap in outs[1:]:
        np.testing.assert_array_equal(tok, outs[0][0])
        np.testing.assert_array_equal(gap, outs[0][1])
    np.testing.assert_array_equal(outs[0][0], x + 34 * y + 34 * 34 * p)
    # A 1-D sensor reads x of a record as the channel and ignores y/on.
    tok, _ = prepare(decode_events(packed, D1), D1, None)
    np.testing.assert_array_equal(tok, x)
    # Empty packets are fine.
    tok, gap = prepare(decode_events({"t": [], "x": []}, D1), D1, 5)
    assert tok.shape == gap.shape == (0,)


@pytest.mark.parametrize("msg, code", [
    ({"t": [1]}, "missing_column"),
    ({"x": [1]}, "missing_column"),
    ({"t": [1], "x": None}, "missing_column"),
    ({"t": [1], "x": "abc"}, "invalid_column"),
    ({"t": [1], "x": [1.5]}, "invalid_column"),
    ({"t": [1], "x": [True]}, "invalid_column"),
    ({"t": [[1]], "x": [1]}, "invalid_column"),
    ({"t": [1, 2], "x": [1, [2]]}, "invalid_column"),
    ({"t": [2 ** 70], "x": [1]}, "invalid_column"),
    ({"t": b"\x00" * 7, "x": [1]}, "invalid_column"),
    ({"t": [1, 2], "x": b"\x01\x00"}, "length_mismatch"),
    ({"t": [1, 2], "x": [1]}, "length_mismatch"),
    ({"records": b"\x00" * 12}, "invalid_column"),
    ({"records": [1, 2]}, "invalid_column"),
    ({"records": b"\x00" * 13, "t": [1]}, "invalid_field"),
    ({"t": list(range(11)), "x": [0] * 11}, "packet_too_large"),
    ({"t": b"\x00" * 8 * 11, "x": b"\x00" * 2 * 11}, "packet_too_large"),
    ({"records": b"\x00" * 13 * 11}, "packet_too_large"),
])
def test_bad_columns(msg, code):
    assert code_of(decode_events, msg, D1, 10) == code


def test_bad_addresses_and_timestamps():
    ev = decode_events({"t": [1, 2], "x": [0, 700]}, D1)
    assert code_of(prepare, ev, D1, None) == "address_out_of_range"
    ev = decode_events({"t": [1, 2], "x": [0, -1]}, D1)
    assert code_of(prepare, ev, D1, None) == "address_out_of_range"
    for col, bad in (("x", 34), ("y", 34), ("p", 2)):
        m = {"t": [1], "x": [0], "y": [0], "p": [0]}
        m[col] = [bad]
        assert code_of(prepare, decode_events(m, D2), D2, None) == "address_out_of_range"
    assert code_of(decode_events, {"t": [1], "x": [0], "y": [0]}, D2) == "missing_column"
    ev = decode_events({"t": [5, 4], "x": [0, 0]}, D1)
    assert code_of(prepare, ev, D1, None) == "timestamps_decreasing"
    ev = decode_events({"t": [5, 6], "x": [0, 0]}, D1)
    assert code_of(prepare, ev, D1, 7) == "timestamps_decreasing"
    tok, gap = prepare(ev, D1, 3)
    assert gap.tolist() == [2, 1]
    assert prepare(ev, D1, None)[1].tolist() == [0, 1]


def test_every_error_code_is_stable():
    # The contract's codes (docs/protocol.md); renaming one breaks clients.
    assert {c.value for c in Code} >= {
        "malformed_frame", "unknown_type", "invalid_field", "missing_column", "invalid_column",
        "length_mismatch", "address_out_of_range", "timestamps_decreasing", "packet_too_large",
        "unknown_model", "server_full", "no_session", "unknown_session", "session_expired",
        "not_ready", "draining", "internal_error", "snapshot_incompatible", "store_unavailable"}


# --- settings ----------------------------------------------------------------------------------
def test_settings_from_env_and_overrides():
    env = {"EVSSM_PORT": "9001", "EVSSM_MAX_SESSIONS": "7", "EVSSM_MODEL": "a=config:tiny, config:shd",
           "EVSSM_BATCH_BUCKETS": "64,1,8", "EVSSM_SESSION_IDLE_TIMEOUT": "2.5",
           "EVSSM_CLASSIFY_LENGTH_BUCKETS": "none", "EVSSM_HOST": ""}
    s = Settings.from_env(env)
    assert (s.port, s.max_sessions, s.session_idle_timeout, s.host) == (9001, 7, 2.5, "127.0.0.1")
    assert s.batch_buckets == (1, 8, 64) and s.classify_length_buckets == ()
    assert s.models == (ModelSpec("a", "config:tiny"), ModelSpec(None, "config:shd"))
    s = Settings.from_env(env, port="9002", models=["/ckpt/x=y"], max_sessions=None)
    assert s.port == 9002 and s.max_sessions == 7
    assert s.models == (ModelSpec(None, "/ckpt/x=y"),)
    assert ModelSpec.parse("default") == ModelSpec(None, None)
    assert parse_ints("4096 64,256") == (64, 256, 4096)
    with pytest.raises(ValueError):
        Settings.from_env({"EVSSM_PORT": "eighty"})
    with pytest.raises(ValueError):
        Settings(max_sessions=0)
    with pytest.raises(ValueError):
        Settings(models=(ModelSpec("a", "x"), ModelSpec("a", "y")))
    assert Settings.from_env({"EVSSM_BACKEND": "xla"}).backend == "xla"
    assert Settings().backend == "auto"
    with pytest.raises(ValueError, match="backend must be auto, native or xla"):
        Settings.from_env({"EVSSM_BACKEND": "cuda"})


def test_snapshot_settings():
    s = Settings.from_env({"EVSSM_STATE_DIR": "/var/lib/evssm", "EVSSM_SNAPSHOT_INTERVAL": "2",
                           "EVSSM_SESSION_IDLE_TIMEOUT": "60"})
    assert (s.state_dir, s.state_store, s.snapshot_interval, s.snapshots) == ("/var/lib/evssm", None, 2.0, True)
    assert s.snapshot_ttl == 64.0  # the idle timeout, plus two intervals
    assert not Settings().snapshots and Settings().snapshot_interval == 5.0
    assert Settings.from_env({}, state_store="redis://r:6379/1").state_store == "redis://r:6379/1"
    with pytest.raises(ValueError, match="not both"):
        Settings(state_dir="/a", state_store="redis://r:6379/0")
    with pytest.raises(ValueError, match="redis://"):
        Settings(state_store="http://r:6379")
    with pytest.raises(ValueError, match="snapshot_interval"):
        Settings(snapshot_interval=0)


def test_serve_help_lists_every_option_and_env_var():
    out = subprocess.run([sys.executable, "-m", "evssm.cli", "serve", "--help"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    for opt in ("--model", "--host", "--port", "--max-sessions", "--max-packet-events",
                "--session-idle-timeout", "--log-level", "--state-dir", "--state-store",
                "--snapshot-interval"):
        assert opt in out
    for env in ("EVSSM_MODEL", "EVSSM_MAX_SESSIONS", "EVSSM_SESSION_IDLE_TIMEOUT"):
        assert env in out


def test_api_layer_imports_no_jax():
    code = ("import sys; import evssm.server.app, evssm.server.cli, evssm.server.engine; "
            "print(any(m == 'jax' or m.startswith('jax.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


# --- slots ---------------------------------------------------------------------------------------
def test_slot_pool_lifecycle():
    pool = SlotPool(2)
    a, dirty_a = pool.allocate("A")
    b, dirty_b = pool.allocate("B")
    assert a != b and not dirty_a and not dirty_b
    with pytest.raises(SlotError):
        pool.allocate("C")  # never shares a slot
    with pytest.raises(SlotError):
        pool.free(a, "B")  # only the owner frees
    pool.free(a, "A")
    with pytest.raises(SlotError):
        pool.free(a, "A")  # exactly once
    c, dirty_c = pool.allocate("C")
    assert c == a and dirty_c  # a reused slot must be zeroed first
    pool.zeroed(c)
    assert not pool.is_dirty(c)


def test_session_table_capacity_and_dirty_reuse():
    table = SessionTable(max_sessions=2, slots_per_model={"m": 2})
    s1 = table.open("m", 3)
    s2 = table.open("m", 3)
    assert not s1.queue and s1.slot != s2.slot and s1.token != s2.token
    with pytest.raises(Exception):
        table.open("m", 3)
    assert table.by_token(s1.token) is s1 and table.by_token(s1.id) is None
    table.release(s1)
    with pytest.raises(SlotError):
        table.release(s1)
    assert table.by_token(s1.token) is None
    s3 = table.open("m", 3)
    assert s3.slot == s1.slot and len(s3.queue) == 1  # a Reset zeroes the reused row first
    s3.queue.append(object())
    with pytest.raises(SlotError):
        table.release(s3)  # never while work is queued


# --- buckets, softmax, metrics -------------------------------------------------------------------
def test_bucket_and_softmax():
    from evssm.server.runner import bucket, softmax

    assert [bucket(v, (1, 8, 64)) for v in (1, 2, 8, 9, 64)] == [1, 8, 8, 64, 64]
    with pytest.raises(ValueError):
        bucket(65, (1, 8, 64))
    p = softmax(np.array([[0.0, 1000.0, 0.0], [1.0, 1.0, 1.0]], np.float32))
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
    assert p[0, 1] == pytest.approx(1.0) and p[1, 0] == pytest.approx(1 / 3)


def test_metrics_names_and_fresh_registries():
    m1, m2 = Metrics(), Metrics()
    m1.init_model("a", 100, 4)
    m1.packet_done("a", 256, 0.004)
    m1.rejected.labels(code="malformed_frame").inc()
    m1.http_requests.labels(route="/healthz", status="200").inc()
    text = m1.render().decode()
    for name in ("evssm_events_total{model=\"a\"} 256.0", "evssm_packets_total{model=\"a\"} 1.0",
                 "evssm_sessions_active{model=\"a\"}", "evssm_packet_latency_seconds_bucket",
                 "evssm_step_latency_seconds_bucket", "evssm_batch_size_bucket",
                 "evssm_queue_wait_seconds_bucket", "evssm_rejected_packets_total{code=\"malformed_frame\"}",
                 "evssm_http_requests_total{route=\"/healthz\",status=\"200\"}",
                 "evssm_compilations_total{model=\"a\"}"):
        assert name in text, name
    assert "evssm_events_total{model=\"a\"}" not in m2.render().decode()
    stats = m1.stats({"a": 1})
    assert stats["events_total"] == 256 and stats["sessions_active"] == 1
    assert stats["models"]["a"]["latency_p50_ms"] == pytest.approx(4.0)
    assert stats["events_per_s"] > 0
