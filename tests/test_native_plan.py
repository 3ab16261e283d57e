"""The native step's plan layout has one definition, the kernel's field lists
(models/kernels/streaming_step.cc), which models/native.py reads through ``plan_layout()``; a
layout or version the Python side does not write is refused on both sides."""

from __future__ import annotations

import logging
import re
import types
from typing import Any

import numpy as np
import pytest
from test_streaming_invariant import SMALL

from evssm.models import native
from evssm.models.config import load_model_config
from evssm.models.streaming import StreamingModel, init_variables

try:
    native.load_library()
except native.NativeUnavailable as exc:  # pragma: no cover - machines without g++
    pytest.skip(f"native step unavailable: {exc}", allow_module_level=True)

CONFIG = dict(SMALL, pooling_mode="avgpool", head="last", norm="batch", gelu="tanh")


def source_lists() -> dict[str, Any]:
    """The field lists and block sizes as written in the kernel's source."""
    text = native.KERNEL_SOURCE.read_text()

    def names(macro: str) -> tuple[str, ...]:
        body = re.search(rf"#define {macro}\(X\)(.*?)\n(?!\s)", text, re.S)
        assert body is not None, macro
        return tuple(re.findall(r"X\(\w+, (\w+)\)", body.group(1)))

    sizes = {k: int(v) for k, v in re.findall(r"\b([HL]_FIELDS) = (\d+)", text)}
    return {"version": int(re.search(r"kVersion = (\d+);", text).group(1)),  # type: ignore[union-attr]
            "header_fields": sizes["H_FIELDS"], "layer_fields": sizes["L_FIELDS"],
            "header": names("EVSSM_HEADER_FIELDS"), "layer": names("EVSSM_LAYER_FIELDS"),
            "codes": {"pool": names("EVSSM_POOL_MODES"), "head": names("EVSSM_HEAD_MODES"),
                      "norm": names("EVSSM_NORMS"), "gelu": names("EVSSM_GELUS")}}


def test_the_library_describes_the_layout_of_its_source() -> None:
    described = native.load_library().plan_layout()
    assert described == source_lists()
    assert len(described["header"]) == 28 and len(described["layer"]) == 23
    for block in ("header", "layer"):
        assert len(set(described[block])) == len(described[block])  # no name twice


def test_plan_fields_land_where_the_kernel_reads_them() -> None:
    config = load_model_config("tiny", CONFIG)
    model = StreamingModel(config, init_variables(config, 0), backend="native")
    step = model.native
    assert step is not None
    layout, plan = step.layout, step.plan
    n_layers = config.num_stages * config.layers_per_stage
    assert plan.shape == (layout.header_fields + layout.layer_fields * n_layers,)

    def header(name: str) -> int:
        return int(plan[layout.header.index(name)])

    def layer(i: int, name: str) -> int:
        return int(plan[layout.header_fields + layout.layer_fields * i + layout.layer.index(name)])

    assert header("version") == native.PLAN_VERSION and header("layers") == n_layers
    assert header("words") == model.layout.words and header("classes") == config.num_classes
    assert (header("pool"), header("head"), header("norm"), header("gelu")) == (1, 2, 1, 1)
    assert layer(0, "d_in") == config.d_model and layer(0, "stride") == config.pooling_stride
    assert layer(1, "stride") == 1 and layer(1, "s_first") == -1  # an unstrided layer pools nothing
    assert layer(0, "inv_lambda") == -1 and layer(0, "step") >= 0  # no zoh: no 1/Lambda
    # The unused tail of each block stays -1.
    assert (plan[len(layout.header):layout.header_fields] == -1).all()


def altered(change: dict[str, Any]) -> types.SimpleNamespace:
    """The real library, describing ``plan_layout()`` with ``change`` applied."""
    real = native.load_library()
    layout = {**real.plan_layout(), **change}
    return types.SimpleNamespace(step=real.step, prime=real.prime, plan_layout=lambda: layout)


@pytest.mark.parametrize("change, message", [
    ({"version": native.PLAN_VERSION + 1}, "reads plan version 4; this module writes version 3"),
    ({"header": (*native.load_library().plan_layout()["header"], "future_field")},
     r"does not write \['future_field'\]"),
    ({"layer": native.load_library().plan_layout()["layer"][:-1]}, r"does not read \['d_pool'\]"),
    ({"codes": {**native.load_library().plan_layout()["codes"], "head": ("last", "pool", "timepool")}},
     "codes head as"),
    ({"header_fields": 8}, "more fields than its blocks hold"),
])
def test_an_unknown_layout_is_refused(change: dict[str, Any], message: str, monkeypatch,
                                      caplog) -> None:
    """A kernel whose layout this module does not write: ``native`` refuses, ``auto`` serves
    the model through XLA and says why; never a plan with fields in the wrong places."""
    config = load_model_config("tiny", CONFIG)
    variables = init_variables(config, 0)
    library = altered(change)
    monkeypatch.setattr(native, "load_library", lambda: library)
    with pytest.raises(native.NativeUnavailable, match=message):
        StreamingModel(config, variables, backend="native")
    with caplog.at_level(logging.WARNING, logger="evssm.models.streaming"):
        model = StreamingModel(config, variables, backend="auto")
    assert model.backend == "xla" and re.search(message, caplog.text)


def test_a_library_without_a_layout_is_refused(monkeypatch) -> None:
    config = load_model_config("tiny", CONFIG)
    real = native.load_library()
    monkeypatch.setattr(native, "load_library",
                        lambda: types.SimpleNamespace(step=real.step, prime=real.prime))
    with pytest.raises(native.NativeUnavailable, match="does not describe its plan layout"):
        StreamingModel(config, init_variables(config, 0), backend="native")


@pytest.mark.parametrize("field, value, message", [
    ("version", native.PLAN_VERSION + 1, "plan version or size mismatch"),
    ("pool", 3, "codes a mode the native step does not know"),
    ("gelu", -1, "codes a mode the native step does not know"),
])
def test_the_kernel_refuses_a_plan_it_does_not_know(field: str, value: int, message: str) -> None:
    """The kernel checks the plan itself, and leaves the state rows alone."""
    config = load_model_config("tiny", CONFIG)
    model = StreamingModel(config, init_variables(config, 0), backend="native")
    step = model.native
    assert step is not None
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.num_embeddings, (2, 16)).astype(np.int32)
    gaps, lengths = np.full((2, 16), 5, np.int32), np.array([16, 9], np.int32)
    pool = np.zeros((2, model.layout.words), np.int32)
    step.step_rows(pool, None, tokens, gaps, lengths)
    before = pool.copy()
    assert before.any()
    step.plan = step.plan.copy()
    step.plan[step.layout.header.index(field)] = value
    with pytest.raises(RuntimeError, match=message):
        step.step_rows(pool, None, tokens, gaps, lengths)
    np.testing.assert_array_equal(pool, before)
