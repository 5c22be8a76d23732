"""The parity gate: an exported model is compared with JAX, in score units, before it is published."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convert.errors import ParityError
from convert.forward import Forward
from runtime.constants import API_KEYS, FEATURES
from runtime.model import OnnxModel
from runtime.platform_info import describe_platform, platform_info

log = logging.getLogger(__name__)

CLIPS_DIR = Path(__file__).parent / "clips"
THRESHOLDS = (0.5, 0.7)  # where the original app changed a score's colour (docs/spec.md §4)
# Max abs in score units. 0.005 for int8 and fp16: invisible to a user except right at a colour threshold
# (docs/spec.md §4)
DEFAULT_ATOL = {"fp32": 1e-5, "int8": 0.005, "fp16": 0.005}
E2E_ATOL_FP32 = 1e-4  # whole pipeline (runtime decode + features) vs librosa + JAX


@dataclass(frozen=True)
class Tolerance:
    """Max abs error allowed in score units, for the model alone and for the whole pipeline."""

    model: float
    end_to_end: float

    @classmethod
    def for_precision(cls, precision: str, atol: float | None = None) -> Tolerance:
        atol = DEFAULT_ATOL[precision] if atol is None else atol
        return cls(model=atol, end_to_end=max(atol, E2E_ATOL_FP32))


def shipped_clips() -> list[Path]:
    """The real piano clips that ship with the project (PercePiano, MIT; see clips/ATTRIBUTION.md)."""
    return sorted(CLIPS_DIR.glob("*.flac"))


def gate_clips(clips: Sequence[str | Path] | None = None) -> list[Path]:
    """The gate's real clips: `clips`, or the shipped ones when None. Refuses an empty set or a missing file.

    A gate without real audio would pass on random inputs alone, which say little about real spectrograms.
    """
    chosen = shipped_clips() if clips is None else [Path(c) for c in clips]
    if not chosen:
        where = f"convert/clips/ ({CLIPS_DIR}) holds no .flac" if clips is None else "--clips matched no file"
        raise ParityError(f"no real audio clips for the parity gate: {where}; pass --clips FILE... of real piano audio")
    missing = [str(c) for c in chosen if not c.is_file()]
    if missing:
        raise ParityError(f"parity gate clips not found: {', '.join(missing[:3])}"
                          f"{f' (and {len(missing) - 3} more)' if len(missing) > 3 else ''}")
    return chosen


def compare(name: str, reference: np.ndarray, candidate: np.ndarray, atol: float) -> dict:
    """Per-dimension max abs / mean abs / max relative error and threshold flips of candidate vs reference."""
    ref = np.asarray(reference, np.float64).reshape(-1, len(API_KEYS))
    got = np.asarray(candidate, np.float64).reshape(-1, len(API_KEYS))
    if ref.shape != got.shape:
        raise ParityError(f"{name}: shapes differ, reference {ref.shape} vs candidate {got.shape}")
    diff = np.abs(got - ref)
    rel = diff / np.maximum(np.abs(ref), 1e-6)
    flips = sum(int(((ref >= t) != (got >= t)).sum()) for t in THRESHOLDS)
    finite = bool(np.isfinite(got).all())
    max_abs = float(diff.max()) if finite else float("inf")
    return {
        "name": name,
        "rows": int(ref.shape[0]),
        "max_abs": max_abs,
        "mean_abs": float(diff.mean()),
        "max_rel": float(rel.max()),
        "threshold_flips": flips,
        "atol": atol,
        "passed": finite and max_abs <= atol,
        "per_dimension": {
            key: {"max_abs": float(diff[:, i].max()), "mean_abs": float(diff[:, i].mean()),
                  "max_rel": float(rel[:, i].max())}
            for i, key in enumerate(API_KEYS)
        },
    }


def random_inputs(batch: int, seed: int) -> np.ndarray:
    """Valid model inputs: log-mel values uniform in [-80, 0]."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-FEATURES.top_db, 0.0, (batch, FEATURES.n_frames, FEATURES.n_mels)).astype(np.float32)


def reference_scores(forward: Forward, mel: np.ndarray, batch: int = 8) -> np.ndarray:
    """JAX scores for any number of windows, in fixed-size batches to bound memory."""
    return np.concatenate([np.asarray(forward(mel[i : i + batch])) for i in range(0, len(mel), batch)])


@dataclass(frozen=True)
class ClipReference:
    """A real clip's librosa features and JAX's per-chunk scores: computed once, reused by every gate."""

    clip: Path
    mel: np.ndarray  # (n, 128, 128)
    scores: np.ndarray  # (n, 19) label units


def clip_references(forward: Forward, clips: Sequence[Path] | None = None) -> list[ClipReference]:
    """librosa features + JAX scores for each clip (the shipped clips when None; never an empty set)."""
    from convert.reference import reference_features

    refs = []
    for clip in gate_clips(clips):
        mel = reference_features(clip)
        refs.append(ClipReference(Path(clip), mel, reference_scores(forward, mel)))
    return refs


@dataclass(frozen=True)
class RandomReference:
    """Random valid inputs and JAX's scores for them (batch 1 and 8 of the gate)."""

    name: str
    mel: np.ndarray
    scores: np.ndarray


RANDOM_BATCHES = (1, 8)


def random_references(forward: Forward, seed: int) -> list[RandomReference]:
    """JAX's scores for the gate's random inputs: computed once, so the gate itself needs no JAX weights."""
    refs = []
    for batch in RANDOM_BATCHES:
        mel = random_inputs(batch, seed + batch)
        refs.append(RandomReference(f"random:batch{batch}", mel, np.asarray(forward(mel))))
    return refs


def model_checks(forward: Forward | None, model: OnnxModel, refs: Sequence[ClipReference], atol: float,
                 seed: int, randoms: Sequence[RandomReference] | None = None) -> list[dict]:
    """(a) librosa features of real clips and (b) random inputs at batch 1 and 8, JAX vs ONNX."""
    checks = [compare(f"clip:{r.clip.name}", r.scores, model.predict(r.mel, 8), atol) for r in refs]
    for r in randoms if randoms is not None else random_references(forward, seed):
        checks.append(compare(r.name, r.scores, model.run(r.mel), atol))
    return checks


def end_to_end_checks(model: OnnxModel, refs: Sequence[ClipReference], atol: float) -> list[dict]:
    """The runtime's whole pipeline on each clip vs librosa features + JAX + mean + clip."""
    from runtime.analyze import Analyzer, aggregate

    analyzer = Analyzer(model, batch_size=8)
    checks = []
    for r in refs:
        result = analyzer.analyze_file(r.clip)
        got = np.array([result.scores[k] for k in API_KEYS])
        checks.append(compare(f"end-to-end:{r.clip.name}", aggregate(r.scores), got, atol))
    return checks


NEIGHBOUR_ATOL = 1e-5  # a batch-independent variant's scores, alone or with any batch neighbours (fp32's parity)


def neighbour_change(model, windows: Sequence[np.ndarray], batch: int = 16, seed: int = 0) -> float:
    """Largest |score in a batch - score alone| over the first clip's windows and three kinds of neighbours.

    `windows`: each clip's model inputs. Each window of the first clip is run alone, then last in a call of
    `batch` filled with the other clips' windows, with quiet windows (-80 dB) and with loud noise.
    """
    targets = windows[0]
    others = np.concatenate(windows[1:]) if len(windows) > 1 else targets
    rng = np.random.default_rng(seed)
    fills = (lambda n: others[rng.choice(len(others), n)],
             lambda n: np.full((n, *targets.shape[1:]), -80.0, np.float32),
             lambda n: rng.uniform(-10.0, 0.0, (n, *targets.shape[1:])).astype(np.float32))
    worst = 0.0
    for w in targets:
        alone = model.run(w[None])[0]
        for fill in fills:
            got = model.run(np.concatenate([fill(batch - 1), w[None]]))[-1]
            worst = max(worst, float(np.abs(got - alone).max()))
    return worst


def run_gate(forward: Forward | None, model: OnnxModel, clips: Sequence[Path] | None = None,
             tolerance: Tolerance | None = None, seed: int = 0,
             references: Sequence[ClipReference] | None = None,
             randoms: Sequence[RandomReference] | None = None) -> dict:
    """Run every check, then return the report if all pass or raise one ParityError that carries it.

    `references` (from clip_references) saves recomputing librosa + JAX when several variants are gated;
    with `randoms` too (from random_references, same seed) the gate runs without JAX (`forward` may be None).
    """
    if references is None:
        references = clip_references(forward, clips)
    if not references:
        raise ParityError("no real audio clips for the parity gate: pass --clips FILE... of real piano audio")
    precision = model.info.precision
    tol = tolerance or Tolerance.for_precision(precision)
    log.info("parity gate (%s): %d clips + random inputs, atol %.0e", precision, len(references), tol.model)
    checks = model_checks(forward, model, references, tol.model, seed, randoms)
    checks += end_to_end_checks(model, references, tol.end_to_end)
    failed = [c["name"] for c in checks if not c["passed"]]
    report = {"precision": precision, "tolerance": {"model": tol.model, "end_to_end": tol.end_to_end},
              "passed": not failed, **headline(checks), "clips": [r.clip.name for r in references],
              "platform": platform_info(model.providers), "checks": checks}
    if failed:
        raise ParityError(f"{precision} model fails the parity gate on {len(failed)} check(s): {', '.join(failed)}",
                          report)
    return report


def headline(checks: Sequence[dict]) -> dict:
    """The report's summary figures: model-only and end-to-end maxima apart, flips per window and per recording.

    `max_abs` is the model-only maximum (real windows and random inputs), the figure `tolerance.model` bounds.
    """
    model = [c for c in checks if not c["name"].startswith("end-to-end:")]
    e2e = [c for c in checks if c["name"].startswith("end-to-end:")]
    clips = [c for c in model if c["name"].startswith("clip:")]
    max_model = max(c["max_abs"] for c in model)
    return {
        "max_abs": max_model,
        "max_abs_model": max_model,
        "max_abs_end_to_end": max((c["max_abs"] for c in e2e), default=None),
        "mean_abs_clip_windows": float(np.average([c["mean_abs"] for c in clips], weights=[c["rows"] for c in clips])),
        "threshold_flips": sum(c["threshold_flips"] for c in checks),
        "threshold_flips_windows": sum(c["threshold_flips"] for c in clips),
        "threshold_flips_recordings": sum(c["threshold_flips"] for c in e2e),
        "windows": sum(c["rows"] for c in clips),
        "recordings": len(e2e),
    }


def format_report(report: dict) -> str:
    """A plain-text table of a parity report, one line per check."""
    tol = report["tolerance"]
    e2e = report.get("max_abs_end_to_end")
    lines = [f"parity ({report['precision']}): {'PASSED' if report['passed'] else 'FAILED'}; "
             f"model max abs {report.get('max_abs_model', report['max_abs']):.2e} (tolerance {tol['model']:.0e}), "
             f"end-to-end max abs {'-' if e2e is None else f'{e2e:.2e}'} (tolerance {tol['end_to_end']:.0e}); "
             f"0.5/0.7 flips: {report.get('threshold_flips_windows', '-')} of {report.get('windows', '-')} windows, "
             f"{report.get('threshold_flips_recordings', '-')} of {report.get('recordings', '-')} recordings",
             f"  {'check':58s} {'rows':>5s} {'max abs':>10s} {'mean abs':>10s} {'max rel':>10s} {'flips':>5s}"]
    for c in report["checks"]:
        worst = max(c["per_dimension"], key=lambda k: c["per_dimension"][k]["max_abs"])
        mark = "ok  " if c["passed"] else "FAIL"
        lines.append(f"{mark}{c['name'][:58]:58s} {c['rows']:5d} {c['max_abs']:10.2e} {c['mean_abs']:10.2e} "
                     f"{c['max_rel']:10.2e} {c['threshold_flips']:5d}  worst: {worst}")
    if report.get("platform"):
        lines.append(f"  ran on: {describe_platform(report['platform'])}")
    return "\n".join(lines)
