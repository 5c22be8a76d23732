"""Preparing a traced graph for the variants: weights folded to initializers, every dense layer a MatMul.

Rewrites are made in place where the caller hands its proto over (`copy=False`), and they avoid writing a
weight's bytes again: protobuf's upb backend allocates every part of a message in its root's arena and frees
nothing until the root is freed, so a weight replaced, re-appended or copied inside the model stays resident
as garbage beside its new form. A Reshape of a weight changes only the initializer's dims and name, a Gemm
that neither transposes nor scales its weight keeps it where it lies, unused initializers are deleted rather
than the list rebuilt. Measured on the production preset (docs/decisions/2026-12-02-export-memory.md):
preparing the traced graph grew the process by about 1.1 GB before, by almost nothing now.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from convert.errors import ExportError

log = logging.getLogger(__name__)


def copy_proto(proto):
    """A deep copy of an onnx ModelProto."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def attributes(node) -> dict:
    """A node's attributes as Python values."""
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def drop_unused_initializers(graph) -> int:
    """Delete the initializers no node or graph output reads, where they lie; the count deleted."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unused = [i for i, init in enumerate(graph.initializer) if init.name not in used]
    for index in reversed(unused):
        del graph.initializer[index]
    return len(unused)


def reshaped_dims(dims: list[int], shape: np.ndarray, allowzero: bool) -> list[int]:
    """The output shape of ONNX Reshape(data of `dims`, `shape`): 0 copies an input dim (unless allowzero), -1 is
    inferred."""
    out = [int(d) for d in shape]
    if not allowzero:
        out = [dims[i] if d == 0 else d for i, d in enumerate(out)]
    if out.count(-1) > 1:
        raise ExportError(f"Reshape to {out}: more than one inferred dimension")
    total = int(np.prod(dims, dtype=np.int64))
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1], dtype=np.int64))
        out[out.index(-1)] = total // known if known else 0
    if int(np.prod(out, dtype=np.int64)) != total:
        raise ExportError(f"Reshape of a {dims} weight to {list(shape)}: the element counts differ")
    return out


def fold_constants(proto, copy: bool = True):
    """Evaluate every node whose inputs are all initializers (e.g. Reshape of a weight) into an initializer.

    A Reshape whose data only it reads becomes that initializer under the node's output name (new dims, the same
    bytes). Other nodes are evaluated by onnx's reference evaluator. `copy` False rewrites `proto` itself.
    """
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    proto = copy_proto(proto) if copy else proto
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    outputs = {o.name for o in graph.output}
    kept, folded = [], 0
    for node in graph.node:
        if node.op_type == "Constant" or not node.input or not all(name in inits for name in node.input if name):
            kept.append(node)
            continue
        if node.op_type == "Reshape" and uses[node.input[0]] == 1 and node.input[0] not in outputs:
            data = inits.pop(node.input[0])
            shape = numpy_helper.to_array(inits[node.input[1]])
            dims = reshaped_dims(list(data.dims), shape, bool(attributes(node).get("allowzero", 0)))
            del data.dims[:]
            data.dims.extend(dims)
            data.name = node.output[0]
            inits[data.name] = data
            folded += 1
            continue
        single = helper.make_graph(
            [node], "fold", [], [helper.make_tensor_value_info(o, 0, None) for o in node.output],
            initializer=[inits[name] for name in node.input if name],
        )
        values = ReferenceEvaluator(helper.make_model(single, opset_imports=proto.opset_import)).run(None, {})
        for name, value in zip(node.output, values, strict=True):
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
            inits[name] = graph.initializer[-1]
        folded += 1
    del graph.node[:]
    graph.node.extend(kept)
    drop_unused_initializers(graph)
    log.debug("folded %d constant nodes", folded)
    return proto


def gemm_to_matmul(proto, copy: bool = True):
    """Rewrite Gemm(A, W, C) with a constant W as MatMul(A, W') + Add(C): the form int8 quantization handles.

    W' is W itself unless the Gemm transposes or scales it; then, where the Gemm is its only reader, it is
    replaced where it lies. `copy` False rewrites `proto` itself.
    """
    from onnx import helper, numpy_helper

    proto = copy_proto(proto) if copy else proto
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    nodes = []
    for node in graph.node:
        attrs = attributes(node)
        if node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0):
            nodes.append(node)
            continue
        w_name = node.input[1]
        if attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0 or inits[w_name].data_type != 1:
            weight = numpy_helper.to_array(inits[w_name]).astype(np.float32)
            weight = (weight.T if attrs.get("transB", 0) else weight) * np.float32(attrs.get("alpha", 1.0))
            if uses[w_name] == 1:  # in place (in the copy, or the handed-over proto): its only reader
                inits[w_name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weight), w_name))
            else:
                w_name = f"{node.name}_weight"
                graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), w_name))
            del weight
        beta = attrs.get("beta", 1.0)
        has_bias = len(node.input) > 2 and bool(node.input[2]) and beta != 0
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [product], name=f"{node.name}_MatMul"))
        if has_bias:
            if node.input[2] not in inits:
                raise ExportError(f"Gemm {node.name}: its bias {node.input[2]} is not a constant")
            b_name = node.input[2]
            if beta != 1.0 or inits[b_name].data_type != 1:
                bias = numpy_helper.to_array(inits[b_name]).astype(np.float32) * np.float32(beta)
                b_name = f"{node.name}_bias"
                graph.initializer.append(numpy_helper.from_array(bias, b_name))
            nodes.append(helper.make_node("Add", [product, b_name], [node.output[0]], name=f"{node.name}_Add"))
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(graph)
    return proto


def prepare(proto, copy: bool = True):
    """Same function, standard ONNX ops: weights folded to initializers and every Dense layer a MatMul.

    `copy` False rewrites `proto` itself (for a caller that hands it over).
    """
    return gemm_to_matmul(fold_constants(proto, copy=copy), copy=False)
