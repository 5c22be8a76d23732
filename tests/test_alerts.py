"""deploy/alerts.yml: promtool checks the rules and runs their unit tests (deploy/alerts_test.yml); every metric
the rules name is one a real app's /metrics exports; the cost and readiness metrics the alerts read hold the
values they should (the price table's rate times the seconds, the budget setting, the self-check).

promtool is Debian's `prometheus` package (scripts/ci_promtool.sh installs it under CI); a missing promtool
fails under CI=true and skips elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from runtime.errors import ConfigError  # noqa: E402
from runtime.serve.app import Settings, create_app  # noqa: E402

pytestmark = pytest.mark.slow  # promtool (scripts/ci_promtool.sh) and real apps

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "alerts.yml"
RULE_TESTS = REPO / "deploy" / "alerts_test.yml"
PRICES = REPO / "runtime" / "serve" / "prices.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "info": ("_info",)}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is missing: bash scripts/ci_promtool.sh (apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_checks_the_rules():
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout + out.stderr


def test_promtool_unit_tests_pass():
    out = subprocess.run([promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_every_alert_has_a_firing_and_a_quiet_case():
    cases = [c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in t.get("alert_rule_test", [])]
    names = {r["alert"] for r in alert_rules()}
    assert names == {"PercepianoErrorRateHigh", "PercepianoLatencyP99High", "PercepianoBusyRejectionsSustained",
                     "PercepianoModelNotReady", "PercepianoSelfCheckFailed", "PercepianoRequestsUnanswered",
                     "PercepianoDailySpendOverBudget"}
    fires = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert fires == names
    assert quiet >= names - {"PercepianoSelfCheckFailed"}  # its quiet case is the passed instance beside the failed
    selfcheck = next(t for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] if "self-check" in t["name"])
    assert any('instance="good"' in s["series"] for s in selfcheck["input_series"])


def exported(text: str) -> set[str]:
    """Every sample name the exposition text can carry, labelled families without samples yet included."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + s for s in SUFFIXES.get(family.type, ("",))}
        names |= {s.name for s in family.samples}
    return names


@pytest.fixture
def app_metrics(tiny_model, piano_clips, monkeypatch):
    """A real app over the tiny model, with a budget, after one analysis: (its /metrics text, the response)."""
    monkeypatch.setenv("PERCEPIANO_DAILY_BUDGET_USD", "25")
    app = create_app(str(tiny_model), settings=Settings.from_env())
    clip = min(piano_clips, key=lambda p: p.stat().st_size)
    with TestClient(app) as c:
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        res = c.post("/v1/analyze", content=clip.read_bytes(), headers={"content-type": "audio/flac"})
        assert res.status_code == 200, res.text
        yield c.get("/metrics").text, res.json()


def test_every_metric_the_rules_name_is_exported(app_metrics):
    text, _ = app_metrics
    used = set()
    for rule in alert_rules():
        used |= set(re.findall(r"\bpercepiano_[a-z0-9_]+", rule["expr"]))
    assert len(used) >= 8
    assert used - exported(text) == set()
    # the label values the rules select on are the ones the service writes
    assert 'percepiano_requests_total{route="/v1/analyze",status="200"}' in text


def sample(text: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"{name} {labels} not in /metrics")


def test_the_cost_metrics_price_the_container_seconds_from_the_table(app_metrics):
    import json

    text, body = app_metrics
    table = json.loads(PRICES.read_text())
    cpu = table["containers"]["modal-cpu"]  # the tiny model runs on the CPU: the CPU container's rate
    rate = cpu["cpu_cores"] * table["rates"]["cpu_core_per_s"] + cpu["memory_gib"] * table["rates"]["memory_gib_per_s"]
    assert sample(text, "percepiano_price_usd_per_second", container="modal-cpu",
                  read_on=table["read_on"]) == pytest.approx(rate)
    seconds = sample(text, "percepiano_compute_seconds_total")
    assert 0 < seconds < 120
    # scraped a moment after the seconds: the cost is the seconds times the rate, within that moment
    assert sample(text, "percepiano_compute_cost_usd_total") == pytest.approx(seconds * rate, rel=0.05)
    assert sample(text, "percepiano_request_cost_usd_count") == 1
    assert sample(text, "percepiano_request_cost_usd_sum") == pytest.approx(body["processing_seconds"] * rate,
                                                                           rel=1e-3)
    assert sample(text, "percepiano_cost_budget_usd_per_day") == 25
    assert sample(text, "percepiano_model_ready") == 1 and sample(text, "percepiano_self_check_failed") == 0
    assert sample(text, "percepiano_analysis_requests_received_total") == 1


def test_a_named_container_is_priced_before_the_model_loads():
    import threading

    release = threading.Event()

    def loading():  # a model load that has not finished while the test looks (then fails, to end quickly)
        release.wait(60)
        raise RuntimeError("stand-in loader")

    app = create_app(loading, settings=Settings(price_container="modal-a10g", queue_timeout=0.2))
    with TestClient(app) as c:
        text = c.get("/metrics").text
        assert sample(text, "percepiano_model_ready") == 0
        assert sample(text, "percepiano_price_usd_per_second", container="modal-a10g") == pytest.approx(
            0.000306 + 2 * 0.0000131 + 4 * 0.00000222)  # prices.json's A10G, 2 cores, 4 GiB, written out
        res = c.post("/v1/analyze", content=b"x", headers={"content-type": "audio/flac"})
        assert res.status_code == 503 and res.json()["error_type"] == "not_ready"
        text = c.get("/metrics").text
        assert sample(text, "percepiano_rejections_total", reason="not_ready") == 1
        assert sample(text, "percepiano_analysis_requests_received_total") == 1
        release.set()


@pytest.mark.parametrize(("env", "message"), [
    ({"PERCEPIANO_PRICE_CONTAINER": "modal-h100"}, "PERCEPIANO_PRICE_CONTAINER='modal-h100' is not in the price"),
    ({"PERCEPIANO_DAILY_BUDGET_USD": "-5"}, "PERCEPIANO_DAILY_BUDGET_USD must be a positive"),
    ({"PERCEPIANO_DAILY_BUDGET_USD": "lots"}, "PERCEPIANO_DAILY_BUDGET_USD='lots' is not a valid float"),
])
def test_bad_cost_settings_are_refused(env, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.from_env(env)


def test_a_failed_self_check_served_anyway_is_exported(tiny_model, tmp_path):
    from model_edits import with_self_check

    from runtime.analyze import Analyzer

    shape = Analyzer.from_path(tiny_model, device="cpu").model.input_shape
    mel = np.random.default_rng(0).standard_normal((2, *shape[-2:])).astype(np.float32)
    bad = with_self_check(tiny_model, tmp_path / "bad.onnx", mel, np.zeros((2, 19), np.float32))
    app = create_app(str(bad), settings=Settings(allow_failed_self_check=True))
    with TestClient(app) as c:
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        text = c.get("/metrics").text
    assert sample(text, "percepiano_self_check_failed") == 1 and sample(text, "percepiano_model_ready") == 1


def test_the_price_table_is_the_runtime_s_and_the_benchmarks_read_it():
    import tomllib

    from benchmarks import cost

    assert cost.PRICES == PRICES and not (REPO / "benchmarks" / "prices.json").exists()
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["runtime"]
    assert "serve/prices.json" in data  # installed with the runtime, not only in a checkout
