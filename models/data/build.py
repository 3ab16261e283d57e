"""evssm data: list, build or inspect the event data sets.

    evssm data list [--data-dir DIR]                 names, splits, sizes if present, where files go
    evssm data build NAME [--data-dir DIR] [--force] build a data set the project makes (event-mnist,
                                                     spoken-digits); for real benchmarks, check files
    evssm data info NAME [--split S] [--limit N] [--json]
                                                     samples, events per sample, rates, class balance
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .base import DATA_DIR_ENV, DATASETS, EventDataset, get_spec, load_dataset, resolve_data_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{list,build,info}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, default=None,
                        help=f"data directory (default: ${DATA_DIR_ENV} or ~/.cache/evssm/data)")
    sub.add_parser("list", parents=[common], help="data sets, splits, sizes, where files go")
    b = sub.add_parser("build", parents=[common], help="build (and cache) a data set the project makes")
    b.add_argument("name", choices=list(DATASETS))
    b.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    b.add_argument("--split", action="append", default=None, help="only this split (repeatable)")
    i = sub.add_parser("info", parents=[common], help="statistics of one split")
    i.add_argument("name", choices=list(DATASETS))
    i.add_argument("--split", default="train")
    i.add_argument("--limit", type=int, default=None, help="only the first N samples")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    data_dir = resolve_data_dir(args.data_dir)
    try:
        if args.action == "list":
            return _list(data_dir)
        if args.action == "build":
            return _build(args.name, data_dir, args.force, args.split)
        return _info(args.name, args.split, data_dir, args.limit, args.json)
    except (FileNotFoundError, ValueError) as e:
        print(f"evssm data: {e}", file=sys.stderr)
        return 1


def split_status(name: str, split: str, data_dir: Path) -> str:
    """"N samples" if the split can be opened without building anything, else why not."""
    spec = get_spec(name)
    if spec.cached is not None:
        cached = spec.resolve("cached")(data_dir, split)
        return f"{cached} samples" if cached is not None else "not built"
    try:
        return f"{len(load_dataset(name, split, data_dir))} samples"
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as e:
        return f"unreadable ({e})"


def _list(data_dir: Path) -> int:
    print(f"data directory: {data_dir}  (--data-dir or ${DATA_DIR_ENV})")
    for spec in DATASETS.values():
        s = spec.sensor
        geometry = f"1-D {s.channels} channels" if s.kind == "1d" else f"2-D {s.width}x{s.height}x2"
        splits = ", ".join(f"{sp}: {split_status(spec.name, sp, data_dir)}" for sp in spec.splits)
        print(f"\n{spec.name}  ({geometry}, {spec.num_classes} classes)  {spec.description}")
        print(f"  splits: {splits}")
        if spec.valid_fraction:
            print(f"  valid:  {spec.valid_fraction:g} of each class of the train file, carved "
                  f"from it (train is the rest)")
        print(f"  files:  {spec.files}")
    return 0


def _build(name: str, data_dir: Path, force: bool, splits: list[str] | None) -> int:
    spec = get_spec(name)
    if spec.builder is None:
        # Nothing to make: report whether the files are where the reader looks.
        for split in splits or spec.splits:
            load_dataset(name, split, data_dir)  # raises FileNotFoundError naming the files
        print(f"{name}: files present in {data_dir}; nothing to build")
        return 0
    for split in splits or ():
        if split not in spec.splits:
            raise ValueError(f"{name} has splits {spec.splits}, not {split!r}")
    start = time.perf_counter()
    paths = spec.resolve("builder")(data_dir, splits=tuple(splits or spec.splits), force=force)
    for split, path in paths.items():
        print(f"{name}/{split}: {path}")
    print(f"{name}: done in {time.perf_counter() - start:.1f} s")
    return 0


def dataset_stats(ds: EventDataset, limit: int | None = None) -> dict[str, Any]:
    """Events per sample, durations, rates and class balance of (the first ``limit`` of) ``ds``."""
    n = len(ds) if limit is None else min(limit, len(ds))
    counts = np.zeros(n, np.int64)
    durations = np.zeros(n, np.int64)
    labels = np.zeros(n, np.int64)
    for i in range(n):
        rec, labels[i] = ds[i]
        counts[i] = len(rec)
        durations[i] = int(rec.t[-1] - rec.t[0]) if len(rec) else 0
    rates = counts[durations > 0] / (durations[durations > 0] * 1e-6)
    summary = lambda a: {"mean": float(a.mean()), "median": float(np.median(a)), "min": float(a.min()),  # noqa: E731
                         "max": float(a.max())} if a.size else {}
    balance = np.bincount(labels, minlength=ds.num_classes)
    return {
        "name": ds.name, "split": ds.split, "samples": n, "sensor": ds.sensor.to_dict(),
        "events_per_sample": summary(counts), "total_events": int(counts.sum()),
        "duration_ms": summary(durations / 1000.0), "events_per_second": summary(rates),
        "class_balance": {ds.class_names[c]: int(k) for c, k in enumerate(balance)},
    }


def _info(name: str, split: str, data_dir: Path, limit: int | None, as_json: bool) -> int:
    ds = load_dataset(name, split, data_dir)
    stats = dataset_stats(ds, limit)
    if as_json:
        print(json.dumps(stats))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{name}/{split}: {stats['samples']} samples, {stats['total_events']} events")
    for col in ("", "mean", "median", "min", "max"):
        table.add_column(col, justify="right")
    for key, fmt in (("events_per_sample", "{:.0f}"), ("duration_ms", "{:.1f}"), ("events_per_second", "{:.0f}")):
        s = stats[key]
        table.add_row(key, *(fmt.format(s[k]) if s else "-" for k in ("mean", "median", "min", "max")))
    console = Console()
    console.print(table)
    console.print("class balance: " + ", ".join(f"{k}: {v}" for k, v in stats["class_balance"].items()))
    return 0
