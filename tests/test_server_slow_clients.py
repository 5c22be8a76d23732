"""Slow, stalled and cut-off clients against a real server (`python -m runtime serve` on 127.0.0.1, raw sockets).

A stalled body is cut after PERCEPIANO_BODY_IDLE_TIMEOUT without a byte (408 and close); it holds only the bytes
it sent, so 40 of them (small and large declared sizes) cannot keep a normal upload from being answered; request
headers are bounded by PERCEPIANO_HEADER_TIMEOUT; a multipart body without its closing boundary is refused.
Every wait and read is bounded by a timeout.
"""

from __future__ import annotations

import io
import socket
import struct
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serving import Server  # noqa: E402
from test_server_hostile import admission, open_request, read_response, wait_released  # noqa: E402

pytestmark = pytest.mark.slow  # real servers and timeouts of seconds

MAX_BYTES = 1_000_000
IDLE = 4.0  # the body idle timeout of this server
HEADERS = 2.0  # its header timeout
ENV = {"PERCEPIANO_MAX_BYTES": str(MAX_BYTES), "PERCEPIANO_BODY_IDLE_TIMEOUT": str(IDLE),
       "PERCEPIANO_HEADER_TIMEOUT": str(HEADERS), "PERCEPIANO_BODY_TIMEOUT": "60",
       "PERCEPIANO_MAX_BODY_MEMORY": str(2 * MAX_BYTES + 100_000),  # room for two largest bodies, not three
       "PERCEPIANO_MAX_CONCURRENCY": "1", "PERCEPIANO_MAX_QUEUE": "8"}


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = Server(tiny_model, ENV)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_forty_stalled_bodies_do_not_keep_a_normal_upload_waiting(server, clip):
    """20 stalled bodies declare the largest size (today each reserved it: the budget was locked and every upload
    answered 503 busy for the whole body timeout), 20 a small one; each sends 1,000 bytes and stops."""
    stalled = [open_request(server, "/v1/analyze", "audio/flac", MAX_BYTES if i % 2 else 5_000, b"\0" * 1000)
               for i in range(40)]
    deadline = time.monotonic() + IDLE
    while admission(server)["body_bytes_held"] < 40 * 1000:  # held: what arrived, not what was promised
        assert time.monotonic() < deadline, admission(server)
        time.sleep(0.02)
    assert admission(server)["body_bytes_held"] == 40 * 1000
    t0 = time.monotonic()
    res = httpx.post(server.url + "/v1/analyze", content=clip.read_bytes(), timeout=30,
                     headers={"content-type": "audio/flac"})
    answered = time.monotonic() - t0
    assert res.status_code == 200, res.json()
    assert answered < IDLE, f"a normal upload took {answered:.2f} s beside 40 stalled bodies"
    for sock in stalled:  # each cut by the idle timeout: 408 and close, not held for the whole-body deadline
        status, data = read_response(sock, timeout=IDLE + 10)
        assert status == 408 and b'"request_timeout"' in data and b"connection: close" in data.lower(), data[:300]
    wait_released(server)


def test_a_body_stalled_after_its_first_bytes_is_cut_by_the_idle_timeout(server):
    sock = open_request(server, "/v1/analyze/mel", "application/octet-stream", 100_000)
    t0 = time.monotonic()
    for _ in range(3):  # bytes that keep coming reset the idle clock
        sock.sendall(b"\0" * 100)
        time.sleep(IDLE / 2)
    status, data = read_response(sock, timeout=IDLE + 10)
    took = time.monotonic() - t0
    assert status == 408 and b"no byte for" in data, data[:300]
    assert 1.5 * IDLE <= took < 2.5 * IDLE + 5, took  # alive while bytes came; cut one idle timeout after the last
    wait_released(server)


def test_slow_request_headers_get_408_and_close(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    t0 = time.monotonic()
    sock.sendall(b"POST /v1/analyze HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    closed = False
    for byte in b"X-Slow: " + b"a" * 40:  # one header byte every 0.25 s: the headers never end in time
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            closed = True
            break
        time.sleep(0.25)
        if time.monotonic() - t0 > HEADERS + 5:
            break
    status, data = read_response(sock, timeout=5)
    assert status == 408 and b'"request_timeout"' in data, (closed, data[:300])
    assert time.monotonic() - t0 < HEADERS + 6
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # connects and sends nothing
    status, data = read_response(silent, timeout=HEADERS + 5)
    assert status == 408, data[:300]
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200  # a quick client is unaffected


# ---------------------------------------------------------------------------------------------- multipart


def streaming_wav(seconds: float, rate: int = 22_050) -> bytes:
    """A 16-bit WAV as a streaming encoder writes it: RIFF and data sizes 0xFFFFFFFF ("to the end")."""
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    data = bytearray(buf.getvalue())
    data[4:8] = struct.pack("<I", 0xFFFFFFFF)
    at = data.find(b"data")
    data[at + 4 : at + 8] = struct.pack("<I", 0xFFFFFFFF)
    return bytes(data)


def multipart(wav: bytes, disposition: str, *, close: bool = True) -> tuple[bytes, str]:
    boundary = "percepiano-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: audio/wav\r\n\r\n".encode()
            + wav + (f"\r\n--{boundary}--\r\n".encode() if close else b""))
    return body, f"multipart/form-data; boundary={boundary}"


def test_multipart_without_its_closing_boundary_is_400_not_a_scored_fragment(server):
    wav = streaming_wav(8.0)
    whole, kind = multipart(wav, 'form-data; name="audio"; filename="take.wav"')
    res = httpx.post(server.url + "/v1/analyze", content=whole, headers={"content-type": kind}, timeout=30)
    assert res.status_code == 200 and res.json()["duration_seconds"] == pytest.approx(8.0, abs=0.01), res.json()
    cut = whole[: len(whole) // 10]  # the body as a proxy that dropped the rest would hand it on
    res = httpx.post(server.url + "/v1/analyze", content=cut, headers={"content-type": kind}, timeout=30)
    assert res.status_code == 400, res.json()
    assert res.json()["error_type"] == "bad_request" and "closing boundary" in res.json()["error"], res.json()
    cut_at_part_end, _ = multipart(wav, 'form-data; name="audio"; filename="take.wav"', close=False)
    res = httpx.post(server.url + "/v1/analyze", content=cut_at_part_end, headers={"content-type": kind}, timeout=30)
    assert res.status_code == 400 and res.json()["error_type"] == "bad_request", res.json()


def test_multipart_file_named_only_by_rfc2231_filename_star_is_accepted(server):
    body, kind = multipart(streaming_wav(4.0), "form-data; name=\"audio\"; filename*=UTF-8''r%C3%A9cital.wav")
    res = httpx.post(server.url + "/v1/analyze", content=body, headers={"content-type": kind}, timeout=30)
    assert res.status_code == 200, res.json()
    assert res.json()["duration_seconds"] == pytest.approx(4.0, abs=0.01)


def test_the_whole_body_deadline_grows_with_the_declared_size():
    from runtime.serve.app import Settings
    from runtime.serve.body import BodyTiming

    defaults = Settings()
    assert (defaults.body_timeout, defaults.body_min_rate, defaults.body_idle_timeout) == (120.0, 50_000.0, 30.0)
    body = BodyTiming(idle=30.0, timeout=120.0, min_rate=50_000.0)
    assert body.deadline(50_000_000) == 120.0 + 1000.0  # a 50 MB upload at 400 kbit/s still arrives
    assert body.deadline(0) == 120.0
    assert BodyTiming(idle=30.0, timeout=120.0, min_rate=0).deadline(50_000_000) == 120.0  # 0: no growth
