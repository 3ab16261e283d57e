"""The scheduler with a fake step runner: no JAX, no sockets, no frames.

The fake runner keeps, per state row, the sum and count of the tokens it was stepped by; a
result row is ``[count, sum, ready]``, so every answer says exactly which events its row has
seen, in which order they were added being checked through the sums of prefixes. A gate lets
a test hold a step while it submits more work, so that what gathers meanwhile is one plan.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from evssm.server.core.outputs import EndReason, StepOutputs
from evssm.server.core.plan import StepPlan, StepResult
from evssm.server.core.scheduler import Scheduler
from evssm.server.core.sessions import Close, Packet, Reset, Session, SessionStatus, SessionTable
from evssm.server.core.staging import StagingBuffer
from evssm.server.metrics import Metrics

MODEL = "fake"


class FakeRunner:
    """A StepRunner whose state row is (events seen, sum of their tokens)."""

    name = MODEL
    num_classes = 3
    max_batch = 8
    max_length = 4  # small: a packet of 10 events runs as 3 chunks in 3 plans
    words = 2
    coalesces = False  # set per test: a session's packets may share a plan

    def __init__(self, num_slots: int = 6):
        self.num_slots = num_slots
        self.rows = np.zeros((num_slots, 2), np.int64)
        self.plans: list[StepPlan] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_slot: int | None = None  # a plan stepping this row raises
        self.parked: list[int] = []  # plans run when each park() came

    def run(self, plan: StepPlan) -> StepResult:
        assert self.gate.wait(10), "the test never opened the gate"
        started = time.perf_counter()
        self.plans.append(plan)
        if self.fail_slot is not None and self.fail_slot in plan.slots.tolist():
            raise RuntimeError("device lost")
        self.rows[plan.zero] = 0
        out = np.zeros((len(plan.slots), self.num_classes), np.float32)
        for b, (slot, start, n) in enumerate(zip(plan.slots, plan.starts, plan.lengths, strict=True)):
            chunk = plan.tokens[start:start + n]
            self.rows[slot] += (n, int(chunk.sum()))
            out[b] = (*self.rows[slot], 1.0)
        return StepResult(out, np.ones(len(plan.slots), bool),
                          np.argsort(-out, axis=1, kind="stable").astype(np.int32),
                          started, time.perf_counter() - started,
                          self.rows[plan.read].astype(np.int32))

    def recover(self) -> bool:
        return False

    def prime(self) -> None:
        pass

    def park(self) -> None:
        self.parked.append(len(self.plans))


class Sink:
    """Collects what the scheduler hands the API layer."""

    def __init__(self) -> None:
        self.outputs: list[StepOutputs] = []

    def model_loaded(self, model: str, labels: tuple[str, ...]) -> None:
        pass

    def emit(self, outputs: StepOutputs) -> None:
        self.outputs.append(outputs)

    def ended(self, record: object) -> None:
        raise AssertionError("the scheduler reports ends in its outputs")

    def results(self) -> list[tuple[Session, int, list[float]]]:
        """(session, seq, row) of every answered packet, in the order answered."""
        return [(s, p.seq, a.probs[i].tolist()) for out in self.outputs for a in out.answered
                for i, (s, p) in enumerate(zip(a.sessions, a.packets, strict=True))]


class Harness:
    def __init__(self, slots: int = 6):
        self.runner = FakeRunner(slots)
        self.table = SessionTable(slots, {MODEL: slots})
        self.staging = StagingBuffer(1024)
        self.sink = Sink()
        self.released: list[Session] = []
        self.sched = Scheduler(self.runner, self.table, self.staging, self.sink, Metrics().model(MODEL),
                               batch_wait_s=0.0, on_release=self.released.append)
        self.seq = 0

    def open(self) -> Session:
        session = self.table.open(MODEL, 3)
        self.sched.add(session)
        return session

    def send(self, session: Session, tokens: list[int]) -> int:
        """Queue a packet of ``tokens`` as the API layer does; returns its seq."""
        n = len(tokens)
        region = self.staging.reserve(n) if n else None
        if region is not None:
            self.staging.tokens[region.start:region.start + n] = tokens
            self.staging.gaps[region.start:region.start + n] = 0
        session.events += n
        self.seq += 1
        self.sched.submit(session, Packet(seq=self.seq, region=region, start=region.start if region else 0,
                                          size=n, events_after=session.events, last_t=None,
                                          received=time.perf_counter(), reply=object()))
        return self.seq

    async def settle(self) -> None:
        """Wait until nothing is queued or running."""
        for _ in range(1000):
            if not self.sched.pending:
                return
            await asyncio.sleep(0.002)
        raise AssertionError("the scheduler never settled")


def run(body) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        h = Harness()
        h.sched.start()
        try:
            await asyncio.wait_for(body(h), 20)
        finally:
            h.runner.gate.set()
            await h.sched.stop()

    asyncio.run(main())


def test_sessions_waiting_together_share_one_step() -> None:
    """Work gathered while a step runs goes as one plan: one row per session."""
    async def body(h: Harness) -> None:
        a, b, c = h.open(), h.open(), h.open()
        h.runner.gate.clear()
        h.send(a, [1])  # the first plan: held at the gate
        await asyncio.sleep(0.05)
        h.send(b, [2, 2])
        h.send(c, [3, 3, 3])
        h.runner.gate.set()
        await h.settle()
        stepped = [sorted(p.slots.tolist()) for p in h.runner.plans if len(p.slots)]
        assert stepped == [[a.slot], sorted([b.slot, c.slot])]
        got = {s.id: row for s, _, row in h.sink.results()}
        assert got == {a.id: [1, 1, 1], b.id: [2, 4, 1], c.id: [3, 9, 1]}

    run(body)


def test_sessions_waiting_for_the_next_plan_keep_their_place_in_line() -> None:
    """A session with a chunk in the plan being gathered waits for the next plan, set aside; when
    that plan starts it goes first, ahead of a session whose packet came later."""
    async def body(h: Harness) -> None:
        a, b, c, e = h.open(), h.open(), h.open(), h.open()
        permits = threading.Semaphore(0)
        real = h.runner.run

        def one_at_a_time(plan: StepPlan) -> StepResult:
            assert permits.acquire(timeout=10), "the test never let this plan run"
            return real(plan)

        h.runner.run = one_at_a_time  # type: ignore[method-assign]
        h.send(a, [1])  # plan 1, taken and held
        await asyncio.sleep(0.05)
        for s in (b, b, c, c):  # plan 2: b and c; their second packets wait for plan 3
            h.send(s, [2])
        permits.release()  # plan 1 runs; the step thread takes plan 2 and is held again
        time.sleep(0.1)  # (the event loop does not run meanwhile: nothing is planned yet)
        h.send(e, [3])  # came after b's and c's second packets
        permits.release(3)
        await h.settle()
        stepped = [p.slots.tolist() for p in h.runner.plans if len(p.slots)]
        assert stepped == [[a.slot], [b.slot, c.slot], [b.slot, c.slot, e.slot]]
        got = {s.id: row for s, _, row in h.sink.results()}
        assert got[b.id] == got[c.id] == [2, 4, 1] and got[e.id] == [1, 3, 1]

    run(body)


def test_a_coalescing_runner_steps_a_sessions_queued_packets_in_one_plan() -> None:
    """With a runner that coalesces, the packets a session queued while a step ran join one
    plan, each chunk an entry of its own, and each packet is answered from its own entry (the
    row's readout after that packet, not after the plan); a reset waits for the next plan, and
    another session still gets its turn."""
    async def body(h: Harness) -> None:
        h.runner.coalesces = True
        a, b = h.open(), h.open()
        h.runner.gate.clear()
        h.send(a, [1])  # the first plan: held at the gate
        await asyncio.sleep(0.05)
        h.send(a, [2, 2])
        h.send(b, [3])
        h.send(a, list(range(10, 20)))  # 10 events: 3 chunks of at most 4, all in plan 2
        h.sched.submit(a, Reset(reply=object()))
        h.send(a, [7])
        h.runner.gate.set()
        await h.settle()
        stepped = [p.slots.tolist() for p in h.runner.plans if len(p.slots)]
        assert stepped == [[a.slot], [a.slot, b.slot, a.slot, a.slot, a.slot], [a.slot]]
        assert h.runner.plans[2].zero.tolist() == [a.slot]
        got = [(s.id, row) for s, _, row in h.sink.results()]
        assert got == [(a.id, [1, 1, 1]), (a.id, [3, 5, 1]), (b.id, [1, 3, 1]),
                       (a.id, [13, 5 + sum(range(10, 20)), 1]), (a.id, [1, 7, 1])]
        assert h.sched.metrics.coalesced._value.get() == 3
        # A session with more queued packets than a plan has rows fills it, then the next.
        h.runner.gate.clear()
        h.send(b, [1])
        await asyncio.sleep(0.05)
        for i in range(12):
            h.send(b, [i])
        h.runner.gate.set()
        await h.settle()
        sizes = [len(p.slots) for p in h.runner.plans[3:]]
        assert sizes == [1, h.runner.max_batch, 12 - h.runner.max_batch]
        rows = [row for s, _, row in h.sink.results() if s is b][2:]
        assert rows == [[3 + i, 4 + sum(range(i + 1)), 1] for i in range(12)]

    run(body)


def test_the_runner_is_parked_only_when_no_plan_waits() -> None:
    """After a step whose successor was gathered meanwhile, the helpers keep spinning for it;
    after the last one (nothing waiting) the runner is told to park them."""
    async def body(h: Harness) -> None:
        a, b = h.open(), h.open()
        h.runner.gate.clear()
        h.send(a, [1])  # the first plan: held at the gate
        await asyncio.sleep(0.05)
        h.send(b, [2])  # gathered while the first runs: published, waiting
        h.runner.gate.set()
        await h.settle()
        assert len(h.runner.plans) == 2
        assert h.runner.parked == [2]  # not after the first step: the second was waiting

    run(body)


def test_each_session_is_answered_in_order_with_its_own_state() -> None:
    """Packets of several sessions, long ones in chunks over several plans: every answer comes
    in its session's order and holds exactly its session's events so far."""
    async def body(h: Harness) -> None:
        rng = np.random.default_rng(23)
        sessions = [h.open() for _ in range(4)]
        sent: dict[str, list[tuple[int, list[int]]]] = {s.id: [] for s in sessions}
        for _ in range(30):
            s = sessions[int(rng.integers(len(sessions)))]
            tokens = rng.integers(1, 50, int(rng.integers(0, 11))).tolist()
            sent[s.id].append((h.send(s, tokens), tokens))
            if rng.random() < 0.3:
                await asyncio.sleep(0)
        await h.settle()
        answers: dict[str, list[tuple[int, list[float]]]] = {s.id: [] for s in sessions}
        for s, seq, row in h.sink.results():
            assert np.isfinite(row).all()
            answers[s.id].append((seq, row))
        for s in sessions:
            assert [seq for seq, _ in answers[s.id]] == [seq for seq, _ in sent[s.id]]
            seen: list[int] = []
            for (_, row), (_, tokens) in zip(answers[s.id], sent[s.id], strict=True):
                seen += tokens
                if seen:  # an empty first packet is answered from the zeroed row
                    assert row[:2] == [len(seen), sum(seen)]
        assert max(len(p.slots) for p in h.runner.plans) <= h.runner.max_batch
        assert all(int(p.lengths.max(initial=0)) <= h.runner.max_length for p in h.runner.plans)

    run(body)


def test_a_reset_zeroes_between_packets_and_a_close_releases_the_slot() -> None:
    async def body(h: Harness) -> None:
        s = h.open()
        h.send(s, [5, 5])
        h.sched.submit(s, Reset(reply=object()))
        h.send(s, [7])
        assert SessionTable.end(s)
        h.sched.submit(s, Close(reply=object(), events=1))
        await h.settle()
        assert [row for _, _, row in h.sink.results()] == [[2, 10, 1], [1, 7, 1]]
        assert [x for out in h.sink.outputs for x, _ in out.reset] == [s]
        assert [x for out in h.sink.outputs for x, _ in out.closed] == [s]
        assert h.released == [s] and s.status is SessionStatus.RELEASED
        assert not h.sched.lanes and h.table.pools[MODEL].is_dirty(s.slot)
        again = h.open()  # the freed, dirty row is zeroed before its new session steps
        h.send(again, [1])
        await h.settle()
        assert h.sink.results()[-1][2] == [1, 1, 1]

    run(body)


def test_a_failed_step_ends_its_sessions_with_every_item_unanswered() -> None:
    """A runner error ends the sessions of the failed plan (their later items too) and frees
    their rows; a session in no failed plan goes on."""
    async def body(h: Harness) -> None:
        bad, good = h.open(), h.open()
        h.send(good, [1])
        await h.settle()
        h.runner.fail_slot = bad.slot
        h.runner.gate.clear()
        first = h.send(bad, [1, 2])
        await asyncio.sleep(0.05)
        second = h.send(bad, [3])  # queued behind the failing plan
        h.runner.gate.set()
        await h.settle()
        ended = [e for out in h.sink.outputs for e in out.ended]
        assert len(ended) == 1 and ended[0].session is bad and ended[0].reason is EndReason.FAILED
        assert "RuntimeError" in ended[0].detail
        assert [p.seq for p in ended[0].unanswered if isinstance(p, Packet)] == [first, second]
        assert bad.status is SessionStatus.RELEASED and h.released == [bad]
        assert h.sched.queued_packets == 0
        h.runner.fail_slot = None
        h.send(good, [4])
        await h.settle()
        assert h.sink.results()[-1][0] is good and h.sink.results()[-1][2] == [2, 5, 1]

    run(body)


@pytest.mark.parametrize("when", ["queued", "idle"])
def test_work_for_a_released_session_is_refused(when: str) -> None:
    from evssm.server.core.sessions import SlotError

    async def body(h: Harness) -> None:
        s = h.open()
        if when == "queued":
            h.send(s, [1])
        SessionTable.end(s)
        h.sched.submit(s, Close(reply=object(), events=s.events))
        await h.settle()
        assert s.status is SessionStatus.RELEASED
        with pytest.raises(SlotError):
            h.send(s, [2])

    run(body)
