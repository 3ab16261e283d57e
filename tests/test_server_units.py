"""Server units without a model or sockets: protocol decoding, settings, slots, buckets, metrics."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import msgpack
import numpy as np
import pytest
from numeric import assert_close

from evssm.models.events import SensorSpec
from evssm.models.wire import ErrorFrame
from evssm.server.api.protocol import (
    RECORD_DTYPE,
    ClassifyLimits,
    ClassifyRequest,
    Code,
    ProtocolError,
    decode_events,
    decode_frame,
    frame_type,
    parse_classify,
    parse_open,
    parse_seq,
    prepare,
    shorten,
)
from evssm.server.api.security import (
    ApiKeys,
    KeyFileError,
    bearer_token,
    normalize_origins,
    origin_allowed,
    query_token,
)
from evssm.server.core.sessions import ClientFull, ServerFull, SessionTable, SlotError, SlotPool
from evssm.server.core.staging import StagingBuffer
from evssm.server.metrics import Metrics
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
    ({"t": [1, 2], "x": [1, True]}, "invalid_column"),  # numpy alone reads it as [1, 1]
    ({"t": [1, 2], "x": [1, 2.0]}, "invalid_column"),
    ({"t": [1, 2 ** 63], "x": [1, 2]}, "invalid_column"),
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


def test_timestamps_far_apart_never_wrap():
    """``t = [2**63 - 1, -2]``: the int64 difference wraps to a positive gap (the clock went back
    and the packet was accepted); within a packet, against the session, and for a new stream."""
    big = 2 ** 63 - 1
    ev = decode_events({"t": [big, -2], "x": [0, 0]}, D1)
    assert code_of(prepare, ev, D1, None) == "timestamps_decreasing"
    assert code_of(prepare, decode_events({"t": [-2], "x": [0]}, D1), D1, big) == "timestamps_decreasing"
    assert code_of(prepare, decode_events({"t": [-(2 ** 63)], "x": [0]}, D1), D1, 5) == "timestamps_decreasing"
    # Far apart but in order: the gap is exact and clamped, never negative.
    _, gaps = prepare(decode_events({"t": [-(2 ** 63), big, big], "x": [0, 0, 0]}, D1), D1, None)
    assert gaps.tolist() == [0, 2 ** 31 - 1, 0]
    _, gaps = prepare(decode_events({"t": [big], "x": [0]}, D1), D1, -(2 ** 63))
    assert gaps.tolist() == [2 ** 31 - 1]


def test_error_messages_never_grow_with_the_bad_value():
    for msg in ({"type": "x" * (1 << 20)}, {"type": [0] * 100_000}, {"type": b"\x00" * (1 << 20)}):
        err = code_of(frame_type, msg)
        assert err == "unknown_type"
        with pytest.raises(ProtocolError) as info:
            frame_type(msg)
        assert len(info.value.message) < 200, len(info.value.message)
    assert len(ErrorFrame("malformed_frame", "y" * 100_000).to_wire()["message"]) == 400
    assert shorten("abc") == "'abc'" and len(shorten("z" * 10_000)) == 60


def test_classify_body_model_must_name_a_model():
    """``"model": []`` and ``""`` used to mean the default model silently."""
    limits = ClassifyLimits(max_streams=4, max_events=100, default_top_k=3)
    ok = {"streams": [{"t": [1, 2], "x": [3, 4]}]}

    def parse(body: dict) -> ClassifyRequest:
        return parse_classify(json.dumps(body).encode(), False, {"m": D1}, "m", limits)

    assert parse(ok).model == "m" and parse({**ok, "model": None}).model == "m"
    assert code_of(parse, {**ok, "model": []}) == "invalid_field"
    assert code_of(parse, {**ok, "model": ""}) == "unknown_model"
    assert code_of(parse, {**ok, "model": "x" * 10_000}) == "unknown_model"
    assert code_of(parse, {"streams": [{"t": [2 ** 63 - 1, -2], "x": [0, 0]}]}) == "timestamps_decreasing"
    assert code_of(parse, {"streams": [{"t": [1, 2], "x": [1, True]}]}) == "invalid_column"
    req = parse_classify(msgpack.packb(ok), True, {"m": D1}, "m", limits)
    assert req.tokens[0].tolist() == [3, 4] and req.last_t == [2] and req.events == 2


# --- security helpers ----------------------------------------------------------------------------
def test_api_key_file_parsing_and_constant_time_identify(tmp_path):
    key_a, key_b = "k" * 16 + "-alpha", "k" * 16 + "-beta"
    keys = ApiKeys.parse(["# ops keys", "", f"  {key_a}  ", key_b, key_a])
    assert len(keys.digests) == 2
    ida, idb = keys.identify(key_a), keys.identify(key_b)
    assert ida and idb and ida != idb and key_a not in ida
    assert keys.identify(key_a + "x") is None and keys.identify("") is None and keys.identify(None) is None
    for bad, match in ((["short"], "at least 16"), (["# only a comment", ""], "no key"),
                       (["has a space in it!!"], "without spaces")):
        with pytest.raises(KeyFileError, match=match):
            ApiKeys.parse(bad)
    path = tmp_path / "keys"
    path.write_text(f"{key_a}\n")
    assert ApiKeys.load(path).identify(key_a) == ida
    with pytest.raises(KeyFileError, match="cannot read"):
        ApiKeys.load(tmp_path / "missing")
    headers = [(b"authorization", f"Bearer {key_a}".encode())]
    assert bearer_token(headers) == key_a and bearer_token([(b"authorization", b"Basic xyz")]) is None
    assert query_token(f"session=s1&access_token={key_b}".encode()) == key_b


@pytest.mark.parametrize("origin, host, allowed, ok", [
    (None, "h:8000", (), True),  # not a browser
    ("http://h:8000", "h:8000", (), True),  # the server's own page (e.g. /dashboard)
    ("http://H:8000", "h:8000", (), True),
    ("https://evssm.example", "evssm.example", (), True),  # behind a TLS proxy that keeps Host
    ("https://evssm.example:443", "evssm.example", (), True),
    ("http://h:8001", "h:8000", (), False),  # another port is another origin
    ("http://evil.example", "127.0.0.1:8000", (), False),
    ("null", "h:8000", (), False),
    ("null", "h:8000", ("null",), True),
    ("https://app.example", "h:8000", ("https://app.example",), True),
    ("https://app.example.evil", "h:8000", ("https://app.example",), False),
    ("http://anything", "h:8000", ("*",), True),
    ("http://h:8000", None, (), False),
])
def test_origin_policy(origin, host, allowed, ok):
    assert origin_allowed(origin, host, normalize_origins(allowed)) is ok


def test_security_settings_from_env():
    s = Settings.from_env({"EVSSM_API_KEYS": "/run/secrets/keys", "EVSSM_PUBLIC_METRICS": "false",
                           "EVSSM_ALLOWED_ORIGINS": "https://a.example, https://b.example",
                           "EVSSM_MAX_SESSIONS": "40", "EVSSM_HEADER_TIMEOUT": "3"})
    assert [Settings(max_sessions=n).sessions_per_client for n in (3, 8, 16, 40, 256)] == [3, 8, 8, 10, 64]
    assert s.api_keys == "/run/secrets/keys" and s.public_metrics is False and s.header_timeout == 3.0
    assert s.allowed_origins == ("https://a.example", "https://b.example")
    assert s.sessions_per_client == 10
    assert Settings(max_sessions=40, max_sessions_per_client=99).sessions_per_client == 40
    assert Settings().public_metrics is True and Settings().api_keys is None
    with pytest.raises(ValueError, match=r"public_metrics=.maybe. \(EVSSM_PUBLIC_METRICS\): .*valid boolean"):
        Settings.from_env({"EVSSM_PUBLIC_METRICS": "maybe"})


def test_edge_settings_reach_uvicorn_and_default_closed():
    """Compression off and no trusted proxy unless asked (uvicorn's own defaults: on, loopback)."""
    from evssm.server.cli import uvicorn_options

    default = uvicorn_options(Settings())
    assert default["ws_per_message_deflate"] is False and default["proxy_headers"] is False
    assert "limit_concurrency" not in default  # ConnectionCap enforces it, sparing the probes
    s = Settings.from_env({"EVSSM_WS_COMPRESSION": "true", "EVSSM_FORWARDED_ALLOW_IPS": "10.0.0.0/8",
                           "EVSSM_OPEN_TIMEOUT": "2.5"})
    opened = uvicorn_options(s)
    assert opened["ws_per_message_deflate"] is True and opened["proxy_headers"] is True
    assert opened["forwarded_allow_ips"] == "10.0.0.0/8" and s.open_timeout == 2.5


@pytest.mark.parametrize("msg, args", [
    ("< %s: %s", ("Authorization", "Bearer SECRET-KEY-123")),
    ("headers %s", ("[(b'authorization', b'Bearer SECRET-KEY-123')]",)),
    ("GET /v1/stream?access_token=SECRET-KEY-123&session=s HTTP/1.1", ()),
    ("%s", ({"Authorization": "SECRET-KEY-123"},)),
])
def test_log_redaction_hides_keys_in_any_shape(msg, args):
    import logging

    from evssm.server.api.security import RedactSecrets

    record = logging.LogRecord("websockets", logging.DEBUG, __file__, 1, msg, args, None)
    assert RedactSecrets().filter(record)
    text = record.getMessage()
    assert "SECRET-KEY-123" not in text and "***" in text, text


def test_session_table_caps_each_owner():
    table = SessionTable(max_sessions=4, slots_per_model={"m": 4})
    a = [table.open("m", 3, owner="addr:1", owner_limit=2) for _ in range(2)]
    with pytest.raises(ClientFull):
        table.open("m", 3, owner="addr:1", owner_limit=2)
    table.open("m", 3, owner="addr:2", owner_limit=2)  # others are not locked out
    table.release(a[0], idle=True)
    table.open("m", 3, owner="addr:1", owner_limit=2)  # room again once one is released


def test_stats_window_holds_only_its_last_seconds_without_being_read():
    """The soak's creep: packets were kept until /v1/stats was polled (up to 200,000 per model)."""
    from evssm.server.metrics import STATS_WINDOW_S, _Window

    w = _Window()
    one = np.array([0.001])
    for i in range(50_000):
        w.add(i * 0.001, 1, one)  # 50 s of 1,000 one-packet steps/s, never summarised
    assert len(w.steps) <= STATS_WINDOW_S * 1000 + 1
    assert w.summary(50.0)["packets_per_s"] == pytest.approx(1000, rel=0.01)


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


def test_serve_options_beat_variables_beat_defaults_and_errors_say_where():
    import argparse

    from evssm.server.cli import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    env = {"EVSSM_PORT": "9001", "EVSSM_MAX_SESSIONS": "7", "EVSSM_MODEL": "a=config:tiny"}
    s = settings_from_args(parser.parse_args(["--port", "9002", "--model", "b=config:shd"]), env)
    assert (s.port, s.max_sessions, s.host) == (9002, 7, "127.0.0.1")  # option > env > default
    assert s.models == (ModelSpec("b", "config:shd"),)
    assert settings_from_args(parser.parse_args([]), env).models == (ModelSpec("a", "config:tiny"),)
    with pytest.raises(ValueError, match=r"max_sessions='0' \(EVSSM_MAX_SESSIONS\)"):
        settings_from_args(parser.parse_args([]), {"EVSSM_MAX_SESSIONS": "0"})
    with pytest.raises(ValueError, match=r"port='x' \(--port\)"):
        settings_from_args(parser.parse_args(["--port", "x"]), {})
    with pytest.raises(ValueError, match="model names must be unique"):
        settings_from_args(parser.parse_args(["--model", "a=x", "--model", "a=y"]), {})
    # replace() validates; a Settings never holds a value the server would refuse.
    with pytest.raises(ValueError):
        s.replace(batch_buckets=())


def test_access_log_is_a_flag_off_by_default_and_connection_lines_are_dropped_without_it():
    import argparse
    import logging

    from evssm.server.cli import ConnectionLines, add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parse = lambda *argv, env=None: settings_from_args(parser.parse_args(list(argv)), env or {})  # noqa: E731
    assert parse().access_log is False
    assert parse("--access-log").access_log is True
    assert parse("--access-log", "false").access_log is False
    assert parse(env={"EVSSM_ACCESS_LOG": "true"}).access_log is True
    with pytest.raises(ValueError, match="access_log"):
        parse("--access-log", "sometimes")

    def record(msg: str, args: tuple = (), level: int = logging.INFO) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", level, __file__, 1, msg, args, None)

    keep = ConnectionLines().filter
    assert not keep(record("connection open")) and not keep(record("connection closed"))
    assert not keep(record('%s - "WebSocket %s" [accepted]', ("127.0.0.1:5", "/v1/stream")))
    assert keep(record("Started server process [%d]", (1,)))
    assert keep(record("connection open", level=logging.WARNING))


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
    code = ("import sys; import evssm.server.app, evssm.server.cli, evssm.server.core.engine; "
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
    assert not table.pools["m"].is_dirty(s1.slot) and s1.slot != s2.slot and s1.token != s2.token
    with pytest.raises(ServerFull):
        table.open("m", 3)
    assert table.by_token(s1.token) is s1 and table.by_token(s1.id) is None
    table.release(s1, idle=True)
    with pytest.raises(SlotError):
        table.release(s1, idle=True)
    assert table.by_token(s1.token) is None
    s3 = table.open("m", 3)
    assert s3.slot == s1.slot and table.pools["m"].is_dirty(s3.slot)  # the scheduler zeroes the reused row first
    with pytest.raises(SlotError):
        table.release(s3, idle=False)  # never while work is queued


# --- staging buffers -----------------------------------------------------------------------------
@pytest.mark.parametrize("capacity", [2, 3, 10, 257])
def test_staging_regions_never_overlap_and_the_ring_is_reused(capacity):
    """Random reserve/release in any order: held regions never overlap and stay inside the
    buffer; an empty ring always has room; the whole ring is used over time."""
    rng = np.random.default_rng(capacity)
    buf = StagingBuffer(capacity)
    held: list = []
    ends = set()
    for _ in range(4000):
        if held and rng.random() < 0.5:
            buf.release(held.pop(int(rng.integers(len(held)))))
            continue
        n = int(rng.integers(1, capacity))
        region = buf.reserve(n)
        if region is None:
            assert held, "an empty ring refused a region that fits"
            continue
        assert 0 <= region.start and region.start + region.size <= capacity
        for other in held:
            assert region.start + region.size <= other.start or other.start + other.size <= region.start
        held.append(region)
        ends.add(region.start + region.size)
    assert capacity in ends or capacity - 1 in ends  # it wrapped
    for region in held:
        buf.release(region)
    assert buf.held == 0 and buf.reserve(capacity - 1) is not None
    with pytest.raises(ValueError):
        buf.reserve(capacity)


def test_staging_shrink_gives_back_the_end_of_the_newest_region():
    """Room reserved for a packet before its filters ran is cut to what they kept: the space
    after it is free at once; only the newest region shrinks, never to nothing or beyond it."""
    buf = StagingBuffer(10)
    a = buf.reserve(6)
    assert a is not None
    buf.shrink(a, 2)
    assert (a.start, a.size, buf.held) == (0, 2, 2)
    b = buf.reserve(7)
    assert b is not None and b.start == 2  # the given-back room, right after it
    for region, size in ((a, 1), (b, 0), (b, 8)):
        with pytest.raises(ValueError):
            buf.shrink(region, size)
    buf.release(a)
    buf.release(b)
    assert buf.held == 0


def test_staging_waiters_get_room_first_come_first_served():
    async def run() -> list[int]:
        buf = StagingBuffer(10)
        first = buf.reserve(8)
        order: list[int] = []

        async def want(n: int, tag: int) -> None:
            region = await buf.reserve_wait(n)
            order.append(tag)
            buf.release(region)

        tasks = [asyncio.create_task(want(6, 1)), asyncio.create_task(want(1, 2))]
        await asyncio.sleep(0.01)
        assert order == [] and buf.reserve(1) is None  # a later small packet does not overtake
        buf.release(first)
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return order

    assert asyncio.run(run()) == [1, 2]


# --- buckets, softmax, metrics -------------------------------------------------------------------
def test_bucket_and_softmax():
    from evssm.server.core.runner import bucket, softmax

    assert [bucket(v, (1, 8, 64)) for v in (1, 2, 8, 9, 64)] == [1, 8, 8, 64, 64]
    with pytest.raises(ValueError):
        bucket(65, (1, 8, 64))
    p = softmax(np.array([[0.0, 1000.0, 0.0], [1.0, 1.0, 1.0]], np.float32))
    assert_close(p.sum(1), 1.0, rtol=1e-6)
    assert p[0, 1] == pytest.approx(1.0) and p[1, 0] == pytest.approx(1 / 3)


def test_metrics_names_and_fresh_registries():
    m1, m2 = Metrics(), Metrics()
    m1.init_model("a", 100, 4)
    m1.model("a").packets_done(256, np.array([0.004]))
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


# --- the connection's outbox -----------------------------------------------------------------------
class _SlowSocket:
    """A WebSocket whose sends wait while ``blocked`` is clear (a client that does not read)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.open = asyncio.Event()
        self.open.set()

    async def send_bytes(self, data: bytes) -> None:
        await self.open.wait()
        self.sent.append(data)

    async def send_text(self, data: str) -> None:
        await self.send_bytes(data.encode())

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.send_bytes(f"close {code}".encode())


def test_every_queued_reply_counts_against_the_bound_and_order_holds():
    """Results wait for their steps, errors are ready at once: they leave in request order; a
    send that must wait holds the rest; past the bound the receive loop waits for room."""
    import msgpack

    from evssm.models.wire import ErrorFrame
    from evssm.server.api.connection import Connection

    async def run() -> None:
        ws = _SlowSocket()
        conn = Connection(ws, bound=3)  # type: ignore[arg-type]
        result = conn.reply()  # a result: filled after its step
        conn.send(ErrorFrame("internal_error", "", 1))
        assert ws.sent == [] and conn.queued == 2  # the error waits behind the result
        conn.fill(result, msgpack.packb({"type": "result", "seq": 0}))
        assert [msgpack.unpackb(m)["seq"] for m in ws.sent] == [0, 1] and conn.queued == 0
        ws.open.clear()  # the client stops reading
        for seq in range(2, 6):
            conn.send(ErrorFrame("internal_error", "", seq))
        assert conn.queued == 4  # one waiting on the socket, three behind it
        room = asyncio.create_task(conn.wait_room())
        await asyncio.sleep(0.01)
        assert not room.done()  # the receive loop would stop reading here
        ws.open.set()
        await asyncio.wait_for(room, 5)
        await asyncio.sleep(0.01)
        assert [msgpack.unpackb(m)["seq"] for m in ws.sent] == [0, 1, 2, 3, 4, 5]
        conn.close_after_flush(1001, "bye")
        conn.send(ErrorFrame("internal_error", "", 6))  # after the close: never sent
        await conn.stop()
        assert ws.sent[-1] == b"close 1001" and len(ws.sent) == 7

    asyncio.run(run())


# --- the native one-pass ingest against the NumPy reference ------------------------------------------
@pytest.mark.parametrize("sensor", [D1, D2], ids=["1d", "2d"])
def test_native_ingest_equals_the_reference(sensor):
    """prepare() into staging buffers takes the C pass once the native module is loaded; it must
    give the reference's tokens and gaps, and for a bad packet the reference's error."""
    from evssm.models import native_build

    try:
        native_build.load_library()
    except native_build.NativeUnavailable as exc:  # pragma: no cover - no compiler here
        pytest.skip(f"native module unavailable: {exc}")
    rng = np.random.default_rng(7)
    hi = (sensor.channels, 1, 1) if sensor.kind == "1d" else (sensor.width, sensor.height, 2)
    for trial in range(300):
        n = int(rng.integers(0, 40))
        t = np.cumsum(rng.integers(0, 3000, n)).astype(np.int64) + 10**6
        cols = {"x": rng.integers(0, hi[0], n), "y": rng.integers(0, hi[1], n),
                "p": rng.integers(0, hi[2], n)}
        fault = rng.integers(0, 6) if n else 0
        if fault == 1:
            cols["xyp"[int(rng.integers(0, 1 if sensor.kind == "1d" else 3))]][int(rng.integers(n))] = 70
        elif fault == 2 and n > 1:
            t[int(rng.integers(1, n))] -= 10**5
        elif fault == 3:
            cols["x"][int(rng.integers(n))] = -1
        elif fault == 4 and n > 1:  # far apart: the difference overflows int64 and must not wrap
            k = int(rng.integers(1, n))
            t[:k], t[k:] = 2**63 - 1, -2
        last_t = None if rng.random() < 0.3 else int(10**6 + rng.integers(-5000, 5000))
        form = ("lists", "bins", "records")[trial % 3]
        if form == "records":
            rec = np.zeros(n, RECORD_DTYPE)
            rec["t"], rec["x"], rec["y"], rec["on"] = t, cols["x"], cols["y"], cols["p"]
            if fault == 3:
                continue  # a record cannot hold a negative address
            msg = {"records": rec.tobytes()}
        elif form == "bins":
            if fault == 3:
                continue
            msg = {"t": t.astype("<i8").tobytes(), **{k: v.astype("<u2" if k != "p" else "u1").tobytes()
                                                       for k, v in cols.items()}}
        else:
            msg = {"t": t.tolist(), **{k: v.tolist() for k, v in cols.items()}}
        events = decode_events(msg, sensor)
        tokens, gaps = np.full(n, -7, np.int32), np.full(n, -7, np.int32)
        try:
            want = prepare(events, sensor, last_t)
        except ProtocolError as e:
            with pytest.raises(ProtocolError) as got:
                prepare(events, sensor, last_t, tokens, gaps)
            assert (got.value.code, got.value.message) == (e.code, e.message)
            continue
        prepare(events, sensor, last_t, tokens, gaps)
        np.testing.assert_array_equal(tokens, want[0])
        np.testing.assert_array_equal(gaps, want[1])
        two_d = sensor.kind == "2d"  # and it was the C pass that did it
        assert native_build.loaded().ingest(
            events.t, events.x, events.y if two_d else None, events.p if two_d else None,
            sensor.width if two_d else sensor.channels, sensor.height, last_t, tokens, gaps)


def test_stats_history_keeps_the_last_fifteen_minutes_of_samples():
    from evssm.server.metrics import HISTORY_INTERVAL_S, HISTORY_S

    m = Metrics()
    m.init_model("a", 100, 4)
    assert m.history()["samples"] == []
    n = int(HISTORY_S / HISTORY_INTERVAL_S)
    for k in range(n + 5):
        if k == 3:
            m.model("a").packets_done(256, np.array([0.004]))
        m.record_history({"a": k % 2})
    samples = m.history()["samples"]
    assert len(samples) == n  # bounded: the oldest samples left
    assert [s["sessions_active"] for s in samples[:2]] == [5 % 2, 6 % 2]  # samples 0..4 are gone
    assert samples[-1]["events_total"] == 256 and samples[-1]["models"]["a"]["packets_total"] == 1
