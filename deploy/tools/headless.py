#!/usr/bin/env python3
"""Drive headless Chromium over the DevTools protocol: load a page, evaluate JavaScript, take
screenshots. Used by the deployment tests (the live page at /dashboard) and to take the README's
screenshot. Needs Debian's ``chromium`` and the ``websockets`` package (an evssm dependency).

    python deploy/tools/headless.py http://127.0.0.1:8000/dashboard docs/images/dashboard.png \
        --wait 60 --width 1400

The browser is started with its background services off and every host name except localhost
made unresolvable, so a page can only reach the loopback server it was pointed at.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The Chromium binary: ``$CHROMIUM`` or the first of the usual names on ``PATH``."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return shutil.which(explicit) or (explicit if os.access(explicit, os.X_OK) else None)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class ChromiumError(RuntimeError):
    pass


class Chromium:
    """One headless Chromium process with one page. Use as a context manager."""

    def __init__(self, binary: str | None = None, width: int = 1400, height: int = 900,
                 start_timeout: float = 60.0):
        self.binary = binary or find_chromium()
        if not self.binary:
            raise ChromiumError("no Chromium binary found (apt-get install chromium)")
        self.width, self.height, self.start_timeout = width, height, start_timeout
        self.proc: subprocess.Popen | None = None
        self.profile: tempfile.TemporaryDirectory | None = None
        self.ws = None
        self._ids = itertools.count(1)
        self.console: list[str] = []

    # -- life cycle ---------------------------------------------------------------------------
    def __enter__(self) -> Chromium:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.profile = tempfile.TemporaryDirectory(prefix="evssm-chromium-")
        args = [
            self.binary,
            "--headless=new",
            "--no-sandbox",  # root in containers and CI
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--window-size={self.width},{self.height}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={self.profile.name}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-breakpad",
            "--disable-domain-reliability",
            "--disable-client-side-phishing-detection",
            "--no-pings",
            "--no-proxy-server",
            "--metrics-recording-only",
            "--password-store=basic",
            "--use-mock-keychain",
            "--disable-features=Translate,OptimizationHints,MediaRouter,"
            "AutofillServerCommunication,CertificateTransparencyComponentUpdater",
            # Nothing but loopback resolves: the page cannot reach beyond this machine.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1, EXCLUDE [::1]",
            "about:blank",
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        port_file = Path(self.profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise ChromiumError(f"Chromium exited with {self.proc.returncode}: {err[-2000:]}")
            if port_file.exists() and port_file.read_text().count("\n") >= 1:
                break
            if time.monotonic() > deadline:
                self.close()
                raise ChromiumError("Chromium did not open its DevTools port in time")
            time.sleep(0.1)
        # Drain stderr in the background so a chatty browser never blocks on a full pipe.
        import threading

        threading.Thread(target=self._drain, daemon=True).start()
        port = int(port_file.read_text().splitlines()[0])
        page_ws = None
        while page_ws is None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                targets = json.load(r)
            page_ws = next((t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"), None)
            if page_ws is None:
                if time.monotonic() > deadline:
                    raise ChromiumError("Chromium has no page target")
                time.sleep(0.1)
        # Entered as a context manager (closed in close()): the form every websockets version takes.
        self.ws = connect(page_ws, max_size=None, open_timeout=20).__enter__()
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  width=self.width, height=self.height, deviceScaleFactor=1, mobile=False)

    def _drain(self) -> None:
        proc = self.proc
        if proc is None or proc.stderr is None:
            return
        for _ in iter(proc.stderr.readline, b""):
            pass

    def close(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:
                pass
            self.ws = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self.proc = None
        if self.profile is not None:
            self.profile.cleanup()
            self.profile = None

    # -- protocol -----------------------------------------------------------------------------
    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict:
        if self.ws is None:
            raise ChromiumError("browser not started")
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChromiumError(f"{method}: no answer in {timeout} s")
            msg = json.loads(self.ws.recv(timeout=remaining))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise ChromiumError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def _event(self, msg: dict) -> None:
        method = msg.get("method")
        if method == "Runtime.consoleAPICalled":
            args = msg["params"].get("args", [])
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
        elif method == "Runtime.exceptionThrown":
            details = msg["params"].get("exceptionDetails", {})
            self.console.append("exception: " + str(details.get("exception", {}).get("description")
                                                    or details.get("text")))

    def navigate(self, url: str, timeout: float = 30.0) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", timeout=timeout)

    def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        result = self.call("Runtime.evaluate", timeout=timeout, expression=expression,
                           returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise ChromiumError(f"evaluate {expression!r}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, interval: float = 0.25) -> Any:
        """Evaluate ``expression`` until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except ChromiumError:
                value = None
            if value:
                return value
            time.sleep(interval)
        raise ChromiumError(f"timed out after {timeout} s waiting for {expression!r} (last: {value!r})")

    def screenshot(self, path: str | Path, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            # The page's own height (the body's box), not the viewport's: no empty band below.
            height = self.evaluate("Math.ceil(Math.max(document.body.getBoundingClientRect().bottom,"
                                   " document.body.scrollHeight))")
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": self.width,
                                "height": max(100, int(height or self.height)), "scale": 1})
        data = base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshot a page in headless Chromium.")
    parser.add_argument("url")
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--wait", type=float, default=5.0, help="seconds to leave the page running first")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--until", default=None, help="JavaScript expression to wait for after --wait")
    args = parser.parse_args(argv)
    with Chromium(width=args.width, height=args.height) as browser:
        browser.navigate(args.url)
        time.sleep(args.wait)
        if args.until:
            browser.wait_for(args.until, timeout=60)
        out = browser.screenshot(args.out)
        for line in browser.console:
            print("console:", line, file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
