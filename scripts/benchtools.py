"""What the benchmark scripts share: a free loopback port and waiting for a server's /readyz."""

from __future__ import annotations

import socket
import time
import urllib.request


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 900, poll_s: float = 0.5) -> float:
    """Seconds until ``url + "/readyz"`` answers 200; exits with a message after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(poll_s)
    raise SystemExit(f"server at {url} not ready after {timeout} s")
