"""Throughput against concurrency, with cross-request batching off and on, through the Service (not HTTP).

`python -m benchmarks.concurrency --model M.onnx [--clip A.flac] [--levels 1,2,4,8]`

At each concurrency level N, N clients each send `rounds` requests one after another (the same clip's
bytes: decode, features and inference all run, as in the service) to a Service whose pool runs N analyses
at once; once with PERCEPIANO_BATCH_WAIT_MS=0 (off) and once with the wait on (10 ms by default). Reported
per level and mode: requests/s, chunks/s, median latency, and the mean windows and requests per inference
call (the service's own histograms). On the CPU batching is no gain: onnxruntime already keeps the cores
busy at a request's own batch, and the batcher runs one inference at a time where the pool would run several
side by side (on 2 shared cores: neutral for one client, slower with four); the table is the ready
comparison for a GPU run (`--device cuda`), where one larger call costs little more than a smaller one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from benchmarks.artifacts import PIANO_CLIPS
from benchmarks.cold import PROGRESS_PREFIX
from runtime.analyze import Analyzer
from runtime.audio import load_audio
from runtime.constants import FEATURES
from runtime.serve.service import Service, warm_up
from runtime.serve.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LEVELS = (1, 2, 4, 8)
WAIT_MS = 10.0


def default_clip() -> Path:
    clips = sorted(PIANO_CLIPS.glob("*.flac"))
    if not clips:
        raise SystemExit(f"no --clip given and no piano clips in {PIANO_CLIPS}")
    return clips[0]


async def _load(service: Service, data: bytes, clients: int, rounds: int) -> list[float]:
    """`clients` concurrent clients, `rounds` requests each; the latency of every request."""
    latencies: list[float] = []

    async def client() -> None:
        for _ in range(rounds):
            t0 = time.perf_counter()
            await service.run(partial(service.analyze_audio, data))
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


def _mean_of(service: Service, name: str) -> float | None:
    registry = service.metrics.registry
    count = registry.get_sample_value(f"{name}_count") or 0.0
    return (registry.get_sample_value(f"{name}_sum") or 0.0) / count if count else None


def measure_level(analyzer: Analyzer, data: bytes, clients: int, rounds: int, wait_ms: float,
                  max_batch_chunks: int, cap_seconds: float | None) -> dict:
    """One concurrency level in one mode (wait_ms 0: batching off)."""
    settings = Settings(max_concurrency=clients, max_queue=clients, queue_timeout=600.0, batch_wait_ms=wait_ms,
                        max_batch_chunks=max_batch_chunks, refuse_over_seconds=None, cap_seconds=cap_seconds)
    service = Service(analyzer, settings)
    service.start()  # over a warmed analyzer: ready at once
    try:
        asyncio.run(_load(service, data, clients, 1))  # untimed: each pool thread's first run
        chunks_before = service.metrics.registry.get_sample_value("percepiano_inference_batch_chunks_sum") or 0.0
        t0 = time.perf_counter()
        latencies = asyncio.run(_load(service, data, clients, rounds))
        wall = time.perf_counter() - t0
        chunks = (service.metrics.registry.get_sample_value("percepiano_inference_batch_chunks_sum") or 0.0) \
            - chunks_before
        return {"concurrency": clients, "batching": "on" if wait_ms > 0 else "off", "wait_ms": wait_ms,
                "requests": len(latencies), "wall_s": wall, "requests_per_s": len(latencies) / wall,
                "chunks_per_s": chunks / wall, "median_latency_s": statistics.median(latencies),
                "chunks_per_call": _mean_of(service, "percepiano_inference_batch_chunks"),
                "requests_per_call": _mean_of(service, "percepiano_inference_batch_requests")}
    finally:
        service.close()


def concurrency_section(model_path: str | Path, audio_path: str | Path | None = None, cpus: int | None = None,
                        levels: Sequence[int] = DEFAULT_LEVELS, *, rounds: int = 4, wait_ms: float = WAIT_MS,
                        max_batch_chunks: int = 32, device: str = "cpu", cap_seconds: float | None = 30.0,
                        progress=None) -> dict:
    """Throughput and median latency per concurrency level, batching off and on (see the module doc)."""
    if not levels or min(levels) < 1 or rounds < 1:
        raise ValueError(f"levels must be >= 1 and rounds >= 1, got {list(levels)} and {rounds}")
    audio_path = Path(audio_path) if audio_path else default_clip()
    analyzer = Analyzer.from_path(model_path, device=device, threads=cpus, refuse_over_seconds=None)
    warm_up(analyzer)
    data = audio_path.read_bytes()
    chunks = len(analyzer.analyze_audio(load_audio(data, cap_seconds=cap_seconds, refuse_over_seconds=None),
                                        FEATURES.sample_rate).timeline)
    rows = []
    for level in levels:
        for wait in (0.0, wait_ms):
            if progress:
                progress(f"concurrency {level}, batching {'on' if wait else 'off'}")
            rows.append(measure_level(analyzer, data, level, rounds, wait, max_batch_chunks, cap_seconds))
    return {"model": str(model_path), "precision": analyzer.model.info.precision, "device": analyzer.model.device,
            "clip": audio_path.name, "chunks_per_request": chunks, "cpus": cpus, "rounds": rounds,
            "wait_ms": wait_ms, "max_batch_chunks": max_batch_chunks, "batch_size": analyzer.batch_size,
            "levels": rows}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_concurrency(section: dict) -> str:
    """The section as a markdown table, one row per level and mode."""
    head = (f"Concurrency ({section['precision']} on {section['device']}, {section['cpus'] or 'all'} CPUs, "
            f"{section['chunks_per_request']} chunks per request, batching wait {section['wait_ms']:g} ms, "
            f"at most {section['max_batch_chunks']} chunks per call)\n\n")
    lines = ["| clients | batching | requests/s | chunks/s | median latency (ms) | chunks/call | requests/call |",
             "|---:|:---|---:|---:|---:|---:|---:|"]
    for r in section["levels"]:
        lines.append(f"| {r['concurrency']} | {r['batching']} | {r['requests_per_s']:.2f} | {r['chunks_per_s']:.1f} | "
                     f"{r['median_latency_s'] * 1000:.1f} | {_fmt(r['chunks_per_call'], '.1f')} | "
                     f"{_fmt(r['requests_per_call'], '.2f')} |")
    return head + "\n".join(lines)


def concurrency_table(section: dict) -> tuple[str, list[str], list[list[str]]]:
    """The section as a benchmark table (benchmarks.report): title, headers, rows."""
    headers = ["clients", "batching", "requests/s", "chunks/s", "median latency ms", "chunks/call", "requests/call"]
    rows = [[str(r["concurrency"]), str(r["batching"]), f"{r['requests_per_s']:.2f}", f"{r['chunks_per_s']:.1f}",
             f"{r['median_latency_s'] * 1000:.0f}", _fmt(r["chunks_per_call"], ".1f"),
             _fmt(r["requests_per_call"], ".2f")] for r in section["levels"]]
    title = (f"Throughput against concurrency, cross-request batching off and on ({section['precision']} on "
             f"{section['device']}, {section['chunks_per_request']} chunks per request, "
             f"wait {section['wait_ms']:g} ms, "
             f"{section['rounds']} requests per client; python -m benchmarks.concurrency)")
    return title, headers, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.concurrency", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="an exported ONNX model")
    parser.add_argument("--clip", type=Path, help="audio file (default: the first piano clip of tests/data/piano)")
    parser.add_argument("--levels", default=",".join(map(str, DEFAULT_LEVELS)), help="concurrency levels")
    parser.add_argument("--rounds", type=int, default=4, help="requests per client per level (default %(default)s)")
    parser.add_argument("--cpus", type=int, help="onnxruntime intra-op threads (default: onnxruntime's choice)")
    parser.add_argument("--wait-ms", type=float, default=WAIT_MS, help="batching wait when on (default %(default)s)")
    parser.add_argument("--max-batch-chunks", type=int, default=32, help="chunks per merged call, at most")
    parser.add_argument("--cap-seconds", type=float, default=30.0, help="analyse the first N s (0: whole clip)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument("--json", action="store_true", help="print the section as one JSON line (benchmarks.run)")
    args = parser.parse_args(argv)
    try:
        levels = [int(v) for v in args.levels.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--levels must be comma-separated integers, got {args.levels!r}")
    section = concurrency_section(args.model, args.clip, args.cpus, levels, rounds=args.rounds, wait_ms=args.wait_ms,
                                  max_batch_chunks=args.max_batch_chunks, device=args.device,
                                  cap_seconds=args.cap_seconds or None,
                                  progress=lambda msg: print(PROGRESS_PREFIX + msg, file=sys.stderr, flush=True))
    print(json.dumps(section) if args.json else format_concurrency(section), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
