"""Classify whole recordings over HTTP with the server's offline model; a table or JSON.

FILES are event files (.npy/.npz, DVS Gesture .npy, SHD/SSC .h5; .aedat4, Prophesee .raw and
.dat, .es, .csv with the formats extra; N-MNIST .bin), dataset:NAME sources or sim[:...] specs, as
for 'evssm stream'. --index picks samples of many-sample sources (HDF5 files, data sets): 'all', or
a list like 0,3,10-19. Recordings go to the server --batch at a time. With labels known, the
accuracy is shown. Each file's sensor geometry (from the file, or --sensor WxH) is declared, and
the server maps it onto the model's sensor (--crop, --scale, --flip-x/--flip-y as for 'evssm
stream').
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from .cli_options import add_server_options, add_source_arguments, check_sensor, explain, transform_of
from .errors import ClientError, SourceError, error_line, exit_code
from .http_api import Classification, classify, list_models
from .protocol import ModelInfo
from .sources import Sample, open_source, source_count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    explain(parser, __doc__)
    parser.add_argument("files", nargs="+", metavar="FILES",
                        help="event files, dataset:NAME or sim[:...] sources")
    add_server_options(parser)
    parser.add_argument("--index", default="0", metavar="SPEC",
                        help="samples of many-sample sources: N, a list 0,3,10-19, or all")
    add_source_arguments(parser)
    parser.add_argument("--batch", type=int, default=16, help="recordings per HTTP request")
    parser.add_argument("--top", type=int, default=3, help="classes shown per recording")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def parse_index_spec(spec: str, count: int) -> list[int]:
    """``all`` | ``N`` | ``A,B,C-D`` -> indices, checked against ``count`` samples."""
    if spec.strip() == "all":
        return list(range(count))
    out: list[int] = []
    for part in filter(None, (s.strip() for s in spec.split(","))):
        lo, dash, hi = part.partition("-")
        try:
            out += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
        except ValueError as exc:
            raise SourceError(f"bad --index {spec!r}: use N, A,B, A-B or all") from exc
    for i in out:
        if not 0 <= i < count:
            raise SourceError(f"--index {i} out of range: the source holds {count} samples")
    return out


def _load_samples(args: argparse.Namespace, model: ModelInfo | None) -> list[Sample]:
    samples: list[Sample] = []
    for spec in args.files:
        count = source_count(spec, fmt=args.format, data_dir=args.data_dir, split=args.split)
        indices = parse_index_spec(args.index, count) if count > 1 else [0]
        for i in indices:
            samples.append(open_source(spec, index=i, fmt=args.format, data_dir=args.data_dir,
                                       split=args.split,
                                       sensor=model.sensor if model is not None else None,
                                       source_sensor=args.sensor))
    return samples


def _server_model(args: argparse.Namespace) -> ModelInfo | None:
    """The served model's description (for class names and the simulated sensor); None if the
    server does not list models."""
    try:
        models = list_models(args.url, api_key=args.api_key)
    except ClientError:
        return None
    if args.model is not None:
        return next((m for m in models if m.name == args.model), None)
    return models[0] if models else None


def _row(sample: Sample, result: Classification, model: ModelInfo | None, top: int
         ) -> dict[str, Any]:
    classes = model.classes if model is not None else ()
    probs = result.probs or []  # None: too short for one output window, no prediction
    order = sorted(range(len(probs)), key=lambda i: -probs[i])

    def name(i: int) -> Any:
        return classes[i] if i < len(classes) else i

    prediction = result.label if result.label is not None else (name(order[0]) if order else None)
    return {
        "source": sample.name,
        "events": len(sample.recording),  # read and sent
        "events_processed": result.events,
        "cropped": result.cropped,
        "filtered": result.filtered,
        "sensor": None if sample.sensor is None else sample.sensor.to_dict(),
        "sensor_from": sample.geometry,
        "label": sample.label,
        "label_name": sample.label_name(classes),
        "prediction": prediction,
        "probability": probs[order[0]] if order else None,
        # no prediction at all for a labelled recording counts as a miss
        "correct": (sample.is_correct(prediction, classes) if prediction is not None
                    else (False if sample.label is not None else None)),
        "top": [[name(i), probs[i]] for i in order[:top]],
        "probs": result.probs,
        "no_answer": None if result.probs is not None else (
            model.too_few_events() if model is not None else "too few events for an answer"),
    }


def _say_busy_once() -> Callable[[float, str], None]:
    """One stderr line the first time the server answers ``busy`` (a server that has just
    started compiles its classify shapes after it is ready), however often it is retried."""
    said = False

    def say(delay_s: float, message: str) -> None:
        nonlocal said
        if not said:
            said = True
            print(f"evssm classify: server busy ({message}); retrying", file=sys.stderr, flush=True)
    return say


def run(args: argparse.Namespace) -> int:
    try:
        model = _server_model(args)
        samples = _load_samples(args, model)
        started = time.monotonic()
        transform = transform_of(args)
        if model is not None:
            for s in samples:
                problem = check_sensor(s.recording, model.sensor, s.declared_sensor)
                if problem:
                    raise SourceError(f"{s.name}: {problem}")
        undeclared = [s.name for s in samples if s.declared_sensor is None]
        if transform is not None and undeclared:
            raise SourceError(f"{undeclared[0]}: the file does not state its sensor geometry; "
                              "give --sensor WxH for --crop/--scale/--flip")
        results = classify(args.url, [s.recording for s in samples], model=args.model,
                           batch_size=args.batch, timeout=args.timeout, api_key=args.api_key,
                           sensors=[s.declared_sensor for s in samples], transform=transform,
                           filters=args.filters,
                           on_busy=_say_busy_once())
        elapsed = time.monotonic() - started
    except ClientError as exc:
        print(f"evssm classify: {error_line(exc)}", file=sys.stderr)
        return exit_code(exc)
    rows = [_row(s, r, model, args.top) for s, r in zip(samples, results, strict=True)]
    judged = [r["correct"] for r in rows if r["correct"] is not None]
    events = sum(r["events"] for r in rows)
    report = {
        "url": args.url,
        "model": results[0].model if results else (model.name if model else None),
        "results": rows,
        "accuracy": sum(judged) / len(judged) if judged else None,
        "labelled": len(judged),
        "elapsed_s": round(elapsed, 4),
        "events_per_s": round(events / elapsed, 1) if elapsed > 0 else None,
    }
    if args.json:
        print(json.dumps(report))
    else:
        _print_table(report)
    return 0


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"evssm classify — model {report['model']}", header_style="bold")
    right = ("events", "p")
    for column in ("source", "events", "label", "prediction", "p", "top classes"):
        table.add_column(column, justify="right" if column in right else "left")
    for r in report["results"]:
        mark = {True: "[green]✓[/] ", False: "[red]✗[/] ", None: ""}[r["correct"]]
        table.add_row(r["source"], f"{r['events']:,}", str(r["label_name"] or "-"),
                      f"{mark}{r['prediction'] if r['prediction'] is not None else 'no answer'}",
                      f"{r['probability']:.3f}"
                      if r["probability"] is not None else "-",
                      "  ".join(f"{label} {p:.2f}" for label, p in r["top"]))
    console = Console()
    console.print(table)
    unanswered = [r for r in report["results"] if r["no_answer"]]
    for r in unanswered[:5]:
        console.print(f"{r['source']}: {r['no_answer']}", soft_wrap=True)
    if len(unanswered) > 5:
        console.print(f"... and {len(unanswered) - 5} more recordings without an answer")
    n = len(report["results"])
    tail = f"{n} recording{'' if n == 1 else 's'} in {report['elapsed_s']:.2f} s"
    if report["accuracy"] is not None:
        tail += f", accuracy {report['accuracy']:.1%} of {report['labelled']} labelled"
    console.print(tail)
