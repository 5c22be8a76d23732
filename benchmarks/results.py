"""The results document: each variant's figures, its parity against JAX, roofline shares and ratios to JAX."""

from __future__ import annotations

import math
import os
from datetime import datetime

import numpy as np

from benchmarks.artifacts import CLIP_SECONDS
from benchmarks.roofline import achieved, flops_per_chunk

SCHEMA_VERSION = 1
COLD_PHASES = ("startup", "import", "load", "compile", "session", "features", "first_inference")  # in order
PRECISION = {"jax-cached": "fp32", "ort-fp32": "fp32", "ort-int8": "int8", "ort-fp16": "fp16"}


def cold_record(raw: dict) -> dict:
    """Phase timings of one cold process, with the time to a ready model (load + compile, or session)."""
    phases = raw["phases"]
    ready = phases["session"] if "session" in phases else phases["load"] + phases["compile"]
    return {"total_s": raw["total_s"], "model_ready_s": ready, "phases": phases,
            "phases_sum_s": sum(phases.values()), "peak_rss_bytes": raw["peak_rss_bytes"],
            "features": raw.get("features"), "runs_total_s": raw.get("cold_totals_s", [raw["total_s"]])}


def warm_record(warm: dict, flops: int, gemm_gflops: float | None) -> dict:
    """Warm summaries with the GFLOP/s each throughput means and its share of the GEMM rate."""
    return {b: w | achieved(flops, w["chunks_per_s"], gemm_gflops) for b, w in warm.items()}


def artifact(name: str, art, raw: dict) -> dict:
    """What the variant loads from disk: the pickle for JAX, the ONNX file for ORT."""
    if name.startswith("jax"):
        out = {"path": str(art.checkpoint), "bytes": art.checkpoint.stat().st_size, "kind": "pickled checkpoint"}
        if "cache_bytes" in raw:
            out["cache_bytes"] = raw["cache_bytes"]
        return out
    model = art.models[PRECISION[name]]
    if not model.available:
        return {"path": None, "bytes": None, "kind": "ONNX model", "reason": model.reason}
    return {"path": str(model.path), "bytes": model.bytes, "kind": "ONNX model", "origin": model.origin}


def variant_record(name: str, description: str, raw: dict, art, flops: int, gemm_gflops: float) -> dict:
    rec = {"description": description, "available": "unavailable" not in raw}
    rec["artifact"] = artifact(name, art, raw)
    if not rec["available"]:
        return rec | {"reason": raw["unavailable"]}
    if "failed" in raw:
        return rec | {"failed": raw["failed"]}
    device = raw.get("device", "cpu")
    rec |= {"device": device, "cold": cold_record(raw)}
    for key in ("providers", "io_binding", "jax_backend", "heavy_modules_imported"):
        if key in raw:
            rec[key] = raw[key]
    if "populate" in raw:
        rec["cold_first_run"] = cold_record(raw["populate"])
    if "warm" in raw:
        rec["warm"] = warm_record(raw["warm"], flops, gemm_gflops if device == "cpu" else None)
    elif name == "jax-cached":
        rec["warm_note"] = "the same XLA executable as 'jax': warm figures are those of 'jax'"
    return rec


def add_parity(variants: dict, raw: dict, baseline: str) -> None:
    """Each variant against JAX in score units: on the same windows, and over the whole path from audio."""
    from convert.parity import DEFAULT_ATOL, Tolerance, compare

    ref = raw.get(baseline, {})
    for name, rec in variants.items():
        got = raw.get(name, {})
        if name == baseline or "cold" not in rec or "scores" not in ref:
            continue
        tol = Tolerance.for_precision(PRECISION[name])
        parity = {"end_to_end": compare(f"{name} vs {baseline}: audio -> 19 scores", ref["scores"], got["scores"],
                                        tol.end_to_end)}
        if "chunk_scores" in got and "chunk_scores" in ref:
            windows = np.asarray(ref["chunk_scores"], np.float64)
            parity["model"] = compare(f"{name} vs {baseline}: same {len(windows)} windows", windows,
                                      np.asarray(got["chunk_scores"]), DEFAULT_ATOL[PRECISION[name]])
            # what a model ignoring its input (always JAX's mean score) would get: the figure to beat by far
            parity["model"]["constant_output_max_abs"] = float(np.abs(windows - windows.mean(axis=0)).max())
        rec["parity"] = parity


def figures(rec: dict) -> dict[str, float]:
    """Every numeric figure of a variant as a flat {dotted.key: value}, for the ratios."""
    out: dict[str, float] = {}
    for section in ("cold", "cold_first_run"):
        if section in rec:
            cold = rec[section]
            for key in ("total_s", "model_ready_s", "peak_rss_bytes"):
                out[f"{section}.{key}"] = cold[key]
            out |= {f"{section}.phases.{p}": v for p, v in cold["phases"].items()}
    for batch, w in rec.get("warm", {}).items():
        out |= {f"warm.{batch}.{k}": w[k] for k in ("p50_s", "p90_s", "p99_s", "chunks_per_s", "gflops")}
    if rec.get("artifact", {}).get("bytes"):
        out["artifact.bytes"] = rec["artifact"]["bytes"]
    return out


def baseline_key(key: str) -> str:
    """The baseline figure a figure is compared with: a first (cache-filling) cold run with JAX's cold run."""
    return "cold." + key.removeprefix("cold_first_run.") if key.startswith("cold_first_run.") else key


def add_ratios(variants: dict, baseline: str) -> None:
    """vs_jax[key] = figure / the baseline's same figure (latency < 1 and throughput > 1 mean faster)."""
    base = figures(variants[baseline]) if "cold" in variants.get(baseline, {}) else {}
    for name, rec in variants.items():
        if name == baseline or not base:
            continue
        rec["vs_jax"] = {key: value / base[baseline_key(key)] for key, value in figures(rec).items()
                         if base.get(baseline_key(key))}


def warm_notes(name: str, rec: dict, threads: int) -> list[str]:
    """What a variant's warm figures need said: shares above 100 %, time lost to other processes."""
    warm, out = rec.get("warm", {}), []
    if any((w.get("gemm_share") or 0) > 1 for w in warm.values()):
        out.append(f"{name}: above 100 % of the float32 GEMM rate: " + (
            "GFLOP/s counts the model's FLOPs whatever the arithmetic, and int8 products run on faster integer units"
            if PRECISION.get(name) == "int8" else "the GEMM rate was measured lower than this variant reached, a sign "
            "that the machine was busy while the GEMM was timed"))
    waits = [w["cpu_wait"] for w in warm.values() if w.get("cpu_wait") is not None]
    if waits and max(waits) > 0.1 * threads:
        out.append(f"{name}: its threads waited for a CPU up to {max(waits):.2f} s per second of timed runs: other "
                   "processes (or its own surplus threads) competed for the CPUs; its percentiles are inflated")
    return out


def notes(art, variants: dict, machine: dict, cpus: list[int]) -> list[str]:
    """Caveats a reader of these figures must know."""
    out = []
    if art.demo:
        out.append("demo checkpoint (random weights, real architecture and format): speed, memory and size are "
                   "those of the real model; the scores themselves mean nothing")
    load = machine.get("loadavg_start", [0])[0]
    if load > 0.5 * len(cpus):
        out.append(f"the machine was not idle when the run started (1-min load average {load:.2f} on "
                   f"{len(cpus)} CPU(s)): other processes may have slowed every variant; see each variant's CPU wait")
    if any(v.get("device") not in (None, "cpu") for v in variants.values()):
        out.append("GEMM share is not computed for variants on a GPU: the GEMM rate measured is the CPU's")
    for name, rec in variants.items():
        if not rec["available"] or rec.get("failed"):
            why = rec.get("reason") or rec.get("failed", "").splitlines()[0]
            out.append(f"{name}: {'not available' if not rec['available'] else 'FAILED'}: {why}")
        if "warm_note" in rec:
            out.append(f"{name}: {rec['warm_note']}")
        out += warm_notes(name, rec, len(cpus))
        if rec.get("io_binding"):
            out.append(f"{name}: onnxruntime IO binding on {rec['device']}; each timed run includes the input copy "
                       "to the device and the output copy back, as JAX's runs do")
    out.append("both JAX variants run convert.model.ProductionASTForRegression, the project's Flax model: the "
               "original's nn.MultiHeadDotProductAttention written as MatMuls, numerically equal, same parameters")
    out.append("every cold start is a fresh process, with the files already in the OS page cache (as in a warm "
               "container); the JAX path computes features with librosa, as the original did, the ORT path with "
               "the runtime's numpy features")
    return out


def assemble(art, raw: dict, gemm_rate: dict, env: dict, settings: dict, descriptions: dict[str, str],
             baseline: str, started: datetime, wall_s: float) -> dict:
    """The whole results document (results.json)."""
    from convert.checkpoint import expected_param_shapes

    flops = flops_per_chunk(art.config)
    variants = {name: variant_record(name, desc, raw.get(name, {"unavailable": "not run"}), art, flops["total"],
                                     gemm_rate["gflops"]) for name, desc in descriptions.items()}
    add_parity(variants, raw, baseline)
    add_ratios(variants, baseline)
    env["machine"]["loadavg_end"] = list(os.getloadavg())
    return {
        "schema_version": SCHEMA_VERSION,
        "started_at": started.isoformat(timespec="seconds"),
        "wall_s": wall_s,
        "settings": settings,
        **env,
        "checkpoint": {"path": str(art.checkpoint), "sha256": art.sha256, "demo": art.demo,
                       "bytes": art.checkpoint.stat().st_size, "config": art.config.to_dict(),
                       "params": sum(math.prod(s) for s in expected_param_shapes(art.config).values())},
        "input": {"audio": str(art.audio), "sources": art.audio_sources, "seconds": CLIP_SECONDS,
                  "chunks": art.n_chunks,
                  "warm_input": "the runtime's features of the clip, computed once; identical for every variant",
                  "cold_input": "each cold process decodes the clip and computes its features itself"},
        "flops_per_chunk": flops,
        "gemm": gemm_rate,
        "baseline": baseline,
        "variants": variants,
        "notes": notes(art, variants, env["machine"], env["threads"]["cpus"]),
    }
