"""Prometheus metrics of the HTTP service (prometheus-client), one registry per app so tests can run many apps."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

STAGES = ("queue_wait", "decode", "features", "inference")  # the timing split of one analysis
# Seconds: 1 ms .. 60 s, fine where a warm GPU request lives (10-200 ms) and coarse towards a cold CPU one.
# Per inference call (model run): windows in it, and requests whose windows it holds (cross-request batching).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Dollars per analysis (its processing seconds at the container's rate): an A10G's 0.3 s is about $0.0001
COST_BUCKETS = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
ANALYSIS_PATH = "/v1/analyze"  # requests under it are the analyses counted on arrival


class CostCollector:
    """The container's compute seconds since the service was made, the cost they imply at the price table's rate,
    the rate itself and the daily budget (when set), computed at each scrape."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.rate: tuple[str, float, str] | None = None  # (container, $/s, the table's date), once known
        self.budget: float | None = None

    def describe(self) -> list[Metric]:
        return []  # the metrics' values depend on the rate, known only once the model's device is

    def collect(self) -> Iterator[Metric]:
        seconds = time.monotonic() - self.started
        yield CounterMetricFamily("percepiano_compute_seconds",
                                  "Seconds this container has run (billed whole on Modal, idle time included)",
                                  value=seconds)
        if self.rate is not None:
            container, per_s, read_on = self.rate
            yield CounterMetricFamily("percepiano_compute_cost_usd",
                                      "What those seconds cost at the price table's rate (dollars)",
                                      value=seconds * per_s)
            price = GaugeMetricFamily("percepiano_price_usd_per_second", "The rate the cost metrics use",
                                      labels=("container", "read_on"))
            price.add_metric((container, read_on), per_s)
            yield price
        if self.budget is not None:
            yield GaugeMetricFamily("percepiano_cost_budget_usd_per_day",
                                    "The daily budget the spend alert compares with (PERCEPIANO_DAILY_BUDGET_USD)",
                                    value=self.budget)


class Metrics:
    """Counters, gauges and histograms of one service; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("percepiano_requests", "HTTP requests by route and status", ("route", "status"),
                                registry=r)
        self.latency = Histogram("percepiano_request_seconds", "Whole request time by route", ("route",),
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("percepiano_stage_seconds", "Time per analysis stage", ("stage",),
                               buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("percepiano_requests_in_flight", "Analyses running now", registry=r)
        self.waiting = Gauge("percepiano_requests_waiting", "Analyses admitted and waiting for a slot", registry=r)
        self.audio_seconds = Counter("percepiano_audio_seconds", "Seconds of audio (or spectrogram) analysed",
                                     registry=r)
        self.load_seconds = Gauge("percepiano_model_load_seconds", "Model load time (session creation)", registry=r)
        self.warmup_seconds = Gauge("percepiano_model_warmup_seconds", "Model warm-up / self-check time", registry=r)
        self.batch_chunks = Histogram("percepiano_inference_batch_chunks",
                                      "Windows (3 s chunks) per inference call, batched across requests or not",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("percepiano_inference_batch_requests",
                                        "Requests whose windows share one inference call (1: not merged)",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.model_failures = Counter("percepiano_model_failures", "Analyses whose model gave NaN or infinite scores "
                                      "(answered 500 model_failed)", registry=r)
        self.model = Info("percepiano_model", "The served model", registry=r)
        self.ready = Gauge("percepiano_model_ready", "1 once the model is loaded and warmed up, else 0", registry=r)
        self.self_check_failed = Gauge("percepiano_self_check_failed", "1 when the served model's self-check "
                                       "failed (served under PERCEPIANO_ALLOW_FAILED_SELF_CHECK)", registry=r)
        self.received = Counter("percepiano_analysis_requests_received",
                                "Analysis requests (/v1/analyze...) on arrival, before any answer", registry=r)
        self.rejections = Counter("percepiano_rejections", "503 answers by reason (busy, not_ready, model_failed)",
                                  ("reason",), registry=r)
        self.request_cost = Histogram("percepiano_request_cost_usd",
                                      "Each analysis's processing seconds at the container's rate (dollars)",
                                      buckets=COST_BUCKETS, registry=r)
        self.cost = CostCollector()
        r.register(self.cost)

    def set_model(self, *, version: str, precision: str, device: str, providers: list[str] | tuple[str, ...]) -> None:
        self.model.info({"version": version, "precision": precision, "device": device,
                         "providers": ",".join(providers)})

    def set_price(self, rate: tuple[str, float, str], budget_usd_per_day: float | None) -> None:
        """The container's (name, dollars per second, table date) and the daily budget, for the cost metrics."""
        self.cost.rate, self.cost.budget = rate, budget_usd_per_day

    def arrived(self, path: str) -> None:
        """A request arrived (counted before any answer, so a service that stops answering shows)."""
        if path.startswith(ANALYSIS_PATH):
            self.received.inc()

    def observe_request(self, route: str, status: int, seconds: float, error_type: str | None = None) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)
        if status == 503:
            self.rejections.labels(reason=error_type or "unknown").inc()

    def observe_analysis(self, timings: Mapping[str, float], audio_seconds: float | None,
                         processing_seconds: float | None = None) -> None:
        for stage in STAGES:
            if stage in timings:
                self.stage.labels(stage=stage).observe(timings[stage])
        if audio_seconds:
            self.audio_seconds.inc(audio_seconds)
        if processing_seconds is not None and self.cost.rate is not None:
            self.request_cost.observe(processing_seconds * self.cost.rate[1])

    def observe_inference(self, chunks: int, requests: int = 1) -> None:
        """One inference call of `chunks` windows from `requests` requests."""
        self.batch_chunks.observe(chunks)
        self.batch_requests.observe(requests)

    def render(self) -> tuple[bytes, str]:
        """The exposition-format body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
