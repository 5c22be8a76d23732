"""Cold-start worker: one fresh process, from process start to the 19 scores of an audio file.

    python -m benchmarks.cold jax --checkpoint CKPT.pkl --audio A.flac --cpus 0,1 --t0 T [--cache-dir D]
    python -m benchmarks.cold ort --model M.onnx --audio A.flac --cpus 0,1 --t0 T [--device cpu]

Prints one JSON line on stdout: the phase timings (seconds), the total since `--t0` (the parent's
time.monotonic() just before it started this process; CLOCK_MONOTONIC is system-wide on Linux), the
peak RSS of this process, and the scores. With `--mel`, the same process then measures warm latency
(after the peak RSS is read, so the cold figures are not inflated by large batches). Progress lines go
to stderr as `progress: ...`. Only the standard library is imported before the process is pinned.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from benchmarks.environment import pin

PROGRESS_PREFIX = "progress: "


def progress(message: str) -> None:
    print(PROGRESS_PREFIX + message, file=sys.stderr, flush=True)


class Phases:
    """Consecutive named intervals, timed with the monotonic clock."""

    def __init__(self, start: float):
        self.seconds: dict[str, float] = {}
        self._last = start

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = now - self._last
        self._last = now


def peak_rss_bytes() -> int:
    """Peak resident memory of this process: VmHWM on Linux, else ru_maxrss.

    On Linux ru_maxrss is not used: exec carries the parent's high-water mark into it, so a worker
    started by a large parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def jax_cold(args: argparse.Namespace, phases: Phases) -> tuple[dict, object]:
    """The original service's path: pickle.load -> Flax model -> jit -> librosa features -> run -> inverse scale."""
    import pickle

    import jax
    import librosa  # noqa: F401  (the original imported it at the top; librosa loads its parts lazily)
    import numpy as np

    from convert.config import ModelConfig
    from convert.model import ProductionASTForRegression
    from runtime.analyze import aggregate

    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    phases.mark("import")
    progress("unpickling the checkpoint")
    # Plain pickle.load runs whatever the file says; it is what the original did (needing jax and sklearn
    # installed just to read the file), and acceptable here only because the benchmark made the checkpoint
    # itself or the user vouches for it. The project's own loader is convert.checkpoint (an allowlist).
    with open(args.checkpoint, "rb") as fh:
        ckpt = pickle.load(fh)  # noqa: S301
    model = ProductionASTForRegression(ModelConfig.from_checkpoint(ckpt["model_config"]))
    variables, scaler = ckpt["params"], ckpt["label_scaler"]
    phases.mark("load")
    progress("librosa features")
    from convert.reference import reference_features  # librosa.load + melspectrogram per chunk, as the original

    mel = reference_features(args.audio)
    phases.mark("features")
    progress("jit compile")
    forward = jax.jit(model.apply)
    compiled = forward.lower(variables, mel).compile()
    phases.mark("compile")
    progress("first inference")
    z = compiled(variables, mel).block_until_ready()
    chunk_scores = scaler.inverse_transform(np.asarray(z))
    scores = aggregate(chunk_scores)
    phases.mark("first_inference")
    mean, scale = np.asarray(scaler.mean_, np.float32), np.asarray(scaler.scale_, np.float32)

    def run(x):  # warm runner: device-synchronised, scores in label units on the host
        return np.asarray(forward(variables, x).block_until_ready()) * scale + mean

    device = str(jax.devices()[0].platform)
    return {"scores": scores.tolist(), "device": device, "features": "librosa (as the original)",
            "jax_backend": jax.default_backend()}, run


def ort_cold(args: argparse.Namespace, phases: Phases) -> tuple[dict, object]:
    """The runtime's path: import runtime (no JAX) -> session -> decode + numpy features -> run."""
    import numpy as np  # noqa: F401

    from runtime.analyze import aggregate
    from runtime.audio import load_audio
    from runtime.features import features_from_audio
    from runtime.model import OnnxModel

    phases.mark("import")
    progress("creating the onnxruntime session")
    model = OnnxModel(args.model, device=args.device, threads=len(args.cpus))
    phases.mark("session")
    progress("decoding audio and computing features")
    mel = features_from_audio(load_audio(args.audio))
    phases.mark("features")
    progress("first inference")
    scores = aggregate(model.predict(mel, 16))
    phases.mark("first_inference")
    heavy = sorted(m for m in ("jax", "flax", "librosa", "sklearn", "torch", "tensorflow") if m in sys.modules)
    return {"scores": scores.tolist(), "device": model.device, "providers": model.providers,
            "io_binding": model.io_binding, "precision": model.info.precision,
            "features": "runtime.features (numpy)", "heavy_modules_imported": heavy}, model.run


def warm_phase(args: argparse.Namespace, run) -> dict:
    """Warm latency at each batch size, plus the per-window scores of the clip for the parity check."""
    import numpy as np

    from benchmarks.warm import measure

    mel = np.load(args.mel)
    batches = [int(b) for b in args.batches.split(",")]
    warm, chunk_scores = measure(run, mel, batches, warmup=args.warmup, runs=args.runs, progress=progress)
    return {"warm": warm, "chunk_scores": chunk_scores.tolist()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cold", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("jax", "ort"))
    parser.add_argument("--audio", required=True)
    parser.add_argument("--cpus", required=True, type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--t0", type=float, help="the parent's time.monotonic() when it started this process")
    parser.add_argument("--checkpoint", help="jax: the pickled checkpoint")
    parser.add_argument("--cache-dir", help="jax: persistent compilation cache directory")
    parser.add_argument("--model", help="ort: the ONNX model")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="ort: execution device")
    parser.add_argument("--mel", help="then measure warm latency on these (n, 128, 128) windows (.npy)")
    parser.add_argument("--batches", default="1,15,32")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    return parser


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = build_parser().parse_args(argv)
    pin(args.cpus)
    phases = Phases(started)
    if args.t0 is not None:
        phases.seconds["startup"] = started - args.t0  # exec, interpreter start, `-m` module lookup
    cold = jax_cold if args.kind == "jax" else ort_cold
    result, run = cold(args, phases)
    total = time.monotonic() - (args.t0 if args.t0 is not None else started)
    result |= {"kind": args.kind, "phases": phases.seconds, "total_s": total, "peak_rss_bytes": peak_rss_bytes(),
               "pid": os.getpid(), "cpus": args.cpus}
    if args.mel:
        result |= warm_phase(args, run)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
