"""int8 and fp16 variants of the tiny preset: graph rewrites, node counts, sizes, the parity gate, the runtime."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from convert import cli
from convert.errors import ExportError, ParityError
from convert.export import build_forward, export
from convert.metadata import describe, set_metadata
from convert.options import ExportOptions, VariantOptions
from convert.parity import DEFAULT_ATOL, Tolerance, clip_references, random_inputs, run_gate
from convert.quantize import (
    FP16_KEEP_FP32,
    check_fusions,
    linear_layers,
    make_variant,
    op_counts,
    optimize,
    prepare,
    quantize_int8,
)
from convert.variants import publish_variants
from runtime.analyze import Analyzer
from runtime.constants import API_KEYS
from runtime.model import OnnxModel

pytestmark = pytest.mark.slow

FUSED_INT8 = "com.microsoft:MatMulIntegerToFloat"


def gate_variant(variant, forward, sections: dict, references, atol, seed: int) -> dict:
    """The fp32 parity gate on an in-memory variant, through the runtime's own loader (CPU)."""
    set_metadata(variant.proto, sections)
    model = OnnxModel(variant.proto.SerializeToString(), device="cpu")
    return run_gate(forward, model, tolerance=Tolerance.for_precision(variant.precision, atol), seed=seed,
                    references=references)


def _ort(proto):
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _scores(proto, mel):
    return _ort(proto).run(None, {"mel": mel})[0]


def _reuse_trace(monkeypatch, tiny_model):
    """export() with jax2onnx's trace of the tiny checkpoint taken from the session's fp32 export (saves ~10 s)."""
    import convert.export as export_mod

    monkeypatch.setattr(export_mod, "to_onnx", lambda forward, opset=23: onnx.load(str(tiny_model)))


@pytest.fixture(scope="module")
def forward(ckpt):
    return build_forward(ckpt)


@pytest.fixture(scope="module")
def constant_error(forward) -> float:
    """Max abs error of a model that ignores its input and outputs JAX's mean score: what a variant must beat.

    Random weights give scores that vary little from window to window, so a tolerance alone could pass a
    constant output; a variant has to track JAX far closer than that.
    """
    scores = np.concatenate([r.scores for r in clip_references(forward)])
    return float(np.abs(scores - scores.mean(axis=0)).max())


@pytest.fixture(scope="module")
def auto(tiny_model, tiny_checkpoint, tmp_path_factory):
    """`export(quantize="auto")` of the tiny preset: fp32, int8 and fp16, each through its parity gate; the graphs
    as the quantizer makes them (tests/test_cold_start.py covers the default, pre-optimised files)."""
    with pytest.MonkeyPatch.context() as mp:
        _reuse_trace(mp, tiny_model)
        return export(tiny_checkpoint, tmp_path_factory.mktemp("auto") / "model.onnx",
                      ExportOptions(preoptimize="none"), VariantOptions(quantize="auto"))


def test_prepare_is_exact_and_makes_every_dense_layer_a_matmul(fp32, ckpt):
    prepared = prepare(fp32)
    inits = {i.name for i in prepared.graph.initializer}
    ops = op_counts(prepared)
    assert ops.get("Gemm", 0) == 0
    weights = [n for n in prepared.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(weights) == linear_layers(ckpt.config) == 15
    mel = random_inputs(4, seed=1)
    np.testing.assert_allclose(_scores(prepared, mel), _scores(fp32, mel), atol=1e-6, rtol=0)


def test_int8_quantizes_every_linear_layer_and_only_those(auto, ckpt):
    proto = onnx.load(str(auto.written["int8"]))
    ops = op_counts(proto)
    inits = {i.name: i for i in proto.graph.initializer}
    # every dense layer of the blocks; the patch embedding and the 2 head layers stay float32 (int8_float_layers)
    assert ops[FUSED_INT8] == linear_layers(ckpt.config) - 3
    assert ops.get("MatMulInteger", 0) == ops.get("Gemm", 0) == 0
    assert ops["MatMul"] == 2 * ckpt.config.num_layers + 3  # + q.k^T and attn.v: activations on both sides
    quantized = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert all(w.data_type == onnx.TensorProto.INT8 for w in quantized)  # signed int8 weights
    build = OnnxModel(auto.written["int8"], device="cpu").info.variants["build"]
    quantization = build["quantization"]
    assert quantization["quantized_matmuls"] == 12 and quantization["reduce_range"] and not quantization["per_channel"]
    assert quantization["kept_float32"] == ["patch_embedding", "regression_head"]
    assert quantization["fused"].startswith(FUSED_INT8)


def _session_ops(path, tmp_path) -> dict[str, int]:
    """Operator counts of the graph onnxruntime runs after its own optimizations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "session.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return op_counts(onnx.load(str(tmp_path / "session.onnx")))


def test_int8_layers_are_fused_in_the_file_with_their_bias_and_run_fused(fp32, ckpt, tmp_path):
    """onnxruntime's one activation scale per call (--int8-activations batch)."""
    proto = make_variant(fp32, "int8", ckpt.config, int8_activations="batch").proto
    path = tmp_path / "int8.batch.onnx"
    onnx.save(proto, str(path))
    inits = {i.name for i in proto.graph.initializer}
    fused = [n for n in proto.graph.node if n.op_type == "MatMulIntegerToFloat"]
    # A, W, A scale, W scale, A zero point, W zero point, bias: the bias Add and the scale Muls are in the node
    assert fused and all(len(n.input) == 7 and n.input[6] in inits and n.domain == "com.microsoft" for n in fused)
    session = _session_ops(path, tmp_path)
    layers = linear_layers(ckpt.config) - 3
    assert session.get("MatMulInteger", 0) == 0 and session.get("Cast", 0) == 0
    assert session[FUSED_INT8] + session["com.microsoft:DynamicQuantizeMatMul"] == layers
    # one activation quantization per input of q, k and v (shared), none left for the single-input layers
    assert session["DynamicQuantizeLinear"] == ckpt.config.num_layers
    unfused = quantize_int8(prepare(fp32), fuse=False, activations="batch")
    assert op_counts(unfused)["MatMulInteger"] == layers
    mel = random_inputs(4, seed=7)
    np.testing.assert_allclose(_scores(proto, mel), _scores(unfused, mel), atol=1e-6, rtol=0)


def test_the_exports_int8_is_static_and_measured_to_ignore_its_neighbours(auto):
    """The default int8 (static scales, tests/test_int8_activations.py) is gated among batch neighbours too."""
    build = OnnxModel(auto.written["int8"], device="cpu").info.variants["build"]
    assert build["quantization"]["activations"].startswith("uint8, one fixed scale per layer")
    assert build["batch_independent"] and 0.0 <= build["neighbour_change"] <= 1e-6
    assert auto.reports["int8"]["neighbour_change"] == build["neighbour_change"]


def test_fp16_is_half_inside_float32_at_the_edges(auto):
    proto = onnx.load(str(auto.written["fp16"]))
    graph = onnx.shape_inference.infer_shapes(proto).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types |= {i.name: i.data_type for i in graph.initializer}
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    matmul_weights = [types[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in types]
    assert Counter(matmul_weights)[onnx.TensorProto.FLOAT16] >= 13  # the transformer's dense layers
    kept = [n for n in graph.node if n.op_type in FP16_KEEP_FP32]
    assert {n.op_type for n in kept} == {"LayerNormalization", "Softmax", "ReduceSum"}
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in kept)


def test_variant_sizes(auto):
    """Weights only: every file also carries the same metadata (~0.2 MB with the self-check's two windows)."""
    protos = {p: onnx.load(str(path)) for p, path in auto.written.items()}
    size = {p: sum(i.ByteSize() for i in proto.graph.initializer) for p, proto in protos.items()}
    inits = {i.name: i for i in protos["int8"].graph.initializer}
    int8_weights = sum(int(np.prod(inits[n.input[1]].dims)) for n in protos["int8"].graph.node
                       if n.op_type == "MatMulIntegerToFloat")
    # each quantized weight is stored in 1 byte instead of 4 (the float32 embedding and head keep theirs)
    assert size["int8"] < size["fp32"] - 0.95 * 3 * int8_weights
    assert size["fp16"] < 0.7 * size["fp32"]


def test_every_variant_passes_the_same_gate(auto, constant_error):
    assert DEFAULT_ATOL["int8"] == 0.005  # docs/spec.md §4: invisible to a user except right at a colour threshold
    for precision in ("fp32", "int8", "fp16"):
        report = auto.reports[precision]
        assert report["passed"] and report["precision"] == precision
        assert report["tolerance"]["model"] == DEFAULT_ATOL[precision]
        assert report["max_abs_model"] <= DEFAULT_ATOL[precision]
        assert report["max_abs_model"] < constant_error / 4, (precision, report["max_abs_model"], constant_error)
        assert report["max_abs_end_to_end"] <= report["tolerance"]["end_to_end"]
        assert report["threshold_flips_windows"] == report["threshold_flips_recordings"] == 0
        names = {c["name"].split(":")[0] for c in report["checks"]}
        assert names == {"clip", "random", "end-to-end"}
        for check in report["checks"]:
            assert set(check["per_dimension"]) == set(API_KEYS)
            assert all({"max_abs", "mean_abs"} <= set(d) for d in check["per_dimension"].values())
    assert auto.reports["fp16"]["max_abs"] < auto.reports["int8"]["max_abs"]


def test_auto_writes_recommended_cpu_variant_at_out_and_records_it(auto):
    out = auto.path
    assert auto.written == {
        "fp32": out.with_name("model.fp32.onnx"),
        "int8": out,
        "fp16": out.with_name("model.fp16.onnx"),
    }
    for precision, path in auto.written.items():
        info = OnnxModel(path, device="cpu").info
        assert info.precision == precision and info.parity["passed"]
        assert info.variants["this"] == precision
        assert info.variants["recommended"] == {"cpu": "int8", "gpu": "fp16"}
        assert info.variants["files"] == {p: q.name for p, q in auto.written.items()}
        assert all(g["passed"] for g in info.variants["gates"].values())


def test_every_variant_carries_the_self_check_with_its_own_tolerance(auto):
    checks = {p: OnnxModel(path, device="cpu").info.raw["self_check"] for p, path in auto.written.items()}
    assert {p: c["atol"] for p, c in checks.items()} == {p: DEFAULT_ATOL[p] for p in checks}
    assert len({c["inputs"]["base64"] for c in checks.values()}) == 1  # the same windows and JAX scores in each
    first = checks["fp32"]
    assert all(c["scores"] == first["scores"] and c["clips"] == first["clips"] for c in checks.values())


def test_auto_refuses_partial_output_unless_asked(fp32, ckpt, forward, tiny_export, tmp_path, capsys, monkeypatch,
                                                  tiny_model, tiny_checkpoint):
    with pytest.raises(ParityError, match="allow-partial") as err:
        publish_variants(fp32, ckpt, forward, tmp_path / "m.onnx", VariantOptions(quantize="auto", int8_atol=1e-9),
                         fp32_report=tiny_export.reports["fp32"])
    assert err.value.report["precision"] == "int8" and list(tmp_path.iterdir()) == []
    _reuse_trace(monkeypatch, tiny_model)
    argv = ["-q", "export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "m.onnx"),
            "--quantize", "auto", "--int8-atol", "1e-9"]
    assert cli.main(argv) == 1
    assert "parity (int8): FAILED" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
    assert cli.main([*argv, "--allow-partial"]) == 0
    assert "not written: the int8 variant failed" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.fp16.onnx", "m.onnx"]


def test_runtime_runs_every_variant_end_to_end_on_a_real_clip(auto, piano_clips):
    clip = piano_clips[0]
    results = {}
    for precision, path in auto.written.items():
        model = OnnxModel(path, device="cpu")
        assert model.run(random_inputs(2, seed=3)).dtype == np.float32
        scores = Analyzer(model).analyze_file(clip).scores
        results[precision] = np.array([scores[k] for k in API_KEYS])
    for precision in ("int8", "fp16"):
        assert np.abs(results[precision] - results["fp32"]).max() <= DEFAULT_ATOL[precision]


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_gate_refuses_a_variant_under_an_impossible_tolerance(precision, fp32, ckpt, forward, tiny_export, tmp_path):
    with pytest.raises(ParityError) as err:
        publish_variants(
            fp32,
            ckpt,
            forward,
            tmp_path / "m.onnx",
            VariantOptions(quantize=precision, **{f"{precision}_atol": 1e-9}),
            fp32_report=tiny_export.reports["fp32"],
        )
    assert not err.value.report["passed"] and err.value.report["precision"] == precision
    assert list(tmp_path.iterdir()) == []


def test_auto_leaves_out_a_failing_variant_and_falls_back_to_fp32(fp32, ckpt, forward, tiny_export, tmp_path):
    reports, written = publish_variants(
        fp32, ckpt, forward, tmp_path / "m.onnx", VariantOptions(quantize="auto", int8_atol=1e-9, allow_partial=True),
        fp32_report=tiny_export.reports["fp32"],
    )
    assert not reports["int8"]["passed"]
    assert written == {"fp32": tmp_path / "m.onnx", "fp16": tmp_path / "m.fp16.onnx"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.fp16.onnx", "m.onnx"]
    variants = OnnxModel(tmp_path / "m.onnx", device="cpu").info.variants
    assert variants["recommended"] == {"cpu": "fp32", "gpu": "fp16"} and not variants["gates"]["int8"]["passed"]


def test_cli_exits_nonzero_with_the_report_when_the_asked_variant_fails(
    tiny_model, tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    _reuse_trace(monkeypatch, tiny_model)
    out = tmp_path / "model.onnx"
    argv = [
        "-q",
        "export",
        "--checkpoint",
        str(tiny_checkpoint),
        "--out",
        str(out),
        "--quantize",
        "int8",
        "--int8-atol",
        "1e-9",
    ]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 1
    assert "parity (int8): FAILED" in err and "FAIL" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_per_channel_full_range_int8_is_still_an_option(fp32, ckpt, forward, constant_error):
    variant = make_variant(fp32, "int8", ckpt.config, per_channel=True, reduce_range=False)
    quantization = variant.build["quantization"]
    assert quantization["per_channel"] and not quantization["reduce_range"]
    report = gate_variant(variant, forward, describe(ckpt, "int8"), None, 1.0, 0)
    assert report["max_abs_model"] < constant_error / 2


def test_optimizer_fuses_layernorm_and_gelu_keeping_epsilon_and_tanh(fp32, ckpt):
    proto, fused = optimize(fp32, ckpt.config)
    layers = ckpt.config.num_layers
    assert fused["SkipLayerNormalization"] == 2 * layers and fused["LayerNormalization"] == 1
    assert fused["FastGelu"] == layers + 1 and fused["BiasGelu"] == 0 and fused["Gelu"] == 0
    for node in proto.graph.node:
        if "LayerNormalization" in node.op_type:
            eps = next(a.f for a in node.attribute if a.name == "epsilon")
            assert eps == pytest.approx(1e-6)
    mel = random_inputs(3, seed=5)
    np.testing.assert_allclose(_scores(proto, mel), _scores(fp32, mel), atol=1e-5, rtol=0)


def test_check_fusions_catches_onnxruntimes_exact_gelu_fusion_and_a_wrong_epsilon(fp32, ckpt):
    from onnxruntime.transformers.optimizer import optimize_model

    # Left alone, onnxruntime's BiasGelu fusion turns the model's tanh GELU into the exact (erf) one.
    naive = optimize_model(
        prepare(fp32), model_type="vit", num_heads=ckpt.config.num_heads, hidden_size=ckpt.config.embed_dim, opt_level=0
    ).model
    assert op_counts(naive).get("com.microsoft:BiasGelu", 0) >= 1
    with pytest.raises(ExportError, match="erf"):
        check_fusions(naive)
    wrong = prepare(fp32)
    norm = next(n for n in wrong.graph.node if n.op_type == "LayerNormalization")
    next(a for a in norm.attribute if a.name == "epsilon").f = 1e-5
    with pytest.raises(ExportError, match="epsilon"):
        check_fusions(wrong)


def test_optimized_variant_goes_through_the_gate(fp32, ckpt, forward, constant_error):
    variant = make_variant(fp32, "fp16", ckpt.config, optimized=True)
    assert variant.build["fused_ops"]["SkipLayerNormalization"] == 2 * ckpt.config.num_layers
    set_metadata(variant.proto, describe(ckpt, "fp16"))
    report = gate_variant(variant, forward, describe(ckpt, "fp16"), None, None, 0)
    assert report["max_abs_model"] <= DEFAULT_ATOL["fp16"] and report["max_abs_model"] < constant_error / 4


def test_cli_quantize_makes_a_gated_variant_of_an_exported_model(auto, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "gpu.onnx"
    fp32_model = auto.written["fp32"]
    code = cli.main(
        [
            "-q",
            "quantize",
            str(fp32_model),
            "--checkpoint",
            str(tiny_checkpoint),
            "--quantize",
            "fp16",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and "parity (fp16): PASSED" in capsys.readouterr().out
    assert OnnxModel(out, device="cpu").info.precision == "fp16"
    code = cli.main(["-q", "quantize", str(auto.written["int8"]), "--checkpoint", str(tiny_checkpoint)])
    err = capsys.readouterr().err
    assert code == 1 and "not a gated fp32 export" in err and len(err.strip().splitlines()) == 1


def test_runtime_info_reports_the_variant(auto, capsys):
    from runtime import cli as runtime_cli

    assert runtime_cli.main(["info", str(auto.written["int8"])]) == 0
    out = capsys.readouterr().out
    assert "precision   int8" in out
    assert "'cpu': 'int8'" in out and "int8 passed" in out and "fp16 passed" in out


def test_quantize_refuses_an_empty_clip_set(auto, tiny_checkpoint, tmp_path, capsys):
    from convert.variants import quantize_file

    fp32_model = auto.written["fp32"]
    argv = ["-q", "quantize", str(fp32_model), "--checkpoint", str(tiny_checkpoint), "--clips", str(tmp_path / "*.wav")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: parity gate clips not found") and len(err.splitlines()) == 1
    with pytest.raises(ParityError, match="no real audio clips"):
        quantize_file(fp32_model, tiny_checkpoint, tmp_path / "m.onnx", VariantOptions(quantize="int8"), clips=[])
    assert list(tmp_path.iterdir()) == [] and not fp32_model.with_name("model.fp32.int8.onnx").exists()
