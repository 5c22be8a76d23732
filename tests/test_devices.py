"""Where the model runs: a CUDA request never quietly ends on the CPU, and the declared onnxruntime floor runs it.

Two tests run in a separate small venv (onnxruntime-gpu at the `runtime` extra's floor, without its CUDA
libraries) that scripts/test.sh creates and caches: on this GPU-less machine CUDA is "available" there but
cannot start, which is exactly the quiet-fallback case.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest

from runtime.analyze import Analyzer
from runtime.errors import ModelError
from runtime.model import CUDA, OnnxModel

REPO = Path(__file__).resolve().parents[1]
EXTRAS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def floor(extra: str, package: str) -> str:
    """The version after `package>=` (extras in brackets allowed) in a pyproject extra."""
    spec = next(d for d in EXTRAS[extra] if d.split("[")[0].split(">")[0] == package)
    return spec.split(">=", 1)[1].split(",")[0].strip()


ORT_FLOOR = floor("runtime", "onnxruntime")


def check_venv() -> Path:
    """The cached venv of scripts/test.sh; missing is a skip locally and a failure in CI."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "percepiano" / \
        f"venv-ort-gpu-{ORT_FLOOR}"
    venv = Path(os.environ.get("PERCEPIANO_GPU_CHECK_VENV", default))
    if not (venv / ".complete").is_file():
        message = f"no onnxruntime-gpu=={ORT_FLOOR} check venv at {venv}: scripts/test.sh creates it"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return venv / "bin" / "python"


def run_in_check_venv(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's runtime, not an installed copy
    return subprocess.run([str(check_venv()), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


class CudaThatDoesNotStart:
    """onnxruntime.InferenceSession as onnxruntime-gpu behaves without CUDA libraries: a CPU-only session."""

    def __init__(self, real):
        self.real = real
        self.asked: list = []

    def __call__(self, source, options=None, providers=None):
        self.asked.append(providers)
        return self.real(source, options, providers=["CPUExecutionProvider"])


@pytest.fixture
def cuda_listed(monkeypatch):
    """An onnxruntime that lists CUDA as available (as the GPU wheel does) but whose sessions come back CPU-only."""
    import onnxruntime as ort

    fake = CudaThatDoesNotStart(ort.InferenceSession)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", fake)
    return fake


def test_cuda_that_does_not_start_is_a_model_error(tiny_model, cuda_listed):
    with pytest.raises(ModelError, match="device 'cuda' asked for, but onnxruntime's CUDA provider did not start"):
        OnnxModel(tiny_model, device="cuda")
    assert cuda_listed.asked[0][0][0] == CUDA  # CUDA was asked for first


def test_auto_falls_back_to_the_cpu_and_says_so_once(tiny_model, cuda_listed, caplog):
    with caplog.at_level(logging.WARNING, logger="runtime.model"):
        model = OnnxModel(tiny_model, device="auto")
    assert model.device == "cpu" and model.providers == ["CPUExecutionProvider"]
    assert caplog.text.count("CUDA provider did not start") == 1
    assert model.run(np.full((1, 128, 128), -40.0, np.float32)).shape == (1, 19)


def test_a_started_cuda_session_cannot_fall_back_at_run_time(tiny_model, monkeypatch):
    import onnxruntime as ort

    real = ort.InferenceSession
    calls: list[str] = []

    class StartedCuda:  # a session that reports CUDA first, as on a working GPU
        def __init__(self, source, options=None, providers=None):
            self._session = real(source, options, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return [CUDA, "CPUExecutionProvider"]

        def disable_fallback(self):
            calls.append("disable_fallback")

        def __getattr__(self, name):
            return getattr(self._session, name)

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", StartedCuda)
    model = OnnxModel(tiny_model, device="cuda")
    assert model.device == "cuda" and model.providers[0] == CUDA
    assert calls == ["disable_fallback"]  # a CUDA failure at run time raises instead of re-running on the CPU


@pytest.mark.gpu
def test_gpu_wheel_without_cuda_refuses_a_cuda_request(tiny_model, piano_clips):
    proc = run_in_check_venv("-m", "runtime", "analyze", str(piano_clips[0]), "--model", str(tiny_model),
                             "--device", "cuda")
    assert proc.returncode != 0, proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: device 'cuda' asked for, but onnxruntime's CUDA provider did not start"), \
        proc.stderr
    assert "CPUExecutionProvider" in last and proc.stdout == ""


@pytest.mark.gpu
def test_the_declared_onnxruntime_floor_runs_the_exported_model(tiny_model, piano_clips):
    code = "import onnxruntime, sys; print(onnxruntime.__version__, CUDA in onnxruntime.get_available_providers())"
    version, cuda = run_in_check_venv("-c", code.replace("CUDA", repr(CUDA))).stdout.split()
    assert (version, cuda) == (ORT_FLOOR, "True")  # the floor itself, as the GPU wheel (CUDA listed)
    # the gpu extra's floor is the first CUDA 13 wheel (runtime.cuda), above the runtime floor tested here
    from packaging.version import Version

    from runtime.cuda import FIRST_CUDA13_WHEEL

    assert floor("gpu", "onnxruntime-gpu") == FIRST_CUDA13_WHEEL and Version(FIRST_CUDA13_WHEEL) >= Version(ORT_FLOOR)
    clip = str(piano_clips[0])
    proc = run_in_check_venv("-m", "runtime", "analyze", clip, "--model", str(tiny_model), "--device", "cpu",
                             "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)["results"][0]["scores"]
    want = Analyzer.from_path(tiny_model, device="cpu").analyze_file(clip).scores
    assert list(got) == list(want)
    np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=0, atol=1e-5)



@pytest.fixture(scope="module")
def default_artifacts(tiny_checkpoint, tiny_audio_model, tmp_path_factory) -> dict[str, Path]:
    """What `export --quantize auto` writes by default (pre-optimised for the CPU: int8 at --out, the fp32 beside
    it) and the waveform-in model of `export --input audio`, from the tiny checkpoint."""
    from convert import cli as convert_cli

    out = tmp_path_factory.mktemp("defaults") / "model.onnx"
    assert convert_cli.main(["-q", "export", "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                             "--quantize", "auto"]) == 0
    return {"int8": out, "fp32": out.with_name("model.fp32.onnx"), "audio": tiny_audio_model}


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["fp32", "int8", "audio"])
def test_the_declared_onnxruntime_floor_runs_the_default_artifacts(default_artifacts, which, piano_clips):
    from runtime.model import OnnxModel

    path = default_artifacts[which]
    model = OnnxModel(path, device="cpu")
    if which != "audio":
        assert model.info.precision == which, model.info.precision
    clip = str(piano_clips[1])
    proc = run_in_check_venv("-m", "runtime", "analyze", clip, "--model", str(path), "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["model"]["self_check"]["status"] == "passed"
    got = doc["results"][0]["scores"]
    want = Analyzer(model).analyze_file(clip).scores
    assert list(got) == list(want)
    np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=0, atol=1e-5)
