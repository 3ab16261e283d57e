"""The ``evssm`` command line as a newcomer meets it: help pages, defaults, pipes."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from evssm.cli import COMMANDS


def evssm(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evssm.cli", *args], capture_output=True,
                          text=True, timeout=120, **kwargs)


def test_a_command_group_lists_its_commands() -> None:
    done = evssm("bench", "--help")
    assert done.returncode == 0, done.stderr
    assert "bench model" in done.stdout and "bench serve" in done.stdout
    assert evssm("bench", "nope").returncode == 2


@pytest.mark.parametrize("words", [words for words, _, _ in COMMANDS], ids=" ".join)
def test_every_help_shows_each_default_once(words: tuple[str, ...]) -> None:
    done = evssm(*words, "--help")
    assert done.returncode == 0, done.stderr
    text = re.sub(r"\s+", " ", done.stdout)
    options = re.split(r" (?=--?[a-z][a-z-]* )", text)
    for option in options:  # one "(default: ...)" per option: the help's own or argparse's
        assert option.count("(default:") <= 1, option
    assert "(default: None)" not in text and "(default: False)" not in text


def test_help_pages_name_what_a_newcomer_needs() -> None:
    serve = evssm("serve", "--help").stdout
    assert "--model NAME=DIR" in serve and "CHECKPOINT_DIR" not in serve
    assert "--no-progress" in evssm("eval", "--help").stdout
    train = evssm("train", "--help").stdout
    for key in ("train.epochs", "train.batch_size", "model.d_model", "model.d_state",
                "model.num_stages"):
        assert key in train, key


def test_a_closed_pipe_ends_the_command_quietly() -> None:
    # `evssm data list | head` where head has exited: the write fails with EPIPE; no traceback.
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the command writes anything: deterministic
    try:
        done = subprocess.run([sys.executable, "-m", "evssm.cli", "data", "list"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 141


def test_bench_serve_without_a_server_says_so_on_stderr() -> None:
    from conftest import free_port

    url = f"ws://127.0.0.1:{free_port()}"  # nothing listens there
    done = evssm("bench", "serve", "--url", url, "--sessions", "2", "--duration", "0.5",
                 "--open-timeout", "5")
    assert done.returncode == 1
    assert f"no session opened at {url}/v1/stream" in done.stderr
    assert "is a server running there?" in done.stderr
