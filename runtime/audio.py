"""Decode audio (path or bytes) to float32 mono at the model's rate, exactly as librosa.load does (SPEC §3).

soundfile reads wav/flac/ogg/mp3; PyAV (imported lazily) reads m4a/AAC and whatever else soundfile cannot.
Channels are averaged as ``librosa.to_mono`` does and the result is resampled with soxr 'HQ' and cut or
zero-padded to ``ceil(len * target / native)`` samples, as ``librosa.resample(res_type='soxr_hq')`` does.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from runtime.constants import FEATURES
from runtime.errors import AudioDecodeError, AudioError, AudioTooLongError

logger = logging.getLogger(__name__)

Source = str | os.PathLike | bytes

HARD_LIMIT_SECONDS = 3600.0  # no request may decode more than this, whatever max_seconds says
MAX_NATIVE_RATE = 384_000  # Hz; a header claiming more is refused (it would inflate the sample budget)
MAX_CHANNELS = 32
_UNKNOWN_FRAMES = 1 << 62  # libsndfile reports SF_COUNT_MAX when it does not know the length
_BLOCK_SAMPLES = 1 << 20  # samples (frames * channels) read per block before mixing to mono


class _Unreadable(Exception):
    """soundfile could not open the input; another decoder may."""


def load_audio(
    source: Source,
    *,
    sample_rate: int = FEATURES.sample_rate,
    max_seconds: float | None = None,
    hard_limit_seconds: float = HARD_LIMIT_SECONDS,
) -> np.ndarray:
    """Decode a file path or its bytes to float32 mono at ``sample_rate`` (= ``librosa.load(sr=...)[0]``)."""
    name = _describe(source)
    if isinstance(source, bytes | bytearray | memoryview):
        source = bytes(source)
    _check_source(source, name)
    limits = _Limits(name, max_seconds, hard_limit_seconds)
    try:
        y, native_rate = _decode_soundfile(source, name, limits)
    except _Unreadable as exc:
        logger.debug("soundfile cannot read %s (%s); trying PyAV", name, exc)
        y, native_rate = _decode_pyav(source, name, limits, soundfile_error=str(exc))
    if y.size == 0:
        raise AudioError(f"{name}: the audio has zero samples")
    if not np.isfinite(y).all():
        raise AudioError(f"{name}: the audio contains NaN or infinite samples")
    limits.check(y.shape[0], native_rate)
    logger.debug("decoded %s: %d samples at %d Hz", name, y.shape[0], native_rate)
    return resample(y, native_rate, sample_rate)


def resample(y: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample mono float32 audio with soxr 'HQ', length fixed as ``librosa.resample`` fixes it."""
    if orig_sr == target_sr:
        return y
    n_out = int(np.ceil(y.shape[-1] * (float(target_sr) / orig_sr)))
    y_hat = soxr.resample(y, orig_sr, target_sr, quality="HQ")
    if y_hat.shape[0] > n_out:
        y_hat = y_hat[:n_out]
    elif y_hat.shape[0] < n_out:
        y_hat = np.pad(y_hat, (0, n_out - y_hat.shape[0]))
    return np.asarray(y_hat, dtype=np.float32)


class _Limits:
    """Duration limits of one request: the caller's max_seconds and the hard limit."""

    def __init__(self, name: str, max_seconds: float | None, hard_limit_seconds: float) -> None:
        self.name = name
        self.max_seconds = max_seconds
        self.hard = hard_limit_seconds

    def check_stream(self, rate: int, channels: int) -> None:
        """Refuse stream parameters no real recording has (they would defeat the duration limit)."""
        if not 0 < rate <= MAX_NATIVE_RATE:
            raise AudioError(f"{self.name}: sample rate {rate} Hz is not in 1..{MAX_NATIVE_RATE} Hz")
        if not 0 < channels <= MAX_CHANNELS:
            raise AudioError(f"{self.name}: {channels} channels is not in 1..{MAX_CHANNELS}")

    def check(self, frames: int, rate: int, *, at_least: bool = False) -> None:
        """Raise AudioError if ``frames`` at ``rate`` exceeds either limit."""
        seconds = frames / rate
        length = f"{'at least ' if at_least else ''}{seconds:.1f} s"
        for limit, which in ((self.max_seconds, "limit"), (self.hard, "hard limit")):
            if limit is not None and seconds > limit:
                raise AudioTooLongError(f"{self.name}: the audio is {length} long, over the {which} of {limit:g} s")

    def max_frames(self, rate: int) -> int:
        """Most frames either limit allows at ``rate``."""
        seconds = self.hard if self.max_seconds is None else min(self.hard, self.max_seconds)
        return math.floor(seconds * rate)


def _describe(source: object) -> str:
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes of audio>"
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    raise TypeError(f"audio source must be a path or bytes, not {type(source).__name__}")


def _reason(exc: Exception) -> str:
    """A library exception's message without the noise (object reprs, errno numbers)."""
    reason = getattr(exc, "error_string", None) or getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(reason).removeprefix("Error : ").rstrip(".")


def _check_source(source: Source, name: str) -> None:
    if isinstance(source, bytes):
        if not source:
            raise AudioError("the audio bytes are empty (0 bytes)")
        return
    path = Path(source)
    if not path.exists():
        raise AudioError(f"{name}: no such file")
    if path.is_dir():
        raise AudioError(f"{name}: is a directory, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{name}: the file is empty (0 bytes)")


def _decode_soundfile(source: Source, name: str, limits: _Limits) -> tuple[np.ndarray, int]:
    """Read with libsndfile block by block, mixing each block to mono; raise _Unreadable if it can't open."""
    try:
        handle = sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source))
    except Exception as exc:  # libsndfile's "Format not recognised" and friends
        raise _Unreadable(_reason(exc)) from exc
    with handle as f:
        rate, channels, declared = f.samplerate, f.channels, f.frames
        limits.check_stream(rate, channels)
        known = 0 < declared < _UNKNOWN_FRAMES
        if known:
            limits.check(declared, rate)  # refuse before decoding anything
        cap = limits.max_frames(rate)
        try:
            y = _concat(_read_blocks(f, channels, cap, limits, rate))
        except AudioError:
            raise
        except Exception as exc:
            raise AudioDecodeError(
                f"{name}: cannot decode ({f.format}/{f.subtype}): corrupt or truncated: {_reason(exc)}"
            ) from exc
        exact_count = known and f.format not in ("MPEG", "MP3")  # MP3 frame counts can be estimates
        if exact_count and y.shape[0] < declared:
            raise AudioDecodeError(
                f"{name}: truncated: the header declares {declared} frames but only {y.shape[0]} could be decoded"
            )
    return y, rate


def _read_blocks(f: sf.SoundFile, channels: int, cap: int, limits: _Limits, rate: int) -> Iterator[np.ndarray]:
    block = max(1024, _BLOCK_SAMPLES // channels)
    total = 0
    while True:
        data = f.read(block, dtype="float32", always_2d=True)  # (frames, channels)
        if data.shape[0] == 0:
            return
        total += data.shape[0]
        if total > cap:
            limits.check(total, rate, at_least=True)
        yield _to_mono(data.T)


def _to_mono(y: np.ndarray) -> np.ndarray:
    """Average channels ``(channels, n) -> (n,)`` with the same numpy call as ``librosa.to_mono``."""
    if y.shape[0] == 1:
        return y[0]
    return np.mean(y, axis=tuple(range(y.ndim - 1)))


def _concat(blocks: Iterator[np.ndarray]) -> np.ndarray:
    parts = list(blocks)
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def _decode_pyav(source: Source, name: str, limits: _Limits, soundfile_error: str) -> tuple[np.ndarray, int]:
    """Decode the first audio stream with PyAV (FFmpeg), mixing each frame to mono."""
    try:
        import av
    except ImportError as exc:
        raise AudioDecodeError(
            f"{name}: soundfile cannot read it ({soundfile_error}) and PyAV, needed for m4a/AAC, is not "
            "installed: pip install 'percepiano-onnx[runtime]'"
        ) from exc
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)) as container:
            if not container.streams.audio:
                raise AudioDecodeError(f"{name}: no audio stream in this {container.format.name} file")
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate
            limits.check_stream(rate, stream.codec_context.channels)
            if stream.duration and stream.time_base:
                limits.check(int(stream.duration * stream.time_base * rate), rate)
            y = _concat(_pyav_blocks(av, container, stream, limits, rate))
    except AudioError:
        raise
    except Exception as exc:
        raise AudioDecodeError(
            f"{name}: cannot decode: not a readable audio file (soundfile: {soundfile_error}; PyAV: {_reason(exc)})"
        ) from exc
    return y, rate


def _pyav_blocks(av, container, stream, limits: _Limits, rate: int) -> Iterator[np.ndarray]:
    to_planar_float = av.AudioResampler(format="fltp")  # keeps layout and rate
    cap = limits.max_frames(rate)
    total = 0
    for frame in container.decode(stream):
        for out in to_planar_float.resample(frame):
            data = out.to_ndarray()  # (channels, n) float32
            total += data.shape[1]
            if total > cap:
                limits.check(total, rate, at_least=True)
            yield _to_mono(data)
    for out in to_planar_float.resample(None):
        yield _to_mono(out.to_ndarray())
