"""Input filters (models/filters.py): the specification on hand-made streams, the native pass
against the NumPy reference event for event, and the invariant that any packetisation of a stream
filters it exactly as one packet does."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evssm.models import filters
from evssm.models.events import SensorSpec
from evssm.models.filters import NEVER, FilterBank, FilterError, FilterSpec
from evssm.models.native_build import FILTERS_MODULE, FILTERS_SOURCE, NativeUnavailable, load_extension

try:
    load_extension(FILTERS_SOURCE, FILTERS_MODULE)
    NATIVE = True
except NativeUnavailable:  # pragma: no cover - machines without g++
    NATIVE = False
needs_native = pytest.mark.skipif(not NATIVE, reason="no C++ compiler for the native filters")

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HOUR_US = 3_600_000_000


def bank(spec: FilterSpec, sensor: SensorSpec, native: bool) -> FilterBank:
    return FilterBank(spec, sensor, native=native)


def tokens_2d(sensor: SensorSpec, x: list[int], y: list[int], p: list[int]) -> np.ndarray:
    return (np.array(x) + sensor.width * (np.array(y) + sensor.height * np.array(p))).astype(np.int32)


def run_packets(b: FilterBank, t: np.ndarray, tok: np.ndarray, cuts: list[int]
                ) -> tuple[np.ndarray, filters.FilterState]:
    state = b.new_state()
    keeps = [b.apply(state, t[lo:hi], tok[lo:hi])[0]
             for lo, hi in zip([0, *cuts], [*cuts, t.size], strict=True)]
    return np.concatenate(keeps), state


def assert_same_state(a: filters.FilterState, b: filters.FilterState) -> None:
    for x, y in ((a.refractory, b.refractory), (a.denoise, b.denoise)):
        assert (x is None) == (y is None)
        if x is not None and y is not None:
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.scalars, b.scalars)
    assert a.removed == b.removed


# -- the specification, by hand ----------------------------------------------------------------


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=needs_native)])
def test_refractory_counts_from_the_last_kept_event_and_ignores_polarity(native: bool) -> None:
    sensor = SensorSpec("2d", width=4, height=3)
    b = bank(FilterSpec(refractory_us=10), sensor, native)
    # pixel (1, 2): t = 0 kept; 5 (other polarity) dropped; 9 dropped: 5 did not extend the dead
    # time; 10 kept (10 - 0 >= 10); 19 dropped. Pixel (2, 2) at 5 is another address: kept.
    t = np.array([0, 5, 5, 9, 10, 19], dtype=np.int64)
    tok = tokens_2d(sensor, [1, 1, 2, 1, 1, 1], [2, 2, 2, 2, 2, 2], [0, 1, 0, 0, 1, 0])
    state = b.new_state()
    keep, counts = b.apply(state, t, tok)
    assert keep.tolist() == [True, False, True, False, True, False]
    assert counts == filters.FilterCounts(refractory=3)
    assert state.refractory is not None and state.refractory[1 + 4 * 2] == 10


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=needs_native)])
def test_denoise_needs_a_recent_neighbour_and_never_wraps_a_row(native: bool) -> None:
    sensor = SensorSpec("2d", width=4, height=3)
    b = bank(FilterSpec(denoise_us=100), sensor, native)
    # (3, 0) then (0, 1): adjacent in memory, not on the sensor, so the second is alone; (1, 1)
    # beside (0, 1) 50 us later: kept; (2, 2) diagonal to (1, 1) at exactly +100 us: not within
    # (t - s < D is strict); (3, 2) 99 us after (2, 2): kept; (0, 0) has (0,1) and (1,1)
    # around it but 1000 us later: dropped.
    t = np.array([0, 10, 60, 160, 259, 1260], dtype=np.int64)
    tok = tokens_2d(sensor, [3, 0, 1, 2, 3, 0], [0, 1, 1, 2, 2, 0], [0, 1, 0, 1, 0, 0])
    keep, counts = b.apply(b.new_state(), t, tok)
    assert keep.tolist() == [False, False, True, False, True, False]
    assert counts.denoise == 4


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=needs_native)])
def test_denoise_on_a_1d_sensor_looks_at_the_two_channels_beside(native: bool) -> None:
    sensor = SensorSpec("1d", channels=700)
    b = bank(FilterSpec(denoise_us=1000), sensor, native)
    t = np.array([0, 1, 2, 3, 4], dtype=np.int64)
    tok = np.array([10, 12, 11, 699, 0], dtype=np.int32)  # 11 has 10 and 12; 0 and 699 do not touch
    keep, _ = b.apply(b.new_state(), t, tok)
    assert keep.tolist() == [False, False, True, False, False]


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=needs_native)])
def test_rate_cap_thins_a_burst_evenly_and_refills_in_stream_time(native: bool) -> None:
    sensor = SensorSpec("1d", channels=8)
    rate = 100_000  # one event per 10 us; the bucket holds 1 ms of it: 100 events
    b = bank(FilterSpec(max_rate=rate), sensor, native)
    state = b.new_state()
    t = np.arange(0, 20_000, dtype=np.int64)  # 1 M events/s for 20 ms
    tok = (t % 8).astype(np.int32)
    keep, counts = b.apply(state, t, tok)
    kept_t = t[keep]
    # The full bucket (100 events) plus 0.1 event per us refilled, none lost to a full bucket:
    # the bucket never fills again once the burst has started spending it.
    assert kept_t.size == (100 * filters.UNIT + rate * int(t[-1])) // filters.UNIT
    assert counts.max_rate == t.size - kept_t.size
    assert np.all(np.diff(kept_t[200:]) == 10)  # steady state: evenly spread
    # Equal timestamps spend the bucket and refill nothing.
    same = b.apply(state, np.full(500, 10 * HOUR_US, dtype=np.int64), np.zeros(500, np.int32))[0]
    assert int(same.sum()) == 100


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=needs_native)])
def test_a_refused_packet_names_the_fault_and_changes_no_state(native: bool) -> None:
    sensor = SensorSpec("2d", width=8, height=8)
    b = bank(FilterSpec(refractory_us=5, denoise_us=50, max_rate=1000), sensor, native)
    state = b.new_state()
    b.apply(state, np.array([100, 101], dtype=np.int64), np.array([3, 4], dtype=np.int32))
    before = state.copy()
    with pytest.raises(FilterError, match="event 1 at t=50 us goes back in time"):
        b.apply(state, np.array([200, 50], dtype=np.int64), np.array([1, 1], dtype=np.int32))
    with pytest.raises(FilterError, match="event 0 at t=99 us goes back"):
        b.apply(state, np.array([99], dtype=np.int64), np.array([1], dtype=np.int32))
    with pytest.raises(FilterError, match="token 128, outside 0..127"):
        b.apply(state, np.array([200, 201], dtype=np.int64), np.array([1, 128], dtype=np.int32))
    assert_same_state(state, before)


@pytest.mark.parametrize("field, value, message", [
    ("refractory_us", 0, "must be between 1 and"),
    ("denoise_us", -3, "must be between 1 and"),
    ("max_rate", 10**10, "must be between 1 and 1000000000"),
    ("max_rate", True, "must be an integer"),
    ("refractory_us", 2.5, "must be an integer"),
])
def test_spec_validation_names_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(FilterError, match=f"filters.{field} {message}"):
        FilterSpec.from_dict({field: value})


def test_spec_from_the_wire() -> None:
    assert FilterSpec.from_dict({"refractory_us": 200, "max_rate": None}).to_dict() == {"refractory_us": 200}
    with pytest.raises(FilterError, match=r"unknown field\(s\) \['denoise'\]"):
        FilterSpec.from_dict({"denoise": 5})
    with pytest.raises(FilterError, match="must be a map"):
        FilterSpec.from_dict([5])
    assert not FilterSpec().active and FilterSpec(max_rate=5).active


def test_state_memory_for_a_1280x720_camera() -> None:
    sensor = SensorSpec("2d", width=1280, height=720)
    state = FilterBank(FilterSpec(refractory_us=1, denoise_us=1, max_rate=1), sensor, native=False).new_state()
    assert state.nbytes == 2 * 1280 * 720 * 8 + 4 * 8  # 14.7 MB, as the module docstring says
    assert FilterBank(FilterSpec(max_rate=1), sensor, native=False).new_state().nbytes == 32


@needs_native
def test_the_native_pass_refuses_what_it_does_not_implement() -> None:
    lib = load_extension(FILTERS_SOURCE, FILTERS_MODULE)
    t, tok, keep = np.zeros(2, np.int64), np.zeros(2, np.int32), np.zeros(2, np.bool_)
    scalars = np.array([NEVER, NEVER, 10**6, 0], dtype=np.int64)
    with pytest.raises(ValueError, match="planes 1 or 2"):
        lib.apply(t, tok, keep, 4, 4, 3, 0, 0, 5, None, None, scalars)
    with pytest.raises(ValueError, match="t: expected a 1-d array of 8-byte items"):
        lib.apply(t.astype(np.float64), tok, keep, 4, 4, 2, 0, 0, 5, None, None, scalars)
    with pytest.raises(ValueError, match=r"t: expected a 1-d array of 8-byte items \(ql\)"):
        lib.apply(t.astype(np.uint64), tok, keep, 4, 4, 2, 0, 0, 5, None, None, scalars)
    with pytest.raises(ValueError, match="tokens: expected a 1-d array of 4-byte items"):
        lib.apply(t, tok.astype(np.int64), keep, 4, 4, 2, 0, 0, 5, None, None, scalars)
    with pytest.raises(ValueError, match="a state array for each enabled"):
        lib.apply(t, tok, keep, 4, 4, 2, 7, 0, 5, None, None, scalars)
    with pytest.raises(ValueError, match="per-pixel state must have 16 items"):
        lib.apply(t, tok, keep, 4, 4, 2, 7, 0, 5, np.zeros(5, np.int64), None, scalars)


# -- properties: native == reference, any packetisation == one packet ------------------------


@st.composite
def streams(draw: st.DrawFn) -> tuple[SensorSpec, FilterSpec, np.ndarray, np.ndarray, list[int]]:
    if draw(st.booleans()):
        sensor = SensorSpec("2d", width=draw(st.integers(1, 6)), height=draw(st.integers(1, 5)))
    else:
        sensor = SensorSpec("1d", channels=draw(st.integers(1, 12)))
    n = draw(st.integers(0, 300))
    # Gaps: equal timestamps, MHz bursts, ordinary gaps and hour-long silences.
    gap = st.one_of(st.just(0), st.integers(0, 3), st.integers(0, 2000), st.just(HOUR_US),
                    st.integers(HOUR_US, 50 * HOUR_US))
    start = draw(st.one_of(st.just(0), st.integers(0, 1_700_000_000_000_000)))
    t = start + np.cumsum(np.array(draw(st.lists(gap, min_size=n, max_size=n)), dtype=np.int64))
    tok = np.array(draw(st.lists(st.integers(0, sensor.num_tokens - 1), min_size=n, max_size=n)),
                   dtype=np.int32)
    time_param = st.one_of(st.none(), st.integers(1, 3000), st.just(HOUR_US), st.just(filters.MAX_TIME_US))
    spec = FilterSpec(refractory_us=draw(time_param), denoise_us=draw(time_param),
                      max_rate=draw(st.one_of(st.none(), st.integers(1, 3_000_000), st.just(filters.MAX_RATE))))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=8)))
    return sensor, spec, t, tok, cuts


@needs_native
@PROPERTY
@given(streams())
def test_native_equals_reference_event_for_event_in_any_packets(
        case: tuple[SensorSpec, FilterSpec, np.ndarray, np.ndarray, list[int]]) -> None:
    sensor, spec, t, tok, cuts = case
    whole_keep, whole_state = run_packets(bank(spec, sensor, False), t, tok, [])
    for native in (False, True):
        keep, state = run_packets(bank(spec, sensor, native), t, tok, cuts)
        np.testing.assert_array_equal(keep, whole_keep)
        assert_same_state(state, whole_state)
    assert whole_state.removed.total == t.size - int(whole_keep.sum())


@PROPERTY
@given(streams())
def test_the_rate_cap_holds_over_every_interval(
        case: tuple[SensorSpec, FilterSpec, np.ndarray, np.ndarray, list[int]]) -> None:
    sensor, spec, t, tok, cuts = case
    spec = FilterSpec(max_rate=spec.max_rate or 5000)
    keep, _ = run_packets(bank(spec, sensor, False), t, tok, cuts)
    kept = t[keep]
    assert spec.max_rate is not None
    # Kept events i..j cost (j - i + 1) credits: at most the bucket plus the refill between them.
    for i in range(kept.size):
        j = np.arange(i, kept.size)
        span = np.minimum(kept[j] - kept[i], 10**9)  # beyond 1000 s the bound binds nothing here
        assert np.all((j - i + 1) * filters.UNIT <= spec.cap + span * spec.max_rate)


def test_the_benchmark_script_runs_and_reports_each_filter() -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_filters.py"
    done = subprocess.run([sys.executable, str(script), "--rates", "20000", "--seconds", "0.05",
                           "--rounds", "1", "--reference-events", "200"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)["rows"][0]
    assert row["events"] == 1000
    for name in ("refractory", "denoise", "max_rate", "chain"):
        assert row[name]["native_ns" if NATIVE else "reference_ns"] > 0
        assert 0 <= row[name]["removed"] <= 1
    bad = subprocess.run([sys.executable, str(script), "--packet", "0"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "must be positive" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=needs_native)])
def test_a_snapshot_resumes_the_stream_exactly(native: bool) -> None:
    import msgpack

    sensor = SensorSpec("2d", width=16, height=12)
    spec = FilterSpec(refractory_us=40, denoise_us=300, max_rate=50_000)
    rng = np.random.default_rng(3)
    t = np.cumsum(rng.integers(0, 30, 4000)).astype(np.int64)
    tok = rng.integers(0, sensor.num_tokens, 4000).astype(np.int32)
    b = bank(spec, sensor, native)
    whole, whole_state = run_packets(b, t, tok, [])
    state = b.new_state()
    first = b.apply(state, t[:1500], tok[:1500])[0]
    resumed = b.restore(msgpack.unpackb(msgpack.packb(state.to_dict())))
    second = b.apply(resumed, t[1500:], tok[1500:])[0]
    np.testing.assert_array_equal(np.concatenate([first, second]), whole)
    assert_same_state(resumed, whole_state)


def test_a_snapshot_that_does_not_fit_is_refused() -> None:
    sensor = SensorSpec("2d", width=4, height=4)
    b = bank(FilterSpec(refractory_us=5), sensor, False)
    good = b.new_state().to_dict()
    with pytest.raises(FilterError, match=r"refractory must be 256 bytes \(8 x 4 int64\)"):
        bank(FilterSpec(refractory_us=5), SensorSpec("2d", width=8, height=4), False).restore(good)
    with pytest.raises(FilterError, match="denoise holds a table, but that filter is off"):
        b.restore({**good, "denoise": good["refractory"]})
    with pytest.raises(FilterError, match="scalars must be 4 int64 integers"):
        b.restore({**good, "scalars": [0, 0, 1 << 63, 0]})
    with pytest.raises(FilterError, match="expected the fields"):
        b.restore({"refractory": None})
