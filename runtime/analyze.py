"""Audio in, 19 named scores and a per-chunk timeline out (docs/spec.md §3)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from runtime.audio import check_cap, load_audio, prepare_audio
from runtime.constants import API_KEYS, AUDIO_INPUT_NAME, FEATURES
from runtime.errors import AudioError, InputError, ModelOutputError
from runtime.features import chunk_audio, chunk_starts, features_from_audio
from runtime.model import OnnxModel

Infer = Callable[[np.ndarray], np.ndarray]  # model windows (n, ...) -> label-unit scores (n, 19)


@dataclass(frozen=True)
class ChunkScores:
    """Scores of one 3 s window starting at start_seconds."""

    start_seconds: float
    scores: dict[str, float]


@dataclass(frozen=True)
class Analysis:
    """The result for one recording."""

    duration_seconds: float
    scores: dict[str, float]
    timeline: list[ChunkScores]

    def to_dict(self) -> dict:
        return asdict(self)


def named(values: np.ndarray) -> dict[str, float]:
    """19 values -> {api_key: float} in model output order."""
    return {key: float(v) for key, v in zip(API_KEYS, values, strict=True)}


def aggregate(chunk_scores: np.ndarray) -> np.ndarray:
    """Per-chunk label-unit scores (n, 19) -> final scores (19,): mean over chunks, then clip to [0, 1]."""
    return np.clip(chunk_scores.astype(np.float64).mean(axis=0), 0.0, 1.0)


def build_analysis(chunk_scores: np.ndarray, duration_seconds: float) -> Analysis:
    """Assemble the result from per-chunk scores (n, 19) in label units; non-finite scores raise ModelOutputError."""
    starts = chunk_starts(len(chunk_scores))
    bad = ~np.isfinite(chunk_scores).all(axis=1)
    if bad.any():  # never a result with NaN scores: the model is broken (or its numbers overflowed)
        raise ModelOutputError(f"the model gave NaN or infinite scores for {int(bad.sum())} of {len(chunk_scores)} "
                               f"windows (first at {float(starts[bad.argmax()]):g} s)")
    timeline = [
        ChunkScores(float(s), named(np.clip(row, 0.0, 1.0))) for s, row in zip(starts, chunk_scores, strict=True)
    ]
    return Analysis(round(float(duration_seconds), 6), named(aggregate(chunk_scores)), timeline)


class Analyzer:
    """Runs the whole pipeline with one loaded model; safe to share between threads.

    ``cap_seconds`` analyses only the first N seconds (the original's 30 s cap: cut after resampling to
    22,050 Hz); ``refuse_over_seconds`` refuses longer audio with ``AudioTooLongError``. Both apply to every call.
    """

    def __init__(self, model: OnnxModel, *, batch_size: int = 16, cap_seconds: float | None = None,
                 refuse_over_seconds: float | None = None):
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.cap_seconds = check_cap(cap_seconds, refuse_over_seconds)
        self.refuse_over_seconds = refuse_over_seconds

    @classmethod
    def from_path(cls, path: str | os.PathLike, *, device: str = "auto", threads: int | None = None,
                  batch_size: int = 16, cap_seconds: float | None = None,
                  refuse_over_seconds: float | None = None, tf32: bool = False) -> Analyzer:
        check_cap(cap_seconds, refuse_over_seconds)  # a bad limit is refused before the model loads
        return cls(OnnxModel(path, device=device, threads=threads, tf32=tf32), batch_size=batch_size,
                   cap_seconds=cap_seconds,
                   refuse_over_seconds=refuse_over_seconds)

    def chunk_scores(self, mel: np.ndarray) -> np.ndarray:
        """(n, 128, 128) log-mel windows -> (n, 19) label-unit scores."""
        return self.model.predict(mel, self.batch_size)

    def analyze_audio(self, y: np.ndarray, sample_rate: int, timings: dict[str, float] | None = None,
                      infer: Infer | None = None) -> Analysis:
        """Mono float audio at ``sample_rate`` Hz -> Analysis (resampled to 22,050 Hz as load_audio does).

        ``timings``, if given, gets the seconds spent on features and on inference; ``infer`` (windows ->
        scores) replaces ``chunk_scores``: the service's batcher or its counted direct path.
        """
        y = prepare_audio(y, sample_rate, cap_seconds=self.cap_seconds, refuse_over_seconds=self.refuse_over_seconds)
        return self._analyze(y, timings, infer)

    def model_inputs(self, y: np.ndarray) -> np.ndarray:
        """What the model takes: log-mel windows, or only the 3 s chunks when its graph holds the front end."""
        if self.model.input_kind != AUDIO_INPUT_NAME:
            return features_from_audio(y)
        if not np.isfinite(y).all():
            raise AudioError("the audio contains NaN or infinite samples")
        return chunk_audio(y)

    def analyze_file(self, source: str | os.PathLike | bytes) -> Analysis:
        """A path or the bytes of an audio file -> Analysis."""
        return self._analyze(self.load(source))

    def load(self, source: str | os.PathLike | bytes) -> np.ndarray:
        """A path or the bytes of an audio file -> mono float32 audio at 22,050 Hz, capped and checked."""
        return load_audio(source, cap_seconds=self.cap_seconds, refuse_over_seconds=self.refuse_over_seconds)

    def prepare_file(self, source: str | os.PathLike | bytes) -> tuple[np.ndarray, float]:
        """A path or the bytes of an audio file -> (model windows, duration in seconds): all but the model.

        ``build_analysis(scores of those windows, duration)`` is then what ``analyze_file`` returns.
        """
        y = self.load(source)
        return self.model_inputs(y), len(y) / FEATURES.sample_rate

    def _analyze(self, y: np.ndarray, timings: dict[str, float] | None = None, infer: Infer | None = None) -> Analysis:
        """Mono float32 audio at 22,050 Hz -> Analysis."""
        return self._score(self.model_inputs, y, len(y) / FEATURES.sample_rate, timings, infer)

    def analyze_mel(self, mel: np.ndarray, timings: dict[str, float] | None = None,
                    infer: Infer | None = None) -> Analysis:
        """A precomputed [time, mel] log-mel spectrogram, cut into 128-frame windows at the audio path's hop."""
        if self.model.input_kind == AUDIO_INPUT_NAME:
            raise InputError("this model takes audio (its graph computes the features); send audio, not a spectrogram")
        return self._score(windows_from_mel, mel, mel_duration(len(mel)), timings, infer)

    def _score(self, windows, data: np.ndarray, duration: float, timings: dict[str, float] | None,
               infer: Infer | None = None) -> Analysis:
        """``windows(data)`` -> model windows -> scores (``infer``, else chunk_scores), timed into ``timings``."""
        t0 = time.perf_counter()
        mel = windows(data)
        t1 = time.perf_counter()
        scores = (infer or self.chunk_scores)(mel)
        if timings is not None:
            timings["features"], timings["inference"] = t1 - t0, time.perf_counter() - t1
        return build_analysis(scores, duration)


def mel_duration(n_frames: int) -> float:
    """Seconds of audio that n_frames STFT frames (center=True) cover."""
    return max(0, n_frames - 1) * FEATURES.hop_length / FEATURES.sample_rate


def windows_from_mel(mel: np.ndarray) -> np.ndarray:
    """Cut a [time, 128] dB spectrogram into (n, 128, 128) windows at the audio path's 2 s hop.

    Each window is re-referenced to its own maximum and floored at -top_db, as power_to_db(ref=np.max)
    does per 3 s chunk on the audio path; a window that is already such a chunk passes unchanged.
    """
    mel = np.asarray(mel, dtype=np.float32)
    if mel.ndim != 2 or mel.shape[1] != FEATURES.n_mels or len(mel) == 0:
        raise InputError(f"expected a [time, {FEATURES.n_mels}] spectrogram, got shape {mel.shape}")
    if not np.isfinite(mel).all():
        raise InputError("spectrogram contains NaN or infinite values")
    frames, hop = FEATURES.n_frames, round(FEATURES.hop_samples / FEATURES.hop_length)  # 128, 86
    starts = list(range(0, max(len(mel) - frames, 0) + 1, hop))
    if starts[-1] + frames < len(mel):
        starts.append(starts[-1] + hop)
    out = np.full((len(starts), frames, FEATURES.n_mels), FEATURES.pad_db, np.float32)
    for i, s in enumerate(starts):
        piece = mel[s : s + frames]
        out[i, : len(piece)] = np.maximum(piece - piece.max(), -FEATURES.top_db)
    return out
