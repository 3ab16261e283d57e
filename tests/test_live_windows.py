"""Sliding-window planning (server/live/windows.py): the answering lane's events are exactly the
window's definition after every packet, for any packetisation; the field's validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evssm.server.live.windows import MAX_LANES, NO_RESTART, WindowError, WindowPlan, WindowSpec

PROPERTY = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HOUR_US = 3_600_000_000


def window_start(spec: WindowSpec, now: int) -> int:
    """The definition: the earliest point of the grid {0} ∪ {j H + m T} after ``now - T``."""
    floor = now - spec.length
    points = [0]
    for j in range(spec.lanes):  # each lane's first point after the floor
        first = j * spec.hop
        points.append(first if first > floor else first + ((floor - first) // spec.length + 1) * spec.length)
    return min(g for g in points if g > floor)


def replay(spec: WindowSpec, t: np.ndarray, cuts: list[int]) -> list[tuple[int | None, int | None, int]]:
    """Plan the stream in the given packets, simulating each lane's events from the restarts, and
    check every answer against the definition; -> the answers."""
    plan, state = WindowPlan(spec), WindowPlan(spec).new_state()
    lanes: list[list[int]] = [[] for _ in range(spec.lanes)]
    answers = []
    for lo, hi in zip([0, *cuts], [*cuts, t.size], strict=True):
        p = plan.plan(state, t[lo:hi])
        for j, r in enumerate(p.restarts.tolist()):
            if r == NO_RESTART:
                lanes[j].extend(range(lo, hi))
            else:
                assert 0 <= r < hi - lo
                lanes[j] = list(range(lo + r, hi))
        answers.append((p.lane, p.t0, p.events))
        if hi == 0:
            assert p.lane is None and p.window() is None
            continue
        clock = t[:hi] - t[0] if spec.unit == "us" else np.arange(hi)
        now = int(clock[-1])
        expected = [i for i in range(hi) if clock[i] >= window_start(spec, now)]
        assert p.lane is not None
        assert lanes[p.lane] == expected
        assert p.window() == {"t0": int(t[expected[0]]), "events": len(expected)}
        for j, events in enumerate(lanes):  # each lane: the events since its latest restart
            first = j * spec.hop
            restart = first + (now - first) // spec.length * spec.length if now >= first else 0
            assert events == [i for i in range(hi) if clock[i] >= restart]
            assert now - int(clock[events[0]]) < spec.length  # younger than the window
        if spec.unit == "events" and hi >= spec.length:
            assert spec.length - spec.hop < len(expected) <= spec.length
    return answers


@st.composite
def cases(draw: st.DrawFn) -> tuple[WindowSpec, np.ndarray, list[int]]:
    unit = draw(st.sampled_from(["us", "events"]))
    length = draw(st.integers(1, 5000 if unit == "us" else 40))
    hop = draw(st.integers(max(1, -(-length // MAX_LANES)), length))
    n = draw(st.integers(0, 150))
    gap = st.one_of(st.just(0), st.integers(0, 3), st.integers(0, 3000), st.just(HOUR_US))
    start = draw(st.one_of(st.just(0), st.integers(0, 1_700_000_000_000_000)))
    t = start + np.cumsum(np.array(draw(st.lists(gap, min_size=n, max_size=n)), dtype=np.int64))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=10)))
    return WindowSpec(unit, length, hop), t, cuts


@PROPERTY
@given(cases())
def test_the_answering_lane_holds_exactly_the_window_in_any_packets(
        case: tuple[WindowSpec, np.ndarray, list[int]]) -> None:
    spec, t, cuts = case
    packets = replay(spec, t, cuts)
    whole = replay(spec, t, [])
    assert packets[-1][1:] == whole[-1][1:]  # t0 and count do not depend on the cuts


def test_a_worked_example_ten_ms_windows_every_three() -> None:
    spec = WindowSpec.from_dict({"ms": 10, "hop_ms": 3})
    assert (spec.unit, spec.length, spec.hop, spec.lanes) == ("us", 10_000, 3_000, 4)
    plan = WindowPlan(spec)
    state = plan.new_state()
    t = np.arange(0, 12_000, 700, dtype=np.int64)  # 0, 700, ..., 11900
    first = plan.plan(state, t[:9])  # up to 5600: lane 1 restarted at 3000 (event 5, t=3500)
    assert first.restarts.tolist() == [0, 5, 0, 0] and first.window() == {"t0": 0, "events": 9}
    second = plan.plan(state, t[9:])  # up to 11900: lane 0 at 10000, lane 2 at 6000, lane 3 at 9000
    assert second.restarts.tolist() == [6, NO_RESTART, 0, 4]
    assert second.lane == 1 and second.window() == {"t0": 3500, "events": 13}  # 3500..11900


def test_an_empty_packet_changes_nothing() -> None:
    plan = WindowPlan(WindowSpec("events", 4, 2))
    state = plan.new_state()
    assert plan.plan(state, np.zeros(0, np.int64)).window() is None
    plan.plan(state, np.arange(5, dtype=np.int64))
    before = state.copy()
    empty = plan.plan(state, np.zeros(0, np.int64))
    assert (empty.restarts == NO_RESTART).all() and empty.window() == {"t0": 2, "events": 3}
    assert state.seen == before.seen and (state.counts == before.counts).all()


def test_times_going_back_are_refused_without_a_change() -> None:
    plan = WindowPlan(WindowSpec("us", 100, 50))
    state = plan.new_state()
    plan.plan(state, np.array([10, 20], dtype=np.int64))
    before = state.copy()
    for bad in ([15], [30, 25]):
        with pytest.raises(WindowError, match="go back in time"):
            plan.plan(state, np.array(bad, dtype=np.int64))
    assert state.last_t == before.last_t == 20 and (state.counts == before.counts).all()


@pytest.mark.parametrize("field, message", [
    ({"ms": 100, "hop_ms": 200}, r"window.hop_ms must be at most window.ms \(100\), got 200"),
    ({"ms": 0}, "window.ms must be a positive number of milliseconds, got 0"),
    ({"ms": -5, "hop_ms": 1}, "window.ms must be a positive"),
    ({"ms": True}, "window.ms must be a number of milliseconds, got True"),
    ({"ms": float("nan")}, "window.ms must be a positive"),
    ({"ms": 1.0000001}, "resolution of 1 microsecond"),
    ({"ms": 10**9}, "window.ms must be at most 86400000 ms"),
    ({"ms": 10**400}, "window.ms must be at most 86400000 ms"),
    ({"ms": 1000, "hop_ms": 10}, r"100 lanes; at most 64: raise the hop to at least 15625"),
    ({"events": 0}, "window.events must be between 1 and"),
    ({"events": 10, "hop": 11}, r"window.hop must be at most window.events \(10\), got 11"),
    ({"events": 10, "hop": 2.0}, "window.hop must be an integer, got 2.0"),
    ({"ms": 10, "hop": 5}, r"got the fields \['hop', 'ms'\]"),
    ({"hop_ms": 5}, r"got the fields \['hop_ms'\]"),
    ({}, r"got the fields \[\]"),
    ([10, 5], "window must be a map"),
])
def test_window_field_validation(field: object, message: str) -> None:
    with pytest.raises(WindowError, match=message):
        WindowSpec.from_dict(field)


def test_window_field_round_trip_and_tumbling_default() -> None:
    assert WindowSpec.from_dict({"ms": 2.5, "hop_ms": 0.5}).to_dict() == {"ms": 2.5, "hop_ms": 0.5}
    assert WindowSpec.from_dict({"ms": 2.5, "hop_ms": 0.5}).lanes == 5
    tumbling = WindowSpec.from_dict({"events": 7})
    assert tumbling.hop == 7 and tumbling.lanes == 1
    assert WindowSpec.from_dict({"events": 64, "hop": 1}).lanes == MAX_LANES


def test_a_snapshot_resumes_the_lanes_exactly() -> None:
    import msgpack

    spec = WindowSpec("us", 5000, 1500)
    plan = WindowPlan(spec)
    t = np.cumsum(np.random.default_rng(5).integers(0, 400, 300)).astype(np.int64)
    whole = [plan.plan(state := plan.new_state(), t[:120]), plan.plan(state, t[120:])]
    part = plan.new_state()
    plan.plan(part, t[:120])
    resumed = plan.restore(msgpack.unpackb(msgpack.packb(part.to_dict())))
    after = plan.plan(resumed, t[120:])
    assert after.window() == whole[1].window() and (after.restarts == whole[1].restarts).all()
    assert resumed.to_dict() == state.to_dict()
    with pytest.raises(WindowError, match="starts must be 4 int64 integers"):
        plan.restore({**part.to_dict(), "starts": [0, 0, 0]})
    with pytest.raises(WindowError, match="seen must be an int64 integer"):
        plan.restore({**part.to_dict(), "seen": 1 << 64})
    with pytest.raises(WindowError, match="expected the fields"):
        plan.restore({"origin": 0})
