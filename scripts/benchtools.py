"""What the benchmark scripts share: a free loopback port and waiting for a server's /readyz."""

from __future__ import annotations

import json
import socket
import time
import urllib.request


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 900, poll_s: float = 0.5) -> float:
    """Seconds until ``url + "/readyz"`` answers 200 (streams are served); returns once every
    model's classify shapes are compiled too, so that no compilation runs beside a measurement.
    Exits with a message after ``timeout``."""
    start = time.monotonic()
    ready_s = None
    while time.monotonic() - start < timeout:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    ready_s = ready_s if ready_s is not None else time.monotonic() - start
                    if all(json.loads(r.read()).get("classify", {}).values()):
                        return ready_s
        except OSError:
            pass
        time.sleep(poll_s)
    raise SystemExit(f"server at {url} not ready after {timeout} s")
