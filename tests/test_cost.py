"""The cost table's arithmetic from fixed inputs (benchmarks.cost)."""

from __future__ import annotations

import math

import pytest

from benchmarks.cost import MONTH_S, billed_seconds, cost_rows, load_prices, markdown, rate_per_s, timings_from_results

PRICES = {
    "read_on": "2026-01-01", "currency": "USD", "note": "test prices",
    "rates": {"gpu_per_s": {"X1": 0.001}, "cpu_core_per_s": 0.0001, "memory_gib_per_s": 0.00001},
    "containers": {"gpu": {"gpu": "X1", "cpu_cores": 2, "memory_gib": 10, "scaledown_window_s": 100},
                   "cpu": {"gpu": None, "cpu_cores": 4, "memory_gib": 0, "scaledown_window_s": 100}},
    "gpu_estimate": {"effective_tflops": 10.0, "cold_start_s": 7.0, "how": "assumed"},
    "original_estimates": {"per_request_usd": [0.15, 0.3], "per_month_usd": {"1000": 220}, "source": "test"},
}


def test_rate_adds_gpu_cpu_and_memory():
    assert rate_per_s(PRICES["containers"]["gpu"], PRICES["rates"]) == pytest.approx(0.001 + 2e-4 + 1e-4)
    assert rate_per_s(PRICES["containers"]["cpu"], PRICES["rates"]) == pytest.approx(4e-4)


def test_billed_seconds_at_a_gap_equal_to_the_window():
    n = MONTH_S // 100  # mean gap 100 s = the window
    b = billed_seconds(n, cold_s=10.0, warm_s=1.0, window_s=100.0)
    assert b["cold_share"] == pytest.approx(math.exp(-1))
    assert b["idle_s"] == pytest.approx(100 * (1 - math.exp(-1)))
    assert b["billed_s"] == pytest.approx(1.0 + 100 * (1 - math.exp(-1)) + 10.0 * math.exp(-1))


def test_billed_seconds_limits():
    rare = billed_seconds(1, cold_s=10.0, warm_s=1.0, window_s=100.0)  # every request cold, the whole window idle
    assert rare["cold_share"] == pytest.approx(1.0, abs=1e-3)
    assert rare["billed_s"] == pytest.approx(111.0, abs=0.5)
    busy = billed_seconds(10**9, cold_s=10.0, warm_s=1.0, window_s=100.0)  # never cold, idle = the tiny gap
    assert busy["cold_share"] == 0.0
    assert busy["idle_s"] == pytest.approx(MONTH_S / 10**9)


def test_cost_rows_per_request_and_month():
    rows = cost_rows({"gpu": {"cold_s": 10.0, "warm_s": 1.0, "measured": False, "how": "x"}}, PRICES,
                     volumes=(MONTH_S // 100,))
    (row,) = rows
    rate = 0.0013
    assert row["usd_per_request"] == pytest.approx(rate * (1.0 + 100 * (1 - math.exp(-1)) + 10 * math.exp(-1)))
    assert row["usd_per_month"] == pytest.approx(row["usd_per_request"] * (MONTH_S // 100))
    assert row["usd_warm_request"] == pytest.approx(rate * 1.0)
    assert row["usd_cold_request"] == pytest.approx(rate * 111.0)
    assert row["measured"] is False


def test_timings_from_results_marks_the_gpu_figure_as_an_estimate():
    results = {
        "variants": {"ort-int8": {"description": "the runtime: int8; cpu", "device": "cpu",
                                  "cold": {"total_s": 0.9, "phases": {"features": 0.1, "first_inference": 0.3}},
                                  "warm": {"15": {"p50_s": 0.25}}}},
        "flops_per_chunk": {"total": 10**10}, "input": {"chunks": 15},
    }
    t = timings_from_results(results, PRICES)
    assert t["modal-cpu"]["cold_s"] == 0.9
    assert t["modal-cpu"]["warm_s"] == pytest.approx(0.1 + 0.25)
    assert t["modal-cpu"]["measured"] is True
    gpu = t["modal-a10g"]
    assert gpu["measured"] is False and gpu["how"].startswith("ESTIMATE")
    assert gpu["cold_s"] == 7.0
    assert gpu["warm_s"] == pytest.approx(0.1 + 15 * 10**10 / 10e12)


def test_markdown_names_estimates_and_the_original():
    rows = cost_rows({"gpu": {"cold_s": 10.0, "warm_s": 1.0, "measured": False, "how": "ESTIMATE: assumed"}}, PRICES,
                     volumes=(1000,))
    text = markdown(rows, PRICES)
    assert "ESTIMATE" in text and "| 220 |" in text and "$0.15-0.30" in text


def test_shipped_price_table_matches_the_modal_app():
    pytest.importorskip("modal")
    from deploy import modal_app

    prices = load_prices()
    assert prices["containers"]["modal-a10g"]["gpu"] == modal_app.GPU
    assert prices["containers"]["modal-a10g"]["scaledown_window_s"] == modal_app.SCALEDOWN_WINDOW
    assert prices["read_on"] and prices["sources"]
