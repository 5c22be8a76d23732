"""`python -m benchmarks.gpu_check`: its exit codes, and its whole logic run on the CPU provider with the tiny
models."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from model_edits import with_self_check

from benchmarks import gpu_check
from convert.checkpoint import load_checkpoint
from convert.parity import DEFAULT_ATOL
from convert.quantize import make_variant
from runtime.model import METADATA_KEY
from runtime.self_check import parse_section


@pytest.fixture(scope="module")
def tiny_pair(tiny_model, tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """m.fp32.onnx (the tiny export) and m.fp16.onnx beside it: its fp16 variant with the same stored windows.

    The fp16 file carries the fp32 export's metadata (JAX's scores for the stored windows) with precision fp16 and
    the fp16 tolerance, as the exporter writes it; the export's own fp16 gate is tested in test_quantize.
    """
    folder = tmp_path_factory.mktemp("gpu")
    fp32 = onnx.load(str(tiny_model))
    onnx.save(fp32, str(folder / "m.fp32.onnx"))
    proto = make_variant(fp32, "fp16", load_checkpoint(tiny_checkpoint).config).proto
    doc = json.loads(next(p.value for p in fp32.metadata_props if p.key == METADATA_KEY))
    doc["precision"] = "fp16"
    doc["self_check"]["atol"] = DEFAULT_ATOL["fp16"]
    del proto.metadata_props[:]
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(doc, sort_keys=True))
    onnx.save(proto, str(folder / "m.fp16.onnx"))
    return folder / "m.fp32.onnx", folder / "m.fp16.onnx"


def test_no_gpu_has_its_own_exit_code_and_says_why(capsys):
    import onnxruntime as ort

    if gpu_check.CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    assert gpu_check.NO_GPU not in (0, 1, 2)
    assert gpu_check.main([]) == gpu_check.NO_GPU
    err = capsys.readouterr().err
    assert "no CUDAExecutionProvider" in err and "nvidia-smi" in err


def test_the_message_tells_a_missing_provider_from_a_missing_gpu(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [gpu_check.CUDA, gpu_check.CPU])
    monkeypatch.setattr(gpu_check, "gpus", lambda: [])
    why = gpu_check.no_gpu_reason("cuda")  # the probe session falls back to the CPU: onnxruntime here has no CUDA
    assert "has its CUDA provider, but no NVIDIA GPU or driver" in why and "did not start" in why
    monkeypatch.setattr(gpu_check, "cuda_probe", lambda: True)  # no nvidia-smi, but a session starts on CUDA
    assert gpu_check.no_gpu_reason("cuda") is None
    monkeypatch.setattr(gpu_check, "gpus", lambda: ["NVIDIA A10G, 23028 MiB, 550.54"])
    assert gpu_check.no_gpu_reason("cuda") is None
    monkeypatch.setattr(ort, "get_available_providers", lambda: [gpu_check.CPU])
    why = gpu_check.no_gpu_reason("cuda")
    assert "no CUDAExecutionProvider" in why and "lists 1 GPU" in why
    assert gpu_check.no_gpu_reason("cpu") is None


def test_every_check_runs_and_passes_on_the_cpu_provider(tiny_pair, tmp_path, capsys):
    fp32, fp16 = tiny_pair
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--provider", "cpu", "--model", str(fp32), "--out", str(out), "--runs", "2"]) == 0
    assert "PASSED" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["passed"] and doc["exit_code"] == 0 and doc["models"] == {"fp32": str(fp32), "fp16": str(fp16)}
    checks = doc["checks"]
    assert tuple(checks) == gpu_check.CHECKS
    assert checks["cuda_graph"]["status"] == gpu_check.NOT_APPLICABLE
    assert all(c["status"] == gpu_check.PASSED for name, c in checks.items() if name != "cuda_graph")
    assert checks["session"]["providers"] == {"fp32": [gpu_check.CPU], "fp16": [gpu_check.CPU]}
    assert checks["self_check_fp32"]["max_abs"] <= DEFAULT_ATOL["fp32"] == checks["self_check_fp32"]["atol"]
    assert 0 < checks["fp16_vs_fp32"]["max_abs"] <= DEFAULT_ATOL["fp16"]  # half precision is not bit-equal
    assert checks["io_binding"]["output_device"] == "cpu" and checks["io_binding"]["max_abs"] <= 1e-6
    runs = checks["latency"]["runs"]
    assert set(runs) == {f"{p}/{b}" for p in ("fp32", "fp16") for b in gpu_check.BATCHES}
    assert all(r["runs"] == 2 and 0 < r["p50_s"] <= r["p90_s"] for r in runs.values())
    assert checks["cold_start"]["total_s"] > 0 and "first_inference" in checks["cold_start"]["phases"]


def test_tampered_references_fail_the_run(tiny_pair, tmp_path, capsys):
    fp32, fp16 = tiny_pair
    doc = json.loads(next(p.value for p in onnx.load(str(fp32)).metadata_props if p.key == METADATA_KEY))
    ref = parse_section(doc["self_check"])
    tampered = with_self_check(fp32, tmp_path / "m.fp32.onnx", ref.inputs, ref.scores + 0.01,
                               atol=ref.atol)
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--provider", "cpu", "--model", str(tampered), "--fp16", str(fp16), "--out", str(out),
                     "--runs", "1"])
    assert code == 1 and "FAILED" in capsys.readouterr().out
    checks = json.loads(out.read_text())["checks"]
    assert checks["self_check_fp32"]["status"] == gpu_check.FAILED
    assert checks["self_check_fp32"]["max_abs"] == pytest.approx(0.01, abs=1e-6)
    assert checks["self_check_fp16"]["status"] == gpu_check.PASSED  # only the tampered file fails


def test_a_wrong_file_or_option_is_a_usage_error(tiny_pair, tmp_path, capsys):
    fp32, _ = tiny_pair
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--provider", "cpu", "--model", str(tmp_path / "none.onnx")])
    assert exc.value.code == 2 and "model file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--provider", "tpu"])
    assert exc.value.code == 2
