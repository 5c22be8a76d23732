"""Lean PercePiano runtime: audio -> log-mel -> ONNX model -> 19 scores (numpy + onnxruntime only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime.constants import API_KEYS, DIMENSIONS, FEATURES, LABELS
from runtime.errors import AudioError, InputError, ModelError, ModelOutputError

if TYPE_CHECKING:
    from runtime.analyze import Analysis, Analyzer
    from runtime.model import ModelInfo, OnnxModel

__all__ = ["API_KEYS", "DIMENSIONS", "FEATURES", "LABELS", "AudioError", "InputError", "ModelError", "ModelOutputError",
           "Analysis", "Analyzer", "ModelInfo", "OnnxModel"]

_LAZY = {"Analysis": "runtime.analyze", "Analyzer": "runtime.analyze",
         "ModelInfo": "runtime.model", "OnnxModel": "runtime.model"}


def __getattr__(name: str):
    """Import the heavier pieces (onnxruntime, audio codecs) only when first used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
