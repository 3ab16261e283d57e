"""The machine a benchmark names (``evssm.models.machine``): CPU model, cores, instruction sets,
importable without JAX, and recorded by ``evssm bench model``."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from evssm.models import machine

ROOT = Path(__file__).resolve().parents[1]


def check_info(info: dict) -> None:
    assert isinstance(info["cpu"], str) and info["cpu"].strip()
    assert isinstance(info["cores"], int) and info["cores"] >= info["usable_cores"] >= 1
    sets = info["instruction_sets"]
    assert isinstance(sets, list) and all(isinstance(s, str) for s in sets)
    arch = platform.machine().lower()
    if arch in ("x86_64", "amd64"):
        assert "SSE2" in sets, sets  # every x86-64 CPU has it
    elif arch in ("aarch64", "arm64"):
        assert {"NEON", "ASIMD"} & set(sets), sets


def test_machine_info_needs_no_jax() -> None:
    code = ("import json, sys\nfrom evssm.models import machine\n"
            "print(json.dumps({'info': machine.machine_info(), 'jax': 'jax' in sys.modules}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["jax"] is False
    check_info(out["info"])


@pytest.mark.parametrize(("text", "want"), [
    ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu\n",
     "AMD EPYC 9R14"),
    ("processor\t: 0\nBogoMIPS\t: 50.00\nCPU part\t: 0xd0c\n\nHardware\t: BCM2835\n", "BCM2835"),
    ("processor\t: 0\nmodel name\t: \nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n",
     "Raspberry Pi 4 Model B Rev 1.4"),
])
def test_cpu_model_reads_the_kernels_name(tmp_path: Path, text: str, want: str) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert machine.cpu_model(str(path)) == want


def test_cpu_model_falls_back_to_the_platform(tmp_path: Path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nCPU part\t: 0xd0c\n")  # no line names the processor
    expected = platform.processor() or platform.machine() or "unknown"
    assert machine.cpu_model(str(path)) == expected
    assert machine.cpu_model(str(tmp_path / "absent")) == expected


def test_bench_model_report_names_the_machine(capsys: pytest.CaptureFixture[str]) -> None:
    from evssm.models import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--configs", "tiny", "--seconds", "0.01", "--packet-sizes", "4",
                              "--sessions", "2", "--offline-length", "0"])
    assert bench.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    check_info(report["machine"])
    assert report["machine"]["backend"] == "cpu" or report["machine"]["devices"]
    figure = report["models"]["tiny"]["streaming_one_session"]["packet_4"]
    assert figure["calls"] >= 1 and figure["events_per_s"] > 0
