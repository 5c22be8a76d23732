"""Publishing variants: which precisions an export makes, their parity gates, metadata and files."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

from convert.checkpoint import load_checkpoint
from convert.errors import ExportError, ParityError
from convert.files import write_model
from convert.forward import build_forward
from convert.int8_static import calibration_windows
from convert.metadata import describe, self_check_section
from convert.options import DEFAULT_PREOPTIMIZE, QUANTIZE_CHOICES, VariantOptions
from convert.parity import NEIGHBOUR_ATOL, Tolerance, clip_references, neighbour_change, random_references, run_gate
from convert.process_memory import low_memory_malloc, release_jax, release_weights
from convert.quantize import make_variant, op_counts
from convert.staging import Staged, finish_stage, publish, write_stage
from runtime.model import PRECISIONS, OnnxModel, parse_metadata

log = logging.getLogger(__name__)


def plan(quantize: str) -> tuple[str, ...]:
    """The precisions an export with `--quantize quantize` produces."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown --quantize {quantize!r}; choose one of {QUANTIZE_CHOICES}")
    return {"none": ("fp32",), "auto": PRECISIONS}.get(quantize, (quantize,))


def recommend(reports: dict[str, dict]) -> dict[str, str]:
    """Variant to deploy per device among those that passed: int8 on CPU, fp16 on GPU, else fp32."""
    passed = {p for p, r in reports.items() if r.get("passed")}
    return {"cpu": "int8" if "int8" in passed else "fp32", "gpu": "fp16" if "fp16" in passed else "fp32"}


# onnxruntime-web (clients/web, the on-device page): its WebAssembly build runs every operator of every variant,
# com.microsoft ones included (int8's MatMulIntegerToFloat: checked in Chromium, tests/test_on_device_page.py);
# its WebGPU backend has no kernel for the integer ones (onnxruntime/contrib_ops/webgpu/webgpu_contrib_kernels.cc,
# core/providers/webgpu: no MatMulInteger, MatMulIntegerToFloat or DynamicQuantizeLinear), which then run on the
# WebAssembly fallback with copies each way. fp16 is for GPUs; WebGPU runs it where the adapter has shader-f16.
WEBGPU_MISSING = frozenset({"MatMulInteger", "DynamicQuantizeLinear", "com.microsoft:MatMulIntegerToFloat",
                            "com.microsoft:DynamicQuantizeMatMul"})


def web_backends(precision: str, nodes: dict[str, int]) -> list[str]:
    """The onnxruntime-web backends a variant is meant for, best first: webgpu, wasm, or both."""
    if precision == "fp16":
        return ["webgpu"]
    return ["wasm"] if WEBGPU_MISSING & set(nodes) else ["webgpu", "wasm"]


def web_section(this: str, builds: dict[str, dict], reports: dict[str, dict]) -> dict:
    """Which variants are meant for the web: this file's backends, each variant's, and the pick per backend."""
    by_variant = {p: web_backends(p, b.get("nodes", {})) for p, b in builds.items()}
    passed = {p for p, r in reports.items() if r.get("passed")} & set(by_variant)
    pick = {backend: next((p for p in ("int8", "fp16", "fp32") if p in passed and by_variant[p][0] == backend),
                          "fp32") for backend in ("wasm", "webgpu")}
    return {"backends": by_variant[this], "variants": by_variant, "recommended": pick,
            "runtime": "onnxruntime-web (clients/web)"}


def variant_paths(out: Path, precisions: tuple[str, ...], main: str) -> dict[str, Path]:
    """`out` for the main variant; MODEL.<precision>.onnx beside it for the others."""
    return {p: out if p == main else out.with_name(f"{out.stem}.{p}{out.suffix}") for p in precisions}


SUMMARY_KEYS = ("max_abs", "max_abs_model", "max_abs_end_to_end", "mean_abs_clip_windows", "threshold_flips",
                "threshold_flips_windows", "threshold_flips_recordings", "windows", "recordings", "platform")


def gate_summary(report: dict) -> dict:
    """The gate's headline figures, recorded in every variant's metadata."""
    return {"passed": report["passed"], "atol": report["tolerance"]["model"],
            "atol_end_to_end": report["tolerance"]["end_to_end"],
            **{k: report[k] for k in SUMMARY_KEYS if k in report}}


def gate_staged(staged: Staged, precision: str, references, randoms, atol: float | None, seed: int,
                build: dict | None = None) -> dict:
    """The parity gate on a staged file, loaded by the runtime as it will be served (CPU). Raises ParityError.

    A variant whose `build` says it is batch_independent is also run alone and among batch neighbours
    (convert.parity.neighbour_change): the largest change goes into the build, and over NEIGHBOUR_ATOL the
    variant fails.
    """
    model = OnnxModel(staged.path, device="cpu")
    try:
        report = run_gate(None, model, tolerance=Tolerance.for_precision(precision, atol), seed=seed,
                          references=references, randoms=randoms)
        if build is not None and build.get("batch_independent"):
            change = neighbour_change(model, [r.mel for r in references])
            build["neighbour_change"] = change
            report["neighbour_change"] = change
            if change > NEIGHBOUR_ATOL:
                report["passed"] = False
                raise ParityError(f"{precision} variant is built to ignore its batch neighbours, but a window's "
                                  f"scores moved {change:.1e} with them (over {NEIGHBOUR_ATOL:.0e})", report)
        return report
    finally:
        del model


def variant_sections(ckpt, precision: str, references, atol: float | None, backend: dict | None = None) -> dict:
    """describe() plus the self-check windows with this variant's model tolerance."""
    tol = Tolerance.for_precision(precision, atol).model
    return {**describe(ckpt, precision, backend=backend), "self_check": self_check_section(references, tol)}


def variants_doc(
    this: str,
    builds: dict[str, dict],
    reports: dict[str, dict],
    paths: dict[str, Path],
    recommended: dict[str, str] | None,
) -> dict:
    """The `variants` metadata section: this file's build, every gate run, sibling files, recommendations (the
    server's per device, and `web`: which variants onnxruntime-web's backends are meant to run)."""
    doc = {
        "this": this,
        "build": builds[this],
        "files": {p: paths[p].name for p in builds if p in paths},
        "gates": {p: gate_summary(r) for p, r in reports.items()},
        "web": web_section(this, builds, reports),
    }
    if recommended:
        doc["recommended"] = recommended
    return doc


def publish_variants(
    fp32,
    ckpt,
    forward,
    out: Path,
    variants: VariantOptions,
    *,
    fp32_report: dict,
    references=None,
    randoms=None,
    clips=None,
    seed: int = 0,
    preoptimize: str = DEFAULT_PREOPTIMIZE,
    scratch: Path | None = None,
) -> tuple[dict[str, dict], dict[str, Path]]:
    """Make, gate and write the variants `variants.quantize` asks for from a gated fp32 graph; (reports, paths).

    Every variant is gated before anything is written. One that fails raises ParityError and nothing is
    written, unless quantize is auto and `allow_partial`: then it is left out, the others are written and
    the recommendation falls back to fp32. One variant is in memory at a time: each is staged to a file in
    `scratch` (default: a temporary folder beside `out`), gated from it, and published from it at the end.
    `fp32`: a convert.staging.Staged file, or an fp32 ModelProto as traced. `forward` is needed only when
    `references` or `randoms` is not given. fp16 (for GPUs) is never pre-optimised for the CPU.
    """
    precisions = plan(variants.quantize)
    if references is None:  # librosa + JAX on the clips, computed once for every variant's gate
        references = clip_references(forward, clips)
    if randoms is None:
        randoms = random_references(forward, seed)
    with contextlib.ExitStack() as stack:
        if scratch is None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".percepiano-variants-",
                                                                           dir=Path(out).parent)))
        if not isinstance(fp32, Staged):  # a gated fp32 proto, as traced
            fp32 = Staged(write_model(Path(scratch) / "fp32.onnx", fp32), Path(scratch) / "fp32.onnx",
                          {"optimized": "none"})
        backend = staged_backend(fp32)  # the variants record the converter that made their fp32 graph
        made, builds, reports = _make_and_gate(fp32, ckpt, precisions, fp32_report, references, randoms, seed,
                                               variants, preoptimize, Path(scratch), backend)
        return _publish(made, builds, reports, ckpt, Path(out), variants, precisions, references, backend)


def _make_and_gate(fp32: Staged, ckpt, precisions: tuple[str, ...], fp32_report: dict, references, randoms,
                   seed: int, variants: VariantOptions, preoptimize: str, scratch: Path,
                   backend: dict | None) -> tuple[dict, dict, dict]:
    """Each variant made, staged and gated; (staged files that passed, builds, reports). Raises ParityError
    when one fails, unless quantize auto and allow_partial leave it out."""
    import onnx

    reports, made, builds, failures = {"fp32": fp32_report}, {}, {}, []
    calibration = None
    if "int8" in precisions and variants.int8_activations == "static":
        calibration = calibration_windows(variants.calibration_clips)
        gate = {r.clip.resolve() for r in references}
        shared = sorted(c.name for c in (variants.calibration_clips or []) if Path(c).resolve() in gate)
        if shared:
            log.warning("int8 is calibrated on %s, which the parity gate also scores: the gate is then not held "
                        "out for int8", ", ".join(shared))
        log.info("int8 activation ranges: %d windows of %d calibration clips", len(calibration["windows"]),
                 len(calibration["clips"]))
    for precision in precisions:
        if precision == "fp32" and not variants.optimize:
            made[precision] = fp32
            builds[precision] = {"optimized": False, "batch_independent": True,
                                 "nodes": op_counts(onnx.load(str(fp32.raw)))}
            continue
        log.info("making the %s variant%s", precision, " (optimized graph)" if variants.optimize else "")
        variant = make_variant(onnx.load(str(fp32.raw)), precision, ckpt.config, optimized=variants.optimize,
                               per_channel=variants.per_channel, reduce_range=variants.reduce_range, owned=True,
                               int8_activations=variants.int8_activations, calibration=calibration)
        sections = variant_sections(ckpt, precision, references, variants.atol(precision), backend)
        level = "none" if precision == "fp16" else preoptimize
        raw = write_stage(variant.proto, sections, scratch / f"{precision}.onnx", level)
        builds[precision] = variant.build
        del variant
        staged = finish_stage(raw, level, keep_raw=False)
        try:
            reports[precision] = gate_staged(staged, precision, references, randoms, variants.atol(precision), seed,
                                             builds[precision])
        except ParityError as exc:
            reports[precision] = exc.report
            failures.append(exc)
            log.warning("%s variant fails its parity gate (%s): not written", precision, exc)
            continue
        made[precision] = staged
    if failures and not (variants.quantize == "auto" and variants.allow_partial and "fp32" in made):
        hint = "; pass --allow-partial to write the variants that passed" if variants.quantize == "auto" else ""
        raise ParityError("; ".join(str(e) for e in failures) + f": nothing written{hint}", failures[0].report)
    return made, builds, reports


def _publish(made: dict[str, Staged], builds: dict, reports: dict, ckpt, out: Path, variants: VariantOptions,
             precisions: tuple[str, ...], references, backend: dict | None) -> tuple[dict, dict]:
    """Write the gated variants with their final metadata (the `variants` section names the siblings)."""
    for precision in set(precisions) - set(made):  # failed, left out with allow_partial
        stale = variant_paths(out, (precision,), "")[precision]
        if stale.exists():
            log.warning("%s is left from an earlier export: not this export's variant", stale)
    recommended = recommend(reports) if variants.quantize == "auto" else None
    paths = variant_paths(out, tuple(made), recommended["cpu"] if recommended else precisions[0])
    for precision, staged in made.items():
        doc = variants_doc(precision, builds, reports, paths, recommended)
        sections = variant_sections(ckpt, precision, references, variants.atol(precision), backend)
        publish(staged.path, paths[precision],
                {**sections, "graph": staged.graph, "parity": reports[precision], "variants": doc})
        log.info("wrote %s (%s, %.1f MB)", paths[precision], precision, paths[precision].stat().st_size / 1e6)
    return reports, paths


def staged_backend(staged: Staged) -> dict | None:
    """The `backend` section of a staged fp32 file's metadata (the converter that made the graph), if any."""
    import json

    from runtime.model import METADATA_KEY, header_metadata

    doc = header_metadata(staged.path).get(METADATA_KEY)
    return json.loads(doc).get("backend") if doc else None


def retrace(forward, ckpt, backend: dict):
    """The fp32 graph as its converter wrote it (before onnxruntime's optimisation), at the export's opset."""
    if backend.get("name") == "tf2onnx":
        from convert.tf2onnx.backend import DEFAULT_OPSET as TF2ONNX_OPSET
        from convert.tf2onnx.backend import to_onnx_tf2onnx

        return to_onnx_tf2onnx(ckpt, int(backend.get("opset") or TF2ONNX_OPSET))[0]
    from convert.trace import DEFAULT_OPSET, to_onnx

    return to_onnx(forward, int(backend.get("opset") or DEFAULT_OPSET))


def quantize_file(
    model: Path,
    checkpoint: Path,
    out: Path | None = None,
    variants: VariantOptions | None = None,
    *,
    clips=None,
    seed: int = 0,
) -> tuple[dict[str, dict], dict[str, Path]]:
    """Variants of an already exported fp32 model, gated against JAX with the checkpoint it came from.

    `variants` default: int8 (quantize none is refused). `out` defaults to MODEL.<precision>.onnx beside the
    model; `auto` needs an explicit `out`.
    """
    import tempfile

    from runtime.model import graph_section, header_metadata

    variants = variants or VariantOptions(quantize="int8")
    quantize = variants.quantize
    model = Path(model)
    if not model.is_file():
        raise FileNotFoundError(f"model file not found: {model}")
    if quantize == "none":
        raise ExportError(f"cannot quantize to {quantize!r}; choose int8, fp16 or auto")
    if out is None and quantize == "auto":
        raise ExportError("quantize auto writes several files: name the main one with --out")
    props = header_metadata(model)
    info = parse_metadata(props, str(model))
    if info.precision != "fp32" or not (info.parity or {}).get("passed"):
        raise ExportError(f"{model} is not a gated fp32 export ({info.precision}); quantize the fp32 model")
    ckpt = load_checkpoint(checkpoint)
    if ckpt.sha256 != info.sha256:
        raise ExportError(
            f"{model} was exported from checkpoint {info.sha256[:12]}, but {checkpoint} is "
            f"{ckpt.sha256[:12]}: pass the checkpoint it was exported from"
        )
    out = Path(out) if out else model.with_name(f"{model.stem}.{quantize}{model.suffix}")
    graph = graph_section(props)
    backend = info.raw.get("backend") or {}
    low_memory_malloc()
    forward = build_forward(ckpt)
    if backend.get("name") != "tf2onnx":
        release_weights(ckpt)  # JAX holds its copy; tf2onnx converts from these weights (below)
    references = clip_references(forward, clips)
    randoms = random_references(forward, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".percepiano-quantize-", dir=out.parent) as tmp:
        raw = model
        if graph.get("optimized", "none") != "none":  # saved optimised: variants are made from the traced graph
            log.info("%s was saved optimised (%s): converting the checkpoint again (%s) for the variants",
                     model.name, graph["optimized"], backend.get("name", "jax2onnx"))
            raw = Path(tmp) / "fp32.traced.onnx"
            write_model(raw, retrace(forward, ckpt, backend))
        release_weights(ckpt)
        del forward
        release_jax()
        return publish_variants(
            Staged(model, raw, graph), ckpt, None, out, variants, fp32_report=info.parity, references=references,
            randoms=randoms, seed=seed, scratch=Path(tmp))
