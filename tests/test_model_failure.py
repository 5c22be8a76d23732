"""A model that gives NaN scores never answers a result: 500 model_failed (service), an error for the file (CLI,
corpus). The broken model is the tiny one with its output multiplied by NaN (tests/model_edits.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from model_edits import with_nan_scores

from runtime.analyze import Analyzer
from runtime.errors import ModelOutputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def nan_model(tiny_model, tmp_path_factory):
    return with_nan_scores(tiny_model, tmp_path_factory.mktemp("nan") / "nan.onnx")


def test_service_answers_500_model_failed_with_the_request_id_and_counts_it(nan_model, clip):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from runtime.serve.app import Settings, create_app

    analyzer = Analyzer.from_path(nan_model, device="cpu")
    analyzer.model.warmed = True  # served as a loaded model (its self-check would refuse it at load)
    with TestClient(create_app(analyzer, settings=Settings()), raise_server_exceptions=False) as client:
        res = client.post("/v1/analyze", content=clip.read_bytes(), headers={"content-type": "audio/flac",
                                                                              "x-request-id": "nan-request-1"})
        body = res.json()
        assert res.status_code == 500, body
        assert body["status"] == "error" and body["error_type"] == "model_failed" and "NaN" in body["error"], body
        assert body["request_id"] == "nan-request-1" == res.headers["x-request-id"]
        mel = client.post("/v1/analyze/mel", json={"mel_spectrogram": [[-20.0] * 128] * 200})
        assert mel.status_code == 500 and mel.json()["error_type"] == "model_failed", mel.json()
        metrics = client.get("/metrics").text
        assert "percepiano_model_failures_total 2.0" in metrics, metrics
        assert 'percepiano_requests_total{route="/v1/analyze",status="500"} 1.0' in metrics


def test_analyzer_raises_model_output_error(nan_model, clip):
    with pytest.raises(ModelOutputError, match="NaN or infinite scores"):
        Analyzer.from_path(nan_model, device="cpu").analyze_file(clip)


def test_cli_reports_an_error_for_the_file(nan_model, clip):
    run = subprocess.run([sys.executable, "-m", "runtime", "analyze", "--model", str(nan_model), "--device", "cpu",
                          "--skip-self-check", "--json", str(clip)], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert run.returncode == 1, run.stderr
    result = json.loads(run.stdout)["results"][0]
    assert result["scores"] is None and "NaN or infinite scores" in result["error"], result


def test_corpus_reports_a_final_error_for_the_file(nan_model, clip):
    from runtime.corpus.runner import analyze_one

    result = analyze_one(Analyzer.from_path(nan_model, device="cpu"), clip.name, clip)
    assert result["scores"] is None and "NaN or infinite scores" in result["error"], result
    assert "retry" not in result  # the same model would give NaN again: final, not retried
