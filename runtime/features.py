"""Chunking and log-mel features of docs/spec.md §3 in numpy, equal to the original librosa pipeline.

Per chunk: ``librosa.feature.melspectrogram`` (periodic Hann window, ``center=True`` with zero padding,
power 2, Slaney mel scale and norm) -> ``librosa.power_to_db(S, ref=np.max)`` -> ``[time, mel]`` ->
cropped or padded with -80 dB to 128 frames. The STFT runs in float64, one chunk at a time in buffers
reused from chunk to chunk (FeatureBuffers).
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from runtime.constants import FEATURES, FeatureParams
from runtime.errors import AudioError

logger = logging.getLogger(__name__)


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
def mel_bands(params: FeatureParams = FEATURES) -> tuple[tuple[int, int, np.ndarray], ...]:
    """Each mel band's nonzero stretch of FFT bins and its weights: ``(first bin, end bin, float64 weights)``.

    Each band is one triangle (a contiguous run of bins), 2,015 weights of the 131,200 of the full matrix. The
    mel projection is computed band by band with numpy's own loops (``log_mel``): as fast as one BLAS matrix
    product here, and it never wakes numpy's BLAS threads, which spin on every core for a while after each
    product and slowed the model calls that followed by 12-19 % (docs/corpus-speed.md).
    """
    weights = mel_filterbank(params).astype(np.float64)
    bands = []
    for row in weights:
        nonzero = np.flatnonzero(row)
        lo, hi = (int(nonzero[0]), int(nonzero[-1]) + 1) if nonzero.size else (0, 0)
        band = np.ascontiguousarray(row[lo:hi])
        band.flags.writeable = False
        bands.append((lo, hi, band))
    return tuple(bands)


@functools.lru_cache(maxsize=8)
def _hann(n_fft: int) -> np.ndarray:
    """Periodic Hann window (``scipy.signal.get_window('hann', n_fft, fftbins=True)``)."""
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)
    window.flags.writeable = False
    return window


class FeatureBuffers:
    """The STFT's working arrays for signals of one length (about 5 MB for a 3 s chunk), reused by each `log_mel`.

    Every chunk's transform writes into the same memory instead of new arrays: the working set stays in the CPU's
    caches, and a process touches these pages once instead of once per chunk (fresh pages are what the first
    request of a process pays for, and every request of one that returns freed buffers to the system, as the
    server does). Every chunk's result is the one its own transform gives, bit for bit (tests/test_features.py).
    Not for sharing between threads: each `features_from_audio` call makes its own.
    """

    def __init__(self, n_samples: int, params: FeatureParams = FEATURES):
        self.params, self.n_samples, half = params, n_samples, params.n_fft // 2
        n_frames, n_bins = 1 + n_samples // params.hop_length, 1 + params.n_fft // 2
        self.padded = np.zeros(n_samples + 2 * half)  # center=True: the zero margins are never written
        self.frames = np.lib.stride_tricks.sliding_window_view(self.padded, params.n_fft)[:: params.hop_length]
        self.windowed = np.empty((n_frames, params.n_fft))
        self.spectrum = np.empty((n_frames, n_bins), np.complex128)
        self.power = np.empty((n_frames, n_bins))
        self.mel = np.empty((n_frames, params.n_mels))
        self.bands = mel_bands(params)

    def log_mel(self, y: np.ndarray) -> np.ndarray:
        """Log-mel ``(1 + n // hop, n_mels)`` float64 of one signal of this length: a new array, the rest reused."""
        params, half = self.params, self.params.n_fft // 2
        if y.shape != (self.n_samples,):
            raise AudioError(f"these buffers take signals of {self.n_samples} samples, got {y.shape}")
        self.padded[half : half + self.n_samples] = y
        np.multiply(self.frames, _hann(params.n_fft), out=self.windowed)
        np.fft.rfft(self.windowed, axis=-1, out=self.spectrum)
        np.abs(self.spectrum, out=self.power)
        np.power(self.power, params.power, out=self.power)
        for m, (lo, hi, weights) in enumerate(self.bands):  # no BLAS: see mel_bands
            np.einsum("fb,b->f", self.power[:, lo:hi], weights, out=self.mel[:, m])
        return _power_to_db(self.mel[None], params)[0]


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
    return FeatureBuffers(y.shape[0], params).log_mel(y).astype(np.float32)


def fit_frames(m: np.ndarray, params: FeatureParams = FEATURES) -> np.ndarray:
    """Crop or pad (with ``pad_db``) the frame axis of ``(..., frames, n_mels)`` to ``n_frames``."""
    n = params.n_frames
    if m.shape[-2] >= n:
        return m[..., :n, :]
    pad = [(0, 0)] * m.ndim
    pad[-2] = (0, n - m.shape[-2])
    return np.pad(m, pad, constant_values=params.pad_db)


def chunk_audio(y: np.ndarray, params: FeatureParams = FEATURES) -> np.ndarray:
    """Cut audio into ``(n_chunks, chunk_samples)`` float32 chunks as the original service did (docs/spec.md §3)."""
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
    buffers = FeatureBuffers(chunks.shape[1], params)
    for i, chunk in enumerate(chunks):
        out[i] = fit_frames(buffers.log_mel(chunk), params)
    logger.debug("features: %d samples -> %d chunks", y.shape[0], chunks.shape[0])
    return out
