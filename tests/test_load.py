"""The open-loop load test (benchmarks.load): a quick run against a real local server (tiny model, a few seconds,
the shipped clips only), its Poisson schedule, the knee rule, the Modal settings derived from it, and the
numbers deploy/ takes from docs/load-test.md."""

from __future__ import annotations

import json
import random
import re
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from serving import REPO, Server  # noqa: E402

from benchmarks import load  # noqa: E402
from benchmarks.load_inputs import RateResult, arrivals, knee, modal_settings  # noqa: E402
from runtime.serve.prices import load_prices


@pytest.mark.slow  # a real server under load
def test_quick_run_against_a_real_server(tiny_model, tmp_path):
    server = Server(tiny_model, {"PERCEPIANO_MAX_CONCURRENCY": "2"})
    try:
        server.wait_ready()
        out = tmp_path / "load.json"
        assert load.main(["--url", server.url, "--sweep", "1,3", "--duration", "3", "--recordings", "4",
                          "--min-seconds", "5", "--max-seconds", "10", "--server-pid", str(server.proc.pid),
                          "--json", str(out)]) == 0
    finally:
        server.stop()
    doc = json.loads(out.read_text())
    assert [r["name"][-4:] for r in doc["recordings"]] == [".wav", "flac", ".ogg", ".mp3"]  # mixed formats
    assert all(5 <= r["seconds"] <= 10 for r in doc["recordings"])
    for r in doc["results"]:
        assert r["sent"] > 0 and r["ok"] + r["busy"] + r["errors"] == r["sent"], r
        assert r["errors"] == 0, r["error_kinds"]
        assert r["p50"] <= r["p95"] <= r["p99"], r
        assert r["peak_rss_mb"] > 50, r  # the server's memory, from /proc
        assert r["calls"] > 0 and r["windows_per_call"] >= 1 and r["requests_per_call"] == 1, r  # CPU: no merging
    assert doc["idle"]["p50"] > 0
    assert "knee" in doc  # a rate, or None when even 1/s was past it on this shared machine


def test_arrivals_are_poisson_and_bounded():
    rate, duration = 4.0, 2000.0
    times = arrivals(rate, duration, random.Random(1))
    assert times == sorted(times) and 0 < times[0] and times[-1] < duration
    expected = rate * duration  # a Poisson count: mean = variance = 8,000, so 4 sigma is about 360
    assert abs(len(times) - expected) < 4 * expected ** 0.5
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    share_short = sum(g < 1 / rate for g in gaps) / len(gaps)
    assert abs(share_short - (1 - 2.718281828 ** -1)) < 0.02  # exponential gaps: P(gap < mean) = 1 - 1/e
    assert len(arrivals(1e9, 1e9, random.Random(0))) == 20_000  # bounded whatever is asked


def result(rate: float, p99: float, busy: int = 0, errors: int = 0) -> RateResult:
    return RateResult(rate=rate, duration=10, sent=10, ok=10 - busy - errors, busy=busy, errors=errors,
                      throughput=rate, p50=p99 / 2, p95=p99, p99=p99, mean=p99 / 2, peak_rss_mb=None, calls=1,
                      windows_per_call=1, requests_per_call=1, error_kinds={})


def test_the_knee_is_the_highest_rate_under_twice_the_idle_p50_without_refusals():
    runs = [result(0.1, 1.0), result(0.2, 1.9), result(0.3, 2.1), result(0.25, 1.5, busy=1), result(0.4, 5.0)]
    assert knee(runs, idle_p50=1.0).rate == 0.2  # 0.25 refused one (busy), 0.3 is over 2 x 1.0 s
    assert knee([result(0.1, 3.0)], idle_p50=1.0) is None


def test_modal_settings_follow_littles_law_per_core():
    prices = {"rates": {"cpu_core_per_s": 0.00001, "memory_gib_per_s": 0.000002}}
    got = modal_settings(knee_rate=0.5, knee_mean=3.0, idle_p50=2.5, cores=2, analyses_at_once=2,
                         container_cores=4, container_memory_gib=4, prices=prices)
    # 0.25/s per core -> 1/s on 4 cores; in flight at the knee: 1/s x 3 s = 3; at the latency bound: 1 x 5 s = 5
    assert got["knee_per_core"] == 0.25 and got["container_rate"] == 1.0
    assert got["target_inputs"] == 3 and got["max_inputs"] == 5 and got["analyses_at_once"] == 4
    assert got["usd_per_request"] == pytest.approx((4 * 0.00001 + 4 * 0.000002) / 1.0)


def test_only_loopback_servers_are_loaded():
    with pytest.raises(SystemExit):
        load.parse_args(["--url", "http://example.com:8000", "--rate", "1"])


def test_deploy_takes_the_numbers_docs_state(monkeypatch):
    """docs/load-test.md states the knee (a JSON block) and the settings; modal_settings derives the same settings
    from that knee, and deploy/modal_app.py's CPU target uses them, for the cores they were derived for."""
    pytest.importorskip("modal")
    doc = (REPO / "docs" / "load-test.md").read_text()
    measured = json.loads(re.search(r"```json\n(.*?)\n```", doc, re.S).group(1))
    derived = modal_settings(**measured, prices=load_prices())
    monkeypatch.setenv("PERCEPIANO_MODAL_TARGET", "cpu")
    from modal_recording import fresh_import

    m = fresh_import()
    monkeypatch.delitem(sys.modules, "deploy.modal_app")  # the next importer gets the default (GPU) target
    for name in ("max_inputs", "target_inputs", "analyses_at_once"):
        stated = re.search(rf"`{name}` = (\d+)", doc)
        assert stated, f"docs/load-test.md states no `{name}` = N"
        assert int(stated.group(1)) == derived[name] == m.CPU_LOAD[name], name
    assert m.CPU_CORES == measured["container_cores"]  # CPU_CORES changed: re-derive the settings
    assert m.WEB_CONCURRENCY == {k: derived[k] for k in ("max_inputs", "target_inputs")}
    assert m.SERVICE_ENV["PERCEPIANO_MAX_CONCURRENCY"] == str(derived["analyses_at_once"])
