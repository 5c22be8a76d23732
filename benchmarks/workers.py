"""Start the measuring processes (benchmarks.cold, benchmarks.roofline) pinned alike, and read their JSON line."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.cold import PROGRESS_PREFIX
from benchmarks.environment import child_env

REPO = Path(__file__).resolve().parents[1]
Note = Callable[[str], None]


class WorkerError(RuntimeError):
    """A measuring process failed; carries the tail of its stderr."""


def _env(cpus: list[int], device: str) -> dict[str, str]:
    env = child_env(cpus, device)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_module(module: str, args: list[str], cpus: list[int], device: str, note: Note,
               timeout: float = 3600.0) -> dict:
    """Run `python -m module args --t0 NOW` in a fresh process; return the JSON object it prints last."""
    cmd = [sys.executable, "-m", module, *args]
    if module == "benchmarks.cold":
        cmd += ["--t0", f"{time.monotonic():.6f}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(cpus, device),
                            cwd=REPO)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.extend(proc.stdout), daemon=True)
    reader.start()
    tail: collections.deque[str] = collections.deque(maxlen=30)
    try:
        for line in proc.stderr:
            if line.startswith(PROGRESS_PREFIX):
                note(line[len(PROGRESS_PREFIX):].strip())
            else:
                tail.append(line.rstrip())
        rc = proc.wait()
        reader.join()
    finally:
        killer.cancel()
    lines = [s for s in stdout if s.startswith("{")]
    if rc != 0 or not lines:
        why = "timed out" if rc == -9 else f"exit status {rc}"
        raise WorkerError(f"{' '.join(cmd[2:5])} failed ({why}):\n" + "\n".join(tail))
    return json.loads(lines[-1])


def median_cold(runs: list[dict]) -> dict:
    """One variant's cold starts as one record: the first run (it carries the warm figures and scores) with
    the cold figures of the run whose total is the median (the lower middle one for an even count)."""
    median = sorted(runs, key=lambda r: r["total_s"])[(len(runs) - 1) // 2]
    cold = {k: median[k] for k in ("phases", "total_s", "peak_rss_bytes")}
    return runs[0] | cold | {"cold_totals_s": [r["total_s"] for r in runs]}


def gemm(cpus: list[int], size: int, repeats: int, note: Note) -> dict:
    """The float32 GEMM rate of this machine, in a process pinned like the variants."""
    note(f"numpy matmul {size}x{size} float32, median of {repeats}")
    args = ["--cpus", ",".join(map(str, cpus)), "--size", str(size), "--repeats", str(repeats)]
    return run_module("benchmarks.roofline", args, cpus, "cpu", note)
