"""Checkpoint -> ONNX (jax2onnx) -> parity gate -> atomically written, self-describing model."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path

from convert.checkpoint import Checkpoint, load_checkpoint
from convert.errors import ExportError
from convert.files import write_atomic
from convert.parity import Forward, Tolerance, clip_references, run_gate, shipped_clips
from convert.quantize import QUANTIZE_CHOICES
from runtime.constants import DIMENSIONS, FEATURES, INPUT_NAME, OUTPUT_NAME
from runtime.model import METADATA_KEY, OnnxModel, build_metadata

log = logging.getLogger(__name__)

DEFAULT_OPSET = 23


@dataclass
class ExportResult:
    """What `export` produced: the written paths and the parity report of each."""

    path: Path
    checkpoint: Path
    demo: bool
    seconds: float
    reports: dict[str, dict] = field(default_factory=dict)
    written: dict[str, Path] = field(default_factory=dict)


def build_forward(ckpt: Checkpoint) -> Forward:
    """The JAX function that is exported: log-mel (B, 128, 128) -> scores in label units (B, 19)."""
    import jax
    import jax.numpy as jnp

    from convert.model import ProductionASTForRegression

    model = ProductionASTForRegression(ckpt.config)
    variables = jax.tree_util.tree_map(jnp.asarray, ckpt.variables())
    mean = jnp.asarray(ckpt.scaler_mean, jnp.float32)
    scale = jnp.asarray(ckpt.scaler_scale, jnp.float32)

    @jax.jit
    def apply(variables, mean, scale, mel):
        return model.apply(variables, mel) * scale + mean  # StandardScaler.inverse_transform, in the graph

    def forward(mel):
        # The weights are arguments of the jitted function, not closed-over constants: XLA would otherwise
        # copy all 343 MB into every executable it compiles (one per batch size the parity gate uses).
        # jax2onnx, tracing `forward`, still sees them as concrete arrays and writes them as initializers.
        return apply(variables, mean, scale, mel)

    return forward


def package_versions() -> dict[str, str]:
    """Versions of the converter stack, recorded in every exported model."""
    names = ("jax", "jaxlib", "flax", "jax2onnx", "onnx", "onnxruntime")
    out = {}
    for name in names:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def describe(ckpt: Checkpoint, precision: str) -> dict:
    """The metadata sections every variant carries (parity is added once measured)."""
    return {
        "precision": precision,
        "dimensions": [{"label": label, "key": key} for label, key in DIMENSIONS],
        "features": FEATURES.to_dict(),
        "model_config": ckpt.config.to_dict(),
        "label_scaler": {"mean": ckpt.scaler_mean.tolist(), "scale": ckpt.scaler_scale.tolist(),
                         "applied_in_graph": True},
        "source": {"sha256": ckpt.sha256, "filename": Path(ckpt.path).name,
                   "finetuning_results": ckpt.finetuning_results},
        "versions": package_versions(),
        "io": {"input": INPUT_NAME, "output": OUTPUT_NAME, "output_units": "label (0-1 score scale), not clipped"},
    }


def set_metadata(proto, sections: dict) -> None:
    """Replace the project's metadata entry of an onnx ModelProto."""
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in build_metadata(**sections).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


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
    opset: int = DEFAULT_OPSET,
    atol: float | None = None,
    clips: Sequence[Path] | None = None,
    seed: int = 0,
    quantize: str = "none",
    int8_atol: float | None = None,
    fp16_atol: float | None = None,
    per_channel: bool = False,
    reduce_range: bool = False,
    optimize: bool = False,
) -> ExportResult:
    """Export a checkpoint (a demo one when None) to a parity-checked ONNX model at `out`.

    `quantize` none: fp32; int8 / fp16: that variant at `out`; auto: the recommended CPU variant at `out`,
    the others beside it as MODEL.<precision>.onnx (see convert.quantize.publish_variants).
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize {quantize!r}; choose one of {QUANTIZE_CHOICES}")
    start = time.perf_counter()
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="percepiano-demo-") as tmp:
        demo = checkpoint is None
        if demo:
            from convert.demo import make_demo_checkpoint

            checkpoint = make_demo_checkpoint(Path(tmp) / "demo_checkpoint.pkl", preset="production", seed=seed)
            log.warning("no --checkpoint given: exporting a demo checkpoint (production preset, random weights)")
        log.info("loading checkpoint %s", checkpoint)
        ckpt = load_checkpoint(checkpoint)
        forward = build_forward(ckpt)
        log.info("exporting the model (%d layers, width %d) with jax2onnx, opset %d",
                 ckpt.config.num_layers, ckpt.config.embed_dim, opset)
        proto = to_onnx(forward, opset)
        set_metadata(proto, describe(ckpt, "fp32"))
        model = OnnxModel(proto.SerializeToString(), device="cpu")  # the runtime's own loader checks it
        references = clip_references(forward, list(clips) if clips else shipped_clips())  # reused by every gate
        report = run_gate(forward, model, tolerance=Tolerance.for_precision("fp32", atol), seed=seed,
                          references=references)
        set_metadata(proto, {**describe(ckpt, "fp32"), "parity": report})
        if quantize == "none" and not optimize:
            write_atomic(out, lambda fh: fh.write(proto.SerializeToString()))
            log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
            reports, written = {"fp32": report}, {"fp32": out}
        else:  # each variant is made from the gated fp32 graph and passes the same gate before it is written
            from convert.variants import publish_variants

            reports, written = publish_variants(
                proto, ckpt, forward, out, quantize, fp32_report=report, references=references, seed=seed,
                atol={"int8": int8_atol, "fp16": fp16_atol}, per_channel=per_channel, reduce_range=reduce_range,
                optimized=optimize)
    return ExportResult(path=out, checkpoint=Path(checkpoint), demo=demo, seconds=time.perf_counter() - start,
                        reports=reports, written=written)

