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
from convert.forward import build_forward
from convert.metadata import describe, jax2onnx_backend, self_check_section, set_metadata
from convert.parity import Tolerance, clip_references, random_references, run_gate
from convert.process_memory import low_memory_malloc, release_jax, release_weights
from convert.quantize import DEFAULT_INT8_ACTIVATIONS, QUANTIZE_CHOICES
from convert.staging import (
    DEFAULT_PREOPTIMIZE,
    PREOPTIMIZE_CHOICES,
    finish_stage,
    publish,
    write_stage,
)
from convert.trace import DEFAULT_OPSET, to_onnx
from runtime.model import OnnxModel

log = logging.getLogger(__name__)

BACKENDS = ("jax2onnx", "tf2onnx")  # tf2onnx: jax2tf -> TensorFlow -> tf2onnx in its own venv (convert.tf2onnx)
__all__ = ["DEFAULT_OPSET", "ExportResult", "build_forward", "export", "set_metadata", "to_onnx"]


@dataclass
class ExportResult:
    """What `export` produced: the written paths and the parity report of each."""

    path: Path
    checkpoint: Path
    demo: bool
    seconds: float
    reports: dict[str, dict] = field(default_factory=dict)
    written: dict[str, Path] = field(default_factory=dict)


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
    preoptimize: str = DEFAULT_PREOPTIMIZE,
    int8_activations: str = DEFAULT_INT8_ACTIVATIONS,
) -> ExportResult:
    """Export a checkpoint (a demo one when None) to a parity-checked ONNX model at `out`.

    `quantize` none: fp32; int8 / fp16: that variant at `out`; auto: the recommended CPU variant at `out`,
    the others beside it as MODEL.<precision>.onnx (see convert.variants.publish_variants); with auto, a
    variant failing its gate raises ParityError unless `allow_partial`. `clips`: real audio for the gate
    (None: the shipped clips; an empty set is refused). `demo` marks the metadata `source.demo` for a
    checkpoint the caller knows to be a convert.demo stand-in; an export without a checkpoint makes one and
    marks it itself. `backend` tf2onnx converts with the second, independent converter (convert.tf2onnx);
    `opset` defaults to the backend's (23 for jax2onnx, 18 for tf2onnx). `preoptimize` (extended, or none):
    the fp32 and int8 files are saved as onnxruntime optimises them for the CPU at that level, gated as
    written, and marked so that the runtime does not optimise them again on the CPU (convert.staging). Peak
    memory: one large model at a time.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize {quantize!r}; choose one of {QUANTIZE_CHOICES}")
    if preoptimize not in PREOPTIMIZE_CHOICES:
        raise ValueError(f"unknown preoptimize {preoptimize!r}; choose one of {PREOPTIMIZE_CHOICES}")
    start = time.perf_counter()
    low_memory_malloc()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Scratch files beside `out` (same file system; /tmp may be RAM): the demo checkpoint, the staged models.
    with tempfile.TemporaryDirectory(prefix=".percepiano-export-", dir=out.parent) as tmp:
        if checkpoint is None:
            from convert.demo import make_demo_checkpoint

            demo = True
            checkpoint = make_demo_checkpoint(Path(tmp) / "demo_checkpoint.pkl", preset="production", seed=seed)
            log.warning("no --checkpoint given: exporting a demo checkpoint (production preset, random weights)")
        log.info("loading checkpoint %s", checkpoint)
        ckpt = load_checkpoint(checkpoint)
        forward = build_forward(ckpt)
        if backend == "jax2onnx":
            release_weights(ckpt)  # the forward function holds JAX's copy (tf2onnx still needs them: below)
        references = clip_references(forward, clips)  # before the trace: a bad clip set fails fast; reused by all
        randoms = random_references(forward, seed)  # likewise: with both, no gate needs JAX again
        log.info("exporting the model (%d layers, width %d) with %s, opset %s",
                 ckpt.config.num_layers, ckpt.config.embed_dim, backend, opset or "default")
        if backend == "tf2onnx":  # converted in its own venv from the checkpoint's weights (still held here)
            from convert.tf2onnx.backend import DEFAULT_OPSET as TF2ONNX_OPSET
            from convert.tf2onnx.backend import to_onnx_tf2onnx

            proto, made_by = to_onnx_tf2onnx(ckpt, opset or TF2ONNX_OPSET)
            release_weights(ckpt)  # the graph holds its own copy now
        else:
            opset = opset or DEFAULT_OPSET
            proto, made_by = to_onnx(forward, opset), {**jax2onnx_backend(), "opset": opset}
        del forward
        release_jax()
        tolerance = Tolerance.for_precision("fp32", atol)
        sections = {**describe(ckpt, "fp32", demo=demo, backend=made_by),
                    "self_check": self_check_section(references, tolerance.model)}
        raw = write_stage(proto, sections, Path(tmp) / "fp32.onnx", preoptimize)
        del proto  # from here on the graph is read from the staged files, one model in memory at a time
        staged = finish_stage(raw, preoptimize)
        model = OnnxModel(staged.path, device="cpu")  # the runtime's own loader checks exactly what is written
        report = run_gate(None, model, tolerance=tolerance, seed=seed, references=references, randoms=randoms)
        del model
        if quantize == "none" and not optimize:
            publish(staged.path, out, {**sections, "graph": staged.graph, "parity": report})
            log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
            reports, written = {"fp32": report}, {"fp32": out}
        else:  # each variant is made from the gated fp32 graph and passes the same gate before it is written
            from convert.variants import publish_variants

            reports, written = publish_variants(
                staged, ckpt, None, out, quantize, fp32_report=report, references=references, randoms=randoms,
                seed=seed, atol={"int8": int8_atol, "fp16": fp16_atol}, per_channel=per_channel,
                reduce_range=reduce_range, optimized=optimize, allow_partial=allow_partial, demo=demo,
                preoptimize=preoptimize, scratch=Path(tmp), int8_activations=int8_activations)
    return ExportResult(path=out, checkpoint=Path(checkpoint), demo=demo, seconds=time.perf_counter() - start,
                        reports=reports, written=written)

