"""HTTP service over the Analyzer: one FastAPI app factory, used by `python -m runtime serve` and by Modal.

Endpoints: POST /v1/analyze (audio), POST /v1/analyze/mel (precomputed log-mel), GET /v1/model,
GET /healthz, GET /readyz; OpenAPI at /docs. Decoding, features and inference run in a small thread pool
off the event loop; admission is bounded (running + waiting), and a request that cannot get a slot in
time gets 503, so overload never takes the process down. Every error is
``{"status": "error", "error": message, "error_type": kind}`` with its HTTP status.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np

try:
    import pydantic  # noqa: F401  (runtime.schemas needs it)
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(f"the HTTP service needs the 'serve' extra ({exc.name} is missing): "
                      "pip install 'percepiano-onnx[serve]'") from exc

from runtime.analyze import Analysis, Analyzer
from runtime.audio import load_audio
from runtime.constants import FEATURES
from runtime.errors import AudioError, InputError
from runtime.features import features_from_audio
from runtime.http_io import (
    AUDIO_BODY,
    MEL_BODY,
    ServiceError,
    audio_error,
    audio_from_request,
    error_response,
    input_error,
    mel_kind,
    read_body,
)
from runtime.mel_input import max_frames_for, parse_blob, parse_json
from runtime.schemas import (
    AnalyzeResponse,
    ErrorResponse,
    HealthResponse,
    ModelResponse,
    ReadyResponse,
)
from runtime.self_check import require_passed
from runtime.settings import Settings

log = logging.getLogger(__name__)


ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (401, 413, 415, 422, 503)}


_HTTP_TYPES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "too_large", 415: "unsupported_media_type"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError):
        return error_response(exc.status, exc.error_type, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, _HTTP_TYPES.get(exc.status_code, "http_error"), str(exc.detail),
                              getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(422, "invalid_request", f"{where}: {first.get('msg', 'invalid request')}")


Source = str | os.PathLike | Analyzer | Callable[[], Analyzer]


def warm_up(analyzer: Analyzer, *, allow_failed_self_check: bool = False) -> None:
    """Warm up at batch 2 (the self-check), the analyzer's batch size and 1; a failed self-check refuses the model.

    The batch-2 run is the self-check (the export's two stored windows, compared with their stored scores),
    so the check costs no run of its own: the same shapes and windows as a warm-up without it.
    """
    t0 = time.perf_counter()
    require_passed(analyzer.model.run_self_check(), allow_failed=allow_failed_self_check)
    analyzer.model.warmup(analyzer.batch_size)
    noise = 0.01 * np.random.default_rng(0).standard_normal(int(FEATURES.hop_seconds * FEATURES.sample_rate))
    analyzer.chunk_scores(features_from_audio(noise.astype(np.float32)))  # the feature path too: 2 s, one window
    analyzer.model.warmed = True
    log.info("model warmed up in %.2f s on %s", time.perf_counter() - t0, analyzer.model.device)


def model_status(analyzer: Analyzer) -> dict[str, Any]:
    """What /readyz and /v1/model say about the loaded model: where it runs and how its self-check went."""
    model = analyzer.model
    check = model.self_check.to_dict() if model.self_check else {"status": "not_run", "device": model.device}
    return {"model": model.info.summary(), "device": model.device, "providers": list(model.providers),
            "self_check": check, "demo": model.info.demo}


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
        self.executor = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="percepiano")
        self.frame_limit = max_frames_for(settings.max_seconds)

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
                analyzer = Analyzer.from_path(Path(source), max_seconds=self.settings.max_seconds)
            if not analyzer.model.warmed:
                warm_up(analyzer, allow_failed_self_check=self.settings.allow_failed_self_check)
            self._ready_with(analyzer)
        except Exception as exc:  # reported by /readyz; the process stays up to say so
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("model failed to load")
        finally:
            self.settled.set()

    def _ready_with(self, analyzer: Analyzer) -> None:
        self.analyzer = analyzer
        self.ready.set()
        self.settled.set()

    def close(self) -> None:
        """Wait for a load still in progress (never exit under onnxruntime's feet), then stop the pool."""
        if self._loader is not None:
            self._loader.join()
        self.executor.shutdown(wait=False, cancel_futures=True)

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
    async def run(self, job: Callable[[], Any]) -> Any:
        """Run job in the pool. At most max_concurrency run and max_queue wait; a wait past queue_timeout is 503."""
        with self._lock:
            if self._admitted >= self.settings.max_concurrency + self.settings.max_queue:
                raise ServiceError(503, "busy", "the server is at capacity; retry shortly", {"Retry-After": "1"})
            self._admitted += 1
        try:
            future = self.executor.submit(job)
        except RuntimeError:  # executor shut down
            self._release()
            raise ServiceError(503, "not_ready", "the server is shutting down") from None
        future.add_done_callback(self._release)  # the slot is freed when the work really ends, not when we stop waiting
        waiter = asyncio.wrap_future(future)
        done, _ = await asyncio.wait({waiter}, timeout=self.settings.queue_timeout)
        if not done and future.cancel():  # still queued: give up its place
            raise ServiceError(503, "busy", f"no free slot within {self.settings.queue_timeout:g} s; retry shortly",
                               {"Retry-After": "1"})
        try:
            return await waiter
        except ServiceError:
            raise
        except Exception:  # a bug, not a bad request: log it, answer 500, keep serving
            log.exception("analysis failed")
            raise ServiceError(500, "internal_error", "internal error while analysing; see the server log") from None

    def _release(self, _: Future | None = None) -> None:
        with self._lock:
            self._admitted -= 1

    # --- the jobs (run in the pool)
    def analyze_audio(self, data: bytes) -> tuple[Analysis, float]:
        analyzer = self.require_analyzer()
        t0 = time.perf_counter()
        try:
            y = load_audio(data, max_seconds=self.settings.max_seconds)
            return analyzer.analyze_audio(y), time.perf_counter() - t0
        except AudioError as exc:
            raise audio_error(exc) from None
        except InputError as exc:
            raise input_error(exc) from None

    def analyze_mel(self, data: bytes, kind: str) -> tuple[Analysis, float]:
        analyzer = self.require_analyzer()
        t0 = time.perf_counter()
        try:
            if kind == "json":
                try:
                    doc = json.loads(data)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise ServiceError(400, "bad_request", f"the body is not valid JSON ({exc})") from None
                mel = parse_json(doc, max_frames=self.frame_limit)
            else:
                mel = parse_blob(data, max_frames=self.frame_limit)
            return analyzer.analyze_mel(mel), time.perf_counter() - t0
        except InputError as exc:
            raise input_error(exc) from None

    def result(self, analysis: Analysis, seconds: float) -> dict[str, Any]:
        assert self.analyzer is not None
        return {"status": "success", **analysis.to_dict(), "model": self.analyzer.model.info.summary(),
                "processing_seconds": round(seconds, 6)}


BEARER = HTTPBearer(auto_error=False, description="PERCEPIANO_API_TOKEN, when the service has one")


class TokenCheck:
    """A dependency that requires `Authorization: Bearer <token>` when a token is set (constant-time compare)."""

    def __init__(self, token: str | None):
        self.expected = hashlib.sha256(token.encode()).digest() if token else None

    async def __call__(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if self.expected is None:
            return
        given = credentials.credentials if credentials and credentials.scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), self.expected):
            raise ServiceError(401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


def create_app(source: Source, *, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app: `source` is an ONNX model path, a loaded Analyzer, or a function returning one."""
    settings = settings or Settings.from_env()
    service = Service(source, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        service.start()
        yield
        await asyncio.to_thread(service.close)

    app = FastAPI(title="PercePiano analysis", version="1", lifespan=lifespan,
                  description="19 perceptual scores of a piano performance (PercePiano AST, ONNX runtime).")
    app.state.service = service
    install_error_handlers(app)
    auth = [Depends(TokenCheck(settings.api_token))]

    @app.get("/healthz", response_model=HealthResponse, tags=["health"])
    async def healthz():
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ErrorResponse}}, tags=["health"])
    async def readyz():
        """The model is loaded and warmed up (and where it runs, and how its self-check went)."""
        return {"status": "ready", **model_status(service.require_analyzer())}

    @app.get("/v1/model", response_model=ModelResponse, response_model_by_alias=True, dependencies=auth,
             responses=ERROR_RESPONSES, tags=["analysis"])
    async def model_info():
        """The served model's metadata, where it runs, its self-check and the service limits."""
        analyzer = await service.wait_analyzer()
        info, status = analyzer.model.info, model_status(analyzer)
        return {**info.summary(), **{k: status[k] for k in ("device", "providers", "self_check", "demo")},
                "dimensions": [{"label": label, "key": key} for label, key in info.dimensions],
                "features": info.features, "model_config": info.model_config, "source": info.source,
                "parity": info.parity, "versions": info.versions, "limits": settings.public()}

    @app.post("/v1/analyze", response_model=AnalyzeResponse, dependencies=auth, responses=ERROR_RESPONSES,
              openapi_extra=AUDIO_BODY, tags=["analysis"])
    async def analyze(request: Request):
        """Score an audio file (wav, flac, ogg, mp3, m4a/AAC, ...)."""
        await service.wait_analyzer()
        data = await audio_from_request(request, settings.max_bytes)
        analysis, seconds = await service.run(lambda: service.analyze_audio(data))
        return service.result(analysis, seconds)

    @app.post("/v1/analyze/mel", response_model=AnalyzeResponse, dependencies=auth, responses=ERROR_RESPONSES,
              openapi_extra=MEL_BODY, tags=["analysis"])
    async def analyze_mel(request: Request):
        """Score a precomputed log-mel spectrogram (128 mels, the model's rate and hop) in 128-frame windows."""
        await service.wait_analyzer()
        kind = mel_kind(request)
        data = await read_body(request, settings.max_bytes)
        analysis, seconds = await service.run(lambda: service.analyze_mel(data, kind))
        return service.result(analysis, seconds)

    return app


def serve(model: str | os.PathLike | Analyzer, *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          threads: int | None = None, settings: Settings | None = None, log_level: str = "info") -> None:
    """Load and warm up the model (failing fast on a bad one or a failed self-check), then run uvicorn."""
    import uvicorn

    settings = settings or Settings.from_env()
    analyzer = model if isinstance(model, Analyzer) else \
        Analyzer.from_path(model, device=device, threads=threads, max_seconds=settings.max_seconds)
    if not analyzer.model.warmed:
        warm_up(analyzer, allow_failed_self_check=settings.allow_failed_self_check)
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_token:
        log.warning("serving on %s without auth: set PERCEPIANO_API_TOKEN to require a bearer token", host)
    uvicorn.run(create_app(analyzer, settings=settings), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=10)


__all__ = ["Settings", "Service", "ServiceError", "create_app", "serve", "warm_up"]
