"""A corpus run's speed beside this machine's floor, measured in the same run (runtime.corpus.floor).

    python -m benchmarks.corpus_speed --model M.onnx [--model M2.onnx ...] [--clips F.flac ...] [--copies 4]
        [--rounds 1] [--per-file] [--json]

The corpus is the real piano clips (default: tests/data/piano, else the shipped ones), each copied `--copies`
times into a temporary folder; ``runtime.corpus.analyze_corpus`` analyses it into a temporary report folder as
``python -m runtime analyze DIR --out REPORT`` would. Reported: audio hours per hour, the floor (the model at
full batches plus decoding and features), their ratio, the process's CPU seconds (a measure of work that a shared
machine's load does not inflate), and whether windows of several files shared model calls
(``--per-file``: never, as before cross-file batching). With several models and ``--rounds``, the runs take turns
(model after model, round after round) in one process, so that a shared machine's load falls on all alike; each
model's median run (by speed) is reported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.cold import PROGRESS_PREFIX

DEFAULT_COPIES = 4


def corpus_section(model: Path, clips: list[Path], copies: int = DEFAULT_COPIES, *, threads: int | None = None,
                   across_files: bool | None = None, batch_size: int = 16) -> dict:
    """One corpus run over `copies` copies of `clips`: speed, floor and ratio."""
    from runtime.corpus.runner import analyze_corpus, make_analyzer

    analyzer = make_analyzer(model, device="cpu", threads=threads, batch_size=batch_size)
    with tempfile.TemporaryDirectory(prefix="percepiano-corpus-speed-") as tmp:
        root = Path(tmp) / "corpus"
        for i in range(copies):
            (root / f"copy{i}").mkdir(parents=True)
            for clip in clips:
                shutil.copy(clip, root / f"copy{i}" / clip.name)
        summary = analyze_corpus([root], Path(tmp) / "report", recursive=True, plots=False, analyzer=analyzer,
                                 across_files=across_files)
    floor = summary.floor
    info = analyzer.model.info
    return {"model": str(model), "precision": info.precision, "batch_independent": info.batch_independent,
            "across_files": info.batch_independent if across_files is None else across_files,
            "files": summary.files, "failed": summary.failed, "audio_seconds": summary.analysed_seconds,
            "wall_seconds": summary.wall_seconds, "cpu_seconds": summary.cpu_seconds,
            "audio_hours_per_hour": summary.speed,
            "floor": floor.to_dict() if floor else None,
            "ratio": summary.speed / floor.audio_hours_per_hour if floor and summary.speed else None}


def format_section(section: dict) -> str:
    floor = section["floor"] or {}
    how = "windows of several files per call" if section["across_files"] else "per file"
    return (f"{section['precision']} ({how}): {section['files']} files, {section['audio_seconds'] / 3600:.3f} h of "
            f"audio in {section['wall_seconds']:.1f} s: {section['audio_hours_per_hour']:.1f} audio hours per hour; "
            f"floor {floor.get('audio_hours_per_hour', float('nan')):.1f} (model "
            f"{floor.get('model_ms_per_window', 0):.1f} ms a window at batch {floor.get('batch_size')}, decoding and "
            f"features {floor.get('prepare_seconds', 0):.1f} s): {section['ratio'] or float('nan'):.2f} of the floor")


def main(argv: list[str] | None = None) -> int:
    from benchmarks.artifacts import source_clips

    parser = argparse.ArgumentParser(prog="python -m benchmarks.corpus_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, action="append", help="repeat to compare models")
    parser.add_argument("--clips", type=Path, nargs="+", help="audio files (default: tests/data/piano)")
    parser.add_argument("--copies", type=int, default=DEFAULT_COPIES, help="copies of each clip (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per model, taking turns (default %(default)s)")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's choice)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--per-file", action="store_true", help="each file in its own model calls (as before)")
    parser.add_argument("--both", action="store_true",
                        help="run each model per file and then across files (where its scores allow), in turns")
    parser.add_argument("--json", action="store_true", help="print the section as one JSON line (benchmarks.run)")
    args = parser.parse_args(argv)
    ways = (False, None) if args.both else (False,) if args.per_file else (None,)
    runs: dict[tuple, list[dict]] = {(m, way): [] for m in args.model for way in ways}
    for _ in range(args.rounds):
        for model, way in runs:
            print(PROGRESS_PREFIX + f"corpus run: {model.name}", file=sys.stderr, flush=True)
            runs[model, way].append(corpus_section(model, args.clips or source_clips(None), args.copies,
                                                   threads=args.threads, across_files=way,
                                                   batch_size=args.batch_size))
    for sections in runs.values():
        median = statistics.median_low([s["audio_hours_per_hour"] for s in sections])
        section = next(s for s in sections if s["audio_hours_per_hour"] == median)
        if len(sections) > 1:
            section["rounds"] = [{k: s[k] for k in ("audio_hours_per_hour", "ratio")} for s in sections]
        print(json.dumps(section) if args.json else format_section(section), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
