"""HTTP request bodies: media types, bounded body reading, multipart, the typed errors and the OpenAPI bodies.

Plain functions over a Starlette Request used by runtime.server; the service logic lives there.
"""

from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse

from runtime.constants import FEATURES
from runtime.errors import AudioDecodeError, AudioError, AudioTooLongError, InputError
from runtime.mel_input import BLOB_CONTENT_TYPES, InputTooLarge
from runtime.schemas import ErrorResponse

MULTIPART_SLACK = 64 * 1024  # multipart framing allowed on top of max_bytes
DRAIN_LIMIT = 16 * 1024 * 1024  # an oversized body up to this much is read and dropped, so the client sees the 413
RAW_AUDIO_TYPES = ("application/octet-stream",)  # besides audio/*


class ServiceError(Exception):
    """An error answered as {"status": "error", ...} with an HTTP status."""

    def __init__(self, status: int, error_type: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.error_type, self.message, self.headers = status, error_type, message, headers


def audio_error(exc: AudioError) -> ServiceError:
    """AudioError -> 413 (too long), 415 (not decodable: unsupported, corrupt, truncated), 422 (decodes, unusable)."""
    if isinstance(exc, AudioTooLongError):
        return ServiceError(413, "audio_too_long", str(exc))
    if isinstance(exc, AudioDecodeError):
        return ServiceError(415, "unsupported_audio", str(exc))
    return ServiceError(422, "invalid_audio", str(exc))


def input_error(exc: InputError) -> ServiceError:
    if isinstance(exc, InputTooLarge):
        return ServiceError(413, "too_large", str(exc))
    return ServiceError(422, "invalid_input", str(exc))


def error_response(status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=message, error_type=error_type).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (read no further than DRAIN_LIMIT past it)."""
    too_large = ServiceError(413, "too_large", f"the request body is over the limit of {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + DRAIN_LIMIT:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit + DRAIN_LIMIT:
            raise too_large
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise too_large
    return b"".join(chunks)


async def audio_from_request(request: Request, max_bytes: int) -> bytes:
    """The uploaded audio: multipart field `audio`, or a raw body with an audio/* (or octet-stream) type."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        body = await read_body(request, max_bytes + MULTIPART_SLACK)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
        upload = form.get("audio")
        if not isinstance(upload, UploadFile):
            raise ServiceError(422, "missing_field", 'multipart upload needs a file field named "audio"')
        data = await upload.read()
        await form.close()
        if len(data) > max_bytes:
            raise ServiceError(413, "too_large", f"the audio file is over the limit of {max_bytes} bytes")
        return data
    if kind.startswith("audio/") or kind in RAW_AUDIO_TYPES:
        return await read_body(request, max_bytes)
    raise ServiceError(415, "unsupported_media_type",
                       f"content type {kind or '(none)'!r}: send multipart/form-data with a file field 'audio', "
                       "or the file as the body with an audio/* content type")


def mel_kind(request: Request) -> str:
    kind = media_type(request)
    if kind == "application/json":
        return "json"
    if kind in BLOB_CONTENT_TYPES:
        return "blob"
    raise ServiceError(415, "unsupported_media_type",
                       f"content type {kind or '(none)'!r}: send application/json {{\"mel_spectrogram\": [[...]]}} "
                       f"or the binary blob as one of {', '.join(BLOB_CONTENT_TYPES)}")


_BINARY = {"type": "string", "format": "binary"}
AUDIO_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["audio"],
                                       "properties": {"audio": {**_BINARY, "description": "the audio file"}}}},
    "audio/*": {"schema": _BINARY},
    "application/octet-stream": {"schema": _BINARY},
}}}
MEL_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["mel_spectrogram"], "properties": {
        "mel_spectrogram": {"type": "array", "description": "[time][128 mel] log-mel in dB",
                            "items": {"type": "array", "items": {"type": "number"}}},
        "sample_rate": {"type": "integer", "default": FEATURES.sample_rate},
        "hop_length": {"type": "integer", "default": FEATURES.hop_length}}}},
    "application/octet-stream": {"schema": {**_BINARY, "description": (
        "16-byte little-endian u32 header (n_mels, n_frames, sample_rate, hop), then float32 values, mel-major")}},
}}}
