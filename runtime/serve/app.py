"""HTTP service over the Analyzer: one FastAPI app factory, used by `python -m runtime serve` and by Modal.

Endpoints: POST /v1/analyze (audio), POST /v1/analyze/mel (precomputed log-mel), both also in the
original service's shapes with `?format=original`; GET /v1/model, GET /healthz, GET /readyz, GET /metrics
(Prometheus), the page at /; OpenAPI at /docs. The event loop only reads bodies (under a size limit, a
deadline and a shared byte budget taken as bytes arrive: runtime.serve.body); multipart unpacking, JSON
parsing, decoding, features and inference run in the bounded pool of runtime.serve.service. Every error is
``{"status": "error", "error": message, "error_type": kind, "request_id": id}`` with its HTTP status; every
response carries X-Request-ID, and every request gets one JSON log line (runtime.serve.request_log).
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

try:
    import prometheus_client  # noqa: F401  (runtime.serve.metrics needs it)
    import pydantic  # noqa: F401  (runtime.serve.schemas needs it)
    from fastapi import Depends, FastAPI, Query, Request
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(f"the HTTP service needs the 'serve' extra ({exc.name} is missing): "
                      "pip install 'percepiano-onnx[serve]'") from exc

from runtime.analyze import Analyzer
from runtime.audio import HARD_LIMIT_SECONDS, check_cap
from runtime.constants import FEATURES
from runtime.errors import ConfigError
from runtime.memory import return_large_buffers_to_the_os
from runtime.serve.body import (
    MULTIPART_SLACK,
    ServiceError,
    audio_body,
    audio_kind,
    error_responses,
    mel_body,
    mel_kind,
    read_body,
)
from runtime.serve.ops import Format, TokenCheck, add_metrics_route, install_error_handlers
from runtime.serve.original_contract import OriginalError, OriginalSuccess
from runtime.serve.request_log import RequestLog, configure_request_log
from runtime.serve.schemas import (
    AnalyzeResponse,
    ErrorResponse,
    HealthResponse,
    ModelResponse,
    ReadyResponse,
)
from runtime.serve.service import Service, Source, model_status, warm_up
from runtime.serve.settings import Settings

log = logging.getLogger(__name__)


BODY_ERRORS = (400, 408, 413, 415, 422, 503)  # what a route that reads a body can answer besides 401
ANALYSIS_ERRORS = (*BODY_ERRORS, 500)  # and an analysis: model_failed (NaN scores) or internal_error (a bug)


def cap_query(refuse_over_seconds: float | None) -> Any:
    """?cap_seconds=: positive, at most the refusal limit (or the hard limit), as check_cap enforces."""
    limit = refuse_over_seconds if refuse_over_seconds is not None and refuse_over_seconds <= HARD_LIMIT_SECONDS \
        else HARD_LIMIT_SECONDS
    return Query(None, gt=0, le=limit, allow_inf_nan=False, description=(
        "analyse only the first N seconds, cut after resampling to 22,050 Hz as the original's 30 s cap did; "
        f"longer audio is then not refused; at most the refusal limit, {limit:g} s "
        "(default: PERCEPIANO_CAP_SECONDS, else the whole recording)"))


def create_app(source: Source, *, settings: Settings | None = None,
               model_file: str | os.PathLike | None = None) -> FastAPI:
    """The FastAPI app: `source` is an ONNX model path, a loaded Analyzer, or a function returning one.

    `model_file` (default: `source` when it is a path) is offered to the on-device page at /on-device/."""
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
    app.add_middleware(RequestLog, metrics=service.metrics)  # X-Request-ID, one JSON log line and the counters
    install_error_handlers(app)
    # the bearer scheme (and its 401) appear in the routes and the OpenAPI document only when a token is set
    auth = [Depends(TokenCheck(settings.api_token))] if settings.api_token else []
    auth_errors = (401,) if settings.api_token else ()
    frame_limit = service.frame_limit
    add_metrics_route(app, service.metrics, auth if settings.metrics_auth else [])
    either = OriginalSuccess | AnalyzeResponse  # ?format=original, or this service's own
    analysis_errors = error_responses(*auth_errors, *ANALYSIS_ERRORS, model=ErrorResponse | OriginalError)
    cap_seconds_query = cap_query(settings.refuse_over_seconds)

    async def read(request: Request, body, slack: int = 0) -> bytes:
        """The request body, once the service admits it: under its size limit, timeout and byte budget (`body`)."""
        limit, timing = await service.admit_body(slack)
        return await read_body(request, limit, body, timing)

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

    @app.post("/v1/analyze", response_model=either, dependencies=auth, responses=analysis_errors,
              openapi_extra=audio_body(), tags=["analysis"])
    async def analyze(request: Request, cap_seconds: float | None = cap_seconds_query,
                      format: Format = "default"):
        """Score an audio file (wav, flac, ogg, mp3, m4a/AAC, ...), optionally only its first cap_seconds."""
        try:
            check_cap(cap_seconds, settings.refuse_over_seconds)
        except ConfigError as exc:
            raise ServiceError(422, "invalid_request", f"cap_seconds: {exc}") from None
        kind, timings = audio_kind(request), {}
        with service.bodies.reservation() as body:
            if kind == "multipart":  # unpacked in the pool; `box` lets the job drop the body once unpacked
                box = [await read(request, body, MULTIPART_SLACK)]
                job = partial(service.analyze_upload, box, request.headers["content-type"], cap_seconds, timings)
            else:
                job = partial(service.analyze_audio, await read(request, body), cap_seconds, timings)
            analysis, seconds = await service.run(job, body, timings)
        return service.result(request.scope, analysis, seconds, timings, format)

    @app.post("/v1/analyze/mel", response_model=either, dependencies=auth, responses=analysis_errors,
              openapi_extra=mel_body(FEATURES.n_mels, FEATURES.sample_rate, FEATURES.hop_length, frame_limit),
              tags=["analysis"])
    async def analyze_mel(request: Request, format: Format = "default"):
        """Score a precomputed log-mel spectrogram (128 mels, the model's rate and hop) in 128-frame windows."""
        kind, timings = mel_kind(request), {}
        with service.bodies.reservation() as body:
            job = partial(service.analyze_mel, await read(request, body), kind, timings)
            analysis, seconds = await service.run(job, body, timings)
        return service.result(request.scope, analysis, seconds, timings, format)

    from fastapi.responses import (
        FileResponse,  # the page (runtime/serve/static): no auth, its API calls carry the token
    )
    from fastapi.staticfiles import StaticFiles

    static = Path(__file__).with_name("static")
    if (static / "index.html").is_file():
        app.mount("/static", StaticFiles(directory=static), name="static")
        app.add_api_route("/", lambda: FileResponse(static / "index.html"), include_in_schema=False)
    else:  # an install that copied only .py files: the API still serves
        log.warning("the page's files are missing from %s: / is not served", static)
    from runtime.serve.on_device import add_on_device_routes

    add_on_device_routes(app, static, model_file or (source if isinstance(source, str | os.PathLike) else None))
    return app


def serve(model: str | os.PathLike | Analyzer, *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          threads: int | None = None, settings: Settings | None = None, log_level: str = "info",
          model_file: str | os.PathLike | None = None) -> None:
    """Load and warm up the model (failing fast on a bad one or a failed self-check), then run uvicorn.

    `model_file`: the model's file, for the on-device page (default: `model` when it is a path)."""
    from runtime.serve.connection import run

    settings = settings or Settings.from_env()
    analyzer = model if isinstance(model, Analyzer) else \
        Analyzer.from_path(model, device=device, threads=threads, refuse_over_seconds=settings.refuse_over_seconds)
    if not analyzer.model.warmed:
        warm_up(analyzer, allow_failed_self_check=settings.allow_failed_self_check)
    configure_request_log(settings.request_log)  # one JSON line per request, unless -q / PERCEPIANO_REQUEST_LOG=0
    if not settings.request_log and log_level == "info":
        log_level = "warning"  # quiet: uvicorn's own access lines too
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_token:
        log.warning("serving on %s without auth: set PERCEPIANO_API_TOKEN to require a bearer token", host)
    model_file = model_file or (None if isinstance(model, Analyzer) else model)
    app = create_app(analyzer, settings=settings, model_file=model_file)
    run(app, app.state.service.drain, host=host, port=port, log_level=log_level,
        header_timeout=settings.header_timeout)


__all__ = ["Settings", "Service", "ServiceError", "create_app", "serve", "warm_up"]
