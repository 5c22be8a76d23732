"""The Modal service as the app file builds it (no credentials): a request's cap holds, every request is logged."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("modal")
pytest.importorskip("fastapi")

from modal_recording import fresh_import  # noqa: E402

TOKEN = "modal-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}", "content-type": "audio/flac"}


@pytest.fixture
def container(monkeypatch, tiny_model):
    """The Service's lifecycle outside Modal, with a deployment cap of 4 s (PERCEPIANO_CAP_SECONDS)."""
    monkeypatch.setenv("PERCEPIANO_MODEL_PATH", str(tiny_model))
    monkeypatch.setenv("PERCEPIANO_DEVICE", "cpu")
    monkeypatch.setenv("PERCEPIANO_API_TOKEN", TOKEN)
    monkeypatch.setenv("PERCEPIANO_CAP_SECONDS", "4")
    m = fresh_import()
    obj = m.ModelContainer()
    obj.load()
    obj.start()
    return m, obj


def test_a_requests_cap_holds_on_modal_and_the_setting_is_its_default(container, piano_clips):
    from fastapi.testclient import TestClient

    _, obj = container
    clip = piano_clips[0]  # about 15 s
    with TestClient(obj.build_app()) as c:
        default = c.post("/v1/analyze", content=clip.read_bytes(), headers=AUTH)
        longer = c.post("/v1/analyze?cap_seconds=9", content=clip.read_bytes(), headers=AUTH)
        whole = c.post("/v1/analyze?cap_seconds=600", content=clip.read_bytes(), headers=AUTH)
    assert default.status_code == longer.status_code == whole.status_code == 200
    assert default.json()["duration_seconds"] == pytest.approx(4.0, abs=0.01)  # the deployment's cap
    assert longer.json()["duration_seconds"] == pytest.approx(9.0, abs=0.01)  # the request's own, not 4 s
    assert whole.json()["duration_seconds"] > 14  # a cap beyond the recording: all of it


def test_the_corpus_worker_keeps_the_deployment_cap_as_its_default(container, piano_clips, tmp_path, monkeypatch):
    import shutil

    m, obj = container
    monkeypatch.setattr(m, "AUDIO_MOUNT", str(tmp_path))
    shutil.copy(piano_clips[0], tmp_path / "a.flac")
    assert obj.analyze_path("a.flac")["duration_seconds"] == pytest.approx(4.0, abs=0.01)
    assert obj.analyze_path("a.flac", 9.0)["duration_seconds"] == pytest.approx(9.0, abs=0.01)


def test_every_request_is_logged_on_modal_by_default(container, piano_clips, capfd, monkeypatch):
    from fastapi.testclient import TestClient

    _, obj = container
    with TestClient(obj.build_app()) as c:
        assert c.post("/v1/analyze", content=piano_clips[0].read_bytes(), headers=AUTH).status_code == 200
        assert c.get("/healthz").status_code == 200
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    assert [(line["route"], line["status"]) for line in lines] == [("/v1/analyze", 200), ("/healthz", 200)]
    assert lines[0]["audio_seconds"] == pytest.approx(4.0, abs=0.01) and TOKEN not in json.dumps(lines)

    monkeypatch.setenv("PERCEPIANO_REQUEST_LOG", "0")  # the setting silences it
    with TestClient(obj.build_app()) as c:
        assert c.get("/healthz").status_code == 200
    assert not [line for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
