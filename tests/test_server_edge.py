"""The server's edge against the attacks of an ordinary client on loopback, over real sockets to a
real ``evssm serve``: compressed frames that inflate a thousandfold, connections that fill the limit
and never finish (slowloris), keys in debug logs, spoofed ``X-Forwarded-For``, and cross-site form
posts to ``/v1/classify``. Each test fails on a server without the matching defence.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
import websockets
from conftest import key_file
from test_server_limits import SERVE, Server, evssm_serve, ws_handshake
from websockets.asyncio.client import connect

KEY = "edge-" + "d4" * 12
LEAK = "query-" + "e5" * 12  # sent only as ?access_token=...
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"


@pytest.fixture(scope="module")
def edge(tmp_path_factory) -> Iterator[Server]:
    """Defaults, except a small connection limit, a long header deadline (so half-sent heads stay)
    and a short open deadline. 40 sessions: 10 per client address."""
    with evssm_serve(tmp_path_factory.mktemp("edge"), *SERVE, "--max-connections", "30",
                     "--header-timeout", "60", "--open-timeout", "2", "--max-sessions", "40") as s:
        yield s


@pytest.fixture(scope="module")
def opened_up(tmp_path_factory) -> Iterator[Server]:
    """The opt-ins: compression, a trusted proxy on loopback; API keys, a debug log and the
    access log (which names the forwarded address)."""
    tmp = tmp_path_factory.mktemp("opened-up")
    args = [a for a in SERVE if a not in ("--log-level", "warning")]
    with evssm_serve(tmp, *args, "--log-level", "debug", "--api-keys", str(key_file(tmp, KEY, LEAK)),
                     "--ws-compression", "true", "--forwarded-allow-ips", "127.0.0.0/8", "--max-sessions", "40",
                     "--access-log") as s:
        yield s


def read_close(sock: socket.socket, timeout: float) -> tuple[int, str]:
    """(code, reason) of the close frame the server sends on a raw WebSocket (server frames are not
    masked; anything before the close is skipped)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        while len(data) < 2 or len(data) < 2 + (data[1] & 0x7F):
            chunk = sock.recv(4096)
            if not chunk:
                raise AssertionError(f"closed without a close frame after {data[:40]!r}")
            data += chunk
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        assert length < 126, "the test expects short control frames"
        payload, data = data[2:2 + length], data[2 + length:]
        if opcode == 0x8:
            (code,) = struct.unpack("!H", payload[:2])
            return code, payload[2:].decode()


async def recv(ws: Any, timeout: float = 30.0) -> dict[str, Any]:
    return msgpack.unpackb(await asyncio.wait_for(ws.recv(), timeout))


async def request(ws: Any, msg: dict[str, Any]) -> dict[str, Any]:
    await ws.send(msgpack.packb(msg))
    return await recv(ws)


# --- permessage-deflate ----------------------------------------------------------------------------
def test_websocket_compression_is_off_by_default(edge):
    """Old server: uvicorn accepted permessage-deflate, so 3 KB on the wire inflated to 3.2 MB of
    decoding on the event loop per message; 4 such clients stalled every session and /healthz."""
    sock = ws_handshake(edge.port, headers={"Sec-WebSocket-Extensions": DEFLATE_OFFER})
    sock.close()

    async def run() -> str | None:
        async with connect(f"ws://127.0.0.1:{edge.port}/v1/stream", compression="deflate") as ws:
            assert (await request(ws, {"type": "open"}))["type"] == "opened"
            assert (await request(ws, {"type": "close"}))["type"] == "closed"
            return ws.response.headers.get("Sec-WebSocket-Extensions")

    assert asyncio.run(run()) is None


def test_compression_when_enabled_is_bounded_by_the_frame_limit(opened_up):
    """--ws-compression true negotiates it; a message that inflates past the frame limit
    (--max-packet-events 4096: 256 KiB) is refused with 1009 however small it was on the wire."""
    url = f"ws://127.0.0.1:{opened_up.port}/v1/stream?access_token={LEAK}"

    async def run() -> None:
        async with connect(url, compression="deflate") as ws:
            assert "permessage-deflate" in ws.response.headers.get("Sec-WebSocket-Extensions", "")
            assert (await request(ws, {"type": "open"}))["type"] == "opened"
            t = np.arange(0, 64_000, 1000)
            reply = await request(ws, {"type": "events", "seq": 0, "t": t.tolist(), "x": [3] * 64})
            assert reply["type"] == "result" and reply["events"] == 64
            await ws.send(bytes(300_000))  # a few hundred bytes once compressed
            with pytest.raises(websockets.ConnectionClosed) as info:
                await recv(ws, 30)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009

    asyncio.run(run())
    assert httpx.get(f"{opened_up.http}/healthz").status_code == 200


# --- slowloris -------------------------------------------------------------------------------------
def test_probes_answer_while_half_sent_heads_fill_the_connection_limit(edge):
    """Old server: 40 request heads that never finish (--max-connections 30) made /healthz answer
    503, so a liveness probe restarted a server that was fine. Probes are exempt from the limit;
    other requests still get 503 (busy, Retry-After)."""
    socks = []
    try:
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", edge.port), timeout=10)
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(s)
        time.sleep(0.3)
        for path in ("/healthz", "/readyz"):
            r = httpx.get(f"{edge.http}{path}", timeout=10)
            assert r.status_code == 200, (path, r.text)
        r = httpx.get(f"{edge.http}/v1/models", timeout=10)
        assert r.status_code == 503 and r.json()["error"] == "busy" and r.headers["retry-after"] == "1"
    finally:
        for s in socks:
            s.close()
    time.sleep(0.3)
    assert httpx.get(f"{edge.http}/v1/models", timeout=10).status_code == 200


def test_idle_websocket_upgrades_are_closed_after_the_open_deadline(edge):
    """Old server: an upgraded WebSocket that never sent ``open`` was kept for ever, so ~1,000 of
    them filled --max-connections. Now each is closed with 1008 after --open-timeout (2 s here),
    while probes answer; a client that opens in time keeps its connection."""

    async def opener() -> dict[str, Any]:
        async with connect(f"ws://127.0.0.1:{edge.port}/v1/stream") as ws:
            assert (await request(ws, {"type": "open"}))["type"] == "opened"
            await asyncio.sleep(3.5)  # past the deadline
            t = np.arange(0, 64_000, 1000)
            reply = await request(ws, {"type": "events", "seq": 0, "t": t.tolist(), "x": [5] * 64})
            assert (await request(ws, {"type": "close"}))["type"] == "closed"
            return reply

    t0 = time.monotonic()
    idle = [ws_handshake(edge.port) for _ in range(25)]
    try:
        assert httpx.get(f"{edge.http}/healthz", timeout=10).status_code == 200
        kept = asyncio.run(opener())
        assert kept["type"] == "result" and kept["events"] == 64
        for s in idle:
            code, reason = read_close(s, 20)
            assert code == 1008 and "open" in reason, (code, reason)
        assert time.monotonic() - t0 >= 2.0
    finally:
        for s in idle:
            s.close()


# --- secrets in logs -------------------------------------------------------------------------------
def test_authorization_is_redacted_in_a_debug_log(opened_up):
    """Old server: --log-level debug wrote ``authorization: Bearer KEY`` (the websockets handshake
    logs every header); only ``access_token=`` was redacted."""
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{opened_up.http}/v1/models", headers=headers).status_code == 200

    async def run() -> None:
        for url, extra in ((f"ws://127.0.0.1:{opened_up.port}/v1/stream", headers),
                           (f"ws://127.0.0.1:{opened_up.port}/v1/stream?access_token={LEAK}", {})):
            async with connect(url, additional_headers=extra) as ws:
                assert (await request(ws, {"type": "open"}))["type"] == "opened"
                assert (await request(ws, {"type": "close"}))["type"] == "closed"

    asyncio.run(run())
    time.sleep(0.3)
    log = opened_up.log.read_text(errors="replace")
    assert "Bearer ***" in log and "access_token=***" in log  # the headers were logged, redacted
    assert KEY not in log and LEAK not in log


# --- forwarded headers -----------------------------------------------------------------------------
def _open_with_forwarded_for(port: int, count: int) -> int:
    """Sessions opened by ``count`` connections from 127.0.0.1 (the other tests close theirs),
    each claiming another address in X-Forwarded-For; every connection is dropped without close
    (its session lingers)."""

    async def run() -> int:
        opened = 0
        for i in range(count):
            ws = await connect(f"ws://127.0.0.1:{port}/v1/stream",
                               additional_headers={"X-Forwarded-For": f"203.0.113.{i + 1}"})
            try:
                reply = await request(ws, {"type": "open"})
            except websockets.ConnectionClosed:
                reply = {}
            opened += reply.get("type") == "opened"
            await ws.close()
        return opened

    return asyncio.run(run())


def test_spoofed_forwarded_for_does_not_buy_more_sessions(edge):
    """Old server: uvicorn trusted X-Forwarded-For from 127.0.0.1, so one local client opened a
    session under each of 64 made-up addresses and filled the server. Without
    --forwarded-allow-ips the socket's address is the client: 10 sessions (40 / 4), not 12."""
    assert _open_with_forwarded_for(edge.port, 12) == 10


def test_forwarded_for_is_trusted_from_a_listed_proxy(opened_up):
    """--forwarded-allow-ips 127.0.0.0/8: a proxy there speaks for its clients; the access log
    (at debug level) names the forwarded address, not the proxy's."""
    r = httpx.get(f"{opened_up.http}/healthz", headers={"X-Forwarded-For": "203.0.113.77"})
    assert r.status_code == 200
    time.sleep(0.3)
    assert '203.0.113.77:0 - "GET /healthz' in opened_up.log.read_text(errors="replace")


# --- cross-site form posts -------------------------------------------------------------------------
def test_classify_needs_a_json_or_msgpack_content_type(edge):
    """Old server: a body without a content type was read as JSON, so a web page could make its
    visitor's browser start work on a server without keys (forms send no JSON type)."""
    body = b'{"streams": [{"t": [1, 2, 3], "x": [4, 5, 6]}]}'
    url = f"{edge.http}/v1/classify"
    for ctype in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        r = httpx.post(url, content=body, headers={} if ctype is None else {"content-type": ctype})
        assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type", (ctype, r.text)
        assert "application/json" in r.json()["message"]
    r = httpx.post(url, content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200 and r.json()["results"][0]["events"] == 3

    from evssm.client import classify
    from evssm.models.events import Recording

    (result,) = classify(edge.http, [Recording(t=np.arange(3, dtype=np.int64), x=np.arange(3, dtype=np.int64))])
    assert result.events == 3  # the client library declares its msgpack body
