"""A load test's split of the server's CPU time: where each event's microseconds went.

The server keeps cumulative CPU seconds per part (``/v1/stats``'s ``cpu`` block: the event loop,
decoding, the step threads, the native step's helper threads, the rest of the process) and the
events it has streamed. :func:`cpu_split` takes two such readings, before and after a run, and
gives per part the seconds, microseconds per event and share of the server's CPU over the run;
the server's total too, and the cores it kept busy on average.
"""

from __future__ import annotations

import math
from typing import Any

import httpx

from .protocol import auth_headers, endpoint_url


def read_stats(url: str, api_key: str | None = None, timeout: float = 10.0) -> dict[str, Any] | None:
    """The server's ``/v1/stats`` body, or None where it cannot be read (an older server, a
    proxy that does not pass it on, no access)."""
    try:
        response = httpx.get(endpoint_url(url, "stats"), timeout=timeout,
                             headers={"accept": "application/json", **auth_headers(api_key)})
        body = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def cpu_split(before: dict[str, Any] | None, after: dict[str, Any] | None, wall_s: float
              ) -> dict[str, Any] | None:
    """The split over a run between two ``/v1/stats`` bodies (None if either lacks the ``cpu``
    block): ``events`` streamed, ``server_cpu_s``, ``server_cores`` (CPU seconds / ``wall_s``),
    ``us_per_event`` in all, and ``parts``: {part: {seconds, us_per_event, share}}."""
    a = (before or {}).get("cpu")
    b = (after or {}).get("cpu")
    if not isinstance(a, dict) or not isinstance(b, dict):
        return None
    events = int(b["events"]) - int(a["events"])
    total = float(b["process_s"]) - float(a["process_s"])
    parts = {}
    for part, now in b["parts"].items():
        seconds = float(now["seconds"]) - float(a["parts"].get(part, {}).get("seconds", 0.0))
        parts[part] = {"seconds": round(seconds, 4),
                       "us_per_event": round(seconds / events * 1e6, 3) if events > 0 else None,
                       "share": round(seconds / total, 3) if total > 0 else None}
    return {"events": events, "server_cpu_s": round(total, 4),
            "server_cores": round(total / wall_s, 3) if wall_s > 0 else None,
            "us_per_event": round(total / events * 1e6, 3) if events > 0 else None,
            "parts": parts}


def step_counts(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """Engine steps over a run, every model, between two ``/v1/stats`` bodies (None for a server
    that does not count them): ``steps``, ``packets`` answered, ``packets_per_step`` and
    ``coalesced`` (packet chunks that shared their session's row in a step)."""
    def totals(body: dict[str, Any] | None) -> tuple[int, int, int] | None:
        models = (body or {}).get("models")
        if not isinstance(models, dict) or any("steps_total" not in m for m in models.values()):
            return None
        return tuple(sum(int(m.get(k, 0)) for m in models.values())  # type: ignore[return-value]
                     for k in ("steps_total", "packets_total", "coalesced_total"))
    a, b = totals(before), totals(after)
    if a is None or b is None:
        return None
    steps, packets, coalesced = (y - x for x, y in zip(a, b, strict=True))
    return {"steps": steps, "packets": packets, "coalesced": coalesced,
            "packets_per_step": round(packets / steps, 3) if steps > 0 else None}


def split_lines(split: dict[str, Any], packet_events: int | None) -> list[str]:
    """The split as a few lines of text: per part, µs per event (and per packet) and share."""
    n = packet_events or 0
    per_packet = n > 0
    head = f"{'part':<14}{'us/event':>10}" + (f"{'us/packet':>11}" if per_packet else "") + f"{'share':>8}"
    rows = [*split["parts"].items(), ("server", {"us_per_event": split["us_per_event"], "share": 1.0})]
    lines = [f"server CPU over the run: {split['server_cpu_s']:.2f} s for {split['events']} events "
             f"({split['server_cores']} cores busy on average)", head]
    for part, p in rows:
        us, share = p["us_per_event"], p["share"]
        if us is None or share is None or not math.isfinite(us):
            lines.append(f"{part:<14}{'-':>10}")
            continue
        lines.append(f"{part:<14}{us:>10.2f}" + (f"{us * n:>11.1f}" if per_packet else "")
                     + f"{share:>8.1%}")
    return lines
