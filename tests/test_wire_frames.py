"""The typed frames of ``evssm.models.wire``: what the server writes is what the client reads."""

from __future__ import annotations

import json
import math

import msgpack
import numpy as np
import pytest

from evssm.client.errors import ProtocolError as ClientProtocolError
from evssm.client.protocol import Result, SessionInfo
from evssm.models import wire
from evssm.models.wire import (
    HTTP_STATUS,
    Classified,
    ClassifyReply,
    Closed,
    Code,
    ErrorFrame,
    FrameError,
    HttpError,
    Opened,
    ResetDone,
    ResultFrame,
)

FRAMES = [
    Opened("s1", "tok", False, False, 0, None, None, 3, {"name": "tiny", "classes": ["a", "b"]}),
    Opened("s1", "tok", True, True, 12, 900, 10, 0, {"name": "tiny"}, {"sensor": {"width": 4}}, 2),
    ResultFrame(4, 10, 1234, None, []),
    ResultFrame(5, 12, 1300, [0.25, 0.75], [["b", 0.75], ["a", 0.25]], cropped=3, durable=10),
    ResultFrame(None, 0, None, None, []),
    ErrorFrame(Code.INVALID_FIELD, "top_k must be an integer", 7),
    ErrorFrame(Code.SESSION_EXPIRED, "evicted"),
    ResetDone("s1"),
    Closed("s1", 42),
    ResultFrame(6, 500, 9000, [0.5, 0.5], [["a", 0.5]], window={"t0": 7000, "events": 120}),
    Opened("s2", "tok", False, False, 0, None, None, 3, {"name": "tiny"},
           window={"ms": 2000, "hop_ms": 500, "lanes": 4}),
    Opened("s3", "tok", False, False, 0, None, None, 1, {"name": "tiny"},
           live={"decide": {"min_prob": 0.8, "hold_ms": 200.0}, "results": "compact",
                 "realtime": True, "overload": "drop", "max_lag_ms": 100.0}),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_a_frame_survives_both_encodings(frame: wire.ServerFrame, encoding: str) -> None:
    out = frame.to_wire()
    assert out["type"] == frame.TYPE
    data = msgpack.unpackb(msgpack.packb(out, use_bin_type=True)) if encoding == "msgpack" else \
        json.loads(json.dumps(out))
    back = type(frame).from_wire(data)
    if isinstance(frame, ErrorFrame):  # a code reads back as its string
        assert back == ErrorFrame(str(frame.code), frame.message, frame.seq)
    else:
        assert back == frame
    assert back.to_wire() == data  # and writes the same map again


def test_the_keys_go_out_in_the_contracts_order() -> None:
    """The bytes on the wire stay as they were: keys in the order docs/protocol.md shows."""
    assert list(FRAMES[1].to_wire()) == ["type", "session", "resume", "resumed", "restored", "events", "t",
                                         "durable", "top_k", "model", "geometry", "cropped"]
    assert list(FRAMES[0].to_wire()) == ["type", "session", "resume", "resumed", "restored", "events", "t",
                                         "durable", "top_k", "model"]
    assert list(FRAMES[3].to_wire()) == ["type", "seq", "events", "t", "probs", "top", "cropped", "durable"]
    assert list(FRAMES[2].to_wire()) == ["type", "seq", "events", "t", "probs", "top"]
    assert list(FRAMES[5].to_wire()) == ["type", "seq", "code", "message"]
    assert list(FRAMES[9].to_wire()) == ["type", "seq", "events", "t", "probs", "top", "window"]
    assert list(FRAMES[10].to_wire())[-1] == "window"


def test_an_error_message_is_capped() -> None:
    out = ErrorFrame(Code.MALFORMED_FRAME, "x" * 10_000).to_wire()
    assert len(out["message"]) == wire.MAX_MESSAGE and out["message"].endswith("...")
    assert len(HttpError(Code.BUSY, "y" * 10_000).to_wire()["message"]) == wire.MAX_MESSAGE


@pytest.mark.parametrize("bad", [
    {"type": "result"},  # no seq
    {"type": "result", "seq": 1, "events": "many"},
    {"type": "result", "seq": 1, "top": [["a"]]},
    {"type": "result", "seq": 1, "probs": ["x"]},
])
def test_a_malformed_result_names_what_is_wrong(bad: dict) -> None:
    with pytest.raises(FrameError, match="malformed result frame"):
        ResultFrame.from_wire(bad)
    with pytest.raises(ClientProtocolError, match="malformed result frame"):
        Result.from_message(bad)


def test_a_frame_of_another_type_is_refused() -> None:
    with pytest.raises(FrameError, match="expected 'opened', got 'result'"):
        Opened.from_wire({"type": "result", "seq": 1})
    with pytest.raises(ClientProtocolError, match="expected 'opened'"):
        SessionInfo.from_message({"type": "closed"})


def test_the_client_reads_through_the_frames() -> None:
    info = SessionInfo.from_message(FRAMES[1].to_wire())
    assert (info.session, info.resume, info.events, info.cropped, info.restored, info.durable) == \
        ("s1", "tok", 12, 2, True, 10)
    assert info.model.name == "tiny" and info.geometry == {"sensor": {"width": 4}}
    result = Result.from_message(FRAMES[3].to_wire(), latency_s=0.5)
    assert (result.seq, result.events, result.t, result.cropped, result.durable) == (5, 12, 1300, 3, 10)
    assert result.label == "b" and result.top == [("b", 0.75), ("a", 0.25)] and result.latency_s == 0.5
    # float32 bin probabilities are tolerated, as they always were
    raw = {**FRAMES[3].to_wire(), "probs": np.array([0.25, 0.75], "<f4").tobytes()}
    probs = Result.from_message(raw).probs
    assert probs is not None and all(math.isfinite(p) for p in probs) and probs == [0.25, 0.75]


def test_http_errors_carry_their_status_once() -> None:
    assert HttpError(Code.UNKNOWN_MODEL, "").status == 404 == HTTP_STATUS[Code.UNKNOWN_MODEL]
    assert HttpError(Code.BUSY, "").status == 503
    assert HttpError(Code.INVALID_FIELD, "").status == 400  # not listed: a 400
    assert HttpError("no_such_code", "").status == 400
    assert set(HTTP_STATUS) <= set(Code)
    body = HttpError(Code.REQUEST_TIMEOUT, "slow").to_wire()
    assert body == {"error": "request_timeout", "message": "slow"} and HttpError.from_wire(body).status == 408


def test_a_classify_reply_round_trips() -> None:
    reply = ClassifyReply("tiny", [Classified([0.5, 0.5], "a", 9, 100, [["a", 0.5]], cropped=1),
                                   Classified(None, None, 2, None, []),
                                   Classified([0.5, 0.5], "b", 900, 10**6, [], window={"t0": 10, "events": 40})])
    body = reply.to_wire()
    assert list(body["results"][0]) == ["probs", "label", "events", "t", "top", "cropped"]
    assert "cropped" not in body["results"][1] and "window" not in body["results"][1]
    assert body["results"][2]["window"] == {"t0": 10, "events": 40}
    assert ClassifyReply.from_wire(json.loads(json.dumps(body))) == reply


def test_top_k_bounds_are_stated_once() -> None:
    from evssm.server.api.protocol import ProtocolError, parse_open

    assert parse_open({"top_k": wire.TOP_K_MAX}).top_k == wire.TOP_K_MAX
    with pytest.raises(ProtocolError, match=f"0..{wire.TOP_K_MAX}"):
        parse_open({"top_k": wire.TOP_K_MAX + 1})
