"""Hostile requests: nothing a client can send gets a 500, hangs a worker or holds memory without bound.

JSON bombs go through the in-process app; stalled, dripping and abandoned bodies and the byte budget go through a
real server (`python -m runtime serve` on 127.0.0.1) with raw sockets, every loop and read bounded by a timeout.
"""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serving import Server, assert_error  # noqa: E402

from runtime.errors import InputError  # noqa: E402
from runtime.serve.mel_input import MAX_JSON_DEPTH, MAX_NUMBER_CHARS, check_json_bounds, parse_json_bytes  # noqa: E402

ROW = ", ".join(["-12.5"] * 128)

# ---------------------------------------------------------------------------------------------- JSON bounds


@pytest.mark.parametrize("body, status, error_type", [
    (b"[" * 100_000, 422, "invalid_input"),  # recursion bomb: refused before json.loads recurses
    (b'{"mel_spectrogram": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 422, "invalid_input"),
    (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, 422, "invalid_input"),
    (b'{"mel_spectrogram": [[' + b"9" * 5000 + b", " + ROW[7:].encode() + b"]]}", 422, "invalid_input"),  # int
    (b'{"mel_spectrogram": [[1.' + b"5" * 5000 + b", " + ROW[7:].encode() + b"]]}", 422, "invalid_input"),  # float
    (b'{"mel_spectrogram": [[1e99999, ' + ROW[7:].encode() + b"]]}", 422, "invalid_input"),  # infinite
    (b'{"mel_spectrogram": [[true, ' + ROW[7:].encode() + b"]]}", 422, "invalid_input"),  # not a number
    (b'{"mel_spectrogram": [[1e39, ' + ROW[7:].encode() + b"]]}", 422, "invalid_input"),  # beyond float32
    (b"[" + b'"x",' * 1000 + b"1]", 422, "invalid_input"),  # strings beyond a document's few keys
    (b'{"mel_spectrogram": [[' + ROW.encode() + b"]]" + b"," * 2_000_000 + b"}", 413, "too_large"),  # values
    (b'{"mel_spectrogram": [[' + ROW.encode() + b"]", 400, "bad_request"),  # truncated
    (b"\xff\xfe{}", 400, "bad_request"),  # not UTF-8
])
def test_hostile_json_is_a_4xx(client, body, status, error_type):
    res = client.post("/v1/analyze/mel", content=body, headers={"content-type": "application/json"})
    assert_error(res, status, error_type)


def test_json_bounds_count_only_what_lies_outside_strings(client):
    escaped = json.dumps({"note": '\\"[[[[' * 50 + "9" * 200 + '"\\', "mel_spectrogram": [[-12.5] * 128]})
    res = client.post("/v1/analyze/mel", content=escaped, headers={"content-type": "application/json"})
    assert res.status_code == 200, res.json()
    big_ints = '{"mel_spectrogram": [[' + ", ".join(["10" * 15] * 128) + "]]}"  # 30 digits: a number, accepted
    res = client.post("/v1/analyze/mel", content=big_ints, headers={"content-type": "application/json"})
    assert res.status_code == 200, res.json()
    ok = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    check_json_bounds(ok)  # exactly at the bounds: allowed
    check_json_bounds(b"[" + b"1" * MAX_NUMBER_CHARS + b"]")
    for bad in (b"[" + ok + b"]", b"[" + b"1" * (MAX_NUMBER_CHARS + 1) + b"]"):
        with pytest.raises(InputError):
            check_json_bounds(bad)


def test_json_bounds_are_linear_on_large_bodies():
    """A 20 MB bomb of each kind is refused, not parsed (bounded work; no speed asserted)."""
    size = 20_000_000
    for body in (b"[" * size, b"[" + b"1" * size + b"]", b'["' + b"\\\\" * (size // 2) + b'"]',
                 b"[" + b"0," * (size // 2) + b"0]"):
        with pytest.raises(InputError):
            parse_json_bytes(body, max_frames=1000)


# ---------------------------------------------------------------------------------------------- a real server

MAX_BYTES = 1_000_000
BODY_TIMEOUT = 3.0
ENV = {"PERCEPIANO_MAX_BYTES": str(MAX_BYTES), "PERCEPIANO_BODY_TIMEOUT": str(BODY_TIMEOUT),
       "PERCEPIANO_BODY_MIN_RATE": "0",  # the whole-body deadline is BODY_TIMEOUT, whatever the size
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


@pytest.fixture(scope="module")
def patient_server(tiny_model):
    """Body timeout long enough that held bodies stay held while the budget is probed."""
    srv = Server(tiny_model, {**ENV, "PERCEPIANO_BODY_TIMEOUT": "60"})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def open_request(server, path: str, content_type: str, length: int | None, first: bytes = b"") -> socket.socket:
    """A raw connection that has sent the headers (Content-Length `length`, or chunked) and `first` body bytes."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n"
                 .encode() + first)
    return sock


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int | None, bytes]:
    """(status, everything received until the server closed or `timeout` passed); status None if nothing came."""
    sock.settimeout(0.5)
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            piece = sock.recv(65536)
        except TimeoutError:
            if b"\r\n\r\n" in data:
                break
            continue
        except ConnectionResetError:
            break
        if not piece:
            break
        data += piece
    sock.close()
    return (int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None), data


def admission(server) -> dict:
    return httpx.get(server.url + "/v1/model", timeout=5).json()["admission"]


def wait_released(server, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while (state := admission(server))["body_bytes_held"] or state["admitted"]:
        assert time.monotonic() < deadline, f"not released: {state}"
        time.sleep(0.05)
    return state


def test_stalled_body_is_cut_off_with_408_and_its_bytes_released(server):
    sock = open_request(server, "/v1/analyze", "audio/flac", MAX_BYTES, b"\0" * 1000)  # the rest never comes
    t0 = time.monotonic()
    while admission(server)["body_bytes_held"] != 1000:  # what arrived is held, not the Content-Length promised
        assert time.monotonic() - t0 < BODY_TIMEOUT, admission(server)
        time.sleep(0.02)
    status, data = read_response(sock, timeout=BODY_TIMEOUT + 8)
    assert status == 408 and b'"request_timeout"' in data, data[:300]
    assert time.monotonic() - t0 < BODY_TIMEOUT + 8  # answered, not held until the client gives up
    wait_released(server)


def test_dripping_body_is_cut_off_at_the_deadline_not_per_byte(server):
    sock = open_request(server, "/v1/analyze/mel", "application/octet-stream", 5000)
    deadline, closed = time.monotonic() + BODY_TIMEOUT + 8, False
    while time.monotonic() < deadline and not closed:  # a byte every 0.1 s: the whole body never arrives
        try:
            sock.sendall(b"\0")
        except OSError:  # the server closed the connection after its 408
            closed = True
        time.sleep(0.1)
    status, data = read_response(sock, timeout=5)
    assert status == 408 or closed, data[:300]  # cut off by the server, not by this test's deadline
    wait_released(server)


def test_client_leaving_mid_body_is_one_log_line_and_no_traceback(server):
    for _ in range(3):
        sock = open_request(server, "/v1/analyze", "audio/wav", MAX_BYTES, b"RIFF" + b"\0" * 5000)
        time.sleep(0.2)
        sock.close()
    wait_released(server)
    log = server.output()
    assert log.count("client disconnected after") == 3, log
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log


def test_byte_budget_refuses_a_body_before_reading_it(patient_server):
    server = patient_server  # two bodies that really sent all but their last byte hold the budget
    held = [open_request(server, "/v1/analyze", "audio/flac", MAX_BYTES, b"\0" * (MAX_BYTES - 1)) for _ in range(2)]
    deadline = time.monotonic() + 5
    while admission(server)["body_bytes_held"] < 2 * (MAX_BYTES - 1):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    third = open_request(server, "/v1/analyze", "audio/flac", MAX_BYTES)  # headers only: refused at once
    status, data = read_response(third, timeout=5)
    assert status == 503 and b'"busy"' in data and b"retry-after" in data.lower(), data[:300]
    small = httpx.post(server.url + "/v1/analyze/mel", content=b"\0" * 10, timeout=5,
                       headers={"content-type": "application/octet-stream"})
    assert small.status_code == 422  # a small body still fits in what is left: only the large one was refused
    chunked = open_request(server, "/v1/analyze", "audio/flac", None, b"249F0\r\n" + b"\0" * 150_000 + b"\r\n")
    status, data = read_response(chunked, timeout=5)  # chunked: reserved as it arrives, refused when over
    assert status == 503 and b'"busy"' in data, data[:300]
    for sock in held:
        sock.close()
    wait_released(server)
    assert "Traceback" not in server.output()


def test_after_the_abuse_a_real_request_succeeds(server, clip):
    res = httpx.post(server.url + "/v1/analyze", content=clip.read_bytes(), timeout=60,
                     headers={"content-type": "audio/flac"})
    assert res.status_code == 200, res.json()
    assert np.isfinite(list(res.json()["scores"].values())).all()
    assert wait_released(server)["body_bytes_budget"] == 2 * MAX_BYTES + 100_000


# ---------------------------------------------------------------------------------------------- in-process


def test_multipart_is_unpacked_in_the_pool_not_on_the_event_loop(client, clip, monkeypatch):
    import threading

    import runtime.serve.service as server_module  # where the jobs run

    threads, unpack = [], server_module.multipart_audio

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return unpack(*args, **kwargs)

    monkeypatch.setattr(server_module, "multipart_audio", recording)
    res = client.post("/v1/analyze", files={"audio": ("a.flac", clip.read_bytes(), "audio/flac")})
    assert res.status_code == 200, res.json()
    assert len(threads) == 1 and threads[0].startswith("percepiano"), threads  # the analysis pool's threads


def test_malformed_multipart_is_a_400(client):
    res = client.post("/v1/analyze", content=b"--x\r\nno headers end", headers={
        "content-type": "multipart/form-data; boundary=x"})
    assert res.status_code in (400, 422), res.json()
    assert_error(client.post("/v1/analyze", content=b"x", headers={"content-type": "multipart/form-data"}),
                 400, "bad_request")  # no boundary
    many = b"".join(b'--x\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nv\r\n' % i for i in range(40))
    assert_error(client.post("/v1/analyze", content=many + b"--x--\r\n",
                             headers={"content-type": "multipart/form-data; boundary=x"}), 413, "too_large")


def test_body_budget_follows_the_admission_bounds():
    from runtime.serve.app import Settings

    assert Settings(max_bytes=10, max_concurrency=2, max_queue=3).body_budget() == 50  # (2 + 3) x 10
    assert Settings(max_bytes=10, max_concurrency=2, max_queue=3, max_body_memory=25).body_budget() == 25  # capped
    assert Settings(max_bytes=100, max_body_memory=25).body_budget(slack=5) == 105  # never below one largest body
    with pytest.raises(ValueError):
        Settings(body_timeout=0)
