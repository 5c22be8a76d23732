"""int8 dense layers written as com.microsoft MatMulIntegerToFloat: onnxruntime's fast path, fixed in the file.

onnxruntime's dynamic quantization writes each dense layer as a chain

    MatMulInteger(a_q, w_q, a_zp, w_zp) -> Cast(float) -> Mul(., Mul(a_scale, w_scale)) [-> Add(bias)]

and leaves it to the session's graph optimizer to fuse the chain into MatMulIntegerToFloat (and, with the
activation's DynamicQuantizeLinear, into DynamicQuantizeMatMul). That fusion needs the scale product to have
one consumer; the session's constant sharing and common-subexpression passes merge the products of two
layers whose weight scales happen to be equal (measured on the production demo model: the q and k layers of
one block), and those two layers then run unfused: an int32 product, a float copy and two multiplications.
`fuse_int8_matmuls` writes the fused operator into the file instead, bias included, so every quantized layer
runs fused whatever the scales. Same arithmetic: (a_q - a_zp)(w_q - w_zp) * a_scale * w_scale + bias.
"""

from __future__ import annotations

import numpy as np

MS_DOMAIN = "com.microsoft"
FUSED = "MatMulIntegerToFloat"


def _only_consumer(consumers: dict, name: str, op: str):
    users = consumers.get(name, [])
    return users[0] if len(users) == 1 and users[0].op_type == op else None


def fuse_int8_matmuls(proto) -> tuple[object, int]:
    """A copy of a dynamically quantized model with each MatMulInteger chain as one MatMulIntegerToFloat node.

    Returns (proto, layers fused). A chain that does not have the expected shape is left as it was.
    """
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    replace, drop, factors, fused = {}, set(), [], 0
    for node in graph.node:
        if node.op_type != "MatMulInteger" or len(node.input) != 4:
            continue
        cast = _only_consumer(consumers, node.output[0], "Cast")
        scaled = cast and _only_consumer(consumers, cast.output[0], "Mul")
        if scaled is None:
            continue
        factor = producer.get(next((i for i in scaled.input if i != cast.output[0]), ""))
        if factor is None or factor.op_type != "Mul" or sorted(i in inits for i in factor.input) != [False, True]:
            continue  # the scale product: activation scale (a DynamicQuantizeLinear output) x weight scale
        a_q, w_q, a_zp, w_zp = node.input
        a_scale, w_scale = sorted(factor.input, key=lambda name: name in inits)
        add = _only_consumer(consumers, scaled.output[0], "Add")
        bias = add and next((i for i in add.input if i != scaled.output[0]), None)
        inputs, result, chain = [a_q, w_q, a_scale, w_scale, a_zp, w_zp], scaled.output[0], [cast, scaled]
        if bias in inits and numpy_helper.to_array(inits[bias]).size == numpy_helper.to_array(inits[w_q]).shape[-1]:
            flat = f"{bias}_1d"
            if flat not in inits:
                inits[flat] = numpy_helper.from_array(numpy_helper.to_array(inits[bias]).astype(np.float32)
                                                      .reshape(-1), flat)
                graph.initializer.append(inits[flat])
            inputs, result, chain = [*inputs, flat], add.output[0], [*chain, add]
        replace[id(node)] = helper.make_node(FUSED, inputs, [result], name=f"{node.name}_{FUSED}", domain=MS_DOMAIN)
        drop |= {id(n) for n in chain}
        factors.append(factor)
        fused += 1
    nodes = [replace.get(id(n), n) for n in graph.node if id(n) not in drop]
    used = {name for n in nodes for name in n.input}
    unused = {id(f) for f in factors if f.output[0] not in used}  # scale products only the chains read
    nodes = [n for n in nodes if id(n) not in unused]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in graph.node for name in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if fused and not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out, fused
