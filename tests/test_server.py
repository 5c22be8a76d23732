"""The HTTP service through its ASGI app: every endpoint, every error path, auth, readiness and admission control."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from serving import TOKEN, assert_error, assert_matches, wait_ready  # noqa: E402

from runtime.analyze import Analyzer  # noqa: E402
from runtime.constants import API_KEYS, FEATURES  # noqa: E402
from runtime.serve.app import Service, ServiceError, Settings, create_app  # noqa: E402
from runtime.serve.mel_input import encode_blob, max_frames_for  # noqa: E402

# ------------------------------------------------------------------------------------------ health, model


def test_health_ready_model_and_docs(client, analyzer):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["device"] == "cpu"
    assert ready["providers"] == list(analyzer.model.providers) == ["CPUExecutionProvider"]
    assert ready["self_check"] == analyzer.model.self_check.to_dict() and ready["demo"] is analyzer.model.info.demo
    assert ready["model"]["sha256"] == analyzer.model.info.sha256
    info = client.get("/v1/model").json()
    assert [d["key"] for d in info["dimensions"]] == list(API_KEYS)
    assert (info["providers"], info["self_check"], info["demo"]) == \
        (ready["providers"], ready["self_check"], ready["demo"])
    assert info["features"] == FEATURES.to_dict() and info["model_config"] == analyzer.model.info.model_config
    assert info["limits"]["max_bytes"] == 2_000_000 and info["limits"]["auth"] is False
    assert "api_token" not in info["limits"]
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/analyze"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["audio"]["format"] == "binary"
    assert "application/octet-stream" in spec["paths"]["/v1/analyze/mel"]["post"]["requestBody"]["content"]
    assert set(spec["components"]["schemas"]["Scores"]["properties"]) == set(API_KEYS)


# -------------------------------------------------------------------------------------------- audio path


def test_analyze_multipart_and_raw_body_match_in_process_result(client, analyzer, clip, expected):
    data = clip.read_bytes()
    res = client.post("/v1/analyze", files={"audio": (clip.name, data, "audio/flac")})
    assert res.status_code == 200, res.json()
    assert_matches(res.json(), expected, analyzer)
    for content_type in ("audio/flac", "application/octet-stream", "audio/x-anything; charset=binary"):
        raw = client.post("/v1/analyze", content=data, headers={"content-type": content_type})
        assert raw.status_code == 200, (content_type, raw.json())
        assert_matches(raw.json(), expected, analyzer)
    assert all(0.0 <= v <= 1.0 for v in res.json()["scores"].values())


def test_analyze_wav_upload_of_synthetic_audio(client, analyzer):
    import soundfile as sf

    rng = np.random.default_rng(1)
    t = np.arange(int(4.5 * FEATURES.sample_rate)) / FEATURES.sample_rate
    y = (0.3 * np.sin(2 * np.pi * 440 * t) * np.exp(-t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, y, FEATURES.sample_rate, format="WAV", subtype="FLOAT")
    res = client.post("/v1/analyze", content=buf.getvalue(), headers={"content-type": "audio/wav"})
    assert res.status_code == 200, res.json()
    assert_matches(res.json(), analyzer.analyze_audio(y, FEATURES.sample_rate).to_dict(), analyzer)
    assert len(res.json()["timeline"]) == 2  # 4.5 s: one full chunk and the padded remainder


@pytest.mark.parametrize("content_type, body, status, error_type", [
    ("text/plain", b"hello", 415, "unsupported_media_type"),
    (None, b"hello", 415, "unsupported_media_type"),
    ("audio/wav", b"RIFF not really a wav file" * 40, 415, "unsupported_audio"),
    ("audio/wav", bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), 415, "unsupported_audio"),
    ("audio/wav", b"", 422, "invalid_audio"),
])
def test_analyze_bad_audio(client, content_type, body, status, error_type):
    headers = {"content-type": content_type} if content_type else {}
    assert_error(client.post("/v1/analyze", content=body, headers=headers), status, error_type)


def test_analyze_truncated_and_nonfinite_audio(client, clip):
    import soundfile as sf

    data = clip.read_bytes()
    assert_error(client.post("/v1/analyze", content=data[: len(data) // 3], headers={"content-type": "audio/flac"}),
                 415, "unsupported_audio")
    buf = io.BytesIO()
    sf.write(buf, np.array([0.1, np.nan, 0.2] * 2000, np.float32), 22050, format="WAV", subtype="FLOAT")
    assert_error(client.post("/v1/analyze", content=buf.getvalue(), headers={"content-type": "audio/wav"}),
                 422, "invalid_audio")


def test_analyze_multipart_without_audio_field(client, clip):
    res = client.post("/v1/analyze", files={"file": (clip.name, clip.read_bytes(), "audio/flac")})
    assert_error(res, 422, "missing_field")
    res = client.post("/v1/analyze", data={"audio": "not a file"}, files={"x": ("x", b"1")})
    assert_error(res, 422, "missing_field")


def test_size_and_duration_limits(analyzer, clip):
    data = clip.read_bytes()
    app = create_app(analyzer, settings=Settings(max_bytes=len(data) - 1, refuse_over_seconds=5.0))
    with TestClient(app) as c:
        wait_ready(c)
        assert_error(c.post("/v1/analyze", content=data, headers={"content-type": "audio/flac"}), 413, "too_large")
        assert_error(c.post("/v1/analyze", files={"audio": ("a.flac", data, "audio/flac")}), 413, "too_large")
        big = encode_blob(np.zeros((len(data) // 512 + 1, 128), np.float32))  # > max_bytes, < refuse_over_seconds
        assert len(big) > len(data)
        assert_error(c.post("/v1/analyze/mel", content=big, headers={"content-type": "application/octet-stream"}),
                     413, "too_large")
    app = create_app(analyzer, settings=Settings(max_bytes=len(data) * 4, refuse_over_seconds=5.0))
    with TestClient(app) as c:
        wait_ready(c)
        body = assert_error(c.post("/v1/analyze", content=data, headers={"content-type": "audio/flac"}),
                            413, "audio_too_long")
        assert "5 s" in body["error"]
        long_mel = encode_blob(np.zeros((max_frames_for(5.0) + 1, 128), np.float32))
        assert_error(c.post("/v1/analyze/mel", content=long_mel, headers={"content-type": "application/octet-stream"}),
                     413, "too_large")
        ok_mel = encode_blob(np.zeros((max_frames_for(5.0), 128), np.float32))
        assert c.post("/v1/analyze/mel", content=ok_mel, headers={"content-type": "application/octet-stream"}) \
            .status_code == 200


def test_routing_errors_use_the_error_schema(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/analyze"), 405, "method_not_allowed")


def test_still_serving_after_bad_requests(client, analyzer, clip, expected):
    for _ in range(3):
        client.post("/v1/analyze", content=b"\0" * 100, headers={"content-type": "audio/wav"})
        client.post("/v1/analyze/mel", content=b"\1" * 30, headers={"content-type": "application/octet-stream"})
    res = client.post("/v1/analyze", content=clip.read_bytes(), headers={"content-type": "audio/flac"})
    assert_matches(res.json(), expected, analyzer)


# -------------------------------------------------------------------------------------------------- auth


def test_auth_on(analyzer):
    app = create_app(analyzer, settings=Settings(api_token=TOKEN))
    mel = encode_blob(np.full((128, 128), -30.0, np.float32))
    headers = {"content-type": "application/octet-stream"}
    with TestClient(app) as c:
        wait_ready(c)
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200  # probes stay open
        for path in ("/v1/model",):
            assert_error(c.get(path), 401, "unauthorized")
        res = assert_error(c.post("/v1/analyze/mel", content=mel, headers=headers), 401, "unauthorized")
        assert res
        assert c.post("/v1/analyze/mel", content=mel, headers=headers).headers["www-authenticate"] == "Bearer"
        for bad in ("Bearer wrong", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer "):
            assert_error(c.post("/v1/analyze/mel", content=mel, headers={**headers, "authorization": bad}),
                         401, "unauthorized")
        good = {**headers, "authorization": f"Bearer {TOKEN}"}
        assert c.post("/v1/analyze/mel", content=mel, headers=good).status_code == 200
        assert c.get("/v1/model", headers=good).json()["limits"]["auth"] is True
        assert_error(c.post("/v1/analyze", content=b"", headers={"authorization": "Bearer no"}), 401, "unauthorized")


def test_auth_off_by_default(client):
    mel = encode_blob(np.full((128, 128), -30.0, np.float32))
    assert client.post("/v1/analyze/mel", content=mel, headers={"content-type": "application/octet-stream"}) \
        .status_code == 200


def test_settings_from_env():
    env = {"PERCEPIANO_MAX_BYTES": "1000", "PERCEPIANO_REFUSE_OVER_SECONDS": "30", "PERCEPIANO_API_TOKEN": "t",
           "PERCEPIANO_MAX_CONCURRENCY": "3", "PERCEPIANO_MAX_QUEUE": "0", "PERCEPIANO_QUEUE_TIMEOUT": "1.5"}
    s = Settings.from_env(env)
    assert (s.max_bytes, s.refuse_over_seconds, s.api_token, s.max_concurrency, s.max_queue, s.queue_timeout) == \
        (1000, 30.0, "t", 3, 0, 1.5)
    assert Settings.from_env({}) == Settings()
    assert Settings.from_env({"PERCEPIANO_REFUSE_OVER_SECONDS": "none"}).refuse_over_seconds is None
    assert Settings.from_env(env, max_bytes=5).max_bytes == 5
    with pytest.raises(ValueError, match="PERCEPIANO_MAX_BYTES"):
        Settings.from_env({"PERCEPIANO_MAX_BYTES": "lots"})
    with pytest.raises(ValueError, match="PERCEPIANO_API_TOKEN"):
        Settings.from_env({}, require_token=True)
    with pytest.raises(ValueError):
        Settings(max_concurrency=0)
    assert Settings().allow_failed_self_check is False
    for raw, value in (("1", True), ("true", True), ("no", False), ("0", False)):
        assert Settings.from_env({"PERCEPIANO_ALLOW_FAILED_SELF_CHECK": raw}).allow_failed_self_check is value
    with pytest.raises(ValueError, match="PERCEPIANO_ALLOW_FAILED_SELF_CHECK"):
        Settings.from_env({"PERCEPIANO_ALLOW_FAILED_SELF_CHECK": "maybe"})


# -------------------------------------------------------------------------------- readiness and capacity


def test_a_request_during_the_load_waits_for_it(analyzer):
    release = threading.Event()

    def slow_loader() -> Analyzer:
        assert release.wait(10)
        return analyzer

    mel = encode_blob(np.full((128, 128), -30.0, np.float32))
    headers = {"content-type": "application/octet-stream"}
    with TestClient(create_app(slow_loader, settings=Settings(queue_timeout=10))) as c:
        assert c.get("/healthz").status_code == 200
        assert_error(c.get("/readyz"), 503, "not_ready")  # the probe answers at once
        answers: list = []
        waiting = threading.Thread(target=lambda: answers.append(c.post("/v1/analyze/mel", content=mel,
                                                                         headers=headers)))
        waiting.start()
        time.sleep(0.3)
        assert not answers  # still waiting for the model, not refused
        release.set()
        waiting.join(10)
        assert answers[0].status_code == 200, answers[0].json()
    release.clear()
    with TestClient(create_app(slow_loader, settings=Settings(queue_timeout=0.2))) as c:  # bounded by the timeout
        res = c.post("/v1/analyze/mel", content=mel, headers=headers)
        assert_error(res, 503, "not_ready")
        assert res.headers["retry-after"]
        assert_error(c.get("/v1/model"), 503, "not_ready")
        release.set()


def test_an_app_over_a_warmed_analyzer_answers_at_once(tiny_model, clip, monkeypatch):
    import runtime.serve.app
    from runtime.serve.app import warm_up

    warmed = Analyzer.from_path(tiny_model, device="cpu")
    warm_up(warmed)
    expected = warmed.analyze_file(clip).to_dict()
    monkeypatch.setattr(runtime.serve.app, "warm_up", lambda *a, **k: pytest.fail("warmed up a second time"))
    with TestClient(create_app(warmed, settings=Settings())) as c:  # no /readyz polling
        res = c.post("/v1/analyze", content=clip.read_bytes(), headers={"content-type": "audio/flac"})
        assert res.status_code == 200, res.json()
        assert_matches(res.json(), expected, warmed)
        assert c.app.state.service._loader is None  # no background load at all


def test_failed_model_is_reported_not_fatal(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with TestClient(create_app(bad, settings=Settings())) as c:
        res = c.post("/v1/analyze", content=b"RIFF", headers={"content-type": "audio/wav"})  # waits for the load
        assert_error(res, 503, "model_failed")
        assert "onnxruntime cannot load it" in res.json()["error"]
        assert_error(c.get("/readyz"), 503, "model_failed")
        assert c.get("/healthz").status_code == 200


SHUTDOWN_DURING_LOAD = """
import sys
import numpy as np
from fastapi.testclient import TestClient
from runtime.analyze import Analyzer
from runtime.serve.app import Settings, create_app

def busy_load():  # keeps the load thread inside onnxruntime while the app shuts down
    analyzer = Analyzer.from_path(sys.argv[1], device="cpu")
    for _ in range(60):
        analyzer.model.run(np.full((16, 128, 128), -40.0, np.float32))
    return analyzer

with TestClient(create_app(busy_load, settings=Settings())) as c:
    assert c.get("/healthz").status_code == 200
print("closed")
"""


def test_shutting_down_while_the_model_loads_exits_cleanly(tiny_model):
    # before the fix the load ran in a daemon thread: the interpreter exited under onnxruntime's feet
    # ("terminate called without an active exception", SIGABRT) in most runs of this script
    proc = subprocess.run([sys.executable, "-c", SHUTDOWN_DURING_LOAD, str(tiny_model)], capture_output=True,
                          text=True, timeout=120)
    assert "terminate called" not in proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "closed"


class _Blocking:
    """Jobs that block until released, to fill the pool deterministically."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Semaphore(0)

    def job(self):
        self.started.release()
        assert self.release.wait(10)
        return "done"


def test_admission_is_bounded_and_overflow_gets_503():
    async def scenario():
        service = Service(lambda: None, Settings(max_concurrency=1, max_queue=1, queue_timeout=0.3))
        blocking = _Blocking()
        running = asyncio.ensure_future(service.run(blocking.job))
        await asyncio.to_thread(blocking.started.acquire)  # the one slot is taken
        queued = asyncio.ensure_future(service.run(blocking.job))  # waits in the queue
        await asyncio.sleep(0.05)
        with pytest.raises(ServiceError) as over:  # neither a slot nor a queue place: 503 at once
            await service.run(blocking.job)
        assert (over.value.status, over.value.error_type) == (503, "busy")
        with pytest.raises(ServiceError) as late:  # the queued one gave up after queue_timeout
            await queued
        assert (late.value.status, late.value.error_type) == (503, "busy")
        blocking.release.set()
        assert await running == "done"
        assert await service.run(lambda: "again") == "again"  # capacity fully released
        assert service._admitted == 0
        service.close()

    asyncio.run(scenario())


def test_unexpected_job_error_is_a_500_and_the_service_continues():
    async def scenario():
        service = Service(lambda: None, Settings(max_concurrency=1))

        def boom():
            raise RuntimeError("bug")

        with pytest.raises(ServiceError) as err:
            await service.run(boom)
        assert (err.value.status, err.value.error_type) == (500, "internal_error")
        assert await service.run(lambda: 7) == 7
        service.close()

    asyncio.run(scenario())


def test_runtime_import_stays_free_of_the_web_stack():
    code = ("import sys, runtime, runtime.analyze, runtime.serve.mel_input, runtime.cli; "
            "bad = [m for m in ('fastapi', 'uvicorn', 'starlette', 'pydantic', 'modal') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
