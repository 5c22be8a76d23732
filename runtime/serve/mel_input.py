"""Precomputed log-mel spectrograms from callers: the edge worker's binary blob and the original JSON form.

Both parse to a float32 ``[time, n_mels]`` array in dB, checked against the model's feature parameters;
anything else raises ``InputError`` naming the bad value. The values themselves (finite) are checked where
every spectrogram goes: ``runtime.analyze.windows_from_mel``. Plain numpy, no web framework.

JSON is parsed with bounds checked on the raw bytes first (`check_json_bounds`): nesting depth, the length of
each number token and, under a frame limit, the count of values, so that a hostile document can neither
recurse the parser, make Python convert a thousand-digit integer, nor build more Python objects than the
longest spectrogram the limit allows.

Binary blob (docs/spec.md §5): a 16-byte little-endian header of four u32 (n_mels, n_frames, sample_rate, hop),
then ``n_mels * n_frames`` little-endian float32 values, mel-major (all frames of mel bin 0, then bin 1, ...).
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from typing import Any

import numpy as np

from runtime.constants import FEATURES, FeatureParams
from runtime.errors import InputError

HEADER = struct.Struct("<4I")  # n_mels, n_frames, sample_rate, hop_length
BLOB_CONTENT_TYPES = ("application/octet-stream", "application/x-percepiano-mel")


MAX_JSON_DEPTH = 16  # the document is 3 deep ({"mel_spectrogram": [[...]]}); room for extra fields
MAX_NUMBER_CHARS = 64  # a float64 repr is at most 24 characters; 64 leaves room for any sane formatting
EXTRA_JSON_VALUES = 64  # commas allowed beyond the values of the longest spectrogram (other fields)
MAX_JSON_STRINGS = 64  # keys and string values: the document has three keys
_BRACKETS = b"[]{}"
_NOT_BRACKETS = bytes(c for c in range(256) if c not in _BRACKETS)
_NUMBER_CHARS = b"-+0123456789.eE"
_NUMBERS_AS_ONES = bytes(ord("1") if c in _NUMBER_CHARS else ord(" ") for c in range(256))
_BLOCK = 1 << 20


class InputTooLarge(InputError):
    """A spectrogram longer than the server's duration limit (HTTP 413)."""


class JsonSyntaxError(InputError):
    """A body that is not JSON (HTTP 400)."""


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


def check_json_bounds(data: bytes, *, max_values: int | None = None) -> None:
    """Refuse, before any parsing, JSON with more than MAX_JSON_STRINGS strings, nested deeper than
    MAX_JSON_DEPTH, with a number token longer than MAX_NUMBER_CHARS, or (given `max_values`) more
    comma-separated values than that.

    Only what lies outside strings counts: escapes are dropped first (a backslash pair, then an escaped quote,
    left to right as JSON pairs them), so every quote left opens or closes a string. Linear time in C-speed
    passes (bytes methods, numpy over the brackets only); memory a copy or two of the body.
    """
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    if unescaped.count(b'"') > 2 * MAX_JSON_STRINGS:
        raise InputError(f"the JSON has more than {MAX_JSON_STRINGS} strings; a spectrogram document has a few keys")
    bare = b"".join(unescaped.split(b'"')[0::2])  # outside strings
    if b"1" * (MAX_NUMBER_CHARS + 1) in bare.translate(_NUMBERS_AS_ONES):
        raise InputError(f"a number in the JSON is more than {MAX_NUMBER_CHARS} characters long")
    if max_values is not None and bare.count(b",") > max_values + EXTRA_JSON_VALUES:
        raise InputTooLarge(f"the JSON holds more than {max_values} values, over the spectrogram limit")
    brackets, depth = np.frombuffer(bare.translate(None, _NOT_BRACKETS), np.uint8), 0
    for start in range(0, len(brackets), _BLOCK):
        block = brackets[start : start + _BLOCK]
        levels = depth + np.cumsum((block == ord("[")) | (block == ord("{")), dtype=np.int64) \
            - np.cumsum((block == ord("]")) | (block == ord("}")), dtype=np.int64)
        if levels.max() > MAX_JSON_DEPTH:
            raise InputError(f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep; "
                             'a spectrogram is {"mel_spectrogram": [[...], ...]}')
        depth = int(levels[-1])


def parse_json_bytes(data: bytes, params: FeatureParams = FEATURES, *, max_frames: int | None = None) -> np.ndarray:
    """A JSON body -> float32 ``[time, n_mels]``, its bounds checked before it is parsed."""
    check_json_bounds(data, max_values=None if max_frames is None else max_frames * params.n_mels)
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JsonSyntaxError(f"the body is not valid JSON ({exc})") from None
    return parse_json(doc, params, max_frames=max_frames)


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
    if any(len(r) != params.n_mels for r in rows):
        raise InputError(f"mel_spectrogram rows differ in length; every frame needs {params.n_mels} values")
    kinds = set(map(type, itertools.chain.from_iterable(rows)))
    if not kinds <= {int, float}:  # bool is not a number here, nor a nested list or a string
        names = ", ".join(sorted(k.__name__ for k in kinds - {int, float}))
        raise InputError(f"mel_spectrogram must be a [time][mel] array of numbers; it holds {names}")
    try:
        arr = np.array(rows, dtype=np.float64)
    except OverflowError:  # an integer beyond float64
        raise InputError("mel_spectrogram holds a number too large for a float") from None
    with np.errstate(over="ignore"):  # values beyond float32 become infinite: windows_from_mel refuses them
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
