"""What a request costs on Modal: per request and per month, from measured (or plainly estimated) timings.

Arrivals are modelled as a Poisson process over a 30-day month. A container stays up for the scale-down
window after its last request, so each request pays its own processing, the idle time until the next
request or the window's end (whichever comes first), and, when the gap exceeded the window, the next
request's cold start. With a mean gap m and a window W: idle = m (1 - e^(-W/m)), cold share = e^(-W/m).

A warm schedule (deploy/schedule.py, `price_schedule`) pays its warm container-hours whole; the requests inside
them find a warm container (no cold start, no idle time of their own), the others are priced as above over the
hours outside. The price table is the service's (runtime/serve/prices.json), which its cost metrics read too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import UTC, datetime, timedelta

from runtime.serve.prices import PRICES_PATH as PRICES
from runtime.serve.prices import load_prices, rate_per_s

MONTH_S = 30 * 86400
VOLUMES = (1000, 10000)  # requests per month, as the original's estimates
__all__ = ["PRICES", "load_prices", "rate_per_s", "billed_seconds", "cost_rows", "price_schedule"]


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


def price_schedule(schedule, start: datetime, container: str, prices: dict, *, requests_per_month: int,
                   cold_s: float, warm_s: float, peak_share: float | None = None) -> dict:
    """A month (30 days from `start`) with and without the warm schedule (a deploy.schedule.Schedule).

    `peak_share`: the share of requests that arrive inside the warm hours (None: their share of the month's
    time, i.e. requests spread evenly). Requests are Poisson inside and outside the warm hours.
    """
    c = prices["containers"][container]
    rate, window = rate_per_s(c, prices["rates"]), c["scaledown_window_s"]
    end = start + timedelta(seconds=MONTH_S)
    warm_container_h = schedule.warm_hours(start, end)
    covered_s = _covered_seconds(schedule, start, end)
    share = covered_s / MONTH_S if peak_share is None else peak_share
    base = billed_seconds(requests_per_month, cold_s, warm_s, window)
    inside = requests_per_month * share
    outside = requests_per_month - inside
    out = billed_seconds(max(outside, 1e-9) * MONTH_S / max(MONTH_S - covered_s, 1.0), cold_s, warm_s, window) \
        if outside > 0 and covered_s < MONTH_S else {"cold_share": 0.0, "billed_s": 0.0}
    # what the requests inside the warm hours would have started cold without the schedule (same gap as base)
    cold_without = requests_per_month * base["cold_share"]
    cold_with = outside * out["cold_share"]
    usd_without = requests_per_month * base["billed_s"] * rate
    usd_warm = warm_container_h * 3600 * rate
    usd_with = usd_warm + outside * out["billed_s"] * rate
    avoided = cold_without - cold_with
    return {"container": container, "usd_per_s": rate, "requests_per_month": requests_per_month,
            "warm_container_hours": warm_container_h, "warm_share_of_requests": share,
            "usd_warm_hours": usd_warm, "usd_month_without": usd_without, "usd_month_with": usd_with,
            "cold_starts_without": cold_without, "cold_starts_with": cold_with, "cold_starts_avoided": avoided,
            "usd_per_cold_start_avoided": (usd_with - usd_without) / avoided if avoided > 0 else None,
            "read_on": prices["read_on"]}


def _covered_seconds(schedule, start: datetime, end: datetime) -> float:
    """Seconds of [start, end) with at least one warm container."""
    total, at, warm = 0.0, start, schedule.warm_at(start)
    for t, n in schedule.changes(start, end):
        total += (t - at).total_seconds() if warm else 0.0
        at, warm = t, n
    return total + ((end - at).total_seconds() if warm else 0.0)


def schedule_markdown(r: dict, text: str) -> str:
    per, diff = r["usd_per_cold_start_avoided"], r["usd_month_with"] - r["usd_month_without"]
    net = (f"and cost ${diff:.2f} a month more (${per:.4f} per cold start avoided)" if diff > 0 else
           f"and save ${-diff:.2f} a month (the idle scale-down windows they replace cost more)")
    return "\n".join([
        f"Schedule `{text}` on {r['container']} (${r['usd_per_s']:.6f}/s, prices read on {r['read_on']}), "
        f"{r['requests_per_month']:,} requests/month, {r['warm_share_of_requests']:.0%} of them in the warm hours:",
        "", "| | warm container-hours | $/month | cold starts/month |", "|---|---|---|---|",
        f"| without the schedule | 0 | {r['usd_month_without']:.2f} | {r['cold_starts_without']:,.0f} |",
        f"| with it | {r['warm_container_hours']:.0f} | {r['usd_month_with']:.2f} | {r['cold_starts_with']:,.0f} |",
        "", f"The warm hours cost ${r['usd_warm_hours']:.2f}; they avoid {r['cold_starts_avoided']:,.0f} cold starts "
        + net + "."])


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.cost --schedule "mon-fri 08:00-20:00 Europe/Berlin min=1" ...`: price a schedule."""
    from deploy.schedule import ScheduleError, parse

    p = argparse.ArgumentParser(prog="python -m benchmarks.cost", description=main.__doc__)
    p.add_argument("--schedule", required=True, help="a PERCEPIANO_WARM_SCHEDULE value")
    p.add_argument("--container", default="modal-a10g", help="a container of the price table (default modal-a10g)")
    p.add_argument("--requests", type=int, default=10000, help="requests per month (default 10000)")
    p.add_argument("--cold-s", type=float, required=True, help="seconds of a cold start (container to ready)")
    p.add_argument("--warm-s", type=float, required=True, help="seconds of one request on a warm container")
    p.add_argument("--peak-share", type=float, help="share of requests inside the warm hours (default: by time)")
    p.add_argument("--month", default="2026-12", help="YYYY-MM: the 30 days priced start on its first, UTC")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        schedule = parse(args.schedule)
        start = datetime.strptime(args.month, "%Y-%m").replace(tzinfo=UTC)
    except (ScheduleError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    r = price_schedule(schedule, start, args.container, load_prices(), requests_per_month=args.requests,
                       cold_s=args.cold_s, warm_s=args.warm_s, peak_share=args.peak_share)
    print(json.dumps(r, indent=2) if args.json else schedule_markdown(r, args.schedule))
    return 0


if __name__ == "__main__":
    sys.exit(main())
