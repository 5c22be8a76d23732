"""`python -m benchmarks.upload_memory`: the service's memory under a burst of large uploads.

Starts `python -m runtime serve` on 127.0.0.1 (a subprocess), measures its resident memory (VmRSS) at rest
(baseline, after one warm request), the peak while N clients upload a near-limit body at once (sampled every
20 ms, and the kernel's VmHWM), and after each burst once the server is idle again. The body is a WAV of real
piano (a shipped clip, tiled) just under PERCEPIANO_MAX_BYTES. Prints one JSON document; no speed is judged.

    python -m benchmarks.upload_memory --model artifacts/model.onnx --clients 16
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO / "convert" / "clips" / "Schubert_D960_mv2_8bars_Score_02.flac"
MB = 1_000_000


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found for pid {pid}")


def near_limit_wav(max_bytes: int) -> bytes:
    """A stereo float32 WAV of the clip, tiled to just under max_bytes."""
    import soundfile as sf

    y, sr = sf.read(str(CLIP), dtype="float32", always_2d=True)
    frames = (max_bytes - 4096) // (4 * 2)
    stereo = np.tile(np.repeat(y[:, :1], 2, axis=1), (frames // len(y) + 1, 1))[:frames]
    out = io.BytesIO()
    sf.write(out, stereo, sr, format="WAV", subtype="FLOAT")
    data = out.getvalue()
    assert len(data) <= max_bytes, len(data)
    return data


def tiny_model(folder: Path) -> Path:
    """A tiny-preset demo export (when no --model is given)."""
    from convert.demo import make_demo_checkpoint
    from convert.export import export

    return export(make_demo_checkpoint(folder / "tiny.pkl", preset="tiny", seed=0), folder / "tiny.onnx").path


def start_server(model: Path, env: dict[str, str], log) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "runtime", "serve", "--model", str(model), "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(httpx, url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server not ready")


def wait_idle(httpx, url: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        admission = httpx.get(url + "/v1/model", timeout=10).json().get("admission", {})
        if not admission.get("admitted") and not admission.get("body_bytes_held"):
            return admission
        time.sleep(0.1)
    raise RuntimeError("server still busy")


def burst(httpx, url: str, body: bytes, clients: int) -> Counter:
    barrier, outcomes, lock = threading.Barrier(clients), Counter(), threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            barrier.wait(30)
            try:
                res = http.post(url + "/v1/analyze", content=body, headers={"content-type": "audio/wav"})
                key = f"{res.status_code} {res.json().get('error_type', 'ok')}"
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            with lock:
                outcomes[key] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    return outcomes


def measure(model: Path, clients: int, env: dict[str, str], bursts: int = 1) -> dict:
    import httpx

    max_bytes = int(env.get("PERCEPIANO_MAX_BYTES", 50 * MB))
    body = near_limit_wav(max_bytes)
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        proc, url = start_server(model, env, log)
        try:
            wait_ready(httpx, url, proc)
            small = near_limit_wav(2 * MB)
            httpx.post(url + "/v1/analyze", content=small, headers={"content-type": "audio/wav"}, timeout=120)
            wait_idle(httpx, url)
            time.sleep(1.0)
            baseline, samples, stop = rss_bytes(proc.pid), [], threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    samples.append(rss_bytes(proc.pid))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample)
            sampler.start()
            rounds = []
            for _ in range(bursts):
                t0 = time.perf_counter()
                outcomes = burst(httpx, url, body, clients)
                wall = time.perf_counter() - t0
                wait_idle(httpx, url)
                time.sleep(2.0)
                rounds.append({"outcomes": dict(outcomes), "seconds": round(wall, 1),
                               "rss_after_mb": round(rss_bytes(proc.pid) / MB, 1)})
            stop.set()
            sampler.join()
            hwm = rss_bytes(proc.pid, "VmHWM")
            limits = httpx.get(url + "/v1/model", timeout=10).json()["limits"]
        finally:
            proc.terminate()
            proc.wait(30)
    return {"clients": clients, "body_bytes": len(body), "limits": limits, "bursts": rounds,
            "rss_mb": {"baseline": round(baseline / MB, 1), "peak_sampled": round(max(samples) / MB, 1),
                       "peak_vmhwm": round(hwm / MB, 1), "after": rounds[-1]["rss_after_mb"]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.upload_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="ONNX model to serve (default: a tiny demo export)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--bursts", type=int, default=2, help="bursts in a row (RSS after each: a leak would grow)")
    parser.add_argument("--max-bytes", type=int, default=50 * MB, help="PERCEPIANO_MAX_BYTES of the server")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="more server settings")
    args = parser.parse_args(argv)
    env = {"PERCEPIANO_MAX_BYTES": str(args.max_bytes), **dict(e.split("=", 1) for e in args.env)}
    with tempfile.TemporaryDirectory() as folder:
        model = args.model or tiny_model(Path(folder))
        print(json.dumps(measure(model, args.clients, env, args.bursts), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
