"""convert.graph_rewrites: folding constants and Gemm -> MatMul in place keep the function and the weights' bytes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from convert.errors import ExportError
from convert.graph_rewrites import drop_unused_initializers, prepare, reshaped_dims

RNG = np.random.default_rng(0)


def _model(nodes, inits, in_shape=(2, 12), out="y"):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [2, None])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(proto, x):
    return ReferenceEvaluator(proto).run(None, {"x": x})[0]


@pytest.mark.parametrize("shape", [[0, -1], [-1, 4], [12, 4], [12, 0, -1]])
def test_a_reshaped_weight_becomes_the_same_bytes_under_new_dims(shape):
    """Reshape(W, shape) of a weight only it reads is folded into W itself: no Reshape left, same output."""
    w = RNG.standard_normal((12, 2, 2)).astype(np.float32)  # -> (12, 4); [12, 0, -1] keeps (12, 2, 2), then (12, 4)
    nodes = [helper.make_node("Reshape", ["w", "shape"], ["w2"], name="r")]
    if len(shape) == 3:
        nodes.append(helper.make_node("Reshape", ["w2", "flat"], ["w3"], name="r2"))
        extra = {"flat": np.array([12, 4], np.int64)}
    else:
        nodes[0].output[0] = "w3"
        extra = {}
    nodes.append(helper.make_node("MatMul", ["x", "w3"], ["y"], name="mm"))
    proto = _model(nodes, {"w": w, "shape": np.array(shape, np.int64), **extra})
    x = RNG.standard_normal((2, 12)).astype(np.float32)
    expected = _run(proto, x)
    prepared = prepare(proto, copy=False)
    assert [n.op_type for n in prepared.graph.node] == ["MatMul"]
    (weight,) = prepared.graph.initializer
    assert weight.raw_data == w.tobytes() and list(weight.dims) == [12, 4]
    np.testing.assert_array_equal(_run(prepared, x), expected)


def test_a_weight_read_twice_is_folded_by_evaluation_and_kept_for_its_other_reader():
    w = RNG.standard_normal((12, 12)).astype(np.float32)
    proto = _model([
        helper.make_node("Reshape", ["w", "shape"], ["w2"], name="r"),
        helper.make_node("MatMul", ["x", "w2"], ["a"], name="mm"),
        helper.make_node("MatMul", ["x", "w"], ["c"], name="mm_w"),
        helper.make_node("Add", ["a", "c"], ["y"], name="add"),
    ], {"w": w, "shape": np.array([12, 12], np.int64)})
    x = RNG.standard_normal((2, 12)).astype(np.float32)
    expected = _run(proto, x)
    prepared = prepare(proto)
    names = {i.name for i in prepared.graph.initializer}
    assert {"w", "w2"} <= names and "Reshape" not in [n.op_type for n in prepared.graph.node]
    np.testing.assert_allclose(_run(prepared, x), expected, rtol=0, atol=1e-6)
    # copy=True (the default) left the input alone
    assert len(proto.graph.node) == 4 and proto.graph.node[0].op_type == "Reshape"


@pytest.mark.parametrize("attrs", [{}, {"transB": 1}, {"alpha": 0.5, "beta": 2.0}, {"beta": 0.0}])
def test_gemm_becomes_matmul_plus_add_with_the_same_result(attrs):
    w = RNG.standard_normal((5, 12) if attrs.get("transB") else (12, 5)).astype(np.float32)
    b = RNG.standard_normal(5).astype(np.float32)
    proto = _model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="g", **attrs)], {"w": w, "b": b})
    x = RNG.standard_normal((2, 12)).astype(np.float32)
    expected = _run(proto, x)
    prepared = prepare(proto, copy=False)
    ops = [n.op_type for n in prepared.graph.node]
    assert ops == (["MatMul"] if attrs.get("beta") == 0.0 else ["MatMul", "Add"])
    np.testing.assert_allclose(_run(prepared, x), expected, rtol=0, atol=1e-5)
    if not attrs:  # neither transposed nor scaled: the weight is the one that was there
        assert next(i for i in prepared.graph.initializer if i.name == "w").raw_data == w.tobytes()


def test_reshaped_dims_follows_onnx_reshape_and_refuses_what_numpy_would():
    assert reshaped_dims([3, 4, 4], np.array([0, -1]), allowzero=False) == [3, 16]
    assert reshaped_dims([3, 4, 4], np.array([-1]), allowzero=False) == [48]
    assert reshaped_dims([0, 4], np.array([0, 4]), allowzero=True) == [0, 4]
    with pytest.raises(ExportError, match="element counts"):
        reshaped_dims([3, 4], np.array([5, -1]), allowzero=False)
    with pytest.raises(ExportError, match="more than one"):
        reshaped_dims([3, 4], np.array([-1, -1]), allowzero=False)


def test_unused_initializers_are_deleted_and_the_used_ones_kept_in_order():
    proto = _model([helper.make_node("Add", ["x", "b"], ["y"], name="add")],
                   {"a": np.ones(3, np.float32), "b": np.ones(12, np.float32), "c": np.ones(2, np.float32)})
    assert drop_unused_initializers(proto.graph) == 2
    assert [i.name for i in proto.graph.initializer] == ["b"]
    onnx.checker.check_model(proto)
