"""Non-neural baselines on event-count histograms, so a model's accuracy means something.

    python -m evssm.models.data.baseline NAME [--data-dir DIR] [--time-bins K] [--train-limit N]

Features: events counted per address — per channel (1-D) or per pixel and polarity (2-D, pooled
``pool x pool`` so at most ~2,000 pixels remain) — optionally in ``K`` equal time bins of each
recording's duration; then ``log1p`` and standardised with the training split's statistics.
Classifiers (NumPy only): softmax regression trained by full-batch gradient descent (Adam steps,
L2 penalty), and nearest class centroid. Prints one JSON line with both test accuracies and chance.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from ..events import SensorSpec
from .base import DATASETS, EventDataset, load_dataset, resolve_data_dir


def spatial_pool(sensor: SensorSpec, max_pixels: int = 4096) -> int:
    """Pooling factor for 2-D sensors so that ``2 * (W/pool) * (H/pool) <= max_pixels``."""
    if sensor.kind == "1d":
        return 1
    return max(1, math.ceil(math.sqrt(2 * sensor.width * sensor.height / max_pixels)))


def count_features(ds: EventDataset, time_bins: int = 1, limit: int | None = None,
                   pool: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(features float32 [N, time_bins * A], labels int64 [N])``: raw event counts per address.

    ``A`` = channels (1-D) or ``2 * ceil(W/pool) * ceil(H/pool)`` (2-D, address ``p, y, x``).
    """
    s = ds.sensor
    pool = spatial_pool(s) if pool is None else pool
    if s.kind == "1d":
        n_addr = s.channels
    else:
        gw, gh = -(-s.width // pool), -(-s.height // pool)
        n_addr = 2 * gw * gh
    n = len(ds) if limit is None else min(limit, len(ds))
    feats = np.zeros((n, time_bins * n_addr), np.float32)
    labels = np.zeros(n, np.int64)
    for i in range(n):
        rec, labels[i] = ds[i]
        if len(rec) == 0:
            continue
        if s.kind == "1d":
            addr = rec.x.astype(np.int64)
        else:
            assert rec.y is not None and rec.p is not None
            addr = (rec.p.astype(np.int64) * gh + rec.y // pool) * gw + rec.x // pool
        span = int(rec.t[-1] - rec.t[0]) + 1
        tb = (rec.t - rec.t[0]) * time_bins // span
        feats[i] = np.bincount(tb * n_addr + addr, minlength=time_bins * n_addr)
    return feats, labels


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """``log1p`` then zero mean, unit variance per feature using ``train``'s statistics."""
    train = np.log1p(train)
    mu, sd = train.mean(0), train.std(0) + 1e-3
    return [(train - mu) / sd] + [(np.log1p(o) - mu) / sd for o in others]


def softmax_regression(x: np.ndarray, y: np.ndarray, num_classes: int, *, steps: int = 400,
                       lr: float = 0.01, l2: float = 1e-3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression ``softmax(x @ w + b)``, full-batch Adam on mean CE + L2.

    ``x`` [N, F] float, ``y`` int [N]. Returns ``(w [F, C], b [C])``.
    """
    rng = np.random.default_rng(seed)
    n, f = x.shape
    w = 0.01 * rng.standard_normal((f, num_classes)).astype(np.float32)
    b = np.zeros(num_classes, np.float32)
    onehot = np.eye(num_classes, dtype=np.float32)[y]
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    b1, b2, eps = 0.9, 0.999, 1e-8
    for k in range(1, steps + 1):
        z = x @ w + b
        z -= z.max(1, keepdims=True)
        prob = np.exp(z)
        prob /= prob.sum(1, keepdims=True)
        g = (prob - onehot) / n
        grads = [x.T @ g + l2 * w, g.sum(0)]
        for j, (param, grad) in enumerate(zip((w, b), grads, strict=True)):
            m[j] = b1 * m[j] + (1 - b1) * grad
            v[j] = b2 * v[j] + (1 - b2) * grad * grad
            param -= lr * (m[j] / (1 - b1 ** k)) / (np.sqrt(v[j] / (1 - b2 ** k)) + eps)
    return w, b


def nearest_centroid(x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Predicted class of each row of ``x``: the closest class mean of ``x_train`` (Euclidean)."""
    cent = np.stack([x_train[y_train == c].mean(0) if (y_train == c).any() else
                     np.full(x_train.shape[1], np.inf) for c in range(num_classes)])
    d = (x * x).sum(1)[:, None] - 2 * x @ cent.T + (cent * cent).sum(1)[None, :]
    return np.argmin(d, axis=1)


def evaluate(train: EventDataset, test: EventDataset, *, time_bins: int = 1, train_limit: int | None = None,
             test_limit: int | None = None, steps: int = 400, l2: float = 1e-3) -> dict[str, float | int | str]:
    """Both baselines trained on ``train`` and scored on ``test``."""
    xtr, ytr = count_features(train, time_bins, train_limit)
    xte, yte = count_features(test, time_bins, test_limit)
    xtr, xte = standardise(xtr, xte)
    c = train.num_classes
    w, b = softmax_regression(xtr, ytr, c, steps=steps, l2=l2)
    acc_lr = float(((xte @ w + b).argmax(1) == yte).mean())
    acc_nc = float((nearest_centroid(xtr, ytr, xte, c) == yte).mean())
    counts = np.bincount(ytr, minlength=c)
    return {"dataset": train.name, "train": len(ytr), "test": len(yte), "features": int(xtr.shape[1]),
            "time_bins": time_bins, "softmax_regression_acc": round(acc_lr, 4),
            "nearest_centroid_acc": round(acc_nc, 4),
            "majority_class_acc": round(float((yte == counts.argmax()).mean()), 4),
            "chance": round(1.0 / c, 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evssm.models.data.baseline", description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=list(DATASETS))
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--time-bins", type=int, default=1)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--test-split", default="test")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--l2", type=float, default=1e-3)
    args = ap.parse_args(argv)
    data_dir = resolve_data_dir(args.data_dir)
    start = time.perf_counter()
    try:
        train = load_dataset(args.name, "train", data_dir)
        test = load_dataset(args.name, args.test_split, data_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"baseline: {e}", file=sys.stderr)
        return 1
    result = evaluate(train, test, time_bins=args.time_bins, train_limit=args.train_limit,
                      test_limit=args.test_limit, steps=args.steps, l2=args.l2)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
