"""After a deploy, a smoke check: does the service score the shipped clips as the local runtime does (same file)?

    python -m deploy smoke URL --model M [--token T] [--clips A.flac B.flac] [--repeat 3]

Posts each clip (convert/clips/ by default) to URL/v1/analyze, compares the scores with the local runtime's on
the CPU with the same model file (fp32: 1e-4, the GPU's kernels against the CPU's; fp16 and int8: their export
gate's end-to-end tolerance), checks the model version the service reports, and reports the first request's
latency (cold, when the deployment had scaled to zero) and the warm ones'. Exit 0 all matched, 1 a mismatch,
2 the service could not be reached or refused the requests.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CLIPS = REPO / "convert" / "clips"
FP32_ATOL = 1e-4  # the GPU's fp32 kernels against the CPU's (TF32 off): the fp32 gate's 1e-5 with room
QUANTIZED_FALLBACK_ATOL = 5e-3  # the fp16/int8 gate tolerance when a model records none


class SmokeError(Exception):
    """The service could not be reached, or answered with an error."""


@dataclass
class SmokeReport:
    url: str
    model: dict[str, Any]
    served: dict[str, Any]
    atol: float
    clips: dict[str, float] = field(default_factory=dict)  # clip -> max abs difference
    latencies: list[float] = field(default_factory=list)  # seconds, in request order (the first is cold)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        warm = self.latencies[1:]
        out = [f"service    {self.url}: {self.served.get('version')} on {self.served.get('device')} "
               f"{self.served.get('providers')}",
               f"local      {self.model['version']} ({self.model['precision']}), atol {self.atol:g}"]
        out += [f"clip       {name}: max abs {diff:.3g}" for name, diff in self.clips.items()]
        if self.latencies:
            out.append(f"latency    first (cold) {self.latencies[0] * 1e3:.0f} ms; warm median "
                       f"{statistics.median(warm) * 1e3:.0f} ms over {len(warm)}" if warm else
                       f"latency    first (cold) {self.latencies[0] * 1e3:.0f} ms")
        out += [f"MISMATCH   {p}" for p in self.problems]
        out.append("PASSED" if self.passed else "FAILED")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "model": self.model, "served": self.served, "atol": self.atol, "clips": self.clips,
                "latencies_s": self.latencies, "problems": self.problems, "passed": self.passed}


def request(url: str, token: str | None, data: bytes | None = None, timeout: float = 600) -> dict[str, Any]:
    """One JSON request (POST with `data`, else GET); an HTTP error or no connection is a SmokeError."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    if data is not None:
        headers["content-type"] = "application/octet-stream"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            return json.loads(res.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()[:500].decode("utf-8", "replace")
        raise SmokeError(f"{url}: HTTP {exc.code}: {body}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise SmokeError(f"{url}: {getattr(exc, 'reason', exc)}") from None


def tolerance(info) -> float:
    """fp32: FP32_ATOL; a quantized variant: its export gate's end-to-end tolerance."""
    return FP32_ATOL if info.precision == "fp32" else info.gate_atol or QUANTIZED_FALLBACK_ATOL


def smoke(url: str, model: Path, clips: list[Path], token: str | None = None, repeat: int = 1) -> SmokeReport:
    """Post every clip `repeat` times; compare each answer with the local runtime's scores of the same file."""
    from runtime.analyze import Analyzer

    url = url.rstrip("/")
    served = request(f"{url}/v1/model", token)
    cap = (served.get("limits") or {}).get("cap_seconds")  # the service's default cap, applied locally too
    local = Analyzer.from_path(model, device="cpu", cap_seconds=cap)
    info = local.model.info
    report = SmokeReport(url, info.summary(), {k: served.get(k) for k in ("version", "precision", "device",
                                                                          "providers", "self_check")}, tolerance(info))
    if served.get("version") != info.version:
        report.problems.append(f"the service serves {served.get('version')}, the local file is {info.version}")
    for clip in clips:
        want = np.array(list(local.analyze_file(clip).scores.values()))
        data, worst = clip.read_bytes(), 0.0
        for _ in range(repeat):
            t0 = time.perf_counter()
            got = request(f"{url}/v1/analyze", token, data)
            report.latencies.append(time.perf_counter() - t0)
            scores = got.get("scores") or {}
            if list(scores) != list(local.model.info.api_keys):
                report.problems.append(f"{clip.name}: the service answered other dimensions: {list(scores)[:3]}...")
                worst = float("inf")
                continue
            worst = max(worst, float(np.abs(np.array(list(scores.values())) - want).max()))
        report.clips[clip.name] = worst
        if not worst <= report.atol:
            report.problems.append(f"{clip.name}: scores differ by {worst:.3g} (tolerance {report.atol:g})")
    return report


def shipped_clips() -> list[Path]:
    return sorted(SHIPPED_CLIPS.glob("*.flac"))
