"""The tutorials in tutorials/ run as they are, top to bottom, in a real Jupyter kernel.

Each notebook is executed with nbclient in quick mode (``EVSSM_TUTORIAL_QUICK=1``: fewer
recordings and epochs), writing into a temporary folder; a failed assertion in any cell fails the
test. The paper-checkpoint notebook reads the reference code's checkpoints from the shared folder
and is skipped where it is absent; the server notebook starts and stops its own server on
127.0.0.1.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import shared_path

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


def execute(name: str, workdir: Path, **env: str):
    """Run notebook ``name`` in ``workdir`` with ``env`` added; returns the executed notebook."""
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    base = {k: v for k, v in os.environ.items() if k != "EVSSM_URL"}  # the notebook's own server
    client.execute(env=dict(base, JAX_PLATFORMS="cpu", EVSSM_TUTORIAL_QUICK="1",
                            EVSSM_TUTORIAL_DIR=str(workdir), **env))
    return nb


def outputs(nb, kind: str) -> list:
    """Every output of the notebook's cells holding ``kind`` (``text`` for printed text, or a
    MIME type such as ``image/png``)."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if kind == "text" and out.get("output_type") == "stream":
                found.append(out["text"])
            elif kind in out.get("data", {}):
                found.append(out["data"][kind])
    return found


def test_every_tutorial_is_tested() -> None:
    assert sorted(p.name for p in TUTORIALS.glob("*.ipynb")) == [
        "01-train-a-small-model.ipynb", "02-paper-checkpoint.ipynb", "03-stream-to-a-server.ipynb"]
    for path in TUTORIALS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert not outputs(nb, "text") and not outputs(nb, "image/png"), f"{path.name} is " \
            "committed with outputs; clear them"


@pytest.mark.slow
def test_train_a_small_model(tmp_path: Path) -> None:
    nb = execute("01-train-a-small-model.ipynb", tmp_path)
    text = "".join(outputs(nb, "text"))
    assert "quick mode" in text and "offline probabilities" in text and ": done." in text
    assert len(outputs(nb, "image/png")) == 1  # the learning curves
    assert (tmp_path / "tutorial-two-digits" / "best" / "evssm.json").is_file()


@pytest.mark.slow
def test_paper_checkpoint_offline_and_streamed(tmp_path: Path) -> None:
    seeds = shared_path("fixtures", "seed-checkpoints")
    nb = execute("02-paper-checkpoint.ipynb", tmp_path, EVSSM_SEED_CHECKPOINTS=str(seeds))
    text = "".join(outputs(nb, "text"))
    assert "largest |evssm - reference| logit" in text and "largest |streamed - reference|" in text
    assert len(outputs(nb, "image/png")) == 1  # the rolling probabilities
    assert (tmp_path / "shd-paper" / "evssm.json").is_file()


@pytest.mark.slow
def test_stream_to_a_server(tmp_path: Path) -> None:
    nb = execute("03-stream-to-a-server.ipynb", tmp_path)
    text = "".join(outputs(nb, "text"))
    assert "ready:" in text and "events/s" in text and "server stopped, exit code" in text
    assert len(outputs(nb, "image/png")) == 2  # rolling probabilities, throughput
