"""The original's 30 s cap (the first 30 s after resampling) beside the refusal limit: load, Analyzer, CLI, HTTP."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf

from runtime import cli
from runtime.analyze import Analyzer, aggregate
from runtime.audio import CAP_MARGIN_SECONDS, load_audio
from runtime.constants import API_KEYS, FEATURES, ORIGINAL_CAP_SECONDS
from runtime.errors import AudioTooLongError, ConfigError
from runtime.serve.settings import Settings

SR = FEATURES.sample_rate
CAP = ORIGINAL_CAP_SECONDS
CAP_SAMPLES = int(CAP * SR)


@pytest.fixture(scope="module")
def long_audio(piano_clips) -> np.ndarray:
    """The repository's clips end to end until over 40 s: real piano at 22,050 Hz, longer than the cap."""
    parts, total = [], 0
    for clip in piano_clips:
        y = sf.read(clip, dtype="float32")[0]
        parts.append(y)
        total += len(y)
        if total > 40 * SR:
            return np.concatenate(parts)
    raise AssertionError("the repository's clips add up to less than 40 s")


@pytest.fixture(scope="module")
def long_files(long_audio, tmp_path_factory) -> dict[str, object]:
    """The long recording as kept (22,050 Hz mono FLAC) and at 44.1 kHz stereo (the cap cuts resampled audio)."""
    import soxr

    out = tmp_path_factory.mktemp("long")
    native = out / "long_22050.flac"
    sf.write(native, long_audio, SR, subtype="PCM_24")
    x = soxr.resample(long_audio, SR, 44100, quality="VHQ").astype(np.float32)
    stereo = out / "long_44100.wav"
    sf.write(stereo, np.stack([x, 0.5 * x], axis=1), 44100, subtype="FLOAT")
    return {"22050": native, "44100": stereo}


@pytest.fixture(scope="module")
def analyzer(tiny_model) -> Analyzer:
    return Analyzer.from_path(tiny_model, device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def capped(tiny_model) -> Analyzer:
    return Analyzer.from_path(tiny_model, device="cpu", batch_size=8, cap_seconds=CAP)


def test_cap_scores_match_librosa_first_30s_and_jax(capped, tiny_checkpoint, long_files, capsys):
    from convert.checkpoint import load_checkpoint
    from convert.export import build_forward
    from convert.reference import reference_features, reference_load

    forward = build_forward(load_checkpoint(tiny_checkpoint))
    worst = 0.0
    for path in long_files.values():
        assert sf.info(str(path)).duration > CAP + 10
        y = reference_load(path)[:CAP_SAMPLES]  # the original: librosa.load at 22,050 Hz, then the first 30 s
        want = aggregate(np.asarray(forward(reference_features(y))))
        got = capped.analyze_file(path)
        assert got.duration_seconds == CAP and len(got.timeline) == 15
        worst = max(worst, float(np.abs(np.array([got.scores[k] for k in API_KEYS]) - want).max()))
    with capsys.disabled():
        print(f"\n[cap] 30 s cap vs librosa.load + first 30 s + JAX + mean + clip (fp32): max abs {worst:.2e}")
    assert worst <= 1e-4


@pytest.mark.parametrize("rate", [11025, 44100, 48000])
@pytest.mark.parametrize("cap", [CAP, 12.345])
def test_capped_samples_equal_librosa_then_cut(long_audio, tmp_path, rate, cap):
    import soxr

    from convert.reference import reference_load

    path = tmp_path / f"long_{rate}.flac"
    sf.write(path, soxr.resample(long_audio, SR, rate, quality="VHQ"), rate, subtype="PCM_24")
    want = reference_load(path)[: int(cap * SR)]
    np.testing.assert_array_equal(load_audio(path, cap_seconds=cap), want)


def test_without_the_margin_the_cut_would_differ(long_files, monkeypatch):
    """The margin matters: resampling only up to the cut changes the last samples before it."""
    from convert.reference import reference_load

    want = reference_load(long_files["44100"])[:CAP_SAMPLES]
    monkeypatch.setattr("runtime.audio.CAP_MARGIN_SECONDS", 0.0)
    short = load_audio(long_files["44100"], cap_seconds=CAP)
    assert float(np.abs(short - want).max()) > 1e-3


def test_a_file_just_past_the_cap_equals_librosa_then_cut(long_audio, tmp_path):
    from convert.reference import reference_load

    path = tmp_path / "just_past.wav"
    x = long_audio[: int((CAP + CAP_MARGIN_SECONDS / 2) * SR)]
    sf.write(path, np.repeat(x, 2)[: 2 * len(x) - 1], 2 * SR, subtype="FLOAT")  # 44.1 kHz, 30.05 s
    np.testing.assert_array_equal(load_audio(path, cap_seconds=CAP), reference_load(path)[:CAP_SAMPLES])


def test_a_cap_decodes_only_what_it_needs(long_files, monkeypatch):
    import runtime.audio as audio

    fed: list[int] = []

    class Counting(audio.Resampler):
        def feed(self, block):
            fed.append(len(block))
            super().feed(block)

    monkeypatch.setattr(audio, "Resampler", Counting)
    for path, rate in ((long_files["44100"], 44100), (long_files["22050"], SR)):
        fed.clear()
        assert len(load_audio(path, cap_seconds=CAP)) == CAP_SAMPLES
        assert sum(fed) <= math.ceil((CAP + CAP_MARGIN_SECONDS) * rate) < sf.info(str(path)).frames


def test_a_cap_is_not_refused_and_the_refusal_still_refuses(long_files):
    path = long_files["44100"]
    seconds = sf.info(str(path)).duration
    with pytest.raises(AudioTooLongError, match=rf"{seconds:.1f} s long, over the limit of 35 s"):
        load_audio(path, refuse_over_seconds=35)
    with pytest.raises(AudioTooLongError, match="over the hard limit of 35 s"):
        load_audio(path, hard_limit_seconds=35)
    assert len(load_audio(path, cap_seconds=CAP, refuse_over_seconds=35)) == CAP_SAMPLES
    assert len(load_audio(path, cap_seconds=CAP, hard_limit_seconds=35)) == CAP_SAMPLES
    for bad in (0, -1, math.inf, math.nan, 36):
        with pytest.raises(ConfigError, match="cap"):
            load_audio(path, cap_seconds=bad, refuse_over_seconds=35)


def test_analyze_audio_applies_the_cap_after_resampling(capped, long_files):
    y, rate = sf.read(long_files["44100"], dtype="float32")
    from_array = capped.analyze_audio(y.mean(axis=1), rate)
    from_file = capped.analyze_file(long_files["44100"])
    assert from_array.duration_seconds == CAP
    np.testing.assert_allclose(list(from_array.scores.values()), list(from_file.scores.values()), atol=1e-6)


# --- the command line -----------------------------------------------------------------------------------


def _cli(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = cli.main(["analyze", *args, "--json", "--device", "cpu"])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if out.out.strip() else None), out.err


def test_cli_cap_seconds_is_the_original_cap(tiny_model, long_files, capped, capsys):
    path = str(long_files["22050"])
    code, doc, _ = _cli(capsys, path, "--model", str(tiny_model), "--cap-seconds")
    assert code == 0
    (res,) = doc["results"]
    assert res["duration_seconds"] == CAP and len(res["timeline"]) == 15
    want = capped.analyze_file(path).scores
    np.testing.assert_allclose([res["scores"][k] for k in API_KEYS], [want[k] for k in API_KEYS], atol=1e-6)
    code, doc, _ = _cli(capsys, path, "--model", str(tiny_model), "--cap-seconds", "10")
    assert code == 0 and doc["results"][0]["duration_seconds"] == 10.0


def test_cli_max_seconds_is_a_deprecated_alias_of_the_cap(tiny_model, long_files, capsys):
    path = str(long_files["22050"])
    code, doc, err = _cli(capsys, path, "--model", str(tiny_model), "--max-seconds", "10")
    assert code == 0 and doc["results"][0]["duration_seconds"] == 10.0
    assert [line for line in err.splitlines() if "deprecated" in line] == [
        "warning: --max-seconds is deprecated, use --cap-seconds (the same cap)"]
    code, doc, err = _cli(capsys, path, "--model", str(tiny_model), "--max-seconds", "10", "--cap-seconds", "5")
    assert code == 2 and doc is None and "give only --cap-seconds" in err


def test_cli_refuse_over_is_a_per_file_error(tiny_model, long_files, piano_clips, capsys):
    code, doc, err = _cli(capsys, str(long_files["22050"]), str(piano_clips[0]), "--model", str(tiny_model),
                          "--refuse-over", "35")
    assert code == 1 and "1 of 2 file(s) failed" in err
    refused, fine = doc["results"]
    assert "over the limit of 35 s" in refused["error"] and fine["error"] is None
    code, doc, err = _cli(capsys, str(long_files["22050"]), "--model", str(tiny_model), "--cap-seconds", "40",
                          "--refuse-over", "35")
    assert code == 2 and doc is None and err.startswith("error: a cap of 40 s is over the limit of 35 s")


# --- settings and the HTTP service ----------------------------------------------------------------------


def test_settings_name_the_cap_and_the_refusal(caplog):
    s = Settings.from_env({"PERCEPIANO_CAP_SECONDS": "30", "PERCEPIANO_REFUSE_OVER_SECONDS": "120"})
    assert (s.cap_seconds, s.refuse_over_seconds) == (30.0, 120.0)
    assert Settings.from_env({"PERCEPIANO_MAX_SECONDS": "90"}).refuse_over_seconds == 90.0  # the old name still works
    assert "PERCEPIANO_MAX_SECONDS is deprecated" in caplog.text  # ... with a warning
    assert Settings.from_env({}).cap_seconds is None and Settings.from_env({}).refuse_over_seconds == 600.0
    assert Settings.from_env({"PERCEPIANO_CAP_SECONDS": "none"}).cap_seconds is None
    with pytest.raises(ConfigError, match="disagree"):
        Settings.from_env({"PERCEPIANO_MAX_SECONDS": "90", "PERCEPIANO_REFUSE_OVER_SECONDS": "120"})
    with pytest.raises(ConfigError, match="over the limit of 20 s"):
        Settings.from_env({"PERCEPIANO_CAP_SECONDS": "30", "PERCEPIANO_REFUSE_OVER_SECONDS": "20"})
    assert Settings(cap_seconds=30.0).public()["cap_seconds"] == 30.0


def _client(analyzer, **settings):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from serving import wait_ready

    from runtime.serve.app import create_app

    client = TestClient(create_app(analyzer, settings=Settings(max_bytes=20_000_000, **settings)))
    client.__enter__()
    wait_ready(client)
    return client


def test_http_cap_query_parameter(analyzer, capped, long_files):
    data = long_files["22050"].read_bytes()
    client = _client(analyzer, refuse_over_seconds=35.0)
    try:
        post = lambda query="": client.post(f"/v1/analyze{query}", content=data,  # noqa: E731
                                            headers={"content-type": "audio/flac"})
        refused = post()
        assert refused.status_code == 413 and refused.json()["error_type"] == "audio_too_long"
        res = post("?cap_seconds=30")
        assert res.status_code == 200, res.json()
        body, want = res.json(), capped.analyze_file(long_files["22050"])
        assert body["duration_seconds"] == CAP and len(body["timeline"]) == 15
        np.testing.assert_allclose([body["scores"][k] for k in API_KEYS], [want.scores[k] for k in API_KEYS],
                                   atol=1e-6)
        for bad in ("0", "-1", "inf", "nan", "abc", "36"):
            res = post(f"?cap_seconds={bad}")
            assert res.status_code == 422 and res.json()["status"] == "error", (bad, res.json())
        assert "less than or equal to 35" in post("?cap_seconds=36").json()["error"]  # the schema's maximum
    finally:
        client.__exit__(None, None, None)


def test_http_cap_setting_and_truncated_upload(analyzer, long_files):
    import io

    client = _client(analyzer, refuse_over_seconds=35.0, cap_seconds=CAP)
    try:
        data = long_files["22050"].read_bytes()
        res = client.post("/v1/analyze", content=data, headers={"content-type": "audio/flac"})
        assert res.status_code == 200 and res.json()["duration_seconds"] == CAP
        assert client.get("/v1/model").json()["limits"]["cap_seconds"] == CAP
        wav = io.BytesIO()
        sf.write(wav, np.zeros(2 * SR, np.float32), SR, format="WAV", subtype="PCM_16")
        cut = wav.getvalue()[: len(wav.getvalue()) // 2]  # an interrupted upload: the header declares 2 s
        res = client.post("/v1/analyze", content=cut, headers={"content-type": "audio/wav"})
        assert res.status_code == 415 and "truncated" in res.json()["error"], res.json()
    finally:
        client.__exit__(None, None, None)
