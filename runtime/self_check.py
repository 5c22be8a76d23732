"""The self-check: the export's stored reference windows, run as the warm-up on the device that will serve.

The exporter stores in the `percepiano` metadata a few real-audio log-mel windows and JAX's scores for them
(convert.metadata.encode_self_check writes the section, parse_section below reads it):

    "self_check": {"inputs": {"dtype": "float32", "shape": [n, 128, 128], "base64": "<little-endian float32>"},
                   "scores": [[19 floats], ...], "atol": <float>, "clips": ["<clip>#<chunk>", ...]}

At load the runtime runs those windows instead of a plain warm-up run and compares with the stored scores:
an int8 model on a CPU without the kernels it was gated with, or an fp16 kernel problem on a GPU, shows
here, on the machine where it matters. A model exported before the section existed warms up as before
and reports status "absent".
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from runtime.constants import FEATURES, NUM_DIMENSIONS
from runtime.errors import ModelError

log = logging.getLogger(__name__)

SECTION = "self_check"
MAX_WINDOWS = 16  # the section is meant to be small; a larger one is refused rather than run
ALLOW_ENV = "PERCEPIANO_ALLOW_FAILED_SELF_CHECK"
ALLOW_FLAG = "--skip-self-check"
PLAIN_WARMUP_BATCH = 2  # without stored windows: a plain run of the shape they would have had


class Runnable(Protocol):
    """What the self-check needs of a loaded model (runtime.model.OnnxModel)."""

    info: Any
    device: str

    def run(self, mel: np.ndarray) -> np.ndarray: ...

    def warmup(self, batch_size: int = 1) -> None: ...


@dataclass(frozen=True)
class SelfCheckResult:
    """The outcome on this device: status passed | failed | absent, with the figures when it ran."""

    status: str
    device: str
    max_abs: float | None = None
    atol: float | None = None
    windows: int = 0
    milliseconds: float | None = None

    @property
    def passed(self) -> bool | None:
        return None if self.status == "absent" else self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: a non-finite output (max_abs inf) is reported as max_abs null with status failed."""
        finite = self.max_abs is None or math.isfinite(self.max_abs)
        return {**asdict(self), "max_abs": self.max_abs if finite else None, "passed": self.passed}


@dataclass(frozen=True)
class Reference:
    """The stored windows (n, 128, 128), their expected scores (n, 19), the tolerance and where they came from."""

    inputs: np.ndarray
    scores: np.ndarray
    atol: float
    clips: tuple[str, ...]


def parse_section(section: Any, where: str = "model",
                  item_shape: tuple[int, ...] = (FEATURES.n_frames, FEATURES.n_mels)) -> Reference:
    """Validate the stored section (bounded before it is decoded) and decode it.

    ``item_shape`` is what the model takes per batch item: a (128, 128) log-mel window, or a 3 s audio chunk
    for a model whose graph holds the front end.
    """
    bad = f"{where}: its '{SECTION}' metadata is malformed"
    try:
        spec, scores, atol = section["inputs"], section["scores"], float(section["atol"])
        shape, clips = [int(n) for n in spec["shape"]], tuple(str(c) for c in section.get("clips", ()))
        if spec["dtype"] != "float32" or shape[1:] != list(item_shape):
            raise ModelError(f"{bad}: inputs must be float32 (n, {', '.join(map(str, item_shape))}), "
                             f"got {spec['dtype']} {shape}")
        if not 1 <= shape[0] <= MAX_WINDOWS:
            raise ModelError(f"{bad}: {shape[0]} windows; expected 1 to {MAX_WINDOWS}")
        raw = base64.b64decode(spec["base64"], validate=True)
    except ModelError:
        raise
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise ModelError(f"{bad} ({type(exc).__name__}: {exc}); re-export the model") from None
    if len(raw) != 4 * math.prod(shape):
        raise ModelError(f"{bad}: {len(raw)} bytes of inputs for shape {shape}")
    expected = np.asarray(scores, dtype=np.float64)
    if expected.shape != (shape[0], NUM_DIMENSIONS) or not np.isfinite(expected).all():
        raise ModelError(f"{bad}: scores must be {shape[0]} rows of {NUM_DIMENSIONS} finite values")
    if not (math.isfinite(atol) and atol > 0):
        raise ModelError(f"{bad}: atol must be a positive number, got {atol}")
    inputs = np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
    if not np.isfinite(inputs).all():
        raise ModelError(f"{bad}: inputs contain NaN or infinite values")
    return Reference(inputs, expected, atol, clips)


def run_self_check(model: Runnable) -> SelfCheckResult:
    """Run the stored windows on the model's device (this is the warm-up run) and compare with the stored scores."""
    section = model.info.raw.get(SECTION)
    if section is None:
        model.warmup(PLAIN_WARMUP_BATCH)  # an older export: the plain warm-up run, nothing to compare with
        log.info("self-check absent (the model was exported without reference windows); plain warm-up on %s",
                 model.device)
        return SelfCheckResult("absent", model.device)
    ref = parse_section(section, item_shape=tuple(getattr(model, "input_shape", (FEATURES.n_frames, FEATURES.n_mels))))
    t0 = time.perf_counter()
    got = model.run(ref.inputs).astype(np.float64)
    ms = (time.perf_counter() - t0) * 1e3
    max_abs = float(np.max(np.abs(got - ref.scores))) if np.isfinite(got).all() else math.inf
    atol = max(ref.atol, getattr(model, "self_check_atol", None) or 0.0)  # the TF32 opt-in's own tolerance
    status = "passed" if max_abs <= atol else "failed"
    result = SelfCheckResult(status, model.device, max_abs, atol, len(ref.inputs), round(ms, 3))
    log.log(logging.INFO if status == "passed" else logging.ERROR,
            "self-check %s on %s (%s): max abs %.3g vs atol %.3g over %d stored windows, %.1f ms",
            status, model.device, model.info.precision, max_abs, atol, len(ref.inputs), ms)
    return result


def require_passed(result: SelfCheckResult, *, allow_failed: bool = False) -> None:
    """Refuse a model whose self-check failed, unless the caller explicitly allows it (then say so loudly)."""
    if result.status != "failed":
        return
    what = (f"self-check FAILED on {result.device}: the model's outputs for its stored reference windows differ "
            f"from the export's by {result.max_abs:.3g} (tolerance {result.atol:.3g})")
    if allow_failed:
        log.warning("%s; serving anyway because the failed self-check was explicitly allowed: "
                    "its scores may be wrong on this machine", what)
        return
    raise ModelError(f"{what}; this device does not reproduce the scores that were gated. Use a variant meant "
                     f"for this device (fp32 or fp16 on a GPU, int8 on a CPU like the exporter's), or pass "
                     f"{ALLOW_FLAG} ({ALLOW_ENV}=1) to run it anyway")
