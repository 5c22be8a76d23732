"""Peak memory of `python -m convert export`, fp32 and `--quantize auto`, each in a fresh process.

    python -m benchmarks.export_memory [--preset production|tiny] [--out DIR] [--only fp32|auto]

The figure is the benchmark's accounting: VmHWM (peak resident set) of the exporting process, read when it
ends (or the highest VmRSS sample, where the kernel's batched counters leave VmHWM a few pages behind).
Each phase of the export (a log line of convert.*) is tagged with the process's resident memory when it
starts and the highest resident memory seen (sampled every 20 ms) until the next one, so the output says
where the peak is. The worker (`python -m benchmarks.export_memory worker -- EXPORT ARGS`) runs the converter's
own command line in-process and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.cold import peak_rss_bytes

REPO = Path(__file__).resolve().parents[1]
MB = 1_000_000
COMMANDS = {"fp32": [], "auto": ["--quantize", "auto"]}


def status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile), in bytes; 0 where there is none."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PhaseMemory(logging.Handler):
    """Every convert.* log record starts a phase; a sampler thread keeps each phase's highest VmRSS."""

    def __init__(self, interval: float = 0.02):
        super().__init__(level=logging.INFO)
        self.phases: list[dict] = []
        self.started = time.monotonic()
        self._interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def emit(self, record: logging.LogRecord) -> None:
        rss = status_bytes("VmRSS")
        with self._lock:
            self.phases.append({"phase": record.getMessage()[:100], "at_s": round(time.monotonic() - self.started, 2),
                                "rss_start_bytes": rss, "rss_peak_bytes": rss})

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            rss = status_bytes("VmRSS")
            with self._lock:
                if self.phases and rss > self.phases[-1]["rss_peak_bytes"]:
                    self.phases[-1]["rss_peak_bytes"] = rss

    def __enter__(self) -> PhaseMemory:
        self.phases.append({"phase": "start", "at_s": 0.0, "rss_start_bytes": status_bytes("VmRSS"),
                            "rss_peak_bytes": status_bytes("VmRSS")})
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def worker(export_args: list[str]) -> dict:
    """Run `python -m convert export EXPORT_ARGS` in this process; its peak memory and the phase breakdown."""
    from convert.cli import main as convert_main

    logging.basicConfig(level=logging.WARNING)
    logger = logging.getLogger("convert")
    logger.setLevel(logging.INFO)
    started = time.monotonic()
    with PhaseMemory() as phases:
        logger.addHandler(phases)
        try:
            rc = convert_main(["export", *export_args])
        finally:
            logger.removeHandler(phases)
    hwm = peak_rss_bytes()
    sampled = max(p["rss_peak_bytes"] for p in phases.phases)
    # The kernel batches its per-thread RSS counters, so VmHWM can trail a VmRSS sample by a few pages.
    return {"rc": rc, "seconds": time.monotonic() - started, "peak_rss_bytes": max(hwm, sampled), "vmhwm_bytes": hwm,
            "sampled_peak_bytes": sampled, "phases": phases.phases}


def measure(name: str, preset: str, out: Path, timeout: float = 3600.0) -> dict:
    """One export command in a fresh process: its VmHWM, phases, and the parity report it wrote."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    args = ["--out", str(folder / "model.onnx"), "--report", str(folder / "report.json"), *COMMANDS[name]]
    if preset != "production":
        from convert.demo import make_demo_checkpoint

        ckpt = folder / f"demo-{preset}.pkl"
        if not ckpt.is_file():
            make_demo_checkpoint(ckpt, preset=preset, seed=0)
        args += ["--checkpoint", str(ckpt)]
    cmd = [sys.executable, "-m", "benchmarks.export_memory", "worker", "--", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    lines = [s for s in proc.stdout.splitlines() if s.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"export {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result["command"] = "python -m convert export " + " ".join(args)
    result["files"] = {p.name: p.stat().st_size for p in sorted(folder.glob("model*")) if p.is_file()}
    report = folder / "report.json"
    result["parity"] = parity_headline(json.loads(report.read_text())) if report.is_file() else None
    return result


def parity_headline(reports: dict) -> dict:
    """The gate figures that must not change when memory handling does: per precision, passed and maxima."""
    keys = ("passed", "max_abs_model", "max_abs_end_to_end", "threshold_flips")
    return {p: {k: r.get(k) for k in keys} for p, r in reports.items()}


def format_table(results: dict[str, dict]) -> str:
    lines = [f"{'export':8s} {'peak RSS MB':>12s} {'seconds':>8s}  where the peak is"]
    for name, r in results.items():
        top = max(r["phases"], key=lambda p: p["rss_peak_bytes"])
        lines.append(f"{name:8s} {r['peak_rss_bytes'] / MB:12.0f} {r['seconds']:8.1f}  {top['phase'][:70]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        rest = argv[1:]
        print(json.dumps(worker(rest[1:] if rest[:1] == ["--"] else rest)), flush=True)
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("production", "tiny"), default="production")
    parser.add_argument("--out", type=Path, default=Path("bench-results/export-memory"))
    parser.add_argument("--only", choices=tuple(COMMANDS), action="append", help="one command (repeatable)")
    args = parser.parse_args(argv)
    results = {name: measure(name, args.preset, args.out) for name in (args.only or COMMANDS)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_memory.json").write_text(json.dumps(results, indent=2))
    print(format_table(results))
    for name, r in results.items():
        print(f"\n{name}: {r['command']}")
        for p in r["phases"]:
            print(f"  {p['at_s']:7.1f}s  start {p['rss_start_bytes'] / MB:6.0f} MB  "
                  f"peak {p['rss_peak_bytes'] / MB:6.0f} MB  {p['phase'][:80]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
