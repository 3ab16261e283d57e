"""Protocol fuzzing of a real served app (uvicorn on 127.0.0.1, the command line's limits, API keys).

A Hypothesis state machine drives one client over a real WebSocket: valid packets in every column
form, packets with exactly one defect each (whose error code is known), random frames (bytes,
text, msgpack values), ``open`` with random fields, resets, close and reopen, dropped connections
resumed by token (key in the header or in ``access_token``), and connections refused for a wrong
key or origin. It asserts that every bad frame gets its code (never ``internal_error``), that
every valid one is answered in order with the right event count and timestamp, and that the
session's state is intact: the last answer equals ``POST /v1/classify`` of the accepted events.
A second test posts fuzzed classify bodies. No answer is ever a 500.

Profiles (``EVSSM_FUZZ``): ``ci`` (default: bounded, derandomised, seconds) and ``long`` (at least
100,000 frames; run once, figures in docs/benchmarks.md). The number of frames sent is printed.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule
from numeric import assert_close
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from evssm.server.api.protocol import RECORD_DTYPE, Code
from evssm.server.app import create_app
from evssm.server.cli import uvicorn_options
from evssm.server.settings import Settings

CHANNELS = 700
MAX_PACKET = 512
BIG = 2 ** 63 - 1
KEY = "fuzz-key-" + "0123456789abcdef"
PROFILE = os.environ.get("EVSSM_FUZZ", "ci")
settings.register_profile("ci", max_examples=20, stateful_step_count=30, deadline=None, derandomize=True,
                          database=None, suppress_health_check=list(HealthCheck))
# "long" explores new examples on every run (conftest.py's default profile is derandomized).
settings.register_profile("long", max_examples=int(os.environ.get("EVSSM_FUZZ_EXAMPLES", "400")),
                          stateful_step_count=50, deadline=None, database=None, derandomize=False,
                          suppress_health_check=list(HealthCheck))
FRAMES = {"ws": 0, "http": 0}
LIMIT = pytest.mark.timeout(600 if PROFILE == "ci" else 4 * 3600)
CODES = {c.value for c in Code} - {Code.INTERNAL_ERROR.value}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    from conftest import serve_app, wait_ready

    from evssm.models.streaming import load_model

    keys = tmp_path_factory.mktemp("fuzz") / "keys"
    keys.write_text(f"# fuzz\n{KEY}\n")
    keys.chmod(0o600)
    cfg = Settings(batch_buckets=(1, 8), length_buckets=(128,), classify_length_buckets=(1024,),
                   max_packet_events=MAX_PACKET, max_classify_events=1 << 22, max_sessions=16,
                   max_sessions_per_client=16, api_keys=str(keys), allowed_origins=("https://app.example",))
    app = create_app(cfg, models={"tiny": load_model("config:tiny")})
    options = {k: v for k, v in uvicorn_options(cfg).items() if k != "timeout_graceful_shutdown"}
    with serve_app(app, **options) as server:
        wait_ready(server.http, 240)
        yield server
    print(f"\nfuzz profile {PROFILE}: {FRAMES['ws']} WebSocket frames (and connection attempts), "
          f"{FRAMES['http']} HTTP requests")


# --- strategies --------------------------------------------------------------------------------
def columns(t: list[int], x: list[int], form: str) -> dict[str, Any]:
    if form == "bin":
        return {"t": np.asarray(t, "<i8").tobytes(), "x": np.asarray(x, "<u2").tobytes()}
    if form == "records":
        rec = np.zeros(len(t), RECORD_DTYPE)
        rec["t"], rec["x"] = t, x
        return {"records": rec.tobytes()}
    return {"t": list(t), "x": list(x)}


@st.composite
def packets(draw: st.DrawFn, start: int | None) -> tuple[list[int], list[int]]:
    """Valid events: non-decreasing t from ``start`` (anything for a new stream), x in range."""
    n = draw(st.integers(0, 300) | st.sampled_from([0, 1, 127, 128, 129]))
    first = draw(st.integers(0, 10 ** 12)) if start is None else start + draw(st.integers(0, 5000))
    gaps = draw(st.lists(st.integers(0, 3000) | st.just(0), min_size=n, max_size=n))
    t = (first + np.cumsum(np.asarray(gaps, np.int64))).tolist() if n else []
    x = draw(st.lists(st.integers(0, CHANNELS - 1), min_size=n, max_size=n))
    return t, x


def defects(last_t: int | None) -> st.SearchStrategy[tuple[dict[str, Any], str]]:
    """An events frame with exactly one defect, and the code it must get."""
    return st.sampled_from(defect_cases(last_t))


def defect_cases(last_t: int | None) -> list[tuple[dict[str, Any], str]]:
    base = max(last_t or 0, 10)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"t": [base]}, "missing_column"),
        ({"x": [1]}, "missing_column"),
        ({"t": [base], "x": None}, "missing_column"),
        ({"t": [base], "x": "1"}, "invalid_column"),
        ({"t": [base, base + 1], "x": [1, True]}, "invalid_column"),
        ({"t": [base, base + 1], "x": [1, 2.0]}, "invalid_column"),
        ({"t": [base], "x": [[1]]}, "invalid_column"),
        ({"t": [base, 2 ** 63], "x": [1, 1]}, "invalid_column"),  # uint64 on the wire, beyond int64
        ({"t": b"\x00" * 9, "x": b"\x00\x00"}, "invalid_column"),
        ({"records": b"\x00" * 14}, "invalid_column"),
        ({"records": [1, 2]}, "invalid_column"),
        ({"records": b"\x00" * 13, "t": [base]}, "invalid_field"),
        ({"t": [base, base + 1], "x": [1]}, "length_mismatch"),
        ({"t": [base], "x": [CHANNELS]}, "address_out_of_range"),
        ({"t": [base], "x": [-1]}, "address_out_of_range"),
        ({"t": [base + 5, base + 4], "x": [1, 1]}, "timestamps_decreasing"),
        ({"t": [BIG, -2], "x": [1, 1]}, "timestamps_decreasing"),
        ({"t": list(range(base, base + MAX_PACKET + 1)), "x": [0] * (MAX_PACKET + 1)}, "packet_too_large"),
        ({"t": [base], "x": [1], "seq": "seven"}, "invalid_field"),
        ({"t": [base], "x": [1], "seq": True}, "invalid_field"),
    ]
    if last_t is not None and last_t > -(2 ** 63) + 1:
        cases.append(({"t": [last_t - 1], "x": [1]}, "timestamps_decreasing"))
    return cases


def random_value(rng: np.random.Generator, depth: int = 0) -> Any:
    """A random msgpack-able value (the bulk generator's counterpart of ``values``)."""
    kind = int(rng.integers(0, 9 if depth < 3 else 6))
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.integers(0, 2))
    if kind == 2:
        return int(rng.integers(-(2 ** 63), 2 ** 63 - 1, dtype=np.int64))
    if kind == 3:
        return float(rng.normal() * 10 ** int(rng.integers(0, 20)))
    if kind == 4:
        return "".join(chr(int(c)) for c in rng.integers(32, 0x2FF, int(rng.integers(0, 20))))
    if kind == 5:
        return rng.bytes(int(rng.integers(0, 20)))
    if kind in (6, 7):
        return [random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 5)))]
    keys = ["type", "seq", "t", "x", "model", "resume", "top_k", "records", "z"]
    frame = {str(rng.choice(keys)): random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 5)))}
    if frame.get("type") in ("open", "events", "reset", "close"):
        frame["type"] = "not-" + frame["type"]
    return frame


def random_garbage(rng: np.random.Generator) -> bytes:
    kind = int(rng.integers(0, 3))
    if kind == 0:
        return rng.bytes(int(rng.integers(1, 200)))
    value = random_value(rng)
    if isinstance(value, dict) and value.get("type") in ("open", "events", "reset", "close"):
        value["type"] = None
    if kind == 1 and isinstance(value, dict):
        value.pop("type", None) if rng.integers(0, 2) else None
    return msgpack.packb(value, use_bin_type=True)


def expected_code_of_raw(data: bytes | str) -> str:
    """The code of a frame that is not one of the four types (the oracle: the codecs themselves)."""
    try:
        msg = msgpack.unpackb(data, raw=False) if isinstance(data, bytes) else json.loads(data)
    except Exception:
        return "malformed_frame"
    if not isinstance(msg, dict):
        return "malformed_frame"
    return "unknown_type"


scalars = st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats(allow_nan=False) | \
    st.text(max_size=30) | st.binary(max_size=30)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
    st.text(max_size=8), inner, max_size=5), max_leaves=20)
not_a_type = values.filter(lambda v: v not in ("open", "events", "reset", "close"))


@st.composite
def garbage(draw: st.DrawFn) -> bytes | str:
    kind = draw(st.sampled_from(["bytes", "text", "value", "map"]))
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=200))
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "value":
        return msgpack.packb(draw(values), use_bin_type=True)
    frame = draw(st.dictionaries(st.sampled_from(["seq", "t", "x", "model", "resume", "top_k", "z"]), values,
                                 max_size=4))
    if draw(st.booleans()):
        frame["type"] = draw(not_a_type)
    return msgpack.packb(frame, use_bin_type=True)


# --- the state machine -------------------------------------------------------------------------
class StreamMachine(RuleBasedStateMachine):
    server: Any = None

    @initialize()
    def start(self) -> None:
        self.ws: Any = None
        self.token: str | None = None
        self.t: list[int] = []
        self.x: list[int] = []
        self.last_probs: list[float] | None = None
        self.answered = False
        self.seq = 0
        self.connect()
        opened = self.request({"type": "open", "model": "tiny", "top_k": 2})
        assert opened["type"] == "opened", opened
        self.token = opened["resume"]

    # helpers
    def connect(self, via_query: bool = False) -> None:
        url = f"{self.server.ws}/v1/stream"
        if via_query:
            client = connect(f"{url}?access_token={KEY}", max_size=None, open_timeout=30)
        else:
            client = connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}, max_size=None,
                             open_timeout=30)
        self.ws = client.__enter__()

    def send(self, data: bytes | str) -> None:
        FRAMES["ws"] += 1
        self.ws.send(data)

    def recv(self) -> dict[str, Any]:
        data = self.ws.recv(timeout=60)
        return json.loads(data) if isinstance(data, str) else msgpack.unpackb(data, raw=False)

    def request(self, msg: dict[str, Any], text: bool = False) -> dict[str, Any]:
        self.send(json.dumps(msg) if text else msgpack.packb(msg, use_bin_type=True))
        return self.recv()

    def expect_error(self, reply: dict[str, Any], code: str, seq: int | None = None) -> None:
        assert reply["type"] == "error" and reply["code"] == code, (code, reply)
        assert reply["message"] and len(reply["message"]) <= 400
        if seq is not None:
            assert reply["seq"] == seq

    @property
    def last_t(self) -> int | None:
        return self.t[-1] if self.t else None

    # rules
    @precondition(lambda self: self.token is not None)
    @rule(data=st.data(), form=st.sampled_from(["lists", "bin", "records", "json"]))
    def valid_packet(self, data: st.DataObject, form: str) -> None:
        t, x = data.draw(packets(self.last_t))
        self.seq += 1
        msg = {"type": "events", "seq": self.seq, **columns(t, x, "lists" if form == "json" else form)}
        reply = self.request(msg, text=form == "json")
        assert reply["type"] == "result" and reply["seq"] == self.seq, reply
        self.t += t
        self.x += x
        assert reply["events"] == len(self.t) and reply["t"] == self.last_t
        self.last_probs, self.answered = reply["probs"], True

    @precondition(lambda self: self.token is not None)
    @rule(data=st.data())
    def bad_packet(self, data: st.DataObject) -> None:
        frame, code = data.draw(defects(self.last_t))
        self.seq += 1
        seq = frame.get("seq", self.seq)
        reply = self.request({"type": "events", "seq": self.seq, **frame})
        self.expect_error(reply, code, seq if isinstance(seq, int) and not isinstance(seq, bool) else None)

    @precondition(lambda self: self.token is not None)
    @rule(seed=st.integers(0, 2 ** 32 - 1), size=st.integers(2, 40) if PROFILE == "ci" else st.integers(100, 600))
    def pipelined_burst(self, seed: int, size: int) -> None:
        """Many frames sent back to back before any reply is read: valid packets, one-defect
        packets and garbage from a seeded generator (volume beyond what Hypothesis draws one by
        one). Replies come in order, each with its own outcome; accepted ones build on each other."""
        rng = np.random.default_rng(seed)
        expected: list[tuple[str, Any]] = []
        frames: list[bytes] = []
        for _ in range(size):
            kind = int(rng.integers(0, 4))
            self.seq += 1
            if kind <= 1:
                n = int(rng.choice([0, 1, 127, 128, 129, int(rng.integers(0, 300))]))
                first = int(rng.integers(0, 10 ** 12)) if self.last_t is None else self.last_t
                t = (first + np.cumsum(rng.integers(0, 3000, n) * rng.integers(0, 2, n))).tolist()
                x = rng.integers(0, CHANNELS, n).tolist()
                form = str(rng.choice(["lists", "bin", "records"]))
                frames.append(msgpack.packb({"type": "events", "seq": self.seq, **columns(t, x, form)},
                                            use_bin_type=True))
                self.t += t
                self.x += x
                expected.append(("result", (self.seq, len(self.t), self.last_t)))
            elif kind == 2:
                cases = defect_cases(self.last_t)
                frame, code = cases[int(rng.integers(0, len(cases)))]
                frames.append(msgpack.packb({"type": "events", "seq": self.seq, **frame}, use_bin_type=True))
                expected.append(("error", code))
            else:
                raw = random_garbage(rng)
                frames.append(raw)
                expected.append(("error", expected_code_of_raw(raw)))
        for f in frames:
            self.send(f)
        for kind, want in expected:
            reply = self.recv()
            if kind == "result":
                seq, events, last = want
                assert reply["type"] == "result" and reply["seq"] == seq, (want, reply)
                assert reply["events"] == events and reply["t"] == last
                self.last_probs, self.answered = reply["probs"], True
            else:
                self.expect_error(reply, want)

    @rule(data=garbage())
    def random_frame(self, data: bytes | str) -> None:
        self.send(data)
        self.expect_error(self.recv(), expected_code_of_raw(data))

    @rule(model=values, top_k=values, resume=values)
    def open_with_random_fields(self, model: Any, top_k: Any, resume: Any) -> None:
        reply = self.request({"type": "open", "model": model, "top_k": top_k, "resume": resume})
        if reply["type"] == "opened":  # only valid fields naming no other model, and no session
            assert self.token is None and model in (None, "tiny") and resume is None
            self.adopt(reply)
            return
        bad_field = (model is not None and not isinstance(model, str)) or (
            resume is not None and not isinstance(resume, str)) or not (
            top_k is None or (isinstance(top_k, int) and not isinstance(top_k, bool) and 0 <= top_k <= 1000))
        if bad_field:
            self.expect_error(reply, "invalid_field")
        elif self.token is not None:
            self.expect_error(reply, "session_already_open")
        elif resume is not None:
            self.expect_error(reply, "unknown_session")
        else:
            self.expect_error(reply, "unknown_model")

    def adopt(self, opened: dict[str, Any]) -> None:
        self.token, self.t, self.x, self.last_probs, self.answered = opened["resume"], [], [], None, False

    @rule()
    def reset(self) -> None:
        reply = self.request({"type": "reset"})
        if self.token is None:
            self.expect_error(reply, "no_session")
            return
        assert reply["type"] == "reset_done" and reply["events"] == 0, reply
        self.t, self.x, self.last_probs, self.answered = [], [], None, False

    @rule()
    def close_and_reopen(self) -> None:
        self.check_against_classify()
        reply = self.request({"type": "close"})
        if self.token is None:
            self.expect_error(reply, "no_session")
        else:
            assert reply["type"] == "closed" and reply["events"] == len(self.t), reply
        self.token = None
        opened = self.request({"type": "open", "model": "tiny"})
        assert opened["type"] == "opened" and opened["events"] == 0, opened
        self.adopt(opened)

    @precondition(lambda self: self.token is not None)
    @rule(via_query=st.booleans())
    def drop_and_resume(self, via_query: bool) -> None:
        self.ws.close()
        self.connect(via_query)
        reply = self.request({"type": "open", "resume": self.token})
        assert reply["type"] == "opened" and reply["resumed"] is True, reply
        assert reply["events"] == len(self.t) and reply["t"] == self.last_t

    @rule(key=st.sampled_from([None, "", "wrong", KEY + "x", KEY[:-1]]),
          origin=st.sampled_from([None, "https://evil.example", "null"]), via_query=st.booleans())
    def refused_connection(self, key: str | None, origin: str | None, via_query: bool) -> None:
        if key is None and origin is None:
            key = "wrong"
        url = f"{self.server.ws}/v1/stream"
        headers = {}
        if key is not None and via_query:
            url += f"?access_token={key}"
        elif key is not None:
            headers["Authorization"] = f"Bearer {key}"
        else:
            headers["Authorization"] = f"Bearer {KEY}"
        FRAMES["ws"] += 1
        with connect(url, additional_headers=headers, origin=origin, open_timeout=30) as ws:
            try:
                ws.send(msgpack.packb({"type": "open", "model": "tiny"}))
                reply = ws.recv(timeout=30)
                raise AssertionError(f"a refused connection was answered: {reply!r}")
            except ConnectionClosed as e:
                assert e.rcvd is not None and e.rcvd.code == 1008, e

    def check_against_classify(self) -> None:
        if not self.answered or self.token is None:
            return
        r = httpx.post(f"{self.server.http}/v1/classify", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "tiny", "streams": [{"t": self.t, "x": self.x}]})
        FRAMES["http"] += 1
        assert r.status_code == 200, r.text
        want = r.json()["results"][0]["probs"]
        assert (want is None) == (self.last_probs is None)
        if want is not None:
            assert_close(self.last_probs, want, rtol=1e-3, atol=2e-6)

    def teardown(self) -> None:
        try:
            self.check_against_classify()
        finally:
            if getattr(self, "ws", None) is not None:
                if self.token is not None:  # free the slot for the next example
                    assert self.request({"type": "close"})["type"] == "closed"
                self.ws.close()


@LIMIT
def test_websocket_protocol_fuzz(fuzz_server):
    StreamMachine.server = fuzz_server
    StreamMachine.TestCase.settings = settings.get_profile(PROFILE)
    StreamMachine.TestCase().runTest()


# --- HTTP bodies ------------------------------------------------------------------------------
@st.composite
def classify_bodies(draw: st.DrawFn) -> tuple[bytes, str, int, str | None]:
    """(body, content type, expected status, expected error code or None)."""
    streams = [draw(packets(None)) for _ in range(draw(st.integers(0, 3)))]
    as_msgpack = draw(st.booleans())
    body: dict[str, Any] = {"streams": [columns(t, x, draw(st.sampled_from(["lists", "bin", "records"]))
                                        if as_msgpack else "lists") for t, x in streams]}
    status, code = 200, None
    defect = draw(st.sampled_from(["none", "model", "top_k", "stream", "streams", "body", "column"]))
    if defect == "model":
        body["model"], status, code = draw(st.sampled_from([
            ([], 400, "invalid_field"), ("", 404, "unknown_model"), (5, 400, "invalid_field"),
            ("nope", 404, "unknown_model")]))
    elif defect == "top_k":
        body["top_k"] = draw(st.sampled_from([-1, 1001, True, "3", 2.5]))
        status, code = 400, "invalid_field"
    elif defect == "stream":
        body["streams"].append(draw(st.sampled_from([5, "s", None, []])))
        status, code = 400, "invalid_field"
    elif defect == "streams":
        body["streams"] = draw(st.sampled_from([{}, "x", 3, None]))
        status, code = 400, "invalid_field"
    elif defect == "column":
        frame, code = draw(defects(None).filter(
            lambda fc: fc[1] not in ("invalid_field", "packet_too_large") and "seq" not in fc[0]))
        frame = {k: v for k, v in frame.items() if k != "seq"}
        if not as_msgpack and any(isinstance(v, bytes) for v in frame.values()):
            as_msgpack = True
        body["streams"].append(frame)
        status = 400
    if defect == "body":
        raw = draw(st.binary(max_size=100))
        ctype = "application/msgpack" if as_msgpack else "application/json"
        try:
            decoded = msgpack.unpackb(raw, raw=False) if as_msgpack else json.loads(raw)
        except Exception:
            return raw, ctype, 400, "malformed_frame"
        if not isinstance(decoded, dict):
            return raw, ctype, 400, "malformed_frame"
        return raw, ctype, 0, None  # a map of random fields: any answer but a 5xx
    if as_msgpack:
        return msgpack.packb(body, use_bin_type=True), "application/msgpack", status, code
    return json.dumps(body).encode(), "application/json", status, code


@LIMIT
def test_http_classify_fuzz(fuzz_server):
    from hypothesis import given

    @settings(settings.get_profile(PROFILE), max_examples=40 if PROFILE == "ci" else 3000)
    @given(case=classify_bodies())
    def check(case: tuple[bytes, str, int, str | None]) -> None:
        body, ctype, status, code = case
        FRAMES["http"] += 1
        r = httpx.post(f"{fuzz_server.http}/v1/classify", content=body, timeout=60,
                       headers={"content-type": ctype, "Authorization": f"Bearer {KEY}"})
        assert r.status_code < 500, r.text
        if status == 0:
            return
        assert r.status_code == status, (r.status_code, r.text[:300], code)
        if code is not None:
            assert r.json()["error"] == code, r.text[:300]
        else:
            reply = msgpack.unpackb(r.content) if ctype == "application/msgpack" else r.json()
            for res in reply["results"]:
                assert res["probs"] is None or abs(sum(res["probs"]) - 1) < 1e-4

    check()
    r = httpx.post(f"{fuzz_server.http}/v1/classify", json={"streams": []})
    assert r.status_code == 401  # and no key, no work


def test_fuzz_profile_is_known():
    assert PROFILE in ("ci", "long"), f"EVSSM_FUZZ={PROFILE!r}: use ci or long"
    assert struct.calcsize("<q") == 8
