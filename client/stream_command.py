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

from .cli_options import add_server_options, add_source_arguments, check_sensor, explain, transform_of
from .errors import ClientError, ConnectionLost, ServerUnavailable, error_line, exit_code
from .packets import apaced, packetize
from .protocol import Result, SessionInfo
from .resync import Resume
from .session import AsyncStreamSession
from .sources import Sample, open_source
from .stats import RateMeter, percentiles_ms
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


class _View:
    """State of a streaming run and its rich rendering."""

    def __init__(self, sample: Sample, info: SessionInfo, url: str, speed: float | None, top: int,
                 live: UdpStats | None = None):
        self.sample, self.info, self.url, self.speed, self.top = sample, info, url, speed, top
        self.live = live  # a UDP stream: no known total
        self.total = len(sample.recording)
        rec_t = sample.recording.t
        self.t0 = int(rec_t[0]) if self.total else 0
        self.span_s = (int(rec_t[-1]) - self.t0) / 1e6 if self.total else 0.0
        self.started = time.monotonic()
        self.meter = RateMeter(1.0)
        self.latencies: list[float] = []
        # A resumed session counts the events it had before; cropped events were sent too.
        self.base = info.events + info.cropped
        self.answered = 0  # events sent and answered (kept by the server or cropped)
        self.processed = 0  # events the model read
        self.cropped = 0
        self.packets = 0
        self.lost = 0
        self.last: Result | None = None  # last result that carries probabilities
        self.last_any: Result | None = None
        self.reconnects = 0
        self.resumes: list[Resume] = []

    def add(self, result: Result) -> None:
        self.packets += 1
        events = result.events + result.cropped - self.base
        self.meter.add(max(events - self.answered, 0))
        self.answered = events
        self.cropped = result.cropped - self.info.cropped
        self.processed = events - self.cropped
        self.last_any = result
        if result.lost:
            self.lost += 1
            return
        self.latencies.append(result.latency_s)
        if result.probs is not None or result.top:
            self.last = result

    def recording_s(self) -> float:
        """Seconds of the recording answered so far (its last answered event's time)."""
        last = self.last_any
        return (last.t - self.t0) / 1e6 if last is not None and last.t is not None else 0.0

    def speed_reached(self) -> float | None:
        """Recording seconds answered per wall second: 1 is real time (None before any answer)."""
        wall = time.monotonic() - self.started
        return self.recording_s() / wall if wall > 0 and self.last_any is not None else None

    def render(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        wall = time.monotonic() - self.started
        lat = percentiles_ms(self.latencies[-2000:])
        last_ms = self.latencies[-1] * 1e3 if self.latencies else None
        head = Text.assemble(
            ("evssm stream ", "bold"), (self.sample.name or "recording", "cyan"), " → ",
            (self.url, "dim"), "  model ", (self.info.model.name or "?", "magenta"),
            "  session ", (self.info.session, "dim"))
        rec_pos = self.recording_s()
        progress = Table.grid(padding=(0, 1))
        if self.live is not None:
            progress.add_row(f"received {self.live.events_received:,} events in "
                             f"{self.live.datagrams:,} datagrams", f"forwarded {self.answered:,}",
                             f"out of order {self.live.events_out_of_order:,}",
                             f"wall {wall:6.2f} s   (Ctrl-C stops)")
        else:
            progress.add_row(ProgressBar(total=max(self.total, 1), completed=self.answered,
                                         width=40),
                             f"{self.answered:,}/{self.total:,} events",
                             f"{rec_pos:6.2f}/{self.span_s:.2f} s of recording",
                             f"wall {wall:6.2f} s", self._speed_text())
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        stats = Text(f"events/s {self.meter.rate():>10,.0f}   latency ms last {fmt(last_ms)}  "
                     f"p50 {fmt(lat['p50'])}  p95 {fmt(lat['p95'])}  p99 {fmt(lat['p99'])}   "
                     f"packets {self.packets:,}   reconnects {self.reconnects}")
        classes = Table(box=None, padding=(0, 1), show_header=True, header_style="bold")
        classes.add_column("#", justify="right")
        classes.add_column("class")
        classes.add_column("prob", justify="right")
        classes.add_column("")
        if self.last is not None:
            for i, (label, prob) in enumerate(_top(self.last, self.info, self.top), 1):
                classes.add_row(str(i), str(label), f"{prob:.3f}",
                                ProgressBar(total=1.0, completed=prob, width=30))
        else:
            classes.add_row("", Text(f"no prediction yet: {self.info.model.too_few_events()}",
                                     "dim"), "", "")
        parts: list[Any] = [head, progress, stats]
        if self.resumes:
            times = f" ({len(self.resumes)} resumes; the last)" if len(self.resumes) > 1 else ""
            parts.append(Text(describe_resume(self.resumes[-1]) + times, "yellow"))
        parts.append(classes)
        true_name = self.sample.label_name(self.info.model.classes)
        if true_name is not None:
            parts.append(Text(f"true label: {true_name}", "dim"))
        return Group(*parts)

    def _speed_text(self) -> str:
        """The speed reached, beside the one asked for: ``speed 0.04x (asked 1x)``."""
        reached = self.speed_reached()
        shown = "-" if reached is None else f"{reached:.2f}x"
        return f"speed {shown} (asked {'fast' if self.speed is None else f'{self.speed:g}x'})"


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
    held = info.events + info.cropped
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


def describe_resume(r: Resume) -> str:
    """One line saying where a session resumed after its connection dropped."""
    how = ("in a new session (the old one was gone), replaying the stream from its start"
           if r.new_session else "from a snapshot (the server had restarted, or another replica "
           "took over)" if r.restored else "on the same server")
    replay = f", replayed {r.replayed:,} answered events" if r.replayed else ""
    return f"resumed at event {r.events:,} {how}{replay}, resent {r.resent} packets in flight"


def _top(result: Result, info: SessionInfo, k: int) -> list[tuple[Any, float]]:
    """Top-k (label, prob): the server's ``top``, else computed from ``probs``."""
    if result.top:
        return result.top[:k]
    if result.probs is None:
        return []
    order = sorted(range(len(result.probs)), key=lambda i: -result.probs[i])[:k]  # type: ignore[index]
    names = info.model.classes
    return [(names[i] if i < len(names) else i, result.probs[i]) for i in order]  # type: ignore[index]


def _summary(view: _View, sample: Sample, info: SessionInfo, args: argparse.Namespace
             ) -> dict[str, Any]:
    wall = time.monotonic() - view.started
    final = view.last
    top = _top(final, info, args.top) if final is not None else []
    prediction = top[0][0] if top else None
    reached = None if view.live is not None else view.speed_reached()
    return {
        "source": sample.name,
        "url": view.url,
        "model": info.model.name,
        "session": info.session,
        "resume": info.resume,
        "label": sample.label,
        "label_name": sample.label_name(info.model.classes),
        "prediction": prediction,
        "probability": top[0][1] if top else None,
        "correct": sample.is_correct(prediction, info.model.classes),
        "top": [[label, p] for label, p in top],
        "probs": final.probs if final is not None else None,
        "events": view.answered,  # read from the source and sent (all answered)
        "events_processed": view.processed,
        "cropped": view.cropped,
        "recording_events": None if view.live is not None else view.total,
        "sensor": None if sample.sensor is None else sample.sensor.to_dict(),
        "sensor_from": sample.geometry,
        "geometry": info.geometry,
        "packets": view.packets,
        "lost_results": view.lost,
        "reconnects": view.reconnects,
        "resumes": [{"events": r.events, "restored": r.restored, "new_session": r.new_session,
                     "replayed": r.replayed, "resent": r.resent} for r in view.resumes],
        "wall_s": round(wall, 4),
        "recording_s": round(view.span_s, 4),
        "events_per_s": round(view.answered / wall, 1) if wall > 0 else None,
        "speed": None if args.fast else args.speed,
        "speed_reached": None if reached is None else round(reached, 4),
        "no_answer": None if final is not None else info.model.too_few_events(),
        "latency_ms": percentiles_ms(view.latencies),
        **({} if view.live is None else {"udp": view.live.to_dict(),
                                          "events_received": view.live.events_received,
                                          "events_forwarded": view.answered}),
    }


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
                                 transform=transform_of(args), api_key=args.api_key,
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
        view = _View(sample, info, session.url, speed, args.top)
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
        summary = _summary(view, sample, info, args)
    finally:
        await session.close()
    if args.json:
        print(json.dumps(summary))
    else:
        _print_final(summary)
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
                                 api_key=args.api_key, **reconnect_options(args))
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
            view = _View(sample, info, session.url, None, args.top, live=stats)
            try:
                if args.json:
                    async for result in session.stream(packets):
                        view.add(result)
                else:
                    await _live(session, view, packets, args.refresh)
            except ConnectionLost as exc:
                raise StreamLost(exc, session, args) from exc
            view.reconnects = session.reconnects
            summary = _summary(view, sample, info, args)
        finally:
            await session.close()
    finally:
        receiver.close()
        loop.remove_signal_handler(signal.SIGINT)
    summary["speed"] = None
    if args.json:
        print(json.dumps(summary))
    else:
        _print_final(summary)
    return 0


async def _live(session: AsyncStreamSession, view: _View, packets: Any, refresh: float) -> None:
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


def _print_final(summary: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    lat = summary["latency_ms"]
    if summary["prediction"] is None:
        console.print(f"[bold]no prediction[/]: {summary['no_answer'] or 'no answer'}")
    else:
        verdict = {True: " [green]✓ correct[/]", False: " [red]✗ wrong[/]", None: ""}[
            summary["correct"]]
        truth = f" (true label: {summary['label_name']})" if summary["label_name"] else ""
        console.print(f"[bold]prediction:[/] {summary['prediction']} "
                      f"p={summary['probability']:.3f}{truth}{verdict}")
    console.print(f"{summary['events']:,} events in {summary['packets']:,} packets, "
                  f"{summary['wall_s']:.2f} s wall, {summary['events_per_s'] or 0:,.0f} events/s, "
                  f"latency p50 {lat['p50']} ms p95 {lat['p95']} ms p99 {lat['p99']} ms, "
                  f"reconnects {summary['reconnects']}")
    for r in summary["resumes"]:
        console.print(describe_resume(Resume(at=0.0, **r)))


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
