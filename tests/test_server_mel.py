"""The spectrogram path of the HTTP service: the edge worker's binary blob and the original's JSON form."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

pytest.importorskip("fastapi")

from serving import assert_error, assert_scores  # noqa: E402

from runtime.audio import load_audio  # noqa: E402
from runtime.constants import API_KEYS, FEATURES  # noqa: E402
from runtime.errors import InputError  # noqa: E402
from runtime.features import features_from_audio, log_mel  # noqa: E402
from runtime.serve.mel_input import encode_blob, max_frames_for, parse_blob, parse_json  # noqa: E402

# ---------------------------------------------------------------------------------------------- mel path


def post_blob(client, mel: np.ndarray, **headers):
    return client.post("/v1/analyze/mel", content=encode_blob(mel),
                       headers={"content-type": "application/octet-stream", **headers})


def test_mel_blob_of_one_chunk_gives_exactly_that_chunks_scores(client, analyzer, clip, expected):
    """A blob carrying exactly one audio-path chunk (128 frames) is that chunk's model input, unchanged."""
    chunks = features_from_audio(load_audio(clip))
    assert len(chunks) == len(expected["timeline"]) >= 3
    for i in (0, 1, len(chunks) - 1):  # the last chunk is zero-padded audio: -80 dB frames at its end
        res = post_blob(client, chunks[i])
        assert res.status_code == 200, res.json()
        body = res.json()
        assert len(body["timeline"]) == 1
        assert_scores(body["scores"], expected["timeline"][i]["scores"])
        rows = client.post("/v1/analyze/mel", json={"mel_spectrogram": chunks[i].tolist()}).json()
        assert rows["scores"] == body["scores"]  # JSON and binary forms carry the same float32 values
    other = post_blob(client, chunks[1]).json()["scores"]  # the check can fail: another chunk scores otherwise
    assert max(abs(other[k] - expected["timeline"][0]["scores"][k]) for k in API_KEYS) > 1e-5


def test_mel_whole_clip_is_close_to_the_audio_path(client, analyzer, clip, expected, capsys):
    """A whole-clip spectrogram cannot reproduce the audio path exactly; how close it comes, and why.

    The audio path takes each 3 s chunk (starts every 44,100 samples) through its own STFT; a whole-clip
    spectrogram has frames every 512 samples from sample 0, so window i (starts every 86 frames = 44,032
    samples) drifts 68 samples per window from chunk i and its frames sit up to 256 samples from the
    chunk's frames. Window 0 has exactly chunk 0's frames; it differs only where the whole-clip floor
    (global max - 80 dB) lies above the chunk's own floor, i.e. in bins quieter than -80 dB below the loudest
    frame of the clip. So window 0 must match chunk 0 to float rounding in the model input, and the clip's
    scores may differ by an amount set by the model's sensitivity to a fraction of a frame's shift, which
    this tiny random model cannot stand in for: we require the spec's "invisible" 0.005 and print what we see.
    """
    y = load_audio(clip)
    whole = log_mel(y)
    body = post_blob(client, whole).json()
    assert body["status"] == "success", body
    assert len(body["timeline"]) == len(expected["timeline"])
    chunk0 = features_from_audio(y)[0]
    from runtime.analyze import windows_from_mel

    window0 = windows_from_mel(whole)[0]
    floor = -FEATURES.top_db + (whole.max() - whole[: FEATURES.n_frames].max())
    loud = chunk0 > floor + 1e-3
    assert loud.mean() > 0.5
    np.testing.assert_allclose(window0[loud], chunk0[loud], atol=1e-5, rtol=0)  # dB; 7.6e-6 measured
    first = max(abs(body["timeline"][0]["scores"][k] - expected["timeline"][0]["scores"][k]) for k in API_KEYS)
    overall = max(abs(body["scores"][k] - expected["scores"][k]) for k in API_KEYS)
    with capsys.disabled():
        print(f"\n[mel vs audio, {clip.name}] window 0 max |d score| {first:.2e}; whole clip {overall:.2e}")
    assert first < 1e-3
    assert overall < 0.005


@pytest.mark.parametrize("mutate, status", [
    (lambda b: b[:10], 422),  # shorter than the header
    (lambda b: b[:-4], 422),  # values missing
    (lambda b: b + b"\0\0\0\0", 422),  # values beyond the header's count
    (lambda b: struct.pack("<4I", 64, 128, 22050, 512) + b[16:], 422),  # wrong mel count
    (lambda b: struct.pack("<4I", 128, 128, 16000, 512) + b[16:], 422),  # wrong sample rate
    (lambda b: struct.pack("<4I", 128, 128, 22050, 256) + b[16:], 422),  # wrong hop
    (lambda b: struct.pack("<4I", 128, 0, 22050, 512), 422),  # no frames
    (lambda b: b[:16] + np.float32(np.nan).tobytes() + b[20:], 422),  # a NaN value
])
def test_mel_blob_errors(client, mutate, status):
    blob = encode_blob(np.full((128, 128), -40.0, np.float32))
    res = client.post("/v1/analyze/mel", content=mutate(blob), headers={"content-type": "application/octet-stream"})
    assert_error(res, status, "invalid_input")


@pytest.mark.parametrize("doc, status, error_type", [
    ({"mel_spectrogram": [[0.0] * 64] * 10}, 422, "invalid_input"),
    ({"mel_spectrogram": [[0.0] * 128, [0.0] * 127]}, 422, "invalid_input"),
    ({"mel_spectrogram": []}, 422, "invalid_input"),
    ({"mel_spectrogram": [["a"] * 128]}, 422, "invalid_input"),
    ({"mel_spectrogram": [[[0.0] * 128]]}, 422, "invalid_input"),
    ({"mel_spectrogram": [[0.0] * 128], "sample_rate": 44100}, 422, "invalid_input"),
    ({"mel": [[0.0] * 128]}, 422, "invalid_input"),
    ([[0.0] * 128], 422, "invalid_input"),
])
def test_mel_json_errors(client, doc, status, error_type):
    assert_error(client.post("/v1/analyze/mel", json=doc), status, error_type)


def test_mel_json_nonfinite_and_syntax_errors_and_media_type(client):
    nan_doc = '{"mel_spectrogram": [[' + ", ".join(["NaN"] + ["0.0"] * 127) + "]]}"
    assert_error(client.post("/v1/analyze/mel", content=nan_doc, headers={"content-type": "application/json"}),
                 422, "invalid_input")
    assert_error(client.post("/v1/analyze/mel", content=b"{not json", headers={"content-type": "application/json"}),
                 400, "bad_request")
    assert_error(client.post("/v1/analyze/mel", content=b"x", headers={"content-type": "audio/wav"}),
                 415, "unsupported_media_type")


def test_blob_layout_is_mel_major():
    n_mels, n_frames = 128, 3
    values = np.arange(n_mels * n_frames, dtype="<f4")  # mel 0's frames first, then mel 1's, ...
    blob = struct.pack("<4I", n_mels, n_frames, 22050, 512) + values.tobytes()
    mel = parse_blob(blob)
    assert mel.shape == (n_frames, n_mels) and mel.dtype == np.float32
    assert mel[2, 0] == 2 and mel[0, 1] == n_frames and mel[1, 5] == 5 * n_frames + 1
    assert encode_blob(mel) == blob


def test_parse_json_and_limits():
    mel = np.random.default_rng(0).uniform(-80, 0, (5, 128)).astype(np.float32)
    np.testing.assert_array_equal(parse_json({"mel_spectrogram": mel.tolist()}), mel)
    np.testing.assert_array_equal(parse_json(json.loads(json.dumps({"mel_spectrogram": mel.tolist()}))), mel)
    with pytest.raises(InputError, match="over the limit"):
        parse_json({"mel_spectrogram": mel.tolist()}, max_frames=4)
    with pytest.raises(InputError, match="over the limit"):
        parse_blob(encode_blob(mel), max_frames=4)
    assert max_frames_for(None) is None
    assert max_frames_for(3.0) == len(log_mel(np.zeros(int(3.0 * 22050), np.float32)))
