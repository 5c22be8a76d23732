"""Log-mel features and chunking (docs/spec.md §3) against the librosa reference the model was trained with."""

from __future__ import annotations

import numpy as np
import piano_data
import pytest

from convert.reference import reference_features
from runtime.audio import load_audio
from runtime.constants import FEATURES
from runtime.errors import AudioError
from runtime.features import (
    chunk_audio,
    chunk_starts,
    features_from_audio,
    fit_frames,
    log_mel,
    mel_filterbank,
)

SR = FEATURES.sample_rate
CLIPS = piano_data.CLIPS
TOLERANCE_DB = 0.01


def _seconds(seconds: float, seed: int = 0) -> np.ndarray:
    """Quiet noise of ``int(seconds * SR)`` samples."""
    return (np.random.default_rng(seed).standard_normal(int(seconds * SR)) * 0.1).astype(np.float32)


def test_mel_filterbank_matches_librosa() -> None:
    librosa = pytest.importorskip("librosa")
    ours = mel_filterbank(FEATURES)
    theirs = librosa.filters.mel(sr=SR, n_fft=FEATURES.n_fft, n_mels=FEATURES.n_mels, fmin=20.0, fmax=11025.0)
    assert ours.shape == (FEATURES.n_mels, 1 + FEATURES.n_fft // 2)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9)
    assert mel_filterbank(FEATURES) is ours  # built once


def test_features_match_librosa_on_every_clip(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("librosa")
    worst, worst_clip = 0.0, ""
    for clip in CLIPS:
        ours = features_from_audio(load_audio(clip))
        theirs = reference_features(clip)
        assert ours.shape == theirs.shape and ours.dtype == np.float32, clip.name
        diff = float(np.abs(ours - theirs).max())
        if diff >= worst:
            worst, worst_clip = diff, clip.name
    with capsys.disabled():
        print(f"\n[features] worst |ours - librosa| over {len(CLIPS)} clips: {worst:.2e} dB ({worst_clip})")
    assert worst < TOLERANCE_DB, f"{worst_clip}: {worst} dB"


SYNTHETIC = {
    "silence": np.zeros(3 * SR, dtype=np.float32),
    "tone_440": (0.5 * np.sin(2 * np.pi * 440.0 * np.arange(int(3.1 * SR)) / SR)).astype(np.float32),
    "clipped_square": np.clip(8 * np.sin(2 * np.pi * 110.0 * np.arange(5 * SR) / SR), -1, 1).astype(np.float32),
    "impulse": np.eye(1, 2 * SR, SR, dtype=np.float32)[0],
}


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_features_match_librosa(name: str) -> None:
    pytest.importorskip("librosa")
    y = SYNTHETIC[name]
    ours, theirs = features_from_audio(y), reference_features(y)
    assert ours.shape == theirs.shape
    assert float(np.abs(ours - theirs).max()) < TOLERANCE_DB
    assert ours.min() >= -80.0 and ours.max() <= 0.0


def test_silence_is_zero_db() -> None:
    feats = features_from_audio(np.zeros(5 * SR, dtype=np.float32))
    assert feats.shape == (3, 128, 128)
    assert np.all(feats == 0.0)  # power_to_db clamps power and reference alike to amin


@pytest.mark.parametrize(
    ("seconds", "n_chunks"), [(0.0, 1), (1.0, 1), (2.0, 1), (3.0, 2), (3.1, 2), (5.0, 3), (30.0, 15)]
)
def test_chunk_counts(seconds: float, n_chunks: int) -> None:
    y = _seconds(seconds)
    chunks = chunk_audio(y)
    assert chunks.shape == (n_chunks, FEATURES.chunk_samples) and chunks.dtype == np.float32
    assert features_from_audio(y).shape == (n_chunks, FEATURES.n_frames, FEATURES.n_mels)


def test_chunks_are_the_original_slices() -> None:
    y = _seconds(7.3)
    size, hop = FEATURES.chunk_samples, FEATURES.hop_samples
    chunks = chunk_audio(y)
    assert len(chunks) == 4  # starts 0, 2, 4 s are full chunks; 6 s is the zero-padded tail
    for i, chunk in enumerate(chunks):
        part = y[i * hop : i * hop + size]
        np.testing.assert_array_equal(chunk[: len(part)], part)
        assert not chunk[len(part) :].any()
    assert chunk_starts(len(chunks)) == [0.0, 2.0, 4.0, 6.0]


def test_short_audio_padded_to_min_seconds_first() -> None:
    y = _seconds(1.0)
    (chunk,) = chunk_audio(y)
    np.testing.assert_array_equal(chunk[: len(y)], y)
    assert not chunk[len(y) :].any()


@pytest.mark.parametrize("seconds", [1.0, 3.0, 30.0])
def test_features_match_librosa_by_duration(seconds: float) -> None:
    pytest.importorskip("librosa")
    y = _seconds(seconds, seed=int(seconds))
    assert float(np.abs(features_from_audio(y) - reference_features(y)).max()) < TOLERANCE_DB


def test_log_mel_shape_and_batch_agree() -> None:
    chunk = chunk_audio(_seconds(3.0))[0]
    m = log_mel(chunk)
    assert m.shape == (1 + len(chunk) // FEATURES.hop_length, FEATURES.n_mels) and m.dtype == np.float32
    np.testing.assert_array_equal(fit_frames(m), features_from_audio(_seconds(3.0))[0])


def test_every_chunk_equals_its_own_transform() -> None:
    """The buffers reused from chunk to chunk carry nothing over: a loud chunk before quiet and silent ones
    changes none of their windows, bit for bit, against each chunk computed on its own."""
    rng = np.random.default_rng(3)
    loud = rng.standard_normal(3 * SR).astype(np.float32)
    quiet = (rng.standard_normal(4 * SR) * 1e-3).astype(np.float32)
    y = np.concatenate([loud, quiet, np.zeros(3 * SR + 1234, np.float32)])
    chunks = chunk_audio(y)
    got = features_from_audio(y)
    assert len(chunks) == len(got) >= 5
    for i, chunk in enumerate(chunks):
        np.testing.assert_array_equal(got[i], fit_frames(log_mel(chunk)), err_msg=f"chunk {i}")


def test_feature_buffers_take_one_length() -> None:
    from runtime.features import FeatureBuffers

    buffers = FeatureBuffers(FEATURES.chunk_samples)
    with pytest.raises(AudioError, match="66150 samples"):
        buffers.log_mel(np.zeros(FEATURES.chunk_samples - 1, np.float32))


def test_fit_frames_crops_and_pads() -> None:
    long = np.zeros((130, 128), dtype=np.float32)
    assert fit_frames(long).shape == (128, 128)
    short = np.zeros((100, 128), dtype=np.float32)
    fitted = fit_frames(short)
    assert fitted.shape == (128, 128)
    assert np.all(fitted[100:] == FEATURES.pad_db) and np.all(fitted[:100] == 0.0)


@pytest.mark.parametrize("bad", [np.zeros((2, 100), dtype=np.float32), np.array([0.0, np.nan], dtype=np.float32)])
def test_features_refuse_bad_arrays(bad: np.ndarray) -> None:
    with pytest.raises(AudioError):
        features_from_audio(bad)


PROBE = """
import sys, time
from runtime.audio import load_audio
from runtime.features import features_from_audio
y = load_audio(sys.argv[1])
features_from_audio(y)
time.sleep(1.0)  # numpy's own import wakes its BLAS threads: let them settle
process, thread = time.process_time(), time.thread_time()
for _ in range(10):
    features_from_audio(y)
print(time.process_time() - process, time.thread_time() - thread)
"""


def test_features_keep_to_their_own_thread() -> None:
    """No CPU time outside the calling thread: numpy's BLAS threads, woken by a matrix product, spin on every core
    for a while after it and slowed the next model call by 12-19 % (docs/corpus-speed.md). Measured in a fresh
    process, where nothing else runs (on a 1-core machine numpy's BLAS has no threads, and this cannot fail)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("OPENBLAS_NUM_THREADS", None)
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", PROBE, str(piano_data.CLIPS[-1])], env=env, cwd=root, check=True,
                         capture_output=True, text=True, timeout=120).stdout.split()
    process, thread = float(out[0]), float(out[1])
    assert thread > 0 and process - thread < 0.1 * thread, (process, thread)
