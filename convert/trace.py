"""Tracing the JAX forward function into an ONNX graph (jax2onnx)."""

from __future__ import annotations

import logging

from convert.errors import ExportError
from convert.forward import Forward
from runtime.constants import FEATURES, INPUT_NAME, OUTPUT_NAME

DEFAULT_OPSET = 23


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
