"""Speed per window at several batch sizes, and how far a window's scores move with its batch neighbours.

    python -m benchmarks.neighbours MODEL.onnx [MODEL2.onnx ...] [--clips F.flac ...] [--rounds 7] [--json OUT]

All models are loaded in one process and timed interleaved (round after round, each model and batch size in
turn), so that a shared machine's load falls on all of them alike; the medians are reported. The windows are the
real clips' (default: the shipped clips). Neighbours: each window of the first clip is scored alone, then in a
batch with the other clips' windows, in a batch of quiet windows (-80 dB) and in a batch of loud noise; the
largest change of one score from its score alone is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

BATCHES = (1, 5, 16, 32)


def clip_windows(clips: list[Path]) -> list[np.ndarray]:
    """Each clip's log-mel windows, as the runtime computes them."""
    from runtime.audio import load_audio
    from runtime.features import features_from_audio

    return [features_from_audio(load_audio(c)) for c in clips]


SETTLE_SECONDS = 0.05  # before each timed call: the previous call's session stops spinning its threads


def speeds(models: dict, windows: np.ndarray, rounds: int) -> dict[str, dict[int, float]]:
    """Median ms per window for each model and batch size, timed interleaved.

    Each session has its own thread pool, whose threads spin for a while after a call; timed right after another
    model's call, a batch-1 call (about 40 ms) ran up to 40 % slower than alone, depending on which model came
    before it. A short pause before each timed call keeps the models from timing each other's spinning.
    """
    times = {name: {b: [] for b in BATCHES} for name in models}
    for model in models.values():
        for b in BATCHES:
            model.run(windows[:b])  # warm-up
    for _ in range(rounds):
        for b in BATCHES:
            for name, model in models.items():
                time.sleep(SETTLE_SECONDS)
                start = time.perf_counter()
                model.run(windows[:b])
                times[name][b].append((time.perf_counter() - start) * 1e3 / b)
    return {name: {b: statistics.median(v) for b, v in per.items()} for name, per in times.items()}


def main(argv: list[str] | None = None) -> int:
    from convert.parity import neighbour_change, shipped_clips
    from runtime.model import OnnxModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--clips", type=Path, nargs="+", help="real audio (default: the shipped clips)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    models = {str(p): OnnxModel(p, device="cpu") for p in args.models}
    windows = clip_windows(args.clips or shipped_clips())
    pool = np.concatenate(windows)
    pool = np.concatenate([pool] * (-(-max(BATCHES) // len(pool))))
    out = {"speeds_ms_per_window": speeds(models, pool, args.rounds),
           "neighbour_change": {name: neighbour_change(m, windows) for name, m in models.items()},
           "rounds": args.rounds, "windows": int(sum(map(len, windows)))}
    print(f"{'model':50s} " + " ".join(f"{f'b{b} ms/win':>11s}" for b in BATCHES) + f" {'neighbours':>11s}")
    for name in models:
        sp = out["speeds_ms_per_window"][name]
        print(f"{name[-50:]:50s} " + " ".join(f"{sp[b]:11.2f}" for b in BATCHES)
              + f" {out['neighbour_change'][name]:11.2e}")
    print(f"medians of {args.rounds} interleaved rounds in one process (shared machine: compare rows, not runs)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
