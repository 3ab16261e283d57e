"""Limits a hostile or careless client runs into, on a real ``evssm serve`` process.

Memory is measured as the server process's resident set (``/proc/PID/status``) while raw-socket
clients that never read flood it; stalls as ``/healthz`` latency while big requests are decoded.
One server (``config:tiny``, small buckets) serves the module.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
from conftest import free_port, stop_process, wait_process_ready
from numeric import assert_close

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")

CHANNELS = 700
SERVE = ["--model", "tiny=config:tiny", "--batch-buckets", "1,8", "--length-buckets", "256",
         "--classify-length-buckets", "1024", "--classify-batch-events", "8192", "--max-packet-events", "4096",
         "--max-inflight", "16", "--log-level", "warning"]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.http = f"http://127.0.0.1:{port}"

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def evssm_serve(tmp: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    port = free_port()
    log = tmp / f"serve-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "evssm.cli", "serve", "--port", str(port), *args],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        wait_process_ready(proc, f"http://127.0.0.1:{port}", log, 240)
        yield Server(proc, port, log)
    finally:
        stop_process(proc, 30)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    with evssm_serve(tmp_path_factory.mktemp("limits"), *SERVE) as s:
        yield s


# --- a WebSocket client on a raw socket: it sends what it likes and never reads ------------------
def ws_handshake(port: int, path: str = "/v1/stream", headers: dict[str, str] | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"{extra}\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head[:200]
    return sock


def ws_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """One masked client frame (mask key 0: the payload goes as is)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + b"\x00\x00\x00\x00" + payload


def flood(sock: socket.socket, data: bytes, budget: int, stall_s: float = 3.0, limit_s: float = 60.0) -> int:
    """Send ``data`` repeatedly up to ``budget`` bytes, never reading; stop when the server has
    not taken a byte for ``stall_s`` (it stopped reading). Returns the bytes sent."""
    sock.setblocking(False)
    view = memoryview(data)
    sent, pos = 0, 0
    last = deadline = time.monotonic()
    deadline += limit_s
    while sent < budget and time.monotonic() < deadline:
        _, writable, _ = select.select([], [sock], [], 0.2)
        if not writable:
            if time.monotonic() - last > stall_s:
                break
            continue
        try:
            k = sock.send(view[pos:pos + (1 << 20)])
        except BlockingIOError:
            continue
        except ConnectionError:
            break
        sent += k
        pos = (pos + k) % len(data)
        last = time.monotonic()
    return sent


def read_response(sock: socket.socket, head: bytes = b"") -> tuple[bytes, bytes]:
    """(head, body) of one HTTP response: the head up to the blank line, then Content-Length bytes."""
    sock.setblocking(True)
    sock.settimeout(10)
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        if not chunk:
            break
        head += chunk
    head, _, body = head.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head, body


class HealthProbe:
    """Polls ``/healthz`` from a thread; ``worst`` is the slowest answer seen."""

    def __init__(self, base: str):
        self.base, self.worst, self.count = base, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                assert client.get(f"{self.base}/healthz").status_code == 200
                self.worst = max(self.worst, time.perf_counter() - t0)
                self.count += 1
                time.sleep(0.02)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def settle_rss(server: Server) -> float:
    time.sleep(0.5)
    return server.rss_mb()


# --- memory: a client that never reads --------------------------------------------------------
@pytest.mark.slow
def test_bad_frames_from_a_client_that_never_reads_cannot_grow_the_server(server):
    """Old server: every error reply queued without bound, and each repeated the bad value (a
    1 MiB ``type`` became a ~4 MiB reply). Now replies are bounded per connection and short, and
    a frame larger than the largest valid packet closes the connection (1009) unread."""
    big = ws_frame(msgpack.packb({"type": "x" * (200 << 10)}))  # under the frame limit (~256 KiB)
    tiny = ws_frame(b"\xc1" * 7)  # 7 bytes of invalid msgpack, 13 on the wire
    base = settle_rss(server)
    growth: dict[str, float] = {}
    taken: dict[str, int] = {}
    with HealthProbe(server.http) as probe:
        for name, frame, budget in (("200KiB-type", big, 256 << 20), ("7-byte", tiny * 4096, 23 << 20)):
            sock = ws_handshake(server.port)
            sent = flood(sock, frame, budget)
            growth[name] = round(server.rss_mb() - base, 1)
            taken[name] = sent
            if name == "7-byte":  # the server stopped reading: TCP pushed back long before 23 MiB
                assert sent < budget, f"the server read all {sent} bytes of 7-byte frames"
            sock.close()
    print(f"\nRSS growth while flooded (MB): {growth}; bytes taken: {taken}; worst /healthz {probe.worst:.3f} s")
    assert max(growth.values()) < 80, growth
    assert probe.count > 10 and probe.worst < 0.5, (probe.worst, probe.count)
    # Over the frame limit: closed with 1009 (message too big), nothing buffered.
    sock = ws_handshake(server.port)
    sock.sendall(ws_frame(msgpack.packb({"type": "x" * (1 << 20)}))[:1 << 16])
    sock.settimeout(10)
    close = sock.recv(64)
    assert close[0] == 0x88 and struct.unpack("!H", close[2:4])[0] == 1009, close
    sock.close()
    assert server.proc.poll() is None


@pytest.mark.slow
def test_resets_from_a_client_that_never_reads_are_bounded(server):
    sock = ws_handshake(server.port)
    sock.sendall(ws_frame(msgpack.packb({"type": "open", "model": "tiny"})))
    base = settle_rss(server)
    sent = flood(sock, ws_frame(msgpack.packb({"type": "reset"})) * 4096, 40 << 20)
    grown = server.rss_mb() - base
    sock.close()
    print(f"\nresets: {sent} bytes taken, RSS growth {grown:.1f} MB")
    assert sent < 40 << 20, "the server kept reading resets it could not answer"
    assert grown < 64, grown
    time.sleep(1.0)
    assert server.rss_mb() - base < 64
    assert httpx.get(f"{server.http}/readyz").status_code == 200


# --- stalls: big requests are decoded off the event loop --------------------------------------
def recording(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.integers(0, 50, n)).tolist(), rng.integers(0, CHANNELS, n).tolist()


@pytest.mark.slow
def test_a_big_json_classify_does_not_stall_other_requests(server):
    """Old server: ``json.loads`` of the body on the event loop (1.6 s for 4 M events). Now bodies
    are parsed in worker processes: ``/healthz`` keeps answering while the body is parsed."""
    t, x = recording(2_000_000)
    body = json.dumps({"streams": [{"t": t, "x": x}]}).encode()
    small = {"streams": [{"t": t[:5000], "x": x[:5000]}]}
    with HealthProbe(server.http) as probe:
        r = httpx.post(f"{server.http}/v1/classify", content=body, timeout=300,
                       headers={"content-type": "application/json"})
        time.sleep(0.1)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["results"][0]["events"] == 2_000_000
    assert probe.count > 5 and probe.worst < 0.3, (probe.worst, probe.count)
    # The result is the same as the one of a small body parsed inline (both paths agree).
    head = httpx.post(f"{server.http}/v1/classify", json=small, timeout=60).json()["results"][0]
    worker = httpx.post(f"{server.http}/v1/classify", timeout=60, content=json.dumps(
        {"streams": [{"t": t[:5000], "x": x[:5000]}] * 40}).encode(),
        headers={"content-type": "application/json"}).json()["results"]
    assert len(worker) == 40
    for w in worker:
        assert_close(w["probs"], head["probs"], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def strict(tmp_path_factory) -> Iterator[Server]:
    """Small classify limits: bodies up to 20,000 * 96 + 1 MiB ~ 2.9 MiB, one request at a time."""
    with evssm_serve(tmp_path_factory.mktemp("strict"), *SERVE, "--max-classify-events", "20000",
                     "--max-classify-requests", "1", "--body-timeout", "2") as s:
        yield s


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(strict):
    """Old server: the whole body was buffered before its 413. Now the 413 comes as soon as the
    limit is crossed, and the server never holds more than the limit."""
    server = strict
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                 "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    chunk = b"%x\r\n%s\r\n" % (1 << 16, b" " * (1 << 16))
    sent, answer = 0, b""
    sock.setblocking(False)
    while sent < 200 << 20 and b"\r\n\r\n" not in answer:
        readable, writable, _ = select.select([sock], [sock], [], 5)
        if readable:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        elif writable:
            with contextlib.suppress(BlockingIOError, ConnectionError):
                sent += sock.send(chunk)
        else:
            break
    head, body = b"", b""
    with contextlib.suppress(OSError):
        head, body = read_response(sock, answer)
    sock.close()
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert json.loads(body)["error"] == "request_too_large"
    assert sent < 20 << 20, f"sent {sent} bytes before the 413"
    # A declared Content-Length over the limit is refused before any body byte.
    r = httpx.post(f"{server.http}/v1/classify", content=b" " * (4 << 20),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "request_too_large"
    assert httpx.get(f"{server.http}/healthz").status_code == 200


def test_concurrent_classify_requests_beyond_the_limit_get_503_with_retry_after(strict):
    """A slow body holds a classify slot; past --max-classify-requests the answer is 503 with
    Retry-After (before any body is read), and the slot frees when the request ends."""
    server = strict
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode())
    time.sleep(0.3)
    ok = {"streams": [{"t": [1, 2], "x": [3, 4]}]}
    r = httpx.post(f"{server.http}/v1/classify", json=ok)
    assert r.status_code == 503 and r.json()["error"] == "busy", r.text
    assert r.headers["retry-after"] == "1"
    # The slow body times out (408) and frees the slot.
    head, body = read_response(sock)
    sock.close()
    assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"] == "request_timeout", head[:200]
    r = httpx.post(f"{server.http}/v1/classify", json=ok)
    assert r.status_code == 200 and len(r.json()["results"]) == 1


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_server_leaves_no_decode_worker_behind(tmp_path):
    """The decode workers (and their fork server) block on a queue whose write end they hold:
    after SIGKILL of the server they used to live forever. They now exit with it."""
    with evssm_serve(tmp_path, *SERVE) as s:
        t, x = recording(40_000)
        body = json.dumps({"streams": [{"t": t, "x": x}]}).encode()
        assert len(body) > 256 << 10  # parsed in a worker process
        r = httpx.post(f"{s.http}/v1/classify", content=body, timeout=120,
                       headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text[:300]
        workers = _children(s.proc.pid)
        assert workers, "no decode worker was started"
        s.proc.kill()
        s.proc.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_running(w) for w in workers):
            time.sleep(0.1)
        assert not [w for w in workers if _running(w)], "decode workers outlived the server"
