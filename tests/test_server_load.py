"""A real server (`python -m runtime serve` in a subprocess, loopback only) under bounded concurrent load.

8 clients x 25 requests, good and bad mixed: every good request must get the in-process result, every bad
one its 4xx, and at the end the server must hold no admission slot and no body byte, still be healthy, and
shut down cleanly. No speed is asserted (speeds belong in benchmarks); the figures are printed. Also runnable
alone for figures:  python tests/test_server_load.py --model artifacts/model.onnx --clients 8 --requests 25
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx") if __name__ != "__main__" else __import__("httpx")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/serving.py, when run as a script

from serving import Server  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 1_000_000
MAX_SECONDS = 12.0
SERVER_ENV = {"PERCEPIANO_MAX_BYTES": str(MAX_BYTES), "PERCEPIANO_REFUSE_OVER_SECONDS": str(MAX_SECONDS),
              "PERCEPIANO_MAX_CONCURRENCY": "2", "PERCEPIANO_MAX_QUEUE": "64", "PERCEPIANO_QUEUE_TIMEOUT": "60"}


@dataclass
class Case:
    """One kind of request and what must come back."""

    name: str
    method: str
    path: str
    status: int
    content: bytes | None = None
    files: dict | None = None
    content_type: str | None = None
    error_type: str | None = None
    scores: dict | None = None  # expected scores of a good analysis


def build_cases(model: Path, clips: list[Path]) -> list[Case]:
    """Requests of every kind; expected scores come from the same model run in this process."""
    import soundfile as sf

    from runtime.analyze import Analyzer
    from runtime.audio import load_audio
    from runtime.features import features_from_audio
    from runtime.serve.mel_input import encode_blob

    analyzer = Analyzer.from_path(model, device="cpu")
    by_size = sorted(clips, key=lambda p: p.stat().st_size)
    short, long_ = by_size[0], max(clips, key=lambda p: sf.info(str(p)).duration)
    assert sf.info(str(long_)).duration > MAX_SECONDS > sf.info(str(short)).duration
    y = load_audio(short)
    piece = y[: 3 * 22050]
    wav = io.BytesIO()
    sf.write(wav, piece, 22050, format="WAV", subtype="PCM_16")
    wav_y = load_audio(wav.getvalue())
    chunk = features_from_audio(y)[1]
    octet = "application/octet-stream"
    return [
        Case("audio_multipart_wav", "POST", "/v1/analyze", 200, files={"audio": ("a.wav", wav.getvalue(), "audio/wav")},
             scores=analyzer.analyze_audio(wav_y, 22050).scores),
        Case("audio_raw_flac", "POST", "/v1/analyze", 200, content=short.read_bytes(), content_type="audio/flac",
             scores=analyzer.analyze_audio(y, 22050).scores),
        Case("mel_blob", "POST", "/v1/analyze/mel", 200, content=encode_blob(chunk), content_type=octet,
             scores=analyzer.analyze_mel(chunk).scores),
        Case("mel_json", "POST", "/v1/analyze/mel", 200,
             content=json.dumps({"mel_spectrogram": chunk.tolist()}).encode(), content_type="application/json",
             scores=analyzer.analyze_mel(chunk).scores),
        Case("model_info", "GET", "/v1/model", 200),
        Case("not_audio", "POST", "/v1/analyze", 415, content=b"plain text", content_type="text/plain",
             error_type="unsupported_media_type"),
        Case("corrupt_audio", "POST", "/v1/analyze", 415, content=b"\x00garbage" * 500, content_type="audio/wav",
             error_type="unsupported_audio"),
        Case("too_large", "POST", "/v1/analyze", 413, content=b"\x01" * (MAX_BYTES + 200_000), content_type="audio/wav",
             error_type="too_large"),
        Case("too_long", "POST", "/v1/analyze", 413, content=long_.read_bytes(), content_type="audio/flac",
             error_type="audio_too_long"),
        Case("bad_blob", "POST", "/v1/analyze/mel", 422, content=encode_blob(chunk)[:-8], content_type=octet,
             error_type="invalid_input"),
        Case("bad_json_shape", "POST", "/v1/analyze/mel", 422, content=b'{"mel_spectrogram": [[1, 2, 3]]}',
             content_type="application/json", error_type="invalid_input"),
        Case("not_found", "GET", "/v1/nope", 404, error_type="not_found"),
    ]


def check(case: Case, res: httpx.Response) -> str | None:
    """None if the response is what the case expects, else why not."""
    try:
        body = res.json()
    except ValueError:
        return f"{case.name}: non-JSON {res.status_code} response"
    if res.status_code != case.status:
        return f"{case.name}: status {res.status_code} != {case.status}: {body}"
    if case.error_type and (body.get("status"), body.get("error_type")) != ("error", case.error_type):
        return f"{case.name}: {body}"
    if case.scores is not None:
        got = np.array([body["scores"][k] for k in case.scores])
        if not np.allclose(got, list(case.scores.values()), rtol=0, atol=1e-5):
            return f"{case.name}: scores differ by {np.abs(got - list(case.scores.values())).max():.2e}"
    return None


def run_load(url: str, cases: list[Case], clients: int, per_client: int) -> dict:
    """`clients` threads, each with its own connection, sending `per_client` requests in a rotating mix."""
    records: list[tuple[str, float, str | None]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=60.0) as http:
            for j in range(per_client):
                case = cases[(index * 7 + j) % len(cases)]
                headers = {"content-type": case.content_type} if case.content_type else {}
                t0 = time.perf_counter()
                try:
                    res = http.request(case.method, case.path, content=case.content, files=case.files,
                                       headers=headers)
                    problem = check(case, res)
                except httpx.HTTPError as exc:
                    problem = f"{case.name}: {type(exc).__name__}: {exc}"
                with lock:
                    records.append((case.name, time.perf_counter() - t0, problem))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    wall = time.perf_counter() - t0
    latencies = np.array([r[1] for r in records])
    good = np.array([r[1] for r in records if any(c.name == r[0] and c.scores for c in cases)])
    return {
        "requests": len(records), "expected": clients * per_client, "wall_seconds": round(wall, 3),
        "requests_per_second": round(len(records) / wall, 1),
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1),
        "analyses": len(good), "analysis_p50_ms": round(1000 * float(np.percentile(good, 50)), 1),
        "analysis_p99_ms": round(1000 * float(np.percentile(good, 99)), 1),
        "problems": [r[2] for r in records if r[2]],
    }


def test_real_server_under_concurrent_mixed_load(tiny_model, piano_clips, capsys):
    cases = build_cases(tiny_model, piano_clips)
    server = Server(tiny_model, SERVER_ENV)
    try:
        server.wait_ready()
        stats = run_load(server.url, cases, clients=8, per_client=25)
        with capsys.disabled():
            figures = {k: v for k, v in stats.items() if k != "problems"}
            print(f"\n[load: tiny model, {os.cpu_count()} CPU cores] {json.dumps(figures)}")
        assert stats["requests"] == stats["expected"] == 200
        assert stats["problems"] == [], "\n".join(stats["problems"][:10])
        # every path (success, 4xx, a drained 413, a decoding failure) gave back its slot and its body bytes
        admission = httpx.get(server.url + "/v1/model", timeout=5).json()["admission"]
        assert admission["admitted"] == 0 and admission["body_bytes_held"] == 0, admission
        assert httpx.get(server.url + "/healthz", timeout=5).json() == {"status": "ok"}
        assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200
        assert server.proc.poll() is None
    finally:
        code = server.stop()
    log = server.output()
    assert code in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log and "Traceback" not in log, log


def test_real_server_overload_answers_503_and_recovers(tiny_model, piano_clips):
    """More simultaneous analyses than running + queued places: the overflow gets 503 busy, nothing crashes."""
    cases = [c for c in build_cases(tiny_model, piano_clips) if c.name == "audio_raw_flac"]
    server = Server(tiny_model, {**SERVER_ENV, "PERCEPIANO_MAX_CONCURRENCY": "1", "PERCEPIANO_MAX_QUEUE": "1"})
    try:
        server.wait_ready()
        barrier = threading.Barrier(8)
        outcomes: list[str] = []

        def burst() -> None:
            with httpx.Client(base_url=server.url, timeout=60.0) as http:
                barrier.wait(10)
                for _ in range(3):
                    res = http.post("/v1/analyze", content=cases[0].content, headers={"content-type": "audio/flac"})
                    if res.status_code == 503:
                        assert res.json()["error_type"] == "busy" and res.headers["retry-after"]
                        outcomes.append("busy")
                    else:
                        assert check(cases[0], res) is None, check(cases[0], res)
                        outcomes.append("ok")

        threads = [threading.Thread(target=burst) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(outcomes) == 24, outcomes  # every request answered (an assertion error would lose one)
        assert outcomes.count("busy") >= 1 and outcomes.count("ok") >= 2, outcomes
        res = httpx.post(server.url + "/v1/analyze", content=cases[0].content, headers={"content-type": "audio/flac"})
        assert check(cases[0], res) is None  # capacity released: a lone request succeeds again
        admission = httpx.get(server.url + "/v1/model", timeout=5).json()["admission"]
        assert admission["admitted"] == 0 and admission["body_bytes_held"] == 0, admission
    finally:
        server.stop()
    assert "Traceback" not in server.output()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="load-test `python -m runtime serve` on loopback")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--clips", type=Path, default=REPO / "tests" / "data" / "piano")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="per client")
    args = parser.parse_args(argv)
    cases = build_cases(args.model, sorted(args.clips.glob("*.flac")))
    server = Server(args.model, SERVER_ENV)
    try:
        server.wait_ready()
        stats = run_load(server.url, cases, args.clients, args.requests)
    finally:
        server.stop()
    print(json.dumps(stats, indent=2))
    return 1 if stats["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
