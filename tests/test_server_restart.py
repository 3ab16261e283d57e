"""Sessions that outlive their server process: ``evssm serve --state-dir`` / ``--state-store``.

Real ``evssm serve`` processes on free loopback ports, the client library's own reconnect and
resume, and the answer compared with ``POST /v1/classify`` of the whole recording:

- SIGTERM, then a new process on the same port and directory: every session resumes where the
  drain left it, nothing to replay;
- SIGKILL mid-stream: the restarted server restores each session from its last snapshot and the
  client replays what came after (``durable``);
- two replicas sharing one Redis behind HAProxy (the project's config): the replica holding a
  session is killed, the session resumes on the other one;
- a snapshot made for other weights is refused (``snapshot_incompatible``); a damaged snapshot is
  skipped with a log line and the server starts.

The tiny model with small shape buckets and a shared compilation cache keep each start short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import free_port, haproxy_balancer, redis_server, scrape, wait_process_ready
from numeric import assert_close
from test_durability import copy_store

from evssm.client import AsyncStreamSession, SessionExpired, SimulatedSensor, apaced, classify, packetize
from evssm.models.events import Recording, SensorSpec
from evssm.server.core.snapshots import DiskStore, token_key

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 420
SERVER_ARGS = ["--model", "small=config:tiny", "--batch-buckets", "1,4", "--length-buckets", "64,256",
               "--classify-length-buckets", "1024", "--classify-batch-events", "4096",
               "--max-sessions", "16", "--log-level", "info"]
RTOL, ATOL = 1e-4, 1e-6
# Patient clients: a restart takes as long as loading and compiling the model.
PATIENT = {"max_reconnect_attempts": 1000, "backoff": (0.05, 0.5), "max_in_flight": 4}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xla-cache")


class Serve:
    """``evssm serve`` as a subprocess on ``port``; ``args`` after the common ones."""

    def __init__(self, log_path: Path, port: int, cache: Path, *args: str, model: str | None = None):
        self.port = port
        self.log_path = log_path
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "EVSSM_COMPILATION_CACHE": str(cache),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        common = list(SERVER_ARGS)
        if model is not None:
            common[1] = model
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "evssm.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                 *common, *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def ready(self, classify: bool = True) -> Serve:
        """Wait until it streams (and, with ``classify``, its classify shapes are compiled)."""
        wait_process_ready(self.proc, self.http, self.log_path, READY_TIMEOUT_S, classify)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode


@pytest.fixture
def servers() -> Iterator[list[Serve]]:
    """Every server a test starts, stopped at the end."""
    started: list[Serve] = []
    yield started
    for srv in started:
        srv.stop(signal.SIGKILL)


def sim(seed: int, seconds: float) -> Recording:
    return SimulatedSensor(SensorSpec.one_d(700), 20_000, label=seed % 20, num_classes=20,
                           seed=seed).recording(seconds)


def offline(http: str, recs: list[Recording]) -> list[np.ndarray]:
    return [np.asarray(c.probs) for c in classify(http, recs)]


async def stream_until(session: AsyncStreamSession, rec: Recording, trigger: Any, speed: float = 1.0,
                       events: int = 100) -> list[Any]:
    """Stream ``rec`` in real time (``speed``); ``trigger(session, result)`` sees every result."""
    results = []
    async for result in session.stream(apaced(packetize(rec, events=events), speed)):
        results.append(result)
        await trigger(session, result)
    return results


# --- restart -------------------------------------------------------------------------------------
def test_sigterm_then_restart_every_session_resumes_exactly(tmp_path: Path, cache: Path,
                                                            servers: list[Serve]) -> None:
    port, state = free_port(), tmp_path / "state"
    servers.append(Serve(tmp_path / "a.log", port, cache, "--state-dir", str(state)).ready())
    recs = [sim(seed, 1.2) for seed in range(3)]
    expected = offline(servers[0].http, recs)
    progress = [0] * len(recs)
    restarted = asyncio.Event()

    async def main() -> list[tuple[list[Any], AsyncStreamSession]]:
        loop = asyncio.get_running_loop()

        async def restart() -> None:
            while min(progress) < 6000:  # every session well into its recording
                await asyncio.sleep(0.01)
            code = await loop.run_in_executor(None, servers[0].stop)
            assert code == 0, servers[0].log()[-3000:]
            servers.append(await loop.run_in_executor(
                None, lambda: Serve(tmp_path / "b.log", port, cache, "--state-dir", str(state)).ready()))
            restarted.set()

        async def one(i: int) -> tuple[list[Any], AsyncStreamSession]:
            async def trigger(_: AsyncStreamSession, result: Any) -> None:
                progress[i] = result.events

            async with AsyncStreamSession(servers[0].ws, **PATIENT) as s:
                return await stream_until(s, recs[i], trigger), s

        task = asyncio.create_task(restart())
        outcome = await asyncio.gather(*(one(i) for i in range(len(recs))))
        await task
        return outcome

    outcome = asyncio.run(asyncio.wait_for(main(), 600))
    assert "drain: 3 session snapshots written" in servers[0].log()
    for rec, want, (results, session) in zip(recs, expected, outcome, strict=False):
        assert results[-1].events == len(rec)
        assert_close(results[-1].probs, want, rtol=RTOL, atol=ATOL)
        (resume,) = session.resumes
        # The drain answered every accepted packet, then snapshotted: nothing to replay.
        assert resume.restored and not resume.new_session and resume.replayed == 0
        assert 6000 <= resume.events < len(rec)
        assert [r.seq for r in results] == list(range(len(results)))
    assert scrape(servers[1].http, "evssm_sessions_restored_total") == 3


def test_sigkill_mid_stream_replays_from_durable(tmp_path: Path, cache: Path, servers: list[Serve]) -> None:
    port, state = free_port(), tmp_path / "state"
    args = ("--state-dir", str(state), "--snapshot-interval", "0.5")
    servers.append(Serve(tmp_path / "a.log", port, cache, *args).ready())
    recs = [sim(10 + seed, 2.0) for seed in range(2)]
    expected = offline(servers[0].http, recs)
    at_kill: list[tuple[int, int]] = []  # (durable, answered) of session 0 when the server died
    killed = asyncio.Event()

    async def main() -> list[tuple[list[Any], AsyncStreamSession]]:
        loop = asyncio.get_running_loop()

        async def one(i: int) -> tuple[list[Any], AsyncStreamSession]:
            async def trigger(s: AsyncStreamSession, result: Any) -> None:
                if i == 0 and not killed.is_set() and s.durable and result.events - s.durable >= 3000:
                    servers[0].stop(signal.SIGKILL)  # packets in flight die with it
                    killed.set()
                    at_kill.append((s.durable, result.events))
                    servers.append(await loop.run_in_executor(
                        None, lambda: Serve(tmp_path / "b.log", port, cache, *args).ready()))

            async with AsyncStreamSession(servers[0].ws, **PATIENT) as s:
                return await stream_until(s, recs[i], trigger), s

        return await asyncio.gather(*(one(i) for i in range(len(recs))))

    outcome = asyncio.run(asyncio.wait_for(main(), 600))
    assert killed.is_set()
    assert servers[0].proc.returncode == -signal.SIGKILL
    for i, (rec, want, (results, session)) in enumerate(zip(recs, expected, outcome, strict=False)):
        assert results[-1].events == len(rec)
        assert_close(results[-1].probs, want, rtol=RTOL, atol=ATOL)
        assert [r.seq for r in results] == list(range(len(results)))  # every packet answered once
        (resume,) = session.resumes
        assert resume.restored and not resume.new_session
        if i == 0:
            # Restored at or after the durable count the client knew of; the answered events after
            # it were replayed (unless a snapshot newer than the last answer was written in the
            # millisecond before the kill).
            (durable, answered), = at_kill
            assert durable <= resume.events
            assert resume.events + resume.replayed >= answered
            assert resume.replayed > 0 or resume.events >= answered
    assert "restored from its snapshot" in servers[1].log()


# --- the command line ----------------------------------------------------------------------------
SIM_SOURCE = "sim:rate=20000,duration=3,seed=5"  # deterministic: about 60,000 events over 3 s


def stream_cli(port: int, *options: str) -> subprocess.Popen:
    """``evssm stream`` of :data:`SIM_SOURCE` to the server on ``port``, one JSON line out."""
    return subprocess.Popen([sys.executable, "-m", "evssm.cli", "stream", SIM_SOURCE, "--url",
                             f"ws://127.0.0.1:{port}", "--json", "--packet-events", "100",
                             "--max-in-flight", "4", *options], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, dict[str, Any], str]:
    """(exit code, the JSON object printed, stderr) of a finished ``stream_cli``."""
    out, err = proc.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    assert lines, f"no JSON printed (exit {proc.returncode}): {err[-3000:]}"
    return proc.returncode, json.loads(lines[-1]), err


def kill_mid_stream(srv: Serve, cli: subprocess.Popen) -> None:
    """SIGKILL ``srv`` once the stream is well into its recording and snapshotted (counted from
    now: the server may have served other streams)."""
    events, snapshots = scrape(srv.http, "evssm_events_total"), scrape(srv.http, "evssm_snapshots_written_total")
    deadline = time.monotonic() + 120
    while scrape(srv.http, "evssm_events_total") < events + 15_000 or \
            scrape(srv.http, "evssm_snapshots_written_total") < snapshots + 1:
        assert cli.poll() is None, cli.communicate()
        assert time.monotonic() < deadline, "the stream did not get going"
        time.sleep(0.05)
    srv.stop(signal.SIGKILL)


def same_answer(got: dict[str, Any], want: dict[str, Any]) -> None:
    got_p, want_p = np.asarray(got["probs"], np.float64), np.asarray(want["probs"], np.float64)
    assert got_p.shape == want_p.shape and np.isfinite(got_p).all() and np.isfinite(want_p).all()
    assert_close(got_p, want_p, rtol=RTOL, atol=ATOL)
    assert got["prediction"] == want["prediction"]


@pytest.mark.timeout(1800)  # three starts, two of them compiling; minutes on a loaded machine
def test_stream_cli_outlasts_a_sigkill_and_a_compiling_restart(tmp_path: Path, cache: Path,
                                                                 servers: list[Serve]) -> None:
    """``evssm stream`` against a server that is SIGKILLed mid-stream and restarted with an empty
    compilation cache (so it compiles its XLA step before it is ready): the command waits,
    resumes, replays and prints the answer of an unbroken stream. With a short
    ``--reconnect-timeout`` and no restart it prints the resume token and the command that
    continues, which, run while the server is still down, waits for it and then finishes the
    stream with the same answer."""
    port, state = free_port(), tmp_path / "state"
    args = ("--state-dir", str(state), "--snapshot-interval", "0.5")
    servers.append(Serve(tmp_path / "a.log", port, cache, *args).ready(classify=False))
    cli = stream_cli(port)
    kill_mid_stream(servers[0], cli)
    assert servers[0].proc.returncode == -signal.SIGKILL
    # The restart compiles its XLA streaming step (one shape bucket) from an empty cache before
    # it is ready; streams need nothing else from it.
    compiling = (*args, "--backend", "xla", "--batch-buckets", "1", "--length-buckets", "256")
    servers.append(Serve(tmp_path / "b.log", port, tmp_path / "empty-cache", *compiling)
                   .ready(classify=False))
    code, survived, err = finished(cli)
    assert code == 0, err[-3000:]
    assert "waiting up to 300 s for the server to come back" in err
    assert survived["reconnects"] == 1 and survived["resumes"][0]["restored"]
    assert "restored from its snapshot" in servers[1].log()
    assert httpx.get(f"{servers[1].http}/readyz").json()["compilations"]["small"] > 0  # it compiled

    code, unbroken, err = finished(stream_cli(port, "--fast"))
    assert code == 0, err[-3000:]
    total = unbroken["recording_events"]
    assert unbroken["reconnects"] == 0 and unbroken["events"] == survived["events"] == total
    same_answer(survived, unbroken)

    # No restart within --reconnect-timeout: the token and the command that continues.
    cli = stream_cli(port, "--reconnect-timeout", "3")
    kill_mid_stream(servers[1], cli)
    code, failed, err = finished(cli, 120)
    assert code == 1
    token = failed["resume"]
    assert failed["error"] == "connection_lost" and token and f"--resume {token}" in failed["continue"]
    assert f"--resume {token}" in err and "reconnect attempts in" in err
    # The command that continues, run before the server is back: it waits for it.
    cli = stream_cli(port, "--fast", "--resume", token)
    servers.append(Serve(tmp_path / "c.log", port, cache, *args))
    code, resumed, err = finished(cli)
    assert code == 0, err[-3000:]
    assert "is not serving yet" in err
    # Only what the restored session lacked was sent: the events after its snapshot.
    assert 0 < resumed["events"] < total and resumed["reconnects"] == 0
    same_answer(resumed, unbroken)


# --- replicas ------------------------------------------------------------------------------------
def test_replica_lost_its_session_resumes_on_another_through_redis(tmp_path: Path, cache: Path,
                                                                   servers: list[Serve]) -> None:
    with redis_server(tmp_path) as url:
        args = ("--state-store", url, "--snapshot-interval", "0.5")
        replicas = [Serve(tmp_path / f"replica{i}.log", free_port(), cache, *args) for i in range(2)]
        servers.extend(replicas)
        for r in replicas:
            r.ready()
        with haproxy_balancer(tmp_path, [r.port for r in replicas]) as lb_port:
            rec = sim(21, 2.0)
            (want,) = offline(replicas[0].http, [rec])
            holder: list[Serve] = []

            async def main() -> tuple[list[Any], AsyncStreamSession]:
                async def trigger(s: AsyncStreamSession, result: Any) -> None:
                    if not holder and s.durable and result.events - s.durable >= 2000:
                        active = [scrape(r.http, "evssm_sessions_active") for r in replicas]
                        assert sorted(active) == [0, 1], active
                        holder.append(replicas[active.index(1)])
                        holder[0].stop(signal.SIGKILL)

                url = f"ws://127.0.0.1:{lb_port}/v1/stream?session=sensor-7"
                async with AsyncStreamSession(url, **PATIENT) as s:
                    return await stream_until(s, rec, trigger), s

            results, session = asyncio.run(asyncio.wait_for(main(), 600))
        survivor = next(r for r in replicas if r is not holder[0])
        assert results[-1].events == len(rec)
        assert_close(results[-1].probs, want, rtol=RTOL, atol=ATOL)
        (resume,) = session.resumes
        assert resume.restored and resume.replayed > 0
        assert scrape(survivor.http, "evssm_sessions_restored_total") == 1


# --- refused and damaged snapshots ---------------------------------------------------------------
@pytest.fixture(scope="module")
def drained(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> dict[str, Any]:
    """A state directory with the snapshots of two sessions, written by a drained server."""
    tmp = tmp_path_factory.mktemp("drained")
    srv = Serve(tmp / "serve.log", free_port(), cache, "--state-dir", str(tmp / "state")).ready()
    recs = [sim(30 + i, 1.0) for i in range(2)]
    try:
        expected = offline(srv.http, recs)

        async def main() -> list[str]:
            sessions = [AsyncStreamSession(srv.ws, reconnect=False) for _ in recs]
            for s, rec in zip(sessions, recs, strict=False):
                await s.open()
                async for _ in s.stream(packetize(rec.slice(0, 5000), events=500)):
                    pass
            # Still connected: the drain snapshots both sessions, then closes the connections.
            assert await asyncio.get_running_loop().run_in_executor(None, srv.stop) == 0
            for s in sessions:
                await s.close()
            return [s.resume_token for s in sessions]

        tokens = asyncio.run(main())
    finally:
        srv.stop(signal.SIGKILL)
    assert "drain: 2 session snapshots written" in srv.log()
    return {"state": tmp / "state", "tokens": tokens, "recs": recs, "expected": expected}


def copy_state(drained: dict[str, Any], to: Path) -> Path:
    """A copy of the drained server's state directory (a consistent copy of its database)."""
    copy_store(drained["state"], to)
    return to


def test_snapshot_of_other_weights_is_refused(tmp_path: Path, cache: Path, drained: dict[str, Any],
                                               servers: list[Serve]) -> None:
    from evssm.models.checkpoint import save_checkpoint
    from evssm.models.config import load_model_config
    from evssm.models.streaming import init_variables

    config = load_model_config("tiny")
    save_checkpoint(tmp_path / "other", config, init_variables(config, seed=1))  # same shapes
    state = copy_state(drained, tmp_path / "state")
    srv = Serve(tmp_path / "serve.log", free_port(), cache, "--state-dir", str(state),
                model=f"small={tmp_path / 'other'}")
    servers.append(srv.ready())

    async def main() -> None:
        with pytest.raises(SessionExpired) as info:
            await AsyncStreamSession(srv.ws, resume=drained["tokens"][0], reconnect=False).open()
        assert info.value.code == "snapshot_incompatible"
        assert "other weights or another state layout of model 'small'" in info.value.message
        async with AsyncStreamSession(srv.ws, reconnect=False) as s:  # the server serves on
            await s.send(drained["recs"][0].slice(0, 100))
            assert (await s.recv()).events == 100

    asyncio.run(main())
    assert "2 session snapshots (2 for models or weights not served here)" in srv.log()
    assert scrape(srv.http, "evssm_snapshot_failures_total") == 1


def test_damaged_snapshot_is_skipped_and_the_server_starts(tmp_path: Path, cache: Path,
                                                           drained: dict[str, Any],
                                                           servers: list[Serve]) -> None:
    state = copy_state(drained, tmp_path / "state")
    damaged, intact = drained["tokens"]
    with contextlib.closing(sqlite3.connect(state / DiskStore.FILE)) as db, db:  # a truncated record
        db.execute("UPDATE snapshots SET data = substr(data, 1, 200) WHERE key = ?", (token_key(damaged),))
    srv = Serve(tmp_path / "serve.log", free_port(), cache, "--state-dir", str(state))
    servers.append(srv.ready())
    deadline = time.monotonic() + 30
    while "corrupt skipped" not in srv.log():
        assert time.monotonic() < deadline, srv.log()[-3000:]
        time.sleep(0.1)
    assert f"snapshot {token_key(damaged)[:12]}... skipped and deleted" in srv.log()
    assert "1 session snapshots (0 for models or weights not served here), 1 corrupt skipped" in srv.log()

    async def main() -> list[Any]:
        with pytest.raises(SessionExpired) as info:
            await AsyncStreamSession(srv.ws, resume=damaged, reconnect=False).open()
        assert info.value.code == "unknown_session"
        rec = drained["recs"][1]
        async with AsyncStreamSession(srv.ws, resume=intact, reconnect=False) as s:
            assert s.info is not None and s.info.restored and s.info.events == 5000
            return [r async for r in s.stream(packetize(rec.slice(5000, len(rec)), events=500))]

    results = asyncio.run(main())
    assert results[-1].events == len(drained["recs"][1])
    assert_close(results[-1].probs, drained["expected"][1], rtol=RTOL, atol=ATOL)
