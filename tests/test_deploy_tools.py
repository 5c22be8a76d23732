"""Before and after a deploy: `python -m deploy check` (also run by `modal deploy`) and `python -m deploy smoke`,
and `runtime serve`'s request log, against a real `runtime serve` subprocess on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from model_edits import edit_metadata
from serving import Server

from deploy import __main__ as deploy_cli
from deploy import checks

REPO = Path(__file__).resolve().parents[1]
CLIPS = sorted((REPO / "convert" / "clips").glob("*.flac"))


@pytest.fixture(scope="module")
def variants(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny model as each kind of file the check must tell apart (only the metadata differs).

    The tiny checkpoint is a demo one (never trained), so every file but "demo" is marked as trained here."""
    d = tmp_path_factory.mktemp("variants")

    def as_(name, edit):
        def trained_then(doc):
            doc["source"].update(demo=False)
            edit(doc)

        return edit_metadata(tiny_model, d / f"{name}.onnx", trained_then)

    return {
        "fp32": as_("fp32", lambda doc: None),
        "int8": as_("int8", lambda doc: doc.update(precision="int8")),
        "fp16": as_("fp16", lambda doc: doc.update(precision="fp16")),
        "demo": as_("demo", lambda doc: doc["source"].update(demo=True)),
        "ungated": as_("ungated", lambda doc: doc["parity"].update(passed=False)),
    }


def test_check_refuses_with_one_line_each(variants, tmp_path):
    assert checks.problems(variants["fp32"], "gpu") == [] and checks.problems(variants["fp32"], "cpu") == []
    assert checks.problems(variants["fp16"], "gpu") == [] and checks.problems(variants["int8"], "cpu") == []
    refusals = {
        ("int8", "gpu"): "is the int8 model, the variant for CPUs",
        ("fp16", "cpu"): "is the fp16 model, the variant for GPUs",
        ("demo", "gpu"): "is a DEMO model",
        ("ungated", "cpu"): "export parity gate did not pass",
    }
    for (name, target), said in refusals.items():
        found = checks.problems(variants[name], target)
        assert len(found) == 1 and said in found[0] and "\n" not in found[0], (name, target, found)
    assert checks.problems(variants["demo"], "gpu", allow_demo=True) == []
    missing = checks.problems(tmp_path / "absent.onnx", "gpu")
    assert len(missing) == 1 and missing[0].startswith("model file not found")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert len(checks.problems(tmp_path / "junk.onnx", "cpu")) == 1


def test_check_cli_exit_codes(variants, capsys):
    assert deploy_cli.main(["check", "--target", "gpu", "--model", str(variants["int8"])]) == 1
    assert capsys.readouterr().err.startswith("refused: ")
    assert deploy_cli.main(["check", "--target", "cpu", "--model", str(variants["int8"])]) == 0
    assert capsys.readouterr().out.startswith("ok (cpu): ")


def test_the_gpu_default_is_the_recommended_gpu_artifact_never_int8(variants, tmp_path):
    import shutil

    shutil.copy(variants["int8"], tmp_path / "model.onnx")  # what `--quantize auto` leaves at the old default
    assert checks.default_model("gpu", tmp_path).name == "model-audio.fp16.onnx"  # absent: the check says so
    assert checks.default_model("cpu", tmp_path).name == "model.onnx"
    shutil.copy(variants["fp16"], tmp_path / "model.fp16.onnx")
    assert checks.default_model("gpu", tmp_path).name == "model.fp16.onnx"
    shutil.copy(variants["fp16"], tmp_path / "model-audio.fp16.onnx")  # the waveform-in model comes first
    assert checks.default_model("gpu", tmp_path).name == "model-audio.fp16.onnx"
    assert all("int8" not in n and n != "model.onnx" for n in checks.DEFAULTS["gpu"])


def modal_deploy_import(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Import the app file as `modal deploy deploy/modal_app.py` does (argv as the modal CLI sets it)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "PERCEPIANO_"))}
    clean.update(HOME=str(tmp_path), MODAL_CONFIG_PATH=str(tmp_path / "none.toml"), **env)
    code = "import sys; sys.argv = ['modal', 'deploy', 'deploy/modal_app.py']; import deploy.modal_app"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean, capture_output=True, text=True,
                          timeout=120)


def test_modal_deploy_runs_the_check_when_it_imports_the_app_file(variants, tmp_path):
    refused = modal_deploy_import({"PERCEPIANO_MODEL": str(variants["int8"])}, tmp_path)
    assert refused.returncode == 1 and "deploy check (gpu) refused" in refused.stderr
    assert "is the int8 model, the variant for CPUs" in refused.stderr
    cpu = modal_deploy_import({"PERCEPIANO_MODEL": str(variants["fp16"]), "PERCEPIANO_MODAL_TARGET": "cpu"}, tmp_path)
    assert cpu.returncode == 1 and "is the fp16 model, the variant for GPUs" in cpu.stderr
    demo = {"PERCEPIANO_MODEL": str(variants["demo"])}
    assert "is a DEMO model" in modal_deploy_import(demo, tmp_path).stderr
    assert modal_deploy_import({**demo, "PERCEPIANO_DEPLOY_ALLOW_DEMO": "1"}, tmp_path).returncode == 0
    assert modal_deploy_import({"PERCEPIANO_MODEL": str(variants["fp32"])}, tmp_path).returncode == 0


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """Another tiny model (seed 1): other weights, another version."""
    from convert.demo import make_demo_checkpoint
    from convert.export import export
    from convert.options import ExportOptions

    d = tmp_path_factory.mktemp("other")
    return export(make_demo_checkpoint(d / "tiny1.pkl", preset="tiny", seed=1), d / "tiny1.onnx",
                  ExportOptions(preoptimize="none")).path


@pytest.fixture(scope="module")
def served(tiny_model):
    server = Server(tiny_model, {"PERCEPIANO_API_TOKEN": "smoke-token"})
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.mark.slow  # an export of its own and a real server
def test_smoke_passes_on_the_same_model_and_fails_on_another(served, tiny_model, other_model, capsys):
    args = [served.url, "--token", "smoke-token", "--repeat", "2", "--json"]
    assert deploy_cli.main(["smoke", *args, "--model", str(tiny_model)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and set(report["clips"]) == {c.name for c in CLIPS}
    assert len(report["latencies_s"]) == 2 * len(CLIPS) and all(t > 0 for t in report["latencies_s"])
    assert report["served"]["providers"] == ["CPUExecutionProvider"] and report["atol"] == 1e-4
    assert max(report["clips"].values()) <= 1e-6  # the same file on the same CPU

    assert deploy_cli.main(["smoke", *args, "--model", str(other_model)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["passed"] and any("the service serves" in p for p in report["problems"])
    assert any("scores differ by" in p for p in report["problems"])


def test_smoke_says_when_the_service_refuses_or_is_not_there(served, tiny_model, capsys):
    assert deploy_cli.main(["smoke", served.url, "--model", str(tiny_model), "--token", "wrong"]) == 2
    assert "HTTP 401" in capsys.readouterr().err
    assert deploy_cli.main(["smoke", "http://127.0.0.1:9", "--model", str(tiny_model), "--token", "x"]) == 2


def test_runtime_serve_logs_every_request_by_default_and_the_setting_silences_it(tiny_model):
    import httpx

    for env, expected in (({}, 1), ({"PERCEPIANO_REQUEST_LOG": "0"}, 0)):
        server = Server(tiny_model, env)
        try:
            server.wait_ready()
            res = httpx.post(server.url + "/v1/analyze", content=CLIPS[0].read_bytes(), timeout=60,
                             headers={"content-type": "audio/flac"})
            assert res.status_code == 200, res.text
        finally:
            server.stop()
        lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
        analyze = [line for line in lines if line["route"] == "/v1/analyze"]
        assert len(analyze) == expected, server.output()
        if analyze:
            assert analyze[0]["status"] == 200 and analyze[0]["audio_seconds"] > 14


def test_serve_q_turns_the_request_log_off(tiny_model, monkeypatch):
    import runtime.serve.app
    from runtime import cli

    got = []
    monkeypatch.setattr(runtime.serve.app, "serve", lambda analyzer, **kw: got.append(kw["settings"]))
    assert cli.main(["serve", "--model", str(tiny_model), "--device", "cpu"]) == 0
    assert cli.main(["-q", "serve", "--model", str(tiny_model), "--device", "cpu"]) == 0
    assert [s.request_log for s in got] == [True, False]
