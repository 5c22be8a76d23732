"""runtime.platform_info: the CPU's instruction sets, onnxruntime's version and the providers, read as they are."""

from __future__ import annotations

import subprocess
import sys

from runtime.platform_info import cpu_info, describe_platform, platform_info

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni
processor\t: 1
model name\t: something else
flags\t\t: fpu
"""


def test_reads_the_flags_that_pick_the_kernels(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    info = cpu_info(path)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"
    assert info["flags"] == ["avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"]
    assert info["vnni"] is True


def test_avx2_without_vnni_and_a_missing_file(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("model name : AMD EPYC\nflags : sse avx avx2 fma\n")
    assert cpu_info(path)["flags"] == ["avx", "avx2", "fma"] and cpu_info(path)["vnni"] is False
    missing = cpu_info(tmp_path / "absent")
    assert missing["flags"] == [] and missing["vnni"] is False and missing["model"]


def test_platform_info_of_a_cpu_session_names_what_ran():
    import onnxruntime as ort

    info = platform_info(["CPUExecutionProvider"])
    assert info["providers"] == ["CPUExecutionProvider"]
    assert info["onnxruntime"] == ort.__version__
    assert "gpus" not in info  # a CPU gate is no evidence about a GPU
    line = describe_platform(info)
    assert line.startswith(f"CPUExecutionProvider, onnxruntime {ort.__version__}, ")
    assert ("no VNNI" in line) != info["cpu"]["vnni"]


def test_provider_tuples_are_named_and_a_cuda_session_asks_for_the_gpu_name(monkeypatch):
    import runtime.platform_info as pi

    monkeypatch.setattr(pi, "gpu_names", lambda timeout=5.0: ["NVIDIA A10G"])
    info = platform_info([("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"])
    assert info["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert info["gpus"] == ["NVIDIA A10G"] and describe_platform(info).count("NVIDIA A10G on ") == 1


def test_imports_only_the_standard_library():
    code = "import sys, runtime.platform_info; print(sorted(m for m in ('numpy', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
