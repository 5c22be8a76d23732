"""HTTP request bodies: media types, bounded body reading, multipart, the typed errors and the OpenAPI bodies.

Plain functions over a Starlette Request used by runtime.serve.app; the service logic lives there. Every body is
read under four bounds: its size (413); an idle timeout between reads and a whole-body deadline that grows with
the body's size (408 and close, as nginx's client_body_timeout); and a byte budget shared by all requests (503
busy), taken as the bytes arrive, so that a body's promise (its Content-Length) holds nothing: a declared length
that cannot fit in what is free now is refused at once, before its bytes are sent for nothing. Multipart is
unpacked by the job in the thread pool, not on the event loop.
"""

from __future__ import annotations

import email.message
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import anyio
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from runtime.errors import AudioDecodeError, AudioError, AudioTooLongError, InputError
from runtime.serve.mel_input import BLOB_CONTENT_TYPES, InputTooLarge, JsonSyntaxError
from runtime.serve.schemas import ErrorResponse

log = logging.getLogger(__name__)

MULTIPART_SLACK = 64 * 1024  # multipart framing allowed on top of max_bytes
MULTIPART_MAX_PARTS = 16
DRAIN_LIMIT = 16 * 1024 * 1024  # an oversized body up to this much is read and dropped, so the client sees the 413
RAW_AUDIO_TYPES = ("application/octet-stream",)  # besides audio/*
BUSY_HEADERS = {"Retry-After": "1"}


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
    if isinstance(exc, JsonSyntaxError):
        return ServiceError(400, "bad_request", str(exc))
    return ServiceError(422, "invalid_input", str(exc))


def error_response(status: int, error_type: str, message: str, headers: dict[str, str] | None = None,
                   request_id: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=message, error_type=error_type, request_id=request_id).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


# ---------------------------------------------------------------------------------------------- the byte budget


class ByteBudget:
    """Bytes of request bodies in memory, all requests together; a reservation past `limit` is 503 busy."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self._lock = threading.Lock()  # released from pool threads too

    def reservation(self) -> Reservation:
        return Reservation(self)

    def _take(self, n: int) -> None:
        with self._lock:
            self._check(n)
            self.held += n

    def check_room(self, n: int) -> None:
        """503 busy now if `n` more bytes would not fit (a declared length, before its bytes are read)."""
        with self._lock:
            self._check(n)

    def _check(self, n: int) -> None:
        if self.held + n > self.limit:
            raise ServiceError(503, "busy", f"the server holds {self.held} bytes of request bodies and cannot take "
                               f"{n} more within its budget of {self.limit}; retry shortly",
                               {**BUSY_HEADERS, "Connection": "close"})

    def _give(self, n: int) -> None:
        with self._lock:
            self.held -= n


class Reservation:
    """One request's share of the budget: grows as bytes arrive; released once, when the request ends.

    As a context manager it releases on exit unless `hand_off` passed it to a job, whose end releases it.
    """

    def __init__(self, budget: ByteBudget):
        self.budget, self.size, self.handed_off = budget, 0, False
        self._lock = threading.Lock()

    def grow(self, n: int) -> None:
        if n > 0:
            self.budget._take(n)
            with self._lock:
                self.size += n

    def release(self, *_: object) -> None:
        with self._lock:
            size, self.size = self.size, 0
        self.budget._give(size)

    def hand_off(self) -> None:
        self.handed_off = True

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *_: object) -> None:
        if not self.handed_off:
            self.release()


# ---------------------------------------------------------------------------------------------- reading a body


def declared_length(request: Request) -> int | None:
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not declared.strip().isdigit():
        raise ServiceError(400, "bad_request", "Content-Length must be a non-negative integer")
    return int(declared)


@dataclass(frozen=True)
class BodyTiming:
    """How long a body may take: `idle` s without a byte, and `timeout` s plus one second per `min_rate` bytes
    of its size (the declared size, else what has arrived) for the whole body; min_rate 0: `timeout` alone."""

    idle: float
    timeout: float
    min_rate: float = 0.0

    def deadline(self, size: int) -> float:
        return self.timeout + (size / self.min_rate if self.min_rate > 0 else 0.0)


async def read_body(request: Request, limit: int, held: Reservation, timing: BodyTiming) -> bytes:
    """The body, its bytes reserved in `held` as they arrive (a declared length that cannot fit is refused first).

    413 past `limit` (an oversized body is read no further than DRAIN_LIMIT past it, and never kept); 408 and
    close when no byte arrives for `timing.idle` s or the whole body is later than its deadline; a client that
    leaves mid-body is logged in one line.
    """
    too_large = ServiceError(413, "too_large", f"the request body is over the limit of {limit} bytes")
    declared = declared_length(request)
    if declared is not None and declared > limit + DRAIN_LIMIT:
        raise too_large
    if declared is not None:
        held.budget.check_room(min(declared, limit))
    chunks, size, start = [], 0, time.monotonic()
    stream = request.stream().__aiter__()
    while True:
        deadline = timing.deadline(max(size, declared or 0))
        wait = min(timing.idle, deadline - (time.monotonic() - start))
        try:
            with anyio.fail_after(max(wait, 0.0)):
                chunk = await stream.__anext__()
        except StopAsyncIteration:
            break
        except TimeoutError:
            idle = wait >= timing.idle
            why = f"no byte for {timing.idle:g} s" if idle else f"not all within {deadline:g} s"
            raise _late(size, declared, why) from None
        except ClientDisconnect:
            log.warning("client disconnected after %d of %s bytes of the request body", size, declared or "?")
            raise ServiceError(400, "client_disconnected", "the client disconnected before sending the body") from None
        size += len(chunk)
        if size > limit + DRAIN_LIMIT:
            raise too_large
        if size <= limit and chunk:
            held.grow(len(chunk))
            chunks.append(chunk)
    if size > limit:
        raise too_large
    return b"".join(chunks)


def _late(size: int, declared: int | None, why: str) -> ServiceError:
    log.warning("request body cut off (%s): %d of %s bytes arrived", why, size, declared or "?")
    return ServiceError(408, "request_timeout", f"the request body did not arrive: {why}", {"Connection": "close"})


def audio_kind(request: Request) -> str:
    """'multipart' (file field `audio`) or 'raw' (the file as the body, audio/* or octet-stream); else 415."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        return "multipart"
    if kind.startswith("audio/") or kind in RAW_AUDIO_TYPES:
        return "raw"
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


# ---------------------------------------------------------------------------------------------- multipart


class _AudioPart:
    """Callbacks of python-multipart's parser that keep the first file part named `audio` and nothing else."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.parts, self.found, self.size, self.ended = max_bytes, 0, False, 0, False
        self.keep, self.chunks, self.headers = False, [], {}
        self.field = self.value = b""

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MULTIPART_MAX_PARTS:
            raise ServiceError(413, "too_large", f"the multipart body has more than {MULTIPART_MAX_PARTS} parts")
        self.headers, self.keep = {}, False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.field.lower()] = self.value
        self.field = self.value = b""

    def on_headers_finished(self) -> None:
        disposition = self.headers.get(b"content-disposition", b"").decode("latin-1")
        kind, options = parse_options_header(disposition)
        is_file = kind == b"form-data" and options.get(b"name") == b"audio" and has_filename(options, disposition)
        self.keep = is_file and not self.found
        self.found = self.found or self.keep

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.keep:
            self.size += end - start
            if self.size > self.max_bytes:
                raise ServiceError(413, "too_large", f"the audio file is over the limit of {self.max_bytes} bytes")
            self.chunks.append(data[start:end])

    def on_end(self) -> None:
        self.ended = True


def has_filename(options: dict[bytes, bytes], disposition: str) -> bool:
    """A file part: `filename=`, or only RFC 2231's `filename*=` (which python-multipart leaves out of options)."""
    if b"filename" in options:
        return True
    header = email.message.Message()
    header["content-disposition"] = disposition
    return header.get_filename() is not None


def multipart_audio(body: bytes, content_type: str, max_bytes: int) -> bytes:
    """The file field `audio` of a multipart/form-data body (runs in the pool: parsing is CPU work)."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ServiceError(400, "bad_request", "the multipart/form-data content type has no boundary")
    part = _AudioPart(max_bytes)
    callbacks = {name: getattr(part, name) for name in ("on_part_begin", "on_header_field", "on_header_value",
                                                        "on_header_end", "on_headers_finished", "on_part_data",
                                                        "on_end")}
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise ServiceError(400, "bad_request", f"the multipart body is malformed ({exc})") from None
    if not part.ended:  # cut short (a dropped connection, a proxy): what arrived is a fragment, never scored
        raise ServiceError(400, "bad_request", "the multipart body ends without its closing boundary (cut short)")
    if not part.found:
        raise ServiceError(422, "missing_field", 'multipart upload needs a file field named "audio"')
    return b"".join(part.chunks)


# ---------------------------------------------------------------------------------------------- OpenAPI

ERROR_DESCRIPTIONS = {
    400: "the body is not valid JSON or multipart, or Content-Length is malformed (`bad_request`)",
    401: "missing or wrong bearer token (`unauthorized`)",
    408: "the request body stalled or did not arrive within its deadline (`request_timeout`)",
    413: "the body, the audio or the spectrogram is over a limit (`too_large`, `audio_too_long`)",
    415: "a content type the route does not take, or audio that cannot be decoded "
         "(`unsupported_media_type`, `unsupported_audio`)",
    422: "a body that parses but cannot be analysed (`invalid_audio`, `invalid_input`, `missing_field`)",
    500: "the model gave non-finite scores, or a bug in the server (`model_failed`, `internal_error`)",
    503: "not ready, shutting down, the model failed to load, or at capacity (`not_ready`, `model_failed`, `busy`)",
}
_RETRY = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def error_responses(*codes: int, model: Any = ErrorResponse) -> dict[int | str, dict]:
    """The `responses` of a route: each status it can answer with the error body (`model`), and what it means."""
    out: dict[int | str, dict] = {}
    for code in sorted(codes):
        out[code] = {"model": model, "description": ERROR_DESCRIPTIONS[code]}
        if code == 503:
            out[code]["headers"] = _RETRY
    return out


_BINARY = {"type": "string", "format": "binary"}
_FLOAT32_MAX = 3.4028234663852886e38  # larger magnitudes are not float32 (they would become infinite)


def audio_body() -> dict:
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["audio"],
                                           "properties": {"audio": {**_BINARY, "description": "the audio file"}}}},
        "audio/*": {"schema": _BINARY},
        "application/octet-stream": {"schema": _BINARY},
    }}}


def mel_body(n_mels: int, sample_rate: int, hop_length: int, max_frames: int | None) -> dict:
    """The spectrogram bodies; `max_frames` is the frame limit of the service's duration limit (None: none)."""
    value = {"type": "number", "minimum": -_FLOAT32_MAX, "maximum": _FLOAT32_MAX}
    frames = {"type": "array", "minItems": 1, "description": f"[time][{n_mels} mel] log-mel in dB",
              "items": {"type": "array", "minItems": n_mels, "maxItems": n_mels, "items": value}}
    if max_frames is not None:
        frames["maxItems"] = max_frames
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["mel_spectrogram"], "properties": {
            "mel_spectrogram": frames,
            "sample_rate": {"type": "integer", "enum": [sample_rate], "default": sample_rate},
            "hop_length": {"type": "integer", "enum": [hop_length], "default": hop_length}}}},
        "application/octet-stream": {"schema": {**_BINARY, "description": (
            "16-byte little-endian u32 header (n_mels, n_frames, sample_rate, hop), then float32 values, mel-major")}},
    }}}
