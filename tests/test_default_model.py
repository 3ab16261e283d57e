"""The shipped default model loads without arguments and keeps its recorded accuracy.

``models/pretrained/event-mnist/evaluation.json`` is the output of
``evssm eval models/pretrained/event-mnist --split test --limit 300 --json`` at the time the model
was committed; the test re-evaluates the same fixed subset through both forms.
"""

from __future__ import annotations

import json

import pytest

from evssm.models.data import load_dataset
from evssm.models.evaluate import evaluate
from evssm.models.streaming import DEFAULT_MODEL_DIR, load_model

RECORD = DEFAULT_MODEL_DIR / "evaluation.json"


def test_default_model_is_shipped_and_trained() -> None:
    assert (DEFAULT_MODEL_DIR / "evssm.json").exists(), "the default model is not committed"
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.rglob("*") if f.is_file())
    assert size < 5_000_000, f"the default model is {size} bytes; it must stay small"
    model = load_model()
    assert model.info["trained"] and model.config.sensor.width == 34
    assert model.config.labels == tuple(str(d) for d in range(10))


def test_default_model_was_chosen_on_validation_and_measured_once_on_test() -> None:
    """``best/`` was chosen on the held-out ``valid`` split; its test figure is a held-out one."""
    summary = json.loads((DEFAULT_MODEL_DIR / "evssm.json").read_text())["summary"]
    assert summary["dataset"] == "event-mnist" and summary["valid_split"] == "valid"
    test = summary["test"]
    assert test["split"] == "test" and test["selected_on"] == "valid"
    assert test["epoch"] == summary["epoch"] and test["samples"] == 1000
    assert 0.9 < test["accuracy"] <= 1.0


@pytest.mark.slow
def test_default_model_reaches_its_recorded_accuracy_through_both_forms() -> None:
    record = json.loads(RECORD.read_text())
    model = load_model()
    subset = load_dataset("event-mnist", record["split"], limit=record["samples"])
    result = evaluate(model, subset, batch_size=50, packet_events=256, progress=False)
    assert result["samples"] == record["samples"]
    assert result["max_prob_difference"] <= 1e-4
    # Identical code and data give identical predictions; allow one flip for a borderline sample
    # on another CPU's float rounding.
    tolerance = 1.0 / record["samples"] + 1e-9
    assert result["offline"]["accuracy"] >= record["offline"]["accuracy"] - tolerance
    assert result["streaming"]["accuracy"] >= record["streaming"]["accuracy"] - tolerance
    assert result["offline"]["accuracy"] > 0.9
