"""benchmarks.cpu_cost: the CPU a GPU container spends per request, and the Modal reservation made from it."""

from __future__ import annotations

import json
import math

import pytest
from modal_recording import options

from benchmarks import cpu_cost


def test_reservation_arithmetic():
    # 8 req/s x 0.2 CPU s x 1.5 headroom = 2.4 cores busy, + 1 base = 3.4 -> 3.5 (half cores, up)
    plan = cpu_cost.reservation(200.0, 8.0)
    assert plan.cores == 3.5 and plan.threads == 2
    assert plan.memory_mb == 3072 + 4 * 160
    assert cpu_cost.reservation(0.0, 8.0).cores == 1.0  # the base alone
    assert cpu_cost.reservation(500.0, 1.0).cores == math.ceil((1 + 0.75) * 2) / 2


def test_quick_run_measures_every_format_and_what_the_waveform_model_saves(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert cpu_cost.main(["--seconds", "4", "--repeats", "1", "--target-rps", "2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["format"]: r for r in doc["rows"]}
    assert set(rows) == {"flac", "mp3", "m4a"}
    for r in rows.values():
        assert r["seconds"] == pytest.approx(4.0, abs=0.1)  # decoded and resampled to 22,050 Hz: the 4 s made
        assert r["decode_resample_cpu_ms"] > 0 and r["features_cpu_ms"] > 0
        assert r["audio_model_cpu_ms"] < r["mel_model_cpu_ms"]  # the features are what the waveform-in model removes
        assert r["mel_model_cpu_ms"] == pytest.approx(r["decode_resample_cpu_ms"] + r["features_cpu_ms"])
    plans = doc["reservations"]
    assert plans["mel"]["cpu_ms_per_request"] == pytest.approx(max(r["mel_model_cpu_ms"] for r in rows.values()),
                                                               abs=0.05)
    assert "waveform-in model removes" in capsys.readouterr().out


def test_the_gpu_class_reserves_what_the_figures_ask_and_sets_the_threads(recorded):
    m, calls = recorded
    plan = cpu_cost.reservation(m.GPU_CPU_MS_PER_REQUEST, m.GPU_TARGET_RPS)
    assert (m.GPU_CPU_CORES, m.GPU_MEMORY_MB, m.GPU_THREADS) == (plan.cores, plan.memory_mb, plan.threads)
    for name in ("Service", "CorpusWorker"):
        opts = options(calls, "cls", name)
        assert opts["gpu"] == "A10G" and opts["cpu"] == plan.cores and opts["memory"] == plan.memory_mb
        assert opts["cpu"] > 0.125 and opts["memory"] > 128  # Modal's defaults, which would starve the GPU
    assert m.SERVICE_ENV["PERCEPIANO_THREADS"] == str(plan.threads)
