"""The results as tables: on the terminal (rich), in summary.md, and in results.json beside the plots."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

Table = tuple[str, list[str], list[list[str]]]  # title, headers, rows
COLD_COLUMNS = {"startup": ("startup",), "import": ("import",), "load": ("load",),
                "compile / session": ("compile", "session"), "features": ("features",),
                "1st inference": ("first_inference",)}


def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.1f}" if value < 10 else f"{value * 1e3:.0f}"


def _x(rec: dict, key: str) -> str:
    """The ratio to JAX of one figure, as '0.42x'."""
    ratio = rec.get("vs_jax", {}).get(key)
    return "1x" if rec.get("_baseline") else ("-" if ratio is None else f"{ratio:.2f}x")


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.0f}" if n >= 1e7 else f"{n / 1e6:.2f}"


def _unavailable(rec: dict) -> str:
    return "FAILED" if rec.get("failed") else "n/a"


def _phase(phases: dict, names: tuple[str, ...]) -> str:
    present = [phases[n] for n in names if n in phases]
    return _s(sum(present)) if present else "-"


def cold_table(results: dict) -> Table:
    headers = ["variant", "device", "total s", "vs JAX", *COLD_COLUMNS, "peak RSS MB", "vs JAX"]
    rows = []
    for name, rec in _records(results):
        runs = [("cold_first_run", f"{name} (first run)")] if "cold_first_run" in rec else []
        for section, label in [*runs, ("cold", name)]:
            if section not in rec:
                rows.append([name, _unavailable(rec)] + [""] * (len(headers) - 2))
                continue
            cold = rec[section]
            phases = [_phase(cold["phases"], names) for names in COLD_COLUMNS.values()]
            rows.append([label, rec["device"], _s(cold["total_s"]), _x(rec, f"{section}.total_s"), *phases,
                         _mb(cold["peak_rss_bytes"]), _x(rec, f"{section}.peak_rss_bytes")])
    runs = results["settings"].get("cold_runs", 1)
    median = f"; the median of {runs} fresh processes per variant" if runs > 1 else "; one fresh process per variant"
    return f"Cold start: process start -> 19 scores of the 30 s clip (seconds){median}", headers, rows


def warm_table(results: dict) -> Table:
    headers = ["variant", "batch", "p50 ms", "p90 ms", "p99 ms", "chunks/s", "vs JAX", "GFLOP/s", "% of GEMM",
               "CPUs busy", "CPU wait"]
    threads, rows = results["threads"]["count"], []
    for name, rec in _records(results):
        if "warm" not in rec:
            why = "= jax" if "warm_note" in rec else (_unavailable(rec) if "cold" not in rec else "-")
            rows.append([name, why] + [""] * (len(headers) - 2))
            continue
        for batch, w in rec["warm"].items():
            share = "-" if w["gemm_share"] is None else f"{100 * w['gemm_share']:.0f}%"
            rows.append([name, batch, _ms(w["p50_s"]), _ms(w["p90_s"]), _ms(w["p99_s"]), _s(w["chunks_per_s"], 1),
                         _x(rec, f"warm.{batch}.chunks_per_s"), _s(w["gflops"], 1), share,
                         "-" if w["cores_busy"] is None else f"{w['cores_busy']:.1f} of {threads}",
                         "-" if w.get("cpu_wait") is None else f"{w['cpu_wait']:.2f}"])
    runs = results["settings"]["runs"]
    title = (f"Warm latency: {runs} timed runs per batch after warm-up; throughput = batch / p50; per second of "
             "timed runs, CPUs busy = CPU seconds the process got, CPU wait = seconds its threads waited for a CPU")
    return title, headers, rows


def parity_table(results: dict) -> Table:
    headers = ["variant", "same windows: max abs", "tolerance", "flips", "audio -> scores: max abs", "tolerance",
               "artifact MB", "vs JAX"]
    rows = []
    for name, rec in _records(results):
        size = [_mb(rec["artifact"].get("bytes")), _x(rec, "artifact.bytes")]
        parity = rec.get("parity", {})
        model, e2e = parity.get("model"), parity.get("end_to_end")
        cells = ["reference", "", "", "", ""] if rec.get("_baseline") else [
            f"{model['max_abs']:.1e} {'ok' if model['passed'] else 'FAIL'}" if model else "-",
            f"{model['atol']:.0e}" if model else "-",
            str(model["threshold_flips"]) if model else "-",
            f"{e2e['max_abs']:.1e} {'ok' if e2e['passed'] else 'FAIL'}" if e2e else "-",
            f"{e2e['atol']:.0e}" if e2e else "-"]
        rows.append([name, *cells, *size])
    return "Parity against JAX (score units) and artifact size", headers, rows


def _records(results: dict):
    for name, rec in results["variants"].items():
        yield name, rec | {"_baseline": name == results["baseline"]}


def header_lines(results: dict) -> list[str]:
    m, ck, flops, gemm = results["machine"], results["checkpoint"], results["flops_per_chunk"], results["gemm"]
    kind = f"demo checkpoint, {results['settings']['preset']} preset" if ck["demo"] else "checkpoint"
    return [
        f"machine: {m['cpu']}, {len(m['benchmark_cpus'])} of {m['logical_cpus']} CPUs used "
        f"({', '.join(m['cpu_flags']) or 'no AVX'}); GPUs: {', '.join(m['gpus']) or 'none'}",
        f"model: {kind} {Path(ck['path']).name} ({ck['params']:,} params, sha256 {ck['sha256'][:12]}); "
        f"{flops['total'] / 1e9:.3g} GFLOP per chunk (matmuls)",
        f"input: {results['input']['seconds']:.0f} s of real piano = {results['input']['chunks']} chunks; "
        f"float32 GEMM rate {gemm['gflops']:.1f} GFLOP/s ({gemm['size']}x{gemm['size']} numpy matmul: median of "
        f"{gemm['repeats']}, the higher of {len(gemm.get('sittings', [gemm]))} sittings: "
        + ", ".join(f"{s['gflops']:.0f}" for s in gemm.get("sittings", [gemm])) + ")",
        f"threads: {results['threads']['how']}",
        f"run took {results['wall_s']:.0f} s; versions: "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
    ]


def tables(results: dict) -> list[Table]:
    out = [cold_table(results), warm_table(results), parity_table(results)]
    if results.get("session", {}).get("results"):
        from benchmarks.session import session_table

        out.append(session_table(results["session"]))
    if results.get("breakdown", {}).get("results"):
        from benchmarks.breakdown import breakdown_table

        out.append(breakdown_table(results["breakdown"]))
    if results.get("concurrency", {}).get("levels"):
        from benchmarks.concurrency import concurrency_table

        out.append(concurrency_table(results["concurrency"]))
    return out


def markdown(results: dict) -> str:
    lines = ["# Benchmark: the runtime against native JAX", "", f"`{results.get('command', '')}`, "
             f"started {results['started_at']}", ""]
    lines += [f"- {line}" for line in header_lines(results)] + [""]
    for title, headers, rows in tables(results):
        lines += [f"## {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
        lines.append("")
    if "cost" in results:
        lines += ["## What a 30 s request costs on Modal", "", results["cost"]["markdown"], ""]
    lines += ["## Notes", ""] + [f"- {note}" for note in results["notes"]]
    lines += ["", "Plots: `latency.png` (warm latency per variant and batch), `cold_start.png` (cold-start phases).",
              ""]
    return "\n".join(lines)


def print_tables(results: dict) -> None:
    """The tables on stdout, with rich where installed."""
    try:
        from rich.console import Console
        from rich.table import Table as RichTable
    except ImportError:
        print(markdown(results))
        return
    console = Console(width=None if sys.stdout.isatty() else 160)
    for line in header_lines(results):
        console.print(line, highlight=False)
    for title, headers, rows in tables(results):
        table = RichTable(title=title, title_justify="left")
        for i, header in enumerate(headers):
            table.add_column(header, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if "cost" in results:
        console.print("What a 30 s request costs on Modal\n" + results["cost"]["markdown"], highlight=False)
    for note in results["notes"]:
        console.print(f"note: {note}", highlight=False)


def write_outputs(results: dict, out: Path, plots: bool = True) -> None:
    """results.json, summary.md, and the PNGs in out; the tables on stdout."""
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=False))
    (out / "summary.md").write_text(markdown(results))
    if plots:
        from benchmarks.plots import write_plots

        write_plots(results, out)
    print_tables(results)
    log.info("wrote %s and %s%s", out / "results.json", out / "summary.md", " and the plots" if plots else "")
