"""runtime.protowire and the loader's weights read in place: the same session, from the same bytes of the file."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from convert.parity import random_inputs
from runtime import model as runtime_model
from runtime.errors import ModelError
from runtime.model import OnnxModel
from runtime.protowire import EXTERNAL_MIN_BYTES, external_weights_graph, header_metadata


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    return shutil.copy(tiny_model, tmp_path / "tiny.onnx")


def test_the_graph_points_each_large_weight_at_its_own_bytes_in_the_file(model_copy):
    original = {i.name: i for i in onnx.load(str(model_copy)).graph.initializer}
    graph = onnx.load_from_string(external_weights_graph(model_copy))
    data = open(model_copy, "rb").read()
    external = 0
    for init in graph.graph.initializer:
        raw = original[init.name].raw_data
        if len(raw) >= EXTERNAL_MIN_BYTES:
            entries = {e.key: e.value for e in init.external_data}
            assert init.data_location == onnx.TensorProto.EXTERNAL and not init.raw_data
            assert entries["location"] == "tiny.onnx"
            offset, length = int(entries["offset"]), int(entries["length"])
            assert data[offset:offset + length] == raw
            external += 1
        else:
            assert init.raw_data == raw and init.data_location == onnx.TensorProto.DEFAULT
        assert list(init.dims) == list(original[init.name].dims)
    assert external > 10
    assert header_metadata(external_weights_graph(model_copy)) == header_metadata(model_copy)


def test_weights_read_from_the_file_give_the_same_scores_as_a_parsed_file(model_copy):
    mel = random_inputs(3, seed=4)
    in_place = OnnxModel(model_copy, device="cpu")
    parsed = OnnxModel(model_copy, device="cpu", external_weights=False)
    assert (in_place.weights, parsed.weights) == ("file", "parsed")
    np.testing.assert_array_equal(in_place.run(mel), parsed.run(mel))
    assert in_place.run_self_check().passed


def test_a_model_behind_a_symlink_in_another_folder_is_read_where_it_lies(model_copy, tmp_path):
    elsewhere = tmp_path / "links"
    elsewhere.mkdir()
    os.symlink(model_copy, elsewhere / "model.onnx")
    model = OnnxModel(elsewhere / "model.onnx", device="cpu")
    assert model.weights == "file"
    mel = random_inputs(2, seed=1)
    np.testing.assert_array_equal(model.run(mel), OnnxModel(model_copy, device="cpu").run(mel))


def test_a_file_published_over_the_model_while_it_loads_is_loaded_again_whole(model_copy, tmp_path, monkeypatch):
    """The graph is read first and the weights after: an export replacing the file in between must not give the
    old graph the new file's bytes. The loader sees the new inode and parses the new file instead."""
    other = tmp_path / "other.onnx"
    proto = onnx.load(str(model_copy))
    head = next(i for i in reversed(proto.graph.initializer) if len(i.raw_data) >= EXTERNAL_MIN_BYTES)
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * 1.5, head.name))
    onnx.save(proto, str(other))
    expected = OnnxModel(other, device="cpu", external_weights=False).run(random_inputs(2, seed=1))
    real = runtime_model.external_weights_graph

    def then_replaced(path):
        graph = real(path)
        os.replace(shutil.copy(other, tmp_path / "incoming.onnx"), model_copy)
        return graph

    monkeypatch.setattr(runtime_model, "external_weights_graph", then_replaced)
    model = OnnxModel(model_copy, device="cpu")
    assert model.weights == "parsed"
    np.testing.assert_array_equal(model.run(random_inputs(2, seed=1)), expected)


@pytest.mark.parametrize("content", [b"", b"\xff" * 64, b"\x3a\xff\xff\xff\xff\x0f" + b"\x00" * 16])
def test_a_file_that_is_no_model_fails_as_before_with_onnxruntimes_own_error(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="onnxruntime cannot load it"):
        OnnxModel(path, device="cpu")
    assert header_metadata(path) == {}


def test_a_truncated_model_is_refused(model_copy, tmp_path):
    data = open(model_copy, "rb").read()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        external_weights_graph(cut)
    with pytest.raises(ModelError, match="onnxruntime cannot load it"):
        OnnxModel(cut, device="cpu")
