"""Copies of the tiny model with edited metadata: a self-check section (true or tampered), a demo mark."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from convert.metadata import encode_self_check
from runtime.model import METADATA_KEY


def edit_metadata(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    """Write a copy of an exported model whose `percepiano` document went through edit(doc)."""
    import onnx

    proto = onnx.load(str(src))
    entry = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    doc = json.loads(entry.value)
    edit(doc)
    entry.value = json.dumps(doc, sort_keys=True)
    onnx.save(proto, str(dst))
    return dst


def reference_windows(checkpoint: Path, clip: Path, n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The first n windows of a real clip (the runtime's features) and the JAX model's scores for them."""
    from convert.checkpoint import load_checkpoint
    from convert.export import build_forward
    from runtime.audio import load_audio
    from runtime.features import features_from_audio

    mel = features_from_audio(load_audio(clip))[:n]
    return mel, np.asarray(build_forward(load_checkpoint(checkpoint))(mel), np.float64)


def with_self_check(src: Path, dst: Path, mel: np.ndarray, scores: np.ndarray, *, atol: float = 1e-5,
                    clip: str = "clip") -> Path:
    """A copy of src whose metadata stores mel and scores as its self-check (as the exporter does)."""
    section = encode_self_check(mel, scores, atol, [f"{clip}#{i}" for i in range(len(mel))])
    return edit_metadata(src, dst, lambda doc: doc.update(self_check=section))


def without_self_check(src: Path, dst: Path) -> Path:
    """A copy of src as an export made before the self-check existed."""
    return edit_metadata(src, dst, lambda doc: doc.pop("self_check", None))


def with_nan_scores(src: Path, dst: Path) -> Path:
    """A copy of src whose scores are all NaN (its output multiplied by a NaN constant): a broken model."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(src))
    graph = proto.graph
    out = graph.output[0].name
    for node in graph.node:  # the node that made the output now makes an inner tensor
        node.output[:] = [f"{out}_before_nan" if name == out else name for name in node.output]
    graph.initializer.append(numpy_helper.from_array(np.array(np.nan, np.float32), "nan_factor"))
    graph.node.append(helper.make_node("Mul", [f"{out}_before_nan", "nan_factor"], [out]))
    onnx.save(proto, str(dst))
    return dst
