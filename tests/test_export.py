"""Export of the tiny preset: graph shape, metadata, dynamic batch, and a parity gate that can fail."""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter

import numpy as np
import onnx
import pytest

from convert import cli
from convert.checkpoint import load_checkpoint
from convert.errors import ParityError
from convert.export import build_forward, export, to_onnx
from convert.options import ExportOptions, VariantOptions
from convert.parity import Tolerance, format_report, random_inputs, run_gate, shipped_clips
from runtime.constants import API_KEYS, FEATURES, LABELS
from runtime.model import METADATA_KEY, OnnxModel


def _doc(path) -> dict:
    proto = onnx.load(str(path), load_external_data=False)
    return json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])


def _reuse_trace(monkeypatch, tiny_model):
    """export() with jax2onnx's trace taken from the session's tiny export (same weights; saves ~10 s)."""
    import convert.export as export_mod

    monkeypatch.setattr(export_mod, "to_onnx", lambda forward, opset=23: onnx.load(str(tiny_model)))


def test_tiny_export_passes_fp32_gate(tiny_export):
    report = tiny_export.reports["fp32"]
    checks = {c["name"]: c for c in report["checks"]}
    model = [c for n, c in checks.items() if not n.startswith("end-to-end:")]
    e2e = [c for n, c in checks.items() if n.startswith("end-to-end:")]
    assert report["passed"] and report["tolerance"] == {"model": 1e-5, "end_to_end": 1e-4}
    # the headline keeps the model-only and the whole-pipeline maxima apart, each under its own tolerance
    assert report["max_abs_model"] == report["max_abs"] == max(c["max_abs"] for c in model) < 1e-5
    assert report["max_abs_end_to_end"] == max(c["max_abs"] for c in e2e) < 1e-4
    assert report["windows"] == sum(c["rows"] for n, c in checks.items() if n.startswith("clip:")) > 2
    assert report["recordings"] == len(e2e) == len(shipped_clips())
    assert {"random:batch1", "random:batch8"} <= set(checks)
    assert all(len(c["per_dimension"]) == 19 for c in report["checks"])


def test_report_says_where_the_gate_ran(tiny_export):
    import onnxruntime as ort

    from runtime.platform_info import cpu_info

    where = tiny_export.reports["fp32"]["platform"]
    assert where["providers"] == ["CPUExecutionProvider"] and where["onnxruntime"] == ort.__version__
    assert where["cpu"] == cpu_info()
    assert "ran on: CPUExecutionProvider, onnxruntime" in format_report(tiny_export.reports["fp32"])


def test_headline_counts_flips_per_window_and_per_recording():
    from convert.parity import compare, headline

    ref = np.full((4, 19), 0.6)
    got = ref.copy()
    got[0, 0], got[1, 5] = 0.49, 0.71  # two windows cross a colour threshold
    checks = [compare("clip:a.flac", ref, got, 0.2), compare("random:batch1", ref[:1], ref[:1] + 0.001, 0.2),
              compare("end-to-end:a.flac", ref[:1], got[:1], 0.3)]
    head = headline(checks)
    assert head["threshold_flips_windows"] == 2 and head["threshold_flips_recordings"] == 1
    assert head["max_abs_model"] == pytest.approx(0.11) and head["max_abs_end_to_end"] == pytest.approx(0.11)
    assert head["windows"] == 4 and head["recordings"] == 1


@pytest.mark.parametrize("clips", [[], ["/nonexistent/*.flac"]])
def test_gate_refuses_an_empty_or_missing_clip_set(clips, tiny_checkpoint, tmp_path):
    with pytest.raises(ParityError, match="clips"):
        export(tiny_checkpoint, tmp_path / "m.onnx", ExportOptions(clips=clips))
    assert list(tmp_path.iterdir()) == []


def test_gate_refuses_when_the_shipped_clips_are_gone(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import convert.parity as parity

    monkeypatch.setattr(parity, "CLIPS_DIR", tmp_path / "empty")
    out = tmp_path / "m.onnx"
    for argv in (["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out)],
                 ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--clips", str(tmp_path / "x*")]):
        assert cli.main(["-q", *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "clips" in err and len(err.splitlines()) == 1
    with pytest.raises(ParityError, match="no real audio clips"):
        run_gate(lambda m: m, None, references=[])
    assert not out.exists()


def test_demo_checkpoint_invents_no_results_and_says_it_is_untrained(tiny_checkpoint, tiny_raw, tiny_export):
    assert tiny_raw["training_complete"] is False and tiny_raw["finetuning_results"] is None  # its own fields
    assert load_checkpoint(tiny_checkpoint).finetuning_results is None
    source = _doc(tiny_export.path)["source"]
    assert source["finetuning_results"] is None
    assert source["demo"] is True and tiny_export.demo  # exported by path: the checkpoint's fields say it


@pytest.mark.slow  # an export of its own
def test_export_without_checkpoint_marks_the_model_a_demo(tiny_model, tmp_path, monkeypatch):
    import convert.demo as demo

    real = demo.make_demo_checkpoint
    monkeypatch.setattr(demo, "make_demo_checkpoint", lambda path, preset, seed: real(path, "tiny", seed))
    _reuse_trace(monkeypatch, tiny_model)
    result = export(None, tmp_path / "demo.onnx")
    source = _doc(result.path)["source"]
    assert result.demo and source["demo"] is True and source["finetuning_results"] is None


RESULTS = {"best_val_correlation": 0.6123, "total_epochs": 41, "convergence_achieved": True}


@pytest.mark.slow  # an export of its own
@pytest.mark.parametrize(("training_complete", "results", "demo"), [
    (False, RESULTS, True),  # stopped early, results or not: untrained
    (True, None, True),  # no fine-tuning results: nothing says it was trained
    (True, RESULTS, False),  # the original's final checkpoint (docs/spec.md §2): a real model
], ids=["incomplete", "no-results", "trained"])
def test_checkpoint_exported_by_path_is_a_demo_unless_its_fields_say_trained(
        training_complete, results, demo, tiny_raw, tiny_model, tmp_path, monkeypatch):
    import pickle

    ckpt = {**tiny_raw, "training_complete": training_complete, "finetuning_results": results}
    path = tmp_path / "final_finetuned_model.pkl"  # the original format, exported by path with no demo flag
    path.write_bytes(pickle.dumps(ckpt))  # our own demo file: trusted, so plain pickle is fine here
    _reuse_trace(monkeypatch, tiny_model)  # same weights, so the same trace
    result = export(path, tmp_path / "m.onnx")
    source = _doc(result.path)["source"]
    assert source["demo"] is demo and result.demo is demo
    assert source["finetuning_results"] == results  # carried over unchanged
    assert OnnxModel(result.path, device="cpu").info.demo is demo  # what info, analyze and serve read


def test_self_check_holds_real_windows_and_jax_scores(tiny_export, tiny_checkpoint):
    from convert.reference import reference_features

    check = _doc(tiny_export.path)["self_check"]
    assert set(check) == {"inputs", "scores", "atol", "clips"}
    assert check["inputs"]["dtype"] == "float32" and check["inputs"]["shape"] == [2, 128, 128]
    raw = base64.b64decode(check["inputs"]["base64"])
    mel = np.frombuffer(raw, "<f4").reshape(check["inputs"]["shape"])
    expected = []
    for label in check["clips"]:  # "<clip name>#<chunk index>": the windows are those of the gate's clips
        name, index = label.rsplit("#", 1)
        clip = next(c for c in shipped_clips() if c.name == name)
        expected.append(reference_features(clip)[int(index)])
    np.testing.assert_array_equal(mel, np.stack(expected))
    assert len(set(check["clips"])) == 2 and mel.std() > 1.0  # two different windows of real audio, not silence
    scores = np.asarray(check["scores"])
    assert scores.shape == (2, 19) and check["atol"] == tiny_export.reports["fp32"]["tolerance"]["model"]
    forward = build_forward(load_checkpoint(tiny_checkpoint))
    np.testing.assert_allclose(scores, np.asarray(forward(mel)), atol=1e-6, rtol=0)
    got = OnnxModel(tiny_export.path, device="cpu").run(mel)
    assert np.abs(got - scores).max() <= check["atol"]
    assert np.abs(got[::-1] - scores).max() > check["atol"]  # the windows differ enough that a swap is caught


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


@pytest.mark.slow  # an export of its own
def test_gate_fails_on_perturbed_weight(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    reference = build_forward(ckpt)
    kernel = np.array(ckpt.params["regression_output"]["kernel"])
    kernel[0, 3] += 0.05  # one weight of one output dimension
    ckpt.params["regression_output"]["kernel"] = kernel
    perturbed = to_onnx(build_forward(ckpt))
    from convert.metadata import describe, set_metadata

    set_metadata(perturbed, describe(ckpt, "fp32"))
    model = OnnxModel(perturbed.SerializeToString(), device="cpu")
    with pytest.raises(ParityError) as err:
        run_gate(reference, model, shipped_clips()[:1], Tolerance.for_precision("fp32"))
    report = err.value.report
    assert not report["passed"]
    worst = report["checks"][0]["per_dimension"]
    assert max(worst, key=lambda k: worst[k]["max_abs"]) == API_KEYS[3]


@pytest.mark.slow  # an export of its own
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


def test_cli_builds_the_options_export_takes(tmp_path, monkeypatch):
    import dataclasses

    import convert.export as export_mod

    seen = []

    def fake(checkpoint, out, options, variants):
        seen.append((checkpoint, out, options, variants))
        raise ParityError("stop here")  # a user error: the CLI prints it and exits 1

    monkeypatch.setattr(export_mod, "export", fake)
    clip = tmp_path / "a.flac"
    argv = ["-q", "export", "--checkpoint", "c.pkl", "--out", str(tmp_path / "m.onnx"), "--opset", "21",
            "--backend", "tf2onnx", "--atol", "2e-5", "--clips", str(clip), "--seed", "7", "--quantize", "auto",
            "--int8-atol", "0.01", "--fp16-atol", "0.02", "--per-channel", "--no-reduce-range", "--optimize",
            "--allow-partial"]
    assert cli.main(argv) == 1
    (checkpoint, out, options, variants), = seen
    assert (str(checkpoint), out) == ("c.pkl", tmp_path / "m.onnx")
    assert options == ExportOptions(opset=21, backend="tf2onnx", atol=2e-5, clips=(clip,), seed=7)
    assert variants == VariantOptions(quantize="auto", int8_atol=0.01, fp16_atol=0.02, per_channel=True,
                                      reduce_range=False, optimize=True, allow_partial=True)
    seen.clear()
    assert cli.main(["-q", "export", "--checkpoint", "c.pkl", "--out", str(tmp_path / "m.onnx")]) == 1
    assert seen[0][2:] == (ExportOptions(), VariantOptions())  # the CLI's defaults are the options' defaults
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.seed = 1


@pytest.mark.parametrize(("options", "kwargs"), [
    (ExportOptions, {"backend": "onnxmltools"}), (ExportOptions, {"preoptimize": "all"}),
    (VariantOptions, {"quantize": "int4"}),
])
def test_options_refuse_an_unknown_choice(options, kwargs):
    (name, value), = kwargs.items()
    with pytest.raises(ValueError, match=f"unknown {name} '{value}'; choose one of"):
        options(**kwargs)
