"""Export of the tiny preset: graph shape, metadata, dynamic batch, and a parity gate that can fail."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import onnx
import pytest

from convert import cli
from convert.checkpoint import load_checkpoint
from convert.errors import ParityError
from convert.export import build_forward, to_onnx
from convert.parity import Tolerance, random_inputs, run_gate, shipped_clips
from runtime.constants import API_KEYS, FEATURES, LABELS
from runtime.model import METADATA_KEY, OnnxModel


def test_tiny_export_passes_fp32_gate(tiny_export):
    report = tiny_export.reports["fp32"]
    assert report["passed"]
    assert report["max_abs"] < 1e-5
    names = [c["name"] for c in report["checks"]]
    assert any(n.startswith("clip:") for n in names)
    assert {"random:batch1", "random:batch8"} <= set(names)
    assert any(n.startswith("end-to-end:") for n in names)
    assert all(len(c["per_dimension"]) == 19 for c in report["checks"])


def test_published_model_is_readable_like_any_new_file(tiny_export):
    import os

    mask = os.umask(0)
    os.umask(mask)
    assert tiny_export.path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_metadata_describes_the_model(tiny_export, tiny_checkpoint):
    proto = onnx.load(str(tiny_export.path), load_external_data=False)
    doc = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    assert [d["label"] for d in doc["dimensions"]] == list(LABELS)
    assert [d["key"] for d in doc["dimensions"]] == list(API_KEYS)
    assert doc["features"] == FEATURES.to_dict()
    assert doc["source"]["sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    ckpt = load_checkpoint(tiny_checkpoint)
    np.testing.assert_allclose(doc["label_scaler"]["mean"], ckpt.scaler_mean)
    np.testing.assert_allclose(doc["label_scaler"]["scale"], ckpt.scaler_scale)
    assert doc["model_config"]["embed_dim"] == ckpt.config.embed_dim
    assert {"jax", "flax", "jax2onnx", "onnx"} <= set(doc["versions"])
    assert doc["parity"]["passed"] and doc["precision"] == "fp32"


def test_graph_uses_matmul_native_layernorm_and_tanh_gelu(tiny_export):
    graph = onnx.load(str(tiny_export.path)).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["Einsum"] == 0, "attention must export as MatMul, not Einsum"
    assert ops["MatMul"] + ops["Gemm"] >= 4 * 2 + 4
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "LayerNormalization":
            assert attrs["epsilon"] == pytest.approx(1e-6)  # not ONNX's default 1e-5
        if node.op_type == "Gelu":
            assert attrs["approximate"] == b"tanh"
    assert ops["LayerNormalization"] == 2 * 2 + 1


def test_dynamic_batch_matches_jax(tiny_export, tiny_checkpoint):
    model = OnnxModel(tiny_export.path, device="cpu")
    forward = build_forward(load_checkpoint(tiny_checkpoint))
    for batch in (1, 3, 17):
        mel = random_inputs(batch, seed=batch)
        got = model.run(mel)
        assert got.shape == (batch, 19)
        np.testing.assert_allclose(got, np.asarray(forward(mel)), atol=1e-5, rtol=0)


def test_gate_fails_on_perturbed_weight(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    reference = build_forward(ckpt)
    kernel = np.array(ckpt.params["regression_output"]["kernel"])
    kernel[0, 3] += 0.05  # one weight of one output dimension
    ckpt.params["regression_output"]["kernel"] = kernel
    perturbed = to_onnx(build_forward(ckpt))
    from convert.export import describe, set_metadata

    set_metadata(perturbed, describe(ckpt, "fp32"))
    model = OnnxModel(perturbed.SerializeToString(), device="cpu")
    with pytest.raises(ParityError) as err:
        run_gate(reference, model, shipped_clips()[:1], Tolerance.for_precision("fp32"))
    report = err.value.report
    assert not report["passed"]
    worst = report["checks"][0]["per_dimension"]
    assert max(worst, key=lambda k: worst[k]["max_abs"]) == API_KEYS[3]


def test_cli_refuses_to_publish_a_failing_model(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import convert.export as export_mod

    real_to_onnx = export_mod.to_onnx
    monkeypatch.setattr(export_mod, "to_onnx", lambda fwd, opset=23: real_to_onnx(lambda m: fwd(m) + 1e-3, opset))
    out = tmp_path / "model.onnx"
    code = cli.main(["-q", "export", "--checkpoint", str(tiny_checkpoint), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "FAIL" in err and "parity gate" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing published, no temporary left behind


@pytest.mark.parametrize("content", [b"", b"\x80\x04\x95", bytes(range(256)) * 4])
def test_cli_clear_error_on_bad_checkpoint(content, tmp_path, capsys):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(content)
    code = cli.main(["-q", "export", "--checkpoint", str(bad), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_cli_param_mismatch_is_one_line_naming_the_paths(tiny_checkpoint, tmp_path, capsys):
    import pickle

    ckpt = pickle.loads(tiny_checkpoint.read_bytes())  # our own demo file: trusted, so plain pickle is fine here
    del ckpt["params"]["params"]["final_norm"]
    bad = tmp_path / "mismatch.pkl"
    bad.write_bytes(pickle.dumps(ckpt))
    code = cli.main(["-q", "export", "--checkpoint", str(bad), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "- final_norm/scale" in err and "- final_norm/bias" in err
