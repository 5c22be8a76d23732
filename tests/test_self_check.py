"""The self-check at load (issue 10 item 5) and the demo mark (item 1): refused, reported, and warned about."""

from __future__ import annotations

import base64
import json
import logging

import numpy as np
import pytest
from model_edits import edit_metadata, reference_windows, with_self_check, without_self_check

from convert.metadata import encode_self_check
from runtime import cli
from runtime.analyze import Analyzer
from runtime.errors import ModelError
from runtime.model import OnnxModel
from runtime.self_check import parse_section, require_passed

TAMPER = 0.01  # score units added to one stored score: far beyond the fp32 tolerance, a plausible int8-kernel error


@pytest.fixture(scope="module")
def references(tiny_checkpoint, piano_clips):
    clip = min(piano_clips, key=lambda p: p.stat().st_size)
    return clip, *reference_windows(tiny_checkpoint, clip)


@pytest.fixture(scope="module")
def checked_model(tiny_model, references, tmp_path_factory):
    clip, mel, scores = references
    return with_self_check(tiny_model, tmp_path_factory.mktemp("sc") / "checked.onnx", mel, scores, clip=clip.name)


@pytest.fixture(scope="module")
def tampered_model(tiny_model, references, tmp_path_factory):
    clip, mel, scores = references
    bad = scores.copy()
    bad[1, 7] += TAMPER
    return with_self_check(tiny_model, tmp_path_factory.mktemp("sc") / "tampered.onnx", mel, bad, clip=clip.name)


def test_true_outputs_pass_and_the_figure_is_logged(checked_model, caplog):
    model = OnnxModel(checked_model, device="cpu")
    with caplog.at_level(logging.INFO, logger="runtime.self_check"):
        result = model.run_self_check()
    assert result.status == "passed" and result.passed is True
    assert result.device == "cpu" and result.windows == 2 and result.atol == 1e-5
    assert 0 <= result.max_abs <= 1e-5
    assert "self-check passed on cpu" in caplog.text and "max abs" in caplog.text
    require_passed(result)  # does not raise


def test_tampered_outputs_are_refused(tampered_model):
    result = OnnxModel(tampered_model, device="cpu").run_self_check()
    assert result.status == "failed" and result.passed is False
    assert result.max_abs == pytest.approx(TAMPER, abs=1e-5)
    with pytest.raises(ModelError, match="self-check FAILED on cpu.*--skip-self-check"):
        require_passed(result)


def test_cli_analyze_refuses_a_tampered_model_unless_told(tampered_model, checked_model, piano_clips, capsys):
    clip = str(piano_clips[0])
    assert cli.main(["analyze", clip, "--model", str(tampered_model), "--device", "cpu"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if " is a DEMO model " not in line]  # tiny: a demo
    assert len(err) == 1 and err[0].startswith("error: self-check FAILED")
    assert cli.main(["analyze", clip, "--model", str(tampered_model), "--device", "cpu", "--skip-self-check",
                     "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"]["self_check"]["status"] == "failed"
    assert cli.main(["analyze", clip, "--model", str(checked_model), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["self_check"]["status"] == "passed"


def test_the_self_check_replaces_the_plain_warm_up_run(checked_model, tiny_model, tmp_path, monkeypatch):
    from runtime.serve.app import warm_up

    shapes: list[tuple] = []
    real_run = OnnxModel.run
    monkeypatch.setattr(OnnxModel, "run", lambda self, mel: shapes.append(mel.shape[0]) or real_run(self, mel))
    warm_up(Analyzer.from_path(checked_model, device="cpu", batch_size=8))
    with_section = list(shapes)
    shapes.clear()
    warm_up(Analyzer.from_path(without_self_check(tiny_model, tmp_path / "old.onnx"), device="cpu", batch_size=8))
    # the stored windows are the batch-2 run: no run of their own, the same shapes with or without them
    assert with_section == shapes == [2, 8, 1]


def test_a_model_without_the_section_reports_absent(tiny_model, tmp_path):
    model = OnnxModel(without_self_check(tiny_model, tmp_path / "old.onnx"), device="cpu")
    result = model.run_self_check()
    assert (result.status, result.passed, result.max_abs) == ("absent", None, None)
    require_passed(result)


def test_service_refuses_a_tampered_model_and_reports_a_good_one(tampered_model, checked_model):
    from fastapi.testclient import TestClient
    from serving import assert_error, wait_ready

    from runtime.serve.app import Settings, create_app

    with TestClient(create_app(tampered_model, settings=Settings(queue_timeout=10))) as c:
        body = assert_error(c.get("/v1/model"), 503, "model_failed")  # waits for the load, then says why
        assert "self-check FAILED" in body["error"]
    with TestClient(create_app(tampered_model, settings=Settings(allow_failed_self_check=True))) as c:
        assert wait_ready(c)["self_check"]["status"] == "failed"  # served anyway, and says so
    with TestClient(create_app(checked_model, settings=Settings())) as c:
        ready = wait_ready(c)
        check = ready["self_check"]
        assert check["status"] == "passed" and check["passed"] is True and check["device"] == "cpu"
        assert check["max_abs"] <= check["atol"] == 1e-5
        assert ready["providers"] == ["CPUExecutionProvider"]
        assert c.get("/v1/model").json()["self_check"] == check


def test_malformed_sections_are_refused_before_running(references):
    _, mel, scores = references
    good = encode_self_check(mel, scores, 1e-5, ["a#0", "a#1"])
    ref = parse_section(good)
    np.testing.assert_array_equal(ref.inputs, mel)
    np.testing.assert_array_equal(ref.scores, scores)
    short = {**good, "inputs": {**good["inputs"], "base64": base64.b64encode(b"\0" * 12).decode()}}
    nan = {**good, "inputs": encode_self_check(np.where(mel == mel.max(), np.nan, mel), scores, 1e-5, [])["inputs"]}
    cases = [
        ({**good, "scores": scores[:1].tolist()}, "scores must be 2 rows"),
        ({**good, "atol": -1}, "atol must be a positive"),
        ({**good, "inputs": {**good["inputs"], "shape": [2, 64, 128]}}, r"\(n, 128, 128\)"),
        ({**good, "inputs": {**good["inputs"], "shape": [10_000, 128, 128]}}, "10000 windows"),
        (short, "bytes of inputs"),
        (nan, "NaN or infinite"),
        ({**good, "inputs": {**good["inputs"], "base64": "not base64!"}}, "malformed"),
        ({"scores": []}, "malformed"),
    ]
    for section, message in cases:
        with pytest.raises(ModelError, match=message):
            parse_section(section)


# --------------------------------------------------------------------------------------------- demo mark


@pytest.fixture(scope="module")
def demo_model(tiny_model, tmp_path_factory):
    return edit_metadata(tiny_model, tmp_path_factory.mktemp("demo") / "demo.onnx",
                         lambda doc: doc["source"].update(demo=True))


def test_demo_model_warned_about_once_and_flagged(demo_model, tiny_model, piano_clips, capsys):
    assert cli.main(["info", str(demo_model), "--json"]) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert doc["source"]["demo"] is True and doc["runtime"]["demo"] is True
    assert out.err.count("DEMO model") == 1 and "scores mean nothing" in out.err
    assert cli.main(["analyze", str(piano_clips[0]), "--model", str(demo_model), "--device", "cpu"]) == 0
    assert capsys.readouterr().err.count("DEMO model") == 1
    plain = edit_metadata(tiny_model, demo_model.with_name("plain.onnx"), lambda doc: doc["source"].pop("demo", None))
    assert cli.main(["info", str(plain), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["runtime"]["demo"] is False and "DEMO" not in out.err


def test_serve_warns_about_a_demo_model_in_one_start_up_line(demo_model, tiny_model, monkeypatch, capsys, caplog):
    import runtime.serve.app

    served = []
    monkeypatch.setattr(runtime.serve.app, "serve", lambda analyzer, **kw: served.append(analyzer))
    with caplog.at_level(logging.WARNING, logger="runtime"):
        assert cli.main(["serve", "--model", str(demo_model), "--device", "cpu"]) == 0
    lines = [r.getMessage() for r in caplog.records] + capsys.readouterr().err.splitlines()
    assert [line for line in lines if "DEMO model" in line] == [
        "serving a DEMO model (exported from a checkpoint that was never trained to the end): its scores mean nothing"]
    assert served[0].model.warmed and served[0].model.self_check is not None  # warmed before serving
    plain = edit_metadata(tiny_model, demo_model.with_name("trained.onnx"), lambda doc: doc["source"].pop("demo"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runtime"):
        assert cli.main(["serve", "--model", str(plain), "--device", "cpu"]) == 0
    assert "DEMO" not in caplog.text + capsys.readouterr().err


def test_v1_model_shows_the_demo_flag_and_the_service_logs_it(demo_model, caplog):
    from fastapi.testclient import TestClient

    from runtime.serve.app import Settings, create_app

    app = create_app(demo_model, settings=Settings())
    with caplog.at_level(logging.WARNING, logger="runtime"), TestClient(app) as c:
        assert c.get("/v1/model").json()["demo"] is True  # waits for the load
    assert caplog.text.count("serving a DEMO model") == 1


def test_a_different_serving_onnxruntime_is_logged(tiny_model, tmp_path, caplog):
    other = edit_metadata(tiny_model, tmp_path / "other.onnx", lambda doc: doc["versions"].update(onnxruntime="0.1"))
    with caplog.at_level(logging.WARNING, logger="runtime.model"):
        OnnxModel(other, device="cpu")
    assert "parity gate ran on 0.1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runtime.model"):
        OnnxModel(tiny_model, device="cpu")  # exported and served with this very onnxruntime
    assert "parity gate ran on" not in caplog.text
