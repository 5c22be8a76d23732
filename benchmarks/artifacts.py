"""What every variant is measured on: the checkpoint, its ONNX variants, and one 30 s clip of real piano.

Artifacts live in OUT/artifacts and are reused on the next run when they still match: an ONNX file is
reused only if its metadata names the checkpoint's sha256 and the expected precision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.errors import BenchmarkError
from convert.config import ModelConfig
from runtime.model import PRECISIONS

log = logging.getLogger(__name__)

PIANO_CLIPS = Path(__file__).resolve().parents[1] / "tests" / "data" / "piano"  # the 16 real clips in the repository
CLIP_SECONDS = 30.0  # the original's cap: 15 windows of 3 s at a 2 s hop
Progress = Callable[[str], None]


@dataclass
class ModelFile:
    """One ONNX variant on disk, or why there is none."""

    precision: str
    path: Path | None = None
    origin: str = ""  # reused | exported | given | made with convert.quantize.make_variant
    reason: str = ""  # why it is missing

    @property
    def available(self) -> bool:
        return self.path is not None

    @property
    def bytes(self) -> int | None:
        return self.path.stat().st_size if self.path else None


@dataclass
class Artifacts:
    checkpoint: Path
    sha256: str
    demo: bool
    config: ModelConfig
    audio: Path
    audio_sources: list[str]
    mel: Path
    n_chunks: int
    models: dict[str, ModelFile] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def model_metadata(path: Path) -> dict | None:
    """The project's metadata document of an ONNX file, or None if it has none or cannot be read."""
    import onnx

    from runtime.model import METADATA_KEY

    try:
        proto = onnx.load(str(path), load_external_data=False)
        return json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    except Exception:  # unreadable, foreign or half-written: not reusable
        return None


def matches(path: Path, sha256: str, precision: str) -> bool:
    doc = model_metadata(path) if path.is_file() else None
    return bool(doc) and doc.get("source", {}).get("sha256") == sha256 and doc.get("precision") == precision


def demo_checkpoint(art_dir: Path, preset: str, progress: Progress) -> Path:
    """The benchmark's stand-in checkpoint of `preset` (seed 0: the same bytes every time), made once."""
    path = art_dir / f"demo-{preset}-seed0.pkl"
    if not path.is_file():
        from convert.demo import make_demo_checkpoint

        progress(f"making a demo checkpoint ({preset} preset, random weights)")
        make_demo_checkpoint(path, preset=preset, seed=0)
    return path


def candidates(stem: str, art_dir: Path, given: Path | None, precision: str) -> list[Path]:
    """Where a variant may already be: beside the given model, or under the names export and quantize write."""
    names = [art_dir / f"{stem}.{precision}.onnx", art_dir / f"{stem}.onnx"]  # export --quantize auto's layout
    if given:
        base = given.name.removesuffix(".onnx")
        names += [given.with_name(f"{base}.{precision}.onnx"),  # quantize_file's default MODEL.<precision>.onnx
                  given.with_name(f"{base.removesuffix('.fp32')}.{precision}.onnx")]
    return names


def export_models(checkpoint: Path, out: Path, progress: Progress) -> tuple[dict[str, Path], dict[str, dict]]:
    """Export through the real pipeline (parity gate included), with every variant that passes its gate."""
    from convert.export import VariantOptions, export

    progress(f"exporting {checkpoint.name} to ONNX with its variants (parity-gated)")
    result = export(checkpoint, out, variants=VariantOptions(quantize="auto", allow_partial=True))
    return {p: Path(path) for p, path in result.written.items()}, result.reports


def quantize_model(fp32: Path, checkpoint: Path, precision: str, out: Path, progress: Progress) -> ModelFile:
    """A variant of an existing fp32 export with convert.variants.quantize_file (gated), or why there is none."""
    from convert.errors import ParityError
    from convert.options import VariantOptions
    from convert.variants import quantize_file

    progress(f"making the {precision} variant with convert.variants.quantize_file (parity-gated)")
    try:
        _, written = quantize_file(fp32, checkpoint, out, VariantOptions(quantize=precision))
    except ParityError as exc:
        return ModelFile(precision, reason=f"fails its parity gate: {exc}")
    return ModelFile(precision, written[precision], "made with convert.variants.quantize_file (parity-gated)")


def prepare_models(checkpoint: Path, sha: str, art_dir: Path, given: Path | None, runnable: set[str],
                   progress: Progress) -> dict[str, ModelFile]:
    """fp32, int8 and fp16 ONNX files for the checkpoint: reused, exported or made; or the reason they are not.

    A missing variant is made only if it can run here (`runnable`); one that exists is always reported.
    """
    stem = f"{checkpoint.name.removesuffix('.pkl')}-{sha[:12]}"
    models = {p: ModelFile(p) for p in PRECISIONS}
    if given:
        if not matches(given, sha, "fp32"):
            raise BenchmarkError(f"--model {given} is not an fp32 export of {checkpoint} (sha256 {sha[:12]}...)")
        models["fp32"] = ModelFile("fp32", given, "given")
    for p in PRECISIONS:
        found = [c for c in candidates(stem, art_dir, given, p) if matches(c, sha, p)]
        if found and not models[p].available:
            models[p] = ModelFile(p, found[0], "reused")
    if not models["fp32"].available:
        written, reports = export_models(checkpoint, art_dir / f"{stem}.onnx", progress)
        for p in PRECISIONS:
            if p in written:
                models[p] = ModelFile(p, written[p], "exported (parity-gated)")
            elif p in reports:
                worst = (reports[p] or {}).get("max_abs")
                models[p].reason = f"fails its parity gate at export (max abs {worst})"
    for p in PRECISIONS[1:]:
        if not models[p].available and not models[p].reason and p in runnable:
            models[p] = quantize_model(models["fp32"].path, checkpoint, p, art_dir / f"{stem}.{p}.onnx", progress)
        elif not models[p].available and not models[p].reason:
            models[p].reason = "not made: it cannot run on this machine"
    return models


def config_of(model: Path) -> ModelConfig:
    """The model config an export records in its metadata."""
    return ModelConfig.from_checkpoint(model_metadata(model)["model_config"])


def source_clips(audio: Path | None) -> list[Path]:
    """The user's file, else the real clips of tests/data/piano, else the clips shipped with convert."""
    if audio:
        if not audio.is_file():
            raise FileNotFoundError(f"--audio {audio}: no such file")
        return [audio]
    clips = sorted(PIANO_CLIPS.glob("*.flac"))
    if not clips:
        from convert.parity import shipped_clips

        clips = shipped_clips()
    if not clips:
        raise FileNotFoundError(f"no piano clips in {PIANO_CLIPS} or convert/clips; pass --audio FILE")
    return clips


def input_audio(art_dir: Path, audio: Path | None) -> tuple[Path, list[str]]:
    """A CLIP_SECONDS FLAC made by concatenating (and, if short, looping) real recordings."""
    import soundfile as sf

    from runtime.audio import load_audio
    from runtime.constants import FEATURES

    need = int(CLIP_SECONDS * FEATURES.sample_rate)
    pieces, used, total, clips = [], [], 0, source_clips(audio)
    while total < need:
        for clip in clips:
            y = load_audio(clip)
            pieces.append(y)
            used.append(clip.name)
            total += len(y)
            if total >= need:
                break
    y = np.concatenate(pieces)[:need]
    out = art_dir / f"input-{int(CLIP_SECONDS)}s.flac"
    sf.write(out, np.clip(y, -1.0, 32767 / 32768), FEATURES.sample_rate, subtype="PCM_16")
    return out, used


def input_features(audio: Path, art_dir: Path) -> tuple[Path, int]:
    """The runtime's features of the clip, computed once and given to every variant's warm runs."""
    from runtime.audio import load_audio
    from runtime.features import features_from_audio

    mel = features_from_audio(load_audio(audio))
    path = art_dir / "input-mel.npy"
    np.save(path, mel)
    return path, len(mel)


def prepare(out_dir: Path, checkpoint: Path | None, preset: str, audio: Path | None, model: Path | None,
            runnable: set[str], progress: Progress) -> Artifacts:
    """Everything the variants need, made or reused under out_dir/artifacts."""
    art_dir = out_dir / "artifacts"
    art_dir.mkdir(parents=True, exist_ok=True)
    demo = checkpoint is None
    if demo:
        checkpoint = demo_checkpoint(art_dir, preset, progress)
    elif not checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
    progress("hashing the checkpoint")
    sha = sha256_file(checkpoint)
    models = prepare_models(checkpoint, sha, art_dir, model, runnable, progress)
    progress("composing the 30 s input clip")
    clip, used = input_audio(art_dir, audio)
    mel, n_chunks = input_features(clip, art_dir)
    return Artifacts(checkpoint, sha, demo, config_of(models["fp32"].path), clip, used, mel, n_chunks, models)


def clear_cache(path: Path) -> None:
    """Empty the JAX persistent compilation cache so that the first cached run really populates it."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
