"""The native CPU streaming step equals the XLA step, and its build fails soft.

The invariant tests (test_streaming_invariant.py) stream through the default backend, which on
a CPU with a compiler is the native one, against the XLA offline form; these compare the two
streaming backends directly: logits, readiness and the packed carried state, session by session,
including sessions with empty packets, long gaps (decays outside the table), padding slots, and
a stream that changes backend half way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from numeric import assert_close, seeded_rng
from test_streaming_invariant import SMALL, VARIANTS, perturbed_model

from evssm.models import native
from evssm.models.config import ModelConfig, load_model_config
from evssm.models.streaming import StreamingModel, init_variables

try:
    native.load_library()
except native.NativeUnavailable as exc:  # pragma: no cover - machines without g++
    pytest.skip(f"native step unavailable: {exc}", allow_module_level=True)


def both_backends(config, seed: int = 3) -> tuple[StreamingModel, StreamingModel]:
    model = perturbed_model(config, seed)
    xla = StreamingModel(config, model.variables, backend="xla")
    assert model.backend == "native" and xla.backend == "xla"
    return model, xla


def random_packets(rng: np.random.Generator, config, batch: int, length: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tokens = rng.integers(0, config.num_embeddings, (batch, length)).astype(np.int32)
    gaps = np.where(rng.random((batch, length)) < 0.9, rng.integers(0, 80, (batch, length)),
                    rng.integers(0, 300_000, (batch, length))).astype(np.int32)
    lengths = rng.integers(0, length + 1, batch).astype(np.int32)
    lengths[0] = length
    if batch > 1:
        lengths[1] = 0
    for b in range(batch):
        tokens[b, lengths[b]:] = -1
        gaps[b, lengths[b]:] = 0
    return tokens, gaps, lengths


def assert_states_close(model: StreamingModel, a, b) -> None:
    """Float words within float32 rounding of the values' scale; int words (counts) equal."""
    words = model.layout.float_words
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_array_equal(a[:, words:], b[:, words:])
    fa, fb = a[:, :words].view(np.float32), b[:, :words].view(np.float32)
    scale = max(1.0, float(np.abs(fb).max()))
    assert_close(fa, fb, rtol=1e-4, atol=1e-4 * scale)


def assert_logits_close(a, b, ready) -> None:
    a, b = np.asarray(a)[ready], np.asarray(b)[ready]
    scale = max(1.0, float(np.abs(b).max())) if b.size else 1.0
    assert_close(a, b, rtol=1e-4, atol=1e-4 * scale)


CASES = {**VARIANTS, "stride1-first-layer": dict(SMALL, pooling_stride=1, num_stages=1),
         # No strided layer: the total time is the head's own; look-ahead without pooling.
         "stride1-reference": dict(SMALL, pooling_stride=1, num_stages=1, time_lookahead=True,
                                   gelu="tanh", layer_norm_eps=1e-6, head="timepool",
                                   head_divisor="total_time")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_native_step_equals_xla_step(name: str) -> None:
    config = load_model_config("tiny", CASES[name])
    fast, ref = both_backends(config)
    rng = seeded_rng(name)
    batch = 4
    s_fast, s_ref = fast.init_state(batch), ref.init_state(batch)
    for _ in range(6):
        tokens, gaps, lengths = random_packets(rng, config, batch, int(rng.integers(1, 48)))
        s_fast, l_fast, r_fast = fast.step(s_fast, tokens, gaps, lengths)
        s_ref, l_ref, r_ref = ref.step(s_ref, tokens, gaps, lengths)
        np.testing.assert_array_equal(np.asarray(r_fast), np.asarray(r_ref))
        assert_logits_close(l_fast, l_ref, np.asarray(r_ref))
        assert_states_close(fast, s_fast, s_ref)
    assert np.asarray(r_ref).any()


@pytest.mark.parametrize("name", ["dvs", "ssc"])
def test_reference_configs_native_equals_xla(name: str) -> None:
    """Full-size models: 64 sessions (the threads split the sessions) and one session with
    long packets (the threads split the states)."""
    config = load_model_config(name)
    fast, ref = both_backends(config, seed=4)
    rng = np.random.default_rng(5)
    for batch, length in ((64, 256), (1, 1024)):
        s_fast, s_ref = fast.init_state(batch), ref.init_state(batch)
        for _ in range(2):
            tokens, gaps, lengths = random_packets(rng, config, batch, length)
            s_fast, l_fast, r_fast = fast.step(s_fast, tokens, gaps, lengths)
            s_ref, l_ref, r_ref = ref.step(s_ref, tokens, gaps, lengths)
            np.testing.assert_array_equal(np.asarray(r_fast), np.asarray(r_ref))
            assert_logits_close(l_fast, l_ref, np.asarray(r_ref))
        assert_states_close(fast, s_fast, s_ref)


def test_slots_and_backend_switch_mid_stream() -> None:
    """step_slots on a pool (with padding rows) matches XLA's, untouched rows stay bit for bit,
    and a stream continued on the other backend gives the same logits."""
    config = load_model_config("tiny", VARIANTS["async-timepool-timepool-conj"])
    fast, ref = both_backends(config)
    rng = np.random.default_rng(11)
    pool_fast, pool_ref = fast.init_state(6), ref.init_state(6)
    slots = np.array([4, 1, 6, 2], np.int32)  # 6 == pool size: a padding row
    for _ in range(3):
        tokens, gaps, lengths = random_packets(rng, config, 4, 40)
        pool_fast, l_fast, _ = fast.step_slots(pool_fast, slots, tokens, gaps, lengths)
        pool_ref, l_ref, r_ref = ref.step_slots(pool_ref, slots, tokens, gaps, lengths)
        live = np.asarray(r_ref) & (slots < 6)
        assert_logits_close(l_fast, l_ref, live)
    assert_states_close(fast, pool_fast, pool_ref)
    untouched = [0, 3, 5]
    np.testing.assert_array_equal(np.asarray(pool_fast)[untouched], 0)
    # Switch: continue the native pool's streams on XLA, and the XLA pool's on native.
    tokens = rng.integers(0, config.num_embeddings, (4, 40)).astype(np.int32)
    gaps = rng.integers(0, 80, (4, 40)).astype(np.int32)
    lengths = np.full(4, 40, np.int32)
    _, l_a, r_a = ref.step_slots(pool_fast, slots, tokens, gaps, lengths)
    _, l_b, _ = fast.step_slots(pool_ref, slots, tokens, gaps, lengths)
    assert_logits_close(l_a, l_b, np.asarray(r_a) & (slots < 6))


def test_ragged_rows_equal_padded_rows() -> None:
    """Packets as ragged rows of one flat buffer (in any order, with unused events between
    them, as the server's staging buffer holds them) step exactly as the same packets padded,
    on both backends."""
    config = load_model_config("tiny", VARIANTS["async-timepool-timepool-conj"])
    fast, ref = both_backends(config)
    rng = np.random.default_rng(12)
    slots = np.array([3, 0, 5], np.int32)
    for model in (fast, ref):
        padded, ragged = model.init_state(6), model.init_state(6)
        for _ in range(3):
            tokens, gaps, lengths = random_packets(rng, config, 3, 40)
            flat_t = rng.integers(0, config.num_embeddings, 500).astype(np.int32)
            flat_g = rng.integers(0, 80, 500).astype(np.int32)
            starts = np.array([300, 7, 120], np.int64)
            for b in range(3):
                flat_t[starts[b]:starts[b] + lengths[b]] = tokens[b, :lengths[b]]
                flat_g[starts[b]:starts[b] + lengths[b]] = gaps[b, :lengths[b]]
            padded, l_pad, r_pad = model.step_slots(padded, slots, tokens, gaps, lengths)
            ragged, l_rag, r_rag = model.step_slots_ragged(ragged, slots, flat_t, flat_g, starts,
                                                           lengths, shape=(4, 40))
            np.testing.assert_array_equal(np.asarray(r_rag)[:3], np.asarray(r_pad))
            np.testing.assert_array_equal(np.asarray(l_rag)[:3], np.asarray(l_pad))
        np.testing.assert_array_equal(np.asarray(ragged), np.asarray(padded))
    with pytest.raises(ValueError, match="outside the 500 events"):
        fast.step_slots_ragged(fast.init_state(6), slots, flat_t, flat_g,
                               np.array([0, 0, 490], np.int64), np.full(3, 20, np.int32))


def test_thread_count_does_not_change_results(tmp_path) -> None:
    """One thread and two give the same logits bit for bit (threads split whole sessions or
    whole columns, never a sum)."""
    script = (
        "import numpy as np, sys\n"
        "from evssm.models.config import load_model_config\n"
        "from evssm.models.streaming import StreamingModel, init_variables\n"
        "c = load_model_config('shd')\n"
        "m = StreamingModel(c, init_variables(c, 0), backend='native')\n"
        "r = np.random.default_rng(0)\n"
        "out = []\n"
        "for b, n in ((1, 512), (8, 256)):\n"
        "    t = r.integers(0, c.num_embeddings, (b, n)).astype(np.int32)\n"
        "    g = r.integers(0, 50, (b, n)).astype(np.int32)\n"
        "    s, l, _ = m.step(m.init_state(b), t, g, np.full(b, n, np.int32))\n"
        "    out.append(np.asarray(l))\n"
        "np.save(sys.argv[1], np.concatenate(out))\n")
    results = []
    for threads in ("1", "2"):
        path = tmp_path / f"logits-{threads}.npy"
        env = dict(os.environ, EVSSM_NATIVE_THREADS=threads, JAX_PLATFORMS="cpu")
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env,
                       timeout=300)
        results.append(np.load(path))
    assert np.isfinite(results[0]).all()
    np.testing.assert_array_equal(results[0], results[1])


def test_build_without_compiler_fails_soft(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EVSSM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(native.NativeUnavailable, match="no C\\+\\+ compiler"):
        native.build_library()
    assert list(tmp_path.iterdir()) == []


def test_unknown_backend_is_rejected() -> None:
    config = load_model_config("tiny", SMALL)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        StreamingModel(config, init_variables(config, 0), backend="gpu")


def test_cached_library_is_reused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EVSSM_CACHE_DIR", str(tmp_path))
    first = native.build_library()
    stamp = first.stat().st_mtime_ns
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))  # not needed any more
    assert native.build_library() == first
    assert first.stat().st_mtime_ns == stamp
    assert jax.default_backend() == "cpu"


def test_bad_shapes_are_rejected_and_leave_the_pool_alone() -> None:
    config = load_model_config("tiny", SMALL)
    model = StreamingModel(config, init_variables(config, 0), backend="native")
    rng = np.random.default_rng(2)
    pool = model.init_state(3)
    tokens = rng.integers(0, config.num_embeddings, (2, 16)).astype(np.int32)
    gaps = np.zeros((2, 16), np.int32)
    pool, _, _ = model.step_slots(pool, np.array([0, 2], np.int32), tokens, gaps,
                                  np.array([16, 9], np.int32))
    before = pool.copy()
    with pytest.raises(ValueError, match="inconsistent shapes"):
        model.step_slots(pool, np.array([0, 2], np.int32), tokens, gaps[:, :8],
                         np.array([16, 9], np.int32))
    with pytest.raises(ValueError, match="inconsistent shapes"):
        model.step_slots(pool, np.array([0, 1, 2], np.int32), tokens, gaps,
                         np.array([16, 9], np.int32))
    np.testing.assert_array_equal(pool, before)
    assert before[[0, 2]].any() and not before[1].any()


def test_unimplemented_model_option_falls_back_to_xla(caplog) -> None:
    """A config option the kernel does not implement: ``auto`` serves the model through XLA
    with a log line naming the option; ``native`` refuses it. Never another network."""

    @dataclasses.dataclass(frozen=True)
    class WithOption(ModelConfig):
        future_option: bool = False

    base = load_model_config("tiny", SMALL)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    variables = init_variables(base, 0)
    assert native.unsupported(WithOption(**fields)) is None  # at its default: implemented
    config = WithOption(**fields, future_option=True)
    with caplog.at_level(logging.WARNING, logger="evssm.models.streaming"):
        model = StreamingModel(config, variables, backend="auto")
    assert model.backend == "xla" and model.info["backend"] == "xla"
    assert "future_option=True" in caplog.text
    with pytest.raises(native.NativeUnavailable, match="future_option=True"):
        StreamingModel(config, variables, backend="native")
    # A value of a listed field that the kernel does not know (past ModelConfig's own checks).
    unknown = object.__new__(ModelConfig)
    for name, value in {**fields, "pooling_mode": "max"}.items():
        object.__setattr__(unknown, name, value)
    assert native.unsupported(unknown) == "the native step does not implement pooling_mode='max'"


CONCURRENT_SCRIPT = """
import sys, threading
import numpy as np
from evssm.models.config import ModelConfig, load_model_config
from evssm.models.streaming import StreamingModel, init_variables

config = load_model_config("shd")
models = [StreamingModel(config, init_variables(config, seed), backend="native") for seed in (0, 1)]
rng = np.random.default_rng(0)
# (model, batch, length, slots): two models' step threads, a classify-like scratch stream, and
# a step whose call holds one session's queued packets (a repeated slot: one row, a readout each)
jobs = []
for model, batch, length, slots in ((models[0], 8, 256, None), (models[1], 1, 1024, None),
                                    (models[0], 1, 512, None), (models[1], 4, 128, [0, 0, 1, 0])):
    tokens = rng.integers(0, config.num_embeddings, (batch, length)).astype(np.int32)
    gaps = rng.integers(0, 60, (batch, length)).astype(np.int32)
    jobs.append((model, tokens, gaps, np.full(batch, length, np.int32),
                 None if slots is None else np.array(slots, np.int32)))

def run(job, steps):
    model, tokens, gaps, lengths, slots = job
    state, out = model.init_state(tokens.shape[0]), []
    starts = np.arange(len(lengths), dtype=np.int64) * tokens.shape[1]
    for _ in range(steps):
        if slots is None:
            state, logits, _ = model.step(state, tokens, gaps, lengths)
        else:
            state, logits, _ = model.step_slots_ragged(state, slots, tokens.reshape(-1),
                                                       gaps.reshape(-1), starts, lengths)
        out.append(np.asarray(logits).copy())
    return out

steps = int(sys.argv[1])
expected = [run(job, steps) for job in jobs]  # one at a time
got = [None] * len(jobs)
def worker(i):
    got[i] = run(jobs[i], steps)
for _ in range(int(sys.argv[2])):
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads: t.start()
    for t in threads: t.join()
    for i in range(len(jobs)):
        for a, b in zip(got[i], expected[i]):
            assert np.isfinite(a).all()
            np.testing.assert_array_equal(a, b)
print("concurrent results equal")
"""


def test_calls_from_several_threads_are_exact() -> None:
    """Two models' step threads, a third stream (as a long classify runs one) and a call holding
    one session's several packets call the kernel at once: every result equals the one computed
    alone, bit for bit, and nothing crashes. Run in a subprocess so a crash is a failure, not the
    end of the test session."""
    env = dict(os.environ, EVSSM_NATIVE_THREADS="2", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", CONCURRENT_SCRIPT, "12", "4"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stderr[-3000:]}"
    assert "concurrent results equal" in done.stdout


def assert_one_call_per_packet(model: StreamingModel, pool: np.ndarray, slots: np.ndarray,
                               tokens: np.ndarray, gaps: np.ndarray, starts: np.ndarray,
                               lengths: np.ndarray, logits: np.ndarray, ready: np.ndarray,
                               after: np.ndarray, label: str) -> np.ndarray:
    """Step ``pool`` (int32 [N, words], the rows before a grouped call) by each entry in a call
    of its own, in order: every entry's logits and readiness equal ``logits`` [B, C] and
    ``ready`` [B] of the grouped call, and the rows ``after`` it, exactly. Returns the rows."""
    for b in range(len(lengths)):
        pool, lb, rb = model.step_slots_ragged(pool, slots[b:b + 1], tokens, gaps, starts[b:b + 1],
                                               lengths[b:b + 1])
        assert bool(np.asarray(rb)[0]) == bool(ready[b]), f"{label}, entry {b}"
        np.testing.assert_array_equal(np.asarray(lb)[0], logits[b], err_msg=f"{label}, entry {b}")
    np.testing.assert_array_equal(np.asarray(after), np.asarray(pool), err_msg=label)
    return np.asarray(pool)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_sessions_packets_in_one_call_equal_one_call_per_packet(name: str) -> None:
    """Entries with the same slot are one session's consecutive packets: stepped in one call
    (interleaved with other sessions' entries, as the server's coalesced plans are), each entry's
    logits and readiness, and the rows after the call, equal one call per packet exactly; with
    the total-time divisor, which needs each packet's partial windows, the step refuses them and
    leaves the pool alone."""
    config = load_model_config("tiny", CASES[name])
    model, _ = both_backends(config)
    rng = np.random.default_rng(21)
    # (slot, events): session 4's first packet holds one event (the held token at a stream's
    # start), an empty packet sits between two of session 0's.
    entries = [(0, 30), (4, 1), (0, 0), (2, 17), (0, 45), (4, 60), (0, 3), (2, 1), (4, 9)]
    sizes = [n for _, n in entries]
    flat_t = rng.integers(0, config.num_embeddings, sum(sizes) + 50).astype(np.int32)
    flat_g = np.where(rng.random(flat_t.size) < 0.9, rng.integers(0, 80, flat_t.size),
                      rng.integers(0, 300_000, flat_t.size)).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) + 50
    slots = np.array([s for s, _ in entries], np.int32)
    lengths = np.array(sizes, np.int32)
    coalesced = model.init_state(6)
    assert model.native is not None and model.native.coalesces == (config.head_divisor != "total_time")
    if not model.native.coalesces:
        before = np.asarray(coalesced).copy()
        with pytest.raises(RuntimeError, match="total-time divisor"):
            model.step_slots_ragged(coalesced, slots, flat_t, flat_g, starts, lengths)
        np.testing.assert_array_equal(np.asarray(coalesced), before)
        return
    for call in range(2):  # the second call continues every session's stream
        before = np.asarray(coalesced).copy()
        coalesced, logits, ready = model.step_slots_ragged(coalesced, slots, flat_t, flat_g,
                                                           starts, lengths)
        logits, ready = np.asarray(logits), np.asarray(ready)
        assert np.isfinite(logits).all() and ready.any()
        assert_one_call_per_packet(model, before, slots, flat_t, flat_g, starts, lengths, logits,
                                   ready, coalesced, f"call {call}")


def test_random_groupings_of_packets_equal_one_call_per_packet() -> None:
    """Random calls (a slot repeated any number of times, in any order among the others, empty
    packets, padding entries, bursts of equal timestamps) on streams that go on between calls:
    every entry's logits and readiness, and the pool, equal one call per packet exactly."""
    config = load_model_config("tiny", VARIANTS["async-timepool-timepool-conj"])
    model, _ = both_backends(config)
    rng = np.random.default_rng(5)
    grouped, single = model.init_state(5), model.init_state(5)
    for call in range(6):
        batch = int(rng.integers(1, 12))
        slots = rng.integers(0, 6, batch).astype(np.int32)  # slot 5 is outside the pool: padding
        lengths = rng.integers(0, 70, batch).astype(np.int32)
        flat_t = rng.integers(0, config.num_embeddings, int(lengths.sum()) + 1).astype(np.int32)
        flat_g = np.where(rng.random(flat_t.size) < 0.5, 0, rng.integers(0, 5000, flat_t.size)).astype(np.int32)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        grouped, logits, ready = model.step_slots_ragged(grouped, slots, flat_t, flat_g, starts, lengths)
        logits, ready = np.asarray(logits), np.asarray(ready)
        assert np.isfinite(logits).all()
        single = assert_one_call_per_packet(model, single, slots, flat_t, flat_g, starts, lengths,
                                            logits, ready, grouped, f"call {call}")
