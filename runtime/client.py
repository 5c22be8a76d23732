"""A client for the service's HTTP API (standard library only): bearer token, timeouts, retries that honour
Retry-After, and an ordered list of endpoints to fall back on.

    from runtime.client import Client
    client = Client(["https://me--percepiano-cpu-service-web.modal.run", "https://me--percepiano-service-web.modal.run"],
                    token="...")
    answer = client.analyze(Path("take.flac").read_bytes())
    answer.result["scores"], answer.endpoint

Every call tries the endpoints in order, skipping one that failed within the last `cool_off` seconds. A connection
failure, a timeout or a 5xx moves on to the next endpoint; a 503 says when to come back (Retry-After). When every
endpoint failed, the call waits (the shortest Retry-After, else a growing backoff) and goes round again, `rounds`
times in all. A 4xx is the request's own fault: no other endpoint would answer differently, so it is final
(RequestRefused), and 401 (a wrong or missing token) is a ConfigError.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.message import Message

from runtime.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0  # seconds a socket may stay silent: a long file on a cold CPU container takes a while
MAX_RETRY_AFTER = 60.0  # a Retry-After beyond this is capped (a misbehaving proxy must not park the run)


class RequestRefused(Exception):
    """The service answered the request with a 4xx (a bad file, too long, ...): final, the same everywhere."""

    def __init__(self, status: int, error_type: str, message: str, endpoint: str):
        super().__init__(message)
        self.status, self.error_type, self.endpoint = status, error_type, endpoint


class Unavailable(Exception):
    """No endpoint answered within the rounds allowed; `tried` says what each attempt met."""

    def __init__(self, tried: list[str]):
        super().__init__("no endpoint answered: " + "; ".join(tried[-6:]))
        self.tried = tried


@dataclass
class Answer:
    """A successful analysis: the service's JSON, the endpoint that answered, and the attempts it took."""

    result: dict
    endpoint: str
    attempts: int
    failed_over: list[str] = field(default_factory=list)  # what the earlier attempts met, if any


def parse_urls(text: str | Sequence[str]) -> list[str]:
    """'URL[,URL...]' (or a list) -> base URLs without a trailing slash; only http(s) with a host."""
    urls = [u.strip().rstrip("/") for u in (text.split(",") if isinstance(text, str) else text) if u.strip()]
    if not urls:
        raise ConfigError("--url needs at least one URL (http://host:port or https://...)")
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"--url {url!r} is not an http(s) URL with a host")
    return urls


class Client:
    """Analyses through the first endpoint that answers (thread-safe: one client may serve many threads)."""

    def __init__(self, urls: str | Sequence[str], *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 rounds: int = 4, backoff: float = 1.0, cool_off: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep):
        if rounds < 1 or timeout <= 0:
            raise ConfigError(f"rounds must be >= 1 and timeout > 0 (got {rounds}, {timeout})")
        self.urls = parse_urls(urls)
        self.token, self.timeout, self.rounds, self.backoff, self.cool_off = token, timeout, rounds, backoff, cool_off
        self._sleep = sleep
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def analyze(self, data: bytes, *, cap_seconds: float | None = None, content_type: str = "application/octet-stream",
                request_id: str | None = None) -> Answer:
        """POST /v1/analyze with the file's bytes, failing over as the module docstring says."""
        query = f"?{urllib.parse.urlencode({'cap_seconds': cap_seconds})}" if cap_seconds is not None else ""
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if request_id:
            headers["X-Request-ID"] = request_id
        tried: list[str] = []
        for round_ in range(self.rounds):
            wait = None
            for url in self._order():
                try:
                    result = self._post(url + "/v1/analyze" + query, data, headers)
                except _Retry as exc:
                    tried.append(f"{url}: {exc.why}")
                    logger.warning("%s: %s; trying the next endpoint", url, exc.why)
                    if exc.retry_after is not None:
                        wait = exc.retry_after if wait is None else min(wait, exc.retry_after)
                    else:
                        self._mark_down(url)
                    continue
                self._mark_up(url)
                return Answer(result, url, len(tried) + 1, tried)
            if round_ + 1 < self.rounds:
                self._sleep(wait if wait is not None else self.backoff * 2 ** round_)
        raise Unavailable(tried)

    def _order(self) -> list[str]:
        """The endpoints in their order, those that failed lately last (tried only if the others fail too)."""
        now = time.monotonic()
        with self._lock:
            down = {u for u, until in self._down_until.items() if until > now}
        return [u for u in self.urls if u not in down] + [u for u in self.urls if u in down]

    def _mark_down(self, url: str) -> None:
        with self._lock:
            self._down_until[url] = time.monotonic() + self.cool_off

    def _mark_up(self, url: str) -> None:
        with self._lock:
            self._down_until.pop(url, None)

    def _post(self, url: str, data: bytes, headers: dict[str, str]) -> dict:
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = _error_body(exc)
            if exc.code == 401:
                raise ConfigError(f"{url}: 401 {body.get('error', 'unauthorized')} (check --token or "
                                  "PERCEPIANO_API_TOKEN)") from None
            if exc.code >= 500:
                raise _Retry(f"{exc.code} {body.get('error_type', '')}".strip(),
                             _retry_after(exc.headers) if exc.code == 503 else None) from None
            raise RequestRefused(exc.code, body.get("error_type", "http_error"), body.get("error", str(exc)),
                                 url) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:  # refused, reset,
            # timed out, cut short, not JSON
            reason = getattr(exc, "reason", exc)
            raise _Retry(f"{type(reason).__name__}: {reason}", None) from None


class _Retry(Exception):
    def __init__(self, why: str, retry_after: float | None):
        super().__init__(why)
        self.why, self.retry_after = why, retry_after


def _error_body(exc: urllib.error.HTTPError) -> dict:
    try:
        body = json.loads(exc.read() or b"{}")
        return body if isinstance(body, dict) else {}
    except (ValueError, OSError):
        return {}


def _retry_after(headers: Message | None) -> float | None:
    """Retry-After in seconds (the service sends seconds; an HTTP date is not used by it, so it is ignored)."""
    raw = (headers or {}).get("Retry-After", "")
    try:
        return min(max(float(raw), 0.0), MAX_RETRY_AFTER)
    except (TypeError, ValueError):
        return None
