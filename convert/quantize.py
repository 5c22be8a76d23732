"""Variants of an exported fp32 model: int8 for CPUs, fp16 for GPUs, and onnxruntime's transformer fusions.

Every function here maps an onnx ModelProto to a new one (the input is never modified). The variants are
plain ONNX graphs plus onnxruntime's com.microsoft operators, float32 in and float32 out, so the runtime
loads each one unchanged; whether a variant is good enough is decided by the parity gate (convert.parity),
not here. onnxruntime's optimizer and float16 tools are used on the paths that do not import PyTorch.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convert.config import ModelConfig
from convert.errors import ExportError
from convert.graph_rewrites import attributes, copy_proto, prepare
from convert.int8_fusion import FUSED as INT8_FUSED
from convert.int8_fusion import fuse_int8_matmuls
from convert.int8_rows import per_row_activations
from convert.int8_static import calibrate_ranges, calibration_windows, static_activations
from convert.options import DEFAULT_INT8_ACTIVATIONS, INT8_ACTIVATIONS
from runtime.model import PRECISIONS

log = logging.getLogger(__name__)

LN_EPSILON = 1e-6  # docs/spec.md §1; a fusion that changed it would be a silent parity bug
# Kept in float32 in the fp16 variant: normalisation statistics, softmax and the mean over patches.
FP16_KEEP_FP32 = ("LayerNormalization", "SkipLayerNormalization", "Softmax", "ReduceSum", "ReduceMean")
FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "FastGelu",
    "BiasGelu",
    "Gelu",
)
MS_DOMAIN = "com.microsoft"
ACTIVATIONS_DOC = {"static": "uint8, one fixed scale per layer (calibrated)",
                   "row": "uint8, per row (symmetric, zero point 128)", "batch": "uint8, per batch"}


@dataclass
class Variant:
    """One variant made from the fp32 model: its graph and how it was made (recorded in its metadata)."""

    precision: str
    proto: object  # onnx.ModelProto
    build: dict = field(default_factory=dict)


def op_counts(proto) -> dict[str, int]:
    """Node count per operator type, com.microsoft operators prefixed with their domain."""
    return dict(Counter(f"{MS_DOMAIN}:{n.op_type}" if n.domain == MS_DOMAIN else n.op_type for n in proto.graph.node))


def linear_layers(config: ModelConfig) -> int:
    """Dense layers of the model: patch embedding, q/k/v/out and two MLP layers per block, two in the head."""
    return 1 + 6 * config.num_layers + 2


def _gelu_to_contrib(proto):
    """ONNX Gelu -> com.microsoft FastGelu (tanh) / Gelu (erf), so that bias fusion keeps the right formula.

    onnxruntime's BiasGelu fusion matches any node named Gelu and emits the exact (erf) BiasGelu: applied
    to ONNX's Gelu(approximate='tanh') it would silently change the function.
    """
    from onnx import helper

    proto = copy_proto(proto)
    nodes = []
    for node in proto.graph.node:
        if node.op_type == "Gelu" and node.domain in ("", "ai.onnx"):
            op = "FastGelu" if attributes(node).get("approximate", b"none") in (b"tanh", "tanh") else "Gelu"
            node = helper.make_node(op, list(node.input), list(node.output), name=node.name, domain=MS_DOMAIN)
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return proto


def check_fusions(proto) -> None:
    """Refuse a graph whose normalisations lost epsilon 1e-6 or whose GELU became the exact (erf) form."""
    for node in proto.graph.node:
        if "LayerNormalization" in node.op_type:
            eps = attributes(node).get("epsilon", 1e-5)
            if abs(eps - LN_EPSILON) > 1e-9:
                raise ExportError(f"{node.op_type} {node.name} has epsilon {eps:g}, the model needs {LN_EPSILON:g}")
        exact = node.op_type in ("BiasGelu", "Gelu") and node.domain == MS_DOMAIN
        if exact or (node.op_type == "Gelu" and attributes(node).get("approximate", b"none") in (b"none", "none")):
            raise ExportError(f"{node.op_type} {node.name} is the exact (erf) GELU; the model uses the tanh form")


def optimize(proto, config: ModelConfig):
    """onnxruntime's transformer fusions (LayerNorm, SkipLayerNorm, FastGelu, attention where it matches).

    Runs the Python fusion pass only (opt_level 0): the onnxruntime pre-pass of `optimize_model` imports
    PyTorch. Returns the optimized proto and the count of each fused operator.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("vit")
    logging.getLogger("onnxruntime.transformers.optimizer").setLevel(logging.ERROR)  # "producer not matched"
    optimizer = optimize_model(
        _gelu_to_contrib(prepare(proto)),
        model_type="vit",
        num_heads=config.num_heads,
        hidden_size=config.embed_dim,
        optimization_options=options,
        opt_level=0,
    )
    out = optimizer.model
    check_fusions(out)
    counts = op_counts(out)
    fused = {
        op: counts.get(f"{MS_DOMAIN}:{op}", 0) + (counts.get(op, 0) if op == "LayerNormalization" else 0)
        for op in FUSED_OPS
    }
    log.info("transformer fusions: %s", ", ".join(f"{op} {n}" for op, n in fused.items() if n) or "none")
    return out, fused


def weight_matmuls(proto) -> list[str]:
    """Names of the MatMul nodes with a constant weight (the dense layers), in graph order."""
    inits = {init.name for init in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits]


def int8_float_layers(proto) -> dict[str, list[str]]:
    """The dense layers int8 keeps in float32: the patch embedding and the regression head.

    Measured on the production model (docs/decisions/2026-12-01-int8-settings.md): these 3 of its 75 dense
    layers carry nearly all of int8's error
    (the embedding sees raw dB values, the head writes the 19 scores), for 0.2 % of the multiply-adds.
    """
    dense = weight_matmuls(proto)
    # the first LayerNorm, or its first statistic where a converter wrote it as plain ops (tf2onnx: ReduceSum)
    first_norm = next((i for i, n in enumerate(proto.graph.node)
                       if "LayerNormalization" in n.op_type or n.op_type.startswith("Reduce")), None)
    before_norm = {n.name for n in proto.graph.node[:first_norm]} if first_norm is not None else set()
    embedding = [name for name in dense if name in before_norm]
    head = [name for name in head_nodes(proto) if name in set(dense)]
    if len(embedding) != 1 or not head:
        raise ExportError(f"int8: cannot find the patch embedding ({len(embedding)}) and the head ({len(head)})")
    return {"patch_embedding": embedding, "regression_head": head}


def quantize_int8(proto, *, per_channel: bool = False, reduce_range: bool = True, keep_float: bool = True,
                  fuse: bool = True, activations: str = DEFAULT_INT8_ACTIVATIONS, calibration=None):
    """Dynamic int8 quantization of the dense layers (signed int8 weights, uint8 activations).

    Attention's activation-by-activation MatMuls stay float32 (MatMulConstBOnly), as do LayerNorm and GELU;
    with `keep_float`, so do the patch embedding and the regression head (int8_float_layers). `reduce_range`
    (7-bit weights) keeps x86 CPUs without VNNI from saturating their u8 x s8 products. With `fuse`, each
    quantized layer is written as one MatMulIntegerToFloat node, bias included (convert.int8_fusion).
    `activations` (needs `fuse` unless "batch"): "static" fixes each layer's activation scale from its range over
    `calibration` (log-mel windows of real audio; convert.int8_static), "row" gives each row of each layer's input
    its own scale (convert.int8_rows), "batch" keeps onnxruntime's one scale per call.
    """
    if activations not in INT8_ACTIVATIONS:
        raise ValueError(f"unknown int8 activations {activations!r}; choose one of {INT8_ACTIVATIONS}")
    if activations != "batch" and not fuse:
        raise ValueError(f"{activations} int8 activations rewrite the fused graph: fuse must be on")
    if activations == "static" and (calibration is None or not len(calibration)):
        raise ValueError("static int8 activations need calibration windows")
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from convert.files import write_model

    prepared = prepare(proto) if any(n.op_type == "Gemm" for n in proto.graph.node) else proto
    excluded = [name for names in int8_float_layers(prepared).values() for name in names] if keep_float else []
    del proto
    # It warns through logging.warning() ("consider pre-processing"): silence the root logger meanwhile, with a
    # handler in place so that logging.warning() does not call basicConfig() on an application's behalf.
    root, guard = logging.getLogger(), logging.NullHandler()
    root_level = root.level
    root.addHandler(guard)
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="percepiano-int8-") as tmp:
            # from a file: given a ModelProto, onnxruntime deep-copies it, saves the copy and loads it back
            # (three copies of the weights at once); from a path it loads one
            source, out = write_model(Path(tmp) / "fp32.onnx", prepared), Path(tmp) / "int8.onnx"
            del prepared
            quantize_dynamic(
                source,
                out,
                op_types_to_quantize=["MatMul"],
                per_channel=per_channel,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded,
                extra_options={"MatMulConstBOnly": True},
            )
            quantized = onnx.load(str(out))
            # the ranges each layer's input takes in the int8 graph itself (a quarter of the float graph's size:
            # calibrating the float graph raised the production export's peak from 1.74 to 2.22 GB)
            ranges = calibrate_ranges(out, calibration) if activations == "static" else None
    finally:
        root.setLevel(root_level)
        root.removeHandler(guard)
    if not fuse:
        return quantized
    fused = fuse_int8_matmuls(quantized)[0]
    if activations == "static":
        return static_activations(fused, ranges)[0]
    return per_row_activations(fused)[0] if activations == "row" else fused


def _reduced_axes(node, constants: dict) -> tuple[int, ...] | None:
    """A Reduce node's axes, from its attribute (opset < 18) or its constant second input; None if unknown."""
    from onnx import numpy_helper

    for attr in node.attribute:
        if attr.name == "axes":
            return tuple(attr.ints)
    if len(node.input) > 1 and node.input[1] in constants:
        return tuple(int(a) for a in np.atleast_1d(numpy_helper.to_array(constants[node.input[1]])))
    return None


def head_nodes(proto) -> list[str]:
    """Names of the nodes after the mean over patches (ReduceSum/ReduceMean over axis 1): the regression head.

    Reductions over the last axis (LayerNorm statistics, softmax sums, where a converter wrote them as plain
    ops) are not the pooling.
    """
    constants = {init.name: init for init in proto.graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in proto.graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    frontier = [o for n in proto.graph.node if n.op_type in ("ReduceSum", "ReduceMean")
                and _reduced_axes(n, constants) in ((1,), (-2,), None) for o in n.output]
    seen: dict[str, None] = {}
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.name not in seen:
                seen[node.name] = None
                frontier.extend(node.output)
    return list(seen)


def _float16_model(proto):
    """proto in onnxruntime.transformers' OnnxModel, less its runtime shape inference.

    The float16 converter's Cast clean-up runs symbolic shape inference on a copy of the whole model (+330 MB at
    peak on the production preset) to find Casts between equal types. On these graphs that inference fails ("shape
    inference failed which might impact useless cast node detection"): without it, the production preset's fp16
    graph came out node for node the same. onnxruntime drops such Casts when it loads a model anyway.
    """
    from onnxruntime.transformers.onnx_model import OnnxModel

    class Float16Model(OnnxModel):
        def infer_runtime_shape(self, dynamic_axis_mapping=None, update=False):
            return None

    return Float16Model(proto)


def to_fp16(proto, keep_fp32: tuple[str, ...] = FP16_KEEP_FP32, copy: bool = True):
    """float16 weights and compute, float32 inputs and outputs.

    `keep_fp32` operator types stay float32, and so does the regression head after the mean over patches:
    (B, D) vectors, nothing to gain from half precision, while rounding the 19 scores to float16 alone would
    cost up to 2.4e-4 near 0.5.
    """
    model = _float16_model(copy_proto(proto) if copy else proto)  # copy False: `proto` itself is converted (memory)
    model.convert_float_to_float16(keep_io_types=True, op_block_list=list(keep_fp32), node_block_list=head_nodes(proto))
    model.topological_sort()  # the converter appends its input Cast at the end
    del model.model.graph.value_info[:]  # stale: some claim float16 for initializers that stayed float32
    return model.model


def make_variant(
    fp32,
    precision: str,
    config: ModelConfig,
    *,
    optimized: bool = False,
    per_channel: bool = False,
    reduce_range: bool = True,
    keep_float: bool = True,
    owned: bool = False,
    int8_activations: str = DEFAULT_INT8_ACTIVATIONS,
    calibration=None,
) -> Variant:
    """The `precision` variant of a gated fp32 model (metadata is left to the caller).

    `owned`: the caller hands `fp32` over (it is rewritten in place instead of copied: memory).
    `calibration`: static int8's, {"windows": array, "clips": [names]} (default: convert.int8_static's clips).
    The build records `batch_independent`: whether a window's scores are the same whatever else shares its
    batch (fp32, fp16, static and per-row int8; not per-batch int8). The corpus runner batches across files only
    then; the export measures it (convert.variants.gate_staged) before it writes the file.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    build: dict = {"optimized": optimized, "batch_independent": precision != "int8" or int8_activations != "batch"}
    if optimized:
        proto, build["fused_ops"] = optimize(fp32, config)
    else:
        proto = prepare(fp32, copy=not owned) if precision != "fp32" else (fp32 if owned else copy_proto(fp32))
    del fp32  # memory: a caller that hands over its proto (convert.variants) gets it freed here
    if precision == "int8":
        kept = int8_float_layers(proto) if keep_float else {}
        held = [proto]  # popped into the call, the float graph's only reference is quantize_int8's: it frees it
        del proto
        if int8_activations == "static" and calibration is None:
            calibration = calibration_windows()
        windows = calibration["windows"] if int8_activations == "static" else None
        proto = quantize_int8(held.pop(), per_channel=per_channel, reduce_range=reduce_range, keep_float=keep_float,
                              activations=int8_activations, calibration=windows)
        counts = op_counts(proto)
        quantized = counts.get("MatMulInteger", 0) + counts.get(f"{MS_DOMAIN}:{INT8_FUSED}", 0)
        expected = linear_layers(config) - sum(map(len, kept.values()))
        build["quantization"] = {
            "method": "onnxruntime dynamic" + (", activation scales fixed by calibration"
                                               if int8_activations == "static" else ""),
            "weights": "int8 (signed)" + (", 7-bit range" if reduce_range else ""),
            "activations": ACTIVATIONS_DOC[int8_activations],
            "per_channel": per_channel,
            "reduce_range": reduce_range,
            "kept_float32": sorted(kept),
            "quantized_matmuls": quantized,
            "fused": f"{MS_DOMAIN}:{INT8_FUSED} (scales and bias in the node)",
            "linear_layers": linear_layers(config),
        }
        if int8_activations == "static":
            build["quantization"]["calibration"] = {
                "method": "onnxruntime MinMax calibrator, per-call int8 graph, each window alone",
                "clips": list(calibration.get("clips", [])), "windows": len(windows)}
        if quantized != expected:
            raise ExportError(f"int8: {quantized} of {linear_layers(config)} linear layers were quantized, "
                              f"expected {expected}")
    elif precision == "fp16":
        proto = to_fp16(proto, copy=not owned)
        build["float16"] = {"io": "float32", "kept_float32": [*FP16_KEEP_FP32, "regression head"]}
    build["nodes"] = op_counts(proto)
    return Variant(precision, proto, build)
