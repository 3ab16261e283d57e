"""The snapshot ledger alone: what a row holds after each reported plan and what its snapshots
cover (no scheduler, no JAX)."""

from __future__ import annotations

import asyncio

import numpy as np

from evssm.server.core.ledger import SnapshotLedger, StepChanges
from evssm.server.core.sessions import Captured, LaneRows, Packet, Restore, Session


class Sink:
    def __init__(self) -> None:
        self.items: list[Captured] = []
        self.rows: list[np.ndarray] = []

    def captured(self, model: str, items: list[Captured], rows: list[np.ndarray]) -> None:
        assert model == "m" and len(items) == len(rows)
        self.items += items
        self.rows += list(rows)


def _packet(events_after: int, last_t: int) -> Packet:
    return Packet(seq=1, region=None, start=0, size=3, events_after=events_after, last_t=last_t,
                  received=0.0, reply=None)


def test_a_row_is_captured_only_when_settled_and_a_reset_starts_a_new_stream() -> None:
    async def run() -> None:
        sink = Sink()
        ledger = SnapshotLedger("m", 4, sink)
        session = Session(id="a", token="t", model="m", slot=2, top_k=3)
        key = object()
        probs, ready = np.full((4, 2), 0.5, np.float32), np.ones(4, bool)
        ledger.add(key, session, None, zero_first=False)
        assert ledger.durable_of(key) == 0
        n, done = ledger.request({key: session}, everything=False)
        assert n == 1 and not done.done() and ledger.due
        # Read while a packet is half stepped: no event count, read again later.
        ledger.update(StepChanges([], [], [(key, _packet(3, 30), False)]))
        assert ledger.next_reads(8) == [key] and not ledger.due
        ledger.captured([key], np.zeros((1, 2), np.int32), probs, ready, lambda k: True)
        assert sink.items == [] and ledger.due and not done.done()
        ledger.update(StepChanges([], [], [(key, _packet(3, 30), True)]))
        ledger.captured(ledger.next_reads(8), np.ones((1, 2), np.int32), probs, ready, lambda k: True)
        assert done.done() and len(sink.items) == 1
        item = sink.items[0]
        assert (item.events, item.last_t, item.epoch, item.version) == (3, 30, 0, 1)
        assert item.probs is not None and np.isfinite(item.probs).all() and item.probs.tolist() == [0.5, 0.5]
        ledger.written(key, item, covered=3)
        assert ledger.durable_of(key) == 3
        # Unchanged since: nothing to read.
        assert ledger.request({key: session}, everything=False)[0] == 0
        # A reset: a new stream that no snapshot covers yet; a late write of the old one covers none.
        ledger.update(StepChanges([key], [], []))
        assert ledger.durable_of(key) == 0
        ledger.written(key, item, covered=3)
        assert ledger.durable_of(key) == 0
        ledger.remove(key)
        assert ledger.durable_of(key) is None

    asyncio.run(run())


def test_a_restored_lane_starts_covered_and_a_gone_lane_releases_its_waiters() -> None:
    async def run() -> None:
        ledger = SnapshotLedger("m", 2, Sink())
        session = Session(id="b", token="u", model="m", slot=0, top_k=3)
        key = object()
        restore = Restore(row=np.zeros(2, np.int32), events=7, last_t=70, probs=None, cropped=2)
        ledger.add(key, session, restore, zero_first=False)
        assert ledger.durable_of(key) == 9  # events sent, kept and cropped
        ledger.update(StepChanges([], [(key, restore)], []))
        n, done = ledger.request({key: session}, everything=True)
        assert n == 1
        ledger.remove(key)  # released before its read
        assert done.done() and not ledger.due

    asyncio.run(run())


def test_a_filtered_lane_is_captured_with_the_filter_state_of_its_done_events() -> None:
    """With input filters the live state runs ahead of the row (packets accepted, not stepped):
    a capture takes those packets back out of a copy of it with their undo records; a packet the
    filters emptied counts as done once answered; a reset not yet done defers the read."""
    from evssm.models.events import SensorSpec
    from evssm.models.filters import FilterBank, FilterSpec
    from evssm.server.core.sessions import Reset
    from evssm.server.live.filtering import filter_packet

    bank = FilterBank(FilterSpec(refractory_us=100, denoise_us=1000), SensorSpec.one_d(10), native=False)

    async def run() -> None:
        sink = Sink()
        ledger = SnapshotLedger("m", 2, sink)
        session = Session(id="c", token="v", model="m", slot=1, top_k=3)
        session.filters, session.filter_state = bank, bank.new_state()
        reference, states = bank.new_state(), [bank.new_state().to_dict()]
        key = object()
        probs, ready = np.zeros((2, 2), np.float32), np.zeros(2, bool)
        ledger.add(key, session, None, zero_first=True)
        packets = []
        for t, x in (([0, 1, 2], [1, 2, 3]), ([3], [8])):  # the second: a lone event, removed
            cols = np.array(t, np.int64), np.array(x, np.uint16)
            out = filter_packet(bank, session.filter_state, None, cols[0], cols[1], None, None)
            kept = len(t) if out.keep is None else int(out.keep.sum())
            packets.append(Packet(seq=len(packets), region=None, start=0, size=kept, events_after=0, last_t=None,
                                  received=0.0, reply=None, filters_undo=out.undo))
            ledger.accepted(key, packets[-1])
            bank.apply(reference, cols[0], cols[1].astype(np.int32))
            states.append(reference.to_dict())
        assert packets[1].size == 0

        def capture() -> dict | None:
            sink.items.clear()
            ledger.request({key: session}, everything=True)
            ledger.captured(ledger.next_reads(8), np.zeros((1, 2), np.int32), probs, ready, lambda k: True)
            return sink.items[0].filters.to_dict() if sink.items else None

        ledger.update(StepChanges([key], [], []))  # the reused row's zeroing: no client reset
        assert capture() == states[0]  # both packets taken out again
        ledger.update(StepChanges([], [], [(key, packets[0], True)]))
        assert capture() == states[1]
        ledger.answered_empty(key, packets[1])
        assert capture() == states[2]
        session.filter_state = bank.new_state()  # a client reset: a new stream
        ledger.accepted(key, Reset(reply=None))
        assert capture() is None and ledger.due  # read again once the reset is done
        ledger.update(StepChanges([key], [], []))
        ledger.captured(ledger.next_reads(8), np.zeros((1, 2), np.int32), probs, ready, lambda k: True)
        assert sink.items and sink.items[-1].filters.to_dict() == states[0]

    asyncio.run(run())


def test_a_windowed_row_set_is_read_whole_with_the_lane_state_of_its_last_stepped_packet() -> None:
    """A session of three lanes: a read copies its three rows, paired with the lane state the
    last finished packet recorded, the answering lane's probabilities,
    and ``durable`` on every lane; a restore's lane state stands until the next packet."""
    async def run() -> None:
        sink = Sink()
        ledger = SnapshotLedger("m", 8, sink)
        session = Session(id="w", token="t", model="m", slot=5, top_k=3, slots=(5, 1, 6))
        other = Session(id="o", token="u", model="m", slot=2, top_k=3)
        key, one = object(), object()
        probs = np.arange(16, dtype=np.float32).reshape(8, 2)
        ready = np.ones(8, bool)
        ledger.add(key, session, None, zero_first=False)
        ledger.add(one, other, None, zero_first=False)
        rows = LaneRows(sizes=(3, 3, 1), resets=(False, False, True), copies=(-1, -1, -1), answer=2,
                        t0=10, events=3)
        first = _packet(3, 30)
        first.lanes, first.window_after = rows, "state after 3"
        ledger.update(StepChanges([], [], [(key, first, True)]))
        ledger.request({key: session}, everything=True)
        ledger.request({one: other}, everything=True)
        assert ledger.next_reads(3) == [key]  # its three rows fill a budget of three
        assert ledger.next_reads(3) == [one]
        read = np.arange(8, dtype=np.int32).reshape(4, 2)  # three rows of ``key``, then ``one``'s
        ledger.captured([key, one], read, probs, ready, lambda k: True, sizes=[3, 1])
        (item, single), (kept, alone) = sink.items, sink.rows
        assert item.window == "state after 3" and single.window is None
        assert item.probs is not None and item.probs.tolist() == probs[6].tolist()  # lane 2 is slot 6
        assert np.array_equal(kept, read[:3]) and np.array_equal(alone, read[3:])
        ledger.written(key, item, covered=3)
        assert ledger.durable.tolist()[5] == ledger.durable.tolist()[1] == ledger.durable.tolist()[6] == 3
        # Restored: its lane state is the snapshot's until a packet is stepped.
        ledger.remove(key)
        ledger.add(key, session, Restore(row=np.zeros((3, 2), np.int32), events=3, last_t=30, probs=None,
                                         window="restored"), zero_first=False)
        ledger.update(StepChanges([], [(key, Restore(row=np.zeros((3, 2), np.int32), events=3, last_t=30,
                                                     probs=None, window="restored"))], []))
        ledger.request({key: session}, everything=True)
        ledger.captured(ledger.next_reads(8), read[:3], probs, ready, lambda k: True, sizes=[3])
        assert sink.items[-1].window == "restored" and sink.items[-1].events == 3

    asyncio.run(run())
