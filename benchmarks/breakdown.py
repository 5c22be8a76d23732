"""Where a warm batch-15 run spends its time, by kind of op (onnxruntime's profiler), per CPU variant.

The opt-in study `python -m benchmarks.run --breakdown [--profile-runs 5]`, for the CPU models. Each model is
loaded as the runtime loads it (runtime.model: the same optimisation level and weights read in place), with
onnxruntime's profiler on, in a fresh process pinned like the benchmark's cold workers (`python -m
benchmarks.breakdown`, this module's worker); after the warm-up runs, the profiled batch-15 runs are timed and
each node's median kernel time is kept. The nodes are grouped into the GEMMs against weights (int8 or float),
attention's activation-by-activation GEMMs, and every other op type. Two figures follow from the groups: how
much faster the int8 weight GEMMs run than the float32 ones at the same shapes (the int8 kernels' speed-up on
this CPU), and what the int8 model would take if every op but its GEMMs were free (the floor of its warm time,
and so of its ratio to JAX).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.session import BATCH, batch_windows

INT8_GEMMS = frozenset({"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger", "QGemm",
                        "DynamicQuantizeLinear", "QLinearMatMul"})
FLOAT_GEMMS = frozenset({"MatMul", "Gemm", "FusedMatMul", "FusedGemm"})
GEMM_GROUPS = ("int8 weight GEMMs", "float weight GEMMs", "attention GEMMs")


def group_of(op: str, parameter_bytes: int) -> str:
    """A node's group: int8 or float GEMM against weights (the node reads initializers), attention's GEMMs
    of two activations, or its own op type."""
    if op in INT8_GEMMS:
        return "int8 weight GEMMs"
    if op in FLOAT_GEMMS:
        return "float weight GEMMs" if parameter_bytes > 0 else "attention GEMMs"
    return op


def node_medians(trace: list[dict], skip: int) -> dict[str, dict]:
    """Per node of an onnxruntime profile: op type, weight bytes, and the median kernel time (s) of its runs
    after the first `skip`."""
    nodes: dict[str, dict] = {}
    for event in trace:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        node = nodes.setdefault(event["name"].removesuffix("_kernel_time"),
                                {"op": args.get("op_name", "?"), "parameter_bytes": int(args.get("parameter_size", 0)),
                                 "durations_us": []})
        node["durations_us"].append(float(event["dur"]))
    out = {}
    for name, node in nodes.items():
        timed = node["durations_us"][skip:]
        if timed:
            out[name] = {"op": node["op"], "parameter_bytes": node["parameter_bytes"],
                         "median_s": statistics.median(timed) / 1e6, "runs": len(timed)}
    return out


def grouped(nodes: dict[str, dict]) -> dict:
    """Seconds per group (GEMM groups first, then the other op types, largest first), their total and shares."""
    groups: dict[str, float] = {}
    counts: dict[str, int] = {}
    for node in nodes.values():
        key = group_of(node["op"], node["parameter_bytes"])
        groups[key] = groups.get(key, 0.0) + node["median_s"]
        counts[key] = counts.get(key, 0) + 1
    total = sum(groups.values())
    order = [g for g in GEMM_GROUPS if g in groups] + sorted((g for g in groups if g not in GEMM_GROUPS),
                                                             key=lambda g: -groups[g])
    rows = [{"group": g, "seconds": groups[g], "share": groups[g] / total if total else 0.0, "nodes": counts[g]}
            for g in order]
    gemm = sum(groups.get(g, 0.0) for g in GEMM_GROUPS)
    return {"groups": rows, "node_total_s": total, "gemm_s": gemm, "gemm_share": gemm / total if total else 0.0}


def worker(args: argparse.Namespace) -> dict:
    """One fresh process: the runtime's session with the profiler on, warm-up, profiled runs, the groups."""
    from benchmarks.environment import pin

    pin(args.cpus)
    from runtime.model import create_session, graph_section, load_optimization, session_options
    from runtime.protowire import header_metadata

    level = load_optimization(graph_section(header_metadata(args.model)), "cpu")
    with tempfile.TemporaryDirectory(prefix="percepiano-profile-") as tmp:
        def make_options():
            opts = session_options(len(args.cpus), level)
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(tmp, "profile")
            return opts

        session, weights = create_session(args.model, make_options, ["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        feed = {name: batch_windows(args.mel)}
        walls = []
        for i in range(args.warmup + args.runs):
            started = time.perf_counter()
            session.run(None, feed)
            if i >= args.warmup:
                walls.append(time.perf_counter() - started)
        trace = json.loads(Path(session.end_profiling()).read_text())
    nodes = node_medians(trace, skip=args.warmup)
    return {"model": str(args.model), "optimization": level, "weights": weights, "batch": BATCH,
            "runs": args.runs, "warmup": args.warmup, "profiled_wall_median_s": statistics.median(walls),
            **grouped(nodes)}


def summary(by_precision: dict[str, dict], jax_warm_s: float | None = None, int8_warm_s: float | None = None) -> dict:
    """The two figures of the module docstring from the fp32 and int8 profiles (and the warm table's medians)."""
    out: dict = {}
    seconds = {p: {g["group"]: g["seconds"] for g in r.get("groups", [])} for p, r in by_precision.items()}
    fp32, int8 = seconds.get("fp32", {}), seconds.get("int8", {})
    float_in_int8 = int8.get("float weight GEMMs", 0.0)  # the layers int8 keeps in float32 (embedding, head)
    if fp32.get("float weight GEMMs") and int8.get("int8 weight GEMMs"):
        # the same layers in float32: all of fp32's weight GEMMs less those int8 also keeps in float32
        out["int8_gemm_speedup"] = (fp32["float weight GEMMs"] - float_in_int8) / int8["int8 weight GEMMs"]
    record = by_precision.get("int8", {})
    if record.get("gemm_share") and int8_warm_s:
        floor = int8_warm_s * record["gemm_share"]
        out["int8_gemm_floor_s"] = floor
        if jax_warm_s:
            out["int8_floor_ratio_to_jax"] = jax_warm_s / floor
            out["int8_ratio_to_jax"] = jax_warm_s / int8_warm_s
    return out


def breakdown_table(section: dict) -> tuple[str, list[str], list[list[str]]]:
    """The section as a benchmark table (benchmarks.report): title, headers, rows."""
    headers = ["model", "group", "nodes", "ms", "share"]
    rows = []
    for precision, record in section["results"].items():
        if "groups" not in record:
            rows.append([precision, record.get("failed", "not measured").splitlines()[0], "", "", ""])
            continue
        for g in record["groups"]:
            if g["share"] >= 0.005 or g["group"] in GEMM_GROUPS:
                rows.append([precision, g["group"], str(g["nodes"]), f"{g['seconds'] * 1e3:.1f}", f"{g['share']:.1%}"])
        rows.append([precision, "all nodes (sum of kernel times)", "", f"{record['node_total_s'] * 1e3:.1f}",
                     f"GEMMs {record['gemm_share']:.1%}"])
    title = (f"Where a warm batch-{section['batch']} run goes, by kind of op: onnxruntime's profiler, median kernel "
             f"time of {section['runs']} profiled runs in a fresh process (benchmarks.run --breakdown)")
    return title, headers, rows


def summary_lines(section: dict) -> list[str]:
    """The derived figures as sentences for the benchmark's notes."""
    s, lines = section.get("summary", {}), []
    if "int8_gemm_speedup" in s:
        lines.append(f"int8 weight GEMMs ran {s['int8_gemm_speedup']:.2f}x as fast as the same layers' float32 GEMMs "
                     "(profiled kernel times, batch 15): the int8 kernels' speed-up on this CPU")
    if "int8_floor_ratio_to_jax" in s:
        lines.append(f"if every op but its GEMMs were free, int8's warm batch 15 would take about "
                     f"{s['int8_gemm_floor_s'] * 1e3:.0f} ms (its measured median times the GEMMs' share of its "
                     f"profile): at most {s['int8_floor_ratio_to_jax']:.2f}x JAX on this machine, against "
                     f"{s['int8_ratio_to_jax']:.2f}x measured")
    return lines


def section(models: dict[str, Path], cpus: list[int], runs: int = 5, warmup: int = 2, mel: Path | None = None,
            note=print) -> dict:
    """The benchmark's `breakdown` section: one fresh pinned process per model."""
    from benchmarks.workers import WorkerError, run_module

    results = {}
    for precision, model in models.items():
        note(f"profiling {model.name} ({runs} batch-{BATCH} runs)")
        argv = ["--model", str(model), "--cpus", ",".join(map(str, cpus)), "--runs", str(runs),
                "--warmup", str(warmup), *(["--mel", str(mel)] if mel else [])]
        try:
            results[precision] = run_module("benchmarks.breakdown", argv, cpus, "cpu", note)
        except WorkerError as exc:
            results[precision] = {"failed": str(exc)}
    return {"batch": BATCH, "runs": runs, "warmup": warmup, "cpus": cpus, "results": results,
            "summary": summary(results)}


def main(argv: list[str] | None = None) -> int:
    """The worker process that section() starts: one model profiled; prints one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.breakdown", description="one profiling process")
    parser.add_argument("--model", required=True)
    parser.add_argument("--cpus", required=True, type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mel")
    print(json.dumps(worker(parser.parse_args(argv))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
