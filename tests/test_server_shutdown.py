"""Shutdown answers every waiting request: a real server (`python -m runtime serve` on 127.0.0.1) gets SIGTERM
while one long analysis runs and others wait in its queue. The running one finishes (200); each queued one gets
503 JSON `not_ready` with Retry-After and its own request ID at once, never a bare 500 or a dropped connection
(a cancelled job raises CancelledError, which `except Exception` does not catch).
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serving import Server  # noqa: E402

QUEUED = 6
SECONDS = 240.0  # long enough that the queue is still full when the signal comes


def long_wav() -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    noise = 0.1 * np.random.default_rng(0).standard_normal(int(SECONDS * 22_050))
    sf.write(buf, noise.astype(np.float32), 22_050, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_queued_requests_get_503_with_retry_after_and_their_id_on_shutdown(tiny_model):
    server = Server(tiny_model, {"PERCEPIANO_MAX_CONCURRENCY": "1", "PERCEPIANO_MAX_QUEUE": "16",
                                 "PERCEPIANO_QUEUE_TIMEOUT": "120"})
    body, answers = long_wav(), {}

    def send(i: int) -> None:
        rid = f"shutdown-{i}"
        try:
            res = httpx.post(server.url + "/v1/analyze", content=body, timeout=120,
                             headers={"content-type": "audio/wav", "x-request-id": rid})
            answers[rid] = res
        except httpx.HTTPError as exc:  # a dropped connection: the failure this test is about
            answers[rid] = exc

    try:
        server.wait_ready()
        threads = [threading.Thread(target=send, args=(i,)) for i in range(1 + QUEUED)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while httpx.get(server.url + "/v1/model", timeout=5).json()["admission"]["admitted"] < 1 + QUEUED:
            assert time.monotonic() < deadline, "the requests were not all admitted"
            time.sleep(0.01)
        signalled = time.monotonic()
        server.proc.terminate()  # SIGTERM, as a process manager sends it
        for t in threads:
            t.join(60)
        assert server.proc.wait(30) is not None
    finally:
        server.stop()
    assert len(answers) == 1 + QUEUED
    dropped = {rid: a for rid, a in answers.items() if isinstance(a, Exception)}
    assert not dropped, dropped
    refused = {rid: res for rid, res in answers.items() if res.status_code != 200}
    assert len(refused) >= QUEUED - 1, {rid: res.status_code for rid, res in answers.items()}  # at most one more ran
    for rid, res in refused.items():
        body = res.json()
        assert res.status_code == 503 and body["error_type"] == "not_ready", (rid, res.status_code, body)
        assert body["request_id"] == rid == res.headers["x-request-id"]
        assert res.headers["retry-after"] == "1"
    assert time.monotonic() - signalled < 30
