"""Reference features computed with librosa, as the original service did; the yardstick for parity checks.

librosa is imported inside the functions so that importing ``convert`` stays light.
"""

from __future__ import annotations

import os

import numpy as np

from runtime.constants import FEATURES
from runtime.features import chunk_audio, fit_frames


def reference_load(path: str | os.PathLike) -> np.ndarray:
    """``librosa.load(path, sr=22050, mono=True)[0]``: the original decoding and resampling."""
    import librosa

    y, _ = librosa.load(os.fspath(path), sr=FEATURES.sample_rate, mono=True)
    return y


def reference_log_mel(chunk: np.ndarray) -> np.ndarray:
    """Log-mel ``(frames, n_mels)`` of one chunk with librosa's melspectrogram and power_to_db."""
    import librosa

    p = FEATURES
    mel = librosa.feature.melspectrogram(
        y=chunk,
        sr=p.sample_rate,
        n_fft=p.n_fft,
        hop_length=p.hop_length,
        n_mels=p.n_mels,
        power=p.power,
        fmin=p.fmin,
        fmax=p.fmax,
    )
    return librosa.power_to_db(mel, ref=np.max, amin=p.amin, top_db=p.top_db).T


def reference_features(path_or_array: str | os.PathLike | np.ndarray) -> np.ndarray:
    """Model input ``(n_chunks, 128, 128)`` float32 the librosa way, from a path or mono audio at 22050 Hz."""
    if isinstance(path_or_array, np.ndarray):
        y = np.asarray(path_or_array, dtype=np.float32)
    else:
        y = reference_load(path_or_array)
    chunks = chunk_audio(y, FEATURES)
    return np.stack([fit_frames(reference_log_mel(chunk), FEATURES) for chunk in chunks]).astype(np.float32)
