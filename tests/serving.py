"""Fixtures and assertions shared by the HTTP service's tests (test_server*.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.analyze import Analyzer
from runtime.constants import API_KEYS

TOKEN = "test-token-0123456789"
REPO = Path(__file__).resolve().parents[1]


def wait_ready(client, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = client.get("/readyz")
        if res.status_code == 200:
            return res.json()
        time.sleep(0.02)
    raise AssertionError(f"not ready after {timeout} s: {res.json()}")


@pytest.fixture(scope="module")
def analyzer(tiny_model) -> Analyzer:
    return Analyzer.from_path(tiny_model, device="cpu")


@pytest.fixture(scope="module")
def clip(piano_clips):
    """The shortest real clip (fewest chunks: fastest), its bytes, audio and in-process result."""
    path = min(piano_clips, key=lambda p: p.stat().st_size)
    return path


@pytest.fixture(scope="module")
def expected(analyzer, clip):
    return analyzer.analyze_file(clip).to_dict()


@pytest.fixture(scope="module")
def client(analyzer):
    """A TestClient of the app over the tiny model, ready (small limits so the limit paths are cheap)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from runtime.serve.app import Settings, create_app

    app = create_app(analyzer, settings=Settings(max_bytes=2_000_000, refuse_over_seconds=60.0))
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def assert_error(res, status: int, error_type: str) -> dict:
    body = res.json()
    assert res.status_code == status, body
    assert body["status"] == "error" and body["error_type"] == error_type and body["error"], body
    return body


def assert_scores(got: dict, want: dict, atol: float = 1e-6) -> None:
    assert list(got) == list(API_KEYS)
    np.testing.assert_allclose([got[k] for k in API_KEYS], [want[k] for k in API_KEYS], rtol=0, atol=atol)


def assert_matches(body: dict, want: dict, analyzer: Analyzer) -> None:
    assert body["status"] == "success"
    assert_scores(body["scores"], want["scores"])
    assert len(body["timeline"]) == len(want["timeline"])
    for got_chunk, want_chunk in zip(body["timeline"], want["timeline"], strict=True):
        assert got_chunk["start_seconds"] == pytest.approx(want_chunk["start_seconds"])
        assert_scores(got_chunk["scores"], want_chunk["scores"])
    assert body["duration_seconds"] == pytest.approx(want["duration_seconds"])
    assert body["model"] == analyzer.model.info.summary()
    assert body["processing_seconds"] > 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m runtime serve` on 127.0.0.1 in a subprocess, its output in a log file."""

    def __init__(self, model: Path, env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        cmd = [sys.executable, "-m", "runtime", "serve", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), "--device", "cpu"]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, as a process manager would; uvicorn shuts down gracefully, then re-raises the signal."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode
