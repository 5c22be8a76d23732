"""`python -m benchmarks.gpu_precision`: fp32 on CUDA with TF32 off and on, and the waveform-in model, against the CPU.

    python -m benchmarks.gpu_precision --fp32 artifacts/model.fp32.onnx [--audio artifacts/model-audio.fp16.onnx]
                                       [--device cuda] [--runs 10] [--out precision.json]

The reference is the same file on onnxruntime's CPU provider (what the export's parity gate ran). On the shipped
clips' windows (and the model's stored self-check windows): fp32 with TF32 off must agree within FP32_ATOL
(1e-5, the fp32 gate's tolerance); with TF32 on (the opt-in) the difference is reported and must stay within
runtime.cuda.TF32_ATOL. The waveform-in model (front end in the graph) must agree with its CPU run within its
gate's end-to-end tolerance; its latency at batch 1/15/32 is timed. `--device cpu` runs the same on the CPU (for
the tests: TF32 is then a no-op). Exit 0 passed, 1 a check failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from runtime.cuda import TF32_ATOL

FP32_ATOL = 1e-5
BATCHES = (1, 15, 32)


def clip_inputs(kind: str) -> np.ndarray:
    """The shipped clips as model inputs of `kind` ('mel' windows or 'audio' 3 s chunks)."""
    from convert.parity import shipped_clips
    from runtime.audio import load_audio
    from runtime.features import chunk_audio, features_from_audio

    make = features_from_audio if kind == "mel" else chunk_audio
    return np.concatenate([make(load_audio(c)) for c in shipped_clips()]).astype(np.float32)


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max()) if np.isfinite(a).all() else float("inf")


def latency_ms(model, x: np.ndarray, runs: int) -> dict[str, float]:
    out = {}
    for batch in BATCHES:
        xb = np.resize(x, (batch, *x.shape[1:])).astype(np.float32)
        model.run(xb)
        model.run(xb)  # warm-up at this shape
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model.run(xb)
            times.append((time.perf_counter() - t0) * 1e3)
        out[str(batch)] = round(statistics.median(times), 3)
    return out


def fp32_checks(path: Path, device: str, runs: int) -> dict:
    from runtime.model import OnnxModel

    cpu = OnnxModel(path, device="cpu")
    x = clip_inputs(cpu.input_kind)
    want = cpu.predict(x)
    off = OnnxModel(path, device=device, tf32=False)
    on = OnnxModel(path, device=device, tf32=True)
    d_off, d_on = max_abs(off.predict(x), want), max_abs(on.predict(x), want)
    return {
        "windows": len(x),
        "tf32_off": {"max_abs_vs_cpu": d_off, "atol": FP32_ATOL, "passed": d_off <= FP32_ATOL,
                     "self_check": off.run_self_check().to_dict(), "latency_ms": latency_ms(off, x, runs)},
        "tf32_on": {"max_abs_vs_cpu": d_on, "atol": TF32_ATOL, "passed": d_on <= TF32_ATOL,
                    "self_check": on.run_self_check().to_dict(), "latency_ms": latency_ms(on, x, runs)},
        "providers": off.providers,
    }


def audio_checks(path: Path, device: str, runs: int) -> dict:
    from runtime.model import OnnxModel

    cpu, dev = OnnxModel(path, device="cpu"), OnnxModel(path, device=device)
    x = clip_inputs(dev.input_kind)
    # fp32 within fp32's gate tolerance; a quantized variant within its gate's (the GPU's kernels against the CPU's)
    atol = FP32_ATOL if dev.info.precision == "fp32" else dev.info.gate_atol or 5e-3
    diff = max_abs(dev.predict(x), cpu.predict(x))
    return {"precision": dev.info.precision, "input": dev.input_kind, "chunks": len(x), "max_abs_vs_cpu": diff,
            "atol": atol, "passed": diff <= atol, "self_check": dev.run_self_check().to_dict(),
            "latency_ms": latency_ms(dev, x, runs), "providers": dev.providers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_precision", description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", type=Path, required=True, help="an fp32 model")
    parser.add_argument("--audio", type=Path, help="a waveform-in model (export --input audio)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per batch size (default 10)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    doc = {"device": args.device, "fp32": fp32_checks(args.fp32, args.device, args.runs)}
    if args.audio:
        doc["audio"] = audio_checks(args.audio, args.device, args.runs)
    checks = [doc["fp32"]["tf32_off"], doc["fp32"]["tf32_on"], *([doc["audio"]] if args.audio else [])]
    doc["passed"] = all(c["passed"] for c in checks)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
