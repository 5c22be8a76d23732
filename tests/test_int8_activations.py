"""int8 activation scales (convert.int8_static, convert.int8_rows): fixed or per row, a window's scores are its
own whatever shares its call; onnxruntime's per-call scales are not. On the tiny preset and real piano audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from convert.errors import ExportError, ParityError
from convert.export import build_forward
from convert.int8_static import calibration_clips, calibration_windows
from convert.metadata import describe, set_metadata
from convert.parity import (
    NEIGHBOUR_ATOL,
    Tolerance,
    clip_references,
    random_inputs,
    random_references,
    shipped_clips,
)
from convert.quantize import linear_layers, make_variant, op_counts, prepare, quantize_int8
from convert.staging import Staged
from convert.variants import gate_staged
from runtime.model import OnnxModel

pytestmark = pytest.mark.slow

FUSED_INT8 = "com.microsoft:MatMulIntegerToFloat"


@pytest.fixture(scope="module")
def calibration():
    return calibration_windows()


@pytest.fixture(scope="module")
def static(fp32, ckpt, calibration):
    return make_variant(fp32, "int8", ckpt.config, int8_activations="static", calibration=calibration)


@pytest.fixture(scope="module")
def batch(fp32, ckpt):
    return make_variant(fp32, "int8", ckpt.config, int8_activations="batch")


def _session(proto):
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _scores(proto, mel):
    return _session(proto).run(None, {"mel": mel})[0]


def neighbour_change(proto, target: np.ndarray) -> float:
    """Largest change of `target`'s scores (one window) when it shares a call with other windows."""
    alone = _scores(proto, target)[0]
    neighbours = [random_inputs(7, seed=11), np.full((3, 128, 128), -80.0, np.float32),
                  np.clip(random_inputs(3, seed=12) * 4.0, -80.0, 0.0).astype(np.float32)]
    return max(float(np.abs(_scores(proto, np.concatenate([n, target]))[-1] - alone).max()) for n in neighbours)


def test_the_calibration_clips_are_real_audio_kept_apart_from_the_gates():
    clips = calibration_clips()
    assert len(clips) == 3 and all(c.stat().st_size > 100_000 for c in clips)
    assert not {c.name for c in clips} & {c.name for c in shipped_clips()}
    with pytest.raises(ExportError, match="not found"):
        calibration_windows([Path("no-such-clip.flac")])


def test_static_int8_has_fixed_scales_from_the_ranges_its_layers_see(static, batch, fp32, calibration):
    """Each layer input's scale and zero point are those of its min/max over the calibration windows, each run
    alone through the per-call int8 graph (as onnxruntime's quantizer writes it), computed here by plain numpy
    and the uint8 quantization rule written out."""
    import onnxruntime as ort

    ops = op_counts(static.proto)
    assert "DynamicQuantizeLinear" not in ops
    # onnxruntime's contrib QuantizeLinear: ONNX's is opset 23 here, which onnxruntime 1.23 cannot run
    assert ops["com.microsoft:QuantizeLinear"] == op_counts(batch.proto)["DynamicQuantizeLinear"]
    assert "QuantizeLinear" not in ops
    assert ops[FUSED_INT8] == op_counts(batch.proto)[FUSED_INT8]
    inputs = list(dict.fromkeys(n.input[0] for n in batch.proto.graph.node if n.op_type == "DynamicQuantizeLinear"))
    probe = quantize_int8(prepare(fp32), fuse=False, activations="batch")
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in inputs)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    windows = calibration["windows"]
    seen = [session.run(inputs, {"mel": windows[i : i + 1]}) for i in range(len(windows))]
    inits = {i.name: numpy_helper.to_array(i) for i in static.proto.graph.initializer}
    quantizers = {n.input[0]: n for n in static.proto.graph.node if n.op_type == "QuantizeLinear"}
    for k, tensor in enumerate(inputs):
        low = min(0.0, min(float(s[k].min()) for s in seen))
        high = max(0.0, max(float(s[k].max()) for s in seen))
        scale = (high - low) / 255.0
        zero_point = round(-low / scale)
        q = quantizers[tensor]
        assert float(inits[q.input[1]]) == pytest.approx(scale, rel=1e-5)
        assert int(inits[q.input[2]]) == zero_point
        # every layer that reads it multiplies back by that same fixed scale and zero point
        users = [n for n in static.proto.graph.node
                 if n.op_type == "MatMulIntegerToFloat" and n.input[0] == q.output[0]]
        assert users and all(u.input[2] == q.input[1] and u.input[4] == q.input[2] for u in users)
    quantization = static.build["quantization"]
    assert static.build["batch_independent"] and quantization["activations"].startswith("uint8, one fixed scale")
    assert quantization["calibration"]["clips"] == [c.name for c in calibration_clips()]
    assert quantization["calibration"]["windows"] == len(windows)


def test_a_windows_int8_scores_are_its_own_with_fixed_or_per_row_scales(static, batch, fp32, ckpt):
    row = make_variant(fp32, "int8", ckpt.config, int8_activations="row")
    assert row.build["batch_independent"] and row.build["quantization"]["activations"].startswith("uint8, per row")
    assert not batch.build["batch_independent"] and batch.build["quantization"]["activations"] == "uint8, per batch"
    target = random_inputs(1, seed=5)
    changes = {name: neighbour_change(v.proto, target) for name, v in
               {"static": static, "row": row, "batch": batch}.items()}
    # float32 parts may differ by an ulp between batch sizes; per-call scales move the scores far more
    assert changes["static"] <= 1e-6 and changes["row"] <= 1e-6, changes
    assert changes["batch"] > 20 * max(changes["static"], changes["row"], 1e-8), changes


def test_static_int8_tracks_jax_on_held_out_piano_clips(static, ckpt, piano_clips):
    """Scored against JAX on real clips neither calibrated on nor in the gate: as close as per-call int8 comes."""
    forward = build_forward(ckpt)
    held_out = [c for c in piano_clips if c.name not in {p.name for p in [*calibration_clips(), *shipped_clips()]}]
    assert len(held_out) == 11
    refs = clip_references(forward, held_out[:4])
    reference = np.concatenate([r.scores for r in refs])
    constant = float(np.abs(reference - reference.mean(axis=0)).max())
    got = np.concatenate([_scores(static.proto, r.mel) for r in refs])
    error = float(np.abs(got - reference).max())
    assert error < Tolerance.for_precision("int8").model and error < constant / 10, (error, constant)


def test_the_gate_measures_a_claimed_batch_independence(batch, static, ckpt, tmp_path):
    """A variant built to ignore its neighbours is run among them before it is written; a false claim fails."""
    forward = build_forward(ckpt)
    references, randoms = clip_references(forward), random_references(forward, 0)
    tol = Tolerance.for_precision("int8")

    def staged(variant, name):
        proto = onnx.ModelProto()
        proto.CopyFrom(variant.proto)
        set_metadata(proto, describe(ckpt, "int8"))
        onnx.save(proto, str(tmp_path / name))
        return Staged(tmp_path / name, tmp_path / name, {"optimized": "none"})

    build = dict(static.build)
    report = gate_staged(staged(static, "static.onnx"), "int8", references, randoms, tol.model, 0, build)
    assert report["passed"] and build["neighbour_change"] == report["neighbour_change"] <= 1e-6
    lying = {**batch.build, "batch_independent": True}
    with pytest.raises(ParityError, match="moved .* with them") as caught:
        gate_staged(staged(batch, "batch.onnx"), "int8", references, randoms, tol.model, 0, lying)
    assert caught.value.report["neighbour_change"] > NEIGHBOUR_ATOL and not caught.value.report["passed"]


def test_static_and_per_row_scales_need_the_fused_graph_and_static_its_windows(fp32):
    for activations in ("static", "row"):
        with pytest.raises(ValueError, match="fuse must be on"):
            quantize_int8(prepare(fp32), fuse=False, activations=activations)
    with pytest.raises(ValueError, match="calibration windows"):
        quantize_int8(prepare(fp32), activations="static")


def test_the_runtime_reads_the_claim_from_the_file(static, ckpt, tmp_path):
    proto = static.proto
    set_metadata(proto, {**describe(ckpt, "int8"), "variants": {"this": "int8", "build": static.build}})
    onnx.save(proto, str(tmp_path / "static.onnx"))
    model = OnnxModel(tmp_path / "static.onnx", device="cpu")
    assert model.info.batch_independent and model.info.precision == "int8"
    assert linear_layers(ckpt.config) - 3 == static.build["quantization"]["quantized_matmuls"]
