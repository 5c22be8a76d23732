"""The front end as an ONNX graph: features against librosa, the composed audio-input model against the mel one."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from convert.checkpoint import load_checkpoint
from convert.errors import ParityError
from convert.export import build_forward
from convert.frontend import DEFAULT_DFT, DFT_CHOICES, compose, frontend_graph
from runtime.analyze import Analyzer
from runtime.constants import API_KEYS, FEATURES
from runtime.errors import InputError
from runtime.features import chunk_audio
from runtime.model import METADATA_KEY, OnnxModel

pytestmark = pytest.mark.slow

SR = FEATURES.sample_rate
TOLERANCE_DB = 0.01  # as the numpy front end (tests/test_features.py)
SCORE_ATOL = 1e-4  # audio-input model vs mel-input model on the same audio


@pytest.fixture(scope="module")
def frontends() -> dict[str, ort.InferenceSession]:
    return {dft: ort.InferenceSession(frontend_graph(dft).SerializeToString(), providers=["CPUExecutionProvider"])
            for dft in DFT_CHOICES}


def graph_features(session: ort.InferenceSession, y: np.ndarray) -> np.ndarray:
    return session.run(None, {"audio": chunk_audio(y)})[0]


def test_frontend_features_match_librosa_on_real_clips(frontends, piano_clips):
    from convert.reference import reference_features, reference_load

    worst = dict.fromkeys(frontends, 0.0)
    for clip in piano_clips:
        y = reference_load(clip)  # librosa's decoding: only the features differ
        theirs = reference_features(y)
        for dft, session in frontends.items():
            ours = graph_features(session, y)
            assert ours.shape == theirs.shape and ours.dtype == np.float32
            worst[dft] = max(worst[dft], float(np.abs(ours - theirs).max()))
    assert max(worst.values()) < TOLERANCE_DB, worst


def _tone(seconds: float, hz: float = 440.0, gain: float = 0.5) -> np.ndarray:
    return (gain * np.sin(2 * np.pi * hz * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


EDGE_CASES = {
    "silence": np.zeros(3 * SR, np.float32),
    "pure_tone": _tone(4.0),
    "clipping": np.clip(_tone(3.0, 110.0, 8.0), -1.0, 1.0),
    "one_second": (0.1 * np.random.default_rng(1).standard_normal(SR)).astype(np.float32),
    "exactly_3s": (0.1 * np.random.default_rng(3).standard_normal(3 * SR)).astype(np.float32),
    "quiet_then_loud": np.concatenate([1e-4 * _tone(1.5), _tone(1.5, 880.0, 0.9)]),
}


@pytest.mark.parametrize("dft", DFT_CHOICES)
@pytest.mark.parametrize("case", EDGE_CASES)
def test_frontend_edge_cases_match_librosa(frontends, case, dft):
    from convert.reference import reference_features

    y = EDGE_CASES[case]
    ours, theirs = graph_features(frontends[dft], y), reference_features(y)
    assert ours.shape == theirs.shape == (len(chunk_audio(y)), FEATURES.n_frames, FEATURES.n_mels)
    assert float(np.abs(ours - theirs).max()) < TOLERANCE_DB
    assert ours.min() >= -FEATURES.top_db and ours.max() <= 0.0


def test_silence_is_zero_db_in_the_graph(frontends):
    for session in frontends.values():  # power_to_db clamps power and reference alike: 0 dB, not -80
        assert np.array_equal(graph_features(session, np.zeros(5 * SR, np.float32)), np.zeros((3, 128, 128)))


def test_audio_export_describes_its_input(tiny_audio_model):
    proto = onnx.load(str(tiny_audio_model))
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "audio" and [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == [
        "batch", FEATURES.chunk_samples]
    assert out.name == "scores" and out.type.tensor_type.shape.dim[1].dim_value == 19
    doc = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    assert doc["io"]["input"] == "audio" and doc["io"]["frontend"]["dft"] == DEFAULT_DFT
    assert doc["transformer_parity"]["passed"] and doc["parity"]["passed"]
    names = {c["name"].split(":")[0] for c in doc["parity"]["checks"]}
    assert {"clip", "random", "end-to-end", "audio"} <= names
    assert doc["parity"]["max_abs"] <= SCORE_ATOL


def test_audio_model_self_checks_on_stored_audio_chunks(tiny_audio_model):
    """Its self-check holds 3 s audio chunks (what it takes), not mel windows, and passes as its warm-up."""
    from runtime.serve.service import warm_up

    doc = json.loads({p.key: p.value for p in onnx.load(str(tiny_audio_model)).metadata_props}[METADATA_KEY])
    assert doc["self_check"]["inputs"]["shape"] == [2, FEATURES.chunk_samples]
    analyzer = Analyzer.from_path(tiny_audio_model, device="cpu")
    warm_up(analyzer)
    check = analyzer.model.self_check
    assert check.status == "passed" and check.max_abs <= check.atol


def test_runtime_gives_the_same_scores_with_both_model_kinds(tiny_model, tiny_audio_model, piano_clips):
    mel, audio = Analyzer.from_path(tiny_model, device="cpu"), Analyzer.from_path(tiny_audio_model, device="cpu")
    assert (mel.model.input_kind, audio.model.input_kind) == ("mel", "audio")
    for clip in piano_clips[:4]:
        want, got = mel.analyze_file(clip), audio.analyze_file(clip)
        assert got.duration_seconds == want.duration_seconds
        np.testing.assert_allclose([got.scores[k] for k in API_KEYS], [want.scores[k] for k in API_KEYS],
                                   atol=SCORE_ATOL, rtol=0)
        assert len(got.timeline) == len(want.timeline)
        for g, w in zip(got.timeline, want.timeline, strict=True):
            np.testing.assert_allclose(list(g.scores.values()), list(w.scores.values()), atol=SCORE_ATOL, rtol=0)


def test_audio_model_refuses_what_it_cannot_take(tiny_audio_model):
    analyzer = Analyzer.from_path(tiny_audio_model, device="cpu")
    with pytest.raises(InputError, match="takes audio"):
        analyzer.analyze_mel(np.full((200, 128), -20.0, np.float32))
    with pytest.raises(InputError, match=r"\(batch, 66150\)"):
        analyzer.model.run(np.zeros((1, 128, 128), np.float32))
    y = np.zeros(3 * SR, np.float32)
    y[100] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        analyzer.analyze_audio(y, SR)
    analyzer.model.warmup(2)


def metadata(proto) -> dict:
    return json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])


def as_audio_model(proto, doc: dict, **changes) -> OnnxModel:
    """Load a composed graph through the runtime, with the mel model's metadata marked as audio input."""
    from convert.export import set_metadata

    sections = {k: v for k, v in doc.items() if k != "format_version"}
    set_metadata(proto, {**sections, **changes, "io": {**doc["io"], "input": "audio"}})
    return OnnxModel(proto.SerializeToString(), device="cpu")


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_quantized_transformer_behind_a_float32_front_end(tiny_model, precision):
    from convert.config import ModelConfig
    from convert.export import set_metadata
    from convert.quantize import make_variant

    mel_proto = onnx.load(str(tiny_model))
    doc = metadata(mel_proto)
    variant = make_variant(mel_proto, precision, ModelConfig.from_checkpoint(doc["model_config"]))
    audio_proto = compose(variant.proto)
    frontend_nodes = [n for n in audio_proto.graph.node if n.name.startswith("frontend/")]
    assert Counter(n.op_type for n in frontend_nodes) == Counter(n.op_type for n in frontend_graph().graph.node)
    fp32_inits = {i.name: i.data_type for i in audio_proto.graph.initializer if i.name.startswith("frontend/")}
    assert onnx.TensorProto.FLOAT16 not in fp32_inits.values()
    set_metadata(variant.proto, {**{k: v for k, v in doc.items() if k != "format_version"}, "precision": precision})
    chunks = chunk_audio(EDGE_CASES["pure_tone"] * np.linspace(0.0, 1.0, 4 * SR, dtype=np.float32))
    features = ort.InferenceSession(frontend_graph().SerializeToString()).run(None, {"audio": chunks})[0]
    mel_model = OnnxModel(variant.proto.SerializeToString(), device="cpu")
    audio_model = as_audio_model(audio_proto, doc, precision=precision)
    np.testing.assert_allclose(audio_model.run(chunks), mel_model.run(features), atol=1e-6, rtol=0)


def test_audio_gate_fails_on_a_wrong_front_end(tiny_checkpoint, tiny_model):
    from onnx import compose as onnx_compose

    from convert.audio_export import audio_references, gate_audio_model
    from convert.parity import Tolerance, shipped_clips

    mel_proto = onnx.load(str(tiny_model))
    wrong = frontend_graph(params=replace(FEATURES, top_db=60.0))  # floors at -60 dB instead of -80
    wrong.ir_version = mel_proto.ir_version
    model = as_audio_model(onnx_compose.merge_models(wrong, mel_proto, io_map=[("mel", "mel")]), metadata(mel_proto))
    forward = build_forward(load_checkpoint(tiny_checkpoint))
    clip = shipped_clips()[0]
    with pytest.raises(ParityError) as err:
        gate_audio_model(forward, model, OnnxModel(tiny_model, device="cpu"), audio_references(forward, [clip]),
                         Tolerance(1e-4, 1e-4), seed=0)
    failed = {c["name"] for c in err.value.report["checks"] if not c["passed"]}
    assert {f"clip:{clip.name}", f"end-to-end:{clip.name}", "audio:tone_440hz_1s"} <= failed
    assert {"random:batch1", "random:batch8", "audio:silence"}.isdisjoint(failed)  # the transformer; 0 dB anyway


def test_quantize_command_refuses_an_audio_model(tiny_audio_model, tiny_checkpoint, capsys):
    from convert import cli

    code = cli.main(["-q", "quantize", str(tiny_audio_model), "--checkpoint", str(tiny_checkpoint)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "takes audio" in err


def test_cli_and_http_service_take_an_audio_model_unchanged(tiny_model, tiny_audio_model, piano_clips, capsys):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from runtime import cli as runtime_cli
    from runtime.serve.app import Settings, create_app

    clip = min(piano_clips, key=lambda p: p.stat().st_size)
    want = Analyzer.from_path(tiny_model, device="cpu").analyze_file(clip).scores
    assert runtime_cli.main(["analyze", str(clip), "--model", str(tiny_audio_model), "--device", "cpu", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    np.testing.assert_allclose([result["scores"][k] for k in API_KEYS], [want[k] for k in API_KEYS], atol=SCORE_ATOL)
    with TestClient(create_app(str(tiny_audio_model), settings=Settings(max_bytes=2_000_000))) as client:
        for _ in range(200):  # the model loads and warms up in the background
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        res = client.post("/v1/analyze", files={"audio": (clip.name, clip.read_bytes(), "audio/flac")})
        assert res.status_code == 200, res.json()
        got = res.json()["scores"]
        np.testing.assert_allclose([got[k] for k in API_KEYS], [want[k] for k in API_KEYS], atol=SCORE_ATOL)
        res = client.post("/v1/analyze/mel", json={"mel_spectrogram": [[-20.0] * 128] * 200})
        assert res.status_code == 422 and "takes audio" in res.json()["error"]
