"""Options the client's commands share: the server (``--url``, ``--model``, ``--api-key``), the
source (``--format``, ``--split``, ``--data-dir``), its geometry (``--sensor``, ``--crop``,
``--scale``, ``--flip-x``, ``--flip-y``) and input filters (``--filters``), and the help text
below the options."""

from __future__ import annotations

import argparse
import os
from typing import Any

from evssm.models.events import Recording, SensorSpec

from .pairs import name_numbers
from .protocol import API_KEY_ENV
from .sources import FORMATS, SourceError, parse_sensor
from .udp import UDP_FORMATS

URL_ENV = "EVSSM_URL"
DEFAULT_URL = os.environ.get(URL_ENV, "ws://127.0.0.1:8000")


def explain(parser: argparse.ArgumentParser, doc: str | None) -> None:
    """Show a command module's docstring (after its first line) below the options in --help
    (``evssm``'s help formatter keeps its paragraphs and lines)."""
    parser.epilog = "\n".join((doc or "").strip().splitlines()[1:]).strip() or None


def add_server_options(parser: argparse.ArgumentParser, *, model: bool = True, url_note: str = "") -> None:
    """``--url`` (default ``$EVSSM_URL``), ``--model`` (unless ``model`` is False: a command that
    uses every served model) and ``--api-key`` (default ``$EVSSM_API_KEY``). ``url_note`` ends the
    ``--url`` help."""
    parser.add_argument("--url", default=DEFAULT_URL,
                        help=f"server, ws://HOST:PORT or http://HOST:PORT (env {URL_ENV} sets the "
                             f"default){url_note}")
    if model:
        parser.add_argument("--model", default=None, help="model name (default: the server's)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help=f"API key of a server started with --api-keys (default: ${API_KEY_ENV}; "
                             "prefer the variable, options show in process lists)")


def add_source_arguments(parser: argparse.ArgumentParser, udp: bool = False) -> None:
    """Options that pick a sample from a source and say how its sensor maps onto the model's
    (shared with ``evssm classify``)."""
    parser.add_argument("--format", choices=FORMATS + (tuple(UDP_FORMATS) if udp else ()),
                        default=None,
                        help="file format (default: from the file suffix; an N x 4 .npy is read "
                             "as DVS Gesture)" + ("; for udp:// the datagram layout (default "
                                                   "t64_x16_y16_on8)" if udp else ""))
    parser.add_argument("--split", default="test", help="split of a dataset:NAME source")
    parser.add_argument("--data-dir", default=None,
                        help="directory of the project's data sets (dataset:NAME sources)")
    geometry = parser.add_argument_group("source geometry (declared to the server, which maps "
                                         "the source onto the model's sensor)")
    geometry.add_argument("--sensor", type=_sensor_arg, default=None, metavar="WxH",
                          help="the source sensor, WIDTHxHEIGHT (or CHANNELS for 1-D): for files "
                               "that do not state it (EVT 2 .raw, .dat, .csv, .npy), or to "
                               "override the file")
    geometry.add_argument("--crop", type=_crop_arg, default=None, metavar="X,Y,W,H",
                          help="use only this rectangle of the source (events outside are "
                               "dropped by the server and counted)")
    geometry.add_argument("--scale", choices=("fit", "stretch"), default=None,
                          help="fit: keep the aspect ratio, centred (the default); stretch: fill "
                               "the model's sensor")
    geometry.add_argument("--flip-x", action="store_true", help="mirror left-right")
    geometry.add_argument("--flip-y", action="store_true", help="mirror top-bottom")
    parser.add_argument("--filters", type=filters_arg, default=None, metavar="NAME=VALUE,...",
                        help="input filters the server applies to the source's events before the "
                             "model: refractory_us=R (a dead time per pixel), denoise_us=D (drop "
                             "events with no neighbour active within D us), max_rate=E (at most E "
                             "events/s); e.g. refractory_us=1000,denoise_us=5000")


def _sensor_arg(text: str) -> SensorSpec:
    try:
        return parse_sensor(text)
    except SourceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


FILTER_NAMES = ("refractory_us", "denoise_us", "max_rate")


def filters_arg(text: str) -> dict[str, int]:
    """``--filters refractory_us=R,denoise_us=D,max_rate=E`` (any of them) -> the ``filters`` map."""
    try:
        values = name_numbers(text, FILTER_NAMES)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad filter: {exc}") from None
    for name, number in values.items():
        if number < 1 or not number.is_integer():
            raise argparse.ArgumentTypeError(f"bad filter {name}={number:g}: use {name}=N, N a positive integer")
    if not values:
        raise argparse.ArgumentTypeError("--filters needs at least one NAME=VALUE filter")
    return {name: int(number) for name, number in values.items()}


def _crop_arg(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (2, 4):
        raise argparse.ArgumentTypeError(f"bad crop {text!r}: use X,Y,WIDTH,HEIGHT (X,WIDTH "
                                         "for a 1-D sensor)")
    return values


def transform_of(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``transform`` the options ask for (None: the server's default)."""
    out: dict[str, Any] = {}
    if args.crop is not None:
        out["crop"] = args.crop
    if args.scale is not None:
        out["scale"] = args.scale
    if args.flip_x:
        out["flip_x"] = True
    if args.flip_y:
        out["flip_y"] = True
    return out or None


def window_option(text: str) -> dict[str, float]:
    """``--window ms=2000,hop_ms=500`` (or ``events=N,hop=M``) as the ``open`` frame's ``window``
    (the server checks the combination and names what is wrong)."""
    try:
        values = name_numbers(text, ("ms", "hop_ms", "events", "hop"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--window takes ms=T,hop_ms=H or events=N,hop=M: {exc}") from None
    return {key: int(number) if number.is_integer() else number for key, number in values.items()}


def check_sensor(rec: Recording, sensor: SensorSpec | None,
                 declared: SensorSpec | None = None) -> str | None:
    """Why ``rec`` cannot be read by a model with ``sensor`` (None when it can). With a
    ``declared`` source sensor the server maps addresses, so only the kinds must agree."""
    if declared is not None and sensor is not None:
        if declared.kind != sensor.kind:
            return (f"the source is a {declared.kind.upper()} sensor but the model reads a "
                    f"{sensor.kind.upper()} one; they cannot be mapped onto each other")
        return None
    if sensor is None or len(rec) == 0:
        return None
    if sensor.kind == "1d":
        if rec.y is not None:
            return "the recording is 2-D (x, y, p) but the model reads a 1-D sensor"
        if int(rec.x.max()) >= sensor.channels:
            return f"channel {int(rec.x.max())} exceeds the model's {sensor.channels} channels"
        return None
    if rec.y is None or rec.p is None:
        return "the recording is 1-D (x only) but the model reads a 2-D sensor (x, y, p)"
    if int(rec.x.max()) >= sensor.width or int(rec.y.max()) >= sensor.height:
        return (f"addresses up to {int(rec.x.max())}x{int(rec.y.max())} exceed the model's "
                f"{sensor.width}x{sensor.height} sensor; give the source's geometry with "
                f"--sensor WxH and the server maps it onto the model's")
    return None
