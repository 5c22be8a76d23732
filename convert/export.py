"""Checkpoint -> ONNX (jax2onnx) -> parity gate -> atomically written, self-describing model."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from convert.checkpoint import load_checkpoint
from convert.errors import ExportError
from convert.files import write_atomic
from convert.forward import Forward, build_forward
from convert.metadata import describe, self_check_section, set_metadata
from convert.parity import Tolerance, clip_references, run_gate
from convert.quantize import QUANTIZE_CHOICES
from runtime.constants import FEATURES, INPUT_NAME, OUTPUT_NAME
from runtime.model import OnnxModel

log = logging.getLogger(__name__)

DEFAULT_OPSET = 23
BACKENDS = ("jax2onnx", "tf2onnx")  # tf2onnx: jax2tf -> TensorFlow -> tf2onnx in its own venv (convert.legacy)
__all__ = ["DEFAULT_OPSET", "ExportResult", "build_forward", "export", "to_onnx"]


@dataclass
class ExportResult:
    """What `export` produced: the written paths and the parity report of each."""

    path: Path
    checkpoint: Path
    demo: bool
    seconds: float
    reports: dict[str, dict] = field(default_factory=dict)
    written: dict[str, Path] = field(default_factory=dict)


def to_onnx(forward: Forward, opset: int = DEFAULT_OPSET):
    """Trace the forward function into an ONNX ModelProto with a dynamic batch axis."""
    import jax2onnx

    logging.getLogger("onnx_ir.serde").setLevel(logging.ERROR)  # noisy, harmless shape-value warnings
    try:
        return jax2onnx.to_onnx(
            forward, [("batch", FEATURES.n_frames, FEATURES.n_mels)], model_name="percepiano_ast", opset=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], normalization_mode="prefer_native",
        )
    except Exception as exc:
        raise ExportError(f"jax2onnx could not export the model at opset {opset}: {exc}") from exc


def export(
    checkpoint: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    opset: int | None = None,
    backend: str = "jax2onnx",
    atol: float | None = None,
    clips: Sequence[Path] | None = None,
    seed: int = 0,
    quantize: str = "none",
    int8_atol: float | None = None,
    fp16_atol: float | None = None,
    per_channel: bool = False,
    reduce_range: bool = True,
    optimize: bool = False,
    allow_partial: bool = False,
    demo: bool = False,
) -> ExportResult:
    """Export a checkpoint (a demo one when None) to a parity-checked ONNX model at `out`.

    `quantize` none: fp32; int8 / fp16: that variant at `out`; auto: the recommended CPU variant at `out`,
    the others beside it as MODEL.<precision>.onnx (see convert.variants.publish_variants); with auto, a
    variant failing its gate raises ParityError unless `allow_partial`. `clips`: real audio for the gate
    (None: the shipped clips; an empty set is refused). `demo` marks the metadata `source.demo` for a
    checkpoint the caller knows to be a convert.demo stand-in; an export without a checkpoint makes one and
    marks it itself. `backend` tf2onnx converts with the second, independent converter (convert.legacy);
    `opset` defaults to the backend's (23 for jax2onnx, 18 for tf2onnx).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize {quantize!r}; choose one of {QUANTIZE_CHOICES}")
    start = time.perf_counter()
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="percepiano-demo-") as tmp:
        if checkpoint is None:
            from convert.demo import make_demo_checkpoint

            demo = True
            checkpoint = make_demo_checkpoint(Path(tmp) / "demo_checkpoint.pkl", preset="production", seed=seed)
            log.warning("no --checkpoint given: exporting a demo checkpoint (production preset, random weights)")
        log.info("loading checkpoint %s", checkpoint)
        ckpt = load_checkpoint(checkpoint)
        forward = build_forward(ckpt)
        references = clip_references(forward, clips)  # before the trace: a bad clip set fails fast; reused by all
        log.info("exporting the model (%d layers, width %d) with %s, opset %s",
                 ckpt.config.num_layers, ckpt.config.embed_dim, backend, opset or "default")
        if backend == "tf2onnx":
            from convert.legacy.backend import DEFAULT_OPSET as TF2ONNX_OPSET
            from convert.legacy.backend import to_onnx_tf2onnx

            proto, made_by = to_onnx_tf2onnx(ckpt, opset or TF2ONNX_OPSET)
        else:
            proto, made_by = to_onnx(forward, opset or DEFAULT_OPSET), None
        tolerance = Tolerance.for_precision("fp32", atol)
        sections = {**describe(ckpt, "fp32", demo=demo, backend=made_by),
                    "self_check": self_check_section(references, tolerance.model)}
        set_metadata(proto, sections)
        model = OnnxModel(proto.SerializeToString(), device="cpu")  # the runtime's own loader checks it
        report = run_gate(forward, model, tolerance=tolerance, seed=seed, references=references)
        set_metadata(proto, {**sections, "parity": report})
        if quantize == "none" and not optimize:
            write_atomic(out, lambda fh: fh.write(proto.SerializeToString()))
            log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
            reports, written = {"fp32": report}, {"fp32": out}
        else:  # each variant is made from the gated fp32 graph and passes the same gate before it is written
            from convert.variants import publish_variants

            reports, written = publish_variants(
                proto, ckpt, forward, out, quantize, fp32_report=report, references=references, seed=seed,
                atol={"int8": int8_atol, "fp16": fp16_atol}, per_channel=per_channel, reduce_range=reduce_range,
                optimized=optimize, allow_partial=allow_partial, demo=demo)
    return ExportResult(path=out, checkpoint=Path(checkpoint), demo=demo, seconds=time.perf_counter() - start,
                        reports=reports, written=written)
