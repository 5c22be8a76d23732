"""int8 activations with fixed scales, calibrated on real piano audio: a window's scores ignore its neighbours.

onnxruntime's dynamic quantization computes each quantized layer's activation scale and zero point from the
whole input of the call (DynamicQuantizeLinear), so a window's int8 scores move with the other windows of its
batch. `static_activations` replaces every DynamicQuantizeLinear of a fused int8 graph (convert.int8_fusion) by
QuantizeLinear with constants, and gives its MatMulIntegerToFloat consumers the same constants:

    x_q = com.microsoft.QuantizeLinear(x, scale, zero_point)             # uint8, fixed per layer
    y = MatMulIntegerToFloat(x_q, w_q, scale, w_scale, zero_point, w_zp, bias)

The ranges come from onnxruntime's calibrator (`onnxruntime.quantization.calibrate`, MinMax) run on the per-call
int8 graph over log-mel windows of real recordings (`convert/clips/calibration/`, kept apart from the parity
gate's clips): the range each quantized layer's input takes in the int8 model itself, from a graph a quarter of
the float one's size (export memory). The scale and zero point come from its `compute_scale_zp` (uint8, the range
widened to hold 0). A value outside the calibrated range saturates at the end of it; the parity gate's random
windows and the gate's real clips, none of them calibrated on, measure what that costs.

Same integer kernel as per-call int8 and one pass fewer (no min/max over the input): measured no slower.
onnxruntime's contrib QuantizeLinear, not ONNX's: the graphs are opset 23, and onnxruntime 1.23 (the runtime's
declared floor) has no kernel for ONNX QuantizeLinear-23; the contrib one has run since long before.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from convert.errors import ExportError
from convert.int8_fusion import FUSED, MS_DOMAIN

CALIBRATION_DIR = Path(__file__).parent / "clips" / "calibration"
CALIBRATION_BATCH = 1  # each window alone: the int8 graph calibrated on has per-call scales upstream


def calibration_clips() -> list[Path]:
    """The real recordings int8's activation ranges are calibrated on by default (none of them a gate clip)."""
    return sorted(CALIBRATION_DIR.glob("*.flac"))


def calibration_windows(clips: Sequence[str | Path] | None = None) -> dict:
    """{"windows": the log-mel windows of `clips` (default: calibration_clips()) as the runtime computes them,
    "clips": their names}: what convert.quantize.make_variant's `calibration` takes."""
    from runtime.audio import load_audio
    from runtime.features import features_from_audio

    chosen = [Path(c) for c in clips] if clips is not None else calibration_clips()
    if not chosen:
        raise ExportError(f"no calibration clips for int8 ({CALIBRATION_DIR} holds no .flac); "
                          "pass --calibration-clips FILE... of real piano audio")
    missing = [str(c) for c in chosen if not c.is_file()]
    if missing:
        raise ExportError(f"calibration clips not found: {', '.join(missing[:3])}")
    windows = np.concatenate([features_from_audio(load_audio(c)) for c in chosen])
    return {"windows": windows.astype(np.float32), "clips": [c.name for c in chosen]}


def calibrate_ranges(int8_model: Path, windows: np.ndarray) -> dict[str, tuple[float, float]]:
    """(min, max) of the input of every DynamicQuantizeLinear of a per-call int8 graph file (as onnxruntime's
    quantizer writes it, before convert.int8_fusion) over `windows`: onnxruntime's MinMax calibrator."""
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    class Windows(CalibrationDataReader):
        def __init__(self, name: str) -> None:
            self.name, self.batches = name, iter(range(0, len(windows), CALIBRATION_BATCH))

        def get_next(self):
            start = next(self.batches, None)
            return None if start is None else {self.name: windows[start : start + CALIBRATION_BATCH]}

    with tempfile.TemporaryDirectory(prefix="percepiano-calibrate-") as tmp:
        calibrator = create_calibrator(Path(int8_model), ["DynamicQuantizeLinear"],
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax,
                                       providers=["CPUExecutionProvider"])
        calibrator.collect_data(Windows(calibrator.infer_session.get_inputs()[0].name))
        data = calibrator.compute_data()
        del calibrator
    return {t: (float(np.min(d.range_value[0])), float(np.max(d.range_value[1]))) for t, d in data.items()}


def static_activations(proto, ranges: dict[str, tuple[float, float]]) -> tuple[object, int]:
    """A copy of a fused int8 model with fixed activation scales from `ranges`; (proto, layer inputs rewritten).

    Every DynamicQuantizeLinear must feed only MatMulIntegerToFloat nodes (as their quantized input, scale and
    zero point); anything else raises ValueError (a graph this rewrite does not know).
    """
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants, nodes = {}, []
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        users = {id(u): u for o in node.output for u in consumers.get(o, [])}.values()
        if not users or any(u.op_type != FUSED or u.domain != MS_DOMAIN or u.input[0] != node.output[0]
                            for u in users):
            raise ValueError(f"{node.name}: its outputs feed something other than {FUSED}'s quantized input")
        if node.input[0] not in ranges:
            raise ExportError(f"int8 calibration gave no range for {node.input[0]} (the input of {node.name})")
        low, high = ranges[node.input[0]]
        zero_point, scale = compute_scale_zp(np.float32(low), np.float32(high), np.uint8(0), np.uint8(255))
        prefix = f"{node.name or node.output[0]}_static"
        graph.initializer.extend([numpy_helper.from_array(np.asarray(scale, np.float32).reshape(()), f"{prefix}_scale"),
                                  numpy_helper.from_array(np.asarray(zero_point, np.uint8).reshape(()),
                                                          f"{prefix}_zero_point")])
        constants[node.output[1]], constants[node.output[2]] = f"{prefix}_scale", f"{prefix}_zero_point"
        nodes.append(helper.make_node("QuantizeLinear", [node.input[0], f"{prefix}_scale", f"{prefix}_zero_point"],
                                      [node.output[0]], name=f"{prefix}_quantize", domain=MS_DOMAIN))
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in constants:
                node.input[i] = constants[name]
    del graph.node[:]
    graph.node.extend(nodes)
    return out, len(constants) // 2
