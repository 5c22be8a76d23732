"""scripts/gpu_checks.sh, the prepared GPU run, as far as it goes without a GPU: each missing piece stops it with
its own exit code and a message that says what to do; with a GPU faked, it runs every step and writes summary.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # the whole prepared script, with stand-ins for the GPU

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_checks.sh"


def fake_nvidia_smi(bin_dir: Path, gpu: bool) -> None:
    """An nvidia-smi that lists one GPU with driver 580.95.05, or fails as it does without a driver."""
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / "nvidia-smi"
    if gpu:
        tool.write_text('#!/bin/sh\ncase "$*" in *driver_version*) echo "580.95.05";; '
                        '*) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)";; esac\n')
    else:
        tool.write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA "
                        "driver.\"\nexit 9\n")
    tool.chmod(0o755)


def run(tmp_path: Path, gpu: bool, python: str = sys.executable, timeout: float = 120, **env: str):
    fake_nvidia_smi(tmp_path / "bin", gpu)
    full = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "PYTHON": python, **env}
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=timeout)


def test_no_gpu_stops_at_once_and_says_so(tmp_path):
    proc = run(tmp_path, gpu=False)
    assert proc.returncode == 3, proc.stderr
    assert "no NVIDIA GPU here" in proc.stderr and "couldn't communicate with the NVIDIA driver" in proc.stderr
    assert not (tmp_path / "out" / "summary.json").exists()


def test_a_gpu_without_onnxruntimes_cuda_provider_says_what_to_install(tmp_path):
    proc = run(tmp_path, gpu=True)  # this venv's onnxruntime is the CPU package
    assert proc.returncode == 4, proc.stderr
    assert "has no CUDAExecutionProvider" in proc.stderr and "deploy/requirements-gpu.txt" in proc.stderr
    assert "driver 580.95.05 (floor 580.65.06)" in proc.stderr


def cuda_listing_python(tmp_path: Path) -> str:
    """A python whose onnxruntime lists CUDA (as onnxruntime-gpu does) but, with no GPU, cannot start it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import onnxruntime\nonnxruntime.get_available_providers = lambda: "
        "['CUDAExecutionProvider', 'CPUExecutionProvider']\n")
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{site}:$PYTHONPATH" exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def test_missing_models_are_named(tmp_path):
    proc = run(tmp_path, gpu=True, python=cuda_listing_python(tmp_path), MODELS=str(tmp_path / "none"))
    assert proc.returncode == 5, proc.stderr
    assert f"model file not found: {tmp_path / 'none'}" in proc.stderr


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_every_step_runs_and_the_summary_names_each(tmp_path, tiny_model):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_model, models / "model.fp32.onnx")
    shutil.copy(tiny_model, models / "model.fp16.onnx")
    proc = run(tmp_path, gpu=True, python=cuda_listing_python(tmp_path), timeout=600, MODELS=str(models),
               PORT=str(_free_port()))
    assert proc.returncode == 1, proc.stderr  # CUDA is listed but cannot start here: the CUDA steps fail
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["exit_codes"]) == {"info", "gpu_check", "gpu_precision", "smoke", "cpu_cost"}
    assert summary["exit_codes"]["info"] == 0 and summary["exit_codes"]["cpu_cost"] == 0
    assert summary["provider_options"][0]["options"]["use_tf32"] == "0"  # what a CUDA session would get
    assert summary["exit_codes"]["gpu_precision"] != 0 and summary["exit_codes"]["smoke"] != 0
    assert summary["serve_ready_s"] is None and "did not become ready" in proc.stderr
    rows = summary["cpu_cost"]["rows"]
    assert [r["format"] for r in rows] == ["flac", "mp3", "m4a"] and np.all([r["features_cpu_ms"] > 0 for r in rows])
    assert summary["driver_ok"] is True and not summary["passed"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gpu_precision_runs_its_comparisons_on_the_cpu(tiny_model, tiny_audio_model, tmp_path):
    from benchmarks import gpu_precision

    out = tmp_path / "precision.json"
    assert gpu_precision.main(["--fp32", str(tiny_model), "--audio", str(tiny_audio_model), "--device", "cpu",
                               "--runs", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    off, on = doc["fp32"]["tf32_off"], doc["fp32"]["tf32_on"]
    assert off["max_abs_vs_cpu"] == 0.0 and off["atol"] == 1e-5 and on["atol"] == 1e-3  # the CPU against itself
    assert off["self_check"]["status"] == "passed" and set(off["latency_ms"]) == {"1", "15", "32"}
    assert doc["audio"]["input"] == "audio" and doc["audio"]["passed"] and doc["passed"]
