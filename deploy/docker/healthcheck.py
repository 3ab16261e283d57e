#!/usr/bin/env python3
"""Container health check: exit 0 when the evssm server answers ``GET /healthz`` with 200.

Standard library only, so it runs in the slim runtime image (which has no curl). The port comes
from ``EVSSM_PORT`` (the same variable ``evssm serve`` reads), the host is always loopback: the
check runs inside the container, next to the server.

    python /usr/local/bin/evssm-healthcheck            # uses $EVSSM_PORT, default 8000
    python /usr/local/bin/evssm-healthcheck --port 8123 --path /readyz
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("EVSSM_PORT") or 8000))
    parser.add_argument("--path", default="/healthz")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    url = f"http://127.0.0.1:{args.port}{args.path}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
