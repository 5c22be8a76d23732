"""What the open-loop load test (benchmarks.load) sends and how it reads the answers: realistic recordings, Poisson
arrival times, the server's /metrics and memory, the per-rate summary, the knee and the Modal settings from it."""

from __future__ import annotations

import io
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CLIPS = REPO / "convert" / "clips"
RATE = 44_100  # recordings are sent as a phone or a DAW writes them, not at the model's 22,050 Hz
FORMATS = {"wav": ("WAV", "PCM_16", "audio/wav"), "flac": ("FLAC", "PCM_16", "audio/flac"),
           "ogg": ("OGG", "VORBIS", "audio/ogg"), "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg")}
MAX_REQUESTS = 20_000  # per rate: a bound on the loop whatever rate x duration asks


@dataclass(frozen=True)
class Recording:
    name: str
    data: bytes
    content_type: str
    seconds: float


def make_recordings(clip_dirs: list[Path], n: int, min_seconds: float, max_seconds: float, formats: list[str],
                    seed: int) -> list[Recording]:
    """`n` recordings of min..max s (uniform), each real clips one after another (at random), resampled to
    44,100 Hz and encoded in one of `formats` in turn."""
    import soundfile as sf

    from runtime.audio import load_audio

    paths = sorted(p for d in clip_dirs for p in Path(d).glob("*.flac"))
    if not paths:
        raise SystemExit(f"no .flac clips in {', '.join(map(str, clip_dirs))}")
    clips = [load_audio(p, sample_rate=RATE) for p in paths]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        seconds = rng.uniform(min_seconds, max_seconds)
        parts, total = [], 0
        while total < seconds * RATE:
            parts.append(rng.choice(clips))
            total += len(parts[-1])
        y = np.concatenate(parts)[: int(seconds * RATE)]
        fmt = formats[i % len(formats)]
        container, subtype, content_type = FORMATS[fmt]
        buf = io.BytesIO()
        sf.write(buf, y, RATE, format=container, subtype=subtype)
        out.append(Recording(f"rec{i:02d}.{fmt}", buf.getvalue(), content_type, round(seconds, 2)))
    return out


def arrivals(rate: float, duration: float, rng: random.Random) -> list[float]:
    """Poisson arrival times in [0, duration): exponential gaps of mean 1/rate (at most MAX_REQUESTS)."""
    times, t = [], rng.expovariate(rate)
    while t < duration and len(times) < MAX_REQUESTS:
        times.append(t)
        t += rng.expovariate(rate)
    return times


# ---------------------------------------------------------------------------------------------- the server's side


def batch_counts(metrics_text: str) -> dict[str, float]:
    """Inference calls, windows and request-slots in them so far, from /metrics' batch histograms."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {"calls": 0.0, "windows": 0.0, "requests": 0.0}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "percepiano_inference_batch_chunks_count":
                out["calls"] = sample.value
            elif sample.name == "percepiano_inference_batch_chunks_sum":
                out["windows"] = sample.value
            elif sample.name == "percepiano_inference_batch_requests_sum":
                out["requests"] = sample.value
    return out


def rss_mb(pid: int | None) -> float | None:
    """The process's resident memory now (MB), from /proc; None without a local pid."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------------------- summaries


@dataclass
class RateResult:
    """One rate's run: what was sent, how it was answered, and what the server did meanwhile."""

    rate: float
    duration: float
    sent: int
    ok: int
    busy: int
    errors: int
    throughput: float  # successful answers per second, first arrival to last answer
    p50: float | None
    p95: float | None
    p99: float | None
    mean: float | None
    peak_rss_mb: float | None
    calls: float
    windows_per_call: float | None
    requests_per_call: float | None
    error_kinds: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(rate: float, duration: float, answers: list[tuple[float, int, str | None]], span: float,
              before: dict[str, float], after: dict[str, float], peak_rss: float | None) -> RateResult:
    """answers: (latency from the scheduled send, status, error_type) per request; span: first arrival to last
    answer (s); before/after: batch_counts around the run."""
    ok = [lat for lat, status, _ in answers if status == 200]
    busy = sum(1 for _, status, kind in answers if status == 503 and kind == "busy")
    kinds: dict[str, int] = {}
    for _, status, kind in answers:
        if status != 200 and not (status == 503 and kind == "busy"):
            kinds[f"{status} {kind}"] = kinds.get(f"{status} {kind}", 0) + 1
    pct = (lambda q: round(float(np.percentile(ok, q)), 4)) if ok else (lambda q: None)
    calls = after["calls"] - before["calls"]
    per_call = (lambda key: round((after[key] - before[key]) / calls, 2)) if calls else (lambda key: None)
    return RateResult(rate=rate, duration=duration, sent=len(answers), ok=len(ok), busy=busy,
                      errors=sum(kinds.values()), throughput=round(len(ok) / span, 4) if span > 0 else 0.0,
                      p50=pct(50), p95=pct(95), p99=pct(99), mean=round(float(np.mean(ok)), 4) if ok else None,
                      peak_rss_mb=None if peak_rss is None else round(peak_rss, 1), calls=calls,
                      windows_per_call=per_call("windows"), requests_per_call=per_call("requests"), error_kinds=kinds)


def knee(results: list[RateResult], idle_p50: float) -> RateResult | None:
    """The highest rate whose p99 stays under twice the idle p50, every request answered 200 (no busy, no error)."""
    good = [r for r in results if r.sent and r.busy == 0 and r.errors == 0 and r.p99 is not None
            and r.p99 < 2 * idle_p50]
    return max(good, key=lambda r: r.rate, default=None)


def modal_settings(knee_rate: float, knee_mean: float, idle_p50: float, cores: float, analyses_at_once: int,
                   container_cores: float, container_memory_gib: float, prices: dict) -> dict:
    """Modal's settings for a container of `container_cores`, from the knee measured on `cores` cores.

    Throughput is taken to scale with cores (the knee per core, times the container's cores): then, by Little's
    law, `target_inputs` is the requests in flight at the knee (rate x mean latency), where Modal should add a
    container; `max_inputs` those in flight at the knee rate when each takes the knee's latency bound (2 x the idle
    p50), the most a container holds before latency breaks; analyses at once keep the measured per-core share.
    The per-request cost is the container's price per second over the requests it serves per second at the knee.
    """
    per_core = knee_rate / cores
    rate = per_core * container_cores
    target = max(1, math.ceil(rate * knee_mean))
    most = max(target + 1, math.ceil(rate * 2 * idle_p50))
    rates = prices["rates"]
    per_second = container_cores * rates["cpu_core_per_s"] + container_memory_gib * rates["memory_gib_per_s"]
    return {"knee_per_core": round(per_core, 4), "container_rate": round(rate, 4),
            "max_inputs": most, "target_inputs": target,
            "analyses_at_once": max(1, round(analyses_at_once / cores * container_cores)),
            "usd_per_request": round(per_second / rate, 7) if rate > 0 else None,
            "usd_per_1000": round(1000 * per_second / rate, 4) if rate > 0 else None}
