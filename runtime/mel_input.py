"""Precomputed log-mel spectrograms from callers: the edge worker's binary blob and the original JSON form.

Both parse to a float32 ``[time, n_mels]`` array in dB, checked against the model's feature parameters;
anything else raises ``InputError`` naming the bad value. The values themselves (finite) are checked where
every spectrogram goes: ``runtime.analyze.windows_from_mel``. Plain numpy, no web framework.

Binary blob (SPEC §5): a 16-byte little-endian header of four u32 (n_mels, n_frames, sample_rate, hop),
then ``n_mels * n_frames`` little-endian float32 values, mel-major (all frames of mel bin 0, then bin 1, ...).
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from runtime.constants import FEATURES, FeatureParams
from runtime.errors import InputError

HEADER = struct.Struct("<4I")  # n_mels, n_frames, sample_rate, hop_length
BLOB_CONTENT_TYPES = ("application/octet-stream", "application/x-percepiano-mel")


class InputTooLarge(InputError):
    """A spectrogram longer than the server's duration limit (HTTP 413)."""


def encode_blob(mel: np.ndarray, params: FeatureParams = FEATURES) -> bytes:
    """A ``[time, n_mels]`` spectrogram -> the edge worker's blob (the inverse of ``parse_blob``)."""
    mel = np.asarray(mel, dtype="<f4")
    if mel.ndim != 2:
        raise InputError(f"expected a [time, mel] spectrogram, got shape {mel.shape}")
    header = HEADER.pack(mel.shape[1], mel.shape[0], params.sample_rate, params.hop_length)
    return header + np.ascontiguousarray(mel.T).tobytes()


def parse_blob(data: bytes, params: FeatureParams = FEATURES, *, max_frames: int | None = None) -> np.ndarray:
    """The edge worker's binary blob -> float32 ``[time, n_mels]``."""
    if len(data) < HEADER.size:
        raise InputError(f"mel blob is {len(data)} bytes, shorter than its {HEADER.size}-byte header")
    n_mels, n_frames, sample_rate, hop = HEADER.unpack_from(data)
    _check_params(n_mels, sample_rate, hop, params)
    check_frames(n_frames, max_frames)
    expected = HEADER.size + 4 * n_mels * n_frames
    if len(data) != expected:
        raise InputError(f"mel blob is {len(data)} bytes, but its header ({n_mels} mels x {n_frames} frames) "
                         f"implies {expected}")
    values = np.frombuffer(data, dtype="<f4", offset=HEADER.size).reshape(n_mels, n_frames)
    return values.T.astype(np.float32)  # mel-major -> [time, mel]; values are checked by windows_from_mel


def parse_json(doc: Any, params: FeatureParams = FEATURES, *, max_frames: int | None = None) -> np.ndarray:
    """``{"mel_spectrogram": [[...], ...]}`` ([time][mel], as the original function took) -> float32 ``[time, n_mels]``.

    Optional ``sample_rate`` and ``hop_length`` fields are checked against the model's when present.
    """
    if not isinstance(doc, dict) or "mel_spectrogram" not in doc:
        raise InputError('expected a JSON object {"mel_spectrogram": [[...128 values...], ...]} ([time][mel])')
    sample_rate = doc.get("sample_rate", params.sample_rate)
    hop = doc.get("hop_length", params.hop_length)
    rows = doc["mel_spectrogram"]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise InputError("mel_spectrogram must be a non-empty list of frames, each a list of mel values")
    _check_params(len(rows[0]), sample_rate, hop, params)
    check_frames(len(rows), max_frames)
    try:
        arr = np.array(rows)
    except ValueError:  # ragged nesting
        raise InputError("mel_spectrogram rows differ in length; every frame needs 128 values") from None
    if arr.ndim != 2 or arr.dtype.kind not in "iuf":
        raise InputError(f"mel_spectrogram must be a [time][mel] array of numbers, got {arr.ndim}-d of {arr.dtype}")
    return arr.astype(np.float32)


def check_frames(n_frames: int, max_frames: int | None) -> None:
    """Refuse an empty spectrogram, or one longer than max_frames (from the server's duration limit)."""
    if n_frames < 1:
        raise InputError("the spectrogram has no frames")
    if max_frames is not None and n_frames > max_frames:
        raise InputTooLarge(f"the spectrogram has {n_frames} frames, over the limit of {max_frames}")


def max_frames_for(seconds: float | None, params: FeatureParams = FEATURES) -> int | None:
    """Frames a spectrogram of `seconds` of audio has (center=True): the frame limit of a duration limit."""
    if seconds is None:
        return None
    return math.floor(seconds * params.sample_rate / params.hop_length) + 1


def _check_params(n_mels: Any, sample_rate: Any, hop: Any, params: FeatureParams) -> None:
    if n_mels != params.n_mels:
        raise InputError(f"the spectrogram has {n_mels} mel bins; the model takes {params.n_mels}")
    if sample_rate != params.sample_rate:
        raise InputError(f"the spectrogram's sample rate is {sample_rate} Hz; the model's is {params.sample_rate} Hz")
    if hop != params.hop_length:
        raise InputError(f"the spectrogram's hop is {hop} samples; the model's is {params.hop_length}")
