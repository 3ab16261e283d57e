"""Real-time lag and the overload policy (server/live/lag.py), on synthetic clocks."""

from __future__ import annotations

import pytest

from evssm.server.live.lag import DEFAULT_MAX_LAG_MS, ClockSync, LagError, LagMonitor, OverloadPolicy

SENSOR_ORIGIN_US = 1_600_000_000_000_000  # an absolute sensor clock, as a DVXplorer stamps
SERVER_ORIGIN_S = 5000.0  # a monotonic clock reading


def arrival(t_us: int, delay_ms: float) -> float:
    """The server time a packet whose newest event is ``t_us`` arrives, ``delay_ms`` late."""
    return SERVER_ORIGIN_S + (t_us - SENSOR_ORIGIN_US) / 1e6 + delay_ms / 1000


def test_the_offset_is_the_least_delayed_packet_and_lag_counts_from_it() -> None:
    clock = ClockSync()
    assert clock.lag_ms(SERVER_ORIGIN_S, SENSOR_ORIGIN_US) is None
    for k, delay in enumerate([7.0, 3.0, 5.0, 9.0]):
        clock.observe(arrival(SENSOR_ORIGIN_US + k * 10_000, delay), SENSOR_ORIGIN_US + k * 10_000)
    t = SENSOR_ORIGIN_US + 30_000
    # The fastest packet (3 ms) sets the offset: an answer 40 ms after the last one's arrival
    # trails the sensor by its 9 ms, less the 3 ms the clocks cannot tell from the offset, plus 40.
    lag = clock.lag_ms(arrival(t, 9.0) + 0.040, t)
    assert lag is not None and lag == pytest.approx(46.0, abs=0.002)
    assert clock.lag_ms(arrival(t, 0.0), t) == 0.0  # never below zero


def test_a_window_follows_a_drifting_sensor_clock() -> None:
    drift = 100e-6  # the sensor's clock runs 100 ppm slow
    whole, recent = ClockSync(), ClockSync(window_s=5.0)
    for k in range(0, 600):  # a minute, a packet every 100 ms, each 2 ms in flight
        server_s = SERVER_ORIGIN_S + k * 0.1 + 0.002
        t = SENSOR_ORIGIN_US + round(k * 100_000 * (1 - drift))
        whole.observe(server_s, t)
        recent.observe(server_s, t)
    now_t = SENSOR_ORIGIN_US + round(599 * 100_000 * (1 - drift))
    done = SERVER_ORIGIN_S + 59.9 + 0.002
    whole_lag, recent_lag = whole.lag_ms(done, now_t), recent.lag_ms(done, now_t)
    assert whole_lag is not None and recent_lag is not None
    assert whole_lag == pytest.approx(5.99, abs=0.01)  # the drift of a minute, read as lag
    assert recent_lag < 0.6  # only the drift within the window


def test_drop_mode_drops_whole_late_packets_and_counts_them() -> None:
    monitor = LagMonitor(ClockSync(), OverloadPolicy.from_fields("drop", 100))
    t0 = SENSOR_ORIGIN_US
    monitor.arrived(arrival(t0, 1.0), t0)
    assert monitor.admit(arrival(t0, 50.0), t0, 1000)  # 49 ms late: stepped
    assert not monitor.admit(arrival(t0, 101.5), t0, 1000)  # 100.5 ms late: dropped
    assert not monitor.admit(arrival(t0, 300.0), t0, 250)
    assert (monitor.dropped_packets, monitor.dropped_events) == (2, 1250)
    lossless = LagMonitor(ClockSync(), OverloadPolicy.from_fields())
    lossless.arrived(arrival(t0, 1.0), t0)
    assert lossless.admit(arrival(t0, 10_000.0), t0, 5) and lossless.dropped_packets == 0


@pytest.mark.parametrize("overload, bound, message", [
    ("skip", None, r"overload must be one of \['lossless', 'drop'\], got 'skip'"),
    ("drop", 0, "max_lag_ms must be above 0"),
    ("drop", float("inf"), "max_lag_ms must be above 0"),
    ("drop", "100", "max_lag_ms must be a number of milliseconds"),
    ("drop", 10**400, "max_lag_ms must be above 0"),
    ("drop", float("nan"), "max_lag_ms must be above 0"),
    (None, 100, 'max_lag_ms bounds overload "drop"'),
])
def test_overload_field_validation(overload: object, bound: object, message: str) -> None:
    with pytest.raises(LagError, match=message):
        OverloadPolicy.from_fields(overload, bound)


def test_overload_defaults() -> None:
    assert OverloadPolicy.from_fields() == OverloadPolicy("lossless", DEFAULT_MAX_LAG_MS)
    assert OverloadPolicy.from_fields("drop").max_lag_ms == DEFAULT_MAX_LAG_MS
    with pytest.raises(LagError, match="positive number of seconds"):
        ClockSync(window_s=0)


def test_a_snapshot_keeps_the_learned_offset() -> None:
    import msgpack

    clock = ClockSync(window_s=10.0)
    for k, delay in enumerate([7.0, 3.0, 5.0]):
        clock.observe(arrival(SENSOR_ORIGIN_US + k * 10_000, delay), SENSOR_ORIGIN_US + k * 10_000)
    again = ClockSync.from_dict(msgpack.unpackb(msgpack.packb(clock.to_dict())))
    assert again.offset_us == clock.offset_us and again.window_us == clock.window_us
    t = SENSOR_ORIGIN_US + 20_000
    assert again.lag_ms(arrival(t, 30.0), t) == clock.lag_ms(arrival(t, 30.0), t)
    with pytest.raises(LagError, match="offsets must increase"):
        ClockSync.from_dict({"window_us": None, "candidates": [[0, 5], [1, 5]]})
    with pytest.raises(LagError, match="window_us must be a positive integer"):
        ClockSync.from_dict({"window_us": 0, "candidates": []})


def test_lag_as_if_a_packet_were_observed_changes_nothing():
    clock = ClockSync()
    assert clock.lag_ms(1.0, 0, arrival_s=0.9) == 100.0  # its own offset: 0.9 s - 0
    assert clock.offset_us is None, "a look-ahead observes nothing"
    clock.observe(1.0, 500_000)  # offset 0.5 s
    assert clock.lag_ms(2.0, 1_000_000, arrival_s=1.2) == 800.0  # its offset 0.2 s is the lower
    assert clock.lag_ms(2.0, 1_000_000, arrival_s=1.9) == 500.0  # its 0.9 s is not
    assert clock.offset_us == 500_000
