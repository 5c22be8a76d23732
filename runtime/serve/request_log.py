"""Request IDs and one structured log line per request: a plain ASGI middleware around the service's app.

The handler fills ``scope["state"]["percepiano"]`` (audio seconds, the timing split, the error type); the
middleware adds the request ID (the client's ``X-Request-ID`` when it is sane, else a new one), echoes it in
the response headers, counts the request in the metrics and writes one JSON line to the
``percepiano.requests`` logger. Never logged: audio, spectrogram values, headers (so no token).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from runtime.serve.metrics import Metrics

log = logging.getLogger("percepiano.requests")

HEADER = "x-request-id"
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")  # echoed into headers and logs: no spaces, quotes or CR/LF


def configure_request_log(enabled: bool = True, stream=None) -> None:
    """Request lines on by default: the `percepiano.requests` logger at INFO with its own handler on stderr (bare
    JSON lines), whatever the root logger's level; off (`-q`, PERCEPIANO_REQUEST_LOG=0) silences it. Idempotent."""
    import sys

    for handler in [h for h in log.handlers if getattr(h, "percepiano_request_log", False)]:
        log.removeHandler(handler)
    if not enabled:
        log.setLevel(logging.CRITICAL + 1)
        log.propagate = False
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.percepiano_request_log = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # one line per request, not a second copy through a configured root logger


def request_id(scope: dict) -> str:
    """The request's ID (set by RequestLog before the app runs)."""
    return scope.get("state", {}).get("request_id", "")


def note(scope: dict, **fields: Any) -> None:
    """Add fields (audio_seconds, timings, error_type) to the request's log line."""
    scope.setdefault("state", {}).setdefault("percepiano", {}).update(fields)


def _route(scope: dict) -> str:
    """The route template (/v1/analyze), never the raw path (unbounded label values)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestLog:
    """ASGI middleware: request ID in and out, metrics per request, one JSON log line per request."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or ()).get(HEADER.encode(), b"").decode("latin-1")
        rid = given if _SANE_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        start, sizes, status = time.perf_counter(), {"in": 0, "out": 0}, {"code": 500}
        self.metrics.arrived(scope.get("path", ""))

        async def counting_receive():
            message = await receive()
            sizes["in"] += len(message.get("body", b""))
            return message

        async def tagging_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (HEADER.encode(), rid.encode())]}
            elif message["type"] == "http.response.body":
                sizes["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, tagging_send)
        finally:
            seconds = time.perf_counter() - start
            route = _route(scope)
            extra = state.get("percepiano", {})
            self.metrics.observe_request(route, status["code"], seconds, extra.get("error_type"))
            line = {"request_id": rid, "method": scope.get("method"), "route": route, "status": status["code"],
                    "bytes_in": sizes["in"], "bytes_out": sizes["out"], "seconds": round(seconds, 6),
                    "audio_seconds": extra.get("audio_seconds"),
                    "timings": {k: round(v, 6) for k, v in extra.get("timings", {}).items()},
                    "error_type": extra.get("error_type")}
            log.info(json.dumps(line, sort_keys=True))
