"""The runtime end to end: scores vs the librosa + JAX reference, CLI, metadata checks, import hygiene."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import soundfile as sf

from runtime import cli
from runtime.analyze import Analyzer, aggregate, windows_from_mel
from runtime.constants import API_KEYS, FEATURES
from runtime.errors import InputError, ModelError
from runtime.model import METADATA_KEY, OnnxModel

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("jax", "jaxlib", "flax", "tensorflow", "sklearn", "librosa", "convert", "benchmarks", "torch")

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {forbidden!r}:
            raise ImportError('blocked in this test: ' + name)
sys.meta_path.insert(0, Block())
"""


@pytest.fixture(scope="module")
def analyzer(tiny_model):
    return Analyzer.from_path(tiny_model, device="cpu", batch_size=8)


@pytest.mark.slow  # JAX on 16 clips
def test_scores_match_librosa_and_jax_reference_on_real_clips(analyzer, tiny_checkpoint, piano_clips):
    from convert.checkpoint import load_checkpoint
    from convert.export import build_forward
    from convert.reference import reference_features

    forward = build_forward(load_checkpoint(tiny_checkpoint))
    worst = 0.0
    for clip in piano_clips:
        mel = reference_features(clip)
        chunks = np.asarray(forward(mel))
        want = aggregate(chunks)
        got = analyzer.analyze_file(clip)
        assert list(got.scores) == list(API_KEYS)
        assert len(got.timeline) == len(mel)
        worst = max(worst, float(np.abs(np.array(list(got.scores.values())) - want).max()))
        first = np.clip(chunks[0], 0, 1)
        np.testing.assert_allclose(list(got.timeline[0].scores.values()), first, atol=1e-4)
    print(f"largest end-to-end score difference vs librosa + JAX: {worst:.2e}")
    assert worst <= 1e-4


def test_scores_are_clipped_means_in_unit_range(analyzer, piano_clips):
    res = analyzer.analyze_file(piano_clips[0])
    chunk = np.array([list(c.scores.values()) for c in res.timeline])
    assert ((chunk >= 0) & (chunk <= 1)).all()
    assert all(0.0 <= v <= 1.0 for v in res.scores.values())
    assert [c.start_seconds for c in res.timeline] == [2.0 * i for i in range(len(res.timeline))]
    assert res.duration_seconds == pytest.approx(sf_duration(piano_clips[0]), abs=1e-3)


def test_build_analysis_means_then_clips_out_of_range_chunk_scores():
    """Scores outside [0, 1] (the tiny model's never are): the mean is taken first, then clipped (docs/spec.md §3)."""
    from runtime.analyze import build_analysis

    chunks = np.zeros((3, len(API_KEYS)))
    chunks[:, 0] = [1.4, 0.2, 0.8]  # mean 0.8; clipping each chunk first would give 0.667
    chunks[:, 1] = [1.5, 1.2, 0.9]  # mean 1.2 -> 1.0
    chunks[:, 2] = [-0.3, 0.1, -0.1]  # mean -0.1 -> 0.0
    chunks[:, 3] = [0.3, 0.4, 0.5]  # in range: unchanged
    res = build_analysis(chunks, duration_seconds=7.0)
    assert res.scores[API_KEYS[0]] == pytest.approx(0.8)
    assert res.scores[API_KEYS[1]] == 1.0 and res.scores[API_KEYS[2]] == 0.0
    assert res.scores[API_KEYS[3]] == pytest.approx(0.4)
    assert [c.scores[API_KEYS[0]] for c in res.timeline] == [1.0, pytest.approx(0.2), pytest.approx(0.8)]
    assert [c.scores[API_KEYS[2]] for c in res.timeline] == [0.0, pytest.approx(0.1), 0.0]
    assert [c.start_seconds for c in res.timeline] == [0.0, 2.0, 4.0] and res.duration_seconds == 7.0


def sf_duration(path) -> float:
    import soundfile as sf

    return sf.info(str(path)).duration


def test_batch_size_and_io_binding_do_not_change_scores(tiny_model, piano_clips):
    from runtime.audio import load_audio
    from runtime.features import features_from_audio

    mel = features_from_audio(load_audio(piano_clips[1]))
    plain = OnnxModel(tiny_model, device="cpu", io_binding=False)
    bound = OnnxModel(tiny_model, device="cpu", io_binding=True)
    a = plain.predict(mel, batch_size=1)
    np.testing.assert_allclose(plain.predict(mel, batch_size=16), a, atol=1e-6)
    np.testing.assert_allclose(bound.predict(mel, batch_size=3), a, atol=1e-6)


def test_windows_from_mel_cuts_like_the_audio_path():
    mel = np.random.default_rng(0).uniform(-80, 0, (300, 128)).astype(np.float32)
    windows = windows_from_mel(mel)
    assert windows.shape == (3, 128, 128)  # starts 0, 86, 172; the last padded with -80
    np.testing.assert_allclose(windows[1], mel[86:214] - mel[86:214].max())
    assert (windows[2, 300 - 172 :] == -80).all()
    one_chunk = windows_from_mel(windows[0])
    np.testing.assert_array_equal(one_chunk[0], windows[0])
    with pytest.raises(InputError):
        windows_from_mel(np.zeros((10, 64)))
    with pytest.raises(InputError):
        windows_from_mel(np.full((10, 128), np.nan))


def _with_metadata(model_path, tmp_path, edit) -> str:
    proto = onnx.load(str(model_path))
    props = {p.key: p.value for p in proto.metadata_props}
    doc = json.loads(props[METADATA_KEY])
    edit(doc)
    del proto.metadata_props[:]
    if doc is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(doc)
    out = tmp_path / "edited.onnx"
    onnx.save(proto, str(out))
    return str(out)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["dimensions"].reverse(), "dimensions"),
        (lambda d: d["features"].update(n_fft=1024), "feature parameters"),
        (lambda d: d.update(precision="int4"), "precision"),
        (lambda d: d.update(format_version=99), "format"),
        (lambda d: d.pop("label_scaler"), "label_scaler"),
    ],
)
def test_mismatched_metadata_is_refused(tiny_model, tmp_path, edit, message):
    with pytest.raises(ModelError, match=message):
        OnnxModel(_with_metadata(tiny_model, tmp_path, edit), device="cpu")


def test_not_a_model_is_refused(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load"):
        OnnxModel(bad, device="cpu")
    with pytest.raises(ModelError, match="not found"):
        OnnxModel(tmp_path / "missing.onnx")


def test_cli_analyze_json_keeps_going_after_a_bad_file(tiny_model, piano_clips, tmp_path, capsys):
    bad = tmp_path / "broken.flac"
    bad.write_bytes(piano_clips[0].read_bytes()[:500])
    noise = tmp_path / "noise.wav"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    empty = tmp_path / "empty.flac"
    empty.write_bytes(b"")
    cut_wav = tmp_path / "interrupted.wav"  # the header declares 3 s, the file holds 1.5 s
    sf.write(cut_wav, np.zeros(3 * FEATURES.sample_rate, np.float32), FEATURES.sample_rate, subtype="PCM_16")
    cut_wav.write_bytes(cut_wav.read_bytes()[: 44 + 3 * FEATURES.sample_rate])
    bad_ones = [bad, tmp_path, tmp_path / "missing.wav", noise, empty, cut_wav]
    code = cli.main(["analyze", str(piano_clips[0]), *map(str, bad_ones), str(piano_clips[1]),
                     "--model", str(tiny_model), "--json", "--device", "cpu", "--batch-size", "4"])
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert code != 0
    assert doc["model"]["precision"] == "fp32" and len(doc["model"]["sha256"]) == 64
    good, *broken, good2 = doc["results"]
    assert [b["file"] for b in broken] == list(map(str, bad_ones))
    assert all(b["error"] and b["scores"] is None for b in broken)
    assert "truncated" in broken[-1]["error"]
    for res in (good, good2):
        assert res["error"] is None and list(res["scores"]) == list(API_KEYS)
        assert res["timeline"][0]["start_seconds"] == 0.0 and len(res["timeline"][0]["scores"]) == 19
    assert "6 of 8 file(s) failed" in out.err


def test_cli_table_and_info(tiny_model, piano_clips, capsys):
    assert cli.main(["analyze", str(piano_clips[0]), "--model", str(tiny_model), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert all(key in table for key in API_KEYS)
    assert cli.main(["info", str(tiny_model)]) == 0
    info = capsys.readouterr().out
    assert "fp32" in info and "passed" in info


def test_cli_missing_model_is_one_clear_line(piano_clips, tmp_path, capsys):
    code = cli.main(["analyze", str(piano_clips[0]), "--model", str(tmp_path / "nope.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: model file not found") and "\n" not in err


def test_runtime_never_imports_jax_sklearn_librosa(tiny_model, piano_clips):
    code = BLOCKER.format(forbidden=FORBIDDEN) + f"""
import runtime
from runtime.analyze import Analyzer
res = Analyzer.from_path({str(tiny_model)!r}, device="cpu").analyze_file({str(piano_clips[0])!r})
assert len(res.scores) == 19
loaded = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})
print("LOADED", loaded)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout


def test_features_constants_are_the_spec():
    assert (FEATURES.sample_rate, FEATURES.n_fft, FEATURES.hop_length, FEATURES.n_mels) == (22050, 2048, 512, 128)
    assert (FEATURES.fmin, FEATURES.fmax, FEATURES.top_db) == (20.0, 11025.0, 80.0)
    assert (FEATURES.chunk_samples, FEATURES.hop_samples) == (66150, 44100)


def test_cuda_asked_for_without_a_gpu_is_a_clear_error(tiny_model):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelError, match="install the 'gpu' extra"):
        OnnxModel(tiny_model, device="cuda")
    assert OnnxModel(tiny_model, device="auto").device == "cpu"
    with pytest.raises(ModelError, match="unknown device"):
        OnnxModel(tiny_model, device="tpu")


def test_analyze_audio_requires_the_sample_rate_and_resamples(analyzer, piano_clips, tmp_path):
    import soxr

    y22 = sf.read(piano_clips[0], dtype="float32")[0]
    y44 = soxr.resample(y22, FEATURES.sample_rate, 44100, quality="VHQ").astype(np.float32)
    wav = tmp_path / "clip_44100.wav"
    sf.write(wav, y44, 44100, subtype="FLOAT")
    with pytest.raises(TypeError):
        analyzer.analyze_audio(y44)  # type: ignore[call-arg]  # no rate: cannot be scored at a guessed one
    from_array, from_file = analyzer.analyze_audio(y44, 44100), analyzer.analyze_file(wav)
    np.testing.assert_array_equal(list(from_array.scores.values()), list(from_file.scores.values()))
    assert from_array.duration_seconds == pytest.approx(len(y22) / FEATURES.sample_rate, abs=1e-4)
    wrong = analyzer.analyze_audio(y44, FEATURES.sample_rate)  # what the old API did to a 44.1 kHz array
    assert wrong.duration_seconds == pytest.approx(2 * from_array.duration_seconds, abs=1e-3)
    from runtime.errors import AudioError

    for bad_y, bad_rate in ((y44, 0), (y44, 44100.5), (y44, True), ((y44 * 32767).astype(np.int16), 44100),
                            (np.stack([y44, y44]), 44100), (np.full(100, np.nan, np.float32), 44100)):
        with pytest.raises(AudioError):
            analyzer.analyze_audio(bad_y, bad_rate)


def _readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_use_it_from_python_runs(tiny_model, piano_clips, tmp_path):
    import shutil

    import soxr

    code = _readme_block("Use it from Python")
    assert "analyze_audio(" in code and "sample_rate=" in code
    (tmp_path / "artifacts").mkdir()
    shutil.copy(tiny_model, tmp_path / "artifacts" / "model.onnx")
    y = soxr.resample(sf.read(piano_clips[0], dtype="float32")[0], FEATURES.sample_rate, 44100)
    sf.write(tmp_path / "performance.flac", np.stack([y, 0.8 * y], axis=1), 44100, subtype="PCM_24")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert "timing" in proc.stdout
