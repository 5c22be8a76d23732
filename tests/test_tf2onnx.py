"""The second converter (jax2tf -> TensorFlow -> tf2onnx in its own venv) on the tiny preset, and crosscheck."""

from __future__ import annotations

import importlib.abc
import json
import os
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from convert import cli
from convert.checkpoint import load_checkpoint
from convert.crosscheck import compare_models
from convert.export import export
from convert.forward import build_forward
from convert.options import ExportOptions, VariantOptions
from convert.parity import clip_references
from convert.quantize import linear_layers, weight_matmuls
from convert.tf2onnx import env as legacy_env
from convert.tf2onnx.backend import MAX_OPSET
from convert.variants import quantize_file
from runtime.analyze import Analyzer
from runtime.constants import API_KEYS, INPUT_NAME, OUTPUT_NAME
from runtime.model import METADATA_KEY, OnnxModel

pytestmark = pytest.mark.legacy

FORBIDDEN = ("tensorflow", "tf2onnx", "keras", "jax.experimental.jax2tf", "convert.tf2onnx.worker")


def _doc(path) -> dict:
    proto = onnx.load(str(path))
    return json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])


class _ImportGuard(importlib.abc.MetaPathFinder):
    """Records (and refuses) any import of TensorFlow, tf2onnx or the legacy worker in this process."""

    def __init__(self):
        self.attempts: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
            self.attempts.append(name)
            raise ImportError(f"{name} imported in the main process")
        return None


@pytest.fixture(scope="module")
def legacy_python():
    """The legacy venv: scripts/test.sh makes it (missing in CI is a failure); locally made on first use."""
    if not legacy_env.is_ready(legacy_env.env_dir()) and os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"no tf2onnx venv at {legacy_env.env_dir()}: scripts/test.sh creates it")
    return legacy_env.ensure_env()


@pytest.fixture(scope="module")
def tf_export(tmp_path_factory, tiny_checkpoint, legacy_python):
    """The tiny preset through --backend tf2onnx with every variant (int8 at the main path), under an import guard."""
    guard = _ImportGuard()
    sys.meta_path.insert(0, guard)
    try:
        # preoptimize none: the tests below inspect the graph as this backend writes it; the default (saved
        # pre-optimised) goes through crosscheck and quantize below
        result = export(tiny_checkpoint, tmp_path_factory.mktemp("tf2onnx") / "tiny.onnx",
                        ExportOptions(backend="tf2onnx", preoptimize="none"), VariantOptions(quantize="auto"))
    finally:
        sys.meta_path.remove(guard)
    return result, guard.attempts


def test_main_process_never_imports_tensorflow(tf_export):
    _, attempts = tf_export
    assert attempts == []
    assert not [m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]


def test_export_records_the_backend_and_its_pinned_versions(tf_export, tiny_checkpoint):
    result, _ = tf_export
    pins = dict(line.split("==") for line in legacy_env.pins())
    assert set(result.written) == {"fp32", "int8", "fp16"} and all(r["passed"] for r in result.reports.values())
    for precision, path in result.written.items():
        doc = _doc(path)
        assert doc["precision"] == precision
        backend = doc["backend"]
        assert backend["name"] == "tf2onnx" and backend["opset"] == MAX_OPSET
        for package in ("jax", "jaxlib", "flax", "tensorflow-cpu", "tf2onnx"):
            assert backend["versions"][package] == pins[package]
        assert doc["source"]["sha256"] == load_checkpoint(tiny_checkpoint).sha256


def test_graph_has_the_runtime_io_dynamic_batch_and_one_matmul_per_dense_layer(tf_export, tiny_checkpoint):
    result, _ = tf_export
    proto = onnx.load(str(result.written["fp32"]))
    config = load_checkpoint(tiny_checkpoint).config
    assert [i.name for i in proto.graph.input] == [INPUT_NAME] and [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == MAX_OPSET
    assert len(weight_matmuls(proto)) == linear_layers(config)
    assert not [n for n in proto.graph.node if n.op_type == "Gemm" or n.domain not in ("", "ai.onnx")]
    model = OnnxModel(result.written["fp32"], device="cpu")
    for batch_size in (1, 3, 15):  # polymorphic batch
        mel = np.random.default_rng(batch_size).uniform(-80, 0, (batch_size, 128, 128)).astype(np.float32)
        assert model.run(mel).shape == (batch_size, len(API_KEYS))


def test_int8_quantizes_every_dense_layer_but_the_kept_three(tf_export, tiny_checkpoint):
    result, _ = tf_export
    build = _doc(result.written["int8"])["variants"]["build"]
    config = load_checkpoint(tiny_checkpoint).config
    assert build["quantization"]["linear_layers"] == linear_layers(config)
    assert build["quantization"]["quantized_matmuls"] == linear_layers(config) - 3  # embedding + 2 head layers
    assert set(build["quantization"]["kept_float32"]) == {"patch_embedding", "regression_head"}


def test_runtime_scores_the_shared_clips_as_the_jax2onnx_model_does(tf_export, tiny_model, piano_clips):
    result, _ = tf_export
    tf_model, j_model = OnnxModel(result.written["fp32"], device="cpu"), OnnxModel(tiny_model, device="cpu")
    assert tf_model.info.raw["backend"]["name"] == "tf2onnx" and j_model.info.raw["backend"]["name"] == "jax2onnx"
    tf_an, j_an = Analyzer(tf_model, batch_size=8), Analyzer(j_model, batch_size=8)
    worst = 0.0
    for clip in piano_clips:
        a, b = tf_an.analyze_file(clip), j_an.analyze_file(clip)
        assert set(a.scores) == set(API_KEYS)
        worst = max(worst, max(abs(a.scores[k] - b.scores[k]) for k in API_KEYS))
    assert worst <= 1e-5


def test_crosscheck_agrees_on_the_shared_clips(tiny_checkpoint, piano_clips, legacy_python, tmp_path, capsys):
    report = tmp_path / "crosscheck.json"
    code = cli.main(["crosscheck", str(tiny_checkpoint), "--clips", *map(str, piano_clips), "--report", str(report),
                     "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads(report.read_text())
    assert doc["passed"] and doc["models"] == ["jax2onnx", "tf2onnx"] and len(doc["clips"]) == len(piano_clips)
    assert [p["pair"] for p in doc["pairs"]] == ["jax vs jax2onnx", "jax vs tf2onnx", "jax2onnx vs tf2onnx"]
    assert all(0 < p["max_abs"] <= 1e-5 for p in doc["pairs"][:2])  # two real conversions: not bit-identical to JAX
    assert "AGREE" in out and all(key[:26] in out for key in API_KEYS)  # the per-dimension table
    # crosscheck's tf2onnx export is saved pre-optimised: its int8 variant is converted again by tf2onnx
    tf_fp32 = tmp_path / "model.tf2onnx.onnx"
    assert _doc(tf_fp32)["graph"]["optimized"] != "none"
    _, written = quantize_file(tf_fp32, tiny_checkpoint, variants=VariantOptions(quantize="int8"),
                               clips=piano_clips[:1])
    doc = _doc(written["int8"])
    assert doc["backend"]["name"] == "tf2onnx" and doc["backend"]["opset"] == MAX_OPSET
    config = load_checkpoint(tiny_checkpoint).config
    assert doc["variants"]["build"]["quantization"]["quantized_matmuls"] == linear_layers(config) - 3


def test_crosscheck_fails_on_a_model_that_differs_in_one_dimension(tf_export, tiny_model, tiny_checkpoint,
                                                                   piano_clips, tmp_path, capsys):
    """A 1e-4 shift of one dimension (10x the fp32 tolerance, 0.01 % of the score range) must be caught."""
    result, _ = tf_export
    ckpt = load_checkpoint(tiny_checkpoint)
    proto = onnx.load(str(result.written["fp32"]))
    last = next(n for n in proto.graph.node if OUTPUT_NAME in n.output)  # the Add of the scaler mean (and bias)
    init = next(i for i in proto.graph.initializer if i.name in last.input)
    shifted = numpy_helper.to_array(init).copy()
    assert last.op_type == "Add" and shifted.size == len(API_KEYS)
    shifted.reshape(-1)[5] += 1e-4
    init.CopyFrom(numpy_helper.from_array(shifted, init.name))
    onnx.save(proto, str(tmp_path / "shifted.onnx"))
    references = clip_references(build_forward(ckpt), piano_clips[:3])
    models = {"jax2onnx": OnnxModel(tiny_model, device="cpu"),
              "tf2onnx": OnnxModel(proto.SerializeToString(), device="cpu")}
    report = compare_models(references, models, 1e-5)
    assert not report["passed"]
    by_pair = {p["pair"]: p for p in report["pairs"]}
    assert by_pair["jax vs jax2onnx"]["passed"]
    for pair in ("jax vs tf2onnx", "jax2onnx vs tf2onnx"):
        assert not by_pair[pair]["passed"] and by_pair[pair]["worst_dimension"] == API_KEYS[5]
    code = cli.main(["crosscheck", str(tiny_checkpoint), "--clips", str(piano_clips[0]),
                     "--models", str(tiny_model), str(tmp_path / "shifted.onnx")])
    out = capsys.readouterr().out
    assert code == 1 and "DISAGREE" in out
    assert next(line for line in out.splitlines() if API_KEYS[5][:26] in line).startswith("FAIL")


def test_a_missing_legacy_env_is_a_clear_error(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    incomplete = tmp_path / "venv"  # as an interrupted creation leaves it: no .complete marker
    (incomplete / "bin").mkdir(parents=True)
    (incomplete / "bin" / "python").symlink_to(sys.executable)
    assert not legacy_env.is_ready(incomplete)
    monkeypatch.setenv("PERCEPIANO_TF2ONNX_VENV", str(incomplete))
    code = cli.main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "m.onnx"),
                     "--backend", "tf2onnx"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "tf2onnx environment" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_opset_beyond_tf2onnx_is_refused(tiny_checkpoint, tmp_path, capsys):
    code = cli.main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "m.onnx"),
                     "--backend", "tf2onnx", "--opset", str(MAX_OPSET + 1)])
    assert code == 1 and f"at most opset {MAX_OPSET}" in capsys.readouterr().err
