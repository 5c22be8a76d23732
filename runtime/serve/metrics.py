"""Prometheus metrics of the HTTP service (prometheus-client), one registry per app so tests can run many apps."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

STAGES = ("queue_wait", "decode", "features", "inference")  # the timing split of one analysis
# Seconds: 1 ms .. 60 s, fine where a warm GPU request lives (10-200 ms) and coarse towards a cold CPU one.
# Per inference call (model run): windows in it, and requests whose windows it holds (cross-request batching).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


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

    def set_model(self, *, version: str, precision: str, device: str, providers: list[str] | tuple[str, ...]) -> None:
        self.model.info({"version": version, "precision": precision, "device": device,
                         "providers": ",".join(providers)})

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def observe_analysis(self, timings: Mapping[str, float], audio_seconds: float | None) -> None:
        for stage in STAGES:
            if stage in timings:
                self.stage.labels(stage=stage).observe(timings[stage])
        if audio_seconds:
            self.audio_seconds.inc(audio_seconds)

    def observe_inference(self, chunks: int, requests: int = 1) -> None:
        """One inference call of `chunks` windows from `requests` requests."""
        self.batch_chunks.observe(chunks)
        self.batch_requests.observe(requests)

    def render(self) -> tuple[bytes, str]:
        """The exposition-format body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
