"""CUDA for onnxruntime: the provider options a session gets, loading CUDA's libraries, and saying what is missing.

The project's GPU stack is declared once, here: CUDA 13 and cuDNN 9 from PyPI (the `gpu` extra's
onnxruntime-gpu, and the Modal image's lock deploy/requirements-gpu.txt), which need an NVIDIA driver of branch
580 or newer (CUDA 13.0's floor, 580.65.06; CUDA's minor-version compatibility lets any 13.x runtime run on it).

fp32 on CUDA is fp32: onnxruntime's CUDA provider runs float GEMMs in TF32 by default (`use_tf32`, on Ampere and
newer, the A10G included), about 1e-4 off in score units, ten times the fp32 self-check tolerance. The options
built here turn it off for fp32 models; TF32 is an explicit opt-in (`--tf32`, PERCEPIANO_CUDA_TF32=1) checked
against its own tolerance (TF32_ATOL).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
from typing import Any

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CUDA_MAJOR = 13  # the gpu extra and the Modal image (deploy/requirements-gpu.txt)
CUDNN_MAJOR = 9
DRIVER_FLOOR = "580.65.06"  # CUDA 13.0's minimum Linux driver (branch 580)
DRIVER_FLOORS = {12: "525.60.13", 13: DRIVER_FLOOR}  # per CUDA major (NVIDIA's minor-version compatibility table)
FIRST_CUDA13_WHEEL = "1.27.0"  # the first onnxruntime-gpu on PyPI built for CUDA 13 (1.26 and older: CUDA 12)
# TF32 opt-in: its own self-check tolerance. TF32 keeps 10 mantissa bits (as fp16) with fp32's range; emulated on
# the production model it moves scores by about 1e-4, so the fp32 tolerance (1e-5) cannot hold and fp16's (5e-3)
# is needlessly loose.
TF32_ATOL = 1e-3
BASE_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1"}
# The shared libraries onnxruntime's CUDA provider opens, by CUDA major (SONAMEs), and the driver's.
LIBRARIES = {
    12: ("libcudart.so.12", "libcublasLt.so.12", "libcublas.so.12", "libcufft.so.11", "libcurand.so.10",
         "libcudnn.so.9"),
    13: ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcufft.so.12", "libcurand.so.10",
         "libcudnn.so.9"),
}
DRIVER_LIBRARY = "libcuda.so.1"


def cuda_options(precision: str, tf32: bool = False) -> dict[str, str]:
    """The CUDA provider options of a session for a model of `precision`: TF32 off unless explicitly opted in.

    fp16 and int8 models do not use TF32 for their half/integer GEMMs; their float32 leftovers (the front end,
    the head) keep fp32 too unless `tf32`.
    """
    return {**BASE_OPTIONS, "use_tf32": "1" if tf32 else "0"}


def wheel_cuda_major() -> int | None:
    """The CUDA major the installed onnxruntime was built for (its build info), None for a CPU-only build."""
    try:
        from onnxruntime.capi import build_and_package_info as build
    except ImportError:
        return None
    version = str(getattr(build, "cuda_version", "") or "")
    return int(version.split(".")[0]) if version.split(".")[0].isdigit() else None


def preload() -> str:
    """onnxruntime.preload_dlls() where it exists: dlopen CUDA and cuDNN from the nvidia-* wheels before a session.

    Without it onnxruntime-gpu finds them only on the loader's path, so `pip install '.[gpu]'` alone can end in
    "libcudnn.so.9: cannot open shared object file" (onnxruntime issue 25609). onnxruntime prints what it could
    not load on stdout; that is captured here (stdout may be a JSON document) and returned for the log.
    """
    import onnxruntime as ort

    if not hasattr(ort, "preload_dlls"):
        return "onnxruntime has no preload_dlls (older than 1.21)"
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            ort.preload_dlls()
    except Exception as exc:  # onnxruntime raises RuntimeError for a bad directory; nothing here may stop a load
        return f"preload_dlls failed: {exc}"
    said = printed.getvalue().strip()
    if said:
        log.info("onnxruntime.preload_dlls: %s", " | ".join(said.splitlines()))
    return said


def unloadable(names: tuple[str, ...]) -> list[str]:
    """The libraries among `names` the dynamic loader cannot open (already loaded ones open at once)."""
    missing = []
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError:
            missing.append(name)
    return missing


def driver_floor(major: int | None) -> str:
    return DRIVER_FLOORS.get(major or CUDA_MAJOR, DRIVER_FLOOR)


def why_cuda_did_not_start() -> str:
    """What is missing for onnxruntime's CUDA provider, and what fixes it (after preload)."""
    import onnxruntime as ort

    major = wheel_cuda_major()
    if major is None:
        return (f"onnxruntime {ort.__version__} is the CPU-only package: install the 'gpu' extra "
                f"(onnxruntime-gpu with CUDA {CUDA_MAJOR} / cuDNN {CUDNN_MAJOR}) instead of the 'runtime' one")
    libs = unloadable(LIBRARIES.get(major, ()))
    driver = unloadable((DRIVER_LIBRARY,))
    wheel = f"onnxruntime-gpu {ort.__version__} is built for CUDA {major} / cuDNN {CUDNN_MAJOR}"
    parts = []
    if libs:
        parts.append(f"missing {', '.join(libs)} ({wheel}): pip install 'onnxruntime-gpu[cuda,cudnn]=="
                     f"{ort.__version__}' puts them beside it (loaded by onnxruntime.preload_dlls), or put a CUDA "
                     f"{major} toolkit and cuDNN {CUDNN_MAJOR} on LD_LIBRARY_PATH")
    if driver:
        parts.append(f"no NVIDIA driver ({DRIVER_LIBRARY} not found): this needs an NVIDIA GPU with driver "
                     f"{driver_floor(major)} or newer")
    if major != CUDA_MAJOR:
        parts.append(f"note: this project's gpu extra and Modal image use CUDA {CUDA_MAJOR} (onnxruntime-gpu >= "
                     f"{FIRST_CUDA13_WHEEL}, driver {DRIVER_FLOOR}+)")
    if not libs and not driver:
        parts.append(f"the CUDA {major} / cuDNN {CUDNN_MAJOR} libraries and the driver load, so the GPU itself did "
                     f"not answer or the driver is older than {driver_floor(major)} (nvidia-smi says which); "
                     "onnxruntime's own log says more with -v")
    return "; ".join(parts)


def describe_plan(providers: list[Any]) -> list[dict[str, Any]]:
    """Providers as `info --json` shows them: [{"name": ..., "options": {...}}]."""
    return [{"name": p[0], "options": dict(p[1])} if isinstance(p, tuple) else {"name": p, "options": {}}
            for p in providers]
