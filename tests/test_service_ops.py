"""What callers and operators see: the original's response format, /metrics, request IDs and the request log."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from serving import TOKEN, wait_ready  # noqa: E402

from runtime.constants import API_KEYS  # noqa: E402
from runtime.serve.app import Settings, create_app  # noqa: E402
from runtime.serve.mel_input import encode_blob  # noqa: E402
from runtime.serve.original_contract import OriginalError, OriginalSuccess  # noqa: E402

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def authed(analyzer):
    """An app with a token: the original format, metrics and request IDs behind the same auth."""
    with TestClient(create_app(analyzer, settings=Settings(max_bytes=2_000_000, api_token=TOKEN))) as c:
        wait_ready(c)
        yield c


def metrics(client, headers=AUTH) -> dict[tuple[str, tuple], float]:
    res = client.get("/metrics", headers=headers)
    assert res.status_code == 200, res.text
    assert res.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(res.text) for s in family.samples}


def sample(values: dict, name: str, **labels) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def assert_timestamp(ts: str) -> None:
    assert ts.endswith("Z")
    when = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    assert when.tzinfo is not None and abs((datetime.now(UTC) - when).total_seconds()) < 60


# ------------------------------------------------------------------------------------ the original format


def test_original_format_on_audio_matches_the_default_answer(authed, clip):
    data = clip.read_bytes()
    plain = authed.post("/v1/analyze", content=data, headers={**AUTH, "content-type": "audio/flac"}).json()
    res = authed.post("/v1/analyze?format=original", content=data, headers={**AUTH, "content-type": "audio/flac"})
    assert res.status_code == 200, res.text
    body = OriginalSuccess.model_validate(res.json()).model_dump()
    assert list(res.json()) == ["status", "results", "metadata"]
    assert list(body["results"]) == list(API_KEYS)
    np.testing.assert_allclose([body["results"][k] for k in API_KEYS], [plain["scores"][k] for k in API_KEYS])
    meta = body["metadata"]
    assert meta["input_shape"] == [len(plain["timeline"]), 128, 128]
    assert meta["model_version"] == plain["model"]["version"]
    assert meta["processing_time_seconds"] > 0
    assert_timestamp(meta["timestamp"])


@pytest.mark.parametrize("kind", ["json", "blob"])
def test_original_format_on_mel(authed, kind):
    mel = np.random.default_rng(0).uniform(-80, 0, (300, 128)).astype(np.float32)
    if kind == "json":
        res = authed.post("/v1/analyze/mel?format=original", json={"mel_spectrogram": mel.tolist()}, headers=AUTH)
    else:
        res = authed.post("/v1/analyze/mel?format=original", content=encode_blob(mel),
                          headers={**AUTH, "content-type": "application/octet-stream"})
    assert res.status_code == 200, res.text
    body = OriginalSuccess.model_validate(res.json())
    assert body.metadata.input_shape == [3, 128, 128]  # 300 frames: windows at 0, 86 and 172


@pytest.mark.parametrize(("path", "kwargs", "status", "error_type"), [
    ("/v1/analyze", {"content": b"not audio", "headers": {"content-type": "audio/wav"}}, 415, "unsupported_audio"),
    ("/v1/analyze", {"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ("/v1/analyze", {"content": b"\0" * 2_100_000, "headers": {"content-type": "audio/wav"}}, 413, "too_large"),
    ("/v1/analyze/mel", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
     "bad_request"),
    ("/v1/analyze/mel", {"json": {"mel_spectrogram": [[0.0] * 5]}}, 422, "invalid_input"),
])
def test_original_format_errors(authed, path, kwargs, status, error_type):
    headers = {**AUTH, **kwargs.pop("headers", {}), "X-Request-ID": "req-42"}
    res = authed.post(f"{path}?format=original", headers=headers, **kwargs)
    assert res.status_code == status, res.text
    body = OriginalError.model_validate(res.json())
    assert body.error_type == error_type and body.error
    assert body.metadata.request_id == "req-42"
    assert_timestamp(body.metadata.timestamp)


def test_original_format_unauthorized(authed, clip):
    res = authed.post("/v1/analyze?format=original", content=clip.read_bytes(), headers={"content-type": "audio/flac"})
    assert res.status_code == 401
    assert OriginalError.model_validate(res.json()).error_type == "unauthorized"


def test_openapi_describes_both_formats(authed):
    spec = authed.get("/openapi.json").json()
    for path in ("/v1/analyze", "/v1/analyze/mel"):
        op = spec["paths"][path]["post"]
        assert any(p["name"] == "format" for p in op["parameters"])
        ok = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert "OriginalSuccess" in json.dumps(ok) and "AnalyzeResponse" in json.dumps(ok)
    assert "OriginalError" in json.dumps(spec["components"]["schemas"])


# ----------------------------------------------------------------------------------------------- metrics


def test_metrics_move_after_requests(authed, clip):
    before = metrics(authed)
    res = authed.post("/v1/analyze", content=clip.read_bytes(), headers={**AUTH, "content-type": "audio/flac"})
    assert res.status_code == 200
    authed.post("/v1/analyze", content=b"x", headers={**AUTH, "content-type": "text/plain"})
    after = metrics(authed)
    ok = ("percepiano_requests_total", {"route": "/v1/analyze", "status": "200"})
    bad = ("percepiano_requests_total", {"route": "/v1/analyze", "status": "415"})
    assert sample(after, ok[0], **ok[1]) == sample(before, ok[0], **ok[1]) + 1
    assert sample(after, bad[0], **bad[1]) == sample(before, bad[0], **bad[1]) + 1
    for stage in ("queue_wait", "decode", "features", "inference"):
        key = ("percepiano_stage_seconds_count", {"stage": stage})
        assert sample(after, key[0], **key[1]) == sample(before, key[0], **key[1]) + 1, stage
    added = sample(after, "percepiano_audio_seconds_total") - sample(before, "percepiano_audio_seconds_total")
    assert added == pytest.approx(res.json()["duration_seconds"], rel=1e-6)
    assert sample(after, "percepiano_requests_in_flight") == 0
    assert sample(after, "percepiano_model_warmup_seconds") > 0
    info = [labels for (name, labels) in after if name == "percepiano_model_info"]
    assert info and dict(info[0])["precision"] == "fp32" and dict(info[0])["device"] == "cpu"


def test_metrics_need_the_token_unless_configured_open(authed, analyzer):
    assert authed.get("/metrics").status_code == 401
    settings = Settings(api_token=TOKEN, metrics_auth=False)
    with TestClient(create_app(analyzer, settings=settings)) as open_client:
        wait_ready(open_client)
        assert open_client.get("/metrics").status_code == 200


# ------------------------------------------------------------------------------- request IDs and the log


def test_request_ids_are_echoed_or_made(authed):
    res = authed.get("/v1/model", headers={**AUTH, "X-Request-ID": "abc-123"})
    assert res.headers["x-request-id"] == "abc-123"
    made = authed.get("/v1/model", headers=AUTH).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    odd = authed.get("/v1/model", headers={**AUTH, "X-Request-ID": "has spaces and \"quotes\""})
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["x-request-id"])
    err = authed.post("/v1/analyze", content=b"x", headers={**AUTH, "content-type": "text/plain",
                                                              "X-Request-ID": "e-1"})
    assert err.json()["request_id"] == "e-1" and err.headers["x-request-id"] == "e-1"


def test_one_json_log_line_per_request_without_secrets(authed, clip, caplog):
    data = clip.read_bytes()
    with caplog.at_level(logging.INFO, logger="percepiano.requests"):
        authed.post("/v1/analyze", content=data, headers={**AUTH, "content-type": "audio/flac", "X-Request-ID": "l-1"})
        authed.post("/v1/analyze", content=b"junk", headers={**AUTH, "content-type": "audio/wav",
                                                                "X-Request-ID": "l-2"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "percepiano.requests"]
    assert [line["request_id"] for line in lines] == ["l-1", "l-2"]
    good, bad = lines
    assert good["route"] == "/v1/analyze" and good["status"] == 200 and good["bytes_in"] == len(data)
    assert good["audio_seconds"] > 0 and set(good["timings"]) == {"queue_wait", "decode", "features", "inference"}
    assert good["error_type"] is None
    assert bad["status"] == 415 and bad["error_type"] == "unsupported_audio"
    text = caplog.text
    assert TOKEN not in text and "junk" not in text
