"""Warm latency: a callable timed over many runs after warm-up, summarised as percentiles."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence

import numpy as np

Runner = Callable[[np.ndarray], np.ndarray]  # (B, 128, 128) mel -> (B, 19) scores, synchronised with the device
Progress = Callable[[str], None]

PERCENTILES = (50, 90, 99)
MIN_BUSY_WALL_S = 0.5


def batch_of(mel: np.ndarray, batch: int) -> np.ndarray:
    """`batch` windows cut from the clip's windows, cycling through them (batch 1 = the first window)."""
    return np.ascontiguousarray(np.resize(mel, (batch, *mel.shape[1:])), dtype=np.float32)


def summarize(times: Sequence[float], batch: int) -> dict:
    """Percentiles (linear interpolation, so p50 <= p90 <= p99) and throughput = batch / p50."""
    t = np.asarray(times, dtype=np.float64)
    p50, p90, p99 = (float(v) for v in np.percentile(t, PERCENTILES))
    return {
        "batch": batch,
        "runs": len(t),
        "p50_s": p50,
        "p90_s": p90,
        "p99_s": p99,
        "mean_s": float(t.mean()),
        "min_s": float(t.min()),
        "max_s": float(t.max()),
        "chunks_per_s": batch / p50,
    }


def time_runs(run: Runner, x: np.ndarray, *, warmup: int, runs: int,
              progress: Progress | None = None) -> tuple[dict, np.ndarray]:
    """Warm up, then time `runs` calls (each returns host memory, so device work is included); summary, last output."""
    for i in range(warmup):
        if progress:
            progress(f"batch {len(x)}: warm-up {i + 1}/{warmup}")
        out = run(x)
    times, cpu_start, wait_start, wall_start = [], _cpu_seconds(), _runqueue_wait_seconds(), time.perf_counter()
    for i in range(runs):
        if progress and (i % 5 == 0 or i == runs - 1):
            progress(f"batch {len(x)}: run {i + 1}/{runs}")
        start = time.perf_counter()
        out = run(x)
        times.append(time.perf_counter() - start)
    summary = summarize(times, len(x))
    summary["warmup"] = warmup
    # Per second of the timed loop: CPU seconds this process got (near the thread count when it kept the CPUs
    # busy) and seconds its threads spent ready to run but waiting for a CPU (near 0 on an otherwise idle
    # machine). None when the loop is too short for the kernel's accounting.
    wall = time.perf_counter() - wall_start
    waited = _runqueue_wait_seconds()
    long_enough = wall >= MIN_BUSY_WALL_S
    summary["cores_busy"] = (_cpu_seconds() - cpu_start) / wall if long_enough else None
    summary["cpu_wait"] = (waited - wait_start) / wall if long_enough and None not in (waited, wait_start) else None
    summary["output_finite"] = bool(np.isfinite(out).all())
    return summary, out


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _runqueue_wait_seconds() -> float | None:
    """Seconds all threads of this process have waited on a run queue (Linux schedstat), None elsewhere."""
    import glob

    paths, total = glob.glob("/proc/self/task/*/schedstat"), 0
    for path in paths:
        try:
            with open(path) as fh:
                total += int(fh.read().split()[1])
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        except (OSError, ValueError, IndexError):
            return None
    return total / 1e9 if paths else None


def measure(run: Runner, mel: np.ndarray, batches: Sequence[int], *, warmup: int, runs: int,
            progress: Progress | None = None) -> tuple[dict[str, dict], np.ndarray]:
    """Time each batch size; also return the scores of the clip's own windows for the parity check."""
    results, clip_scores = {}, None
    for b in batches:
        results[str(b)], out = time_runs(run, batch_of(mel, b), warmup=warmup, runs=runs, progress=progress)
        if b == len(mel):  # the batch was the clip's windows themselves
            clip_scores = out
    if clip_scores is None:
        clip_scores = run(np.ascontiguousarray(mel, dtype=np.float32))
    return results, np.asarray(clip_scores, dtype=np.float64)
