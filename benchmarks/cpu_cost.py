"""`python -m benchmarks.cpu_cost`: CPU seconds per request of what a GPU container does on its CPUs, and the
reservation they imply.

    python -m benchmarks.cpu_cost [--seconds 30] [--rate 44100] [--repeats 5] [--target-rps 4] [--out cost.json]

A request's host work: decode + resample to 22,050 Hz mono (runtime.audio.load_audio), then, for the mel-input
model, the log-mel features (runtime.features); the waveform-in model (`export --input audio`) only cuts 3 s
chunks, its features run in the graph (on the GPU there). Measured as process CPU time (time.process_time: every
thread of this process, not wall time, so less sensitive to other load on a shared machine), the median of
`--repeats`, on the shipped clips made into one `--seconds` recording at `--rate` Hz stereo (what a phone or a
DAW sends) and encoded as FLAC, MP3 (soundfile) and m4a/AAC (PyAV).

The reservation (`reservation`): cores = target requests/s x the worst format's CPU seconds per request x
HEADROOM, plus BASE_CORES (the event loop, HTTP bodies, onnxruntime's launch thread), rounded up to a half core;
memory = BASE_MEMORY_MB (Python, onnxruntime-gpu and the CUDA libraries' host side, the model bytes) plus
CONCURRENCY x a request's working set (its body and decoded audio at most).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FORMATS = ("flac", "mp3", "m4a")
HEADROOM = 1.5  # bursts and the slower formats' tail: a reservation at the median would queue at the target
BASE_CORES = 1.0
BASE_MEMORY_MB = 3072  # measured order of a loaded onnxruntime-gpu process with the fp16 model, plus slack
REQUEST_MEMORY_MB = 160  # one request: a 50 MB body (the service's limit) + decoded float32 audio + buffers
CONCURRENCY = 4  # analyses at once in the GPU container (PERCEPIANO_MAX_CONCURRENCY)


@dataclass(frozen=True)
class Reservation:
    target_rps: float
    cpu_ms_per_request: float
    cores: float
    memory_mb: int
    threads: int


def reservation(cpu_ms_per_request: float, target_rps: float, concurrency: int = CONCURRENCY) -> Reservation:
    """Cores and memory for `target_rps` requests per second per container at `cpu_ms_per_request` CPU ms each."""
    busy = target_rps * cpu_ms_per_request / 1e3 * HEADROOM  # cores kept busy by request work
    cores = math.ceil((BASE_CORES + busy) * 2) / 2
    memory = BASE_MEMORY_MB + concurrency * REQUEST_MEMORY_MB
    # onnxruntime's intra-op threads: the CPU provider runs only the graph's shape ops beside CUDA, so two
    # threads, never the host's core count (which onnxruntime would take by default)
    return Reservation(target_rps, round(cpu_ms_per_request, 1), cores, int(memory), 2)


def recording(seconds: float, rate: int) -> np.ndarray:
    """The shipped clips end to end, repeated to `seconds`, at `rate` Hz, stereo (frames, 2) float32."""
    import soundfile as sf
    import soxr

    from convert.parity import shipped_clips

    parts = [sf.read(c, dtype="float32", always_2d=True)[0].mean(axis=1) for c in shipped_clips()]
    if not parts:
        raise SystemExit("no shipped clips in convert/clips")
    sr = sf.info(shipped_clips()[0]).samplerate
    y = np.concatenate(parts)
    y = np.tile(y, math.ceil(seconds * sr / len(y)))[: int(seconds * sr)]
    if rate != sr:
        y = soxr.resample(y, sr, rate, quality="HQ").astype(np.float32)
    return np.stack([y, 0.8 * y], axis=1).astype(np.float32)


def encode(audio: np.ndarray, rate: int, fmt: str) -> bytes:
    """FLAC and MP3 with soundfile, m4a (AAC in MP4) with PyAV."""
    buf = io.BytesIO()
    if fmt in ("flac", "mp3"):
        import soundfile as sf

        spec = {"flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III")}[fmt]
        sf.write(buf, audio, rate, format=spec[0], subtype=spec[1])
        return buf.getvalue()
    import av

    planar = np.ascontiguousarray(audio.T)
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate, layout="stereo")
        for start in range(0, planar.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar[:, start:start + 1024]), format="fltp",
                                               layout="stereo")
            frame.sample_rate, frame.pts = rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def cpu_ms(fn, repeats: int) -> tuple[float, float, object]:
    """(median process-CPU ms, median wall ms, the last result) of `repeats` calls."""
    cpu, wall, out = [], [], None
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        cpu.append((time.process_time() - c0) * 1e3)
        wall.append((time.perf_counter() - w0) * 1e3)
    return statistics.median(cpu), statistics.median(wall), out


def measure(seconds: float = 30.0, rate: int = 44_100, repeats: int = 5) -> list[dict]:
    """One row per format: CPU ms of decode + resample, features (mel model), chunks (waveform-in model)."""
    from runtime.audio import load_audio
    from runtime.features import chunk_audio, features_from_audio

    audio = recording(seconds, rate)
    rows = []
    for fmt in FORMATS:
        data = encode(audio, rate, fmt)
        decode_cpu, decode_wall, y = cpu_ms(lambda d=data: load_audio(d), repeats)
        features_cpu, features_wall, _ = cpu_ms(lambda y=y: features_from_audio(y), repeats)
        chunks_cpu, _, _ = cpu_ms(lambda y=y: chunk_audio(y), repeats)
        rows.append({"format": fmt, "bytes": len(data), "seconds": round(len(y) / 22_050, 2),
                     "decode_resample_cpu_ms": decode_cpu, "decode_resample_wall_ms": decode_wall,
                     "features_cpu_ms": features_cpu, "features_wall_ms": features_wall, "chunks_cpu_ms": chunks_cpu,
                     "mel_model_cpu_ms": decode_cpu + features_cpu, "audio_model_cpu_ms": decode_cpu + chunks_cpu})
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'format':6s} {'decode+resample':>16s} {'features':>9s} {'chunks':>7s} {'mel model':>10s} "
            f"{'waveform-in':>12s}   (process CPU ms per request)")
    lines = [head]
    for r in rows:
        lines.append(f"{r['format']:6s} {r['decode_resample_cpu_ms']:16.1f} {r['features_cpu_ms']:9.1f} "
                     f"{r['chunks_cpu_ms']:7.2f} {r['mel_model_cpu_ms']:10.1f} {r['audio_model_cpu_ms']:12.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="request length in seconds (default 30)")
    parser.add_argument("--rate", type=int, default=44_100, help="the uploads' sample rate (default 44100)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement, median (default 5)")
    parser.add_argument("--target-rps", type=float, default=4.0, help="requests/s per container (default 4)")
    parser.add_argument("--out", type=Path, help="also write rows and reservations as JSON here")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.repeats < 1 or args.target_rps <= 0:
        parser.error("--seconds and --target-rps must be positive, --repeats at least 1")
    rows = measure(args.seconds, args.rate, args.repeats)
    worst = {kind: max(r[f"{kind}_model_cpu_ms"] for r in rows) for kind in ("mel", "audio")}
    plans = {kind: asdict(reservation(ms, args.target_rps)) for kind, ms in worst.items()}
    removed = statistics.median(r["features_cpu_ms"] for r in rows)
    print(table(rows))
    print(f"the waveform-in model removes {removed:.1f} CPU ms per {args.seconds:g} s request (the features)")
    for kind, plan in plans.items():
        print(f"{kind:5s} model at {args.target_rps:g} req/s: worst {plan['cpu_ms_per_request']:.1f} CPU ms/request "
              f"-> reserve {plan['cores']:g} cores, {plan['memory_mb']} MiB, {plan['threads']} onnxruntime threads")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "reservations": plans, "features_removed_cpu_ms": removed,
                                        "seconds": args.seconds, "rate": args.rate, "repeats": args.repeats},
                                       indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
