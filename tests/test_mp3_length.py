"""Every MP3 is decoded to its end: a VBR MP3 without its Xing/Info frame (older encoders, stream rips) states no
length, and libsndfile guesses one from the first frame's bitrate (a 30 s file read as a few seconds).

The file is made here: 30 s of a tone with bursts of noise, encoded VBR by LAME through PyAV, then the first
frame (LAME's Xing/Info header) is cut out, walking the MPEG frame headers as the standard lays them out.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

av = pytest.importorskip("av")

from runtime.audio import load_audio  # noqa: E402

SECONDS = 30.0
RATE = 44_100
BITRATES = {1: 32, 2: 40, 3: 48, 4: 56, 5: 64, 6: 80, 7: 96, 8: 112, 9: 128, 10: 160, 11: 192, 12: 224, 13: 256,
            14: 320}  # MPEG-1 Layer III, kbit/s by the header's index


def vbr_mp3() -> bytes:
    t = np.arange(int(SECONDS * RATE)) / RATE
    noise = np.random.default_rng(0).standard_normal(len(t)) * (np.sin(2 * np.pi * 0.1 * t) > 0.5)
    y = (0.15 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 0.2 * t)) + 0.2 * noise).astype(np.float32)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3") as out:
        stream = out.add_stream("libmp3lame", rate=RATE, layout="mono")
        stream.codec_context.qscale = 4  # VBR (LAME -V 4), not the default CBR
        for i in range(0, len(y), 11_520):
            frame = av.AudioFrame.from_ndarray(y[None, i : i + 11_520].copy(), format="fltp", layout="mono")
            frame.sample_rate = RATE
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def frames(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, length, kbit/s) of each MPEG-1 Layer III frame after any ID3v2 tag."""
    offset = 0
    if data[:3] == b"ID3":
        offset = 10 + (data[6] << 21 | data[7] << 14 | data[8] << 7 | data[9])
    out = []
    while offset + 4 <= len(data):
        head = data[offset : offset + 4]
        assert head[0] == 0xFF and head[1] & 0xE0 == 0xE0, f"no frame sync at {offset}"
        kbits, rate, padding = BITRATES[head[2] >> 4], {0: 44100, 1: 48000, 2: 32000}[(head[2] >> 2) & 3], \
            (head[2] >> 1) & 1
        length = 144_000 * kbits // rate + padding
        out.append((offset, length, kbits))
        offset += length
    return out


@pytest.fixture(scope="module")
def without_xing() -> bytes:
    data = vbr_mp3()
    found = frames(data)
    assert len({kbits for _, _, kbits in found}) > 3, "not VBR"  # the case: the first frame's bitrate misleads
    offset, length, _ = found[0]
    assert b"Xing" in data[offset : offset + length] or b"Info" in data[offset : offset + length]
    stripped = data[:offset] + data[offset + length :]
    assert b"Xing" not in stripped and b"Info" not in stripped
    return stripped


def test_a_vbr_mp3_without_its_xing_frame_is_decoded_to_its_end(without_xing, tmp_path):
    import soundfile as sf

    path = tmp_path / "stream-rip.mp3"
    path.write_bytes(without_xing)
    with sf.SoundFile(path) as f:  # the guess this replaces: well short of the stream
        assert f.frames / f.samplerate < SECONDS / 2
    for source in (path, without_xing):  # the CLI and corpus read paths, the service and Modal bytes
        seconds = len(load_audio(source)) / 22_050
        assert SECONDS <= seconds < SECONDS + 0.1, seconds  # the whole stream (plus the encoder's padding)


def test_the_service_scores_the_whole_mp3(without_xing, client):
    res = client.post("/v1/analyze", content=without_xing, headers={"content-type": "audio/mpeg"})
    assert res.status_code == 200, res.json()
    assert SECONDS <= res.json()["duration_seconds"] < SECONDS + 0.1
