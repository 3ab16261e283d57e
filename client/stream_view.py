"""What ``evssm stream`` shows: the live view while a recording plays (top classes, events/s,
packet latency, resumes; for a realtime session its lag and drops, for a deciding one its
decisions) and the final answer, as text or as the JSON summary."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .protocol import Result, SessionInfo
from .resync import Resume
from .sources import Sample
from .stats import RateMeter, percentiles_ms
from .udp import UdpStats

LAG_POINTS = 20  # the summary's lag over time: at most this many points, evenly over the answers


class View:
    """SessionState of a streaming run and its rich rendering."""

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
        self.base = info.sent
        self.answered = 0  # events sent and answered (kept by the server, cropped or filtered)
        self.processed = 0  # events the model read
        self.cropped = 0
        self.filtered = 0  # events the input filters removed, as the answers tell
        self.by_filter: dict[str, int] | None = None  # the same by filter (None: no filters)
        self.packets = 0
        self.lost = 0
        self.last: Result | None = None  # last result that carries probabilities
        self.last_any: Result | None = None
        self.reconnects = 0
        self.resumes: list[Resume] = []
        self.lags: list[float] = []  # ms, a realtime session's answers
        self.dropped: tuple[int, int] = (0, 0)  # packets, events the server dropped (totals)
        self.decisions: list[tuple[Any, float, int]] = []  # (label, prob, t) as they came
        # (recording seconds, lag seconds) per answer of a paced file: the answer's wall time
        # less the wall time its packet's last event was due (playback starts at ``started``).
        self.playback: list[tuple[float, float]] = []

    def add(self, result: Result) -> None:
        self.packets += 1
        self.filtered += result.removed
        if result.filtered is not None:
            self.by_filter = {k: (self.by_filter or {}).get(k, 0) + v for k, v in result.filtered.items()}
        if result.lag_ms is not None:
            self.lags.append(result.lag_ms)
        if result.dropped is not None:
            self.dropped = (result.dropped.packets, result.dropped.events)
        if result.decision is not None:
            d = result.decision
            self.decisions.append((d.label, d.prob, d.t))
        # Filtered and dropped events were sent and answered too.
        events = result.events + result.cropped + self.info.filtered + self.filtered + self.dropped[1] - self.base
        self.meter.add(max(events - self.answered, 0))
        self.answered = events
        if self.speed is not None and self.live is None and 0 < events <= self.total:
            at_s = (int(self.sample.recording.t[events - 1]) - self.t0) / 1e6
            self.playback.append((at_s, time.monotonic() - self.started - at_s / self.speed))
        self.cropped = result.cropped - self.info.cropped
        self.processed = events - self.cropped - self.filtered - self.dropped[1]
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

    def lag_over_time(self) -> list[list[float]]:
        """[recording s, lag ms] of at most :data:`LAG_POINTS` answers, evenly spaced, the last
        one included: how far behind real time the answers ran as the recording played."""
        if not self.playback:
            return []
        picks = sorted({round(i * (len(self.playback) - 1) / max(LAG_POINTS - 1, 1)) for i in range(LAG_POINTS)})
        return [[round(self.playback[i][0], 6), round(self.playback[i][1] * 1e3, 3)] for i in picks]

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

        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f}"

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
        if self.lags:
            lag = percentiles_ms([v / 1e3 for v in self.lags[-2000:]])
            parts.append(Text(f"lag ms last {self.lags[-1]:.1f}  p50 {fmt(lag['p50'])}  p99 {fmt(lag['p99'])}   "
                              f"dropped {self.dropped[0]:,} packets, {self.dropped[1]:,} events",
                              "red" if self.dropped[0] else ""))
        if self.decisions:
            label, prob, t = self.decisions[-1]
            parts.append(Text(f"decided: {label} (p {prob:.3f}) at {(t - self.t0) / 1e6:.3f} s; "
                              f"{len(self.decisions)} decisions", "bold green"))
        if self.resumes:
            times = f" ({len(self.resumes)} resumes; the last)" if len(self.resumes) > 1 else ""
            parts.append(Text(describe_resume(self.resumes[-1]) + times, "yellow"))
        window = None if self.last is None else self.last.window
        if window is not None:  # a windowed session: what the answer covers
            parts.append(Text(f"window: the last {window['events']:,} events, from t = {window['t0']:,} µs",
                              "dim"))
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
    probs = result.probs
    if probs is None:
        return []
    order = sorted(range(len(probs)), key=lambda i: -probs[i])[:k]
    names = info.model.classes
    return [(names[i] if i < len(names) else i, probs[i]) for i in order]


def summary_of(view: View, sample: Sample, info: SessionInfo, args: argparse.Namespace
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
        "window": info.window,  # the session's sliding window (None: everything since the start)
        "answer_window": final.window if final is not None else None,  # what the last answer covers
        "events": view.answered,  # read from the source and sent (all answered)
        "events_processed": view.processed,
        "cropped": view.cropped,
        "filtered": view.by_filter,  # events each input filter removed (None: no filters)
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
        "lag_ms": percentiles_ms([v / 1e3 for v in view.lags]) if view.lags else None,
        "dropped": {"packets": view.dropped[0], "events": view.dropped[1]},
        "decisions": [{"label": label, "prob": prob, "t": t} for label, prob, t in view.decisions],
        # Paced playback: how far each answer came after its packet's last event was due.
        "playback_lag_ms": percentiles_ms([lag for _, lag in view.playback], (50, 99)) if view.playback else None,
        "lag_over_time": view.lag_over_time() if view.playback else None,
        **({} if view.live is None else {"udp": view.live.to_dict(),
                                          "events_received": view.live.events_received,
                                          "events_forwarded": view.answered}),
    }


def print_final(summary: dict[str, Any]) -> None:
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
    if summary.get("filtered"):
        removed = ", ".join(f"{name} {n:,}" for name, n in summary["filtered"].items())
        console.print(f"input filters removed {sum(summary['filtered'].values()):,} events ({removed})")
    if summary["lag_ms"] is not None:
        lag, dropped = summary["lag_ms"], summary["dropped"]
        console.print(f"lag p50 {lag['p50']} ms p99 {lag['p99']} ms, dropped {dropped['packets']:,} packets "
                      f"({dropped['events']:,} events)")
    for d in summary["decisions"]:
        console.print(f"decided {d['label']} (p {d['prob']:.3f}) at t {d['t']} us")
    for r in summary["resumes"]:
        console.print(describe_resume(Resume(at=0.0, **r)))
