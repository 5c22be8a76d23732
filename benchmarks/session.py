"""onnxruntime session creation and first run, per way of saving and loading a model, in fresh processes.

The opt-in study `python -m benchmarks.run --session-table [--session-runs N]`, for the CPU models. For each
model, derived files are made once (pre-optimised at EXTENDED and at ALL, EXTENDED with the weights in an
external file, the ORT format), then every configuration is measured in N fresh processes pinned like the
benchmark's cold workers (`python -m benchmarks.session MODEL-ARGS`, this module's worker): session creation,
the first batch-15 run, the median warm batch-15 run, and the process's peak RSS (VmHWM) after the first run.
The medians are reported.
ALL-level files hold CPU-specific kernels and layouts (e.g. NCHWc): shown for comparison, not portable.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MB = 1_000_000
BATCH = 15  # the windows of a 30 s clip


@dataclass(frozen=True)
class Config:
    """One way of loading: which derived file, the graph optimisation level at load, session config entries."""

    name: str
    file: str  # original | extended | all | external | ort
    optimization: str
    entries: dict[str, str] = field(default_factory=dict)
    from_bytes: bool = False
    arena: bool = True  # onnxruntime's CPU memory arena (SessionOptions.enable_cpu_mem_arena)
    external_weights: bool = True  # the runtime's loader only (optimization "auto"): OnnxModel(external_weights)
    note: str = ""


CONFIGS = (
    Config("baseline", "original", "all", note="the file as given, optimised at load (ORT_ENABLE_ALL)"),
    Config("runtime", "original", "auto", note="the file as given, loaded by runtime.model.OnnxModel with its "
           "defaults (on the CPU: optimisation none for a pre-optimised file, else all; the weights read from "
           "the file in place, runtime.protowire)"),
    Config("runtime-parsed", "original", "auto", external_weights=False,
           note="the runtime's loader with external_weights=False: onnxruntime parses the whole file"),
    Config("preopt-extended", "extended", "none", note="saved optimised at EXTENDED (portable), loaded with none"),
    Config("preopt-extended+basic", "extended", "basic", note="the same file, loaded with basic"),
    Config("preopt-all", "all", "none", note="saved optimised at ALL (this CPU's layouts), loaded with none"),
    Config("external-data", "external", "none", note="EXTENDED, weights in a separate .data file"),
    Config("ort-format", "ort", "none", note="ORT format (EXTENDED), loaded from the file"),
    Config("ort-format-bytes", "ort", "none", from_bytes=True,
           entries={"session.use_ort_model_bytes_directly": "1"},
           note="ORT format read into bytes, used in place (with use_ort_model_bytes_for_initializers too, "
                "session creation crashes from Python: onnxruntime 1.32)"),
    Config("no-prepack", "extended", "none", entries={"session.disable_prepacking": "1"},
           note="EXTENDED file, prepacking of weights off"),
    Config("no-spin", "extended", "none", entries={"session.intra_op.allow_spinning": "0"},
           note="EXTENDED file, intra-op thread spinning off"),
    Config("baseline-no-spin", "original", "all", entries={"session.intra_op.allow_spinning": "0"},
           note="baseline, intra-op thread spinning off"),
    Config("no-arena", "extended", "none", arena=False, note="EXTENDED file, CPU memory arena off"),
)
BY_NAME = {c.name: c for c in CONFIGS}


def derived_files(model: Path, folder: Path, kinds: set[str]) -> dict[str, Path]:
    """The model's derived files in `folder` (made once; a file newer than the model is reused)."""
    from runtime.model import save_optimized

    folder.mkdir(parents=True, exist_ok=True)
    stem = model.name.removesuffix(".onnx")
    files = {"original": model}
    plans = {"extended": (folder / f"{stem}.extended.onnx", "extended", {}),
             "all": (folder / f"{stem}.all.onnx", "all", {}),
             "external": (folder / f"{stem}.external.onnx", "extended", {"external": True}),
             "ort": (folder / f"{stem}.extended.ort", "extended", {"ort_format": True})}
    for kind, (path, level, extra) in plans.items():
        if kind not in kinds:
            continue
        if not path.is_file() or path.stat().st_mtime < model.stat().st_mtime:
            save_optimized(model, path, level, **extra)
        files[kind] = path
    return files


def session_options_for(config: Config, threads: int):
    from runtime.model import session_options

    opts = session_options(threads, config.optimization)
    opts.enable_cpu_mem_arena = config.arena
    for key, value in config.entries.items():
        opts.add_session_config_entry(key, value)
    return opts


def worker(args: argparse.Namespace) -> dict:
    """One fresh process: create the session, run batch 15 once, then warm runs; the timings and peak RSS."""
    from benchmarks.cold import peak_rss_bytes
    from benchmarks.environment import pin

    started = time.monotonic()
    pin(args.cpus)
    import numpy as np
    import onnxruntime as ort

    config = BY_NAME[args.config]
    imported = time.monotonic()
    if config.optimization == "auto":  # the runtime's own loader, defaults and checks included
        from runtime.model import OnnxModel

        session = OnnxModel(args.model, device="cpu", threads=len(args.cpus),
                            external_weights=config.external_weights).session
    else:
        opts = session_options_for(config, len(args.cpus))
        source = Path(args.model).read_bytes() if config.from_bytes else args.model
        session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    created = time.monotonic()
    name = session.get_inputs()[0].name
    mel = batch_windows(args.mel)
    first = session.run(None, {name: mel})[0]
    ran = time.monotonic()
    peak = peak_rss_bytes()
    warm = []
    for _ in range(args.runs):
        t = time.perf_counter()
        session.run(None, {name: mel})
        warm.append(time.perf_counter() - t)
    return {"config": config.name, "import_s": imported - started, "session_s": created - imported,
            "first_run_s": ran - created, "warm_median_s": statistics.median(warm) if warm else None,
            "peak_rss_bytes": peak, "scores_checksum": float(np.asarray(first, np.float64).sum())}


def batch_windows(mel: str | os.PathLike | None):
    """The first BATCH windows of a (n, 128, 128) .npy file as contiguous float32, or random dB values without one."""
    import numpy as np

    windows = np.load(mel)[:BATCH] if mel else np.random.default_rng(0).uniform(-80, 0, (BATCH, 128, 128))
    return np.ascontiguousarray(windows, dtype=np.float32)


def measure(model: Path, folder: Path, cpus: list[int], runs: int = 3, warm_runs: int = 3,
            configs: tuple[Config, ...] = CONFIGS, mel: Path | None = None, note=print) -> dict:
    """Every configuration for one model, `runs` fresh processes each; medians and the raw runs."""
    from benchmarks.workers import run_module

    files = derived_files(model, folder, {c.file for c in configs})
    out = {}
    for config in configs:
        path = files[config.file]
        rows = []
        for i in range(runs):
            note(f"session: {model.name} {config.name} ({i + 1}/{runs})")
            argv = ["--model", str(path), "--config", config.name, "--cpus", ",".join(map(str, cpus)),
                    "--runs", str(warm_runs if i == 0 else 0), *(["--mel", str(mel)] if mel else [])]
            rows.append(run_module("benchmarks.session", argv, cpus, "cpu", note))
        out[config.name] = summarize(rows) | {"file_bytes": total_bytes(path)}
    return out


def total_bytes(path: Path) -> int:
    """A model file's size with its external data file, if it has one."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def summarize(rows: list[dict]) -> dict:
    keys = ("session_s", "first_run_s", "peak_rss_bytes")
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    med["cold_s"] = statistics.median(r["session_s"] + r["first_run_s"] for r in rows)
    med["warm_median_s"] = next((r["warm_median_s"] for r in rows if r["warm_median_s"] is not None), None)
    med["scores_checksum"] = rows[0]["scores_checksum"]
    return med | {"runs": len(rows)}


def session_section(models: dict[str, Path], folder: Path, cpus: list[int], runs: int = 3, warm_runs: int = 3,
                    mel: Path | None = None, note=print) -> dict:
    """The benchmark's `session` section: per precision, per configuration, the medians."""
    results = {p: measure(m, folder / p, cpus, runs, warm_runs, mel=mel, note=note) for p, m in models.items()}
    return {"runs": runs, "warm_runs": warm_runs, "batch": BATCH, "cpus": cpus,
            "configs": {c.name: {"file": c.file, "optimization": c.optimization, "entries": c.entries,
                                 "from_bytes": c.from_bytes, "note": c.note} for c in CONFIGS},
            "results": results}


def session_table(section: dict) -> tuple[str, list[str], list[list[str]]]:
    """The section as a benchmark table (benchmarks.report): title, headers, rows."""
    headers = ["model", "configuration", "create s", "1st run s", "create + 1st s", "warm s", "peak RSS MB",
               "file MB", "what"]
    notes = {name: (c["note"] if isinstance(c, dict) else c) for name, c in section["configs"].items()}
    rows = []
    for precision, configs in section["results"].items():
        for name, r in configs.items():
            warm = "-" if r.get("warm_median_s") is None else f"{r['warm_median_s']:.3f}"
            rows.append([precision, name, f"{r['session_s']:.3f}", f"{r['first_run_s']:.3f}", f"{r['cold_s']:.3f}",
                         warm, f"{r['peak_rss_bytes'] / MB:.0f}", f"{r['file_bytes'] / MB:.0f}", notes.get(name, "")])
    title = (f"Session creation and first run (batch {section['batch']}) by way of saving/loading the model: median "
             f"of {section['runs']} fresh processes (benchmarks.run --session-table); warm = median of "
             f"{section['warm_runs']} batch-{section['batch']} runs; peak RSS after the first run")
    return title, headers, rows


def main(argv: list[str] | None = None) -> int:
    """The worker process that measure() starts: one configuration of one model; prints one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.session", description="one measuring process")
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", required=True, choices=tuple(BY_NAME))
    parser.add_argument("--cpus", required=True, type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mel")
    print(json.dumps(worker(parser.parse_args(argv))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
