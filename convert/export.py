"""Checkpoint -> ONNX (jax2onnx) -> parity gate -> atomically written, self-describing model."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from convert.checkpoint import load_checkpoint
from convert.forward import build_forward
from convert.metadata import describe, jax2onnx_backend, self_check_section, set_metadata
from convert.options import ExportOptions, VariantOptions
from convert.parity import Tolerance, clip_references, random_references, run_gate
from convert.process_memory import low_memory_malloc, release_jax, release_weights
from convert.staging import finish_stage, publish, write_stage
from convert.trace import DEFAULT_OPSET, to_onnx
from runtime.model import OnnxModel

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_OPSET", "ExportOptions", "ExportResult", "VariantOptions", "build_forward", "export",
           "set_metadata", "to_onnx"]


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
    options: ExportOptions | None = None,
    variants: VariantOptions | None = None,
) -> ExportResult:
    """Export a checkpoint (a demo one when None) to a parity-checked ONNX model at `out`.

    `options` (convert.options.ExportOptions): backend, opset, fp32 tolerance, the gate's clips and seed, and
    whether the files are saved pre-optimised for the CPU (then gated as written, and marked so that the
    runtime does not optimise them again; convert.staging). `variants` (VariantOptions): quantize none writes
    fp32; int8 / fp16 that variant at `out`; auto the recommended CPU variant at `out`, the others beside it
    as MODEL.<precision>.onnx (convert.variants.publish_variants); with auto, a variant failing its gate
    raises ParityError unless `allow_partial`. A checkpoint that was never trained (training_complete false,
    or no finetuning_results: convert.checkpoint.Checkpoint.untrained) is marked `source.demo` in the
    metadata. Peak memory: one large model at a time.
    """
    options = options or ExportOptions()
    variants = variants or VariantOptions()
    start = time.perf_counter()
    low_memory_malloc()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Scratch files beside `out` (same file system; /tmp may be RAM): the demo checkpoint, the staged models.
    with tempfile.TemporaryDirectory(prefix=".percepiano-export-", dir=out.parent) as tmp:
        if checkpoint is None:
            from convert.demo import make_demo_checkpoint

            checkpoint = make_demo_checkpoint(Path(tmp) / "demo_checkpoint.pkl", preset="production",
                                              seed=options.seed)
            log.warning("no --checkpoint given: exporting a demo checkpoint (production preset, random weights)")
        log.info("loading checkpoint %s", checkpoint)
        ckpt = load_checkpoint(checkpoint)
        forward = build_forward(ckpt)
        if options.backend == "jax2onnx":
            release_weights(ckpt)  # the forward function holds JAX's copy (tf2onnx still needs them: convert_graph)
        references = clip_references(forward, options.clips)  # before the trace: a bad clip set fails fast
        randoms = random_references(forward, options.seed)  # likewise; with both, no gate needs JAX again
        proto, made_by = convert_graph(ckpt, forward, options)
        del forward
        release_jax()
        tolerance = Tolerance.for_precision("fp32", options.atol)
        sections = {**describe(ckpt, "fp32", backend=made_by),
                    "self_check": self_check_section(references, tolerance.model)}
        raw = write_stage(proto, sections, Path(tmp) / "fp32.onnx", options.preoptimize)
        del proto  # from here on the graph is read from the staged files, one model in memory at a time
        staged = finish_stage(raw, options.preoptimize)
        model = OnnxModel(staged.path, device="cpu")  # the runtime's own loader checks exactly what is written
        report = run_gate(None, model, tolerance=tolerance, seed=options.seed, references=references,
                          randoms=randoms)
        del model
        if variants.quantize == "none" and not variants.optimize:
            publish(staged.path, out, {**sections, "graph": staged.graph, "parity": report})
            log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
            reports, written = {"fp32": report}, {"fp32": out}
        else:  # each variant is made from the gated fp32 graph and passes the same gate before it is written
            from convert.variants import publish_variants

            reports, written = publish_variants(
                staged, ckpt, None, out, variants, fp32_report=report, references=references, randoms=randoms,
                seed=options.seed, preoptimize=options.preoptimize, scratch=Path(tmp))
    return ExportResult(path=out, checkpoint=Path(checkpoint), demo=ckpt.untrained,
                        seconds=time.perf_counter() - start, reports=reports, written=written)


def convert_graph(ckpt, forward, options: ExportOptions) -> tuple:
    """The fp32 graph from the options' backend, and the metadata's `backend` section (converter, versions)."""
    opset = options.opset
    log.info("exporting the model (%d layers, width %d) with %s, opset %s",
             ckpt.config.num_layers, ckpt.config.embed_dim, options.backend, opset or "default")
    if options.backend == "tf2onnx":  # converted in its own venv from the checkpoint's weights (still held here)
        from convert.tf2onnx.backend import DEFAULT_OPSET as TF2ONNX_OPSET
        from convert.tf2onnx.backend import to_onnx_tf2onnx

        proto, made_by = to_onnx_tf2onnx(ckpt, opset or TF2ONNX_OPSET)
        release_weights(ckpt)  # the graph holds its own copy now
        return proto, made_by
    opset = opset or DEFAULT_OPSET
    return to_onnx(forward, opset), {**jax2onnx_backend(), "opset": opset}

