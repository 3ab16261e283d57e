"""The session's bookkeeping without a socket: the replay ledger (what is kept, trimmed on
snapshots, what a resync replays), the in-flight window, the result queue, packet merging and the
state table.

The socket-level behaviour (drops, restarts, resumes) is in test_client_session.py."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from evssm.client.errors import ProtocolError, ServerError, SessionExpired
from evssm.client.ledger import ReplayLedger, Sent
from evssm.client.protocol import Result, encode_events
from evssm.client.resync import merge_packets
from evssm.client.state import TRANSITIONS, SessionState, moved
from evssm.client.window import InFlight, ResultQueue
from evssm.models.events import Recording


def sent(seq: int, n: int) -> Sent:
    return Sent(seq=seq, frame=b"", n=n, sent_at=0.0)


def answer_all(ledger: ReplayLedger, sizes: list[int], durable: int | None = 0) -> list[Sent]:
    """Answer packets of ``sizes`` in order, each reporting ``durable``."""
    entries = []
    for seq, n in enumerate(sizes):
        entry = sent(seq, n)
        ledger.answered(entry, ledger.acked + n, durable)
        entries.append(entry)
    return entries


def kept_sizes(ledger: ReplayLedger) -> list[int]:
    return [e.n for e in ledger.kept]


# -- what is kept ---------------------------------------------------------------------------------


def test_without_snapshots_nothing_is_kept() -> None:
    ledger = ReplayLedger(1000)
    answer_all(ledger, [10, 20, 30], durable=None)
    assert ledger.acked == 60 and ledger.kept_events == 0 and kept_sizes(ledger) == []
    assert not ledger.holds_whole_stream


def test_answered_packets_after_the_snapshot_are_kept_and_trimmed_as_it_moves() -> None:
    ledger = ReplayLedger(1000)
    ledger.start(0, 0)
    answer_all(ledger, [10, 20, 30])
    assert kept_sizes(ledger) == [10, 20, 30] and ledger.base == 0 and ledger.holds_whole_stream
    ledger.note_durable(30)  # covers the first two packets exactly
    ledger.trim()
    assert kept_sizes(ledger) == [30] and ledger.base == 30 and ledger.kept_events == 30
    ledger.note_durable(45)  # inside the last packet: it stays (packets are atomic)
    ledger.trim()
    assert kept_sizes(ledger) == [30] and not ledger.overflowed


def test_empty_packets_are_never_kept() -> None:
    ledger = ReplayLedger(1000)
    ledger.start(0, 0)
    answer_all(ledger, [5, 0, 7])
    assert kept_sizes(ledger) == [5, 7] and ledger.kept_events == 12


def test_memory_is_bounded_and_an_overflow_is_remembered() -> None:
    ledger = ReplayLedger(100)
    ledger.start(0, 0)
    answer_all(ledger, [40] * 10)
    assert ledger.kept_events <= 100 and kept_sizes(ledger) == [40, 40]
    assert ledger.base == 320 and ledger.acked == 400 and ledger.overflowed
    with pytest.raises(SessionExpired, match="raise max_replay_events") as info:
        ledger.plan(0, restored=True, fresh=False, window=[])
    assert info.value.code == "resume_mismatch"


def test_an_older_or_repeated_durable_changes_nothing() -> None:
    ledger = ReplayLedger(1000)
    ledger.start(0, 0)
    answer_all(ledger, [10, 10, 10])
    ledger.note_durable(20)
    ledger.trim()
    before = (kept_sizes(ledger), ledger.durable, ledger.base)
    for stale in (20, 10, 0):  # answers may report an older snapshot
        ledger.note_durable(stale)
        ledger.trim()
        assert (kept_sizes(ledger), ledger.durable, ledger.base) == before


def test_a_server_without_snapshots_drops_what_was_kept() -> None:
    ledger = ReplayLedger(1000)
    ledger.start(0, 0)
    answer_all(ledger, [10, 10])
    ledger.note_durable(None)
    assert ledger.durable is None and kept_sizes(ledger) == []


def test_a_reset_forgets_the_old_stream() -> None:
    ledger = ReplayLedger(1000)
    ledger.start(0, 5)
    answer_all(ledger, [10, 10])
    ledger.reset_sent()
    assert ledger.acked == 0 and kept_sizes(ledger) == [] and ledger.durable == 0
    assert ledger.unconfirmed_reset == 20 and ledger.reset_unsnapshotted
    ledger.reset_confirmed()
    assert ledger.unconfirmed_reset is None
    ledger.note_durable(3)
    assert not ledger.reset_unsnapshotted


# -- what a resync sends ---------------------------------------------------------------------------


def test_a_live_session_holds_a_prefix_of_the_window() -> None:
    ledger = ReplayLedger(1000)
    ledger.start(0, None)
    answer_all(ledger, [10, 10], durable=None)
    window = [5, 6, 7]
    for k in range(len(window) + 1):
        plan = ledger.plan(20 + sum(window[:k]), restored=False, fresh=False, window=window)
        assert plan.processed == k and plan.replay == () and not plan.reset and not plan.restarted


@pytest.mark.parametrize("served", [23, 28, 20 + 5 + 6 + 7 + 1])
def test_a_count_between_packets_or_beyond_the_window_is_a_mismatch(served: int) -> None:
    ledger = ReplayLedger(1000)
    ledger.start(0, None)
    answer_all(ledger, [10, 10], durable=None)
    with pytest.raises(SessionExpired, match=f"holds {served} events") as info:
        ledger.plan(served, restored=False, fresh=False, window=[5, 6, 7])
    assert info.value.code == "resume_mismatch" and "18 in flight" in str(info.value)


def test_a_live_session_behind_the_answers_is_a_mismatch() -> None:
    ledger = ReplayLedger(1000)
    ledger.start(0, 0)
    answer_all(ledger, [10, 10])
    with pytest.raises(SessionExpired):
        ledger.plan(10, restored=False, fresh=False, window=[])


def test_a_restored_session_replays_the_kept_packets_after_its_snapshot() -> None:
    ledger = ReplayLedger(1000)
    ledger.start(0, 0)
    entries = answer_all(ledger, [10, 20, 30, 40])
    for served, replayed in ((0, entries), (10, entries[1:]), (30, entries[2:]), (60, entries[3:]),
                             (100, [])):
        plan = ledger.plan(served, restored=True, fresh=False, window=[3])
        assert list(plan.replay) == replayed and plan.processed == 0
        assert sum(e.n for e in plan.replay) == 100 - served
    with pytest.raises(SessionExpired):  # not on a packet boundary
        ledger.plan(15, restored=True, fresh=False, window=[3])


def test_a_restore_from_before_the_ledger_is_a_mismatch() -> None:
    ledger = ReplayLedger(1000)
    ledger.start(0, 0)
    answer_all(ledger, [10, 20, 30])
    ledger.note_durable(30)
    ledger.trim()
    with pytest.raises(SessionExpired, match="keeps those from 30 on"):
        ledger.plan(10, restored=True, fresh=False, window=[])


def test_a_reset_lost_with_the_connection_is_sent_again() -> None:
    ledger = ReplayLedger(1000)
    ledger.start(0, None)
    answer_all(ledger, [10, 10], durable=None)
    ledger.reset_sent()
    plan = ledger.plan(20, restored=False, fresh=False, window=[4])  # the count is the old one
    assert plan.reset and plan.restarted and plan.processed == 0 and plan.replay == ()
    assert not ledger.reset_unsnapshotted  # no snapshots on this server


def test_a_restore_after_an_unsnapshotted_reset_replays_the_whole_new_stream() -> None:
    ledger = ReplayLedger(1000)
    ledger.start(0, 50)
    answer_all(ledger, [10, 10], durable=50)
    ledger.reset_sent()
    entries = answer_all(ledger, [7, 8], durable=0)  # the new stream: no snapshot of it yet
    plan = ledger.plan(50, restored=True, fresh=False, window=[])  # the state before the reset
    assert plan.reset and plan.restarted and list(plan.replay) == entries


def test_a_new_session_replays_the_whole_stream_only_when_it_is_all_kept() -> None:
    ledger = ReplayLedger(1000)
    ledger.start(0, 0)
    entries = answer_all(ledger, [10, 10])
    plan = ledger.plan(0, restored=False, fresh=True, window=[5])
    assert not plan.reset and plan.restarted and list(plan.replay) == entries
    ledger.note_durable(10)
    ledger.trim()
    with pytest.raises(SessionExpired):
        ledger.plan(0, restored=False, fresh=True, window=[5])


def test_finish_takes_the_new_durable_unless_the_stream_restarted() -> None:
    ledger = ReplayLedger(1000)
    ledger.start(0, 0)
    answer_all(ledger, [10, 10])
    ledger.finish(10, restarted=False)
    assert ledger.durable == 10 and kept_sizes(ledger) == [10]
    ledger.finish(20, restarted=True)  # a durable of the stream before the reset: not ours
    assert ledger.durable == 10
    ledger.finish(None, restarted=False)
    assert ledger.durable is None and kept_sizes(ledger) == []
    ledger.finish(5, restarted=True)
    assert ledger.durable == 0


def test_replay_ends_are_the_server_counts_after_each_packet() -> None:
    ledger = ReplayLedger(1000)
    ledger.start(0, 0)
    answer_all(ledger, [10, 20, 30])
    assert ledger.replay_ends([20, 30]) == [30, 60]
    assert ledger.replay_ends([]) == []


def test_random_streams_replay_exactly_what_the_restored_server_lacks() -> None:
    rng = np.random.default_rng(1234)
    for _ in range(200):
        ledger = ReplayLedger(int(rng.integers(0, 400)))
        ledger.start(0, 0)
        sizes = rng.integers(0, 40, size=int(rng.integers(1, 20))).tolist()
        answer_all(ledger, sizes, durable=0)
        ledger.note_durable(int(rng.integers(0, sum(sizes) + 1)))
        ledger.trim()
        assert ledger.kept_events == sum(kept_sizes(ledger)) <= ledger.max_events
        assert 0 not in kept_sizes(ledger)
        bounds = np.cumsum([ledger.base, *kept_sizes(ledger)]).tolist()
        served = int(rng.choice(bounds))
        plan = ledger.plan(served, restored=True, fresh=False, window=[])
        assert served + sum(e.n for e in plan.replay) == ledger.acked


# -- the window, the result queue, merged packets ---------------------------------------------------


def test_answers_must_come_in_packet_order() -> None:
    window = InFlight(2)
    window.add(sent(0, 3))
    window.add(sent(1, 4))
    assert window.full and window.sizes == [3, 4]
    with pytest.raises(ProtocolError, match="result for packet 1 arrived, expected 0"):
        window.answer(1)
    assert window.answer(0).seq == 0 and len(window) == 1 and not window.full
    with pytest.raises(ValueError):
        InFlight(0)


def test_an_error_behind_results_waits_for_the_next_poll() -> None:
    queue = ResultQueue()
    first = Result(seq=0, events=1, t=1, probs=None, top=[])
    queue.append(first)
    queue.append(ServerError("invalid_field", "bad", seq=1))
    queue.append(Result(seq=2, events=2, t=2, probs=None, top=[]))
    assert queue.poll() == [first] and len(queue) == 2 and queue.error_next
    with pytest.raises(ServerError, match="invalid_field"):
        queue.poll()
    assert [r.seq for r in queue.poll()] == [2] and len(queue) == 0


def test_merged_packets_carry_the_same_events_in_order() -> None:
    rng = np.random.default_rng(7)
    t = np.sort(rng.integers(0, 10_000, 50)).astype(np.int64)
    x = rng.integers(0, 16, 50).astype(np.int64)
    rec = Recording(t, x)
    cuts = [0, 7, 7, 20, 33, 50]
    entries = [Sent(i, encode_events(i, rec.slice(a, b)), b - a, 0.0)
               for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True))]
    chunks = merge_packets(entries, 20)
    # sizes 7, 0, 13, 13, 17: a merged packet takes its last packet's seq
    assert [(seq, n) for seq, _, n in chunks] == [(2, 20), (3, 13), (4, 17)]
    frames = [msgpack.unpackb(frame) for _, frame, _ in chunks]
    assert all(f["type"] == "events" and f["seq"] == seq for f, (seq, _, _) in zip(frames, chunks, strict=True))
    got_t = np.concatenate([np.frombuffer(f["t"], "<i8") for f in frames])
    got_x = np.concatenate([np.frombuffer(f["x"], "<u2") for f in frames])
    np.testing.assert_array_equal(got_t, t)
    np.testing.assert_array_equal(got_x, x)
    assert merge_packets([], 20) == []


def test_every_state_can_close_and_closed_is_final() -> None:
    S = SessionState
    for state in S:
        if state is not S.CLOSED:
            closing = state if state is S.CLOSING else moved(state, S.CLOSING)
            assert moved(closing, S.CLOSED) is S.CLOSED
    assert TRANSITIONS[S.CLOSED] == frozenset()
    for bad in ((S.NEW, S.RECONNECTING), (S.FAILED, S.OPEN), (S.CLOSED, S.OPEN)):
        with pytest.raises(RuntimeError, match="not allowed"):
            moved(*bad)
