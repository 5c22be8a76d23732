"""What a request costs on Modal: per request and per month, from measured (or plainly estimated) timings.

Arrivals are modelled as a Poisson process over a 30-day month. A container stays up for the scale-down
window after its last request, so each request pays its own processing, the idle time until the next
request or the window's end (whichever comes first), and, when the gap exceeded the window, the next
request's cold start. With a mean gap m and a window W: idle = m (1 - e^(-W/m)), cold share = e^(-W/m).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

PRICES = Path(__file__).with_name("prices.json")
MONTH_S = 30 * 86400
VOLUMES = (1000, 10000)  # requests per month, as the original's estimates


def load_prices(path: Path = PRICES) -> dict:
    return json.loads(Path(path).read_text())


def rate_per_s(container: dict, rates: dict) -> float:
    """Dollars per second of one running container: GPU + CPU cores + memory."""
    gpu = rates["gpu_per_s"][container["gpu"]] if container.get("gpu") else 0.0
    return gpu + container["cpu_cores"] * rates["cpu_core_per_s"] + container["memory_gib"] * rates["memory_gib_per_s"]


def billed_seconds(requests_per_month: int, cold_s: float, warm_s: float, window_s: float) -> dict:
    """Expected container seconds billed per request (see the module docstring)."""
    gap = MONTH_S / requests_per_month
    stay = math.exp(-window_s / gap)  # probability that the next request finds no container
    idle = gap * (1.0 - stay)
    return {"cold_share": stay, "idle_s": idle, "billed_s": warm_s + idle + stay * cold_s}


def cost_rows(timings: dict[str, dict], prices: dict, volumes=VOLUMES) -> list[dict]:
    """One row per container kind and monthly volume. `timings[kind]` = {cold_s, warm_s, measured, how}."""
    rows = []
    for kind, t in timings.items():
        container = prices["containers"][kind]
        rate = rate_per_s(container, prices["rates"])
        window = container["scaledown_window_s"]
        for n in volumes:
            b = billed_seconds(n, t["cold_s"], t["warm_s"], window)
            rows.append({
                "container": kind, "requests_per_month": n, "measured": t["measured"], "how": t["how"],
                "cold_s": t["cold_s"], "warm_s": t["warm_s"], "scaledown_window_s": window,
                "usd_per_s": rate, "cold_share": b["cold_share"], "billed_s_per_request": b["billed_s"],
                "usd_warm_request": rate * t["warm_s"],
                "usd_cold_request": rate * (t["cold_s"] + t["warm_s"] + window),
                "usd_per_request": rate * b["billed_s"], "usd_per_month": rate * b["billed_s"] * n,
            })
    return rows


def timings_from_results(results: dict, prices: dict) -> dict[str, dict]:
    """Cold and warm seconds of one 30 s request per container kind, from a benchmark results document."""
    variants, out = results["variants"], {}
    cpu = next((variants[n] for n in ("ort-int8", "ort-fp32") if variants.get(n, {}).get("cold")), None)
    if cpu is not None:
        out["modal-cpu"] = {"cold_s": cpu["cold"]["total_s"], "warm_s": _warm_request_s(cpu), "measured": True,
                            "how": f"measured here: {cpu['description'].split(';')[0]}, cold = fresh process to "
                                   "scores, warm = features + batch-15 inference p50"}
    gpu = next((variants[n] for n in ("ort-fp16", "ort-fp32") if variants.get(n, {}).get("device") == "cuda"), None)
    if gpu is not None:
        out["modal-a10g"] = {"cold_s": gpu["cold"]["total_s"], "warm_s": _warm_request_s(gpu), "measured": True,
                             "how": f"measured on {results.get('machine', {}).get('gpu', 'this GPU')}, not an A10G"}
    elif cpu is not None:
        est = prices["gpu_estimate"]
        flops = results["flops_per_chunk"]["total"] * results["input"]["chunks"]
        features = cpu["cold"]["phases"].get("features", 0.0)
        out["modal-a10g"] = {"cold_s": est["cold_start_s"],
                             "warm_s": features + flops / (est["effective_tflops"] * 1e12),
                             "measured": False, "how": "ESTIMATE: " + est["how"]}
    return out


def _warm_request_s(variant: dict) -> float:
    """Decode + features (from the cold run) + warm inference of the clip's 15 chunks (p50)."""
    warm = variant.get("warm", {})
    batch = warm.get("15") or warm.get(15) or next(iter(warm.values()), None)
    features = variant["cold"]["phases"].get("features", 0.0)
    return features + (batch["p50_s"] if batch else variant["cold"]["phases"].get("first_inference", 0.0))


def cost_section(results: dict, prices: dict | None = None) -> dict:
    """The `cost` section of a results document: the price table used and one row per container and volume."""
    prices = prices or load_prices()
    rows = cost_rows(timings_from_results(results, prices), prices)
    return {"prices": prices, "rows": rows, "markdown": markdown(rows, prices) if rows else "no timings to price"}


def markdown(rows: list[dict], prices: dict) -> str:
    """The cost table with the original's estimates beside it."""
    orig = prices["original_estimates"]
    lines = [f"Prices read on {prices['read_on']} ({prices['currency']}); {prices['note']}",
             "", "| container | requests/month | timings | cold s | warm s | cold share | $/request | $/month "
             "| original's $/month |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['container']} | {r['requests_per_month']:,} | {'measured' if r['measured'] else 'ESTIMATE'}"
                     f" | {r['cold_s']:.2f} | {r['warm_s']:.3f} | {r['cold_share']:.0%} | {r['usd_per_request']:.5f}"
                     f" | {r['usd_per_month']:.2f} | {orig['per_month_usd'].get(str(r['requests_per_month']), '-')} |")
    lo, hi = orig["per_request_usd"]
    lines += ["", f"The original's own estimate: ${lo:.2f}-{hi:.2f} per request ({orig['source']}).", ""]
    lines += [f"- {kind}: {how}" for kind, how in {r["container"]: r["how"] for r in rows}.items()]
    return "\n".join(lines)
