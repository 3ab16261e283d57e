"""spoken-digits: the 20 SHD words from speech synthesisers, through a simulated cochlea.

Classes (SHD's order): 0..9 English "zero".."nine", 10..19 German "null".."neun".

Speakers: 5 flite voices (kal, kal16, awb, rms, slt; German words respelled for their English
letter-to-sound rules) and ``espeak_speakers`` espeak-ng speakers, each an espeak-ng voice variant
with an English accent, a base pitch and a base speed (German words with the same variant and the
``de`` voice). Every speaker says every word ``renditions`` times with jittered speed and pitch.
Speakers are split, seeded, into train and test: **test voices are never heard in training**.

Sound to spikes (a cochlea-like front end, like the one SHD used, much simplified):

1. resample to 16 kHz; trim silence; normalise loudness (+- 3 dB); pad with 20-120 ms of silence
   before and 50 ms after; add white and brown noise at a random SNR (10-30 dB);
2. pre-emphasis; 700 channels with centre frequencies log-spaced from 80 Hz to 7.6 kHz (channel
   0 lowest): band energies from a short-time power spectrum (16 ms Hann window, 1 ms hop)
   weighted by a Gaussian of width ~1 ERB around each centre (computed at every 4th channel and
   interpolated between);
3. half-wave rectified, log-compressed envelopes (dB over a floor) drive one leaky
   integrate-and-fire neuron per channel (tau 5 ms, threshold 1 with spike-triggered adaptation,
   at most one spike per 1 ms step, spike time interpolated within the step; fixed per-channel
   threshold mismatch).

Written in SHD's exact HDF5 layout (``spikes/times`` float16 s, ``spikes/units`` uint16, ``labels``
uint16, ``extra/keys``, ``extra/speaker``) as ``<data_dir>/spoken-digits/spoken_digits_<split>.h5``,
so the SHD reader reads it unchanged. A file carries the hash of the parameters (root attribute
``evssm_params_hash``); a changed hash rebuilds. Each utterance's randomness is seeded from
(seed, speaker, word, rendition); the audio depends on the installed espeak-ng / flite versions
(recorded in the file's attributes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..dataset_facts import SHD_CLASSES as CLASS_NAMES
from ..dataset_facts import SHD_GERMAN as GERMAN
from .base import missing_files_error, progress_bar
from .shd import SpikesH5Dataset, write_spikes_h5

NAME = "spoken-digits"
FRONTEND_VERSION = 1
SPLITS = ("train", "test")
INSTALL = "apt-get install -y espeak-ng flite"

# flite only has English letter-to-sound rules: spell the German words the way they sound.
FLITE_GERMAN = {"null": "nool", "eins": "ines", "zwei": "tsvy", "drei": "dry", "vier": "feer",
                "fünf": "foonf", "sechs": "zeks", "sieben": "zeeben", "acht": "ahkt", "neun": "noyn"}
FLITE_VOICES = {"kal": 105.0, "kal16": 105.0, "awb": 115.0, "rms": 100.0, "slt": 170.0}  # ~mean f0, Hz
ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc",
                  "en-gb-x-gbclan", "en-gb-x-gbcwmd")
ESPEAK_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
    "klatt3", "klatt4", "klatt5", "klatt6", "croak", "Alex", "Alicia", "Andrea", "Andy", "Annie", "Denis",
    "Diogo", "Gene", "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario", "Michael", "Mike", "Nguyen",
    "Storm", "adam", "anika", "antonio", "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed",
    "edward", "grandma", "grandpa", "gustave", "iven", "john", "kaukovalta", "linda", "marcelo", "max",
    "michel", "miguel", "norbert", "pablo", "paul", "pedro", "quincy", "rob", "robert", "sandro",
    "shelby", "steph", "travis", "victor", "zac",
)


@dataclass(frozen=True)
class SpokenDigitsParams:
    """Everything that determines the data set (hashed into the files)."""

    seed: int = 2_020
    espeak_speakers: int = 45
    renditions: int = 3  # per speaker and word
    test_speakers: int = 10  # one flite voice among them
    sample_rate: int = 16_000
    channels: int = 700
    f_min: float = 80.0
    f_max: float = 7_600.0
    window: int = 256  # samples (16 ms)
    hop: int = 16  # samples (1 ms): the neurons' time step
    band_stride: int = 4  # band energies computed every 4th channel, interpolated between
    preemphasis: float = 0.95
    speed_jitter: float = 0.15  # relative
    pitch_jitter: float = 0.12  # relative
    snr_db: tuple[float, float] = (10.0, 30.0)
    lead_ms: tuple[float, float] = (20.0, 120.0)
    tail_ms: float = 50.0
    floor_db: float = -28.0  # band level (re. evenly spread speech) where the drive starts
    range_db: float = 25.0  # levels over the floor that give a drive of `gain`
    gain: float = 1.5  # in thresholds
    tau_ms: float = 5.0
    adapt_tau_ms: float = 60.0
    adapt_step: float = 0.25  # threshold increase per spike
    threshold_mismatch: float = 0.05

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        blob = json.dumps({"version": FRONTEND_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Speaker:
    """One voice: ``engine`` "espeak-ng" | "flite"; ``voice`` an espeak variant or a flite voice."""

    engine: str
    voice: str
    accent: str = ""  # espeak-ng English voice
    pitch: float = 50.0  # espeak-ng 0..99; flite mean f0 in Hz
    speed: float = 1.0  # espeak-ng words per minute; flite duration stretch

    @property
    def name(self) -> str:
        if self.engine == "flite":
            return f"flite:{self.voice}"
        return f"espeak-ng:{self.accent}+{self.voice}:p{self.pitch:.0f}:s{self.speed:.0f}"


# ---------------------------------------------------------------------------------------------
# speakers and utterances


def speakers(params: SpokenDigitsParams = SpokenDigitsParams()) -> tuple[list[Speaker], np.ndarray]:
    """All speakers and a bool [S] that marks the test speakers (seeded)."""
    rng = np.random.default_rng([params.seed, 1])
    out = [Speaker("flite", v, pitch=f0, speed=1.0) for v, f0 in FLITE_VOICES.items()]
    if params.espeak_speakers > len(ESPEAK_VARIANTS):
        raise ValueError(f"at most {len(ESPEAK_VARIANTS)} espeak-ng speakers (one per variant)")
    variants = rng.permutation(len(ESPEAK_VARIANTS))[:params.espeak_speakers]
    for k, v in enumerate(variants):
        out.append(Speaker("espeak-ng", ESPEAK_VARIANTS[v], ESPEAK_ACCENTS[k % len(ESPEAK_ACCENTS)],
                           pitch=float(rng.integers(25, 76)), speed=float(rng.integers(130, 196))))
    n_flite = len(FLITE_VOICES)
    if not 2 <= params.test_speakers <= len(out) - 2:
        raise ValueError("test_speakers must leave at least two speakers on each side")
    test = np.zeros(len(out), bool)
    test[rng.integers(0, n_flite)] = True  # one flite voice, so both engines are tested
    test[n_flite + rng.permutation(len(out) - n_flite)[:params.test_speakers - 1]] = True
    return out, test


@dataclass(frozen=True)
class Utterance:
    speaker: int
    label: int
    rendition: int


def utterances(split: str, params: SpokenDigitsParams = SpokenDigitsParams()) -> list[Utterance]:
    """The utterances of ``split``, in a seeded random order."""
    if split not in SPLITS:
        raise ValueError(f"spoken-digits has splits {SPLITS}, not {split!r}")
    _, test = speakers(params)
    chosen = np.flatnonzero(test if split == "test" else ~test)
    items = [Utterance(int(s), w, r) for s in chosen for w in range(len(CLASS_NAMES))
             for r in range(params.renditions)]
    order = np.random.default_rng([params.seed, 2, 0 if split == "train" else 1]).permutation(len(items))
    return [items[i] for i in order]


def utterance_rng(params: SpokenDigitsParams, u: Utterance) -> np.random.Generator:
    return np.random.default_rng([params.seed, 3, u.speaker, u.label, u.rendition])


# ---------------------------------------------------------------------------------------------
# synthesis


def check_tools() -> None:
    """Raise with the install instruction when espeak-ng or flite is missing."""
    missing = [t for t in ("espeak-ng", "flite") if shutil.which(t) is None]
    if missing:
        raise FileNotFoundError(f"spoken-digits needs {' and '.join(missing)} to build; install with: {INSTALL}")


def tool_versions() -> dict[str, str]:
    out = {}
    for tool, flag in (("espeak-ng", "--version"), ("flite", "--version")):
        try:
            res = subprocess.run([tool, flag], capture_output=True, text=True, timeout=10)
            out[tool] = (res.stdout or res.stderr).strip().splitlines()[-1] if (res.stdout or res.stderr) else ""
        except (OSError, subprocess.TimeoutExpired):
            out[tool] = "unavailable"
    return out


def parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit PCM WAV bytes -> ``(float32 [n] in [-1, 1], sample rate)``.

    Tolerates the bogus sizes espeak-ng writes when streaming to stdout (takes all bytes after
    the ``data`` chunk header).
    """
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE stream")
    pos, rate, bits, channels = 12, 0, 16, 1
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if cid == b"fmt ":
            channels = int.from_bytes(data[pos + 10:pos + 12], "little")
            rate = int.from_bytes(data[pos + 12:pos + 16], "little")
            bits = int.from_bytes(data[pos + 22:pos + 24], "little")
        elif cid == b"data":
            if bits != 16:
                raise ValueError(f"expected 16-bit PCM, got {bits}-bit")
            raw = data[pos + 8:pos + 8 + min(size, len(data) - pos - 8)]
            pcm = np.frombuffer(raw[:len(raw) // 2 * 2], "<i2").astype(np.float32) / 32768.0
            return pcm.reshape(-1, channels).mean(1) if channels > 1 else pcm, rate
        pos += 8 + size + (size & 1)
    raise ValueError("WAV stream has no data chunk")


def synthesize(speaker: Speaker, word: str, rng: np.random.Generator, params: SpokenDigitsParams,
               tmpdir: str) -> tuple[np.ndarray, int]:
    """Say ``word`` with ``speaker``, speed and pitch jittered by ``rng``: ``(audio, rate)``."""
    speed = 1 + rng.uniform(-params.speed_jitter, params.speed_jitter)
    pitch = 1 + rng.uniform(-params.pitch_jitter, params.pitch_jitter)
    german = word in GERMAN
    if speaker.engine == "espeak-ng":
        voice = f"{'de' if german else speaker.accent}+{speaker.voice}"
        cmd = ["espeak-ng", "-v", voice, "-s", str(int(round(speaker.speed * speed))),
               "-p", str(int(np.clip(round(speaker.pitch * pitch), 0, 99))), "--stdout", word]
        res = subprocess.run(cmd, capture_output=True, timeout=60, check=True)
        return parse_wav(res.stdout)
    text = FLITE_GERMAN[word] if german else word
    fd, path = tempfile.mkstemp(suffix=".wav", dir=tmpdir)
    os.close(fd)
    try:
        cmd = ["flite", "-voice", speaker.voice, "--setf", f"duration_stretch={1 / speed:.3f}",
               "--setf", f"int_f0_target_mean={speaker.pitch * pitch:.1f}", "-t", text, "-o", path]
        subprocess.run(cmd, capture_output=True, timeout=60, check=True)
        return parse_wav(Path(path).read_bytes())
    finally:
        os.unlink(path)


# ---------------------------------------------------------------------------------------------
# the cochlea


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited resampling by zero-padding / truncating the spectrum."""
    if rate == target or audio.size == 0:
        return audio.astype(np.float32)
    n_out = int(round(audio.size * target / rate))
    spec = np.fft.rfft(audio)
    keep = min(spec.size, n_out // 2 + 1)
    new = np.zeros(n_out // 2 + 1, dtype=complex)
    new[:keep] = spec[:keep]
    out = np.fft.irfft(new, n=n_out) * (n_out / audio.size)
    return out.astype(np.float32)


def centre_frequencies(params: SpokenDigitsParams = SpokenDigitsParams()) -> np.ndarray:
    """Channel centre frequencies, Hz [channels], log-spaced, channel 0 lowest."""
    return np.geomspace(params.f_min, params.f_max, params.channels)


def filterbank(params: SpokenDigitsParams = SpokenDigitsParams()) -> np.ndarray:
    """Weights [bands, window // 2 + 1] from power-spectrum bins to the energies of the bands at
    every ``band_stride``-th channel's centre frequency.

    A Gaussian around each centre with a standard deviation of one ERB (Glasberg & Moore), but at
    least one bin, each row summing to one.
    """
    fc = centre_frequencies(params)[::params.band_stride]
    bins = np.fft.rfftfreq(params.window, 1.0 / params.sample_rate)
    erb = 24.7 * (4.37 * fc / 1000.0 + 1.0)
    sd = np.maximum(erb, bins[1])
    w = np.exp(-0.5 * ((bins[None, :] - fc[:, None]) / sd[:, None]) ** 2)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def prepare_audio(audio: np.ndarray, rate: int, rng: np.random.Generator,
                  params: SpokenDigitsParams) -> np.ndarray:
    """Resample, trim, normalise, pad and add noise (see module docstring): float32 [n] at 16 kHz."""
    sr = params.sample_rate
    x = resample(audio, rate, sr)
    frame = sr // 100
    if x.size >= frame:
        env = np.sqrt(np.convolve(x * x, np.ones(frame) / frame, mode="same"))
        loud = np.flatnonzero(env > 0.05 * env.max())
        x = x[max(0, loud[0] - frame):loud[-1] + frame] if loud.size else x
    rms = np.sqrt(np.mean(x * x)) if x.size else 0.0
    x = x * (0.1 / rms if rms > 0 else 0.0) * 10 ** (rng.uniform(-3, 3) / 20)
    lead = int(rng.uniform(*params.lead_ms) * sr / 1000)
    tail = int(params.tail_ms * sr / 1000)
    x = np.concatenate([np.zeros(lead, np.float32), x.astype(np.float32), np.zeros(tail, np.float32)])
    # white plus brown (1/f^2 power, flat below 50 Hz) noise, shaped in the frequency domain
    spec = np.fft.rfft(rng.standard_normal(x.size))
    f = np.fft.rfftfreq(x.size, 1.0 / sr)
    white, brown = np.fft.irfft(spec, x.size), np.fft.irfft(spec * (50.0 / np.maximum(f, 50.0)), x.size)
    noise = white / (white.std() + 1e-12) + brown / (brown.std() + 1e-12)
    snr = rng.uniform(*params.snr_db)
    noise *= 0.1 * 10 ** (-snr / 20) / noise.std()
    return (x + noise).astype(np.float32)


def channel_mismatch(params: SpokenDigitsParams) -> np.ndarray:
    """The simulated sensor's fixed per-channel threshold factors [channels]."""
    rng = np.random.default_rng([params.seed, 4])
    return (1 + params.threshold_mismatch * rng.standard_normal(params.channels)).clip(0.7, 1.3)


def envelopes(x: np.ndarray, params: SpokenDigitsParams, fb: np.ndarray | None = None) -> np.ndarray:
    """Channel levels in dB float32 [frames, channels] (one frame per ``hop``), relative to the
    level of a band when normalised speech (rms 0.1) spreads its power evenly over the spectrum."""
    fb = filterbank(params) if fb is None else fb
    win, hop = params.window, params.hop
    # pre-emphasis (+6 dB/octave, like the outer and middle ear) so high channels hear consonants
    x = np.concatenate([x[:1], x[1:] - params.preemphasis * x[:-1]]) if x.size else x
    pad = np.concatenate([np.zeros(win // 2, np.float32), x, np.zeros(win // 2, np.float32)])
    n = max(1, (pad.size - win) // hop + 1)
    frames = np.lib.stride_tricks.sliding_window_view(pad, win)[::hop][:n] * np.hanning(win).astype(np.float32)
    power = (np.abs(np.fft.rfft(frames, axis=1)) ** 2).astype(np.float32)
    # reference: a band's energy for normalised speech (rms 0.1) spread evenly over the spectrum
    ref = np.float32((0.1 ** 2) * (np.hanning(win) ** 2).sum() * win / (win // 2 + 1))
    bands = np.float32(10.0) * np.log10(power @ fb.T / ref + np.float32(1e-12))
    # Bands sit at every band_stride-th channel; neighbouring channels (under 1 % apart, while a
    # band is ~1 ERB wide) get linear interpolation, a 4x saving over 700 full filters.
    pos = np.arange(params.channels, dtype=np.float32) / params.band_stride
    i0 = np.minimum(pos.astype(np.int64), bands.shape[1] - 1)
    i1 = np.minimum(i0 + 1, bands.shape[1] - 1)
    w = (pos - i0).astype(np.float32)
    return bands[:, i0] * (1 - w) + bands[:, i1] * w


def spikes_from_envelopes(levels: Sequence[np.ndarray], params: SpokenDigitsParams,
                          ) -> list[tuple[np.ndarray, np.ndarray]]:
    """LIF neurons, one per channel: per utterance ``(times float64 s [n], channels int64 [n])``,
    sorted by time, from channel levels [frames, channels] in dB (:func:`envelopes`).

    The drive is the half-wave rectified, log-compressed envelope
    ``gain * max(0, level - floor_db) / range_db``, in units of the firing threshold.

    All utterances step together (zero drive after an utterance ends, which cannot spike), so the
    result for one utterance does not depend on the others.
    """
    B, C = len(levels), params.channels
    T = max(d.shape[0] for d in levels)
    drive = np.zeros((T, B, C), np.float32)
    for b, d in enumerate(levels):
        drive[:d.shape[0], b] = np.float32(params.gain / params.range_db) * np.maximum(d - params.floor_db, 0)
    dt = params.hop / params.sample_rate
    decay = np.float32(np.exp(-dt * 1000 / params.tau_ms))
    adapt_decay = np.float32(np.exp(-dt * 1000 / params.adapt_tau_ms))
    base = channel_mismatch(params).astype(np.float32)[None, :]
    v = np.zeros((B, C), np.float32)
    adapt = np.zeros((B, C), np.float32)
    out_b, out_c, out_t = [], [], []
    for k in range(T):
        i = drive[k]
        v_new = i + (v - i) * decay
        theta = base + adapt
        fire = v_new >= theta
        if fire.any():
            bb, cc = np.nonzero(fire)
            v0, v1 = v[bb, cc], v_new[bb, cc]
            frac = np.clip((theta[bb, cc] - v0) / np.maximum(v1 - v0, 1e-6), 0.0, 1.0)
            out_b.append(bb)
            out_c.append(cc)
            out_t.append((k + frac.astype(np.float64)) * dt)
            v_new[fire] = 0.0
            adapt[fire] += params.adapt_step
        adapt *= adapt_decay
        v = v_new
    if not out_b:
        return [(np.zeros(0), np.zeros(0, np.int64)) for _ in range(B)]
    bb, cc, tt = np.concatenate(out_b), np.concatenate(out_c), np.concatenate(out_t)
    order = np.lexsort((tt, bb))  # by utterance, then time
    bounds = np.searchsorted(bb[order], np.arange(B + 1))
    return [(tt[order[bounds[b]:bounds[b + 1]]], cc[order[bounds[b]:bounds[b + 1]]].astype(np.int64))
            for b in range(B)]


# ---------------------------------------------------------------------------------------------
# building


def build_split(split: str, params: SpokenDigitsParams = SpokenDigitsParams(), *, limit: int | None = None,
                progress: bool = True, batch_size: int = 64, workers: int | None = None,
                ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """Synthesise and encode ``split`` (the first ``limit`` utterances if given), in memory.

    Returns ``(times s [n_i] per utterance, channels [n_i], labels [N], speakers [N])``.
    """
    check_tools()
    spk, _ = speakers(params)
    items = utterances(split, params)[:limit]
    fb = filterbank(params)
    workers = workers or min(4, os.cpu_count() or 1)
    times: list[np.ndarray] = []
    units: list[np.ndarray] = []
    bar = progress_bar(len(items), f"spoken-digits {split}", "word", progress)

    def one(u: Utterance, tmpdir: str) -> np.ndarray:
        rng = utterance_rng(params, u)
        audio, rate = synthesize(spk[u.speaker], CLASS_NAMES[u.label], rng, params, tmpdir)
        return envelopes(prepare_audio(audio, rate, rng, params), params, fb)

    with tempfile.TemporaryDirectory(prefix="evssm-tts-") as tmpdir, ThreadPoolExecutor(workers) as pool:
        for a in range(0, len(items), batch_size):
            chunk = items[a:a + batch_size]
            envs = list(pool.map(lambda u: one(u, tmpdir), chunk))
            for t, c in spikes_from_envelopes(envs, params):
                times.append(t)
                units.append(c)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    labels = np.array([u.label for u in items], np.int64)
    speaker_ids = np.array([u.speaker for u in items], np.int64)
    return times, units, labels, speaker_ids


def file_path(data_dir: Path, split: str) -> Path:
    return Path(data_dir) / NAME / f"spoken_digits_{split}.h5"


def cached_size(data_dir: Path, split: str, params: SpokenDigitsParams = SpokenDigitsParams()) -> int | None:
    """Samples in the up-to-date file of ``split``, or None (missing, stale or unreadable)."""
    path = file_path(data_dir, split)
    if not path.is_file():
        return None
    try:
        import h5py

        with h5py.File(path, "r") as f:
            if f.attrs.get("evssm_params_hash") != params.hash():
                return None
            return int(f["labels"].shape[0])
    except (OSError, KeyError, ImportError):
        return None


def build(data_dir: Path, *, splits: Sequence[str] = SPLITS, params: SpokenDigitsParams = SpokenDigitsParams(),
          progress: bool = True, force: bool = False, limit: int | None = None) -> dict[str, Path]:
    """Build every split into SHD-layout files (skipping up-to-date ones unless ``force``)."""
    import h5py

    check_tools()
    spk, test = speakers(params)
    out = {}
    for split in splits:
        path = file_path(data_dir, split)
        if not force and cached_size(data_dir, split, params) is not None:
            out[split] = path
            continue
        start = time.perf_counter()
        times, units, labels, speaker_ids = build_split(split, params, limit=limit, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_spikes_h5(path, times, units, labels, CLASS_NAMES, speakers=speaker_ids)
        with h5py.File(path, "a") as f:
            f.attrs["evssm_params_hash"] = params.hash()
            f.attrs["evssm_params"] = json.dumps(params.to_dict())
            f.attrs["evssm_speakers"] = json.dumps([s.name for s in spk])
            f.attrs["evssm_test_speakers"] = json.dumps([s.name for s, t in zip(spk, test, strict=True) if t])
            f.attrs["evssm_tools"] = json.dumps(tool_versions())
        if progress:
            n = sum(t.size for t in times)
            print(f"spoken-digits/{split}: {len(labels)} recordings, {n} spikes in "
                  f"{time.perf_counter() - start:.1f} s -> {path}", file=sys.stderr)
        out[split] = path
    return out


def load(split: str, data_dir: Path, *, params: SpokenDigitsParams | None = None, progress: bool = True,
         build_missing: bool = True, preload: bool = False) -> SpikesH5Dataset:
    """spoken-digits ``split`` from ``<data_dir>/spoken-digits/``, built first when missing or stale.

    With ``build_missing=False`` a missing file raises FileNotFoundError instead.
    """
    params = params or SpokenDigitsParams()
    if split not in SPLITS:
        raise ValueError(f"spoken-digits has splits {SPLITS}, not {split!r}")
    path = file_path(data_dir, split)
    if cached_size(data_dir, split, params) is None:
        if not build_missing:
            raise missing_files_error(NAME, path.parent, [path.name], "build it with: evssm data build spoken-digits")
        build(data_dir, splits=[split], params=params, progress=progress, force=True)
    return SpikesH5Dataset(path, NAME, split, channels=params.channels, preload=preload)
