"""Input pipeline: recordings -> padded, bucketed batches of tokens and time gaps (NumPy).

Training batches are shuffled per epoch with a seeded generator, augmented (training only), cut-mixed
(labels mixed by event fraction), cropped to ``max_events`` and padded to a multiple of
``pad_unit`` events so that shapes repeat and compilations stay few. A background thread prepares
the next batches while the accelerator works.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .data import AugmentConfig, EventDataset, augment
from .events import PAD_TOKEN, Recording, SensorSpec, time_gaps, tokenize


@dataclass
class Batch:
    """tokens, gaps int32 [B, L]; lengths int32 [B]; targets float32 [B, C] (soft);
    labels int32 [B]; weights float32 [B] (0 for padding rows)."""

    tokens: np.ndarray
    gaps: np.ndarray
    lengths: np.ndarray
    targets: np.ndarray
    labels: np.ndarray
    weights: np.ndarray

    @property
    def num_events(self) -> int:
        return int(self.lengths.sum())

    def rows(self, index: slice | np.ndarray) -> Batch:
        """The batch of rows ``index`` (one process's share of a global batch, or a group)."""
        return Batch(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def bucket_length(n: int, pad_unit: int) -> int:
    """Smallest multiple of ``pad_unit`` that holds ``n`` events (at least one unit)."""
    return max(1, -(-n // pad_unit)) * pad_unit


def make_batch(recordings: Sequence[Recording], targets: np.ndarray, labels: np.ndarray,
               sensor: SensorSpec, pad_unit: int, batch_size: int | None = None) -> Batch:
    """Pad recordings into one batch; ``batch_size`` rows (extra rows are weight-0 padding)."""
    rows = batch_size or len(recordings)
    length = bucket_length(max((len(r) for r in recordings), default=1), pad_unit)
    tokens = np.full((rows, length), PAD_TOKEN, np.int32)
    gaps = np.zeros((rows, length), np.int32)
    lengths = np.zeros(rows, np.int32)
    for i, rec in enumerate(recordings):
        n = len(rec)
        tokens[i, :n] = tokenize(sensor, rec.x, rec.y, rec.p, check=False)
        gaps[i, :n] = time_gaps(rec.t, check=False)
        lengths[i] = n
    num_classes = targets.shape[1]
    full_targets = np.zeros((rows, num_classes), np.float32)
    full_targets[:len(recordings)] = targets
    full_labels = np.zeros(rows, np.int32)
    full_labels[:len(recordings)] = labels
    weights = np.zeros(rows, np.float32)
    weights[:len(recordings)] = 1.0
    return Batch(tokens, gaps, lengths, full_targets, full_labels, weights)


def crop_to(rec: Recording, max_events: int | None, rng: np.random.Generator | None) -> Recording:
    """A contiguous window of at most ``max_events`` (random start with ``rng``, else the start)."""
    if max_events is None or len(rec) <= max_events:
        return rec
    start = int(rng.integers(0, len(rec) - max_events + 1)) if rng is not None else 0
    return rec.slice(start, start + max_events)


def train_batches(dataset: EventDataset, batch_size: int, num_classes: int, pad_unit: int,
                  max_events: int | None, augment_cfg: AugmentConfig | None, seed: int,
                  epoch: int, shard: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
    """One epoch of augmented training batches (the last incomplete batch is dropped).

    ``shard = (k, n)``: rows ``k*b .. (k+1)*b - 1`` (``b = batch_size / n``) of every global batch of
    ``batch_size``, the part process ``k`` of ``n`` feeds. The epoch's order is drawn from
    ``(seed, epoch)``; sample ``j`` of the order draws its augmentation from ``(seed, epoch, j)``
    alone, so a row is the same whichever process makes it, and each process makes only its own.
    """
    k, n = shard
    if batch_size % n or not 0 <= k < n:
        raise ValueError(f"batch_size {batch_size} cannot be split into {n} equal shards")
    rows = batch_size // n
    order = np.random.default_rng([seed, epoch]).permutation(len(dataset))
    sensor = dataset.sensor
    eye = np.eye(num_classes, dtype=np.float32)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        recs, targets, labels = [], [], []
        for j in range(start + k * rows, start + (k + 1) * rows):
            rng = np.random.default_rng([seed, epoch, j])
            rec, label = dataset[int(order[j])]
            target = eye[label]
            if augment_cfg is not None:
                rec = augment.augment(rec, sensor, rng, augment_cfg)
                if augment_cfg.cut_mix_p > 0 and rng.random() < augment_cfg.cut_mix_p:
                    other, other_label = dataset[int(rng.integers(len(dataset)))]
                    rec, lam = augment.cut_mix(rec, other, rng, augment_cfg.cut_mix_max)
                    target = (1 - lam) * target + lam * eye[other_label]
            recs.append(crop_to(rec, max_events, rng))
            targets.append(target)
            labels.append(label)
        yield make_batch(recs, np.stack(targets), np.array(labels), sensor, pad_unit)


def pad_batch(batch: Batch, length: int) -> Batch:
    """``batch`` with its event axis padded to ``length`` (>= its own) with padding events, so
    that every process of a job feeds one shape."""
    extra = length - batch.tokens.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad a batch of {batch.tokens.shape[1]} events to {length}")
    if extra == 0:
        return batch
    widen = lambda a, fill: np.pad(a, ((0, 0), (0, extra)), constant_values=fill)  # noqa: E731
    return Batch(widen(batch.tokens, PAD_TOKEN), widen(batch.gaps, 0), batch.lengths,
                 batch.targets, batch.labels, batch.weights)


def length_groups(batch: Batch, groups: int, pad_unit: int) -> list[Batch]:
    """The rows of ``batch`` sorted by length (stable) and cut into ``groups`` groups of equal
    size, each padded only to its own longest row (a multiple of ``pad_unit``): the same rows
    with less padding. ``groups`` must divide the batch's rows."""
    rows = len(batch.lengths)
    if groups < 1 or rows % groups:
        raise ValueError(f"a batch of {rows} rows cannot be cut into {groups} equal groups")
    order = np.argsort(batch.lengths, kind="stable")
    parts = []
    for index in np.split(order, groups):
        length = bucket_length(int(batch.lengths[index].max()), pad_unit)
        part = batch.rows(index)
        parts.append(dataclasses.replace(part, tokens=part.tokens[:, :length],
                                         gaps=part.gaps[:, :length]))
    return parts


def eval_order(dataset: EventDataset, max_events: int | None = None) -> np.ndarray:
    """Sample indices of ``dataset`` by length (stable; cropped to ``max_events``): batches taken
    in this order need the least padding."""
    lengths = dataset.event_counts()
    if max_events is not None:
        lengths = np.minimum(lengths, max_events)
    return np.argsort(lengths, kind="stable")


def eval_batches(dataset: EventDataset, batch_size: int, num_classes: int, pad_unit: int,
                 max_events: int | None = None, order: Sequence[int] | np.ndarray | None = None
                 ) -> Iterator[Batch]:
    """Every sample once, in ``order`` (default: the data set's); the last batch is padded with
    weight-0 rows."""
    eye = np.eye(num_classes, dtype=np.float32)
    order = range(len(dataset)) if order is None else order
    for start in range(0, len(order), batch_size):
        items = [dataset[int(i)] for i in order[start:start + batch_size]]
        recs = [crop_to(rec, max_events, None) for rec, _ in items]
        labels = np.array([label for _, label in items])
        yield make_batch(recs, eye[labels], labels, dataset.sensor, pad_unit, batch_size)


def prefetch(batches: Iterable[Batch], size: int = 2) -> Iterator[Batch]:
    """Produce ``batches`` on a background thread, ``size`` ahead."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            for item in batches:
                q.put(item)
        except BaseException as exc:  # surfaced in the consumer
            errors.append(exc)
        finally:
            q.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            if errors:
                raise errors[0]
            return
        yield item
