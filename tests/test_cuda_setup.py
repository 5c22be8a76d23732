"""What a CUDA session is given (TF32 off for fp32, CUDA's libraries preloaded) and what a failed start says.

No GPU is needed: onnxruntime.InferenceSession is replaced by a recorder that runs the real session on the CPU
and reports CUDA first, as on a working GPU; the one real GPU wheel here (tests/test_devices.py's cached venv,
onnxruntime-gpu without its CUDA libraries) shows the message of a CUDA that cannot start.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_devices import run_in_check_venv

from runtime import cli
from runtime.cuda import CUDA, TF32_ATOL

CPU = "CPUExecutionProvider"


class StartedCuda:
    """onnxruntime.InferenceSession on a working GPU, recorded: what providers (and options) it was handed."""

    asked: list = []

    def __init__(self, source, options=None, providers=None):
        import onnxruntime as ort

        StartedCuda.asked.append(providers)
        self._session = ort.capi.onnxruntime_inference_collection.InferenceSession(source, options,
                                                                                   providers=[CPU])

    def get_providers(self):
        return [CUDA, CPU]

    def disable_fallback(self):
        pass

    def __getattr__(self, name):
        return getattr(self._session, name)


@pytest.fixture
def gpu_machine(monkeypatch):
    """An onnxruntime that lists CUDA and starts it (recorded), with preload_dlls recorded too."""
    import onnxruntime as ort

    preloads: list[int] = []
    StartedCuda.asked = []
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", StartedCuda)
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: preloads.append(1) or print("Failed to load x"),
                        raising=False)
    return StartedCuda.asked, preloads


def cuda_options_of(asked) -> dict:
    first = asked[-1][0]
    assert first[0] == CUDA, asked
    return first[1]


def test_fp32_on_cuda_is_fp32_and_tf32_is_an_explicit_opt_in(tiny_model, gpu_machine):
    from runtime.model import OnnxModel

    asked, _ = gpu_machine
    model = OnnxModel(tiny_model, device="cuda")
    assert model.info.precision == "fp32" and cuda_options_of(asked)["use_tf32"] == "0"
    assert model.run_self_check().atol == pytest.approx(1e-5, rel=0.5)  # the stored fp32 tolerance

    opted = OnnxModel(tiny_model, device="cuda", tf32=True)
    assert cuda_options_of(asked)["use_tf32"] == "1"
    check = opted.run_self_check()
    assert check.atol == TF32_ATOL and check.passed  # TF32's own tolerance, not fp32's


def test_serve_settings_carry_the_tf32_opt_in(monkeypatch):
    from runtime.serve.settings import Settings

    assert Settings.from_env({}).cuda_tf32 is False
    assert Settings.from_env({"PERCEPIANO_CUDA_TF32": "1"}).cuda_tf32 is True


def test_info_shows_a_cuda_session_options_without_opening_one(tiny_model, monkeypatch, capsys):
    import onnxruntime as ort

    def no_session(*a, **k):
        raise AssertionError("info --device cuda must not open a session")

    monkeypatch.setattr(ort, "InferenceSession", no_session)
    assert cli.main(["info", str(tiny_model), "--device", "cuda", "--json"]) == 0
    run = json.loads(capsys.readouterr().out)["runtime"]
    assert run["session_opened"] is False and run["providers"] == [CUDA, CPU]
    assert run["provider_options"][0] == {"name": CUDA, "options": {
        "cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1", "use_tf32": "0"}}
    assert cli.main(["info", str(tiny_model), "--device", "cuda", "--tf32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runtime"]["provider_options"][0]["options"]["use_tf32"] == "1"


def test_cuda_libraries_are_preloaded_wherever_cuda_is_asked_for(tiny_model, gpu_machine, piano_clips, capsys):
    from runtime.model import OnnxModel

    _, preloads = gpu_machine
    OnnxModel(tiny_model, device="cpu")
    assert preloads == []  # the CPU asks for no CUDA library
    assert cli.main(["analyze", str(piano_clips[0]), "--model", str(tiny_model), "--device", "cuda", "--json"]) == 0
    assert preloads == [1]
    out = capsys.readouterr().out
    assert json.loads(out)["model"]["device"] == "cuda"  # what preload_dlls printed did not spoil stdout's JSON
    OnnxModel(tiny_model, device="auto")
    assert preloads == [1, 1]


def test_a_gpu_wheel_without_cuda_libraries_is_told_what_is_missing_and_the_fix(tiny_model, piano_clips):
    proc = run_in_check_venv("-m", "runtime", "analyze", str(piano_clips[0]), "--model", str(tiny_model),
                             "--device", "cuda", "--json")
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: device 'cuda' asked for, but onnxruntime's CUDA provider did not start"), last
    version = run_in_check_venv("-c", "import onnxruntime; print(onnxruntime.__version__)").stdout.strip()
    # the check venv's wheel is a CUDA 12 build: it names that major's libraries, the pip fix, and the driver
    for needed in ("libcudart.so.12", "libcudnn.so.9", f"pip install 'onnxruntime-gpu[cuda,cudnn]=={version}'",
                   "libcuda.so.1", "525.60.13", "this project's gpu extra and Modal image use CUDA 13"):
        assert needed in last, (needed, last)
    assert "install the 'gpu' extra" not in last  # they have it


def test_a_cpu_only_onnxruntime_is_told_to_install_the_gpu_extra(tiny_model, monkeypatch):
    import onnxruntime as ort

    from runtime.errors import ModelError
    from runtime.model import OnnxModel

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    with pytest.raises(ModelError, match=r"CPU-only package: install the 'gpu' extra \(onnxruntime-gpu with CUDA 13"):
        OnnxModel(tiny_model, device="cuda")
    assert np.isfinite(OnnxModel(tiny_model, device="cpu").run(np.full((1, 128, 128), -40.0, np.float32))).all()
