"""Decisions (server/live/decisions.py): once per change, after a hold in stream time."""

from __future__ import annotations

import pytest

from evssm.server.live.decisions import DecideSpec, DecisionError, DecisionTracker


def feed(tracker: DecisionTracker, answers: list[tuple[str | None, float, int]]) -> list[dict | None]:
    out = []
    for label, prob, t in answers:
        d = tracker.update(label, prob, t)
        out.append(None if d is None else d.to_dict())
    return out


def tracker(min_prob: float = 0.6, hold_ms: float = 10) -> DecisionTracker:
    return DecisionTracker(DecideSpec.from_dict({"min_prob": min_prob, "hold_ms": hold_ms}))


def test_the_hold_boundary_is_inclusive() -> None:
    got = feed(tracker(), [("wave", 0.7, 1000), ("wave", 0.8, 10_999), ("wave", 0.9, 11_000),
                           ("wave", 0.95, 50_000)])
    assert got == [None, None, {"label": "wave", "prob": 0.9, "t": 11_000}, None]


def test_a_flicker_shorter_than_the_hold_fires_nothing() -> None:
    got = feed(tracker(), [("wave", 0.9, 0), ("wave", 0.9, 10_000),  # wave decided
                           ("clap", 0.9, 12_000), ("clap", 0.9, 21_999),  # 9.999 ms of clap
                           ("wave", 0.9, 22_000), ("wave", 0.9, 40_000)])  # back: already decided
    assert [d and d["label"] for d in got] == [None, "wave", None, None, None, None]


def test_dipping_below_min_prob_restarts_the_hold() -> None:
    got = feed(tracker(), [("clap", 0.9, 0), ("clap", 0.5, 6_000), ("clap", 0.9, 8_000),
                           ("clap", 0.9, 17_999), ("clap", 0.61, 18_000)])
    assert [d and d["t"] for d in got] == [None, None, None, None, 18_000]


def test_the_same_class_again_after_another_fires_again() -> None:
    got = feed(tracker(hold_ms=0), [("wave", 0.9, 5), ("clap", 0.9, 6), ("clap", 0.99, 7),
                                    ("wave", 0.8, 8)])
    assert [d and d["label"] for d in got] == ["wave", "clap", None, "wave"]


def test_equal_timestamps_do_not_advance_the_hold() -> None:
    t = tracker(hold_ms=1)
    assert feed(t, [("wave", 0.9, 500)] * 5) == [None] * 5
    assert feed(t, [("wave", 0.9, 1_500)]) == [{"label": "wave", "prob": 0.9, "t": 1_500}]
    assert feed(tracker(hold_ms=0), [("wave", 0.9, 500)] * 3)[0] is not None  # no hold: at once


def test_no_prediction_yet_is_no_candidate() -> None:
    got = feed(tracker(hold_ms=0), [(None, 0.0, 0), ("wave", 0.9, 1)])
    assert got == [None, {"label": "wave", "prob": 0.9, "t": 1}]


def test_bad_updates_are_refused_without_a_change() -> None:
    t = tracker(hold_ms=5)
    t.update("wave", 0.9, 100)
    with pytest.raises(DecisionError, match="time 50 us is before the previous answer's 100 us"):
        t.update("wave", 0.9, 50)
    with pytest.raises(DecisionError, match="not finite"):
        t.update("wave", float("nan"), 200)
    assert (t.candidate, t.since, t.last_t) == ("wave", 100, 100)


@pytest.mark.parametrize("field, message", [
    ({"min_prob": 1.5}, "decide.min_prob must be between 0 and 1, got 1.5"),
    ({"min_prob": "high"}, "decide.min_prob must be a number"),
    ({"min_prob": 0.5, "hold_ms": -1}, "decide.hold_ms must be between 0 and"),
    ({"min_prob": 0.5, "hold_ms": 10**400}, "decide.hold_ms must be between 0 and"),
    ({"min_prob": float("nan")}, "decide.min_prob must be a number, got nan"),
    ({"min_prob": 0.5, "hold_ms": True}, "decide.hold_ms must be a number, got True"),
    ({"hold_ms": 5}, r"got the fields \['hold_ms'\]"),
    ({"min_prob": 0.5, "hold": 5}, r"got the fields \['hold', 'min_prob'\]"),
    (0.5, "decide must be a map"),
])
def test_decide_field_validation(field: object, message: str) -> None:
    with pytest.raises(DecisionError, match=message):
        DecideSpec.from_dict(field)


def test_decide_field_round_trip() -> None:
    spec = DecideSpec.from_dict({"min_prob": 0.8, "hold_ms": 2.5})
    assert spec.hold_us == 2500 and spec.to_dict() == {"min_prob": 0.8, "hold_ms": 2.5}


def test_a_snapshot_resumes_the_tracker() -> None:
    import msgpack

    answers = [("wave", 0.9, 0), ("wave", 0.9, 6_000), ("wave", 0.9, 10_000), ("clap", 0.9, 12_000),
               ("clap", 0.9, 30_000)]
    whole = feed(tracker(), answers)
    first = tracker()
    part = feed(first, answers[:2])
    resumed = tracker()
    resumed.restore(msgpack.unpackb(msgpack.packb(first.to_dict())))
    assert part + feed(resumed, answers[2:]) == whole
    with pytest.raises(DecisionError, match="since must be an integer time"):
        resumed.restore({**first.to_dict(), "since": None})
    with pytest.raises(DecisionError, match="decided must be a class name or null"):
        resumed.restore({**first.to_dict(), "decided": 3})
    assert resumed.decided == "clap"  # a refused snapshot changed nothing
