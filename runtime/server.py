"""HTTP service over the Analyzer: one FastAPI app factory, used by `python -m runtime serve` and by Modal.

Endpoints: POST /v1/analyze (audio), POST /v1/analyze/mel (precomputed log-mel), GET /v1/model,
GET /healthz, GET /readyz; OpenAPI at /docs. The event loop only reads bodies (under a size limit, a
deadline and a shared byte budget reserved before reading: runtime.http_io); multipart unpacking, JSON
parsing, decoding, features and inference run in a small thread pool. Admission is bounded (running +
waiting), and a request that cannot get a slot in time gets 503, so overload never takes the process down.
Every error is ``{"status": "error", "error": message, "error_type": kind}`` with its HTTP status.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import numpy as np

try:
    import pydantic  # noqa: F401  (runtime.schemas needs it)
    from fastapi import Depends, FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(f"the HTTP service needs the 'serve' extra ({exc.name} is missing): "
                      "pip install 'percepiano-onnx[serve]'") from exc

from runtime.analyze import Analysis, Analyzer
from runtime.audio import check_cap, load_audio
from runtime.constants import FEATURES
from runtime.errors import AudioError, ConfigError, InputError
from runtime.features import features_from_audio
from runtime.http_io import (
    BUSY_HEADERS,
    MULTIPART_SLACK,
    ByteBudget,
    Reservation,
    ServiceError,
    audio_body,
    audio_error,
    audio_kind,
    error_response,
    error_responses,
    input_error,
    mel_body,
    mel_kind,
    multipart_audio,
    read_body,
    return_large_buffers_to_the_os,
)
from runtime.mel_input import max_frames_for, parse_blob, parse_json_bytes
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


BODY_ERRORS = (400, 408, 413, 415, 422, 503)  # what a route that reads a body can answer besides 401
_HTTP_TYPES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               408: "request_timeout", 413: "too_large", 415: "unsupported_media_type"}


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
        self.bodies = ByteBudget(settings.body_budget(MULTIPART_SLACK))
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
    def check_capacity(self) -> None:
        """503 busy at once when every running and waiting place is taken (before a body is read for nothing)."""
        if self._admitted >= self.settings.max_concurrency + self.settings.max_queue:
            raise ServiceError(503, "busy", "the server is at capacity; retry shortly", BUSY_HEADERS)

    def admission(self) -> dict[str, int]:
        """Analyses admitted (running or waiting) and request-body bytes held, against their bounds."""
        return {"admitted": self._admitted, "max_admitted": self.settings.max_concurrency + self.settings.max_queue,
                "body_bytes_held": self.bodies.held, "body_bytes_budget": self.bodies.limit}

    async def run(self, job: Callable[[], Any], body: Reservation | None = None) -> Any:
        """Run job in the pool. At most max_concurrency run and max_queue wait; a wait past queue_timeout is 503.

        `body` (the request body's reservation, if any) is released when the job really ends.
        """
        with self._lock:
            self.check_capacity()
            self._admitted += 1
        try:
            future = self.executor.submit(job)
        except RuntimeError:  # executor shut down
            self._release()
            raise ServiceError(503, "not_ready", "the server is shutting down") from None
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
        except ServiceError:
            raise
        except Exception:  # a bug, not a bad request: log it, answer 500, keep serving
            log.exception("analysis failed")
            raise ServiceError(500, "internal_error", "internal error while analysing; see the server log") from None

    def _release(self, _: Future | None = None) -> None:
        with self._lock:
            self._admitted -= 1

    async def read(self, request: Request, body: Reservation, slack: int = 0) -> bytes:
        """The request body, under the size limit, the body timeout and the byte budget (`body`)."""
        await self.wait_analyzer()
        self.check_capacity()
        return await read_body(request, self.settings.max_bytes + slack, body, self.settings.body_timeout)

    # --- the jobs (run in the pool)
    def analyze_upload(self, box: list[bytes], content_type: str,
                       cap_seconds: float | None = None) -> tuple[Analysis, float]:
        """A multipart upload: unpack the field `audio` here, in the pool, then drop the body (`box` holds it)."""
        data = multipart_audio(box.pop(), content_type, self.settings.max_bytes)
        return self.analyze_audio(data, cap_seconds)

    def analyze_audio(self, data: bytes, cap_seconds: float | None = None) -> tuple[Analysis, float]:
        """Decode and score; ``cap_seconds`` (the request's, else the setting's) analyses only the first N s."""
        analyzer = self.require_analyzer()
        t0 = time.perf_counter()
        try:
            cap = self.settings.cap_seconds if cap_seconds is None else cap_seconds
            y = load_audio(data, cap_seconds=cap, max_seconds=self.settings.max_seconds)
            return analyzer.analyze_audio(y, FEATURES.sample_rate), time.perf_counter() - t0
        except AudioError as exc:
            raise audio_error(exc) from None
        except InputError as exc:
            raise input_error(exc) from None

    def analyze_mel(self, data: bytes, kind: str) -> tuple[Analysis, float]:
        analyzer = self.require_analyzer()
        t0 = time.perf_counter()
        try:
            if kind == "json":
                mel = parse_json_bytes(data, max_frames=self.frame_limit)
            else:
                mel = parse_blob(data, max_frames=self.frame_limit)
            return analyzer.analyze_mel(mel), time.perf_counter() - t0
        except InputError as exc:
            raise input_error(exc) from None

    def result(self, analysis: Analysis, seconds: float) -> dict[str, Any]:
        assert self.analyzer is not None
        return {"status": "success", **analysis.to_dict(), "model": self.analyzer.model.info.summary(),
                "processing_seconds": round(seconds, 6)}


CAP_QUERY = Query(gt=0, allow_inf_nan=False, description=(
    "analyse only the first N seconds, cut after resampling to 22,050 Hz as the original's 30 s cap did; "
    "longer audio is then not refused (default: PERCEPIANO_CAP_SECONDS, else the whole recording)"))
BEARER = HTTPBearer(auto_error=False, description="PERCEPIANO_API_TOKEN (declared only when the service has one)")


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
    return_large_buffers_to_the_os()
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
    # the bearer scheme (and its 401) appear in the routes and the OpenAPI document only when a token is set
    auth = [Depends(TokenCheck(settings.api_token))] if settings.api_token else []
    auth_errors = (401,) if settings.api_token else ()
    frame_limit = service.frame_limit

    @app.get("/healthz", response_model=HealthResponse, tags=["health"])
    async def healthz():
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ErrorResponse}}, tags=["health"])
    async def readyz():
        """The model is loaded and warmed up (and where it runs, and how its self-check went)."""
        return {"status": "ready", **model_status(service.require_analyzer())}

    @app.get("/v1/model", response_model=ModelResponse, response_model_by_alias=True, dependencies=auth,
             responses=error_responses(*auth_errors, 503), tags=["analysis"])
    async def model_info():
        """The served model's metadata, where it runs, its self-check and the service limits."""
        analyzer = await service.wait_analyzer()
        info, status = analyzer.model.info, model_status(analyzer)
        return {**info.summary(), **{k: status[k] for k in ("device", "providers", "self_check", "demo")},
                "dimensions": [{"label": label, "key": key} for label, key in info.dimensions],
                "features": info.features, "model_config": info.model_config, "source": info.source,
                "parity": info.parity, "versions": info.versions, "limits": settings.public(),
                "admission": service.admission()}

    @app.post("/v1/analyze", response_model=AnalyzeResponse, dependencies=auth,
              responses=error_responses(*auth_errors, *BODY_ERRORS), openapi_extra=audio_body(), tags=["analysis"])
    async def analyze(request: Request, cap_seconds: Annotated[float | None, CAP_QUERY] = None):
        """Score an audio file (wav, flac, ogg, mp3, m4a/AAC, ...), optionally only its first cap_seconds."""
        try:
            check_cap(cap_seconds, settings.max_seconds)
        except ConfigError as exc:
            raise ServiceError(422, "invalid_request", f"cap_seconds: {exc}") from None
        kind = audio_kind(request)
        with service.bodies.reservation() as body:
            if kind == "multipart":  # unpacked in the pool; `box` lets the job drop the body once unpacked
                box = [await service.read(request, body, MULTIPART_SLACK)]
                job = partial(service.analyze_upload, box, request.headers["content-type"], cap_seconds)
            else:
                job = partial(service.analyze_audio, await service.read(request, body), cap_seconds)
            analysis, seconds = await service.run(job, body)
        return service.result(analysis, seconds)

    @app.post("/v1/analyze/mel", response_model=AnalyzeResponse, dependencies=auth,
              responses=error_responses(*auth_errors, *BODY_ERRORS),
              openapi_extra=mel_body(FEATURES.n_mels, FEATURES.sample_rate, FEATURES.hop_length, frame_limit),
              tags=["analysis"])
    async def analyze_mel(request: Request):
        """Score a precomputed log-mel spectrogram (128 mels, the model's rate and hop) in 128-frame windows."""
        kind = mel_kind(request)
        with service.bodies.reservation() as body:
            job = partial(service.analyze_mel, await service.read(request, body), kind)
            analysis, seconds = await service.run(job, body)
        return service.result(analysis, seconds)

    from fastapi.responses import FileResponse  # the page (runtime/static): no auth, its API calls carry the token
    from fastapi.staticfiles import StaticFiles

    static = Path(__file__).with_name("static")
    if (static / "index.html").is_file():
        app.mount("/static", StaticFiles(directory=static), name="static")
        app.add_api_route("/", lambda: FileResponse(static / "index.html"), include_in_schema=False)
    else:  # an install that copied only .py files: the API still serves
        log.warning("the page's files are missing from %s: / is not served", static)
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
