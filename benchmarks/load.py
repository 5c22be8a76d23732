"""Open-loop load test of the HTTP service: Poisson arrivals of realistic recordings, latency from the schedule.

    python -m benchmarks.load --url http://127.0.0.1:8000 --rate 0.5 --duration 60 [--server-pid PID]
    python -m benchmarks.load --serve /work/prod/model.onnx --sweep auto --duration 30 --json out.json

Requests leave at Poisson arrival times whatever the server answers (open loop: a slow server cannot slow the
arrivals down and hide its own latency), and each latency is measured from the request's scheduled time, not
from when it was sent. The recordings are real clips (convert/clips, plus `--clips DIR`) one after another,
5 to 60 s, at 44,100 Hz, in wav, flac, ogg and mp3 in turn. Per rate: p50/p95/p99 latency of the answered
requests, throughput, the share of 503 `busy` and of other errors, the server's peak RSS (its pid: `--serve`
starts one itself, or `--server-pid`), and the windows and requests per inference call from its /metrics.

`--sweep auto` first measures the idle p50 (requests one at a time), then runs rates up to the estimated capacity
(1 / the idle mean) and reports the knee: the highest rate whose p99 stays under twice the idle p50 with no
busy and no error; from it, per core, the Modal settings (benchmarks.load_inputs.modal_settings). Only
loopback servers are loaded; every loop and wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from benchmarks.load_inputs import (
    REPO,
    SHIPPED_CLIPS,
    RateResult,
    Recording,
    arrivals,
    batch_counts,
    knee,
    make_recordings,
    modal_settings,
    rss_mb,
    summarize,
)
from runtime.serve.prices import load_prices

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SWEEP_FRACTIONS = (0.3, 0.6, 0.9, 1.2)  # of the estimated capacity
IDLE_REQUESTS = 6


async def send(client, url: str, rec: Recording, headers: dict) -> tuple[int, str | None]:
    try:
        res = await client.post(url + "/v1/analyze", content=rec.data,
                                headers={**headers, "content-type": rec.content_type})
    except Exception as exc:  # noqa: BLE001  (a transport error or timeout is an answer too: counted as an error)
        return 0, type(exc).__name__
    if res.status_code == 200:
        return 200, None
    try:
        return res.status_code, res.json().get("error_type")
    except ValueError:
        return res.status_code, "not_json"


async def run_rate(url: str, rate: float, duration: float, recordings: list[Recording], *, seed: int,
                   headers: dict, timeout: float, pid: int | None) -> RateResult:
    """Send Poisson arrivals at `rate` for `duration` s; wait (at most `timeout`) for the last answers."""
    import httpx

    rng = random.Random(seed)
    schedule = arrivals(rate, duration, rng)
    picks = [rng.randrange(len(recordings)) for _ in schedule]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        before = batch_counts((await client.get(url + "/metrics", headers=headers)).text)
        peak, stop = [rss_mb(pid)], asyncio.Event()

        async def sample_rss() -> None:
            while not stop.is_set():
                now = rss_mb(pid)
                if now is not None:
                    peak.append(now)
                await asyncio.sleep(0.1)

        async def timed(at: float, rec: Recording) -> tuple[float, int, str | None]:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            status, kind = await send(client, url, rec, headers)
            return time.monotonic() - (start + at), status, kind

        sampler = asyncio.create_task(sample_rss())
        start = time.monotonic()
        answers = await asyncio.gather(*(timed(at, recordings[i]) for at, i in zip(schedule, picks, strict=True)))
        span = time.monotonic() - start - (schedule[0] if schedule else 0.0)
        stop.set()
        await sampler
        after = batch_counts((await client.get(url + "/metrics", headers=headers)).text)
    rss = [p for p in peak if p is not None]
    return summarize(rate, duration, list(answers), span, before, after, max(rss) if rss else None)


async def idle_latencies(url: str, recordings: list[Recording], n: int, headers: dict, timeout: float) -> list[float]:
    """Latencies of `n` requests sent one at a time (nothing else in flight): the idle baseline."""
    import httpx

    out = []
    async with httpx.AsyncClient(timeout=timeout) as client:
        for i in range(n):
            t0 = time.monotonic()
            status, kind = await send(client, url, recordings[i % len(recordings)], headers)
            if status != 200:
                raise SystemExit(f"the idle request failed: {status} {kind}")
            out.append(time.monotonic() - t0)
    return out


def start_server(model: Path, env: dict[str, str]):
    """`python -m runtime serve` on a free loopback port; (url, process)."""
    import socket
    import subprocess
    import tempfile

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "serve", "--model", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "--device", "cpu"], cwd=REPO, env={**os.environ, **env},
                            stdout=tempfile.TemporaryFile(), stderr=subprocess.STDOUT)  # its log: not our output
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return url, proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the server was not ready within 300 s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server (loopback only)")
    where.add_argument("--serve", type=Path, metavar="MODEL", help="start `python -m runtime serve` on MODEL")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--rate", type=float, help="requests per second (Poisson arrivals)")
    what.add_argument("--sweep", help="'auto', or rates separated by commas; reports the knee")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per rate (default 30)")
    p.add_argument("--recordings", type=int, default=12, help="distinct recordings to draw from (default 12)")
    p.add_argument("--min-seconds", type=float, default=5.0)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--formats", default="wav,flac,ogg,mp3")
    p.add_argument("--clips", type=Path, action="append", default=[], help="more folders of .flac clips")
    p.add_argument("--server-pid", type=int, help="the server's pid, for its peak RSS (with --url)")
    p.add_argument("--token", default=os.environ.get("PERCEPIANO_API_TOKEN"))
    p.add_argument("--timeout", type=float, default=120.0, help="per request (s)")
    p.add_argument("--container-cores", type=float, default=4.0, help="the Modal CPU container's cores")
    p.add_argument("--container-memory-gib", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args(argv)
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"--url {args.url}: only loopback servers ({', '.join(LOOPBACK)}) are load-tested by this tool")
    if not 0 < args.min_seconds <= args.max_seconds or (args.rate is not None and not args.rate > 0):
        p.error("need 0 < --min-seconds <= --max-seconds and --rate > 0")
    return args


def sweep_rates(spec: str, idle_mean: float) -> list[float]:
    if spec == "auto":
        return [round(f / idle_mean, 4) for f in SWEEP_FRACTIONS]
    return [float(r) for r in spec.split(",")]


def _cell(v: float | None) -> str:
    return "   -  " if v is None else f"{v:6.2f}"


def table(results: list[RateResult]) -> list[str]:
    lines = ["rate/s  sent   ok  p50 s  p95 s  p99 s  busy%  err%  thru/s  rss MB  win/call  req/call"]
    f = _cell
    for r in results:
        lines.append(f"{r.rate:6.3f} {r.sent:5d} {r.ok:4d} {f(r.p50)} {f(r.p95)} {f(r.p99)} "
                     f"{100 * r.busy / max(r.sent, 1):6.1f} {100 * r.errors / max(r.sent, 1):5.1f} "
                     f"{r.throughput:7.3f} {f(r.peak_rss_mb)} {f(r.windows_per_call)} {f(r.requests_per_call)}")
    return lines


async def measure(args: argparse.Namespace, url: str, pid: int | None) -> dict:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    recordings = make_recordings([SHIPPED_CLIPS, *args.clips], args.recordings, args.min_seconds, args.max_seconds,
                                 args.formats.split(","), args.seed)
    out: dict = {"url": url, "recordings": [{"name": r.name, "seconds": r.seconds, "bytes": len(r.data)}
                                            for r in recordings], "cores": os.cpu_count()}
    if args.rate is not None:
        rates, idle = [args.rate], None
    else:
        idle = await idle_latencies(url, recordings, IDLE_REQUESTS, headers, args.timeout)
        out["idle"] = {"p50": round(float(np.median(idle)), 4), "mean": round(float(np.mean(idle)), 4)}
        rates = sweep_rates(args.sweep, float(np.mean(idle)))
    results = []
    for i, rate in enumerate(rates):
        results.append(await run_rate(url, rate, args.duration, recordings, seed=args.seed + i, headers=headers,
                                      timeout=args.timeout, pid=pid))
        print("\n".join(table(results)[-1:] if i else table(results)), file=sys.stderr, flush=True)
        if idle and results[-1].p99 is not None and results[-1].p99 > 6 * out["idle"]["p50"]:
            break  # far past the knee: higher rates only queue more
    out["results"] = [r.to_dict() for r in results]
    if idle:
        best = knee(results, out["idle"]["p50"])
        out["knee"] = best.to_dict() if best else None
        if best is not None:
            prices = load_prices()
            at_once = int(os.environ.get("PERCEPIANO_MAX_CONCURRENCY", "2"))
            out["modal"] = modal_settings(best.rate, best.mean, out["idle"]["p50"], os.cpu_count() or 1, at_once,
                                          args.container_cores, args.container_memory_gib, prices)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    proc = None
    url, pid = args.url, args.server_pid
    if args.serve is not None:
        url, proc = start_server(args.serve, {})
        pid = proc.pid
    try:
        out = asyncio.run(measure(args, url.rstrip("/"), pid))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print("\n".join(table([RateResult(**r) for r in out["results"]])))
    for key in ("idle", "knee", "modal"):
        if key in out:
            print(f"{key}: {json.dumps(out[key])}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
