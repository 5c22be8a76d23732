"""Streaming resampling to the model's rate: blocks in at the native rate, one float32 signal out.

``librosa.load(sr=22050)`` resamples the whole decoded signal with ``soxr.resample(quality='HQ')`` and then
fixes the length to ``ceil(n * target / native)``. soxr's streaming resampler (``soxr.ResampleStream``) gives
the same samples when fed block by block (it is the same filter; tests/test_audio.py compares the two), so the
decoder never holds the native-rate signal: peak memory follows the output, not the input.
"""

from __future__ import annotations

import math

import numpy as np
import soxr

from runtime.errors import AudioError

QUALITY = "HQ"  # librosa's default res_type 'soxr_hq'


class Resampler:
    """One stretch of audio at one native rate: ``feed`` mono blocks, then ``finish`` once."""

    def __init__(self, native_rate: int, target_rate: int):
        self.native_rate, self.target_rate = native_rate, target_rate
        self.frames_in = 0
        self._parts: list[np.ndarray] = []
        same = native_rate == target_rate
        self._stream = None if same else soxr.ResampleStream(native_rate, target_rate, 1, dtype="float32",
                                                              quality=QUALITY)

    @property
    def seconds_in(self) -> float:
        return self.frames_in / self.native_rate

    def feed(self, block: np.ndarray) -> None:
        """Add the next mono block (any float dtype; converted to float32 as librosa.load decodes it)."""
        self.frames_in += block.shape[0]
        if self._stream is None:
            self._parts.append(np.array(block, dtype=np.float32))  # a copy: the caller may reuse its buffer
        elif block.shape[0]:
            self._parts.append(self._stream.resample_chunk(np.ascontiguousarray(block, dtype=np.float32)))

    def finish(self) -> np.ndarray:
        """The whole stretch at the target rate, its length fixed as ``librosa.resample`` fixes it."""
        if self._stream is not None:
            self._parts.append(self._stream.resample_chunk(np.zeros(0, np.float32), last=True))
            self._stream = None
        y = join(self._parts)
        self._parts = []
        n_out = math.ceil(self.frames_in * (float(self.target_rate) / self.native_rate))  # librosa's formula
        if y.shape[0] > n_out:
            return y[:n_out]
        if y.shape[0] < n_out:
            return np.pad(y, (0, n_out - y.shape[0]))
        return y


def join(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate float32 blocks (an empty list gives an empty signal)."""
    if not parts:
        return np.zeros(0, dtype=np.float32)
    if len(parts) == 1:
        return np.ascontiguousarray(parts[0], dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def resample(y: np.ndarray, orig_sr: int, target_sr: int, *, block: int = 1 << 18) -> np.ndarray:
    """Resample mono float32 audio with soxr 'HQ', as ``librosa.resample(res_type='soxr_hq')`` does."""
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 1:
        raise AudioError(f"expected mono audio of shape (n,), got {y.shape}")
    if orig_sr == target_sr:
        return y
    stream = Resampler(orig_sr, target_sr)
    for start in range(0, y.shape[0], block):
        stream.feed(y[start : start + block])
    return stream.finish()
