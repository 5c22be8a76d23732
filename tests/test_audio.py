"""Decoding and resampling (docs/spec.md §3): equal to librosa.load, every supported format, and clean refusals."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import piano_data
import pytest
import soundfile as sf

from runtime.audio import load_audio
from runtime.constants import FEATURES
from runtime.errors import AudioError

SR = FEATURES.sample_rate
CLIPS = piano_data.CLIPS
RESAMPLE_TOLERANCE = 1e-5


def _music(rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    """A decaying chord with different gains per channel, ``(frames, channels)`` float32."""
    t = np.arange(int(rate * seconds)) / rate
    tone = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6, 880.0)) * np.exp(-t) * 0.2
    return np.stack([tone * (1.0 - 0.3 * c) for c in range(channels)], axis=1).astype(np.float32)


def _write_m4a(path: Path, audio: np.ndarray, rate: int) -> None:
    """Encode ``(frames, channels)`` float32 audio as AAC in an MP4 container with PyAV."""
    av = pytest.importorskip("av")
    layout = "stereo" if audio.shape[1] == 2 else "mono"
    planar = np.ascontiguousarray(audio.T)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate, layout=layout)
        for start in range(0, planar.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(planar[:, start : start + 1024]), format="fltp", layout=layout
            )
            frame.sample_rate, frame.pts = rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def test_load_matches_librosa_on_real_clips(capsys: pytest.CaptureFixture[str]) -> None:
    from convert.reference import reference_load

    worst = 0.0
    for clip in CLIPS:
        ours, theirs = load_audio(clip), reference_load(clip)
        assert ours.dtype == np.float32 and ours.shape == theirs.shape, clip.name
        worst = max(worst, float(np.abs(ours - theirs).max()))
    with capsys.disabled():
        print(f"\n[audio] worst |load_audio - librosa.load| over {len(CLIPS)} clips: {worst:.2e}")
    assert worst <= RESAMPLE_TOLERANCE


@pytest.mark.parametrize(
    ("rate", "channels", "subtype"),
    [(44100, 2, "PCM_16"), (48000, 1, "PCM_24"), (48000, 2, "FLOAT"), (16000, 1, "PCM_16")],
)
def test_mono_mix_and_resampling_match_librosa(tmp_path: Path, rate: int, channels: int, subtype: str) -> None:
    from convert.reference import reference_load

    path = tmp_path / f"src_{rate}_{channels}.wav"
    sf.write(path, _music(rate, 2.37, channels), rate, subtype=subtype)
    ours, theirs = load_audio(path), reference_load(path)
    assert ours.shape == theirs.shape == (int(np.ceil(int(rate * 2.37) * SR / rate)),)
    assert float(np.abs(ours - theirs).max()) <= RESAMPLE_TOLERANCE


FORMATS = {  # name -> (soundfile format, subtype); None = written with PyAV
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "m4a": None,
}


@pytest.mark.parametrize("ext", FORMATS)
def test_each_format_decodes(tmp_path: Path, ext: str) -> None:
    rate, seconds = 44100, 2.0
    source = _music(rate, seconds, channels=2)
    path = tmp_path / f"clip.{ext}"
    if FORMATS[ext] is None:
        _write_m4a(path, source, rate)
    else:
        sf.write(path, source, rate, format=FORMATS[ext][0], subtype=FORMATS[ext][1])
    wav = tmp_path / "reference.wav"
    sf.write(wav, source, rate, subtype="FLOAT")
    expected = load_audio(wav)

    for decoded in (load_audio(path), load_audio(path.read_bytes())):
        assert decoded.dtype == np.float32 and decoded.ndim == 1
        assert abs(len(decoded) / SR - seconds) < 0.1, f"{ext}: {len(decoded) / SR:.3f} s"
        n = min(len(decoded), len(expected))
        corr = np.corrcoef(decoded[:n], expected[:n])[0, 1]
        assert corr > 0.99, f"{ext}: correlation {corr:.4f} with the source"


def test_lossless_formats_are_exact(tmp_path: Path) -> None:
    source = _music(SR, 1.5, channels=1)
    sf.write(tmp_path / "a.flac", source, SR, subtype="PCM_24")
    sf.write(tmp_path / "a.wav", source, SR, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "a.wav"), source[:, 0])
    np.testing.assert_allclose(load_audio(tmp_path / "a.flac"), source[:, 0], atol=2**-23)


# --- refusals ---------------------------------------------------------------------------------------


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[object, str]]:
    """name -> (source, regex the AudioError message must match)."""
    real = CLIPS[0].read_bytes()
    nan_wav = tmp_path / "nan.wav"
    sf.write(nan_wav, np.array([0.0, np.nan, 0.5] * 1000, dtype=np.float32), SR, subtype="FLOAT")
    random_bytes = np.random.default_rng(0).bytes(4096)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "random.mp3").write_bytes(random_bytes)
    cases = {
        "missing": (tmp_path / "nope.flac", r"nope\.flac: no such file"),
        "directory": (tmp_path, r"is a directory"),
        "empty_file": (tmp_path / "empty.wav", r"empty\.wav: the file is empty"),
        "random_file": (tmp_path / "random.mp3", r"random\.mp3: cannot decode"),
        "nan_file": (nan_wav, r"nan\.wav: .*NaN"),
        "empty_bytes": (b"", r"empty"),
        "random_bytes": (random_bytes, r"4096 bytes of audio.*cannot decode"),
        "nan_bytes": (nan_wav.read_bytes(), r"NaN"),
    }
    (tmp_path / "truncated.flac").write_bytes(real[:1000])
    cases["truncated_file"] = (tmp_path / "truncated.flac", r"truncated\.flac: .*(corrupt|truncated)")
    cases["truncated_bytes"] = (real[:1000], r"(corrupt|truncated)")
    return cases


BAD = [
    "missing", "directory", "empty_file", "random_file", "nan_file",
    "empty_bytes", "random_bytes", "nan_bytes", "truncated_file", "truncated_bytes",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_raise_audio_error(tmp_path: Path, case: str) -> None:
    source, pattern = _bad_inputs(tmp_path)[case]
    with pytest.raises(AudioError, match=pattern):
        load_audio(source)


def test_max_seconds_names_duration_and_limit() -> None:
    seconds = sf.info(CLIPS[0]).duration
    with pytest.raises(AudioError, match=rf"{seconds:.1f} s long, over the limit of 5 s"):
        load_audio(CLIPS[0], refuse_over_seconds=5)
    assert len(load_audio(CLIPS[0], refuse_over_seconds=seconds + 1)) > 0


def test_header_claiming_huge_length_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.flac"
    sf.write(path, np.zeros(SR, dtype=np.float32), SR, format="FLAC")
    data = bytearray(path.read_bytes())
    # STREAMINFO bytes 18..26 hold rate(20) | channels(3) | bits(5) | total samples(36): claim 2**36 - 1.
    packed = int.from_bytes(data[18:26], "big") | ((1 << 36) - 1)
    data[18:26] = packed.to_bytes(8, "big")
    with pytest.raises(AudioError, match=r"over the hard limit of 3600 s"):
        load_audio(bytes(data))
    with pytest.raises(AudioError, match=r"over the hard limit of 0.5 s"):
        load_audio(path, hard_limit_seconds=0.5)


def test_non_audio_source_type_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        load_audio(123)  # type: ignore[arg-type]


def test_runtime_imports_stay_light() -> None:
    code = (
        "import sys, runtime.audio, runtime.features\n"
        f"y = runtime.audio.load_audio({str(CLIPS[0])!r})\n"
        "assert runtime.features.features_from_audio(y).shape[1:] == (128, 128)\n"
        "heavy = {'jax', 'flax', 'tensorflow', 'sklearn', 'librosa', 'scipy', 'numba'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --- streaming resampling (soxr.ResampleStream) against librosa.load's whole-signal soxr HQ ------------------


@pytest.fixture(scope="module")
def resampled_clips(tmp_path_factory) -> list[Path]:
    """Every shared clip (22,050 Hz mono) brought to other native rates and channel counts, as files."""
    import soxr

    out = tmp_path_factory.mktemp("rates")
    paths = []
    for i, clip in enumerate(CLIPS):
        y = sf.read(clip, dtype="float32")[0]
        rate = (44100, 48000, 96000, 16000)[i % 4]
        x = soxr.resample(y, SR, rate, quality="VHQ").astype(np.float32)
        stereo = np.stack([x, 0.6 * x + 0.01 * np.roll(x, 7)], axis=1) if i % 2 else x[:, None]
        paths.append(out / f"{clip.stem}_{rate}.flac" if i % 3 else out / f"{clip.stem}_{rate}.wav")
        sf.write(paths[-1], stereo, rate, subtype="PCM_24" if paths[-1].suffix == ".flac" else "FLOAT")
    return paths


def test_streaming_resampler_matches_librosa_on_real_clips_at_other_rates(resampled_clips, capsys) -> None:
    from convert.reference import reference_load

    worst = 0.0
    for path in resampled_clips:
        ours, theirs = load_audio(path), reference_load(path)
        assert ours.dtype == np.float32 and ours.shape == theirs.shape, path.name
        worst = max(worst, float(np.abs(ours - theirs).max()))
    with capsys.disabled():
        print(f"\n[audio] worst |load_audio - librosa.load| over {len(resampled_clips)} resampled clips "
              f"(16-96 kHz, mono and stereo): {worst:.2e}")
    assert worst <= RESAMPLE_TOLERANCE


def test_decoding_memory_follows_the_output_not_the_native_rate(tmp_path: Path) -> None:
    import tracemalloc

    seconds, rate = 20.0, 384_000
    path = tmp_path / "quiet_384k.flac"
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, np.stack([1e-3 * np.sin(2 * np.pi * 440 * t)] * 2, axis=1).astype(np.float32), rate,
             subtype="PCM_16")
    del t
    native_bytes = int(seconds * rate) * 4  # one float32 mono copy at 384 kHz: 30.7 MB
    output_bytes = int(seconds * SR) * 4  # 1.8 MB
    tracemalloc.start()
    try:
        y = load_audio(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(y) == int(seconds * SR)
    # the reused read buffer (4 MB) and its mono mix, the output and one copy of it while joining: about 8 MB;
    # holding the native signal (as before: the whole mono mix and a concatenated copy) is 61 MB
    assert peak < 6e6 + 2 * output_bytes + native_bytes / 8, f"peak {peak / 1e6:.1f} MB"


def test_resample_is_librosa_resample() -> None:
    from runtime.resample import resample

    librosa = pytest.importorskip("librosa")
    x = _music(44100, 3.3)[:, 0]
    np.testing.assert_array_equal(resample(x, 44100, SR), librosa.resample(x, orig_sr=44100, target_sr=SR))
    np.testing.assert_array_equal(resample(x, 44100, 44100), x)


# --- truncated files: a header that declares more audio than the file holds ---------------------------------


def _encoded(fmt: str, seconds: float = 3.0) -> bytes:
    """A mono chord in ``fmt`` (wav, aiff, ogg, opus, mp3, flac or m4a), as bytes."""
    rate = 48000 if fmt == "opus" else 44100
    source = _music(rate, seconds)
    if fmt == "m4a":
        return _m4a_faststart(source, rate)
    kind = {"wav": ("WAV", "PCM_16"), "aiff": ("AIFF", "PCM_16"), "ogg": ("OGG", "VORBIS"),
            "opus": ("OGG", "OPUS"), "mp3": ("MP3", "MPEG_LAYER_III"), "flac": ("FLAC", "PCM_16")}[fmt]
    buf = io.BytesIO()
    sf.write(buf, source, rate, format=kind[0], subtype=kind[1])
    return buf.getvalue()


def _encode_aac(planar: np.ndarray, rate: int, target, fmt: str, **options) -> None:
    """Encode mono float audio (1, n) as AAC into `target` (a path or a file object) in container `fmt`."""
    av = pytest.importorskip("av")
    with av.open(target, "w", format=fmt, **options) as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        for start in range(0, planar.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar[:, start : start + 1024]),
                                               format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _m4a_faststart(audio: np.ndarray, rate: int) -> bytes:
    """AAC in MP4 with the index (moov) first, as streaming-friendly encoders write it; cut at a packet end."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.m4a"
        _encode_aac(np.ascontiguousarray(audio.T), rate, str(path), "mp4", options={"movflags": "faststart"})
        return path.read_bytes()


def _cut(fmt: str, data: bytes) -> bytes:
    """The first half of the file; for MP4 exactly at a packet boundary (no partial packet to trip over)."""
    if fmt != "m4a":
        return data[: len(data) // 2]
    import av

    with av.open(io.BytesIO(data)) as container:
        ends = [p.pos + p.size for p in container.demux(container.streams.audio[0]) if p.size]
    return data[: ends[len(ends) // 2]]


TRUNCATABLE = ["wav", "aiff", "ogg", "opus", "mp3", "flac", "m4a"]


@pytest.mark.parametrize("fmt", TRUNCATABLE)
def test_truncated_file_is_an_error_in_every_container(tmp_path: Path, fmt: str) -> None:
    from runtime.errors import AudioDecodeError

    whole = _encoded(fmt)
    assert abs(len(load_audio(whole)) / SR - 3.0) < 0.1  # the complete file decodes
    cut = _cut(fmt, whole)
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(cut)
    for source in (path, cut):
        with pytest.raises(AudioDecodeError, match=r"(corrupt|truncated)"):
            load_audio(source)


def test_wav_of_unknown_length_is_not_called_truncated() -> None:
    data = bytearray(_encoded("wav", seconds=1.0))
    at = data.find(b"data")
    data[at + 4 : at + 8] = (0xFFFFFFFF).to_bytes(4, "little")  # what an encoder writing to a pipe puts there
    data[4:8] = (0xFFFFFFFF).to_bytes(4, "little")
    assert len(load_audio(bytes(data))) == SR


def test_mp3_behind_an_id3_tag_is_checked_from_its_first_frame() -> None:
    from runtime.errors import AudioDecodeError

    tag = b"ID3\x04\x00\x00" + bytes([0, 0, 8, 0]) + bytes(1024)  # an ID3v2.4 tag of 1024 bytes of padding
    whole = tag + _encoded("mp3")
    assert abs(len(load_audio(whole)) / SR - 3.0) < 0.1
    with pytest.raises(AudioDecodeError, match="truncated"):
        load_audio(whole[: len(whole) * 2 // 3])


# --- PyAV: the sample rate of the decoded frames, not the stream's declared one -------------------------------


def _adts(rate: int, seconds: float) -> bytes:
    buf = io.BytesIO()
    _encode_aac(np.ascontiguousarray(_music(rate, seconds).T), rate, buf, "adts")
    return buf.getvalue()


def test_pyav_uses_the_rate_of_the_decoded_frames() -> None:
    """An AAC stream whose frames change rate (22,050 Hz, then 44,100 Hz): the stream declares the first."""
    av = pytest.importorskip("av")
    data = _adts(22050, 1.0) + _adts(44100, 2.0)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        declared = stream.codec_context.sample_rate
        samples: dict[int, int] = {}
        for frame in container.decode(stream):
            samples[frame.sample_rate] = samples.get(frame.sample_rate, 0) + frame.samples
    assert declared == 22050 and set(samples) == {22050, 44100}  # the file is what the test needs
    want = sum(n / rate for rate, n in samples.items())  # 3.11 s; read at the declared rate it would be 5.15 s
    y = load_audio(data)
    assert abs(len(y) / SR - want) < 2 / SR
    second = load_audio(_adts(44100, 2.0))
    tail = y[-len(second) :]
    assert np.corrcoef(tail[SR // 10 : -SR // 10], second[SR // 10 : -SR // 10])[0, 1] > 0.99


def test_pyav_rate_declared_at_half_the_frames_rate_as_he_aac_does(tmp_path: Path, monkeypatch) -> None:
    """HE-AAC with implicit SBR declares half its real rate; no encoder at hand writes it, so the declaration
    of a real 44.1 kHz AAC stream is made to say 22,050 Hz while the frames stay as decoded."""
    av = pytest.importorskip("av")
    if "libfdk_aac" in av.codecs_available:
        pytest.skip("libfdk_aac is available: write a real HE-AAC file instead")
    path = tmp_path / "clip.m4a"
    _write_m4a(path, _music(44100, 2.0), 44100)
    truth = load_audio(path)
    real_open = av.open

    def open_declaring_half(*args, **kwargs):
        container = real_open(*args, **kwargs)
        for stream in container.streams.audio:
            stream.codec_context.sample_rate = 22050  # what the stream header of an implicit-SBR file says
        return container

    monkeypatch.setattr(av, "open", open_declaring_half)
    with real_open(str(path)) as probe:
        probe.streams.audio[0].codec_context.sample_rate = 22050
        assert probe.streams.audio[0].codec_context.sample_rate == 22050
        assert {f.sample_rate for f in probe.decode(probe.streams.audio[0])} == {44100}
    np.testing.assert_array_equal(load_audio(path), truth)
