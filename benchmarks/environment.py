"""The machine a benchmark ran on, the packages it used, and how its processes are pinned to CPUs.

Imports only the standard library: the cold-start worker imports this module before anything it measures.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata as importlib_metadata

from benchmarks.errors import BenchmarkError

PACKAGES = ("numpy", "jax", "jaxlib", "flax", "onnx", "onnxruntime", "onnxruntime-gpu", "jax2onnx", "librosa",
            "scikit-learn", "soundfile", "soxr", "matplotlib", "rich")
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cpus() -> list[int]:
    """CPUs this process may run on (its affinity mask), sorted."""
    return sorted(os.sched_getaffinity(0))


def pick_cpus(threads: int | None) -> list[int]:
    """The first `threads` usable CPUs (all of them when None); the same set for every variant."""
    cpus = usable_cpus()
    if threads is None:
        return cpus
    if not 1 <= threads <= len(cpus):
        raise BenchmarkError(f"--threads {threads}: this process may use {len(cpus)} CPU(s) {cpus}; "
                             f"choose 1-{len(cpus)}")
    return cpus[:threads]


def pin(cpus: list[int]) -> None:
    """Restrict this process, and the threads it will start, to `cpus` (what `taskset` does)."""
    os.sched_setaffinity(0, set(cpus))


def child_env(cpus: list[int], device: str) -> dict[str, str]:
    """Environment of a worker process: the same thread count for every library that reads one."""
    env = dict(os.environ)
    for name in THREAD_ENV:
        env[name] = str(len(cpus))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ info lines are noise on the progress display
    if device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    return env


def threads_note(cpus: list[int]) -> str:
    """How the thread count is pinned, in words, for results.json and the summary."""
    n = len(cpus)
    return (f"every worker process restricts itself to CPUs {cpus} with sched_setaffinity (as `taskset` does) "
            f"before importing anything; XLA sizes its CPU thread pool from that mask; onnxruntime gets "
            f"intra_op_num_threads={n}, inter_op_num_threads=1; {', '.join(THREAD_ENV)}={n}")


def versions() -> dict[str, str]:
    """Installed versions of the packages that matter to the figures."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The SIMD features that decide float32/int8 GEMM speed (AVX2, AVX-512, VNNI, AMX)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8")
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def gpus() -> list[str]:
    """NVIDIA GPUs as nvidia-smi names them; empty where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def memory_bytes() -> int | None:
    """Total RAM."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def machine(cpus: list[int]) -> dict:
    """Everything about the machine a reader needs to weigh the figures."""
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "benchmark_cpus": cpus,
        "memory_bytes": memory_bytes(),
        "gpus": gpus(),
        "loadavg_start": list(os.getloadavg()),
    }
