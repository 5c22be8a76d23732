"""`export --input audio`: the usual mel-input export and gates, then each variant behind the in-graph front end.

Every variant the mel-input export publishes (fp32, int8, fp16: the quantization touches the transformer only)
is composed with the float32 front end (convert.frontend), passes the same parity gate again through the
runtime's loader, this time fed audio chunks, and only then is written where the mel-input one would have been.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from convert.checkpoint import load_checkpoint
from convert.errors import ExportError, ParityError
from convert.export import ExportResult, build_forward, export, set_metadata
from convert.files import write_atomic
from convert.frontend import DEFAULT_DFT, compose
from convert.metadata import self_check_section
from convert.options import ExportOptions, VariantOptions
from convert.parity import E2E_ATOL_FP32, Tolerance, clip_references, compare, reference_scores, run_gate, shipped_clips
from runtime.constants import AUDIO_INPUT_NAME, FEATURES, OUTPUT_NAME
from runtime.features import chunk_audio
from runtime.model import METADATA_KEY, OnnxModel

log = logging.getLogger(__name__)


class AudioGateModel:
    """What run_gate drives for an audio-input model: audio chunks (B, 66150) run the whole graph; the gate's
    random log-mel inputs (B, 128, 128) run the mel-input model that the graph contains."""

    def __init__(self, audio: OnnxModel, mel: OnnxModel):
        self.audio, self.mel = audio, mel
        self.info, self.input_kind, self.providers = audio.info, audio.input_kind, audio.providers

    def _pick(self, x: np.ndarray) -> OnnxModel:
        return self.audio if np.ndim(x) == 2 else self.mel

    def run(self, x: np.ndarray) -> np.ndarray:
        return self._pick(x).run(x)

    def predict(self, x: np.ndarray, batch_size: int = 16) -> np.ndarray:
        return self._pick(x).predict(x, batch_size)


def audio_references(forward, clips) -> list:
    """Clip references whose model input is the clip's 3 s audio chunks; scores stay JAX on librosa features."""
    from convert.reference import reference_load

    refs = clip_references(forward, clips)
    return [replace(r, mel=chunk_audio(reference_load(r.clip))) for r in refs]  # `mel` holds what the model takes


def synthetic_audio(seed: int) -> dict[str, np.ndarray]:
    """Edge cases of the front end: silence, a pure tone, clipping, 1 s, exactly 3 s, noise."""
    sr, rng = FEATURES.sample_rate, np.random.default_rng(seed)
    t = np.arange(3 * sr) / sr
    return {
        "silence": np.zeros(3 * sr, np.float32),
        "tone_440hz_1s": (0.5 * np.sin(2 * np.pi * 440.0 * t[:sr])).astype(np.float32),
        "clipped_3s": np.clip(8.0 * np.sin(2 * np.pi * 110.0 * t), -1.0, 1.0).astype(np.float32),
        "noise_5s": (0.1 * rng.standard_normal(5 * sr)).astype(np.float32),
    }


def gate_audio_model(forward, audio: OnnxModel, mel: OnnxModel, references, tolerance: Tolerance, seed: int) -> dict:
    """run_gate on the audio-input model, plus the synthetic edge cases; one ParityError carrying every check.

    The edge cases test the front end: their reference is the mel-input model of the same precision on librosa
    features (silence and noise are far from what the transformer's variants are gated on, so an int8
    transformer's own error there is not the front end's).
    """
    from convert.reference import reference_features

    extra = [compare(f"audio:{name}", reference_scores(mel.predict, reference_features(y)),
                     audio.predict(chunk_audio(y), 8), tolerance.model) for name, y in synthetic_audio(seed).items()]
    try:
        report = run_gate(forward, AudioGateModel(audio, mel), tolerance=tolerance, seed=seed, references=references)
    except ParityError as exc:
        if not exc.report:
            raise
        report = exc.report
    report["checks"] += extra
    failed = [c["name"] for c in report["checks"] if not c["passed"]]
    report.update(passed=not failed, input=AUDIO_INPUT_NAME, max_abs=max(c["max_abs"] for c in report["checks"]),
                  threshold_flips=sum(c["threshold_flips"] for c in report["checks"]))
    if failed:
        raise ParityError(f"audio-input {report['precision']} model fails the parity gate on {len(failed)} "
                          f"check(s): {', '.join(failed)}", report)
    return report


def audio_io(mel_io: dict, dft: str) -> dict:
    """The `io` metadata section of an audio-input model."""
    return {**mel_io, "input": AUDIO_INPUT_NAME, "output": OUTPUT_NAME,
            "audio": {"shape": ["batch", FEATURES.chunk_samples], "dtype": "float32",
                      "sample_rate": FEATURES.sample_rate, "chunking": "spec §3: 3 s chunks, 2 s hop, zero-padded"},
            "frontend": {"dft": dft, "precision": "fp32"}}


def publish_audio(mel_path: Path, dest: Path, forward, references, tolerance: Tolerance, dft: str, seed: int) -> dict:
    """Compose a published mel-input variant with the front end, gate it, write it to dest; its report."""
    import onnx

    transformer = onnx.load(str(mel_path))
    doc = json.loads({p.key: p.value for p in transformer.metadata_props}[METADATA_KEY])
    sections = {k: v for k, v in doc.items() if k != "format_version"}
    sections["io"] = audio_io(sections.get("io", {}), dft)
    sections["transformer_parity"] = sections.pop("parity", None)  # the mel-input model's own gate
    sections["self_check"] = self_check_section(references, tolerance.model)  # audio chunks in, JAX scores out
    proto = compose(transformer, dft)
    del transformer
    set_metadata(proto, sections)
    audio = OnnxModel(proto.SerializeToString(), device="cpu")
    report = gate_audio_model(forward, audio, OnnxModel(mel_path, device="cpu"), references, tolerance, seed)
    set_metadata(proto, {**sections, "parity": report})
    write_atomic(dest, lambda fh: fh.write(proto.SerializeToString()))
    log.info("wrote %s (audio input, %s, %.1f MB)", dest, doc["precision"], dest.stat().st_size / 1e6)
    return report


def refuse_audio_model(path: Path) -> None:
    """`quantize` makes variants of a mel-input model; an audio-input one is re-exported instead."""
    import onnx

    if Path(path).is_file():
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if props.get(METADATA_KEY) and json.loads(props[METADATA_KEY]).get("io", {}).get("input") == AUDIO_INPUT_NAME:
            raise ExportError(f"{path} takes audio: export with --input audio --quantize int8|fp16|auto instead")


def export_audio(checkpoint: str | os.PathLike | None, out: str | os.PathLike, options: ExportOptions | None = None,
                 variants: VariantOptions | None = None, *, dft: str = DEFAULT_DFT) -> ExportResult:
    """convert.export.export, with audio (B, 66150) as the model input.

    The mel-input variants are made and gated in a scratch folder (as traced: `options.preoptimize` does not
    apply, the graphs are composed with the front end), then composed, gated again and written. Audio scores
    are gated at max(the variant's tolerance, 1e-4): the front end's float32 rounding (within 0.01 dB of
    librosa) is the one thing added.
    """
    options, variants = options or ExportOptions(), variants or VariantOptions()
    start, out = time.perf_counter(), Path(out)
    with tempfile.TemporaryDirectory(prefix="percepiano-audio-") as tmp:
        if checkpoint is None:
            from convert.demo import make_demo_checkpoint

            checkpoint = make_demo_checkpoint(Path(tmp) / "demo_checkpoint.pkl", preset="production",
                                              seed=options.seed)
        (Path(tmp) / "mel").mkdir()
        mel = export(checkpoint, Path(tmp) / "mel" / out.name, replace(options, preoptimize="none"), variants)
        forward = build_forward(load_checkpoint(checkpoint))
        references = audio_references(forward, list(options.clips) if options.clips else shipped_clips())
        atols = {"fp32": options.atol, "int8": variants.int8_atol, "fp16": variants.fp16_atol}
        reports = {p: r for p, r in mel.reports.items() if p not in mel.written}  # failed in `auto`: not written
        written = {}
        for precision, path in mel.written.items():
            tol = Tolerance.for_precision(precision, atols[precision])
            tol = Tolerance(model=max(tol.model, E2E_ATOL_FP32), end_to_end=tol.end_to_end)
            written[precision] = out.with_name(path.name)
            reports[precision] = publish_audio(path, written[precision], forward, references, tol, dft,
                                               options.seed)
    return ExportResult(path=out, checkpoint=Path(checkpoint), demo=mel.demo, seconds=time.perf_counter() - start,
                        reports=reports, written=written)
