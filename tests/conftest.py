"""Shared fixtures: the real piano clips, and a tiny-preset checkpoint exported once per test run."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import piano_data
import pytest

pytest_plugins = ("serving", "audio_fixtures", "demo_fixtures")  # HTTP service, audio-input model, demo.sh

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI") == "true"


def _skip_reason(report) -> str:
    return (report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)).removeprefix(
        "Skipped: ")


def _fail_skips_in_ci(report) -> None:
    """Under CI=true a skip is a failure: whatever a test needs, scripts/test.sh installs or the test makes."""
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.longrepr = f"skipped under CI=true, where a skip is a failure: {_skip_reason(report)}"
        report.outcome = "failed"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skips_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A whole module skipped at import (pytest.importorskip at module level) counts too."""
    outcome = yield
    _fail_skips_in_ci(outcome.get_result())


def pytest_unconfigure(config):
    """The run's last line: how many tests skipped, and why (outside CI; in CI a skip has already failed)."""
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    if terminal is None or not hasattr(terminal, "stats"):
        return
    skipped = [r for r in terminal.stats.get("skipped", []) if not hasattr(r, "wasxfail")]
    reasons = Counter(_skip_reason(r) for r in skipped)
    why = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common())
    terminal.write_line(f"skips: {len(skipped)}" + (f" ({why})" if why else ""))


@pytest.fixture(scope="session")
def piano_clips() -> list[Path]:
    """The 16 real piano clips kept in the repository (tests/data/piano, tests/piano_data.py)."""
    return list(piano_data.CLIPS)


@pytest.fixture(scope="session")
def piano_labels() -> dict:
    return piano_data.labels()


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


@pytest.fixture(scope="session")
def ckpt(tiny_checkpoint):
    """The tiny checkpoint, loaded (convert.checkpoint)."""
    from convert.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def fp32(tiny_model):
    """The tiny export's fp32 graph as traced (tests copy it before changing it)."""
    import onnx

    return onnx.load(str(tiny_model))


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
