"""The pipeline judged against references written from the specification (tests/spec_reference.py), not from
the code: the model in plain numpy, the label scaler through scikit-learn, chunking and aggregation as docs/spec.md §3
states them, and the CLI's table against its own --json."""

from __future__ import annotations

import json
import re

import numpy as np
import onnxruntime as ort
import pytest
import soundfile as sf
import spec_reference as ref

from runtime import cli
from runtime.analyze import Analyzer
from runtime.constants import API_KEYS

MODEL_ATOL = 1e-5  # the fp32 gate's tolerance (convert.parity)
# runtime features vs librosa give 5e-8 end to end on the tiny model (measured); a 0.1 dB feature error moves its
# scores by 1e-5 to 6e-5, which a 1e-4 tolerance would not see (test_end_to_end_tolerance_sees_a_tenth_of_a_db)
END_TO_END_ATOL = 1e-6


def _inputs(piano_clips) -> np.ndarray:
    """Real windows, digital silence (0 dB everywhere, docs/spec.md §3: LayerNorm's epsilon shows on its small
    activations), near-silence, and uniform noise over the whole [-80, 0] dB range."""
    y = sf.read(piano_clips[0], dtype="float32")[0]
    rng = np.random.default_rng(0)
    return np.concatenate([
        ref.windows(y)[:3],
        np.zeros((1, 128, 128)),
        rng.standard_normal((1, 128, 128)) * 1e-3,
        rng.uniform(-80, 0, (2, 128, 128)),
    ]).astype(np.float32)


def _perturbed(params: dict, seed: int) -> dict:
    """Every weight moved by N(0, 0.1): non-zero biases and LayerNorm offsets, non-unit scales, so that a layout
    or formula mistake anywhere shows (a fresh init has zero biases and unit scales)."""
    rng = np.random.default_rng(seed)
    if isinstance(params, dict):
        return {k: _perturbed(v, seed + i) for i, (k, v) in enumerate(sorted(params.items()))}
    a = np.asarray(params, np.float32)
    return (a + 0.1 * rng.standard_normal(a.shape)).astype(np.float32)


def test_numpy_reference_equals_the_flax_model(tiny_raw, piano_clips):
    from convert.config import ModelConfig
    from convert.model import ProductionASTForRegression

    config = tiny_raw["model_config"]
    params = _perturbed(tiny_raw["params"]["params"], seed=1)
    x = _inputs(piano_clips)
    model = ProductionASTForRegression(ModelConfig.from_checkpoint(config))
    got = np.asarray(model.apply({"params": params}, x))
    want = ref.forward(params, config["num_layers"], config["num_heads"], x)
    err = np.abs(got - want).max(axis=1)
    print(f"Flax vs numpy reference, max abs per input: {np.array2string(err, precision=1)}")
    assert err.max() <= MODEL_ATOL, err


def test_onnx_equals_numpy_reference_through_sklearn_scaler(tiny_raw, tiny_model, piano_clips):
    """The exported graph (label units) against the numpy model and the checkpoint's own unpickled
    StandardScaler.inverse_transform."""
    from sklearn.preprocessing import StandardScaler

    scaler = tiny_raw["label_scaler"]
    assert isinstance(scaler, StandardScaler)
    assert np.abs(scaler.scale_ - 1).min() > 0.5  # a scale far from 1: dropping it cannot pass
    x = _inputs(piano_clips)
    got = ort.InferenceSession(str(tiny_model), providers=["CPUExecutionProvider"]).run(None, {"mel": x})[0]
    want = ref.checkpoint_forward(tiny_raw, x)
    err = np.abs(got - want).max(axis=1)
    print(f"ONNX vs numpy reference + sklearn scaler, max abs per input: {np.array2string(err, precision=1)}")
    assert err.max() <= MODEL_ATOL, err


def test_waveform_in_front_end_equals_librosa_on_the_spec_chunks(piano_clips):
    """The front end of the waveform-in graph alone (no export: quick) on docs/spec.md §3's chunks, against librosa."""
    from convert.frontend import frontend_graph

    session = ort.InferenceSession(frontend_graph().SerializeToString(), providers=["CPUExecutionProvider"])
    worst = 0.0
    for clip in piano_clips[::4]:
        y = sf.read(clip, dtype="float32")[0]
        got = session.run(None, {"audio": ref.chunks(y)})[0]
        worst = max(worst, float(np.abs(got - ref.windows(y)).max()))
    print(f"front end graph vs librosa on the spec's chunks, worst over 4 clips: {worst:.1e} dB")
    assert worst <= 0.01


@pytest.mark.slow  # its own export (the waveform-in model)
def test_waveform_in_model_equals_the_spec_reference(tiny_raw, tiny_audio_model, piano_clips):
    """The waveform-in graph (front end + model, `export --input audio`) on docs/spec.md §3's chunks against librosa's
    windows through the numpy model and the sklearn scaler."""
    session = ort.InferenceSession(str(tiny_audio_model), providers=["CPUExecutionProvider"])
    worst = 0.0
    for clip in piano_clips[:4]:
        y = sf.read(clip, dtype="float32")[0]
        got = session.run(None, {"audio": ref.chunks(y)})[0]
        worst = max(worst, float(np.abs(got - ref.checkpoint_forward(tiny_raw, ref.windows(y))).max()))
    print(f"waveform-in ONNX vs spec reference, worst over 4 clips: {worst:.1e}")
    assert worst <= MODEL_ATOL


# --- chunking and aggregation (docs/spec.md §3) -----------------------------------------------------------------------


def _signals(piano_clips) -> dict[str, np.ndarray]:
    clips = [sf.read(c, dtype="float32")[0] for c in piano_clips[:3]]
    long = np.concatenate(clips)  # about 37 s: 18 chunks
    return {"1.0 s": long[: 22050], "3.0 s": long[: 3 * 22050], "5.0 s": long[: 5 * 22050],
            "9.3 s": long[: int(9.3 * 22050)], "whole": long}


def _designed(windows: np.ndarray) -> np.ndarray:
    """A stand-in model whose 19 scores follow each window's loudness, so chunk scores differ widely (the
    zero-padded last chunk is far quieter) and several dimensions leave [0, 1] before or after the mean."""
    loudness = (np.asarray(windows, np.float64).mean(axis=(1, 2)) + 80.0) / 80.0  # (n,) in [0, 1]
    offsets = np.linspace(-0.6, 0.9, 19)
    gains = np.linspace(0.5, 2.5, 19)
    return (offsets[None, :] + gains[None, :] * loudness[:, None]).astype(np.float32)


@pytest.fixture(scope="module")
def analyzer(tiny_model):
    return Analyzer.from_path(tiny_model, device="cpu", batch_size=4)


def test_chunks_and_aggregation_follow_the_rule(analyzer, piano_clips):
    """3 s windows every 2 s, the last zero-padded; mean over windows, then clip to [0, 1]."""
    for name, y in _signals(piano_clips).items():
        spec_chunks = _designed(ref.windows(y))
        want = ref.aggregate(spec_chunks)
        median, top = np.clip(np.median(spec_chunks, 0), 0, 1), np.clip(spec_chunks.max(0), 0, 1)
        clip_first = np.clip(spec_chunks, 0, 1).mean(0)
        if len(spec_chunks) > 2:  # the data tells the rule apart from its neighbours
            assert np.abs(median - want).max() > 1e-3 and np.abs(top - want).max() > 1e-3, name
            assert np.abs(clip_first - want).max() > 1e-3, name
        res = analyzer.analyze_audio(y, 22050, infer=_designed)
        assert [c.start_seconds for c in res.timeline] == [2.0 * i for i in range(len(spec_chunks))], name
        got_chunks = np.array([list(c.scores.values()) for c in res.timeline])
        np.testing.assert_allclose(got_chunks, np.clip(spec_chunks, 0, 1), atol=1e-5, err_msg=name)
        np.testing.assert_allclose(list(res.scores.values()), want, atol=1e-5, err_msg=name)
    assert [len(ref.chunk_starts(n)) for n in (2 * 22050, 3 * 22050, 5 * 22050, 30 * 22050)] == [1, 2, 3, 15]


@pytest.fixture(scope="module")
def end_to_end(tiny_raw, analyzer, piano_clips) -> list[dict]:
    """Per clip: the runtime's scores, the spec reference's chunk scores (librosa windows, numpy model, sklearn
    scaler), and the reference's scores with every feature 0.1 dB off."""
    out = []
    for clip in piano_clips[::2]:  # 8 of the 16: the quick tier's time
        windows = ref.windows(sf.read(clip, dtype="float32")[0])
        chunks = ref.checkpoint_forward(tiny_raw, windows)
        off = ref.aggregate(ref.checkpoint_forward(tiny_raw, windows + 0.1))
        got = np.array(list(analyzer.analyze_file(clip).scores.values()))
        out.append({"got": got, "chunks": chunks, "want": ref.aggregate(chunks), "off": off})
    return out


def test_end_to_end_scores_equal_the_spec_reference(end_to_end):
    worst = max(float(np.abs(r["got"] - r["want"]).max()) for r in end_to_end)
    print(f"runtime vs spec reference, worst over {len(end_to_end)} clips: {worst:.1e}")
    assert worst <= END_TO_END_ATOL


def test_end_to_end_tolerance_sees_a_tenth_of_a_db(end_to_end):
    """The tolerance is far below what a constant model (every clip scored the mean) errs by, and below what a
    0.1 dB feature error changes: a tolerance that could hide either would make the check above empty."""
    wants = np.stack([r["want"] for r in end_to_end])
    constant_error = float(np.abs(wants - wants.mean(axis=0)).max())
    tenth_db = min(float(np.abs(r["off"] - r["want"]).max()) for r in end_to_end)
    print(f"constant model error {constant_error:.1e}; smallest effect of 0.1 dB {tenth_db:.1e}")
    assert END_TO_END_ATOL < constant_error / 100
    assert END_TO_END_ATOL < tenth_db / 4


# --- the CLI's table against its --json ---------------------------------------------------------------------

ROW = re.compile(r"^  (\S+)\s+(-?\d+\.\d{3})  #*$")


def test_cli_table_says_what_json_says(tiny_model, piano_clips, capsys):
    files = [str(c) for c in piano_clips[:3]]
    args = ["analyze", *files, "--model", str(tiny_model), "--device", "cpu"]
    assert cli.main(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert cli.main([*args, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    blocks = [table[i * 20 : (i + 1) * 20] for i in range(len(files))]
    assert len(table) == 20 * len(files)
    for block, res in zip(blocks, results, strict=True):
        assert block[0] == f"{res['file']}  ({res['duration_seconds']:.1f} s, {len(res['timeline'])} chunks)"
        rows = [ROW.match(line) for line in block[1:]]
        assert all(rows), block
        assert [m[1] for m in rows] == list(API_KEYS)
        for m in rows:
            score = res["scores"][m[1]]
            assert abs(float(m[2]) - score) <= 0.0005 + 1e-9, (m[1], m[2], score)
            assert m[0].endswith("#" * round(score * 20)) and not m[0].endswith("#" * (round(score * 20) + 1))
        shown = [m[2] for m in rows]
        assert len(set(shown)) > 10  # neighbouring rows differ, so a shifted row shows


# --- the production preset (86M parameters): scripts/demo.sh's export --------------------------------------


@pytest.mark.slow
@pytest.mark.production
def test_production_preset_equals_the_spec_reference(demo_run, piano_clips, tmp_path):
    """demo.sh's export (production preset, seed 0, pre-optimised fp32) against the numpy model on the same
    checkpoint, written again by `convert demo-checkpoint` (same seed, same bytes), and the Flax model."""
    import pickle
    import subprocess
    import sys

    from convert.config import ModelConfig
    from convert.model import ProductionASTForRegression

    path = tmp_path / "production.pkl"
    subprocess.run([sys.executable, "-m", "convert", "demo-checkpoint", str(path), "--seed", "0"], check=True,
                   timeout=900, capture_output=True)
    raw = pickle.loads(path.read_bytes())
    config = raw["model_config"]
    assert (config["embed_dim"], config["num_layers"], config["num_heads"]) == (768, 12, 12)
    x = _inputs(piano_clips)
    want = ref.checkpoint_forward(raw, x)
    session = ort.InferenceSession(str(demo_run["model"]), providers=["CPUExecutionProvider"])
    onnx_err = np.abs(session.run(None, {"mel": x})[0] - want).max(axis=1)
    z = ProductionASTForRegression(ModelConfig.from_checkpoint(config)).apply(raw["params"], x)
    flax_err = np.abs(raw["label_scaler"].inverse_transform(np.asarray(z, np.float64)) - want).max(axis=1)
    print(f"production: ONNX {np.array2string(onnx_err, precision=1)}, Flax {np.array2string(flax_err, precision=1)}")
    assert onnx_err.max() <= MODEL_ATOL and flax_err.max() <= MODEL_ATOL
