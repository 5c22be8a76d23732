"""The `percepiano` metadata document every exported file carries: what it is, where it came from, how it
was gated, and the reference windows the runtime re-runs as its self-check on the serving device."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from convert.checkpoint import Checkpoint
from runtime.constants import DIMENSIONS, FEATURES, INPUT_NAME, OUTPUT_NAME
from runtime.model import METADATA_KEY, build_metadata

SELF_CHECK_WINDOWS = 2  # small: 2 x 64 KiB of float32, base64 in the JSON document


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


def jax2onnx_backend() -> dict:
    """The `backend` section of a model made by the main exporter (convert.export.to_onnx)."""
    return {"name": "jax2onnx", "versions": {k: v for k, v in package_versions().items() if k != "onnxruntime"}}


def describe(ckpt: Checkpoint, precision: str, *, backend: dict | None = None) -> dict:
    """The metadata sections every variant carries (parity and the self-check are added once measured).

    `source.demo` is true for a checkpoint that was never trained (Checkpoint.untrained: training_complete
    false, or no fine-tuning results, as a convert.demo stand-in writes it): its scores mean nothing. A
    checkpoint's fine-tuning results are copied as they are (null when it has none).
    `backend`: the converter that made the graph and its versions (default: jax2onnx, this environment's).
    """
    return {
        "precision": precision,
        "dimensions": [{"label": label, "key": key} for label, key in DIMENSIONS],
        "features": FEATURES.to_dict(),
        "model_config": ckpt.config.to_dict(),
        "label_scaler": {"mean": ckpt.scaler_mean.tolist(), "scale": ckpt.scaler_scale.tolist(),
                         "applied_in_graph": True},
        "source": {"sha256": ckpt.sha256, "filename": Path(ckpt.path).name, "demo": ckpt.untrained,
                   "finetuning_results": ckpt.finetuning_results},
        "versions": package_versions(),
        "backend": backend or jax2onnx_backend(),
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


def self_check_windows(references: Sequence) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label 'clip#chunk', mel (128, 128), JAX scores (19,)) of the self-check's windows.

    The first chunk of the first clip and the middle chunk of the last one: real audio, fixed by the clip set.
    """
    if not references:
        raise ValueError("the self-check needs at least one reference clip")
    picks = [(references[0], 0), (references[-1], len(references[-1].mel) // 2)][:SELF_CHECK_WINDOWS]
    return [(f"{ref.clip.name}#{i}", ref.mel[i], ref.scores[i]) for ref, i in picks]


def encode_self_check(inputs: np.ndarray, scores: np.ndarray, atol: float, clips: Sequence[str]) -> dict:
    """The `self_check` section (the one encoder; runtime.self_check.parse_section reads it): the windows as
    little-endian float32 in base64, their expected scores, the model tolerance and where the windows came from."""
    inputs = np.ascontiguousarray(inputs, dtype="<f4")
    return {
        "inputs": {"dtype": "float32", "shape": list(inputs.shape),
                   "base64": base64.b64encode(inputs.tobytes()).decode("ascii")},
        "scores": np.asarray(scores, np.float64).tolist(),
        "atol": float(atol),
        "clips": [str(c) for c in clips],
    }


def self_check_section(references: Sequence, atol: float) -> dict:
    """The `self_check` section: real-audio windows, JAX's scores for them, and the variant's model tolerance."""
    picks = self_check_windows(references)
    return encode_self_check(np.stack([m for _, m, _ in picks]), np.stack([np.asarray(s) for _, _, s in picks]),
                             atol, [label for label, _, _ in picks])
