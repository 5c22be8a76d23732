"""What an export is asked to do: its options and the variants' options, and every choice list they draw on.

`convert.export.export(checkpoint, out, options, variants)` takes these two frozen objects, as Optimum's
exporter takes its export config; the command line (convert.cli) builds them from its flags. Nothing here
imports more than the standard library, so the CLI reads the choice lists without loading the converter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BACKENDS = ("jax2onnx", "tf2onnx")  # tf2onnx: jax2tf -> TensorFlow -> tf2onnx in its own venv (convert.tf2onnx)
QUANTIZE_CHOICES = ("none", "int8", "fp16", "auto")
PREOPTIMIZE_CHOICES = ("none", "extended")
DEFAULT_PREOPTIMIZE = "extended"
# int8 activation scales: fixed per layer, calibrated on real audio (convert.int8_static); one per row of each
# layer's input (convert.int8_rows); onnxruntime's one per call (a window's scores then depend on its batch
# neighbours). The first two keep a window's scores whatever shares its call.
INT8_ACTIVATIONS = ("static", "row", "batch")
DEFAULT_INT8_ACTIVATIONS = "static"  # as fast as per call, as exact on held-out clips: docs/corpus-speed.md


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {choices}")


@dataclass(frozen=True)
class VariantOptions:
    """Which int8 / fp16 variants an export writes, and how they are made and gated (convert.variants)."""

    quantize: str = "none"
    """none: fp32 only; int8 (CPU) or fp16 (GPU): that variant at the output path; auto: the CPU recommendation
    at the output path and the others beside it as MODEL.<precision>.onnx."""
    int8_atol: float | None = None
    """int8 parity tolerance in score units (None: convert.parity.DEFAULT_ATOL, 0.005)."""
    fp16_atol: float | None = None
    """fp16 parity tolerance in score units (None: convert.parity.DEFAULT_ATOL, 0.005)."""
    per_channel: bool = False
    """int8: one weight scale per output channel (no gain measured)."""
    reduce_range: bool = True
    """int8: 7-bit weights; x86 CPUs without VNNI saturate u8*s8 products of full-range weights."""
    optimize: bool = False
    """Apply onnxruntime's transformer fusions to the variants (slower on CPU)."""
    allow_partial: bool = False
    """With quantize auto: write the variants that pass even if another fails its gate."""
    int8_activations: str = DEFAULT_INT8_ACTIVATIONS
    """int8 activation scales: static (fixed per layer, calibrated on `calibration_clips`), row (per row of each
    layer's input, 10-15 % slower) or batch (onnxruntime's one per call: a window's scores then depend on its
    batch neighbours). docs/corpus-speed.md."""
    calibration_clips: tuple[Path, ...] | None = None
    """Real audio static int8 is calibrated on (None: convert/clips/calibration/, none of them a gate clip)."""

    def __post_init__(self) -> None:
        _check_choice("quantize", self.quantize, QUANTIZE_CHOICES)
        _check_choice("int8 activations", self.int8_activations, INT8_ACTIVATIONS)
        if self.calibration_clips is not None:
            object.__setattr__(self, "calibration_clips", tuple(Path(c) for c in self.calibration_clips))

    def atol(self, precision: str) -> float | None:
        """The tolerance asked for `precision`'s gate (None: its default); fp32's is ExportOptions.atol."""
        return {"int8": self.int8_atol, "fp16": self.fp16_atol}.get(precision)


@dataclass(frozen=True)
class ExportOptions:
    """How the fp32 model is converted and gated (convert.export)."""

    opset: int | None = None
    """ONNX opset (None: the backend's own default, 23 for jax2onnx, 18 for tf2onnx)."""
    backend: str = "jax2onnx"
    """Converter: jax2onnx, or tf2onnx (jax2tf -> TensorFlow -> tf2onnx, the independent second one)."""
    atol: float | None = None
    """fp32 parity tolerance in score units (None: 1e-5)."""
    clips: tuple[Path, ...] | None = None
    """Real audio for the parity gate (None: the shipped clips; an empty set is refused by the gate)."""
    seed: int = 0
    """Seed of the random parity inputs, and of the demo checkpoint made when there is none."""
    preoptimize: str = DEFAULT_PREOPTIMIZE
    """extended: the fp32 and int8 files are saved as onnxruntime optimises them for the CPU (convert.staging);
    none: as traced."""

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("preoptimize", self.preoptimize, PREOPTIMIZE_CHOICES)
        if self.clips is not None:
            object.__setattr__(self, "clips", tuple(Path(c) for c in self.clips))
