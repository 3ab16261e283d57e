"""The client installs and runs without JAX or Flax: checked in fresh interpreters."""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCK = ("import sys\n"
         "for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax'):\n"
         "    sys.modules[name] = None  # any attempt to import them now fails loudly\n")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_importing_the_client_loads_neither_jax_nor_flax() -> None:
    code = ("import sys\n"
            "import evssm.client, evssm.client.session, evssm.client.sources,"
            " evssm.client.packets, evssm.client.http_api, evssm.client.loadtest,"
            " evssm.client.stream_command, evssm.client.classify_command\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'jaxlib'))\n"
            "print(heavy)\n"
            "assert not heavy, heavy\n")
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_client_works_with_jax_unimportable() -> None:
    code = BLOCK + (
        "import numpy as np\n"
        "from evssm.client import packetize, SimulatedSensor, save_events, open_source\n"
        "from evssm.models.events import SensorSpec\n"
        "rec = SimulatedSensor(SensorSpec.one_d(8), 1000).recording(0.5)\n"
        "assert len(list(packetize(rec, events=10))) > 10\n")
    done = run_python(code)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("command", [["stream"], ["classify"], ["bench", "serve"]])
def test_client_commands_help_without_jax(command: list[str]) -> None:
    code = BLOCK + f"from evssm.cli import main\nraise SystemExit(main({command + ['--help']!r}))\n"
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "--url" in done.stdout and "usage: evssm" in done.stdout
