"""Smoke test of `python -m benchmarks.run --quick`: the outputs exist and their figures are sane and consistent.

No test asserts a speed: benchmarks measure, tests check that what they write is correct.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.roofline import flops_per_chunk
from convert.config import PRESETS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, tiny_checkpoint, tiny_model):
    """One quick benchmark of the tiny preset, on the session's tiny checkpoint and its export, the opt-in
    studies included."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out),
           "--checkpoint", str(tiny_checkpoint), "--model", str(tiny_model), "--session-table", "--breakdown"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.fixture(scope="module")
def results(quick_run) -> dict:
    return json.loads((quick_run[0] / "results.json").read_text())


def get(record: dict, dotted: str) -> float:
    """record['warm']['15']['p50_s'] for 'warm.15.p50_s'."""
    value = record
    for part in dotted.split("."):
        value = value[part]
    return value


def test_writes_every_output(quick_run):
    out, proc = quick_run
    for name in ("latency.png", "cold_start.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    summary = (out / "summary.md").read_text()
    for heading in ("Cold start", "Warm latency", "Parity against JAX"):
        assert heading in summary and heading in proc.stdout
    for variant in ("jax", "jax-cached", "ort-fp32", "ort-int8", "ort-fp16"):
        assert f"| {variant}" in summary


def test_describes_machine_input_and_threads(results):
    assert results["input"]["chunks"] == 15 and results["input"]["seconds"] == 30
    assert results["threads"]["count"] == len(results["threads"]["cpus"]) >= 1
    import onnxruntime as ort

    from benchmarks.environment import cpu_model

    assert results["machine"]["cpu"] == cpu_model() and results["versions"]["onnxruntime"] == ort.__version__
    assert results["checkpoint"]["config"]["embed_dim"] == PRESETS["tiny"].embed_dim
    assert results["gemm"]["gflops"] > 0
    assert results["flops_per_chunk"]["total"] == flops_per_chunk(PRESETS["tiny"])["total"]


def test_variants_measured_or_cleanly_unavailable(results):
    variants = results["variants"]
    for name in ("jax", "jax-cached", "ort-fp32"):
        assert variants[name]["available"] and "cold" in variants[name], name
    assert "cold_first_run" in variants["jax-cached"]
    for name, rec in variants.items():
        assert not rec.get("failed"), f"{name}: {rec.get('failed')}"
        if not rec["available"]:
            assert rec["reason"] and "cold" not in rec and "warm" not in rec
    if variants["ort-fp32"]["device"] == "cpu":
        assert not variants["ort-fp16"]["available"]
    assert variants["ort-fp32"]["heavy_modules_imported"] == []  # the runtime path loads no JAX or librosa


def test_cold_start_phases_are_consistent(results):
    for name, rec in results["variants"].items():
        for section in ("cold", "cold_first_run"):
            if section not in rec:
                continue
            cold = rec[section]
            assert cold["total_s"] > 0 and cold["peak_rss_bytes"] > 10e6, name
            assert all(v >= 0 for v in cold["phases"].values()), name
            assert sum(cold["phases"].values()) <= cold["total_s"] + 1e-6, name
            phases = cold["phases"]
            ready = phases["session"] if "session" in phases else phases["load"] + phases["compile"]
            assert cold["model_ready_s"] == pytest.approx(ready)


def test_warm_figures_are_sane(results):
    flops, gemm = results["flops_per_chunk"]["total"], results["gemm"]["gflops"]
    measured = [rec for rec in results["variants"].values() if "warm" in rec]
    assert len(measured) >= 2
    for rec in measured:
        assert sorted(map(int, rec["warm"])) == [1, 15, 32]
        for batch, w in rec["warm"].items():
            assert w["runs"] >= 20 and w["batch"] == int(batch) and w["output_finite"]
            assert w["cores_busy"] is None or w["cores_busy"] > 0
            assert 0 < w["min_s"] <= w["p50_s"] <= w["p90_s"] <= w["p99_s"] <= w["max_s"]
            assert w["chunks_per_s"] == pytest.approx(int(batch) / w["p50_s"], rel=1e-9)
            assert w["gflops"] == pytest.approx(flops * w["chunks_per_s"] / 1e9, rel=1e-9)
            if w["gemm_share"] is not None:
                assert w["gemm_share"] == pytest.approx(w["gflops"] / gemm, rel=1e-9)


def test_ratios_are_quotients_of_the_figures(results):
    variants, base = results["variants"], results["variants"][results["baseline"]]
    checked = 0
    for name, rec in variants.items():
        for key, ratio in rec.get("vs_jax", {}).items():
            base_key = "cold." + key.removeprefix("cold_first_run.") if key.startswith("cold_first_run.") else key
            assert ratio == pytest.approx(get(rec, key) / get(base, base_key), rel=1e-9), (name, key)
            checked += 1
    fp32 = variants["ort-fp32"]["vs_jax"]
    expected = {"cold.total_s", "cold.peak_rss_bytes", "warm.15.p50_s", "warm.32.chunks_per_s", "artifact.bytes"}
    assert expected <= fp32.keys()
    assert checked > 20


def test_parity_against_jax(results):
    fp32 = results["variants"]["ort-fp32"]["parity"]
    # the export gate's own fp32 tolerance, on the windows and over the whole path from audio
    assert fp32["model"]["max_abs"] <= fp32["model"]["atol"] == 1e-5 and fp32["model"]["rows"] == 15
    assert fp32["end_to_end"]["max_abs"] <= 1e-5 and fp32["end_to_end"]["passed"]
    assert results["variants"]["jax-cached"]["parity"]["end_to_end"]["max_abs"] < 1e-6
    int8 = results["variants"]["ort-int8"]
    assert int8["available"], int8.get("reason")  # the CPU variant is made and gated on every machine
    model = int8["parity"]["model"]
    assert model["passed"] and model["max_abs"] <= model["atol"] == 0.005, model["max_abs"]
    # a constant output would not pass: int8 must track JAX far closer than the scores vary
    assert model["max_abs"] < model["constant_output_max_abs"] / 4, model


def test_cost_table_is_priced_from_this_runs_timings(results, quick_run):
    rows = {(r["container"], r["requests_per_month"]): r for r in results["cost"]["rows"]}
    cpu = rows[("modal-cpu", 1000)]
    assert cpu["measured"] is True and cpu["cold_s"] == results["variants"]["ort-int8"]["cold"]["total_s"]
    assert rows[("modal-a10g", 1000)]["measured"] is False  # no GPU in this run: an estimate, and said so
    assert rows[("modal-cpu", 10000)]["usd_per_month"] > cpu["usd_per_month"] > 0
    out, proc = quick_run
    assert "ESTIMATE" in (out / "summary.md").read_text() and "costs on Modal" in proc.stdout


def test_session_table_covers_the_cpu_variants(results, quick_run):
    from benchmarks.session import CONFIGS

    section = results["session"]
    assert set(section["results"]) == {"fp32", "int8"} and section["runs"] == results["settings"]["cold_runs"]
    for precision, rows in section["results"].items():
        assert list(rows) == [c.name for c in CONFIGS], precision
        assert all(r["session_s"] > 0 and r["peak_rss_bytes"] > 0 for r in rows.values()), precision
    assert "Session creation and first run" in (quick_run[0] / "summary.md").read_text()


def test_the_studies_are_opt_in():
    from types import SimpleNamespace

    from benchmarks.run import build_parser, check_args, op_breakdown, session_configurations

    class Untouched:
        def __getattr__(self, name):
            raise AssertionError(f"a study that was not asked for ran ({name})")

    models = {p: SimpleNamespace(available=True, path=Path(f"m.{p}.onnx")) for p in ("fp32", "int8")}
    art = SimpleNamespace(models=models, mel=None)
    args = build_parser().parse_args(["--quick"])
    check_args(args)
    assert (args.session_table, args.breakdown) == (False, False)
    assert session_configurations(art, args, [0], Untouched()) is None
    assert op_breakdown(art, args, [0], Untouched()) is None
    args = build_parser().parse_args(["--quick", "--session-table", "--breakdown", "--session-runs", "2"])
    check_args(args)
    assert (args.session_table, args.breakdown, args.session_runs, args.profile_runs) == (True, True, 2, 5)


def test_median_cold_keeps_the_first_runs_warm_figures():
    from benchmarks.workers import median_cold

    runs = [{"total_s": t, "phases": {"import": t / 2}, "peak_rss_bytes": int(t * 1e6), "warm": {"1": i}}
            for i, t in enumerate((3.0, 1.0, 2.0, 5.0))]
    merged = median_cold(runs)
    assert merged["total_s"] == 2.0 and merged["phases"] == {"import": 1.0} and merged["peak_rss_bytes"] == 2_000_000
    assert merged["warm"] == {"1": 0} and merged["cold_totals_s"] == [3.0, 1.0, 2.0, 5.0]


def test_flops_per_chunk_of_the_production_model():
    flops = flops_per_chunk(PRESETS["production"])
    assert flops["total"] == sum(v for k, v in flops.items() if k != "total")
    # about 2 FLOPs per weight per patch (85.7M weights, 64 patches), plus attention's activation products
    assert 10.9e9 < flops["total"] < 11.2e9
    assert math.isclose(flops["attention_scores"], 12 * 2 * 64 * 64 * 768)


def test_imports_nothing_heavy():
    code = ("import sys, benchmarks.run, benchmarks.cold, benchmarks.workers, benchmarks.report, benchmarks.plots; "
            "print(sorted(m for m in ('jax', 'flax', 'onnxruntime', 'librosa', 'sklearn', 'matplotlib', 'onnx') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_thread_count_is_one_line_error(tmp_path, capsys):
    from benchmarks.run import main

    assert main(["--quick", "--threads", "4096", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --threads 4096") and "\n" not in err


def test_concurrency_table_measures_every_level_with_batching_off_and_on(results, quick_run):
    section = results["concurrency"]
    assert section["precision"] == "int8" and section["device"] == "cpu"
    assert [(r["concurrency"], r["batching"]) for r in section["levels"]] == [
        (n, mode) for n in (1, 2, 4) for mode in ("off", "on")]
    assert all(r["requests_per_s"] > 0 and r["chunks_per_s"] > 0 for r in section["levels"])
    # every request's chunks ran: chunks/s is requests/s times the chunks of one request
    for r in section["levels"]:
        assert abs(r["chunks_per_s"] - r["requests_per_s"] * section["chunks_per_request"]) <= 1e-6 * r["chunks_per_s"]
    assert "Throughput against concurrency" in (quick_run[0] / "summary.md").read_text()


def test_breakdown_profiles_every_node_of_both_cpu_models(results, quick_run, tmp_path):
    import onnx

    from runtime.model import graph_section, load_optimization, save_optimized
    from runtime.protowire import header_metadata

    section = results["breakdown"]
    assert set(section["results"]) == {"fp32", "int8"} and section["batch"] == 15
    for precision, record in section["results"].items():
        groups = {g["group"]: g for g in record["groups"]}
        # loaded as the runtime loads it: the level it picks for this file, the weights read in place
        level = load_optimization(graph_section(header_metadata(record["model"])), "cpu")
        assert record["optimization"] == level and record["weights"] == "file", precision
        # every node of the graph that ran (the file's, or what onnxruntime optimises it to) is in one group
        ran = record["model"] if level == "none" else save_optimized(record["model"], tmp_path / f"{precision}.onnx",
                                                                    level)
        assert sum(g["nodes"] for g in groups.values()) == len(onnx.load(ran).graph.node), precision
        assert abs(sum(g["seconds"] for g in groups.values()) - record["node_total_s"]) < 1e-9
        assert "attention GEMMs" in groups and "float weight GEMMs" in groups, precision
    assert "int8 weight GEMMs" not in {g["group"] for g in section["results"]["fp32"]["groups"]}
    assert {g["group"]: g["nodes"] for g in section["results"]["int8"]["groups"]}["int8 weight GEMMs"] > 0
    summary, variants = section["summary"], results["variants"]
    int8_p50, jax_p50 = variants["ort-int8"]["warm"]["15"]["p50_s"], variants["jax"]["warm"]["15"]["p50_s"]
    assert math.isclose(summary["int8_gemm_floor_s"], int8_p50 * section["results"]["int8"]["gemm_share"])
    assert math.isclose(summary["int8_floor_ratio_to_jax"], jax_p50 / summary["int8_gemm_floor_s"])
    assert summary["int8_floor_ratio_to_jax"] > summary["int8_ratio_to_jax"] > 0
    assert "Where a warm batch-15 run goes" in (quick_run[0] / "summary.md").read_text()
    assert any(note.startswith("if every op but its GEMMs were free") for note in results["notes"])


def test_breakdown_groups_nodes_by_what_they_multiply():
    from benchmarks.breakdown import grouped, node_medians

    def event(name, op, dur, params=0):
        return {"cat": "Node", "name": f"{name}_kernel_time", "dur": dur,
                "args": {"op_name": op, "parameter_size": str(params)}}

    trace = [{"cat": "Session", "name": "model_run", "dur": 1}]
    for slow in (1000, 1, 1):  # the first run (warm-up) is slow and must not count
        trace += [event("q_proj", "MatMul", 10 * slow, params=4096), event("scores", "FusedMatMul", 4 * slow),
                  event("fc1", "DynamicQuantizeMatMul", 6 * slow, params=1024), event("act", "Gelu", 2 * slow),
                  event("fence", "Gelu", 0)]  # a zero-length node still counts as a node
    nodes = node_medians(trace, skip=1)
    assert {n: v["runs"] for n, v in nodes.items()} == dict.fromkeys(("q_proj", "scores", "fc1", "act", "fence"), 2)
    out = grouped(nodes)
    assert [(g["group"], g["nodes"]) for g in out["groups"]] == [
        ("int8 weight GEMMs", 1), ("float weight GEMMs", 1), ("attention GEMMs", 1), ("Gelu", 2)]
    assert math.isclose(out["node_total_s"], 22e-6) and math.isclose(out["gemm_share"], 20 / 22)


def test_breakdown_summary_needs_both_profiles():
    from benchmarks.breakdown import summary

    int8 = {"groups": [{"group": "int8 weight GEMMs", "seconds": 0.2}, {"group": "float weight GEMMs", "seconds": 0.01},
                       {"group": "Gelu", "seconds": 0.05}], "gemm_share": 0.8}
    fp32 = {"groups": [{"group": "float weight GEMMs", "seconds": 0.81}]}
    both = summary({"fp32": fp32, "int8": int8}, jax_warm_s=0.9, int8_warm_s=0.3)
    assert math.isclose(both["int8_gemm_speedup"], 4.0) and math.isclose(both["int8_gemm_floor_s"], 0.24)
    assert math.isclose(both["int8_floor_ratio_to_jax"], 3.75) and math.isclose(both["int8_ratio_to_jax"], 3.0)
    assert summary({"int8": int8}) == {} and "int8_gemm_speedup" not in summary({"fp32": fp32, "int8": {"failed": "x"}})


def test_corpus_runs_sit_beside_the_floor_measured_in_them(results):
    for precision in ("int8", "fp32"):
        section = results["corpus"][precision]
        floor = section["floor"]
        assert section["files"] > 0 and section["files"] % 2 == 0 and section["failed"] == 0  # 2 copies of the clips
        assert floor["windows"] >= section["files"] and floor["model_ms_per_window"] > 0
        assert section["ratio"] == pytest.approx(section["audio_hours_per_hour"] / floor["audio_hours_per_hour"])
        # the floor: the windows at full-batch speed plus the decoding and features counted in the run
        seconds = floor["windows"] * floor["model_ms_per_window"] / 1e3 + floor["prepare_seconds"]
        assert floor["audio_hours_per_hour"] == pytest.approx(section["audio_seconds"] / seconds)
        # both default variants give a window its scores whatever shares its call (int8: static scales), so the
        # corpus fills its calls across files
        assert section["batch_independent"] is True and section["across_files"] is True
    assert any(n.startswith("corpus run, int8 (windows of several files per call)") and "of the floor" in n
               for n in results["notes"])
