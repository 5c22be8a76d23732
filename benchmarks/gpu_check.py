"""`python -m benchmarks.gpu_check`: one short run that says whether the exported models work on this NVIDIA GPU.

    python -m benchmarks.gpu_check [--model artifacts/model.onnx] [--fp16 MODEL.fp16.onnx] [--out gpu.json]

Checks, in order: the CUDA session starts with CPU fallback disabled (fp32 and fp16); the stored self-check
windows score within each model's tolerance on CUDA (fp32 and fp16), and fp16 agrees with fp32 on them; IO
binding gives the same scores as a plain run and leaves the output on the device; CUDA graphs (a fixed batch
on device buffers), or why they do not apply; warm latency at batch 1/15/32 for both; the cold start of a
fresh process (benchmarks.cold). Prints one summary and writes the same as JSON.

Exit codes: 0 every check passed (a "not applicable" one included), 1 a check failed, 2 a usage error (a bad
option, a model file missing), NO_GPU (3) when there is no NVIDIA GPU to check: the message says whether
onnxruntime lacks its CUDA provider or the provider is there but no GPU/driver answers. `--provider cpu`
(for the tests) runs the same checks on the CPU provider.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks.environment import gpus, usable_cpus
from runtime.constants import NUM_DIMENSIONS

NO_GPU = 3  # not 0/1/2: a script can tell "no GPU here" from a pass, a failure and a usage error
PASSED, FAILED, NOT_APPLICABLE = "passed", "failed", "not applicable"
BATCHES = (1, 15, 32)
GRAPH_BATCH = 15
DEFAULT_MODEL = Path("artifacts/model.onnx")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
CHECKS = ("session", "self_check_fp32", "self_check_fp16", "fp16_vs_fp32", "io_binding", "cuda_graph", "latency",
          "cold_start")


def default_fp32() -> Path:
    """artifacts/model.fp32.onnx where `--quantize auto` wrote it (model.onnx is then int8), else model.onnx."""
    auto = DEFAULT_MODEL.with_suffix(".fp32.onnx")
    return auto if auto.is_file() else DEFAULT_MODEL


def no_gpu_reason(provider: str) -> str | None:
    """Why this machine cannot run the CUDA checks, or None when it can (always None for --provider cpu)."""
    import onnxruntime as ort

    if provider == "cpu":
        return None
    found = gpus()
    smi = f"nvidia-smi lists {len(found)} GPU(s)" if found else "nvidia-smi finds no GPU (or is not installed)"
    if CUDA not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (the CPU-only package; install the "
                f"'gpu' extra, onnxruntime-gpu); {smi}")
    if not found:
        started = cuda_probe()
        if started is not True:  # no nvidia-smi can still be a working GPU (a slim container): the probe says
            return f"onnxruntime has its CUDA provider, but no NVIDIA GPU or driver answers: {smi}; {started}"
    return None


def cuda_probe() -> bool | str:
    """True when a one-node session starts on the CUDA provider, else what happened instead."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from runtime.cuda import preload

    preload()  # CUDA and cuDNN from the nvidia-* wheels, as the runtime loads them (else a false "no GPU")
    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        with warnings.catch_warnings():  # "not in available provider names": said in the reason instead
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(model.SerializeToString(), options, providers=[CUDA, CPU])
    except Exception as exc:  # onnxruntime's own error types
        return f"the CUDA provider failed to start ({str(exc).splitlines()[0][:200]})"
    first = session.get_providers()[0]
    return True if first == CUDA else f"the CUDA provider did not start (the session runs on {first})"


def _check(status: str, detail: str, **figures) -> dict:
    return {"status": status, "detail": detail, **figures}


def _load(path: Path, device: str):
    """(OnnxModel, None) or (None, why it did not start)."""
    from runtime.errors import ModelError
    from runtime.model import OnnxModel

    try:
        return OnnxModel(path, device=device), None
    except ModelError as exc:
        return None, str(exc)


def check_session(models: dict, errors: dict, provider: str) -> dict:
    want = CUDA if provider == "cuda" else CPU
    started = {p: m.providers[0] for p, m in models.items() if m is not None}
    errors = dict(errors) | {p: f"the file is a {m.info.precision} model" for p, m in models.items()
                             if m is not None and m.info.precision != p}
    ok = not errors and all(first == want for first in started.values())
    why = "; ".join(f"{p}: {e}" for p, e in errors.items())
    detail = why or ", ".join(f"{p} on {first} ({models[p].load_seconds:.2f} s)" for p, first in started.items())
    return _check(PASSED if ok else FAILED, detail, providers={p: models[p].providers for p in started},
                  fallback_disabled=provider == "cuda")


def check_self_check(model, precision: str) -> dict:
    if model is None:
        return _check(FAILED, f"the {precision} model did not load")
    result = model.run_self_check()
    if result.status == "absent":
        return _check(FAILED, f"the {precision} model stores no self-check windows: re-export it")
    return _check(PASSED if result.passed else FAILED,
                  f"max abs {result.max_abs:.3g} vs atol {result.atol:.3g} over {result.windows} stored windows",
                  max_abs=result.max_abs, atol=result.atol, windows=result.windows)


def _stored(model):
    from runtime.self_check import SECTION, parse_section

    section = model.info.raw.get(SECTION)
    return parse_section(section, item_shape=tuple(model.input_shape)) if section else None


def check_fp16_vs_fp32(fp32, fp16) -> dict:
    if fp32 is None or fp16 is None:
        return _check(FAILED, "a model did not load")
    ref, ref16 = _stored(fp32), _stored(fp16)
    if ref is None or ref16 is None:
        return _check(FAILED, "a model stores no self-check windows")
    diff = float(np.abs(fp16.run(ref.inputs).astype(np.float64) - fp32.run(ref.inputs)).max())
    ok = bool(np.isfinite(diff)) and diff <= ref16.atol
    return _check(PASSED if ok else FAILED, f"max |fp16 - fp32| {diff:.3g} vs the fp16 atol {ref16.atol:.3g}",
                  max_abs=diff, atol=ref16.atol)


def _device_io(session, x: np.ndarray, device: str, out_shape: tuple[int, ...] | None = None):
    """An IO binding with the input copied to `device` and the output on `device` (preallocated if shaped)."""
    import onnxruntime as ort

    name, out = session.get_inputs()[0].name, session.get_outputs()[0].name
    binding = session.io_binding()
    x_dev = ort.OrtValue.ortvalue_from_numpy(x, device, 0)
    binding.bind_ortvalue_input(name, x_dev)
    y_dev = None
    if out_shape is None:
        binding.bind_output(out, device)
    else:
        y_dev = ort.OrtValue.ortvalue_from_shape_and_type(out_shape, np.float32, device, 0)
        binding.bind_ortvalue_output(out, y_dev)
    return binding, (x_dev, y_dev)


def check_io_binding(model, device: str) -> dict:
    if model is None:
        return _check(FAILED, "the fp32 model did not load")
    ref = _stored(model)
    x = ref.inputs if ref is not None else np.full((2, *model.input_shape), -40.0, np.float32)
    before = model.io_binding
    try:
        model.io_binding = False
        plain = model.run(x)
        model.io_binding = True
        bound = model.run(x)
    finally:
        model.io_binding = before
    binding, _ = _device_io(model.session, x, device)
    model.session.run_with_iobinding(binding)
    on_device = binding.get_outputs()[0]
    placed = on_device.device_name().lower()
    diff = max(float(np.abs(bound - plain).max()), float(np.abs(on_device.numpy() - plain).max()))
    ok = diff <= 1e-6 and placed == device
    return _check(PASSED if ok else FAILED, f"bound vs plain max abs {diff:.3g}; output bound on {placed}",
                  max_abs=diff, output_device=placed)


def check_cuda_graph(path: Path, provider: str, reference) -> dict:
    """enable_cuda_graph at a fixed batch on device buffers; not applicable when the session refuses it."""
    import onnxruntime as ort

    if provider != "cuda":
        return _check(NOT_APPLICABLE, "CUDA graphs are a CUDA provider feature (this run uses the CPU provider)")
    x = np.resize(reference, (GRAPH_BATCH, *reference.shape[1:])).astype(np.float32)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=[(CUDA, {"enable_cuda_graph": "1"})])
        binding, (_, y_dev) = _device_io(session, x, "cuda", (GRAPH_BATCH, NUM_DIMENSIONS))
        for _ in range(2):  # onnxruntime runs the graph plainly first, then captures it
            session.run_with_iobinding(binding)
        t0 = time.perf_counter()
        session.run_with_iobinding(binding)  # replays it
        replay_ms = (time.perf_counter() - t0) * 1e3
        graphed = y_dev.numpy()
    except Exception as exc:  # onnxruntime's own error types: the session refuses graph capture
        return _check(NOT_APPLICABLE, f"the session refuses CUDA graphs: {str(exc).splitlines()[0][:300]}")
    return _check(PASSED if np.isfinite(graphed).all() else FAILED,
                  f"captured and replayed at batch {GRAPH_BATCH} ({replay_ms:.2f} ms per replay)",
                  replay_ms=replay_ms, batch=GRAPH_BATCH, output=graphed.tolist())


def check_graph_matches(result: dict, model, x: np.ndarray) -> dict:
    """A captured graph must score like the plain session on the same batch."""
    if result["status"] != PASSED:
        return result
    diff = float(np.abs(np.asarray(result.pop("output")) - model.run(x)).max())
    result["max_abs_vs_plain"] = diff
    if diff > 1e-5:
        result |= {"status": FAILED, "detail": result["detail"] + f"; differs from the plain run by {diff:.3g}"}
    return result


def check_latency(models: dict, reference, runs: int) -> dict:
    from benchmarks.warm import batch_of, time_runs

    figures, failed = {}, []
    for precision, model in models.items():
        if model is None:
            failed.append(precision)
            continue
        for batch in BATCHES:
            summary, _ = time_runs(model.run, batch_of(reference, batch), warmup=2, runs=runs)
            figures[f"{precision}/{batch}"] = {k: summary[k] for k in ("p50_s", "p90_s", "runs", "output_finite")}
            if not summary["output_finite"]:
                failed.append(f"{precision}/{batch}")
    detail = ", ".join(f"{k} {v['p50_s'] * 1e3:.1f} ms" for k, v in figures.items())
    return _check(FAILED if failed else PASSED, detail + (f"; failed: {failed}" if failed else ""), runs=figures)


def check_cold_start(path: Path, provider: str) -> dict:
    from benchmarks.workers import WorkerError, run_module
    from convert.parity import shipped_clips

    clips = shipped_clips()
    if not clips:
        return _check(FAILED, "no shipped clip to score (convert/clips)")
    cpus = usable_cpus()
    args = ["ort", "--model", str(path), "--audio", str(clips[0]), "--cpus", ",".join(map(str, cpus)),
            "--device", provider]
    try:
        result = run_module("benchmarks.cold", args, cpus, provider, lambda _: None, timeout=300)
    except WorkerError as exc:
        return _check(FAILED, str(exc).splitlines()[0])
    ok = result.get("device") == provider
    return _check(PASSED if ok else FAILED, f"{result['total_s']:.2f} s from process start to scores on "
                  f"{result.get('device')}", total_s=result["total_s"], phases=result["phases"])


def run_checks(fp32_path: Path, fp16_path: Path, provider: str, runs: int) -> dict:
    device = "cuda" if provider == "cuda" else "cpu"
    loaded = {p: _load(path, device) for p, path in (("fp32", fp32_path), ("fp16", fp16_path))}
    models = {p: m for p, (m, _) in loaded.items()}
    errors = {p: e for p, (_, e) in loaded.items() if e}
    checks = {"session": check_session(models, errors, provider),
              "self_check_fp32": check_self_check(models["fp32"], "fp32"),
              "self_check_fp16": check_self_check(models["fp16"], "fp16"),
              "fp16_vs_fp32": check_fp16_vs_fp32(models["fp32"], models["fp16"]),
              "io_binding": check_io_binding(models["fp32"], device)}
    ref = _stored(models["fp32"]) if models["fp32"] is not None else None
    windows = ref.inputs if ref is not None else np.full((2, 128, 128), -40.0, np.float32)
    graph = check_cuda_graph(fp32_path, provider, windows)
    batch = np.resize(windows, (GRAPH_BATCH, *windows.shape[1:])).astype(np.float32)
    checks["cuda_graph"] = check_graph_matches(graph, models["fp32"], batch) if models["fp32"] else graph
    checks["latency"] = check_latency(models, windows, runs)
    checks["cold_start"] = check_cold_start(fp32_path, device)
    return checks


def summary_doc(checks: dict, provider: str, paths: dict) -> dict:
    import onnxruntime as ort

    passed = all(c["status"] != FAILED for c in checks.values())
    return {"passed": passed, "exit_code": 0 if passed else 1, "provider": provider, "gpus": gpus(),
            "onnxruntime": ort.__version__, "models": {p: str(v) for p, v in paths.items()}, "checks": checks}


def print_summary(doc: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text without rich
        for name, c in doc["checks"].items():
            print(f"{c['status']:15s} {name:16s} {c['detail']}")
        print("PASSED" if doc["passed"] else "FAILED")
        return
    table = Table(title=f"GPU check ({doc['provider']}, onnxruntime {doc['onnxruntime']}, "
                        f"{', '.join(doc['gpus']) or 'no GPU listed'})")
    for column in ("check", "status", "detail"):
        table.add_column(column)
    style = {PASSED: "green", FAILED: "bold red", NOT_APPLICABLE: "yellow"}
    for name, c in doc["checks"].items():
        table.add_row(name, f"[{style[c['status']]}]{c['status']}[/]", c["detail"])
    latency = Table(title="warm latency (ms)")
    for column in ("model/batch", "p50", "p90"):
        latency.add_column(column, justify="right")
    for key, r in doc["checks"]["latency"].get("runs", {}).items():
        latency.add_row(key, f"{r['p50_s'] * 1e3:.2f}", f"{r['p90_s'] * 1e3:.2f}")
    console = Console()
    console.print(table)
    console.print(latency)
    console.print("[green]PASSED[/]" if doc["passed"] else "[bold red]FAILED[/]: a check above failed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0],
                                     epilog=f"exit codes: 0 passed, 1 a check failed, 2 usage error, {NO_GPU} no GPU")
    parser.add_argument("--model", type=Path, help=f"the fp32 model (default {DEFAULT_MODEL}, or "
                        f"{DEFAULT_MODEL.with_suffix('.fp32.onnx').name} beside it where an auto export wrote that)")
    parser.add_argument("--fp16", type=Path, help="the fp16 model (default: MODEL.fp16.onnx beside the fp32 one)")
    parser.add_argument("--out", type=Path, help="also write the summary as JSON here")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per batch size (default 10)")
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    why = no_gpu_reason(args.provider)
    if why:
        print(f"no GPU to check: {why} (exit {NO_GPU})", file=sys.stderr)
        return NO_GPU
    model = args.model or default_fp32()
    fp16 = args.fp16 or model.with_name(f"{model.stem.removesuffix('.fp32')}.fp16{model.suffix}")
    missing = [str(p) for p in (model, fp16) if not p.is_file()]
    if missing:
        parser.error(f"model file not found: {', '.join(missing)} (export with `python -m convert export "
                     f"--quantize auto`, or pass --model/--fp16)")
    paths = {"fp32": model, "fp16": fp16}
    doc = summary_doc(run_checks(model, fp16, args.provider, args.runs), args.provider, paths)
    print_summary(doc)
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2))
    return doc["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
