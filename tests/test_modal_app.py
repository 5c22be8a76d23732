"""The Modal shell: imports without credentials, declares what the deployment needs, and runs plain runtime code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

modal = pytest.importorskip("modal")
pytest.importorskip("fastapi")

from modal_recording import fresh_import, options  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKEN = "modal-test-token"


@pytest.mark.parametrize(("switches", "printed"), [
    ({}, ["percepiano", "A10G", "False"]),
    ({"PERCEPIANO_MODAL_TARGET": "cpu"}, ["percepiano-cpu", "None", "True"]),
    ({"PERCEPIANO_GPU_SNAPSHOT": "1"}, ["percepiano", "A10G", "True"]),
])
def test_imports_without_credentials_or_model(tmp_path, switches, printed):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "PERCEPIANO_"))}
    env.update(HOME=str(tmp_path), MODAL_CONFIG_PATH=str(tmp_path / "none.toml"),
               PERCEPIANO_MODEL=str(tmp_path / "absent.onnx"), **switches)
    code = "import deploy.modal_app as m; print(m.app.name, m.GPU, m.SESSION_IN_SNAPSHOT)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == printed


def test_modal_configuration(recorded):
    m, calls = recorded
    for name in ("Service", "CorpusWorker"):
        opts = options(calls, "cls", name)
        assert opts["gpu"] == "A10G"
        assert opts["enable_memory_snapshot"] is True
        assert 30 <= opts["scaledown_window"] <= 600
        assert opts["image"] is m.image
    web = options(calls, "cls", "Service")
    assert web["secrets"] == [m.api_secret]  # bearer token from the Modal secret
    assert options(calls, "concurrent", "Service") == m.WEB_CONCURRENCY
    assert list(options(calls, "cls", "CorpusWorker")["volumes"].values()) == [m.audio_volume]
    # lifecycle: imports + model bytes before the snapshot, the CUDA session after restore
    assert options(calls, "enter", "load") == {"snap": True}
    assert options(calls, "enter", "start") == {"snap": False}
    assert ("asgi_app", "web", {}) in calls
    assert ("method", "analyze_file", {}) in calls
    assert ("method", "analyze_bytes", {}) in calls
    corpus = options(calls, "function", "analyze_corpus")
    assert list(corpus["volumes"].values()) == [m.audio_volume] and "gpu" not in corpus
    assert m.SERVICE_ENV["PERCEPIANO_DEVICE"] == "cuda"


def test_deploy_looks_up_the_deployed_corpus_worker_by_its_names(recorded):
    from deploy import modal_corpus as corpus

    m, calls = recorded
    assert corpus.MODAL_APP == m.APP_NAME
    assert options(calls, "cls", corpus.MODAL_WORKER)["volumes"]  # the class `python -m deploy analyze` looks up exists


def test_only_current_modal_api_names():
    source = (REPO / "deploy" / "modal_app.py").read_text()
    for legacy in ("Stub(", "keep_warm", "container_idle_timeout", "web_endpoint", "allow_concurrent_inputs",
                   "concurrency_limit", "@modal.build", "Mount."):
        assert legacy not in source, legacy
    assert ".map(" in source  # the corpus fans out over parallel containers


@pytest.fixture
def container(monkeypatch, tiny_model):
    """A ModelContainer run outside Modal: the hooks are plain methods over the runtime."""
    monkeypatch.setenv("PERCEPIANO_MODEL_PATH", str(tiny_model))
    monkeypatch.setenv("PERCEPIANO_DEVICE", "cpu")
    monkeypatch.setenv("PERCEPIANO_API_TOKEN", TOKEN)
    m = fresh_import()
    obj = m.ModelContainer()
    obj.load()
    assert obj.model_bytes == Path(tiny_model).read_bytes()
    obj.start()
    assert obj.model_bytes == b"" and obj.analyzer.model.device == "cpu"
    return m, obj


def test_lifecycle_serves_the_same_app(container, piano_clips):
    from fastapi.testclient import TestClient

    m, obj = container
    clip = min(piano_clips, key=lambda p: p.stat().st_size)
    expected = obj.analyzer.analyze_file(clip).scores
    with TestClient(obj.build_app()) as c:  # the request that woke the container: no /readyz polling first
        data = clip.read_bytes()
        assert c.post("/v1/analyze", content=data, headers={"content-type": "audio/flac"}).status_code == 401
        res = c.post("/v1/analyze", content=data, headers={"content-type": "audio/flac",
                                                           "authorization": f"Bearer {TOKEN}"})
        assert res.status_code == 200, res.json()
        np.testing.assert_allclose(list(res.json()["scores"].values()), list(expected.values()), atol=1e-6)
        assert obj.analyzer.model.self_check is not None  # start()'s warm-up was the self-check
        assert c.get("/readyz").json()["self_check"] == obj.analyzer.model.self_check.to_dict()
        assert c.app.state.service._loader is None  # start() warmed it: the app does not warm it again


def test_int8_is_refused_on_cuda_and_the_gpu_wheel_pinned():
    from types import SimpleNamespace

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    from deploy.checks import refuse_int8_on_cuda

    m = fresh_import()
    recommended = {"recommended": {"cpu": "int8", "gpu": "fp16"}}
    with pytest.raises(ValueError, match="int8 model.*model.fp16.onnx"):
        refuse_int8_on_cuda(SimpleNamespace(device="cuda", info=SimpleNamespace(precision="int8",
                                                                               variants=recommended)))
    for device, precision in (("cuda", "fp16"), ("cuda", "fp32"), ("cpu", "int8")):
        refuse_int8_on_cuda(SimpleNamespace(device=device, info=SimpleNamespace(precision=precision, variants={})))
    # the image's exact pin meets the gpu extra's floor and is no newer than the onnxruntime the gate ran with
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    gpu_floor = next(d for d in extras["gpu"] if d.startswith("onnxruntime-gpu")).split("]", 1)[1]
    gate = next(d for d in extras["convert"] if d.startswith("onnxruntime==")).split("==")[1]
    pinned = Version(m.ONNXRUNTIME_GPU)
    assert pinned in SpecifierSet(gpu_floor) and pinned <= Version(gate)


def test_build_app_refuses_to_run_without_a_token(container, monkeypatch):
    _, obj = container
    monkeypatch.delenv("PERCEPIANO_API_TOKEN")
    with pytest.raises(ValueError, match="PERCEPIANO_API_TOKEN"):
        obj.build_app()


def test_corpus_run_over_a_volume_tree(container, piano_clips, tmp_path, monkeypatch):
    m, obj = container
    monkeypatch.setattr(m, "AUDIO_MOUNT", str(tmp_path))
    clips = sorted(piano_clips, key=lambda p: p.stat().st_size)[:2]
    (tmp_path / "set" / "a").mkdir(parents=True)
    for clip in clips:
        shutil.copy(clip, tmp_path / "set" / "a" / clip.name)
    (tmp_path / "set" / "broken.wav").write_bytes(b"not audio")
    (tmp_path / "set" / "notes.txt").write_text("ignored")
    (tmp_path / "other.flac").write_bytes(clips[0].read_bytes())  # outside the prefix
    assert m.list_audio(tmp_path, "set") == sorted(["set/a/" + c.name for c in clips] + ["set/broken.wav"])

    mapped: list[list[str]] = []

    def analyze_many(files):  # stands in for CorpusWorker().analyze_file.map(files)
        mapped.append(files)
        return map(obj.analyze_path, files)

    summary = m.run_corpus(tmp_path, "set", "results/scores.jsonl", analyze_many)
    assert summary == {"files": 3, "failed": 1, "output": "results/scores.jsonl"}
    lines = [json.loads(line) for line in (tmp_path / "results" / "scores.jsonl").read_text().splitlines()]
    by_file = {r["file"]: r for r in lines}
    assert by_file["set/broken.wav"]["error"]
    for clip in clips:
        result = by_file["set/a/" + clip.name]
        assert result["error"] is None and result["model"] == obj.analyzer.model.info.summary()
        np.testing.assert_allclose(list(result["scores"].values()),
                                   list(obj.analyzer.analyze_file(clip).scores.values()), atol=1e-6)


def user_worker(m):
    """The CorpusWorker class as written (Modal keeps it; its methods are plain functions)."""
    get = getattr(m.CorpusWorker, "_get_user_cls", None)
    if get is None:
        pytest.skip("this Modal version does not expose the user class")
    worker = get()()
    worker.load()
    worker.start()
    return worker


def test_corpus_worker_names_every_result_and_never_raises(container, piano_clips, monkeypatch):
    m, obj = container
    worker = user_worker(m)
    clip = min(piano_clips, key=lambda p: p.stat().st_size)
    good = worker.analyze_bytes("set/take.flac", clip.read_bytes(), None)
    assert good["file"] == "set/take.flac" and good["error"] is None
    assert good["scores"] == obj.analyzer.analyze_file(clip).scores
    assert good["model"] == obj.analyzer.model.info.summary()
    bad = worker.analyze_bytes("set/bad.wav", b"not audio", None)
    assert bad["file"] == "set/bad.wav" and bad["error"].startswith("set/bad.wav: ") and "retry" not in bad

    def explode(source):
        raise RuntimeError("CUDA failure")

    monkeypatch.setattr(worker.analyzer, "prepare_file", explode)
    for result in (worker.analyze_bytes("set/x.flac", clip.read_bytes(), None), worker.analyze_file("set/x.flac")):
        assert result["file"] == "set/x.flac" and result["scores"] is None
        assert result["error"] == "set/x.flac: RuntimeError: CUDA failure" and result["retry"] is True


def test_volume_corpus_run_never_loses_a_file(container, piano_clips, tmp_path, monkeypatch):
    m, obj = container
    monkeypatch.setattr(m, "AUDIO_MOUNT", str(tmp_path))
    clips = sorted(piano_clips, key=lambda p: p.stat().st_size)[:2]
    for clip in clips:
        shutil.copy(clip, tmp_path / clip.name)

    def analyze_many(files):  # the first file's container died: map returned an exception, not a result
        return [RuntimeError("container exited"), *map(obj.analyze_path, files[1:])]

    summary = m.run_corpus(tmp_path, "", "scores.jsonl", analyze_many)
    assert summary == {"files": 2, "failed": 1, "output": "scores.jsonl"}
    lines = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert sorted(r["file"] for r in lines) == sorted(c.name for c in clips)
    lost = next(r for r in lines if r["file"] == min(c.name for c in clips))  # list_audio's first file
    assert lost["error"] == "no result from the worker (RuntimeError: container exited)"


def test_a_failed_self_check_stops_the_container(monkeypatch, tiny_model, tiny_checkpoint, piano_clips, tmp_path):
    from model_edits import reference_windows, with_self_check

    from runtime.errors import ModelError

    mel, scores = reference_windows(tiny_checkpoint, piano_clips[0])
    scores[0, 3] += 0.01  # stored outputs the model on this device does not reproduce
    bad = with_self_check(tiny_model, tmp_path / "tampered.onnx", mel, scores)
    monkeypatch.setenv("PERCEPIANO_MODEL_PATH", str(bad))
    monkeypatch.setenv("PERCEPIANO_DEVICE", "cpu")
    m = fresh_import()
    obj = m.ModelContainer()
    obj.load()
    with pytest.raises(ModelError, match="self-check FAILED on cpu"):
        obj.start()
    monkeypatch.setenv("PERCEPIANO_ALLOW_FAILED_SELF_CHECK", "1")  # explicitly accepted: starts, and says so
    obj.load()
    obj.start()
    assert obj.analyzer.model.self_check.status == "failed"
