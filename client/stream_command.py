"""Stream a recording to a server event packet by event packet, with a live view of the answer.

SOURCE is an event file (.npy/.npz structured arrays, DVS Gesture .npy, SHD/SSC .h5 with
--index; camera files .aedat4, Prophesee .raw (EVT 2/3) and .dat, .es, .csv with the formats
extra; N-MNIST .bin), a project data set as dataset:NAME (with --split and --index), a simulated
sensor as sim[:rate=EVENTS_PER_S,duration=S,label=K,classes=C,seed=N] (it emits for the served
model's sensor; label=K picks one of C movement patterns, not a class of the model, so no
correctness is shown for it), or a live camera as udp://HOST:PORT. The recording plays in real time (--speed
scales it, --fast sends as fast as the server answers) in packets of --packet-events events or
--packet-ms milliseconds. The terminal shows the top classes, events/s and packet latency while
it plays, then the final answer; --json prints one JSON object for scripts instead.

The source's sensor geometry (from the file, or --sensor WxH) is declared to the server, which
maps it onto the model's sensor: the whole source fitted in, aspect ratio kept, unless --crop,
--scale stretch or --flip-x/--flip-y say otherwise.

udp://HOST:PORT listens for the UDP datagrams faery or AEStream send from a camera (--format
t64_x16_y16_on8, the default, or t32_x16_y15_on1; --sensor WxH is required), e.g.
  faery input camera output udp 127.0.0.1:7777      # on the camera's machine
  evssm stream udp://0.0.0.0:7777 --sensor 640x480 --url ws://SERVER:8000
It forwards packets as they fill (at most 20 ms late) and stops on Ctrl-C, or with --json after
--idle-timeout seconds without a datagram (counted from the first one: it may start before the
camera), printing what was received and forwarded.

A udp:// stream opens a realtime session: the view shows how far the answers trail the camera
(lag) and, with --overload drop --max-lag-ms N, the packets the server dropped to keep up.
--decide min_prob=P,hold_ms=D has the server report class changes (shown as they come);
--compact then sends probabilities only with them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shlex
import signal
import sys
import time
from typing import Any

import numpy as np

from evssm.models.events import Recording
from evssm.models.wire import Code

from .cli_options import (
    add_server_options,
    add_source_arguments,
    check_sensor,
    explain,
    transform_of,
    window_option,
)
from .errors import ClientError, ConnectionLost, ServerUnavailable, error_line, exit_code
from .live_options import add_live_arguments, open_fields_of
from .packets import apaced, packetize
from .protocol import SessionInfo
from .session import AsyncStreamSession
from .sources import Sample, open_source
from .stream_view import View, print_final, summary_of
from .transport import ConnectFailed
from .udp import UDP_FORMATS, UdpReceiver, UdpStats, live_packets, parse_udp_url

RECONNECT_TIMEOUT_S = 300.0  # a restart of a server with several models may take minutes
RECONNECT_BACKOFF_S = (0.1, 3.0)  # first and largest pause between attempts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    explain(parser, __doc__)
    parser.add_argument("source", metavar="SOURCE",
                        help="event file, dataset:NAME, sim[:rate=R,duration=S,label=K,...], or "
                             "udp://HOST:PORT")
    add_server_options(parser)
    parser.add_argument("--index", type=int, default=0,
                        help="sample of a many-sample source (HDF5 file, data set)")
    add_source_arguments(parser, udp=True)
    parser.add_argument("--idle-timeout", type=float, default=None, metavar="S",
                        help="udp://: stop after S seconds without a datagram, counted once the "
                             "first has come (default: 5 with --json, never in the live view)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--packet-events", type=int, default=None, metavar="N",
                      help="events per packet (default 256 unless --packet-ms)")
    size.add_argument("--packet-ms", type=float, default=None, metavar="MS",
                      help="one packet per time window of MS milliseconds of the recording")
    parser.add_argument("--max-packet-events", type=int, default=16384, metavar="N",
                        help="split time-window packets larger than this")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=float, default=1.0,
                      help="replay speed: 1 = real time, 2 = twice as fast, 0.5 = half speed")
    pace.add_argument("--fast", action="store_true",
                      help="send as fast as the server answers (no real-time pacing)")
    parser.add_argument("--top", type=int, default=5, help="classes shown / returned")
    parser.add_argument("--window", type=window_option, default=None, metavar="ms=T,hop_ms=H",
                        help="answer for a sliding window of the last T ms (a new answer window "
                             "every H ms; or events=N,hop=M) instead of everything since the start; "
                             "costs T/H sessions' worth of server work")
    parser.add_argument("--max-in-flight", type=int, default=8,
                        help="packets sent and not yet answered, at most")
    parser.add_argument("--resume", default=None, metavar="TOKEN",
                        help="resume token of a session to continue (printed when a stream "
                             "fails): a file or sim: source goes on after the events the session "
                             "holds")
    parser.add_argument("--no-reconnect", action="store_true",
                        help="fail on a dropped connection instead of reconnecting")
    parser.add_argument("--reconnect-timeout", type=float, default=RECONNECT_TIMEOUT_S, metavar="S",
                        help="after a dropped connection keep trying (with backoff) for S "
                             "seconds, long enough for a server to restart, load and compile, "
                             "then print the resume token; a server still starting (with "
                             "--resume: or not reachable yet) is waited for as long "
                             "(default: %(default)g)")
    parser.add_argument("--json", action="store_true",
                        help="no live view; print one JSON object with the final answer")
    parser.add_argument("--refresh", type=float, default=10.0, help="live view refreshes per s")
    add_live_arguments(parser)


def reconnect_options(args: argparse.Namespace) -> dict[str, Any]:
    """The session's reconnect options of ``evssm stream``: try for ``--reconnect-timeout``
    seconds, with backoff, saying once on stderr that it waits and why."""
    def waiting(left_s: float, cause: BaseException) -> None:
        print(f"evssm stream: connection to {args.url} lost ({cause}); waiting up to "
              f"{args.reconnect_timeout:g} s for the server to come back (a restart loads and "
              "compiles its models), then resuming", file=sys.stderr, flush=True)

    return dict(reconnect_timeout=args.reconnect_timeout, on_reconnect_wait=waiting,
                backoff=RECONNECT_BACKOFF_S)


async def open_patiently(session: AsyncStreamSession, args: argparse.Namespace) -> SessionInfo:
    """Open the session; a server that is starting or draining (and, with ``--resume``, one not
    reachable: it may be restarting) is retried for ``--reconnect-timeout`` seconds."""
    deadline = time.monotonic() + args.reconnect_timeout
    delay, largest = RECONNECT_BACKOFF_S
    said = False
    while True:
        try:
            return await session.open()
        except (ServerUnavailable, ConnectFailed) as exc:
            starting = isinstance(exc, ServerUnavailable) and exc.code in (Code.NOT_READY, Code.DRAINING)
            if args.no_reconnect or time.monotonic() + delay > deadline or not (
                    starting or (args.resume is not None and isinstance(exc, ConnectFailed))):
                raise
            if not said:
                said = True
                print(f"evssm stream: {args.url} is not serving yet ({exc}); waiting up to "
                      f"{args.reconnect_timeout:g} s for it", file=sys.stderr, flush=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, largest)


def continued(sample: Sample, info: SessionInfo) -> Sample:
    """``sample`` after the events a resumed session already holds (``--resume``): the stream
    goes on where it stopped. The session's count includes events a crop dropped."""
    held = info.sent
    total = len(sample.recording)
    if held > total:
        raise ClientError(f"{sample.name}: the resumed session holds {held:,} events but the "
                          f"source has {total:,}; resume it with the source it was streaming")
    return dataclasses.replace(sample, recording=sample.recording.slice(held, total))


class StreamLost(ClientError):
    """A stream whose connection did not come back: says how to continue it."""

    def __init__(self, cause: ConnectionLost, session: AsyncStreamSession,
                 args: argparse.Namespace):
        self.token = session.resume_token
        self.events = session.acked_events
        self.command = shlex.join(["evssm", "stream", args.source, "--url", args.url,
                                   "--resume", self.token or "TOKEN"])
        super().__init__(f"{cause}. The server holds the session for its idle timeout (and with "
                         f"--state-dir or --state-store across restarts); continue it with: "
                         f"{self.command}")

    def to_dict(self) -> dict[str, Any]:
        return {"error": "connection_lost", "message": str(self), "resume": self.token,
                "events_answered": self.events, "continue": self.command}


async def _stream(args: argparse.Namespace) -> int:
    if args.source.startswith("udp://"):
        return await _stream_udp(args)
    if args.format in UDP_FORMATS:
        raise ClientError(f"--format {args.format} is a UDP datagram layout; SOURCE must then be "
                          "udp://HOST:PORT")
    is_sim = args.source == "sim" or args.source.startswith("sim:")
    sample = None if is_sim else open_source(args.source, index=args.index, fmt=args.format,
                                             data_dir=args.data_dir, split=args.split,
                                             source_sensor=args.sensor)
    declared = None if sample is None else sample.declared_sensor
    if sample is not None and declared is None and transform_of(args) is not None:
        raise ClientError(f"{sample.name}: the file does not state its sensor geometry; give "
                          "--sensor WxH for --crop/--scale/--flip")
    session = AsyncStreamSession(args.url, model=args.model, resume=args.resume, top_k=args.top,
                                 max_in_flight=args.max_in_flight,
                                 reconnect=not args.no_reconnect, sensor=declared,
                                 transform=transform_of(args), filters=args.filters, api_key=args.api_key,
                                 window=args.window, open_fields=open_fields_of(args, live_source=False),
                                 **reconnect_options(args))
    info = await open_patiently(session, args)
    try:
        if sample is None:  # the simulated sensor emits for the served model's sensor
            sample = open_source(args.source, sensor=info.model.sensor)
        problem = check_sensor(sample.recording, info.model.sensor, declared)
        if problem:
            raise ClientError(f"{sample.name}: {problem}")
        if args.resume is not None:
            sample = continued(sample, info)
        speed = None if args.fast else args.speed
        if args.packet_ms is not None:
            packets = packetize(sample.recording, window_us=max(int(args.packet_ms * 1000), 1),
                                max_events=args.max_packet_events)
        else:
            packets = packetize(sample.recording, events=args.packet_events or 256)
        view = View(sample, info, session.url, speed, args.top)
        try:
            if args.json:
                async for result in session.stream(apaced(packets, speed)):
                    view.add(result)
                    view.reconnects, view.resumes = session.reconnects, session.resumes
            else:
                await _live(session, view, apaced(packets, speed), args.refresh)
        except ConnectionLost as exc:
            raise StreamLost(exc, session, args) from exc
        view.reconnects, view.resumes = session.reconnects, session.resumes
        summary = summary_of(view, sample, info, args)
    finally:
        await session.close()
    if args.json:
        print(json.dumps(summary))
    else:
        print_final(summary)
    return 0


async def _stream_udp(args: argparse.Namespace) -> int:
    """A live UDP stream: forward packets as they fill until idle, stopped or interrupted."""
    if args.sensor is None:
        raise ClientError("a UDP stream does not say its sensor geometry: give --sensor WxH "
                          "(e.g. --sensor 640x480)")
    fmt = args.format or "t64_x16_y16_on8"
    if fmt not in UDP_FORMATS:
        raise ClientError(f"--format for udp:// is a datagram layout: {', '.join(UDP_FORMATS)}")
    host, port = parse_udp_url(args.source)
    idle = args.idle_timeout if args.idle_timeout is not None else (5.0 if args.json else None)
    receiver = UdpReceiver(host, port)  # bound before connecting: no datagram is missed
    stats = UdpStats()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, stop.set)  # Ctrl-C ends the stream, with a summary
    except (NotImplementedError, RuntimeError):
        pass
    sample = Sample(Recording(np.zeros(0, np.int64), np.zeros(0, np.uint16), np.zeros(0, np.uint16),
                              np.zeros(0, np.uint8)), name=args.source, sensor=args.sensor,
                    geometry="option")
    session = AsyncStreamSession(args.url, model=args.model, resume=args.resume, top_k=args.top,
                                 max_in_flight=args.max_in_flight, reconnect=not args.no_reconnect,
                                 sensor=args.sensor, transform=transform_of(args),
                                 filters=args.filters, api_key=args.api_key, window=args.window,
                                 open_fields=open_fields_of(args, live_source=True),
                                 **reconnect_options(args))
    try:
        receiver.start(loop)
        info = await open_patiently(session, args)
        try:
            problem = check_sensor(sample.recording, info.model.sensor, args.sensor)
            if problem:
                raise ClientError(f"{args.source}: {problem}")
            window = None if args.packet_ms is None else max(int(args.packet_ms * 1000), 1)
            packets = live_packets(receiver, fmt, stats, window_us=window,
                                   events=None if window else (args.packet_events or 256),
                                   max_events=args.max_packet_events, idle_timeout=idle,
                                   stop=stop)
            view = View(sample, info, session.url, None, args.top, live=stats)
            try:
                if args.json:
                    async for result in session.stream(packets):
                        view.add(result)
                else:
                    await _live(session, view, packets, args.refresh)
            except ConnectionLost as exc:
                raise StreamLost(exc, session, args) from exc
            view.reconnects = session.reconnects
            summary = summary_of(view, sample, info, args)
        finally:
            await session.close()
    finally:
        receiver.close()
        loop.remove_signal_handler(signal.SIGINT)
    summary["speed"] = None
    if args.json:
        print(json.dumps(summary))
    else:
        print_final(summary)
    return 0


async def _live(session: AsyncStreamSession, view: View, packets: Any, refresh: float) -> None:
    from rich.console import Console
    from rich.live import Live

    console = Console(stderr=False)
    if not console.is_terminal:
        # A pipe or a file: no redrawing; the final view once, as whole lines (rich's Live would
        # leave its last line open, and the summary would run into it).
        async for result in session.stream(packets):
            view.add(result)
            view.reconnects, view.resumes = session.reconnects, session.resumes
        console.print(view.render())
        return
    period = 1.0 / max(refresh, 0.5)
    next_draw = 0.0
    with Live(view.render(), console=console, auto_refresh=False, transient=False) as live:
        async for result in session.stream(packets):
            view.add(result)
            view.reconnects, view.resumes = session.reconnects, session.resumes
            now = time.monotonic()
            if now >= next_draw:
                live.update(view.render(), refresh=True)
                next_draw = now + period
        live.update(view.render(), refresh=True)


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_stream(args))
    except StreamLost as exc:
        if args.json:  # scripts read the token from the one JSON object
            print(json.dumps(exc.to_dict()))
        print(f"evssm stream: {exc}", file=sys.stderr)
        return 1
    except ClientError as exc:
        print(f"evssm stream: {error_line(exc)}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        print("evssm stream: interrupted", file=sys.stderr)
        return 130
