"""Deployment against a real server: the live page in headless Chromium, a real Prometheus scraping
the server with the project's own scrape config and answering every query of the Grafana dashboard,
and the session-affine load balancer (HAProxy with the project's config) in front of two replicas.

Tools come from Debian packages: ``chromium``, ``prometheus``, ``haproxy``. A missing one skips its
test with the package to install, except under CI (``CI`` set), where it fails.

Everything listens on 127.0.0.1 (free ports); every loop is bounded in time; every process started
here is stopped by the fixture or test that started it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import yaml
from conftest import free_port, haproxy_test_config, require_tool, wait_process_ready
from websockets.sync.client import connect

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "evssm.json"
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"

READY_TIMEOUT_S = float(os.environ.get("EVSSM_TEST_READY_TIMEOUT", "420"))

# Small shape buckets: the server compiles every bucket at start-up, and 2 shared cores are slow.
SERVER_ENV = {
    "EVSSM_BATCH_BUCKETS": "1,8",
    "EVSSM_LENGTH_BUCKETS": "64,256",
    "EVSSM_CLASSIFY_LENGTH_BUCKETS": "1024",
    "EVSSM_CLASSIFY_BATCH_EVENTS": "4096",
    "EVSSM_MAX_SESSIONS": "32",
    "EVSSM_LOG_LEVEL": "warning",
    "JAX_PLATFORMS": "cpu",
    # Compilations cached on disk (every one): the second replica starts from the first one's cache.
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
}


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the process (its own process group), then SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# --- the server ----------------------------------------------------------------------------------
class Server:
    """``evssm serve`` in a subprocess on a free loopback port (port through EVSSM_PORT)."""

    def __init__(self, log_path: Path, cache_dir: Path, extra_env: dict[str, str] | None = None):
        self.port = free_port()
        self.log_path = log_path
        env = {**os.environ, **SERVER_ENV, "EVSSM_PORT": str(self.port),
               "EVSSM_COMPILATION_CACHE": str(cache_dir), **(extra_env or {})}
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "evssm.cli", "serve", "--host", "127.0.0.1"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        self.log.flush()
        wait_process_ready(self.proc, self.http, self.log_path, timeout)

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xla-cache")


@pytest.fixture(scope="module")
def server(tmp_path_factory, compilation_cache) -> Iterator[Server]:
    pytest.importorskip("evssm.server.app", reason="the server package is not importable")
    srv = Server(tmp_path_factory.mktemp("server") / "server.log", compilation_cache)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


# --- streaming load ------------------------------------------------------------------------------
def pack(frame: dict[str, Any]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


def events_frame(seq: int, t0: int, n: int, sensor: dict[str, Any], rng: np.random.Generator,
                 gap_us: int = 50) -> tuple[dict[str, Any], int]:
    """A packet of ``n`` valid events starting after time ``t0``; returns it and its last time."""
    t = t0 + np.cumsum(rng.integers(0, 2 * gap_us + 1, size=n)).astype("<i8")
    frame: dict[str, Any] = {"type": "events", "seq": seq, "t": t.tobytes()}
    if sensor.get("kind") == "2d":
        frame["x"] = rng.integers(0, sensor["width"], size=n).astype("<u2").tobytes()
        frame["y"] = rng.integers(0, sensor["height"], size=n).astype("<u2").tobytes()
        frame["p"] = rng.integers(0, 2, size=n).astype("u1").tobytes()
    else:
        frame["x"] = rng.integers(0, max(1, int(sensor.get("channels") or 1)), size=n).astype("<u2").tobytes()
    return frame, int(t[-1]) if n else t0


def recv_frame(ws, timeout: float = 30.0) -> dict[str, Any]:
    data = ws.recv(timeout=timeout)
    return msgpack.unpackb(data, raw=False) if isinstance(data, bytes) else json.loads(data)


class Stream:
    """One streaming session over a real WebSocket (msgpack frames)."""

    def __init__(self, url: str, resume: str | None = None, seed: int = 0, **fields: Any):
        self.ws = connect(url, max_size=None, open_timeout=20).__enter__()
        frame: dict[str, Any] = {"type": "open", **fields}
        if resume:
            frame["resume"] = resume
        self.ws.send(pack(frame))
        self.opened = recv_frame(self.ws)
        self.rng = np.random.default_rng(seed)
        self.seq = 0
        self.t = 0
        model = self.opened.get("model") or {}
        self.sensor = model.get("sensor") or {"kind": "1d", "channels": 16}

    @property
    def ok(self) -> bool:
        return self.opened.get("type") == "opened"

    def send_events(self, n: int) -> dict[str, Any]:
        self.seq += 1
        frame, self.t = events_frame(self.seq, self.t, n, self.sensor, self.rng)
        self.ws.send(pack(frame))
        return recv_frame(self.ws)

    def close(self, graceful: bool = True) -> None:
        with contextlib.suppress(Exception):
            if graceful:
                self.ws.send(pack({"type": "close"}))
            self.ws.close()


class Load:
    """``sessions`` streams sending ``packet`` events per packet, paced to about ``rate`` events/s
    in all, from background threads, until stopped or ``max_seconds`` have passed."""

    def __init__(self, url: str, sessions: int = 2, packet: int = 256, rate: float = 20000,
                 max_seconds: float = 240):
        self.url, self.sessions, self.packet, self.rate = url, sessions, packet, rate
        self.max_seconds = max_seconds
        self.stop_event = threading.Event()
        self.events_acked = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(sessions)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def wait_for_events(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.events_acked < n and time.monotonic() < deadline and not self.stop_event.is_set():
            time.sleep(0.2)
        assert self.events_acked >= n, f"only {self.events_acked} events acknowledged: {self.errors[:3]}"

    def _run(self, index: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        period = self.packet * self.sessions / self.rate
        try:
            stream = Stream(self.url, seed=index)
        except Exception as exc:  # recorded, reported by wait_for_events
            self.errors.append(f"connect: {exc!r}")
            return
        try:
            if not stream.ok:
                self.errors.append(f"open: {stream.opened}")
                return
            next_send = time.monotonic()
            while not self.stop_event.is_set() and time.monotonic() < deadline:
                reply = stream.send_events(self.packet)
                if reply.get("type") != "result":
                    self.errors.append(f"reply: {reply}")
                    return
                with self.lock:
                    self.events_acked += self.packet
                next_send += period
                self.stop_event.wait(max(0.0, next_send - time.monotonic()))
        except Exception as exc:
            self.errors.append(f"stream: {exc!r}")
        finally:
            stream.close()


# --- the container's health check against the real server ---------------------------------------
def test_healthcheck_script_against_server(server):
    result = subprocess.run([sys.executable, str(HEALTHCHECK)], env={**os.environ, "EVSSM_PORT": str(server.port)},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, str(HEALTHCHECK), "--path", "/readyz"],
                            env={**os.environ, "EVSSM_PORT": str(server.port)},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


# --- the live page -------------------------------------------------------------------------------
def test_dashboard_page_is_served(server):
    status, body = http_get(server.http + "/dashboard")
    assert status == 200
    assert b"<canvas" in body and b"v1/stats" in body
    status, body = http_get(server.http + "/v1/stats")
    assert status == 200
    stats = json.loads(body)
    for key in ("time", "events_total", "packets_total", "sessions_active", "events_per_s",
                "latency_p50_ms", "latency_p99_ms", "models"):
        assert key in stats, f"/v1/stats lacks {key!r}, which the page reads"


# Pixels of a canvas close to a colour, inside the plot area.
COUNT_PIXELS_JS = """
(() => {
  const c = document.getElementById(%r);
  const ctx = c.getContext('2d');
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  const [r, g, b] = %s;
  let n = 0;
  for (let i = 0; i < d.length; i += 4)
    if (Math.abs(d[i] - r) < 40 && Math.abs(d[i+1] - g) < 40 && Math.abs(d[i+2] - b) < 40 && d[i+3] > 200) n++;
  return n;
})()
"""


def test_live_page_shows_throughput_in_headless_chromium(server, tmp_path):
    require_tool("chromium", "chromium")
    headless = _load_module("evssm_deploy_headless", ROOT / "deploy" / "tools" / "headless.py")
    with Load(server.ws, sessions=2, packet=256, rate=8000, max_seconds=150) as load:
        load.wait_for_events(2048)
        with headless.Chromium(width=1400, height=900) as browser:
            browser.navigate(server.http + "/dashboard?window=1")
            value = browser.wait_for(
                "(() => { const v = Number(document.getElementById('stat-events-per-s').dataset.value);"
                " return v > 0 ? v : null; })()", timeout=60)
            assert value > 0
            text = browser.evaluate("document.getElementById('stat-events-per-s').textContent")
            assert re.search(r"[1-9]", text), f"events/s tile shows {text!r}"
            # A few polls later the sessions tile and the events chart show the streams too.
            browser.wait_for("window.evssmDashboard.polls >= 3", timeout=30)
            sessions = browser.evaluate("Number(document.getElementById('stat-sessions').dataset.value)")
            assert sessions >= 1
            assert browser.evaluate(COUNT_PIXELS_JS % ("chart-eps", "[87, 148, 242]")) > 50, \
                "the events/s chart drew no line"
            status = browser.evaluate("document.getElementById('status').className")
            assert "ok" in status
            browser.screenshot(tmp_path / "dashboard.png")
            assert browser.evaluate("window.evssmDashboard.errors") == 0
            exceptions = [line for line in browser.console if line.startswith("exception")]
            assert not exceptions, exceptions
    assert not load.errors, load.errors


def test_live_page_draws_the_recent_past_at_once(server):
    """Opened after the traffic of the test above, the page's charts hold the server's last
    minutes from /v1/stats/history before its own polls could draw a line."""
    require_tool("chromium", "chromium")
    headless = _load_module("evssm_deploy_headless", ROOT / "deploy" / "tools" / "headless.py")
    with Load(server.ws, sessions=1, packet=256, rate=4000, max_seconds=60) as load:
        load.wait_for_events(1024)
    time.sleep(2)  # a few history samples with traffic in them
    with headless.Chromium(width=1400, height=900) as browser:
        browser.navigate(server.http + "/dashboard?window=15&interval=60000")  # one poll a minute
        browser.wait_for("window.evssmDashboard.polls >= 1", timeout=60)
        assert browser.evaluate("window.evssmDashboard.polls") == 1
        assert browser.evaluate("window.evssmDashboard.history") >= 3
        # One live sample cannot draw a line: the line on the events/s chart is the history.
        assert browser.evaluate(COUNT_PIXELS_JS % ("chart-eps", "[87, 148, 242]")) > 50, \
            "the events/s chart drew no history"
        exceptions = [line for line in browser.console if line.startswith("exception")]
        assert not exceptions, exceptions
    assert not load.errors, load.errors


def test_live_page_lists_a_streamed_sessions_answer(server):
    """The "Recent sessions" panel shows a session's top class, probability and events, from
    /v1/stats, both while it streams and after it ended."""
    require_tool("chromium", "chromium")
    headless = _load_module("evssm_deploy_headless", ROOT / "deploy" / "tools" / "headless.py")
    stream = Stream(server.ws, seed=7)
    assert stream.ok, stream.opened
    try:
        reply = {}
        for _ in range(8):
            reply = stream.send_events(256)
            assert reply.get("type") == "result", reply
        assert reply["top"], "no answer after 2,048 events"
        label, prob = reply["top"][0]
        session = stream.opened["session"]
        row = (f"(() => {{ const r = document.querySelector('#recent tr[data-session=\"{session}\"]');"
               " return r ? [...Array.from(r.cells, c => c.textContent), r.dataset.events] : null;"
               " })()")
        with headless.Chromium(width=1400, height=900) as browser:
            browser.navigate(server.http + "/dashboard?interval=500")
            cells = browser.wait_for(row, timeout=60)
            assert cells[:3] == [session, stream.opened["model"]["name"], str(label)], cells
            assert abs(float(cells[3]) - prob) < 1e-3 and cells[5].startswith("live"), cells
            assert cells[6] == str(reply["events"]) == str(8 * 256), cells
            stream.close()  # ended: the row stays, with the last answer
            ended = browser.wait_for(
                f"(() => {{ const c = {row}; return c && c[5].startsWith('ended') ? c : null; }})()",
                timeout=60)
            assert ended[2] == str(label)
            exceptions = [line for line in browser.console if line.startswith("exception")]
            assert not exceptions, exceptions
    finally:
        stream.close()


# --- Prometheus with the project's scrape config, every dashboard query --------------------------
def test_config_for(server_port: int, prometheus_port: int) -> dict[str, Any]:
    """The project's Prometheus config with only targets and intervals changed for the test."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / f) for f in config.get("rule_files", [])]
    for job in config["scrape_configs"]:
        for key in [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]:
            del job[key]
        port = server_port if job["job_name"] == "evssm" else prometheus_port
        job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    return config


test_config_for.__test__ = False  # a helper, not a test


def prometheus_query(base: str, expr: str) -> list[dict[str, Any]]:
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, body = http_get(url, timeout=10)
    reply = json.loads(body)
    assert status == 200 and reply.get("status") == "success", f"{expr}: {status} {reply}"
    return reply["data"]["result"]


def finite_values(result: list[dict[str, Any]]) -> list[float]:
    values = []
    for series in result:
        value = float(series["value"][1])
        if math.isfinite(value):
            values.append(value)
    return values


def test_prometheus_answers_every_dashboard_query(server, tmp_path):
    prometheus = require_tool("prometheus", "prometheus")
    config_test = _load_module("evssm_deploy_config_test", Path(__file__).with_name("test_deploy_config.py"))
    dashboard = json.loads(DASHBOARD.read_text())
    targets = config_test.dashboard_targets(dashboard)
    assert len(targets) >= 10

    port = free_port()
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(test_config_for(server.port, port), sort_keys=False))
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [prometheus, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
             "--log.level=warn"],
            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"prometheus exited:\n{log_path.read_text()[-3000:]}"
            with contextlib.suppress(OSError):
                if http_get(base + "/-/ready", timeout=2)[0] == 200:
                    break
            assert time.monotonic() < deadline, f"prometheus not ready:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.3)

        with Load(server.ws, sessions=2, packet=256, rate=8000, max_seconds=150) as load:
            load.wait_for_events(2048)
            # One rejected packet, so that the rejects-by-code panel has a series.
            stream = Stream(server.ws, seed=99)
            try:
                assert stream.ok, stream.opened
                reply = stream.send_events(8)
                assert reply["type"] == "result", reply
                stream.seq += 1
                bad, _ = events_frame(stream.seq, 0, 4, stream.sensor, stream.rng)
                bad["t"] = np.array([30, 20, 10, 0], "<i8").tobytes()  # decreasing
                stream.ws.send(pack(bad))
                error = recv_frame(stream.ws)
                assert error["type"] == "error" and error["code"] == "timestamps_decreasing", error
            finally:
                stream.close()

            # The scrape target is up through the project's job.
            deadline = time.monotonic() + 30
            while not finite_values(prometheus_query(base, 'up{job="evssm"} == 1')):
                assert time.monotonic() < deadline, "Prometheus never scraped the server"
                time.sleep(0.5)

            # Every query of the dashboard returns data (at least one finite sample); a realtime
            # session answers throughout, so that the lag panel has a series.
            live = Stream(server.ws, seed=98, realtime=True)
            assert live.ok, live.opened
            pending = {expr: title for title, expr in targets}
            answers: dict[str, list[float]] = {}
            deadline = time.monotonic() + 90
            while pending and time.monotonic() < deadline:
                assert "lag_ms" in live.send_events(8)
                for expr in list(pending):
                    values = finite_values(prometheus_query(
                        base, config_test.substitute_variables(expr, dashboard, rate_interval="15s")))
                    if values:
                        answers[expr] = values
                        del pending[expr]
                if pending:
                    time.sleep(1)
            assert not pending, "dashboard queries without data:\n" + "\n".join(
                f"  [{title}] {expr}" for expr, title in pending.items())
            live.close()
            assert not load.errors, load.errors

        events_per_s = next(v for e, v in answers.items() if e.startswith("sum(rate(evssm_events_total"))
        assert events_per_s[0] > 0, "events/s is zero while events stream"
        rejects = prometheus_query(base, "sum by (code) (evssm_rejected_packets_total)")
        assert {s["metric"].get("code") for s in rejects} >= {"timestamps_decreasing"}

        # The project's alert rules loaded and evaluate without errors.
        status, body = http_get(base + "/api/v1/rules")
        groups = json.loads(body)["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) >= 4 and all(r.get("health") != "err" for r in rules), rules
    finally:
        stop_process(proc)


# --- load balancer: two replicas behind HAProxy with the project's config -----------------------
def sessions_opened(srv: Server) -> float:
    status, body = http_get(srv.http + "/metrics")
    assert status == 200
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("evssm_sessions_opened_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_load_balancer_keeps_sessions_on_one_replica(server, compilation_cache, tmp_path):
    haproxy = require_tool("haproxy", "haproxy")
    second = Server(tmp_path / "replica2.log", compilation_cache)
    proc = None
    try:
        second.wait_ready()
        replicas = [server, second]
        lb_port = free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(haproxy_test_config(lb_port, [r.port for r in replicas]))
        check = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        log = open(tmp_path / "haproxy.log", "wb")
        proc = subprocess.Popen([haproxy, "-f", str(config), "-db"], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        lb = f"ws://127.0.0.1:{lb_port}/v1/stream"
        # Both replicas pass the /readyz health check before the test starts.
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "haproxy.log").read_text()
            with contextlib.suppress(OSError):
                if http_get(f"http://127.0.0.1:{lb_port}/readyz", timeout=2)[0] == 200:
                    break
            assert time.monotonic() < deadline, "HAProxy does not answer"
            time.sleep(0.3)
        time.sleep(5)  # two health-check intervals: both servers up

        # Each key's session, dropped without a close, resumes through the balancer: the key keeps
        # reaching the replica that holds the session.
        home: dict[str, int] = {}
        for i in range(8):
            key = f"sensor-{i}"
            before = [sessions_opened(r) for r in replicas]
            first = Stream(f"{lb}?session={key}", seed=i)
            assert first.ok, first.opened
            assert first.send_events(64)["type"] == "result"
            after = [sessions_opened(r) for r in replicas]
            home[key] = next(j for j in range(2) if after[j] > before[j])
            token, events = first.opened["resume"], first.opened.get("events", 0) + 64
            first.close(graceful=False)  # the connection drops; the session stays on its replica
            again = Stream(f"{lb}?session={key}", resume=token, seed=100 + i)
            try:
                assert again.ok, f"{key}: resume through the balancer failed: {again.opened}"
                assert again.opened["session"] == first.opened["session"]
                assert again.opened["events"] == events
            finally:
                again.close()
        assert set(home.values()) == {0, 1}, f"all keys hashed to one replica: {home}"

        # Without the key a resume lands wherever round robin sends it: on the other replica the
        # token is unknown. (This is what the key is for.)
        key_on_0 = next(k for k, j in home.items() if j == 0)
        key_on_1 = next(k for k, j in home.items() if j == 1)
        s = Stream(f"{lb}?session={key_on_0}", seed=7)
        token = s.opened["resume"]
        s.close(graceful=False)
        wrong = Stream(f"{lb}?session={key_on_1}", resume=token, seed=8)
        try:
            assert not wrong.ok and wrong.opened.get("code") == "unknown_session", wrong.opened
        finally:
            wrong.close()

        # A replica goes away: its keys move to the survivor, which does not know their sessions;
        # clients open new sessions there. Sessions on the survivor are untouched.
        survivor_stream = Stream(f"{lb}?session={key_on_0}", seed=9)
        lost = Stream(f"{lb}?session={key_on_1}", seed=10)
        assert survivor_stream.ok and lost.ok
        lost_token = lost.opened["resume"]
        assert lost.send_events(64)["type"] == "result"
        second.stop()
        with contextlib.suppress(Exception):
            lost.ws.recv(timeout=10)  # the drain closes the connection
        lost.close(graceful=False)
        deadline = time.monotonic() + 20
        while True:
            retry = Stream(f"{lb}?session={key_on_1}", resume=lost_token, seed=11)
            try:
                if retry.opened.get("code") == "unknown_session":
                    break  # the balancer sent the key to the survivor
            finally:
                retry.close()
            assert time.monotonic() < deadline, f"resume after the replica stopped: {retry.opened}"
            time.sleep(1)
        fresh = Stream(f"{lb}?session={key_on_1}", seed=12)
        try:
            assert fresh.ok and fresh.opened["events"] == 0
            assert fresh.send_events(64)["type"] == "result"
        finally:
            fresh.close()
        assert survivor_stream.send_events(64)["type"] == "result"
        survivor_stream.close()
    finally:
        if proc is not None:
            stop_process(proc)
        second.stop()
