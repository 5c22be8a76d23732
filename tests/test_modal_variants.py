"""The Modal file's variants, chosen at deploy time: the int8 CPU app and the GPU app's opt-in GPU snapshots."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

modal = pytest.importorskip("modal")
pytest.importorskip("fastapi")

from modal_recording import REPO, fresh_import, gate_onnxruntime, image_steps, import_recording, options  # noqa: E402

TOKEN = "modal-test-token"


def test_the_gpu_variant_pins_onnxruntime_gpu_and_snapshots_cpu_memory_only(recorded):
    m, calls = recorded
    # the lock (onnxruntime-gpu and its NVIDIA wheels pinned: tests/test_image_lock.py), no loose pip_install
    assert [s["args"] for s in image_steps(calls, "pip_install_from_requirements")] == [(str(m.GPU_LOCK),)]
    assert image_steps(calls, "pip_install") == []
    assert [s["optional_dependencies"] for s in image_steps(calls, "pip_install_from_pyproject")] == [["gpu", "serve"]]
    env = image_steps(calls, "env")[0]["args"][0]
    assert (env["PERCEPIANO_DEVICE"], env["PERCEPIANO_MODAL_TARGET"], env["PERCEPIANO_GPU_SNAPSHOT"]) == \
        ("cuda", "gpu", "0")
    for name in ("Service", "CorpusWorker"):
        opts = options(calls, "cls", name)
        assert opts["gpu"] == "A10G" and opts["enable_memory_snapshot"] is True
        assert "experimental_options" not in opts  # GPU snapshots are opt-in
        assert opts["cpu"] == m.GPU_CPU_CORES  # the CPUs that feed the GPU (tests/test_cpu_cost.py)
    assert m.SESSION_IN_SNAPSHOT is False  # the CUDA session is created after restore


def test_the_cpu_variant(monkeypatch):
    m, calls = import_recording(monkeypatch, PERCEPIANO_MODAL_TARGET="cpu")
    try:
        assert (m.TARGET, m.app.name, m.GPU) == ("cpu", "percepiano-cpu", None)  # beside the GPU app, not over it
        for name in ("Service", "CorpusWorker"):
            opts = options(calls, "cls", name)
            assert "gpu" not in opts and (opts["cpu"], opts["memory"]) == (4.0, 4096)
            assert opts["enable_memory_snapshot"] is True and "experimental_options" not in opts
            assert opts["image"] is m.image
        assert options(calls, "cls", "Service")["secrets"] == [m.api_secret]
        # the CPU wheel, at the version the gate ran with; never the GPU wheel (both own the onnxruntime module)
        assert [s["args"] for s in image_steps(calls, "pip_install")] == [(f"onnxruntime=={gate_onnxruntime()}",)]
        extras = [s["optional_dependencies"] for s in image_steps(calls, "pip_install_from_pyproject")]
        assert extras == [["runtime", "serve"]]
        assert not any("onnxruntime-gpu" in str(kw) for kind, _, kw in calls if kind == "image")
        env = image_steps(calls, "env")[0]["args"][0]
        assert env["PERCEPIANO_DEVICE"] == "cpu" and env["PERCEPIANO_THREADS"] == "4"
        # the container imports this file again: the image carries the switch so it declares the same variant
        assert (env["PERCEPIANO_MODAL_TARGET"], env["PERCEPIANO_GPU_SNAPSHOT"]) == ("cpu", "0")
        # the session is created and warmed before the snapshot; after restore it is only checked again
        assert options(calls, "enter", "load") == {"snap": True}
        assert options(calls, "enter", "start") == {"snap": False}
        assert m.SESSION_IN_SNAPSHOT is True
    finally:
        sys.modules.pop("deploy.modal_app", None)


def test_gpu_snapshots_are_an_opt_in(monkeypatch):
    m, calls = import_recording(monkeypatch, PERCEPIANO_GPU_SNAPSHOT="1")
    try:
        for name in ("Service", "CorpusWorker"):
            opts = options(calls, "cls", name)
            assert opts["gpu"] == "A10G" and opts["enable_memory_snapshot"] is True
            assert opts["experimental_options"] == {"enable_gpu_snapshot": True}
        assert [s["args"] for s in image_steps(calls, "pip_install_from_requirements")] == [(str(m.GPU_LOCK),)]
        assert m.SESSION_IN_SNAPSHOT is True and m.app.name == "percepiano"
        env = image_steps(calls, "env")[0]["args"][0]
        assert (env["PERCEPIANO_MODAL_TARGET"], env["PERCEPIANO_GPU_SNAPSHOT"]) == ("gpu", "1")
    finally:
        sys.modules.pop("deploy.modal_app", None)


@pytest.mark.parametrize("switch", [{"PERCEPIANO_MODAL_TARGET": "cpu"}, {"PERCEPIANO_GPU_SNAPSHOT": "1"}])
def test_a_session_in_the_snapshot_is_ready_after_load_and_checked_after_restore(monkeypatch, tiny_model, piano_clips,
                                                                                 switch):
    from dataclasses import replace

    from fastapi.testclient import TestClient

    from runtime.errors import ModelError

    for key, value in {**switch, "PERCEPIANO_MODEL_PATH": str(tiny_model), "PERCEPIANO_DEVICE": "cpu",
                       "PERCEPIANO_API_TOKEN": TOKEN}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PERCEPIANO_THREADS", raising=False)
    try:
        m = fresh_import()
        obj = m.ModelContainer()
        obj.load()  # before the snapshot: the session exists and is warm (its warm-up is the self-check)
        analyzer = obj.analyzer
        assert analyzer is not None and analyzer.model.warmed and obj.model_bytes == b""
        assert analyzer.model.weights == "file"  # from the baked file, weights read in place: no bytes held
        assert analyzer.model.self_check.status == "passed"
        checks = []
        real_check = analyzer.model.run_self_check
        monkeypatch.setattr(analyzer.model, "run_self_check", lambda: checks.append(1) or real_check())
        obj.start()  # after restore: the same session, its self-check run once more on this host
        assert obj.analyzer is analyzer and checks == [1]
        clip = min(piano_clips, key=lambda p: p.stat().st_size)
        with TestClient(obj.build_app()) as c:
            res = c.post("/v1/analyze", content=clip.read_bytes(), headers={"content-type": "audio/flac",
                                                                            "authorization": f"Bearer {TOKEN}"})
            assert res.status_code == 200, res.json()
            np.testing.assert_allclose(list(res.json()["scores"].values()),
                                       list(analyzer.analyze_file(clip).scores.values()), atol=1e-6)
        failed = replace(analyzer.model.self_check, status="failed", max_abs=1.0)
        monkeypatch.setattr(analyzer.model, "run_self_check", lambda: failed)  # restored on a host that differs
        with pytest.raises(ModelError, match="self-check FAILED"):
            obj.start()
    finally:
        sys.modules.pop("deploy.modal_app", None)


def test_fp16_is_refused_on_the_cpu():
    from types import SimpleNamespace

    from deploy.checks import refuse_fp16_on_cpu

    variants = {"recommended": {"cpu": "int8", "gpu": "fp16"},
                "files": {"int8": "model.onnx", "fp16": "model.fp16.onnx"}}
    hint = "PERCEPIANO_MODAL_TARGET=cpu PERCEPIANO_MODEL=artifacts/model.onnx modal deploy"
    with pytest.raises(ValueError, match=f"fp16 model, the variant for GPUs.*{hint}"):
        refuse_fp16_on_cpu(SimpleNamespace(device="cpu", info=SimpleNamespace(precision="fp16", variants=variants)))
    for device, precision in (("cpu", "int8"), ("cpu", "fp32"), ("cuda", "fp16")):
        refuse_fp16_on_cpu(SimpleNamespace(device=device, info=SimpleNamespace(precision=precision, variants={})))


def test_a_bad_switch_stops_the_deploy_with_a_clear_error(tmp_path):
    m = fresh_import()
    assert m.deploy_switches({}) == ("gpu", False)
    assert m.deploy_switches({"PERCEPIANO_MODAL_TARGET": " CPU "}) == ("cpu", False)
    for env, message in (({"PERCEPIANO_MODAL_TARGET": "tpu"}, "PERCEPIANO_MODAL_TARGET='tpu': choose one of"),
                         ({"PERCEPIANO_GPU_SNAPSHOT": "maybe"}, "PERCEPIANO_GPU_SNAPSHOT='maybe' is not one of"),
                         ({"PERCEPIANO_MODAL_TARGET": "cpu", "PERCEPIANO_GPU_SNAPSHOT": "1"}, "for the GPU target")):
        with pytest.raises(ValueError, match=message):
            m.deploy_switches(env)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "PERCEPIANO_"))}
    env.update(HOME=str(tmp_path), PERCEPIANO_MODAL_TARGET="tpu")  # `modal deploy` imports the file: it stops there
    out = subprocess.run([sys.executable, "-c", "import deploy.modal_app"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "PERCEPIANO_MODAL_TARGET='tpu'" in out.stderr


