"""Authentication, origins, per-client caps and connection limits of a real ``evssm serve``.

Every check goes over real sockets to a server process started by the command line, so the
options, uvicorn's settings and the log redaction are the ones an operator gets.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import pytest
import websockets
from numeric import assert_close
from test_server_limits import SERVE, Server, evssm_serve
from websockets.asyncio.client import connect

KEY_A = "alpha-" + "a1" * 12
KEY_B = "beta-" + "b2" * 12
TOKEN_LEAK = "leaky-" + "c3" * 12  # a third key, only ever sent as ?access_token=...


@pytest.fixture(scope="module")
def keyed(tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("keyed")
    keys = tmp / "keys"
    keys.write_text(f"# evssm API keys\n{KEY_A}\n\n{KEY_B}\n{TOKEN_LEAK}\n")
    keys.chmod(0o600)
    args = [a if a != "warning" else "info" for a in SERVE] + [
        "--model", "mnist=default", "--api-keys", str(keys), "--allowed-origins", "https://app.example",
        "--max-sessions", "8", "--max-sessions-per-client", "2", "--header-timeout", "1",
        "--max-connections", "40", "--access-log"]  # the access log must not show keys either
    with evssm_serve(tmp, *args) as s:
        yield s


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def recv(ws: Any, timeout: float = 30.0) -> dict[str, Any]:
    data = await asyncio.wait_for(ws.recv(), timeout)
    return json.loads(data) if isinstance(data, str) else msgpack.unpackb(data)


async def request(ws: Any, msg: dict[str, Any]) -> dict[str, Any]:
    await ws.send(msgpack.packb(msg))
    return await recv(ws)


async def closed_with(ws: Any) -> int:
    with pytest.raises(websockets.ConnectionClosed) as info:
        await recv(ws, 10)
    assert info.value.rcvd is not None
    return info.value.rcvd.code


# --- HTTP ----------------------------------------------------------------------------------------
def test_http_needs_a_key_except_probes_and_metrics(keyed):
    h = keyed.http
    body = {"streams": [{"t": [1, 2, 3], "x": [4, 5, 6]}], "model": "tiny"}
    for headers in ({}, auth("wrong-" + KEY_A), {"Authorization": KEY_A}, {"Authorization": f"Basic {KEY_A}"}):
        r = httpx.get(f"{h}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = httpx.post(f"{h}/v1/classify", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert httpx.get(f"{h}/no/such/route").status_code == 401  # routes are not revealed either
    for key in (KEY_A, KEY_B):
        assert httpx.get(f"{h}/v1/models", headers=auth(key)).status_code == 200
        r = httpx.post(f"{h}/v1/classify", json=body, headers=auth(key))
        assert r.status_code == 200 and r.json()["results"][0]["events"] == 3
    for path in ("/healthz", "/readyz", "/metrics", "/v1/stats"):
        assert httpx.get(f"{h}{path}").status_code == 200, path
    assert 'evssm_http_requests_total{route="/v1/models",status="401"}' in httpx.get(f"{h}/metrics").text


def test_no_file_paths_in_public_answers(keyed):
    r = httpx.get(f"{keyed.http}/v1/models", headers=auth(KEY_A))
    text = r.text
    models = {m["name"]: m for m in r.json()["models"]}
    assert models["mnist"]["trained"] is True and models["mnist"]["source"] == "checkpoint"
    assert models["tiny"]["source"].startswith("random-init")
    assert os.getcwd() not in text and "pretrained" not in text and "/" not in json.dumps(
        [m.get("source") for m in models.values()])

    async def run() -> dict:
        async with connect(f"ws://127.0.0.1:{keyed.port}/v1/stream", additional_headers=auth(KEY_A)) as ws:
            opened = await request(ws, {"type": "open", "model": "mnist"})
            await request(ws, {"type": "close"})
            return opened

    opened = asyncio.run(run())
    assert opened["type"] == "opened" and opened["model"]["source"] == "checkpoint"
    assert "pretrained" not in json.dumps(opened)


# --- WebSocket -----------------------------------------------------------------------------------
def test_websocket_key_by_header_or_query_and_1008_before_any_work(keyed):
    url = f"ws://127.0.0.1:{keyed.port}/v1/stream"

    async def run() -> None:
        for kwargs in ({}, {"additional_headers": auth("nope-" + KEY_A)}, {"url": url + "?access_token=nope"}):
            async with connect(kwargs.pop("url", url), **kwargs) as ws:
                assert await closed_with(ws) == 1008
        async with connect(url, additional_headers=auth(KEY_A)) as ws:
            assert (await request(ws, {"type": "open", "model": "tiny"}))["type"] == "opened"
            assert (await request(ws, {"type": "close"}))["type"] == "closed"
        async with connect(f"{url}?session=s1&access_token={TOKEN_LEAK}") as ws:
            opened = await request(ws, {"type": "open", "model": "tiny"})
            assert opened["type"] == "opened"
            r = await request(ws, {"type": "events", "seq": 0, "t": [1, 2], "x": [3, 4]})
            assert r["type"] == "result" and r["events"] == 2
            assert (await request(ws, {"type": "close"}))["type"] == "closed"

    asyncio.run(run())
    metrics = httpx.get(f"{keyed.http}/metrics").text
    assert 'evssm_rejected_packets_total{code="unauthorized"} 3.0' in metrics
    log = keyed.log.read_text(errors="replace")
    assert "access_token=***" in log  # uvicorn logged the path, without the key
    for key in (KEY_A, KEY_B, TOKEN_LEAK):
        assert key not in log


def test_resume_token_works_only_for_the_key_that_opened_the_session(keyed):
    url = f"ws://127.0.0.1:{keyed.port}/v1/stream"

    async def run() -> None:
        ws = await connect(url, additional_headers=auth(KEY_A))
        opened = await request(ws, {"type": "open", "model": "tiny"})
        await request(ws, {"type": "events", "seq": 0, "t": [10, 20], "x": [1, 2]})
        await ws.close()
        async with connect(url, additional_headers=auth(KEY_B)) as other:
            err = await request(other, {"type": "open", "resume": opened["resume"]})
            assert err["type"] == "error" and err["code"] == "unknown_session"
        async with connect(url, additional_headers=auth(KEY_A)) as again:
            resumed = await request(again, {"type": "open", "resume": opened["resume"]})
            assert resumed["type"] == "opened" and resumed["resumed"] and resumed["events"] == 2
            assert (await request(again, {"type": "close"}))["type"] == "closed"

    asyncio.run(run())


def test_browser_origins(keyed):
    url = f"ws://127.0.0.1:{keyed.port}/v1/stream"

    async def attempt(origin: str) -> bool:
        async with connect(url, origin=origin, additional_headers=auth(KEY_A)) as ws:
            try:
                reply = await request(ws, {"type": "open", "model": "tiny"})
            except websockets.ConnectionClosed as e:
                assert e.rcvd is not None and e.rcvd.code == 1008 and "origin" in e.rcvd.reason
                return False
            await request(ws, {"type": "close"})
            return reply["type"] == "opened"

    async def run() -> None:
        assert await attempt(f"http://127.0.0.1:{keyed.port}")  # the server's own pages
        assert await attempt("https://app.example")  # listed
        assert not await attempt("https://evil.example")
        assert not await attempt(f"http://127.0.0.1:{keyed.port + 1}")
        assert not await attempt("null")

    asyncio.run(run())


def test_per_key_session_cap(keyed):
    url = f"ws://127.0.0.1:{keyed.port}/v1/stream"

    async def run() -> None:
        held = []
        for _ in range(2):  # opened and dropped: they linger for a resume, and still count
            ws = await connect(url, additional_headers=auth(KEY_A))
            assert (await request(ws, {"type": "open", "model": "tiny"}))["type"] == "opened"
            held.append(ws)
        async with connect(url, additional_headers=auth(KEY_A)) as ws:
            err = await request(ws, {"type": "open", "model": "tiny"})
            assert err["type"] == "error" and err["code"] == "too_many_sessions"
            assert await closed_with(ws) == 1013
        async with connect(url, additional_headers=auth(KEY_B)) as ws:  # other keys are not locked out
            assert (await request(ws, {"type": "open", "model": "tiny"}))["type"] == "opened"
            await request(ws, {"type": "close"})
        for ws in held:
            await request(ws, {"type": "close"})
            await ws.close()

    asyncio.run(run())


def test_without_keys_the_cap_is_per_client_address(tmp_path):
    """Old server: one client that opened and dropped --max-sessions sessions locked everyone out
    for the idle timeout. Now one address holds at most a quarter (default) of them."""
    with evssm_serve(tmp_path, *SERVE, "--max-sessions", "40") as server:
        url = f"ws://127.0.0.1:{server.port}/v1/stream"

        async def run() -> None:
            opened = 0
            for _ in range(12):
                ws = await connect(url)
                reply = await request(ws, {"type": "open"})
                opened += reply["type"] == "opened"
                await ws.close()  # dropped without close: the session lingers
            assert opened == 10
            async with connect(url, local_addr=("127.0.0.2", 0)) as ws:  # another client
                assert (await request(ws, {"type": "open"}))["type"] == "opened"

        asyncio.run(run())


def test_metrics_can_require_a_key(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(KEY_A + "\n")
    with evssm_serve(tmp_path, *SERVE, "--api-keys", str(keys), "--public-metrics", "false") as server:
        for path in ("/metrics", "/v1/stats", "/dashboard"):
            assert httpx.get(f"{server.http}{path}").status_code == 401, path
            assert httpx.get(f"{server.http}{path}", headers=auth(KEY_A)).status_code in (200, 404), path
        assert httpx.get(f"{server.http}/healthz").status_code == 200
        assert httpx.get(f"{server.http}/readyz").status_code == 200


def test_bad_key_files_stop_the_server_at_start(tmp_path):
    import subprocess
    import sys

    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    for path, message in ((empty, "holds no key"), (tmp_path / "missing", "cannot read")):
        out = subprocess.run([sys.executable, "-m", "evssm.cli", "serve", "--api-keys", str(path)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and message in out.stderr, out.stderr


# --- connections ---------------------------------------------------------------------------------
def test_partial_headers_are_dropped_after_the_header_timeout(keyed):
    """Old server: sockets that never finish their request headers were kept for ever (1,000 of
    them held 1,000 descriptors). Now each is closed after --header-timeout (1 s here), and
    --max-connections (40 here) does not stop the server from taking and dropping them."""
    import resource

    count = min(1000, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200)  # the 1,000
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", keyed.port), timeout=10)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    time.sleep(0.5)
    for s in socks[:200]:  # a byte now and then does not extend the deadline
        s.sendall(b"a")
    deadline = time.monotonic() + 15
    for s in socks:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            data = s.recv(1024)  # a socket still open times out here and fails the test
        except ConnectionResetError:
            data = b""
        assert data == b"", data[:100]
        s.close()
    assert time.monotonic() < deadline
    # An unfinished header block beyond h11's limit (16 KiB) is refused at once, not buffered.
    s = socket.create_connection(("127.0.0.1", keyed.port), timeout=10)
    t0 = time.monotonic()
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 << 10))
        answer = s.recv(1024)
    except ConnectionError:
        answer = b""
    s.close()
    assert answer.startswith(b"HTTP/1.1 4") or answer == b"", answer[:100]
    assert time.monotonic() - t0 < 0.9  # before the header timeout
    assert httpx.get(f"{keyed.http}/healthz").status_code == 200


def test_connection_limit(keyed):
    """--max-connections 40: idle sockets count; past the limit HTTP gets 503 (the probes still
    answer) and a WebSocket is closed with 1013; the header timeout frees the idle ones."""
    idle = [socket.create_connection(("127.0.0.1", keyed.port), timeout=10) for _ in range(40)]
    time.sleep(0.2)
    try:
        assert httpx.get(f"{keyed.http}/v1/models", headers=auth(KEY_A)).status_code == 503
        assert httpx.get(f"{keyed.http}/healthz").status_code == 200
    finally:
        for s in idle:
            s.close()
    time.sleep(0.5)
    assert httpx.get(f"{keyed.http}/v1/models", headers=auth(KEY_A)).status_code == 200

    async def run() -> None:
        url = f"ws://127.0.0.1:{keyed.port}/v1/stream"
        held = [await connect(url, additional_headers=auth(KEY_A)) for _ in range(40)]
        try:
            async with connect(url, additional_headers=auth(KEY_A)) as ws:
                assert await closed_with(ws) == 1013
        finally:
            for ws in held:
                await ws.close()

    asyncio.run(run())


def test_the_client_library_sends_the_key(keyed, monkeypatch):
    import numpy as np

    from evssm.client import AsyncStreamSession, Unauthorized, classify, list_models
    from evssm.models.events import Recording

    url = f"ws://127.0.0.1:{keyed.port}"
    rec = Recording(t=np.arange(0, 6400, 100, dtype=np.int64), x=np.arange(64, dtype=np.int64) % 700)
    monkeypatch.delenv("EVSSM_API_KEY", raising=False)
    with pytest.raises(Unauthorized):
        list_models(keyed.http)
    (offline,) = classify(keyed.http, [rec], model="tiny", api_key=KEY_A)

    async def run(**kwargs: Any) -> Any:
        async with AsyncStreamSession(url, model="tiny", reconnect=False, **kwargs) as s:
            await s.send(rec)
            return await s.recv()

    with pytest.raises(Unauthorized):
        asyncio.run(run())
    streamed = asyncio.run(run(api_key=KEY_B))
    assert_close(streamed.probs, offline.probs, rtol=1e-4, atol=1e-6)
    monkeypatch.setenv("EVSSM_API_KEY", KEY_A)  # the variable is the default
    assert [m.name for m in list_models(keyed.http)] == ["tiny", "mnist"]
    assert asyncio.run(run()).events == 64


def test_smaller_holes_over_the_wire(keyed):
    """``t = [2**63 - 1, -2]`` (the int64 gap wrapped: the clock went back), ``x = [1, true]``
    (read as 1) and ``"model": []`` / ``""`` (read as the default model) were all accepted."""
    big = 2 ** 63 - 1
    h, headers = keyed.http, auth(KEY_A)
    ok = {"t": [5, 6], "x": [1, 2]}
    for body, status, code in (({"model": [], "streams": [ok]}, 400, "invalid_field"),
                               ({"model": "", "streams": [ok]}, 404, "unknown_model"),
                               ({"model": "tiny", "streams": [{"t": [big, -2], "x": [1, 1]}]}, 400,
                                "timestamps_decreasing"),
                               ({"model": "tiny", "streams": [{"t": [1, 2], "x": [1, True]}]}, 400,
                                "invalid_column")):
        r = httpx.post(f"{h}/v1/classify", json=body, headers=headers)
        assert r.status_code == status and r.json()["error"] == code, (body, r.text)

    async def run() -> dict:
        async with connect(f"ws://127.0.0.1:{keyed.port}/v1/stream", additional_headers=headers) as ws:
            assert (await request(ws, {"type": "open", "model": ""}))["code"] == "unknown_model"
            assert (await request(ws, {"type": "open", "model": "tiny"}))["type"] == "opened"
            for seq, t, x, code in ((1, [big, -2], [1, 1], "timestamps_decreasing"),
                                    (2, [1, 2], [1, True], "invalid_column")):
                err = await request(ws, {"type": "events", "seq": seq, "t": t, "x": x})
                assert err["type"] == "error" and err["code"] == code and err["seq"] == seq, err
            accepted = await request(ws, {"type": "events", "seq": 3, "t": [big - 1, big], "x": [7, 8]})
            assert accepted["events"] == 2
            err = await request(ws, {"type": "events", "seq": 4, "t": [-2], "x": [1]})  # across packets
            assert err["code"] == "timestamps_decreasing"
            last = await request(ws, {"type": "events", "seq": 5, "t": [big] * 62, "x": [9] * 62})
            await request(ws, {"type": "close"})
            return last

    last = asyncio.run(run())
    assert last["events"] == 64 and last["t"] == big
    (want,) = httpx.post(f"{h}/v1/classify", headers=headers, json={
        "model": "tiny", "streams": [{"t": [big - 1] + [big] * 63, "x": [7, 8] + [9] * 62}]}).json()["results"]
    assert last["probs"] is not None
    assert max(abs(a - b) for a, b in zip(last["probs"], want["probs"], strict=True)) < 1e-5
