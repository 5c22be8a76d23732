"""The original service's response shapes (docs/spec.md §5), for callers that switch without a rewrite
(`?format=original`).

Only the shapes are the original's; what it got wrong stays fixed: results are keyed by the correct API keys
(runtime.constants) and are label-unit scores in [0, 1], not z-scores.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field, create_model

from runtime.constants import DIMENSIONS

FORMATS = ("default", "original")

OriginalResults = create_model(
    "OriginalResults", __doc__="The 19 scores in [0, 1] keyed by API key (the original's `results`, names corrected).",
    **{key: (float, Field(description=label)) for label, key in DIMENSIONS},
)


class OriginalMetadata(BaseModel):
    model_version: str | None = Field(description="the served model's version (null before a model is loaded)")
    processing_time_seconds: float | None = Field(description="decode + features + inference, without queueing")
    input_shape: list[int] | None = Field(description="the shape the model saw: [chunks, 128 frames, 128 mels]")
    timestamp: str = Field(description="ISO 8601 UTC time of the answer")
    request_id: str | None = None


class OriginalSuccess(BaseModel):
    status: Literal["success"] = "success"
    results: OriginalResults  # type: ignore[valid-type]
    metadata: OriginalMetadata


class OriginalError(BaseModel):
    status: Literal["error"] = "error"
    error: str
    error_type: str
    metadata: OriginalMetadata


def now_iso() -> str:
    """The current UTC time as ISO 8601 with a Z suffix and millisecond precision."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def success(scores: dict[str, float], *, model_version: str, seconds: float, n_windows: int,
            input_shape: tuple[int, ...], request_id: str | None = None) -> dict:
    """An analysis in the original's success shape."""
    meta = OriginalMetadata(model_version=model_version, processing_time_seconds=round(seconds, 6),
                            input_shape=[n_windows, *input_shape], timestamp=now_iso(), request_id=request_id)
    return OriginalSuccess(results=scores, metadata=meta).model_dump()


def error(message: str, error_type: str, *, model_version: str | None = None,
          request_id: str | None = None) -> dict:
    """An error in the original's error shape."""
    meta = OriginalMetadata(model_version=model_version, processing_time_seconds=None, input_shape=None,
                            timestamp=now_iso(), request_id=request_id)
    return OriginalError(error=message, error_type=error_type, metadata=meta).model_dump()
