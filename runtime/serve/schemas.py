"""Response models of the HTTP service (pydantic), so that /docs shows the exact schema."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, create_model

from runtime.constants import DIMENSIONS

Scores = create_model(
    "Scores", __doc__="The 19 PercePiano scores in [0, 1], keyed by API key, in model output order.",
    **{key: (float, Field(description=label)) for label, key in DIMENSIONS},
)


class ChunkScoresOut(BaseModel):
    start_seconds: float = Field(description="start of the 3 s window (windows start every 2 s)")
    scores: Scores  # type: ignore[valid-type]


class ModelSummary(BaseModel):
    version: str
    sha256: str = Field(description="sha256 of the source checkpoint")
    precision: str


class AnalyzeResponse(BaseModel):
    status: Literal["success"] = "success"
    scores: Scores  # type: ignore[valid-type]
    timeline: list[ChunkScoresOut]
    duration_seconds: float
    model: ModelSummary
    processing_seconds: float = Field(description="decode + features + inference time, excluding any queueing")


class ErrorResponse(BaseModel):
    status: Literal["error"] = "error"
    error: str
    error_type: str
    request_id: str | None = Field(None, description="the request's X-Request-ID (the client's, or one made for it)")


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class SelfCheck(BaseModel):
    status: Literal["passed", "failed", "absent", "not_run"] = Field(
        description="the export's stored reference windows run on this device at load: passed or failed against "
                    "their tolerance; absent for a model exported without them")
    passed: bool | None = None
    device: str
    max_abs: float | None = Field(None, description="largest difference from the stored scores, in score units")
    atol: float | None = None
    windows: int = 0
    milliseconds: float | None = None


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    model: ModelSummary
    device: str
    providers: list[str] = Field(description="the onnxruntime session's execution providers, in priority order")
    self_check: SelfCheck
    demo: bool = Field(description="a demo model (exported from an untrained checkpoint): its scores mean nothing")


class ModelResponse(BaseModel):
    version: str
    sha256: str
    precision: str
    device: str
    providers: list[str]
    self_check: SelfCheck
    demo: bool
    dimensions: list[dict[str, str]]  # {label, key}, in model output order
    features: dict[str, Any]
    model_config_: dict[str, Any] = Field(alias="model_config", serialization_alias="model_config")
    source: dict[str, Any]
    parity: dict[str, Any] | None
    versions: dict[str, Any] = Field(description="package versions the export and its gate ran with")
    limits: dict[str, Any]
    admission: dict[str, int] = Field(description="analyses admitted and request-body bytes held, with their bounds")
