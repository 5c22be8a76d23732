"""Where a model runs: onnxruntime's version and providers, the CPU's vector instruction sets, the GPU's name.

Standard library only (onnxruntime is imported when present), so the runtime and the converter's parity gate
record the same facts: an int8 model checked on a VNNI CPU says nothing about a CPU without VNNI.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

# /proc/cpuinfo flags that decide which int8 / fp32 kernels onnxruntime's MLAS picks on x86
CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
CPUINFO = Path("/proc/cpuinfo")


def cpu_info(cpuinfo: Path = CPUINFO) -> dict:
    """The CPU's model name and which of CPU_FLAGS it has; `vnni` is true for AVX-512 VNNI or AVX-VNNI."""
    name, flags, found_name = platform.processor() or platform.machine(), set(), False
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():  # the first processor's block is enough: every core has the same flags
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not found_name:
            name, found_name = value.strip() or name, True
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
        if found_name and flags:
            break
    have = [f for f in CPU_FLAGS if f in flags]
    return {"model": name, "machine": platform.machine(), "flags": have,
            "vnni": "avx512_vnni" in flags or "avx_vnni" in flags}


def gpu_names(timeout: float = 5.0) -> list[str]:
    """Names of the NVIDIA GPUs nvidia-smi lists; empty without one (or without nvidia-smi)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def onnxruntime_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def platform_info(providers: list[str] | tuple[str, ...]) -> dict:
    """The facts a parity figure or a self-check depends on, for a session using `providers`."""
    providers = [p if isinstance(p, str) else p[0] for p in providers]
    info = {"providers": providers, "onnxruntime": onnxruntime_version(), "cpu": cpu_info()}
    if any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in providers):
        info["gpus"] = gpu_names()
    return info


def describe_platform(info: dict) -> str:
    """One line: 'CPUExecutionProvider, onnxruntime 1.22.0, AMD EPYC (avx2, fma; no VNNI)'."""
    cpu = info.get("cpu", {})
    flags = ", ".join(cpu.get("flags", [])) or "no AVX"
    where = f"{cpu.get('model', '?')} ({flags}; {'VNNI' if cpu.get('vnni') else 'no VNNI'})"
    if info.get("gpus"):
        where = f"{', '.join(info['gpus'])} on {where}"
    return f"{', '.join(info.get('providers', []))}, onnxruntime {info.get('onnxruntime')}, {where}"
