"""spoken-digits: speakers and split, the cochlea front end, SHD layout, missing tools."""

from __future__ import annotations

import dataclasses
import shutil
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
from numeric import assert_close

from evssm.cli import main
from evssm.models.data import load_dataset
from evssm.models.data import spoken_digits as sd

P = sd.SpokenDigitsParams()
HAVE_TOOLS = shutil.which("espeak-ng") is not None and shutil.which("flite") is not None


def test_classes_follow_shd() -> None:
    assert len(sd.CLASS_NAMES) == 20
    assert sd.CLASS_NAMES[0] == "zero" and sd.CLASS_NAMES[9] == "nine"
    assert sd.CLASS_NAMES[10] == "null" and sd.CLASS_NAMES[19] == "neun"
    assert set(sd.FLITE_GERMAN) == set(sd.GERMAN)


def test_split_by_voice() -> None:
    spk, test = sd.speakers(P)
    assert len(spk) == 5 + P.espeak_speakers and test.sum() == P.test_speakers
    assert len({s.name for s in spk}) == len(spk)
    assert {s.engine for s, t in zip(spk, test, strict=True) if t} == {"flite", "espeak-ng"}
    train_u, test_u = sd.utterances("train", P), sd.utterances("test", P)
    assert {u.speaker for u in train_u}.isdisjoint({u.speaker for u in test_u})
    assert len(train_u) + len(test_u) == len(spk) * 20 * P.renditions
    np.testing.assert_array_equal(np.bincount([u.label for u in test_u]), [P.test_speakers * P.renditions] * 20)
    assert sd.speakers(P)[1].tolist() == test.tolist()  # seeded


def _wav(pcm: np.ndarray, rate: int, bogus_sizes: bool) -> bytes:
    data = pcm.astype("<i2").tobytes()
    riff = 0x7FFFFFFF if bogus_sizes else 36 + len(data)
    size = 0x7FFFFFFF if bogus_sizes else len(data)
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, 2 * rate, 2, 16)
            + b"data" + struct.pack("<I", size) + data)


@pytest.mark.parametrize("bogus", [False, True])
def test_parse_wav(bogus: bool) -> None:
    pcm = np.array([0, 16384, -32768, 32767], np.int16)
    audio, rate = sd.parse_wav(_wav(pcm, 22050, bogus))
    assert rate == 22050
    assert_close(audio, pcm / 32768.0)
    with pytest.raises(ValueError, match="RIFF"):
        sd.parse_wav(b"nonsense" * 4)


def test_resample_keeps_frequency() -> None:
    t = np.arange(22050) / 22050
    y = sd.resample(np.sin(2 * np.pi * 1000 * t).astype(np.float32), 22050, 16000)
    assert y.size == 16000
    peak = np.fft.rfftfreq(y.size, 1 / 16000)[np.argmax(np.abs(np.fft.rfft(y)))]
    assert peak == pytest.approx(1000, abs=2)
    assert np.abs(y).max() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("freq", [300.0, 1000.0, 4000.0])
def test_cochlea_is_tonotopic(freq: float) -> None:
    t = np.arange(8000) / 16000
    tone = (0.1 * np.sqrt(2) * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    levels = sd.envelopes(tone, P)
    assert levels.shape == (8000 // P.hop + 1, 700)
    (times, ch), = sd.spikes_from_envelopes([levels], P)
    assert times.size > 100 and (np.diff(times) >= 0).all() and times.max() <= 0.51
    best = int(np.argmin(np.abs(sd.centre_frequencies(P) - freq)))
    assert abs(np.median(ch) - best) < 40  # spikes cluster around the tone's place


def test_silence_is_silent_and_batches_are_independent() -> None:
    rng = np.random.default_rng(0)
    quiet = sd.envelopes(np.zeros(4000, np.float32), P)
    noisy = sd.envelopes((0.3 * rng.standard_normal(16000)).astype(np.float32), P)
    (t0, _), = sd.spikes_from_envelopes([quiet], P)
    assert t0.size == 0
    alone = sd.spikes_from_envelopes([noisy], P)[0]
    together = sd.spikes_from_envelopes([quiet, noisy], P)[1]
    np.testing.assert_array_equal(alone[0], together[0])
    np.testing.assert_array_equal(alone[1], together[1])


def test_missing_tools_say_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sd.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install -y espeak-ng flite"):
        load_dataset("spoken-digits", "train", tmp_path)
    assert main(["data", "build", "spoken-digits", "--data-dir", str(tmp_path)]) == 1
    assert "apt-get install -y espeak-ng flite" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="evssm data build spoken-digits"):
        sd.load("test", tmp_path, build_missing=False)


@pytest.mark.skipif(not HAVE_TOOLS, reason="needs espeak-ng and flite (apt-get install -y espeak-ng flite)")
def test_tiny_build_reads_as_shd(tmp_path: Path) -> None:
    small = dataclasses.replace(P, espeak_speakers=4, test_speakers=2, renditions=1)
    paths = sd.build(tmp_path, splits=["test"], params=small, progress=False, limit=6)
    path = paths["test"]
    assert path == tmp_path / "spoken-digits" / "spoken_digits_test.h5"
    with h5py.File(path) as f:
        assert f["spikes/times"].dtype.metadata["vlen"] == np.float16
        assert f["spikes/units"].dtype.metadata["vlen"] == np.uint16
        assert f["labels"].shape == (6,) and f["extra/keys"][10] == b"null"
        assert f.attrs["evssm_params_hash"] == small.hash()
    assert sd.cached_size(tmp_path, "test", small) == 6 and sd.cached_size(tmp_path, "test") is None
    ds = sd.load("test", tmp_path, params=small)
    assert len(ds) == 6 and ds.name == "spoken-digits" and ds.class_names == sd.CLASS_NAMES
    expected = sd.utterances("test", small)[:6]
    np.testing.assert_array_equal(ds.labels, [u.label for u in expected])
    for rec, _ in ds:
        assert len(rec) > 50 and (np.diff(rec.t) >= 0).all() and rec.x.max() < 700
    # the SHD reader, unchanged, reads the same file
    (tmp_path / "shd").mkdir()
    shutil.copy(path, tmp_path / "shd" / "shd_test.h5")
    shd = load_dataset("shd", "test", tmp_path)
    np.testing.assert_array_equal(shd[0][0].t, ds[0][0].t)
    assert shd.class_names == sd.CLASS_NAMES
