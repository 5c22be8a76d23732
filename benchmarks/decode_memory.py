"""Peak memory of decoding: one minute of piano at 384 kHz against the same minute at 22,050 Hz.

Each measurement is a fresh process (``python -m runtime analyze FILE`` with a model, and ``load_audio``
alone), its peak RSS taken from the kernel's accounting of that child (``os.wait4``). ``--before DIR``
runs the same commands with another checkout's ``runtime`` (for instance the main branch) for comparison:

    python -m convert demo-checkpoint /tmp/tiny.pkl --preset tiny
    python -m convert export --checkpoint /tmp/tiny.pkl --out /tmp/tiny.onnx
    python -m benchmarks.decode_memory --model /tmp/tiny.onnx --before /work/main

A benchmark, not a test: the figures depend on the machine and the libraries.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PIANO_CLIPS = REPO / "tests" / "data" / "piano"
RATES = (384_000, 22_050)
# Runs in the measured process and writes its own VmHWM (peak RSS since exec) at exit: the rusage of a child
# is no good here, since Linux carries the parent's peak at fork time into it.
MEASURED = """
import atexit, os, runpy, sys
def report():
    hwm = [line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')][0]
    with open(os.environ['PEAK_RSS_FILE'], 'w') as f:
        f.write(hwm)
atexit.register(report)
if sys.argv[1] == 'analyze':
    sys.argv = ['runtime', *sys.argv[1:]]
    runpy.run_module('runtime', run_name='__main__', alter_sys=True)
else:
    from runtime.audio import load_audio
    load_audio(sys.argv[2])
"""


def piano_minute(seconds: float) -> np.ndarray:
    """Real piano at 22,050 Hz (the repository's clips end to end), or a decaying chord where they are missing."""
    import soundfile as sf

    sr, parts, total = 22_050, [], 0
    for clip in sorted(PIANO_CLIPS.glob("*.flac")):
        y = sf.read(clip, dtype="float32")[0]
        parts.append(y)
        total += len(y)
        if total >= seconds * sr:
            return np.concatenate(parts)[: int(seconds * sr)]
    t = np.arange(int(seconds * sr)) / sr
    return (0.2 * sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6)) * np.exp(-(t % 2))).astype(np.float32)


def write_inputs(folder: Path, seconds: float) -> dict[int, Path]:
    """The same minute as stereo 24-bit FLAC at each rate in RATES."""
    import soundfile as sf
    import soxr

    base = piano_minute(seconds)
    paths = {}
    for rate in RATES:
        y = base if rate == 22_050 else soxr.resample(base, 22_050, rate, quality="HQ").astype(np.float32)
        paths[rate] = folder / f"piano_{rate}.flac"
        sf.write(paths[rate], np.stack([y, 0.8 * y], axis=1), rate, subtype="PCM_24")
    return paths


def peak_rss_mb(args: list[str], tree: Path) -> float:
    """Run MEASURED with ``args`` and ``tree`` first on PYTHONPATH; its peak resident set size in MB."""
    with tempfile.NamedTemporaryFile(suffix=".peak") as peak:
        env = {**os.environ, "PYTHONPATH": str(tree), "PEAK_RSS_FILE": peak.name}
        proc = subprocess.run([sys.executable, "-c", MEASURED, *args], cwd=tree, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        return int(Path(peak.name).read_text()) / 1024  # kB -> MB


def measure(trees: dict[str, Path], model: Path, paths: dict[int, Path]) -> list[dict]:
    rows = []
    for label, tree in trees.items():
        for rate, path in paths.items():
            analyze = ["analyze", str(path), "--model", str(model), "--json", "--device", "cpu", "--threads", "1"]
            load = ["load_audio", str(path)]
            row = {"code": label, "tree": str(tree), "rate": rate, "file_mb": round(path.stat().st_size / 1e6, 2),
                   "analyze_peak_rss_mb": round(peak_rss_mb(analyze, tree), 1),
                   "load_audio_peak_rss_mb": round(peak_rss_mb(load, tree), 1)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def table(rows: list[dict], seconds: float) -> str:
    lines = [f"Peak RSS, {seconds:g} s of stereo piano (FLAC, 24 bit), fresh process each",
             "", "| code | native rate | file MB | `runtime analyze` MB | `load_audio` MB |", "|---|---|---|---|---|"]
    lines += [f"| {r['code']} | {r['rate']} Hz | {r['file_mb']} | {r['analyze_peak_rss_mb']} | "
              f"{r['load_audio_peak_rss_mb']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="an exported ONNX model (the tiny preset will do)")
    parser.add_argument("--before", type=Path, help="another checkout to compare with (its runtime/ is used)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    trees = {"after (this tree)": REPO}
    if args.before:
        trees = {"before": args.before.resolve(), **trees}
    with tempfile.TemporaryDirectory(prefix="decode-memory-") as tmp:
        paths = write_inputs(Path(tmp), args.seconds)
        rows = measure(trees, args.model.resolve(), paths)
    print(table(rows, args.seconds))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"seconds": args.seconds, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
