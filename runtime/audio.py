"""Decode audio (path or bytes) to float32 mono at the model's rate, exactly as librosa.load does (docs/spec.md §3).

soundfile reads wav/flac/ogg and MP3s that state their length (a Xing/Info header); PyAV (imported lazily) reads
m4a/AAC, whatever else soundfile cannot, and MP3s without that header, to the stream's end (libsndfile would stop
at a length guessed from the first frame's bitrate: a 30 s VBR file read as 2.6 s).
Each decoded block is mixed to mono as ``librosa.to_mono`` does and fed to soxr's streaming 'HQ' resampler
(runtime.resample), so the native-rate signal is never held whole. Two limits, two names:

- ``cap_seconds``: analyse the first N seconds, as the original did (``librosa.load``, then the first N s of
  the 22,050 Hz samples). Only what the cap needs is decoded (plus ``CAP_MARGIN_SECONDS``); nothing is refused.
- ``refuse_over_seconds``: the refusal limit; longer audio raises ``AudioTooLongError`` (HTTP 413), before decoding
  when the header states the length. ``hard_limit_seconds`` bounds every call whatever the caller asks.
"""

from __future__ import annotations

import io
import logging
import math
import os
from pathlib import Path

import numpy as np
import soundfile as sf

from runtime.constants import FEATURES
from runtime.errors import AudioDecodeError, AudioError, AudioTooLongError, ConfigError
from runtime.integrity import mp3_length_stated, opened, truncation
from runtime.resample import Resampler, join, resample

logger = logging.getLogger(__name__)

Source = str | os.PathLike | bytes

HARD_LIMIT_SECONDS = 3600.0  # no request may decode more than this, whatever refuse_over_seconds says
# Native audio decoded past a cap, so that the resampled samples before the cut equal those of resampling the
# whole file (soxr HQ's filter reaches ahead; 0.05 s already gives identical samples from 8 to 384 kHz).
CAP_MARGIN_SECONDS = 0.1
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
    cap_seconds: float | None = None,
    refuse_over_seconds: float | None = None,
    hard_limit_seconds: float = HARD_LIMIT_SECONDS,
) -> np.ndarray:
    """Decode a path or bytes to float32 mono at ``sample_rate`` (= ``librosa.load(sr=...)[0][:cap]``)."""
    name = _describe(source)
    if isinstance(source, bytes | bytearray | memoryview):
        source = bytes(source)
    plan = DecodePlan(name, sample_rate, cap_seconds, refuse_over_seconds, hard_limit_seconds)
    _check_source(source, name)
    try:
        _decode_soundfile(source, name, plan)
    except _Unreadable as exc:
        logger.debug("soundfile cannot read %s (%s); trying PyAV", name, exc)
        plan.reset()
        _decode_pyav(source, name, plan, soundfile_error=str(exc))
    y = plan.finish()
    if y.size == 0:
        raise AudioError(f"{name}: the audio has zero samples")
    logger.debug("decoded %s: %.2f s -> %d samples at %d Hz", name, plan.seconds, y.shape[0], sample_rate)
    return y


def prepare_audio(y: np.ndarray, sample_rate: int, *, target_rate: int = FEATURES.sample_rate,
                  cap_seconds: float | None = None, refuse_over_seconds: float | None = None,
                  hard_limit_seconds: float = HARD_LIMIT_SECONDS) -> np.ndarray:
    """Mono audio in memory at ``sample_rate`` -> float32 at ``target_rate``, capped and limited as load_audio does."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise AudioError(f"expected mono audio of shape (n,), got {y.shape}")
    if not np.issubdtype(y.dtype, np.floating):
        raise AudioError(f"expected floating-point samples in [-1, 1], got {y.dtype} (for int16 divide by 32768)")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer):
        raise AudioError(f"sample_rate must be an integer number of Hz, got {sample_rate!r}")
    plan = DecodePlan("the audio", target_rate, cap_seconds, refuse_over_seconds, hard_limit_seconds)
    plan.check_stream(int(sample_rate), 1)
    plan.check_declared(y.shape[0] / sample_rate)
    if plan.cap is not None:  # resample only what the cap needs, as load_audio decodes only that
        y = y[: math.ceil((plan.cap + CAP_MARGIN_SECONDS) * sample_rate)]
    y = resample(_finite(y.astype(np.float32, copy=False), "the audio"), int(sample_rate), target_rate)
    if y.size == 0:
        raise AudioError("the audio has zero samples")
    return y if plan.cap is None else y[: plan.cap_samples]


def check_cap(cap_seconds: float | None, refuse_over_seconds: float | None = None,
              hard_limit_seconds: float = HARD_LIMIT_SECONDS) -> float | None:
    """The cap, checked: positive, finite, at most the refusal limit (itself positive or None); else ConfigError."""
    if refuse_over_seconds is not None and not refuse_over_seconds > 0:
        raise ConfigError(f"the refusal limit must be a positive number of seconds or None, "
                          f"got {refuse_over_seconds!r}")
    if cap_seconds is None:
        return None
    try:
        cap = float(cap_seconds)
    except (TypeError, ValueError):
        raise ConfigError(f"the cap must be a number of seconds, got {cap_seconds!r}") from None
    if not math.isfinite(cap) or cap <= 0:
        raise ConfigError(f"the cap must be a positive, finite number of seconds, got {cap_seconds!r}")
    limit, which = _refusal(refuse_over_seconds, hard_limit_seconds)
    if cap > limit:
        raise ConfigError(f"a cap of {cap:g} s is over the {which} of {limit:g} s")
    return cap


def _refusal(refuse_over_seconds: float | None, hard_limit_seconds: float) -> tuple[float, str]:
    if refuse_over_seconds is not None and refuse_over_seconds <= hard_limit_seconds:
        return float(refuse_over_seconds), "limit"
    return float(hard_limit_seconds), "hard limit"


class DecodePlan:
    """One decode: the stream checks, the cap or refusal limit, and the streaming resampler(s) filling the output."""

    def __init__(self, name: str, target_rate: int, cap_seconds: float | None, refuse_over_seconds: float | None,
                 hard_limit_seconds: float) -> None:
        self.name, self.target_rate = name, target_rate
        self.cap = check_cap(cap_seconds, refuse_over_seconds, hard_limit_seconds)
        self.cap_samples = None if self.cap is None else int(self.cap * target_rate)
        self.limit, self.which = _refusal(refuse_over_seconds, hard_limit_seconds)
        self.reset()

    def reset(self) -> None:
        self.done: list[np.ndarray] = []  # finished stretches at the target rate
        self.done_seconds = 0.0
        self.current: Resampler | None = None
        self.stopped = False  # the cap had all it needs before the end of the stream

    @property
    def seconds(self) -> float:
        return self.done_seconds + (self.current.seconds_in if self.current else 0.0)

    def check_stream(self, rate: int, channels: int) -> None:
        """Refuse stream parameters no real recording has (they would defeat the limits)."""
        if not 0 < rate <= MAX_NATIVE_RATE:
            raise AudioError(f"{self.name}: sample rate {rate} Hz is not in 1..{MAX_NATIVE_RATE} Hz")
        if not 0 < channels <= MAX_CHANNELS:
            raise AudioError(f"{self.name}: {channels} channels is not in 1..{MAX_CHANNELS}")

    def check_declared(self, seconds: float) -> None:
        """Refuse, before decoding, audio whose stated length is over the limit (a capped decode never is)."""
        if self.cap is None:
            self._check(seconds, at_least=False)

    def _check(self, seconds: float, *, at_least: bool) -> None:
        if seconds > self.limit:
            length = f"{'at least ' if at_least else ''}{seconds:.1f} s"
            over = f"over the {self.which} of {self.limit:g} s"
            raise AudioTooLongError(f"{self.name}: the audio is {length} long, {over}")

    def feed(self, block: np.ndarray, rate: int) -> bool:
        """Add a mono block decoded at ``rate``; True when the cap has what it needs (stop decoding)."""
        if self.current is None or self.current.native_rate != rate:
            self.check_stream(rate, 1)
            self._close_current()
            self.current = Resampler(rate, self.target_rate)
        self.current.feed(_finite(block, self.name))
        if self.cap is None:
            self._check(self.seconds, at_least=True)
            return False
        self.stopped = self._cap_frames_left(rate) <= 0
        return self.stopped

    def frames_wanted(self, rate: int, most: int) -> int:
        """Frames to decode next at ``rate``: ``most``, or fewer where the cap needs fewer."""
        if self.cap is None:
            return most
        return max(1, min(most, self._cap_frames_left(rate)))

    def _cap_frames_left(self, rate: int) -> int:
        """Frames at ``rate`` still to decode before the cap (and its margin) is covered."""
        assert self.cap is not None
        fed = self.current.frames_in if self.current is not None and self.current.native_rate == rate else 0
        return math.ceil((self.cap + CAP_MARGIN_SECONDS - self.done_seconds) * rate) - fed

    def _close_current(self) -> None:
        if self.current is not None:
            self.done.append(self.current.finish())
            self.done_seconds += self.current.seconds_in
            self.current = None

    def finish(self) -> np.ndarray:
        self._close_current()
        y, self.done = join(self.done), []
        return y if self.cap_samples is None else y[: self.cap_samples]


def _finite(y: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(y).all():
        raise AudioError(f"{name}: the audio contains NaN or infinite samples")
    return y


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


def _check_structure(source: Source, name: str, fmt: str) -> None:
    """Refuse, before decoding, a file whose header declares more audio than the file holds."""
    f, size = opened(source if isinstance(source, bytes) else os.fspath(source))
    with f:
        reason = truncation(fmt, f, size)
    if reason:
        raise AudioDecodeError(f"{name}: cannot decode ({fmt}): {reason}")


def _decode_soundfile(source: Source, name: str, plan: DecodePlan) -> None:
    """Read with libsndfile block by block into the plan; raise _Unreadable if it can't open the input."""
    try:
        handle = sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source))
    except Exception as exc:  # libsndfile's "Format not recognised" and friends
        raise _Unreadable(_reason(exc)) from exc
    with handle as f:
        rate, channels, declared = f.samplerate, f.channels, f.frames
        if f.format in ("MPEG", "MP3") and not _length_stated(source):
            raise _Unreadable("an MP3 without a Xing/Info header: libsndfile's length would be a guess")
        plan.check_stream(rate, channels)
        _check_structure(source, name, f.format)
        known = 0 < declared < _UNKNOWN_FRAMES
        if known:
            plan.check_declared(declared / rate)  # refuse before decoding anything
        try:
            frames = _read_blocks(f, channels, plan, rate)
        except AudioError:
            raise
        except Exception as exc:
            raise AudioDecodeError(
                f"{name}: cannot decode ({f.format}/{f.subtype}): corrupt or truncated: {_reason(exc)}"
            ) from exc
        exact_count = known and f.format not in ("MPEG", "MP3")  # MP3 frame counts can be estimates
        if exact_count and not plan.stopped and frames < declared:
            raise AudioDecodeError(
                f"{name}: truncated: the header declares {declared} frames but only {frames} could be decoded"
            )


def _length_stated(source: Source) -> bool:
    f, _ = opened(source if isinstance(source, bytes) else os.fspath(source))
    with f:
        return mp3_length_stated(f)


def _read_blocks(f: sf.SoundFile, channels: int, plan: DecodePlan, rate: int) -> int:
    """Feed the plan block by block (one reused native-rate buffer); the number of frames read."""
    buffer = np.empty((max(1024, _BLOCK_SAMPLES // channels), channels), dtype=np.float32)
    total = 0
    while True:
        data = f.read(plan.frames_wanted(rate, len(buffer)), out=buffer)  # (frames, channels), a view of buffer
        if data.shape[0] == 0:
            return total
        total += data.shape[0]
        if plan.feed(_to_mono(data.T), rate):
            return total


def _to_mono(y: np.ndarray) -> np.ndarray:
    """Average channels ``(channels, n) -> (n,)`` with the same numpy call as ``librosa.to_mono``."""
    if y.shape[0] == 1:
        return y[0]
    return np.mean(y, axis=tuple(range(y.ndim - 1)))


def _decode_pyav(source: Source, name: str, plan: DecodePlan, soundfile_error: str) -> None:
    """Decode the first audio stream with PyAV (FFmpeg) into the plan, at the rate of the decoded frames."""
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
            plan.check_stream(stream.codec_context.sample_rate or 1, stream.codec_context.channels)
            if stream.duration and stream.time_base:
                plan.check_declared(float(stream.duration * stream.time_base))
            packets = _pyav_decode(av, container, stream, plan)
            declared = stream.frames
    except AudioError:
        raise
    except Exception as exc:
        raise AudioDecodeError(
            f"{name}: cannot decode: not a readable audio file, or corrupt or truncated "
            f"(soundfile: {soundfile_error}; PyAV: {_reason(exc)})"
        ) from exc
    if declared and not plan.stopped and packets < declared:
        raise AudioDecodeError(
            f"{name}: truncated: the container declares {declared} packets but only {packets} could be read"
        )


def _pyav_decode(av, container, stream, plan: DecodePlan) -> int:
    """Feed every decoded frame at its own sample rate (HE-AAC's SBR doubles the declared one); packets read."""
    packets, convert, rate = 0, None, 0
    for packet in container.demux(stream):
        packets += 1 if packet.size else 0
        for frame in packet.decode():
            if convert is None or frame.sample_rate != rate:
                if convert is not None and _feed_frames(convert.resample(None), plan, rate):
                    return packets
                convert, rate = av.AudioResampler(format="fltp"), frame.sample_rate  # keeps layout and rate
            if _feed_frames(convert.resample(frame), plan, rate):
                return packets
    if convert is not None:
        _feed_frames(convert.resample(None), plan, rate)
    return packets


def _feed_frames(frames, plan: DecodePlan, rate: int) -> bool:
    for out in frames:
        if plan.feed(_to_mono(out.to_ndarray()), rate):  # (channels, n) float32
            return True
    return False
