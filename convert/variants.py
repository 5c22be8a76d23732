"""Publishing variants: which precisions an export makes, their parity gates, metadata and files."""

from __future__ import annotations

import logging
from pathlib import Path

from convert.checkpoint import load_checkpoint
from convert.errors import ExportError, ParityError
from convert.files import write_atomic
from convert.forward import build_forward
from convert.metadata import backend_of, describe, self_check_section, set_metadata
from convert.parity import Tolerance, clip_references, run_gate
from convert.quantize import QUANTIZE_CHOICES, Variant, make_variant, op_counts
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


def gate_variant(variant: Variant, forward, sections: dict, references, atol: float | None, seed: int) -> dict:
    """Run the fp32 parity gate on a variant, through the runtime's own loader (CPU). Raises ParityError."""
    set_metadata(variant.proto, sections)
    model = OnnxModel(variant.proto.SerializeToString(), device="cpu")
    return run_gate(forward, model, tolerance=Tolerance.for_precision(variant.precision, atol), seed=seed,
                    references=references)


def variant_sections(ckpt, precision: str, references, atol: float | None, demo: bool,
                     backend: dict | None = None) -> dict:
    """describe() plus the self-check windows with this variant's model tolerance."""
    tol = Tolerance.for_precision(precision, atol).model
    return {**describe(ckpt, precision, demo=demo, backend=backend), "self_check": self_check_section(references, tol)}


def variants_doc(
    this: str,
    made: dict[str, Variant],
    reports: dict[str, dict],
    paths: dict[str, Path],
    recommended: dict[str, str] | None,
) -> dict:
    """The `variants` metadata section: this file's build, every gate run, sibling files, recommendations."""
    doc = {
        "this": this,
        "build": made[this].build,
        "files": {p: paths[p].name for p in made},
        "gates": {p: gate_summary(r) for p, r in reports.items()},
    }
    if recommended:
        doc["recommended"] = recommended
    return doc


def publish_variants(
    fp32,
    ckpt,
    forward,
    out: Path,
    quantize: str,
    *,
    fp32_report: dict,
    references=None,
    clips=None,
    seed: int = 0,
    atol: dict[str, float | None] | None = None,
    per_channel: bool = False,
    reduce_range: bool = True,
    optimized: bool = False,
    allow_partial: bool = False,
    demo: bool = False,
) -> tuple[dict[str, dict], dict[str, Path]]:
    """Make, gate and write the variants `quantize` asks for from a gated fp32 proto; (reports, written paths).

    Every variant is gated before anything is written. One that fails raises ParityError and nothing is
    written, unless `quantize` is auto and `allow_partial`: then it is left out, the others are written and
    the recommendation falls back to fp32.
    """
    precisions, atol = plan(quantize), atol or {}
    if references is None:  # librosa + JAX on the clips, computed once for every variant's gate
        references = clip_references(forward, clips)
    reports, made, failures = {"fp32": fp32_report}, {}, []
    backend = backend_of(fp32)  # the variants record the converter that made their fp32 graph
    for precision in precisions:
        if precision == "fp32" and not optimized:
            made[precision] = Variant("fp32", fp32, {"optimized": False, "nodes": op_counts(fp32)})
            continue
        log.info("making the %s variant%s", precision, " (optimized graph)" if optimized else "")
        variant = make_variant(
            fp32, precision, ckpt.config, optimized=optimized, per_channel=per_channel, reduce_range=reduce_range
        )
        sections = variant_sections(ckpt, precision, references, atol.get(precision), demo, backend)
        try:
            reports[precision] = gate_variant(variant, forward, sections, references, atol.get(precision), seed)
        except ParityError as exc:
            reports[precision] = exc.report
            failures.append(exc)
            log.warning("%s variant fails its parity gate (%s): not written", precision, exc)
            continue
        made[precision] = variant
    if failures and not (quantize == "auto" and allow_partial and "fp32" in made):
        hint = "; pass --allow-partial to write the variants that passed" if quantize == "auto" else ""
        raise ParityError("; ".join(str(e) for e in failures) + f": nothing written{hint}", failures[0].report)
    for exc in failures:
        stale = variant_paths(Path(out), (exc.report["precision"],), "")[exc.report["precision"]]
        if stale.exists():
            log.warning("%s is left from an earlier export: not this export's variant", stale)
    recommended = recommend(reports) if quantize == "auto" else None
    paths = variant_paths(Path(out), tuple(made), recommended["cpu"] if recommended else precisions[0])
    for precision, variant in made.items():
        doc = variants_doc(precision, made, reports, paths, recommended)
        sections = variant_sections(ckpt, precision, references, atol.get(precision), demo, backend)
        set_metadata(variant.proto, {**sections, "parity": reports[precision], "variants": doc})
        write_atomic(paths[precision], lambda fh, v=variant: fh.write(v.proto.SerializeToString()))
        log.info("wrote %s (%s, %.1f MB)", paths[precision], precision, paths[precision].stat().st_size / 1e6)
    return reports, paths


def quantize_file(
    model: Path,
    checkpoint: Path,
    out: Path | None = None,
    quantize: str = "int8",
    *,
    clips=None,
    seed: int = 0,
    **options,
) -> tuple[dict[str, dict], dict[str, Path]]:
    """Variants of an already exported fp32 model, gated against JAX with the checkpoint it came from.

    `out` defaults to MODEL.<precision>.onnx beside the model; `auto` needs an explicit `out`.
    `options` are publish_variants' atol, per_channel, reduce_range, optimized and allow_partial; `demo`
    defaults to what the fp32 model's metadata says.
    """
    import onnx

    model = Path(model)
    if not model.is_file():
        raise FileNotFoundError(f"model file not found: {model}")
    if quantize not in ("int8", "fp16", "auto"):
        raise ExportError(f"cannot quantize to {quantize!r}; choose int8, fp16 or auto")
    if out is None and quantize == "auto":
        raise ExportError("quantize auto writes several files: name the main one with --out")
    proto = onnx.load(str(model))
    info = parse_metadata({p.key: p.value for p in proto.metadata_props}, str(model))
    options.setdefault("demo", bool(info.source.get("demo")))
    if info.precision != "fp32" or not (info.parity or {}).get("passed"):
        raise ExportError(f"{model} is not a gated fp32 export ({info.precision}); quantize the fp32 model")
    ckpt = load_checkpoint(checkpoint)
    if ckpt.sha256 != info.sha256:
        raise ExportError(
            f"{model} was exported from checkpoint {info.sha256[:12]}, but {checkpoint} is "
            f"{ckpt.sha256[:12]}: pass the checkpoint it was exported from"
        )
    out = Path(out) if out else model.with_name(f"{model.stem}.{quantize}{model.suffix}")
    return publish_variants(
        proto, ckpt, build_forward(ckpt), out, quantize, fp32_report=info.parity, clips=clips, seed=seed, **options
    )
