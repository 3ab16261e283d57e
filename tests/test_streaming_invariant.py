"""The invariant: streaming, packet by packet, equals the offline form on every prefix.

Covers the reference configurations and variants for every discretisation, pooling mode, head,
norm, conj_sym, one to three stages, and the options that reproduce the paper's reference code
(time look-ahead, LayerNorm epsilon, tanh GELU, total-time head divisor); random packetisations
include empty and 1-event packets and packets that end mid-window; gaps mix tabulated (short) and
exponentiated (long) decays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numeric import assert_close, seeded_rng

from evssm.models.config import load_model_config
from evssm.models.model import state_spec
from evssm.models.streaming import StreamingModel, init_variables

PACKET_BUCKET = 64


def random_stream(rng: np.random.Generator, num_tokens: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = rng.integers(0, num_tokens, n).astype(np.int32)
    gaps = np.where(rng.random(n) < 0.9, rng.integers(0, 60, n), rng.integers(0, 200_000, n))
    gaps = gaps.astype(np.int32)
    gaps[0] = 0
    return tokens, gaps


def random_cuts(rng: np.random.Generator, n: int) -> list[int]:
    """Packet sizes summing to n, each <= PACKET_BUCKET, with empty and 1-event packets."""
    sizes = []
    while sum(sizes) < n:
        kind = rng.random()
        size = 0 if kind < 0.1 else 1 if kind < 0.25 else int(rng.integers(2, PACKET_BUCKET + 1))
        sizes.append(min(size, n - sum(sizes)))
    return sizes


def perturbed_model(config, seed: int = 0) -> StreamingModel:
    """A model whose BatchNorm statistics are non-trivial (random init leaves them 0 and 1)."""
    variables = init_variables(config, seed)
    rng = np.random.default_rng(seed)
    stats = jax.tree.map(lambda a: np.asarray(a) + rng.uniform(0.1, 0.5, a.shape).astype(a.dtype),
                         variables["batch_stats"])
    return StreamingModel(config, {"params": variables["params"], "batch_stats": stats})


def stream_and_compare(model: StreamingModel, tokens: np.ndarray, gaps: np.ndarray,
                       sizes: list[int], max_len: int) -> int:
    """Stream in packets of ``sizes``; compare logits after each packet with the offline form of
    the prefix. Returns how many packets had a prediction."""
    state = model.init_state(1)
    stream_logits, stream_ready, prefixes = [], [], []
    pos = 0
    for size in sizes:
        tok = np.full((1, PACKET_BUCKET), -1, np.int32)
        gap = np.zeros((1, PACKET_BUCKET), np.int32)
        tok[0, :size] = tokens[pos:pos + size]
        gap[0, :size] = gaps[pos:pos + size]
        state, logits, ready = model.step(state, tok, gap, np.array([size], np.int32))
        pos += size
        stream_logits.append(np.asarray(logits[0]))
        stream_ready.append(bool(ready[0]))
        prefixes.append(pos)
    # All prefixes in one offline batch.
    batch_tok = np.full((len(prefixes), max_len), -1, np.int32)
    batch_gap = np.zeros((len(prefixes), max_len), np.int32)
    for i, p in enumerate(prefixes):
        batch_tok[i, :p] = tokens[:p]
        batch_gap[i, :p] = gaps[:p]
    off_logits, off_ready = model.classify(batch_tok, batch_gap, np.array(prefixes, np.int32))
    off_logits, off_ready = np.asarray(off_logits), np.asarray(off_ready)
    np.testing.assert_array_equal(np.array(stream_ready), off_ready)
    # With the time look-ahead the last event waits for the next one: one event later.
    first_ready = model.config.downsampling + int(model.config.time_lookahead)
    expected_ready = np.array(prefixes) >= first_ready
    np.testing.assert_array_equal(off_ready, expected_ready)
    for i in np.flatnonzero(off_ready):
        scale = max(1.0, float(np.abs(off_logits[i]).max()))
        assert_close(stream_logits[i], off_logits[i], rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=f"prefix {prefixes[i]} of packet sizes {sizes}")
    return int(off_ready.sum())


SMALL = dict(d_model=16, d_state=16, block_size=8, layers_per_stage=2, pooling_stride=4,
             num_stages=2, dropout=0.0)

VARIANTS = {
    "zoh-avgpool-pool-layer": dict(SMALL, discretization="zoh", pooling_mode="avgpool", head="pool"),
    "dirac-first-last-batch": dict(SMALL, discretization="dirac", pooling_mode="first", head="last",
                                   norm="batch"),
    "async-timepool-timepool-conj": dict(SMALL, discretization="async", pooling_mode="timepool",
                                         head="timepool", conj_sym=True, clip_eigs=True),
    "postnorm-batch-conj-zoh": dict(SMALL, prenorm=False, norm="batch", conj_sym=True,
                                    discretization="zoh", pooling_mode="timepool"),
    "postnorm-layer-first": dict(SMALL, prenorm=False, norm="layer", pooling_mode="first",
                                 head="last", discretization="async"),
    "one-stage-stride3": dict(SMALL, num_stages=1, pooling_stride=3, layers_per_stage=3,
                              pooling_mode="avgpool"),
    "three-stages-expansion": dict(SMALL, num_stages=3, pooling_stride=2, layers_per_stage=1,
                                   state_expansion_factor=2, discretization="dirac"),
    # The reference code's behaviours (models imported from it), alone and together.
    "reference-timepool-total": dict(SMALL, time_lookahead=True, layer_norm_eps=1e-6, gelu="tanh",
                                     pooling_mode="timepool", head="timepool",
                                     head_divisor="total_time", clip_eigs=True,
                                     state_expansion_factor=2),
    "reference-batch-conj": dict(SMALL, time_lookahead=True, gelu="tanh", norm="batch",
                                 conj_sym=True, pooling_mode="avgpool", head="pool"),
    "reference-postnorm-zoh-three-stages": dict(SMALL, time_lookahead=True, prenorm=False,
                                                layer_norm_eps=1e-6, discretization="zoh",
                                                num_stages=3, pooling_stride=2,
                                                layers_per_stage=1, pooling_mode="first",
                                                head="timepool", head_divisor="total_time"),
    "lookahead-only-last": dict(SMALL, time_lookahead=True, head="last", pooling_mode="first",
                                discretization="dirac"),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_stream_equals_offline(name: str) -> None:
    config = load_model_config("tiny", VARIANTS[name])
    model = perturbed_model(config, seed=1)
    rng = seeded_rng(name)
    for _ in range(3):
        n = int(rng.integers(20, 300))
        tokens, gaps = random_stream(rng, config.num_embeddings, n)
        assert stream_and_compare(model, tokens, gaps, random_cuts(rng, n), 320) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shd", "ssc", "dvs", "tiny", "event-mnist"])
def test_reference_configs_stream_equals_offline(name: str) -> None:
    config = load_model_config(name)
    model = perturbed_model(config, seed=2)
    rng = np.random.default_rng(7)
    n = 3 * config.downsampling + 37  # several final-rate windows, ending mid-window
    tokens, gaps = random_stream(rng, config.num_embeddings, n)
    assert stream_and_compare(model, tokens, gaps, random_cuts(rng, n), n) > 0


@pytest.mark.slow
def test_long_stream_stays_equal() -> None:
    """Thousands of events in many packets: no drift between the forms."""
    config = load_model_config("tiny", dict(SMALL, pooling_stride=8))
    model = perturbed_model(config)
    rng = np.random.default_rng(3)
    n = 6000
    tokens, gaps = random_stream(rng, config.num_embeddings, n)
    state = model.init_state(1)
    for start in range(0, n, PACKET_BUCKET):
        size = min(PACKET_BUCKET, n - start)
        tok = np.full((1, PACKET_BUCKET), -1, np.int32)
        gap = np.zeros((1, PACKET_BUCKET), np.int32)
        tok[0, :size], gap[0, :size] = tokens[start:start + size], gaps[start:start + size]
        state, logits, _ = model.step(state, tok, gap, np.array([size], np.int32))
    offline, ready = model.classify(tokens[None], gaps[None], np.array([n], np.int32))
    assert bool(ready[0])
    assert_close(np.asarray(logits), np.asarray(offline), rtol=1e-4, atol=1e-4)


def test_batched_sessions_equal_each_alone() -> None:
    """Sessions with different packet lengths and offsets stepped together equal each alone,
    through the slot pool the server uses (with padding rows and zeroed slots)."""
    config = load_model_config("tiny", dict(SMALL, pooling_mode="timepool"))
    model = perturbed_model(config)
    rng = np.random.default_rng(4)
    num, L = 5, 32
    streams = [random_stream(rng, config.num_embeddings, 200) for _ in range(num)]
    pool = model.init_state(num + 2)
    slots = np.array([3, 0, 5, 1, 2], np.int32)  # arbitrary slot assignment
    alone = [model.init_state(1) for _ in range(num)]
    pos = [0] * num
    for _ in range(6):
        lengths = rng.integers(0, L + 1, num).astype(np.int32)
        tok = np.full((num + 1, L), -1, np.int32)
        gap = np.zeros((num + 1, L), np.int32)
        for i in range(num):
            tok[i, :lengths[i]] = streams[i][0][pos[i]:pos[i] + lengths[i]]
            gap[i, :lengths[i]] = streams[i][1][pos[i]:pos[i] + lengths[i]]
        batch_slots = np.append(slots, num + 2)  # a padding row
        pool, logits, ready = model.step_slots(pool, batch_slots, tok, gap,
                                               np.append(lengths, 0).astype(np.int32))
        for i in range(num):
            alone[i], one_logits, one_ready = model.step(alone[i], tok[i:i + 1], gap[i:i + 1],
                                                         lengths[i:i + 1])
            assert bool(one_ready[0]) == bool(ready[i])
            assert_close(np.asarray(logits[i]), np.asarray(one_logits[0]),
                                       rtol=1e-5, atol=1e-5)
            pos[i] += int(lengths[i])
    # Zeroing a slot gives a fresh session; the others are untouched.
    before = jax.tree.map(np.asarray, pool)
    pool = model.zero_slots(pool, np.array([slots[2], num + 2], np.int32))
    after = jax.tree.map(np.asarray, pool)
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert not np.any(a[slots[2]])
        keep = [s for s in range(num + 2) if s != slots[2]]
        np.testing.assert_array_equal(a[keep], b[keep])


def test_padding_never_changes_a_result() -> None:
    config = load_model_config("tiny", SMALL)
    model = perturbed_model(config)
    rng = np.random.default_rng(5)
    tokens, gaps = random_stream(rng, config.num_embeddings, 100)
    results = []
    for pad in (100, 128, 300):
        tok = np.full((1, pad), -1, np.int32)
        gap = np.zeros((1, pad), np.int32)
        tok[0, :100], gap[0, :100] = tokens, gaps
        # Garbage beyond the length must be ignored too.
        if pad > 100:
            tok[0, 100:] = rng.integers(0, config.num_embeddings, pad - 100)
            gap[0, 100:] = rng.integers(0, 10_000, pad - 100)
        logits, ready = model.classify(tok, gap, np.array([100], np.int32))
        results.append(np.asarray(logits))
    for r in results[1:]:
        assert_close(r, results[0], rtol=1e-6, atol=1e-6)


def test_tabulated_first_layer_equals_direct() -> None:
    """Inference tables (token features, decays) give the training path's values."""
    config = load_model_config("tiny", dict(SMALL, norm="batch"))
    model = perturbed_model(config)
    rng = np.random.default_rng(6)
    tokens, gaps = random_stream(rng, config.num_embeddings, 150)
    state = model.unpack_state(model.init_state(1))
    direct = model.module.apply(model.variables, tokens[None], gaps[None], np.array([150]), state)
    tabulated = model.module.apply(model.variables, tokens[None], gaps[None], np.array([150]),
                                   state, tables=model.tables)
    assert_close(np.asarray(direct[0]), np.asarray(tabulated[0]), rtol=1e-5,
                               atol=1e-5)


def test_initialisation_is_deterministic_per_seed() -> None:
    config = load_model_config("tiny", SMALL)
    a, b, c = (init_variables(config, s) for s in (0, 0, 1))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(not np.array_equal(np.asarray(x), np.asarray(z))
               for x, z in zip(jax.tree.leaves(a), jax.tree.leaves(c), strict=True))


def test_packed_state_round_trips_exactly() -> None:
    """One int32 row per session holds every leaf of the state pytree bit for bit."""
    config = load_model_config("tiny", VARIANTS["dirac-first-last-batch"])
    model = perturbed_model(config)
    rng = np.random.default_rng(8)
    tokens, gaps = random_stream(rng, config.num_embeddings, 2 * PACKET_BUCKET)
    packed = model.init_state(2)
    assert packed.dtype == np.int32 and packed.shape == (2, model.state_bytes // 4)
    zero = model.unpack_state(packed)
    assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(zero))
    for k in range(2):  # two packets: SSM states, partial windows and counts all non-zero
        sl = slice(k * PACKET_BUCKET, (k + 1) * PACKET_BUCKET - 5)
        tok = np.stack([tokens[sl], tokens[sl][::-1]])
        gap = np.stack([gaps[sl], gaps[sl][::-1]])
        packed, _, _ = model.step(packed, tok, gap, np.array([tok.shape[1], 7], np.int32))
    state = model.unpack_state(packed)
    spec_leaves = jax.tree.leaves(state)
    assert sum(np.asarray(leaf)[0].nbytes for leaf in spec_leaves) == model.state_bytes
    assert any(np.iscomplexobj(leaf) for leaf in spec_leaves)
    assert any(np.asarray(leaf).dtype == np.int32 and np.any(leaf) for leaf in spec_leaves)
    np.testing.assert_array_equal(np.asarray(model.pack_state(state)), np.asarray(packed))


# --- the reference code's behaviours -----------------------------------------------------------
REFERENCE = VARIANTS["reference-timepool-total"]


def test_lookahead_pairs_each_token_with_the_next_gap() -> None:
    """Offline, the look-ahead model on events ``(token_i, gap_i)`` is the plain model on
    ``(token_i, gap_{i+1})`` for ``i < N - 1``: the definition, checked on the whole network."""
    config = load_model_config("tiny", dict(SMALL, time_lookahead=True, pooling_mode="timepool"))
    ahead = perturbed_model(config)
    plain = StreamingModel(config.replace(time_lookahead=False), ahead.variables)
    rng = np.random.default_rng(9)
    tokens, gaps = random_stream(rng, config.num_embeddings, 150)
    got, ready = ahead.classify(tokens[None], gaps[None], np.array([150], np.int32))
    want, _ = plain.classify(tokens[None, :-1], gaps[None, 1:], np.array([149], np.int32))
    assert bool(ready[0])
    assert_close(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_lookahead_holds_the_last_token_in_the_state() -> None:
    """A session's state carries its last token (+1; 0 before the first event); an empty packet
    keeps it, and a fresh session's first event only becomes the held token."""
    config = load_model_config("tiny", dict(SMALL, time_lookahead=True))
    model = perturbed_model(config)
    state = model.init_state(2)
    tok = np.array([[5, 9, 13], [7, -1, -1]], np.int32)
    gap = np.array([[0, 40, 2], [0, 0, 0]], np.int32)
    state, _, _ = model.step(state, tok, gap, np.array([3, 1], np.int32))
    held = np.asarray(model.unpack_state(state)["held"])
    np.testing.assert_array_equal(held, [14, 8])
    events = np.asarray(model.unpack_state(state)["layers"][0]["count"])
    np.testing.assert_array_equal(events, [2, 0])  # 3 events -> 2 model events; 1 -> 0
    state, _, _ = model.step(state, tok[:, :0], gap[:, :0], np.array([0, 0], np.int32))
    np.testing.assert_array_equal(np.asarray(model.unpack_state(state)["held"]), [14, 8])


def test_total_time_divisor_is_the_streams_total_time() -> None:
    """The timepool head with ``head_divisor="total_time"`` is the default head's pooled value
    rescaled by ``sum_w / T``: ``T`` is the sum of every model event's dt (trailing events that
    complete no final-rate window included), ``sum_w`` the head's weights."""
    config = load_model_config("tiny", dict(SMALL, pooling_mode="timepool", head="timepool",
                                            head_divisor="total_time"))
    total = perturbed_model(config)
    weights = StreamingModel(config.replace(head_divisor="weights"), total.variables)
    rng = np.random.default_rng(10)
    n = 3 * config.downsampling + 11  # ends mid-window in both strided layers
    tokens, gaps = random_stream(rng, config.num_embeddings, n)
    args = (tokens[None], gaps[None], np.array([n], np.int32))
    state, got, _ = total.step(total.init_state(1), *args)
    _, base, _ = weights.step(weights.init_state(1), *args)
    sum_w = float(np.asarray(total.unpack_state(state)["head"]["sum_w"])[0])
    t_total = float(gaps.astype(np.float64).sum() * 1e-3)
    bias = np.asarray(total.variables["params"]["head"]["bias"])
    assert_close(np.asarray(got)[0] - bias,
                               (np.asarray(base)[0] - bias) * sum_w / t_total, rtol=1e-4,
                               atol=1e-5)
    assert abs(sum_w / t_total - 1) > 1e-3  # the trailing events make a difference here


@pytest.mark.parametrize("changes, message", [
    (dict(gelu="fast"), "gelu must be one of"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps must be > 0"),
    (dict(head_divisor="total_time", head="pool"), "applies to the timepool head only"),
    (dict(head_divisor="time"), "head_divisor must be one of"),
    (dict(time_lookahead="yes"), "time_lookahead must be true or false"),
])
def test_reference_options_are_validated(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_model_config("tiny", dict(SMALL, **changes))


def test_reference_options_default_off_and_round_trip() -> None:
    plain = load_model_config("tiny", SMALL)
    assert (plain.time_lookahead, plain.layer_norm_eps, plain.gelu, plain.head_divisor) == (
        False, 1e-5, "erf", "weights")
    config = load_model_config("tiny", REFERENCE)
    again = type(config).from_dict(config.to_dict())
    assert again == config and again.time_lookahead and again.gelu == "tanh"
    # The options' state (the held token, the head's pooled time) exists only where used.
    assert "held" not in state_spec(plain) and "sum_dt" not in state_spec(plain)["head"]
    assert state_spec(config)["held"] == ((), jnp.int32)
    assert state_spec(config)["head"]["sum_dt"] == ((), jnp.float32)
