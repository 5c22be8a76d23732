"""Chunking and log-mel features of SPEC §3 in numpy, equal to the original librosa pipeline.

Per chunk: ``librosa.feature.melspectrogram`` (periodic Hann window, ``center=True`` with zero padding,
power 2, Slaney mel scale and norm) -> ``librosa.power_to_db(S, ref=np.max)`` -> ``[time, mel]`` ->
cropped or padded with -80 dB to 128 frames. The STFT runs batched over chunks and in float64.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from runtime.constants import FEATURES, FeatureParams
from runtime.errors import AudioError

logger = logging.getLogger(__name__)

_CHUNKS_PER_BATCH = 16  # bounds the STFT's working memory (~70 MB per batch of 3 s chunks)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above (as ``librosa.hz_to_mel(htk=False)``)."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    mels = hz / f_sp
    log_region = hz >= min_log_hz
    return np.where(log_region, min_log_hz / f_sp + np.log(np.maximum(hz, 1e-300) / min_log_hz) / logstep, mels)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    """Inverse of ``_hz_to_mel`` (as ``librosa.mel_to_hz(htk=False)``)."""
    mels = np.asarray(mels, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)


@functools.lru_cache(maxsize=8)
def mel_filterbank(params: FeatureParams = FEATURES) -> np.ndarray:
    """Slaney-normalised mel filterbank ``(n_mels, 1 + n_fft // 2)`` float32, = ``librosa.filters.mel``."""
    fft_freqs = np.fft.rfftfreq(params.n_fft, d=1.0 / params.sample_rate)
    mel_edges = np.linspace(_hz_to_mel(params.fmin), _hz_to_mel(params.fmax), params.n_mels + 2)
    hz_edges = _mel_to_hz(mel_edges)  # (n_mels + 2,)
    widths = np.diff(hz_edges)
    ramps = hz_edges[:, None] - fft_freqs[None, :]  # (n_mels + 2, n_bins)
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    # librosa stores the triangles in float32 before scaling them; round the same way.
    weights = np.maximum(0.0, np.minimum(lower, upper)).astype(np.float32)
    enorm = 2.0 / (hz_edges[2:] - hz_edges[:-2])
    weights = (weights * enorm[:, None]).astype(np.float32)
    weights.flags.writeable = False  # shared by every caller through the cache
    return weights


@functools.lru_cache(maxsize=8)
def _hann(n_fft: int) -> np.ndarray:
    """Periodic Hann window (``scipy.signal.get_window('hann', n_fft, fftbins=True)``)."""
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)
    window.flags.writeable = False
    return window


def _log_mel_batch(y: np.ndarray, params: FeatureParams) -> np.ndarray:
    """Log-mel of equal-length signals ``(B, n) -> (B, 1 + n // hop, n_mels)`` float64, each referenced to its max."""
    half = params.n_fft // 2
    padded = np.pad(y.astype(np.float64, copy=False), ((0, 0), (half, half)))  # center=True, zeros
    frames = np.lib.stride_tricks.sliding_window_view(padded, params.n_fft, axis=-1)[:, :: params.hop_length]
    spectrum = np.fft.rfft(frames * _hann(params.n_fft), axis=-1)  # (B, T, 1 + n_fft // 2)
    power = np.abs(spectrum) ** params.power  # as librosa's _spectrogram
    mel = power @ mel_filterbank(params).T.astype(np.float64)  # (B, T, n_mels)
    return _power_to_db(mel, params)


def _power_to_db(mel: np.ndarray, params: FeatureParams) -> np.ndarray:
    """``librosa.power_to_db(S, ref=np.max, amin, top_db)`` per batch item (all axes but the first)."""
    ref = mel.max(axis=(1, 2), keepdims=True)
    db = 10.0 * np.log10(np.maximum(params.amin, mel))
    db -= 10.0 * np.log10(np.maximum(params.amin, ref))
    return np.maximum(db, db.max(axis=(1, 2), keepdims=True) - params.top_db)


def log_mel(y: np.ndarray, params: FeatureParams = FEATURES) -> np.ndarray:
    """Log-mel spectrogram ``(frames, n_mels)`` float32 of one signal, in dB relative to its maximum."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise AudioError(f"log_mel expects mono audio of shape (n,), got {y.shape}")
    return _log_mel_batch(y[None, :], params)[0].astype(np.float32)


def fit_frames(m: np.ndarray, params: FeatureParams = FEATURES) -> np.ndarray:
    """Crop or pad (with ``pad_db``) the frame axis of ``(..., frames, n_mels)`` to ``n_frames``."""
    n = params.n_frames
    if m.shape[-2] >= n:
        return m[..., :n, :]
    pad = [(0, 0)] * m.ndim
    pad[-2] = (0, n - m.shape[-2])
    return np.pad(m, pad, constant_values=params.pad_db)


def chunk_audio(y: np.ndarray, params: FeatureParams = FEATURES) -> np.ndarray:
    """Cut audio into ``(n_chunks, chunk_samples)`` float32 chunks as the original service did (SPEC §3)."""
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 1:
        raise AudioError(f"expected mono audio of shape (n,), got {y.shape}")
    min_len = int(params.min_seconds * params.sample_rate)
    if y.shape[0] < min_len:
        y = np.pad(y, (0, min_len - y.shape[0]))
    size, hop = params.chunk_samples, params.hop_samples
    n_full = (y.shape[0] - size) // hop + 1 if y.shape[0] >= size else 0
    starts = [i * hop for i in range(n_full)]
    chunks = [y[start : start + size] for start in starts]
    tail = n_full * hop
    if tail < y.shape[0]:  # the remainder (or a short signal), zero-padded
        chunks.append(np.pad(y[tail:], (0, size - (y.shape[0] - tail))))
    return np.stack(chunks)


def chunk_starts(n_chunks: int, params: FeatureParams = FEATURES) -> list[float]:
    """Start time in seconds of each chunk (0, 2, 4, ...)."""
    return [i * params.hop_samples / params.sample_rate for i in range(n_chunks)]


def features_from_audio(y: np.ndarray, params: FeatureParams = FEATURES) -> np.ndarray:
    """Model input ``(n_chunks, n_frames, n_mels)`` float32 from mono audio at ``params.sample_rate``."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise AudioError(f"expected mono audio of shape (n,), got {y.shape}")
    if not np.isfinite(y).all():
        raise AudioError("the audio contains NaN or infinite samples")
    chunks = chunk_audio(y, params)
    out = np.empty((chunks.shape[0], params.n_frames, params.n_mels), dtype=np.float32)
    for i in range(0, chunks.shape[0], _CHUNKS_PER_BATCH):
        batch = chunks[i : i + _CHUNKS_PER_BATCH]
        out[i : i + batch.shape[0]] = fit_frames(_log_mel_batch(batch, params), params)
    logger.debug("features: %d samples -> %d chunks", y.shape[0], chunks.shape[0])
    return out
