"""One CUDA major, said once: the Modal GPU image's lock, what it resolves to, and what the code declares."""

from __future__ import annotations

import os
import re
import tomllib
import urllib.request
from pathlib import Path

import pytest
from modal_recording import image_steps
from packaging.requirements import Requirement
from packaging.version import Version

from deploy import image_lock
from runtime import cuda

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = (REPO / "pyproject.toml").read_text()
GPU_EXTRA = tomllib.loads(PYPROJECT)["project"]["optional-dependencies"]["gpu"]


def pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/onnxruntime-gpu/", timeout=10).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def image_set() -> dict[str, str]:
    """What the image installs, resolved as its build would: the lock, then the gpu extra (dry run)."""
    if not pypi_reachable():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("PyPI is not reachable: the image's requirement set cannot be resolved")
        pytest.skip("PyPI is not reachable here")
    return image_lock.resolve(["-r", str(image_lock.LOCK), *GPU_EXTRA])


@pytest.mark.network
def test_the_image_resolves_to_the_declared_cuda_major_and_to_its_pins(image_set):
    assert image_lock.cuda_major(image_set) == cuda.CUDA_MAJOR
    assert image_lock.cudnn_major(image_set) == cuda.CUDNN_MAJOR
    assert f"nvidia-cudnn-cu{cuda.CUDA_MAJOR}" in image_set  # the cuDNN built for that CUDA major
    pins = image_lock.locked()
    resolved_nvidia = {n: v for n, v in image_set.items() if n.startswith("nvidia-")}
    # every NVIDIA wheel the image gets is pinned in the lock, at the version it gets: nothing floats
    assert resolved_nvidia == {n: v for n, v in pins.items() if n.startswith("nvidia-")}
    assert image_set["onnxruntime-gpu"] == pins["onnxruntime-gpu"]


def test_the_lock_pins_what_the_code_declares():
    pins = image_lock.locked()
    assert pins["onnxruntime-gpu"] == image_lock.ONNXRUNTIME_GPU
    assert Version(pins["onnxruntime-gpu"]) >= Version(cuda.FIRST_CUDA13_WHEEL)
    assert int(pins["nvidia-cuda-runtime"].split(".")[0]) == cuda.CUDA_MAJOR
    assert f"nvidia-cudnn-cu{cuda.CUDA_MAJOR}" in pins
    for line in image_lock.LOCK.read_text().splitlines():  # pins only, no ranges
        assert not line.strip() or line.startswith("#") or "==" in line, line
    header = image_lock.LOCK.read_text().splitlines()[0]
    assert f"CUDA {cuda.CUDA_MAJOR}" in header and cuda.DRIVER_FLOOR in header


def test_pyproject_says_the_same_cuda_major_and_driver_floor():
    req = Requirement(next(d for d in GPU_EXTRA if d.startswith("onnxruntime-gpu")))
    assert req.extras == {"cuda", "cudnn"}
    floor = next(s.version for s in req.specifier if s.operator == ">=")
    assert floor == cuda.FIRST_CUDA13_WHEEL  # no CUDA 12 build of onnxruntime-gpu satisfies the extra
    comment = PYPROJECT[PYPROJECT.index("# Inference on an NVIDIA GPU"):PYPROJECT.index("gpu = [")]
    assert f"CUDA {cuda.CUDA_MAJOR} / cuDNN {cuda.CUDNN_MAJOR}" in comment and cuda.DRIVER_FLOOR in comment
    other = {m for m in re.findall(r"CUDA (\d+)\b", comment)} - {str(cuda.CUDA_MAJOR)}
    assert other <= {"12"} and "older are CUDA 12 builds" in comment  # 12 only as what the floor excludes


def test_the_gpu_image_installs_the_lock(recorded):
    m, calls = recorded
    steps = image_steps(calls, "pip_install_from_requirements")
    assert [s["args"][0] for s in steps] == [str(image_lock.LOCK)]
    assert m.ONNXRUNTIME_GPU == image_lock.ONNXRUNTIME_GPU
    assert not [s for s in image_steps(calls, "pip_install") if any("onnxruntime-gpu" in a for a in s["args"])]
