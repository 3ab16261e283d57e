"""``evssm stream``'s options for live sources: decisions, compact results, real-time lag and drops.

They become fields of the ``open`` frame (docs/protocol.md): ``--decide min_prob=P,hold_ms=D``
-> ``decide``; ``--compact`` -> ``results: "compact"``; ``--overload drop --max-lag-ms N`` ->
``overload``/``max_lag_ms``. A live source (``udp://``) always opens with ``realtime: true``; a
recording does with ``--realtime`` (a replay at ``--speed 1`` is then measured as a live camera
would be) or with ``--overload drop``.
"""

from __future__ import annotations

import argparse
from typing import Any

from .errors import ClientError
from .pairs import name_numbers


def _decide_arg(text: str) -> dict[str, float]:
    """``min_prob=0.8,hold_ms=200`` (hold optional) -> ``{"min_prob": 0.8, "hold_ms": 200.0}``."""
    try:
        out = name_numbers(text, ("min_prob", "hold_ms"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected min_prob=P[,hold_ms=D]: {exc}") from None
    if "min_prob" not in out:
        raise argparse.ArgumentTypeError(f"expected min_prob=P[,hold_ms=D], got {text!r}")
    return out


def add_live_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decide", type=_decide_arg, default=None, metavar="min_prob=P,hold_ms=D",
                        help="have the server decide: a class change whose probability stays >= P "
                             "for D ms of stream time is reported once")
    parser.add_argument("--compact", action="store_true",
                        help="results carry probabilities only with a decision (needs --decide)")
    parser.add_argument("--realtime", action="store_true",
                        help="measure the lag of a recording's replay as a live camera's (udp:// "
                             "sources always are)")
    parser.add_argument("--overload", choices=("lossless", "drop"), default=None,
                        help="drop: the server drops whole packets whose lag passes --max-lag-ms "
                             "instead of falling behind (default lossless)")
    parser.add_argument("--max-lag-ms", type=float, default=None, metavar="MS",
                        help="the lag bound of --overload drop (server default 250)")


def open_fields_of(args: argparse.Namespace, *, live_source: bool) -> dict[str, Any]:
    """The ``open`` fields the options ask for (checked here for what the server would refuse)."""
    if args.compact and args.decide is None:
        raise ClientError("--compact sends probabilities only with decisions: give --decide too")
    if args.max_lag_ms is not None and args.overload != "drop":
        raise ClientError("--max-lag-ms bounds --overload drop: give --overload drop too")
    fields: dict[str, Any] = {}
    if args.decide is not None:
        fields["decide"] = args.decide
    if args.compact:
        fields["results"] = "compact"
    if live_source or args.realtime or args.overload == "drop":
        fields["realtime"] = True
        if args.overload is not None:
            fields["overload"] = args.overload
        if args.max_lag_ms is not None:
            fields["max_lag_ms"] = args.max_lag_ms
    return fields
