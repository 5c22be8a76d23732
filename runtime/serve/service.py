"""The service behind the HTTP app: the loaded model, its readiness, and a bounded pool for the analyses.

Plain Python over runtime.analyze (no FastAPI types: runtime.serve.app reads the bodies): admission is
bounded (running + waiting), request bodies count against a byte budget, and a request that cannot get
a slot in time gets 503, so overload never takes the process down. runtime.serve.app builds the app on it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from runtime.analyze import Analysis, Analyzer
from runtime.audio import load_audio
from runtime.constants import FEATURES, NUM_DIMENSIONS
from runtime.errors import AudioError, InputError, ModelOutputError
from runtime.model import DEMO_NOTE
from runtime.self_check import require_passed
from runtime.serve.batcher import Batcher, BatcherClosed, run_in_batches
from runtime.serve.body import (
    BUSY_HEADERS,
    MULTIPART_SLACK,
    BodyTiming,
    ByteBudget,
    Reservation,
    ServiceError,
    audio_error,
    input_error,
    multipart_audio,
)
from runtime.serve.mel_input import max_frames_for, parse_blob, parse_json_bytes
from runtime.serve.metrics import Metrics
from runtime.serve.original_contract import success as original_success
from runtime.serve.prices import container_rate
from runtime.serve.request_log import note, request_id
from runtime.serve.settings import Settings

log = logging.getLogger(__name__)
SHUTTING_DOWN = (503, "not_ready", "the server is shutting down; retry shortly", {"Retry-After": "1"})


Source = str | os.PathLike | Analyzer | Callable[[], Analyzer]


def warm_up(analyzer: Analyzer, *, allow_failed_self_check: bool = False) -> None:
    """Warm up at batch 2 (the self-check), the analyzer's batch size and 1; a failed self-check refuses the model.

    The batch-2 run is the self-check (the export's two stored windows, compared with their stored scores),
    so the check costs no run of its own: the same shapes and windows as a warm-up without it.
    """
    if analyzer.model.info.demo:  # the start-up's one line about it (the page shows a banner, /v1/model `demo`)
        log.warning("serving a %s", DEMO_NOTE)
    t0 = time.perf_counter()
    require_passed(analyzer.model.run_self_check(), allow_failed=allow_failed_self_check)
    analyzer.model.warmup(analyzer.batch_size)
    noise = 0.01 * np.random.default_rng(0).standard_normal(int(FEATURES.hop_seconds * FEATURES.sample_rate))
    analyzer.chunk_scores(analyzer.model_inputs(noise.astype(np.float32)))  # the feature path too: 2 s, one window
    analyzer.model.warmed = True
    analyzer.model.warmup_seconds = time.perf_counter() - t0
    log.info("model warmed up in %.2f s on %s", analyzer.model.warmup_seconds, analyzer.model.device)


def model_status(analyzer: Analyzer) -> dict[str, Any]:
    """What /readyz and /v1/model say about the loaded model: where it runs and how its self-check went."""
    model = analyzer.model
    check = model.self_check.to_dict() if model.self_check else {"status": "not_run", "device": model.device}
    return {"model": model.info.summary(), "device": model.device, "providers": list(model.providers),
            "self_check": check, "demo": model.info.demo}


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Service:
    """The loaded model, its readiness, and a bounded pool that runs analyses off the event loop."""

    def __init__(self, source: Source, settings: Settings):
        self.settings = settings
        self._source = source
        self.analyzer: Analyzer | None = None
        self.failure: str | None = None
        self.ready = threading.Event()  # loaded and warmed up
        self.settled = threading.Event()  # loaded or failed
        self._loader: threading.Thread | None = None
        self._lock = threading.Lock()
        self._admitted = 0
        self._running = 0
        self.metrics = Metrics()
        self.metrics.in_flight.set_function(lambda: self._running)
        self.metrics.waiting.set_function(lambda: max(0, self._admitted - self._running))
        self.metrics.ready.set_function(lambda: float(self.ready.is_set()))
        if settings.price_container:  # named (the Modal deploy does): priced from the start, else once loaded
            self.metrics.set_price(container_rate(settings.price_container, ""), settings.daily_budget_usd)
        self.bodies = ByteBudget(settings.body_budget(MULTIPART_SLACK))
        self.executor = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="percepiano")
        self._draining = False
        self.frame_limit = max_frames_for(settings.refuse_over_seconds)
        self.batcher: Batcher | None = None  # cross-request batching, when on (set once the model is loaded)

    # --- lifecycle
    def start(self) -> None:
        """Ready at once over an already warmed Analyzer; otherwise load and warm up in a (joined) thread."""
        source = self._source
        if isinstance(source, Analyzer) and source.model.warmed:
            self._ready_with(source)
            return
        # not a daemon: the interpreter waits for it rather than exiting while onnxruntime is mid-load
        self._loader = threading.Thread(target=self.load, name="percepiano-load")
        self._loader.start()

    def load(self) -> None:
        """Load (if given a path or loader) and warm up (the self-check included)."""
        try:
            source = self._source
            if isinstance(source, Analyzer):
                analyzer = source
            elif callable(source):
                analyzer = source()
            else:
                analyzer = Analyzer.from_path(Path(source), refuse_over_seconds=self.settings.refuse_over_seconds)
            if not analyzer.model.warmed:
                warm_up(analyzer, allow_failed_self_check=self.settings.allow_failed_self_check)
            self._ready_with(analyzer)
        except Exception as exc:  # reported by /readyz; the process stays up to say so
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("model failed to load")
        finally:
            self.settled.set()

    def _ready_with(self, analyzer: Analyzer) -> None:
        model = analyzer.model
        self.metrics.load_seconds.set(model.load_seconds)
        self.metrics.warmup_seconds.set(model.warmup_seconds or 0.0)
        self.metrics.set_model(version=model.info.version, precision=model.info.precision, device=model.device,
                               providers=model.providers)
        self.metrics.self_check_failed.set(float(model.self_check is not None and model.self_check.status == "failed"))
        self.metrics.set_price(container_rate(self.settings.price_container, model.device),
                               self.settings.daily_budget_usd)
        wait_ms = self.settings.batch_wait_for(model.device)
        if wait_ms > 0:  # the worker's rule (a lone request never waits): runtime.serve.batcher
            self.batcher = Batcher(model.run, wait_ms=wait_ms, max_chunks=self.settings.max_batch_chunks,
                                   item_shape=model.input_shape, outputs=NUM_DIMENSIONS,
                                   active=lambda: self._running, observe=self.metrics.observe_inference)
        log.info("cross-request batching %s", f"on: up to {wait_ms:g} ms, {self.settings.max_batch_chunks} windows "
                 "per call" if self.batcher else "off")
        self.analyzer = analyzer
        self.ready.set()
        self.settled.set()

    def drain(self) -> None:
        """Shutdown begins: the pool takes no new analysis and cancels the queued ones (each answered 503 by `run`);
        the running ones finish."""
        if not self._draining:
            self._draining = True
            log.info("shutting down: queued analyses are answered 503, running ones finish")
        self.executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Wait for a load still in progress (never exit under onnxruntime's feet), then stop the pool."""
        if self._loader is not None:
            self._loader.join()
        self.drain()
        if self.batcher is not None:
            self.batcher.close()

    def infer(self, windows: np.ndarray) -> np.ndarray:
        """Model windows -> scores: through the batcher when batching is on, else directly in the analyzer's
        batches; every inference call is counted in the batch histograms either way."""
        analyzer = self.require_analyzer()
        if self.batcher is None:
            return run_in_batches(analyzer.model.run, windows, analyzer.batch_size, self.metrics.observe_inference)
        try:
            return self.batcher.predict(windows)
        except BatcherClosed:
            raise ServiceError(*SHUTTING_DOWN) from None

    def require_analyzer(self) -> Analyzer:
        if self.analyzer is not None:
            return self.analyzer
        if self.failure:
            raise ServiceError(503, "model_failed", f"the model failed to load: {self.failure}")
        raise ServiceError(503, "not_ready", "the model is still loading; retry shortly", {"Retry-After": "2"})

    async def wait_analyzer(self) -> Analyzer:
        """The analyzer, waiting (at most queue_timeout) for a load in progress rather than refusing at once."""
        deadline = time.monotonic() + self.settings.queue_timeout
        while not self.settled.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.require_analyzer()

    # --- bounded execution
    def check_capacity(self) -> None:
        """503 busy at once when every running and waiting place is taken (before a body is read for nothing)."""
        if self._admitted >= self.settings.max_concurrency + self.settings.max_queue:
            raise ServiceError(503, "busy", "the server is at capacity; retry shortly", BUSY_HEADERS)

    def admission(self) -> dict[str, int]:
        """Analyses admitted (running or waiting) and request-body bytes held, against their bounds."""
        return {"admitted": self._admitted, "max_admitted": self.settings.max_concurrency + self.settings.max_queue,
                "body_bytes_held": self.bodies.held, "body_bytes_budget": self.bodies.limit}

    async def run(self, job: Callable[[], Any], body: Reservation | None = None,
                  timings: dict[str, float] | None = None) -> Any:
        """Run job in the pool. At most max_concurrency run and max_queue wait; a wait past queue_timeout is 503.

        `body` (the request body's reservation, if any) is released when the job really ends; `timings`
        gets the job's queue wait.
        """
        with self._lock:
            self.check_capacity()
            self._admitted += 1
        submitted = time.perf_counter()

        def running():
            if timings is not None:
                timings["queue_wait"] = time.perf_counter() - submitted
            with self._lock:
                self._running += 1
            try:
                return job()
            finally:
                with self._lock:
                    self._running -= 1

        try:
            future = self.executor.submit(running)
        except RuntimeError:  # executor shut down
            self._release()
            raise ServiceError(*SHUTTING_DOWN) from None
        future.add_done_callback(self._release)  # the slot is freed when the work really ends, not when we stop waiting
        if body is not None:
            body.hand_off()
            future.add_done_callback(body.release)
        waiter = asyncio.wrap_future(future)
        done, _ = await asyncio.wait({waiter}, timeout=self.settings.queue_timeout)
        if not done and future.cancel():  # still queued: give up its place
            raise ServiceError(503, "busy", f"no free slot within {self.settings.queue_timeout:g} s; retry shortly",
                               BUSY_HEADERS)
        try:
            return await waiter
        except asyncio.CancelledError:  # not an Exception: the pool cancelled the queued job (shutdown), or we are
            if future.cancelled() and not _cancelling():  # cancelled ourselves (then the cancel goes on)
                raise ServiceError(*SHUTTING_DOWN) from None
            raise
        except ServiceError:
            raise
        except ModelOutputError as exc:  # the model's fault, not the client's: 500, counted
            self.metrics.model_failures.inc()
            log.error("%s", exc)
            raise ServiceError(500, "model_failed", str(exc)) from None
        except Exception:  # a bug, not a bad request: log it, answer 500, keep serving
            log.exception("analysis failed")
            raise ServiceError(500, "internal_error", "internal error while analysing; see the server log") from None

    def _release(self, _: Future | None = None) -> None:
        with self._lock:
            self._admitted -= 1

    async def admit_body(self, slack: int = 0) -> tuple[int, BodyTiming]:
        """Wait for the model and for capacity; then the size limit and timeouts a body is read under."""
        await self.wait_analyzer()
        self.check_capacity()
        s = self.settings
        return s.max_bytes + slack, BodyTiming(s.body_idle_timeout, s.body_timeout, s.body_min_rate)

    # --- the jobs (run in the pool)
    def analyze_upload(self, box: list[bytes], content_type: str, cap_seconds: float | None = None,
                       timings: dict[str, float] | None = None) -> tuple[Analysis, float]:
        """A multipart upload: unpack the field `audio` here, in the pool, then drop the body (`box` holds it)."""
        data = multipart_audio(box.pop(), content_type, self.settings.max_bytes)
        return self.analyze_audio(data, cap_seconds, timings)

    def analyze_audio(self, data: bytes, cap_seconds: float | None = None,
                      timings: dict[str, float] | None = None) -> tuple[Analysis, float]:
        """Decode and score; ``cap_seconds`` (the request's, else the setting's) analyses only the first N s."""
        analyzer = self.require_analyzer()
        timings = {} if timings is None else timings
        t0 = time.perf_counter()
        try:
            cap = self.settings.cap_seconds if cap_seconds is None else cap_seconds
            y = load_audio(data, cap_seconds=cap, refuse_over_seconds=self.settings.refuse_over_seconds)
            timings["decode"] = time.perf_counter() - t0
            return analyzer.analyze_audio(y, FEATURES.sample_rate, timings, self.infer), time.perf_counter() - t0
        except AudioError as exc:
            raise audio_error(exc) from None
        except InputError as exc:
            raise input_error(exc) from None

    def analyze_mel(self, data: bytes, kind: str, timings: dict[str, float] | None = None) -> tuple[Analysis, float]:
        analyzer = self.require_analyzer()
        timings = {} if timings is None else timings
        t0 = time.perf_counter()
        try:
            if kind == "json":
                mel = parse_json_bytes(data, max_frames=self.frame_limit)
            else:
                mel = parse_blob(data, max_frames=self.frame_limit)
            timings["decode"] = time.perf_counter() - t0  # parsing the body: this route's decode
            return analyzer.analyze_mel(mel, timings, self.infer), time.perf_counter() - t0
        except InputError as exc:
            raise input_error(exc) from None

    def result(self, scope: Mapping[str, Any], analysis: Analysis, seconds: float, timings: dict[str, float],
               fmt: str) -> dict[str, Any]:
        """The answer in the format asked for; the analysis is counted in the metrics and the request log."""
        assert self.analyzer is not None
        self.metrics.observe_analysis(timings, analysis.duration_seconds, seconds)
        note(scope, audio_seconds=analysis.duration_seconds, timings=timings)
        model = self.analyzer.model.info
        if fmt == "original":
            return original_success(analysis.scores, model_version=model.version, seconds=seconds,
                                    n_windows=len(analysis.timeline),
                                    input_shape=(FEATURES.n_frames, FEATURES.n_mels),
                                    request_id=request_id(scope))
        return {"status": "success", **analysis.to_dict(), "model": model.summary(),
                "processing_seconds": round(seconds, 6)}
