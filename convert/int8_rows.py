"""int8 activations quantized per row (per token of each window), so that a window's scores do not depend on
the other windows of its batch.

onnxruntime's dynamic quantization writes DynamicQuantizeLinear before each quantized layer: one scale and zero
point for the whole tensor, i.e. for every window of the call together. A window's int8 scores then move with
its batch neighbours (measured on the production demo model: see docs/corpus-speed.md). `per_row_activations`
rewrites each DynamicQuantizeLinear as a symmetric quantization of each row of its input (the last axis: one
token's features), in standard ONNX operators:

    m = max(ReduceMax(Abs(x), axes=[-1], keepdims), tiny)   # (..., 1), one per row
    x_q = QuantizeLinear(x * (127 / m), 1, 128)             # uint8, zero point 128 for every row
    s = m / 127

and each of its MatMulIntegerToFloat consumers as

    MatMulIntegerToFloat(x_q, w_q, 1, w_scale, 128, w_zp) * s + bias

onnxruntime's integer kernels take only one activation zero point per call; a symmetric range (zero point 128
for every row) keeps it one while the scale varies per row. Same integer kernel as before; the per-row
statistics and the final scaling are elementwise passes over the layer's input and output.
"""

from __future__ import annotations

import numpy as np

from convert.int8_fusion import FUSED, MS_DOMAIN

ZERO_POINT = 128  # uint8 code of 0.0 in every row: codes 1..255 hold -127..127 steps of m / 127
TINY = 1e-30  # an all-zero row gets this maximum: codes 128, scores from the bias alone


def _const(graph, name: str, value) -> str:
    from onnx import numpy_helper

    if not any(i.name == name for i in graph.initializer):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def _opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def _row_quantizer(graph, node, opset: int) -> tuple[list, str, str]:
    """Nodes replacing one DynamicQuantizeLinear: (nodes, quantized input, per-row scale (..., 1))."""
    from onnx import helper

    x, prefix = node.input[0], f"{node.name or node.output[0]}_rows"
    one_over = _const(graph, "int8_rows_127", np.float32(127.0))
    if opset >= 18:
        axes = _const(graph, "int8_rows_last_axis", np.array([-1], np.int64))
        reduce = helper.make_node("ReduceMax", [f"{prefix}_abs", axes], [f"{prefix}_max0"], keepdims=1,
                                  name=f"{prefix}_max0")
    else:
        reduce = helper.make_node("ReduceMax", [f"{prefix}_abs"], [f"{prefix}_max0"], axes=[-1], keepdims=1,
                                  name=f"{prefix}_max0")
    nodes = [
        helper.make_node("Abs", [x], [f"{prefix}_abs"], name=f"{prefix}_abs"),
        reduce,
        helper.make_node("Max", [f"{prefix}_max0", _const(graph, "int8_rows_tiny", np.float32(TINY))],
                         [f"{prefix}_max"], name=f"{prefix}_max"),
        helper.make_node("Div", [one_over, f"{prefix}_max"], [f"{prefix}_inv"], name=f"{prefix}_inv"),
        helper.make_node("Div", [f"{prefix}_max", one_over], [f"{prefix}_scale"], name=f"{prefix}_scale"),
        helper.make_node("Mul", [x, f"{prefix}_inv"], [f"{prefix}_scaled"], name=f"{prefix}_scaled"),
        helper.make_node("QuantizeLinear", [f"{prefix}_scaled", _const(graph, "int8_rows_one", np.float32(1.0)),
                                            _const(graph, "int8_rows_zero_point", np.uint8(ZERO_POINT))],
                         [node.output[0]], name=f"{prefix}_quantize"),
    ]
    return nodes, node.output[0], f"{prefix}_scale"


def _row_matmul(node, scale: str, graph) -> list:
    """One MatMulIntegerToFloat of a per-row quantized input: unit activation scale, then * scale + bias."""
    from onnx import helper

    a_q, w_q, _, w_scale, _, w_zp, *bias = list(node.input) + [""] * (7 - len(node.input))
    bias = bias[0] if bias and bias[0] else None
    out, name = node.output[0], node.name or node.output[0]
    one, zp = "int8_rows_one", "int8_rows_zero_point"
    integer = helper.make_node(FUSED, [a_q, w_q, one, w_scale, zp, w_zp], [f"{name}_int"], name=name,
                               domain=MS_DOMAIN)
    if bias is None:
        return [integer, helper.make_node("Mul", [f"{name}_int", scale], [out], name=f"{name}_row_scale")]
    return [integer, helper.make_node("Mul", [f"{name}_int", scale], [f"{name}_scaled"], name=f"{name}_row_scale"),
            helper.make_node("Add", [f"{name}_scaled", bias], [out], name=f"{name}_bias")]


def per_row_activations(proto) -> tuple[object, int]:
    """A copy of a fused int8 model (convert.int8_fusion) with per-row activation scales; (proto, rewritten).

    Every DynamicQuantizeLinear must feed only MatMulIntegerToFloat nodes through its three outputs;
    anything else raises ValueError (a graph this rewrite does not know).
    """
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph, opset = out.graph, _opset(out)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    scale_of, nodes, rewritten = {}, [], 0
    for node in graph.node:
        if node.op_type == "DynamicQuantizeLinear":
            users = consumers.get(node.output[0], [])
            if not users or any(u.op_type != FUSED or u.input[0] != node.output[0] for u in users):
                raise ValueError(f"{node.name}: its quantized output feeds something other than {FUSED}")
            quantizer, quantized, scale = _row_quantizer(graph, node, opset)
            scale_of[quantized] = scale
            nodes += quantizer
            rewritten += 1
        elif node.op_type == FUSED and node.input[0] in scale_of:
            nodes += _row_matmul(node, scale_of[node.input[0]], graph)
        else:
            nodes.append(node)
    if any(n.op_type == FUSED and n.input[0] not in scale_of for n in nodes):
        raise ValueError(f"a {FUSED} node whose input is not a DynamicQuantizeLinear output")
    del graph.node[:]
    graph.node.extend(nodes)
    return out, rewritten
