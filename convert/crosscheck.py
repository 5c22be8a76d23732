"""Two converters, one answer: the jax2onnx and the tf2onnx exports compared with each other and with JAX.

`python -m convert crosscheck CKPT` exports the checkpoint with both backends (each through its own parity
gate), then scores the real clips' librosa features with both models and with JAX, and reports the largest
difference per dimension of every pair. Two converters written by different people that agree within the
fp32 tolerance on real audio are evidence that neither has a silent bug; any pair beyond it fails.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from convert.checkpoint import load_checkpoint
from convert.forward import build_forward
from convert.parity import Tolerance, clip_references
from runtime.constants import API_KEYS
from runtime.model import OnnxModel

log = logging.getLogger(__name__)

REFERENCE = "jax"


def compare_models(references, models: dict[str, OnnxModel], atol: float) -> dict:
    """Per-dimension max abs difference of every pair among JAX and `models` on the references' windows.

    `references`: convert.parity.clip_references (librosa features and JAX scores of real clips).
    """
    mel = np.concatenate([r.mel for r in references])
    scores = {REFERENCE: np.concatenate([r.scores for r in references]).astype(np.float64)}
    for name, model in models.items():
        scores[name] = np.asarray(model.predict(mel, 8), np.float64)
    names = list(scores)
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff = np.abs(scores[a] - scores[b])
            per_dim = {key: float(diff[:, k].max()) for k, key in enumerate(API_KEYS)}
            worst = max(per_dim, key=per_dim.get)
            pairs.append({"pair": f"{a} vs {b}", "max_abs": float(diff.max()), "worst_dimension": worst,
                          "per_dimension": per_dim, "passed": bool(np.isfinite(diff).all() and diff.max() <= atol)})
    return {"passed": all(p["passed"] for p in pairs), "atol": atol, "windows": int(len(mel)),
            "clips": [r.clip.name for r in references], "models": list(models), "pairs": pairs}


def crosscheck(checkpoint: str | Path, clips: Sequence[Path] | None = None, *, atol: float | None = None,
               seed: int = 0, out_dir: str | Path | None = None, models: Sequence[str | Path] | None = None) -> dict:
    """Export `checkpoint` with both backends into `out_dir` (a temporary folder when None) and compare them.

    `models`: already exported models to compare instead of exporting (each named by its metadata's backend).
    """
    from convert.export import export
    from convert.options import BACKENDS, ExportOptions

    tolerance = Tolerance.for_precision("fp32", atol).model
    ckpt = load_checkpoint(checkpoint)
    references = clip_references(build_forward(ckpt), clips)
    with tempfile.TemporaryDirectory(prefix="percepiano-crosscheck-") as tmp:
        paths = [Path(m) for m in models] if models else []
        if not paths:
            folder = Path(out_dir or tmp)
            for backend in BACKENDS:
                log.info("crosscheck: exporting with %s", backend)
                options = ExportOptions(backend=backend, clips=clips, seed=seed)
                paths.append(export(checkpoint, folder / f"model.{backend}.onnx", options).path)
        loaded = {}
        for path in paths:
            model = OnnxModel(path, device="cpu")
            name = (model.info.raw.get("backend") or {}).get("name", "jax2onnx")
            if model.info.raw["source"]["sha256"] != ckpt.sha256:
                log.warning("%s was exported from checkpoint %s, not %s", path,
                            model.info.raw["source"]["sha256"][:12], ckpt.sha256[:12])
            loaded[name if name not in loaded else f"{name}:{path.name}"] = model
        report = compare_models(references, loaded, tolerance)
        report["backends"] = {name: m.info.raw.get("backend") for name, m in loaded.items()}
        report["files"] = {name: str(p) for name, p in zip(loaded, paths, strict=True)}
    return report


def format_crosscheck(report: dict) -> str:
    """The per-dimension table: one row per dimension, one column per pair (max abs over all windows)."""
    pairs = report["pairs"]
    width = max(len(p["pair"]) for p in pairs) + 2
    lines = [f"crosscheck: {'AGREE' if report['passed'] else 'DISAGREE'} (fp32 tolerance {report['atol']:.0e}, "
             f"{report['windows']} real-audio windows from {len(report['clips'])} clips)",
             f"  {'dimension':28s}" + "".join(f"{p['pair']:>{width}s}" for p in pairs)]
    for key in API_KEYS:
        cells = "".join(f"{p['per_dimension'][key]:>{width}.2e}" for p in pairs)
        over = [p for p in pairs if p["per_dimension"][key] > report["atol"]]
        lines.append(f"{'FAIL' if over else 'ok  '}{key[:26]:26s}{cells}")
    lines.append(f"  {'max':28s}" + "".join(f"{p['max_abs']:>{width}.2e}" for p in pairs))
    for backend, info in report.get("backends", {}).items():
        if info:
            versions = ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items())
            lines.append(f"  {backend}: {versions}")
    return "\n".join(lines)
