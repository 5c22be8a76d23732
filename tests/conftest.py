"""Shared fixtures: the real piano clips, and a tiny-preset checkpoint exported once per test run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest_plugins = ("serving", "audio_fixtures")  # fixtures of the HTTP service (serving.py), audio-input model

REPO = Path(__file__).resolve().parents[1]
SHARED_PIANO = REPO.parent / "shared" / "data" / "piano"


def shared_clips() -> list[Path]:
    """All real clips of the shared test set (../shared/data/piano)."""
    return sorted(SHARED_PIANO.glob("*.flac"))


@pytest.fixture(scope="session")
def piano_clips() -> list[Path]:
    clips = shared_clips()
    if not clips:
        pytest.skip(f"real piano clips not found in {SHARED_PIANO}")
    return clips


@pytest.fixture(scope="session")
def piano_labels() -> dict:
    return json.loads((SHARED_PIANO / "labels.json").read_text())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from convert.demo import make_demo_checkpoint

    return make_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pkl", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_raw(tiny_checkpoint) -> dict:
    """The tiny demo checkpoint as plain pickle (with jax and sklearn installed) reads it: jax.Array leaves."""
    import pickle

    return pickle.loads(tiny_checkpoint.read_bytes())


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_checkpoint):
    """The tiny preset exported through the real pipeline, parity gate included; the graph as traced (not
    pre-optimised for the CPU: tests make variants from it and compose it; tests/test_cold_start.py covers the
    default, pre-optimised export)."""
    from convert.export import ExportOptions, export

    return export(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny.onnx", ExportOptions(preoptimize="none"))


@pytest.fixture(scope="session")
def tiny_model(tiny_export) -> Path:
    return tiny_export.path


@pytest.fixture
def recorded(monkeypatch):
    """The Modal app file's default (GPU) variant, imported with modal's API recorded (tests/modal_recording.py)."""
    from modal_recording import import_recording

    yield import_recording(monkeypatch)
    sys.modules.pop("deploy.modal_app", None)


@pytest.fixture(autouse=True)
def _request_log_restored():
    """runtime.serve.request_log.configure_request_log changes a process-wide logger: put it back after each test."""
    import logging

    logger = logging.getLogger("percepiano.requests")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
