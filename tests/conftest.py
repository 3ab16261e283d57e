"""Shared test fixtures: run a real server on a free 127.0.0.1 port.

``serve_app(app)`` runs any ASGI app under uvicorn on a background thread and yields a
:class:`RunningServer` (``http`` and ``ws`` base URLs, the server's event loop); it stops the
server on exit. ``free_port()`` finds an unused port for servers started as subprocesses and
``wait_process_ready()`` waits for one; ``require_tool()`` finds a system tool a test drives;
``shared_path()`` finds a file of the workplace's shared folder (``../shared`` beside the
repository, or ``$EVSSM_SHARED_DIR``) and skips the test where it is absent.
:class:`LoopThread` is the base of the small loopback servers tests write themselves.
``redis_server()`` runs a real ``redis-server`` (Debian's package) on a free port;
``haproxy_test_config()`` is the project's HAProxy config pointed at loopback replicas, and
``haproxy_balancer()`` runs a real HAProxy with it.

Reproducible randomness: Hypothesis runs derandomized (the profile below; the same examples in
every run, none remembered between runs), and NumPy generators come from
``numeric.seeded_rng(name)``; a failed test's report lists the seeds it drew.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numeric
import pytest
from hypothesis import settings

# Derandomized: examples derive from each test's own code, so CI and a replay draw the same
# ones, and no example database carries a case from one run to the next; print_blob adds the
# @reproduce_failure line to a failure. HYPOTHESIS_PROFILE selects another registered profile.
settings.register_profile("evssm", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "evssm"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    numeric.drawn_seeds.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under a failed test, the seeds of the generators it drew (``numeric.seeded_rng``)."""
    report = yield
    if report.failed and numeric.drawn_seeds:
        lines = [f"seeded_rng({name!r}): seed {seed}" for name, seed in numeric.drawn_seeds]
        report.sections.append(("random seeds (the same in every run)", "\n".join(lines)))
    return report


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (bind to port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fully_ready(base_url: str) -> dict | None:
    """``/readyz``'s body once the server streams and every model's classify shapes are
    compiled (they compile after ready); None before."""
    import httpx

    try:
        r = httpx.get(f"{base_url}/readyz", timeout=10)
    except httpx.TimeoutException:  # a server compiling on a busy CPU can be slow to answer
        return None
    if r.status_code != 200:
        return None
    body = r.json()
    return body if all(body.get("classify", {}).values()) else None


def wait_ready(base_url: str, timeout: float = 300.0) -> dict:
    """Poll an in-process server until :func:`fully_ready`; its ``/readyz`` body."""
    deadline = time.monotonic() + timeout
    while (body := fully_ready(base_url)) is None:
        assert time.monotonic() < deadline, f"server not ready after {timeout} s"
        time.sleep(0.05)
    return body


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of metric ``name``'s samples in the Prometheus text ``text``, over those whose
    labels include every pair of ``labels`` (none given: all of them)."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")) and all(w in line for w in want))


def scrape(base_url: str, name: str, **labels: str) -> float:
    """:func:`metric_sum` of the server at ``base_url``'s ``/metrics``, read now."""
    import httpx

    return metric_sum(httpx.get(f"{base_url}/metrics", timeout=10).text, name, **labels)


@pytest.fixture(scope="module")
def tiny_model() -> Any:
    """The tiny configuration's model (random init), loaded once per test module."""
    from evssm.models.streaming import load_model

    return load_model("config:tiny")


def start_tiny(serve: Any, model: Any, base: Any, **changes: Any) -> Any:
    """A real server (uvicorn on 127.0.0.1, from the ``serve`` fixture) serving ``model`` as
    ``tiny`` with the settings ``base`` and ``changes``, once it is ready; ``server.engine`` is
    its engine."""
    from evssm.server.app import create_app

    app = create_app(base.replace(**changes), models={"tiny": model})
    server = serve(app)
    wait_ready(server.http)
    server.engine = app.state.engine
    return server


@pytest.fixture
def start(serve: Any, tiny_model: Any, request: pytest.FixtureRequest) -> Any:
    """``start(**changes)`` -> :func:`start_tiny` with the test module's ``BASE`` settings (a
    module whose servers differ more defines its own ``start``)."""
    return functools.partial(start_tiny, serve, tiny_model, request.module.BASE)


@pytest.fixture
def server(start: Any) -> Any:
    """A ready server of the tiny model with the test module's ``BASE`` settings."""
    return start()


def wait_process_ready(proc: subprocess.Popen, base_url: str, log_path: Path,
                       timeout: float, classify: bool = True) -> None:
    """Poll ``base_url/readyz`` of a server started as ``proc`` until it answers 200 (and, with
    ``classify``, reports every model's classify shapes compiled); raise with the tail of its
    log if it exits first or is not ready within ``timeout`` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"evssm serve exited with {proc.returncode}:\n"
                               f"{log_path.read_text(errors='replace')[-6000:]}")
        with contextlib.suppress(httpx.TransportError):
            if classify and fully_ready(base_url) is not None:
                return
            if not classify and httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"evssm serve not ready after {timeout} s:\n"
                               f"{log_path.read_text(errors='replace')[-6000:]}")
        time.sleep(0.25)


def stop_process(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM ``proc`` and wait up to ``timeout`` seconds for it (a server drains), then SIGKILL."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def require_tool(name: str, package: str) -> str:
    """Path of ``name``; skips (or, under CI, fails) with the Debian package that provides it."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} not found: apt-get install -y --no-install-recommends {package}"
    if os.environ.get("CI") and not os.environ.get("EVSSM_DEPLOY_TESTS_ALLOW_SKIP"):
        pytest.fail(message + " (CI must install it)")
    pytest.skip(message)


@contextlib.contextmanager
def redis_server(directory: Path, port: int | None = None, timeout: float = 20.0) -> Iterator[str]:
    """A real ``redis-server`` on 127.0.0.1 (a free port unless ``port``), its files in
    ``directory``, nothing persisted; yields ``redis://127.0.0.1:PORT/0`` and stops the server on
    exit."""
    exe = require_tool("redis-server", "redis-server")
    port = port or free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                             "--save", "", "--appendonly", "no", "--logfile", str(directory / "redis.log")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                log = directory / "redis.log"
                raise RuntimeError(f"redis-server did not start: {log.read_text() if log.exists() else ''}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc, 10)


HAPROXY_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy" / "haproxy.cfg"


def haproxy_test_config(lb_port: int, backends: list[int]) -> str:
    """The project's haproxy.cfg with only the listen address and the replica addresses changed
    (static loopback servers instead of Docker-DNS discovery), without the stats frontend, and with
    a connection limit that fits this machine's open-file limit."""
    text = HAPROXY_CONFIG.read_text()
    text = re.sub(r"^(\s*)maxconn \d+$", r"\1maxconn 256", text, flags=re.M)
    text = re.sub(r"^resolvers \w+\n(?:[ \t]+.*\n)+", "", text, flags=re.M)
    text = re.sub(r"^frontend stats\n(?:[ \t]+.*\n?)+", "", text, flags=re.M)
    text = re.sub(r"^(\s*)log stdout.*$", r"\1log stderr format raw local0 warning", text, flags=re.M)
    text = re.sub(r"^(\s*)bind :8080$", rf"\1bind 127.0.0.1:{lb_port}", text, flags=re.M)
    servers = "".join(f"    server replica{i + 1} 127.0.0.1:{p}\n" for i, p in enumerate(backends))
    text, n = re.subn(r"^\s*server-template .*\n", servers, text, flags=re.M)
    assert n == 1
    return text


@contextlib.contextmanager
def haproxy_balancer(directory: Path, backends: list[int], *, up_timeout: float = 30.0) -> Iterator[int]:
    """A real HAProxy with :func:`haproxy_test_config` in front of ``backends`` (loopback ports),
    its config and log in ``directory``; yields its port once it answers ``/readyz`` and every
    backend up then has passed two health checks (``rise 2``, ``inter 2s``). Stopped on exit."""
    import httpx

    exe = require_tool("haproxy", "haproxy")
    port = free_port()
    config, log_path = directory / "haproxy.cfg", directory / "haproxy.log"
    config.write_text(haproxy_test_config(port, backends))
    check = subprocess.run([exe, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([exe, "-f", str(config), "-db"], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + up_timeout
        while True:
            assert proc.poll() is None, log_path.read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"HAProxy does not answer: {log_path.read_text()}"
            time.sleep(0.2)
        time.sleep(HAPROXY_RISE_S)
        yield port
    finally:
        stop_process(proc, 30)


# Two passed health checks 2 s apart (``rise 2``, ``inter 2s`` in haproxy.cfg), and a margin.
HAPROXY_RISE_S = 4.5


SHARED_DIR = Path(os.environ.get("EVSSM_SHARED_DIR")
                  or Path(__file__).resolve().parents[1].parent / "shared")


def shared_path(*parts: str) -> Path:
    """``SHARED_DIR/parts...``; skips the test when it is absent. Those files belong to other
    projects: tests read them in place and never copy them into this repository."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (set EVSSM_SHARED_DIR to the shared folder)")
    return path


class LoopThread:
    """A loopback server on its own asyncio loop in a daemon thread; ``with`` starts and stops it.

    Subclasses implement :meth:`_listen`: an async context manager that listens on 127.0.0.1
    and yields the bound port.
    """

    def __init__(self) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        stop = self._stop
        assert stop is not None, "set by the loop thread before _ready"
        self._loop.call_soon_threadsafe(stop.set_result, None)
        self._thread.join(10)

    def _listen(self) -> contextlib.AbstractAsyncContextManager[int]:
        raise NotImplementedError

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = self._loop.create_future()
        async with self._listen() as port:
            self.port = port
            self._ready.set()
            await self._stop


@dataclass
class RunningServer:
    host: str
    port: int
    server: Any  # uvicorn.Server
    loop: asyncio.AbstractEventLoop | None = None

    @property
    def http(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the server's event loop (e.g. to drive the app's internals)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextlib.contextmanager
def serve_app(app: Any, *, startup_timeout: float = 60.0, **config: Any) -> Iterator[RunningServer]:
    """Run ``app`` with uvicorn on a thread, on a free 127.0.0.1 port, until the block exits."""
    import uvicorn

    port = free_port()
    cfg = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **config)
    server = uvicorn.Server(cfg)
    running = RunningServer("127.0.0.1", port, server)

    def target() -> None:
        async def main() -> None:
            running.loop = asyncio.get_running_loop()
            await server.serve()

        asyncio.run(main())

    thread = threading.Thread(target=target, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the test server on port {port} did not start")
        time.sleep(0.02)
    try:
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def serve() -> Iterator[Any]:
    """``serve(app)`` -> a :class:`RunningServer`; every server is stopped after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda app, **kw: stack.enter_context(serve_app(app, **kw))


def key_file(directory: Path, *keys: str) -> Path:
    """An ``--api-keys`` file in ``directory`` holding ``keys``, readable by its owner only."""
    path = directory / "keys"
    path.write_text("".join(k + "\n" for k in keys))
    path.chmod(0o600)
    return path
