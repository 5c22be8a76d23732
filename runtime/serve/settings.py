"""Limits and auth of the HTTP service, with PERCEPIANO_* environment overrides (no web framework needed)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from runtime.errors import ConfigError

logger = logging.getLogger(__name__)

LEGACY_ALIASES = {"PERCEPIANO_MAX_SECONDS": "PERCEPIANO_REFUSE_OVER_SECONDS"}  # old name -> new name
BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


@dataclass(frozen=True)
class Settings:
    """Limits and auth of one service; `from_env` reads the PERCEPIANO_* overrides."""

    max_bytes: int = 50_000_000  # request body limit (PERCEPIANO_MAX_BYTES)
    # refusal limit: longer audio or spectrograms get 413 (PERCEPIANO_REFUSE_OVER_SECONDS, alias PERCEPIANO_MAX_SECONDS)
    refuse_over_seconds: float | None = 600.0
    cap_seconds: float | None = None  # analyse only the first N s, as the original's 30 s cap (PERCEPIANO_CAP_SECONDS)
    api_token: str | None = None  # bearer token; None = no auth (PERCEPIANO_API_TOKEN)
    max_concurrency: int = 2  # analyses running at once (PERCEPIANO_MAX_CONCURRENCY)
    max_queue: int = 32  # requests waiting for a slot beyond that; more get 503 at once (PERCEPIANO_MAX_QUEUE)
    queue_timeout: float = 30.0  # seconds a request may wait for a slot before 503 (PERCEPIANO_QUEUE_TIMEOUT)
    # the whole body's deadline: body_timeout s plus one s per body_min_rate bytes of its size, else 408
    body_timeout: float = 120.0  # PERCEPIANO_BODY_TIMEOUT
    body_min_rate: float = 50_000.0  # bytes/s, 0 = no growth (PERCEPIANO_BODY_MIN_RATE): 50 MB may take 1,120 s
    body_idle_timeout: float = 30.0  # seconds without a body byte, else 408 and close (PERCEPIANO_BODY_IDLE_TIMEOUT)
    header_timeout: float = 30.0  # seconds for a request's headers, else 408 and close (PERCEPIANO_HEADER_TIMEOUT)
    max_body_memory: int = 256_000_000  # request-body bytes held at once, at most (PERCEPIANO_MAX_BODY_MEMORY)
    allow_failed_self_check: bool = False  # serve a model whose self-check failed (PERCEPIANO_ALLOW_FAILED_SELF_CHECK)
    metrics_auth: bool = True  # /metrics behind the API token when one is set (PERCEPIANO_METRICS_AUTH)
    # cross-request batching (runtime.serve.batcher): the most ms a request waits for others' windows to share an
    # inference call; 0 = off, None = auto: 10 ms on CUDA, off on the CPU, decided when the model is loaded
    batch_wait_ms: float | None = None  # PERCEPIANO_BATCH_WAIT_MS ("auto", or ms)
    max_batch_chunks: int = 32  # windows per merged inference call, at most (PERCEPIANO_MAX_BATCH_CHUNKS)
    # the cost metrics: the price table's container this service runs as (None: modal-a10g on CUDA, modal-cpu on
    # the CPU; runtime/serve/prices.json) and the daily budget the spend alert compares with (None: no budget)
    price_container: str | None = None  # PERCEPIANO_PRICE_CONTAINER
    daily_budget_usd: float | None = None  # PERCEPIANO_DAILY_BUDGET_USD
    cuda_tf32: bool = False  # CUDA: float32 products in TF32, own self-check tolerance (PERCEPIANO_CUDA_TF32)
    request_log: bool = True  # one JSON line per request on stderr at the default level (PERCEPIANO_REQUEST_LOG)

    ENV = {"max_bytes": ("PERCEPIANO_MAX_BYTES", int), "refuse_over_seconds": ("PERCEPIANO_REFUSE_OVER_SECONDS", float),
           "cap_seconds": ("PERCEPIANO_CAP_SECONDS", float),
           "api_token": ("PERCEPIANO_API_TOKEN", str), "max_concurrency": ("PERCEPIANO_MAX_CONCURRENCY", int),
           "max_queue": ("PERCEPIANO_MAX_QUEUE", int), "queue_timeout": ("PERCEPIANO_QUEUE_TIMEOUT", float),
           "body_timeout": ("PERCEPIANO_BODY_TIMEOUT", float),
           "body_min_rate": ("PERCEPIANO_BODY_MIN_RATE", float),
           "body_idle_timeout": ("PERCEPIANO_BODY_IDLE_TIMEOUT", float),
           "header_timeout": ("PERCEPIANO_HEADER_TIMEOUT", float),
           "max_body_memory": ("PERCEPIANO_MAX_BODY_MEMORY", int),
           "allow_failed_self_check": ("PERCEPIANO_ALLOW_FAILED_SELF_CHECK", bool),
           "metrics_auth": ("PERCEPIANO_METRICS_AUTH", bool),
           "batch_wait_ms": ("PERCEPIANO_BATCH_WAIT_MS", float),
           "max_batch_chunks": ("PERCEPIANO_MAX_BATCH_CHUNKS", int),
           "price_container": ("PERCEPIANO_PRICE_CONTAINER", str),
           "daily_budget_usd": ("PERCEPIANO_DAILY_BUDGET_USD", float),
           "cuda_tf32": ("PERCEPIANO_CUDA_TF32", bool), "request_log": ("PERCEPIANO_REQUEST_LOG", bool)}
    AUTO_BATCH_WAIT_MS = {"cuda": 10.0, "cpu": 0.0}  # batch_wait_ms=None, by the device the model runs on
    MAX_BATCH_WAIT_MS = 1000.0  # a longer wait would only add latency: refused as a likely unit mistake

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_concurrency < 1 or self.max_queue < 0 or self.queue_timeout < 0 \
                or not self.body_timeout > 0 or self.max_body_memory < 1 or not self.body_idle_timeout > 0 \
                or not self.header_timeout > 0 or not self.body_min_rate >= 0:
            raise ConfigError(f"invalid service limits: {self}")
        if self.refuse_over_seconds is not None and self.refuse_over_seconds <= 0:
            raise ConfigError(f"refuse_over_seconds must be positive or None, got {self.refuse_over_seconds}")
        if self.batch_wait_ms is not None and not 0 <= self.batch_wait_ms <= self.MAX_BATCH_WAIT_MS:
            raise ConfigError(f"PERCEPIANO_BATCH_WAIT_MS must be 'auto' or 0 .. {self.MAX_BATCH_WAIT_MS:g} ms "
                              f"(0 = off), got {self.batch_wait_ms}")
        if not 1 <= self.max_batch_chunks <= 1024:
            raise ConfigError(f"PERCEPIANO_MAX_BATCH_CHUNKS must be 1 .. 1024 windows, got {self.max_batch_chunks}")
        if self.daily_budget_usd is not None and not 0 < self.daily_budget_usd < float("inf"):
            raise ConfigError(f"PERCEPIANO_DAILY_BUDGET_USD must be a positive number of dollars, got "
                              f"{self.daily_budget_usd}")
        if self.price_container is not None:
            from runtime.serve.prices import container_rate

            container_rate(self.price_container, "")  # a name the price table does not have stops here
        from runtime.audio import check_cap  # lazy: reading settings needs no decoder

        check_cap(self.cap_seconds, self.refuse_over_seconds)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, require_token: bool = False, **overrides) -> Settings:
        """Defaults, then PERCEPIANO_* variables, then keyword overrides; require_token refuses to run without one."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        env = _with_alias(env, LEGACY_ALIASES)
        for name, (var, kind) in cls.ENV.items():
            raw = env.get(var, "").strip()
            if not raw:
                continue
            if name in ("refuse_over_seconds", "cap_seconds") and raw.lower() in ("none", "0"):
                values[name] = None
                continue
            if name == "batch_wait_ms" and raw.lower() == "auto":
                values[name] = None
                continue
            if kind is bool:
                if raw.lower() not in BOOLEANS:
                    raise ConfigError(f"{var}={raw!r} is not one of {sorted(BOOLEANS)}")
                values[name] = BOOLEANS[raw.lower()]
                continue
            try:
                values[name] = kind(raw)
            except ValueError:
                hint = " or 'auto'" if name == "batch_wait_ms" else ""
                raise ConfigError(f"{var}={raw!r} is not a valid {kind.__name__}{hint}") from None
        settings = cls(**{**values, **overrides})
        if require_token and not settings.api_token:
            raise ConfigError("this deployment requires auth: set PERCEPIANO_API_TOKEN (locally or in a Modal secret)")
        return settings

    def body_budget(self, slack: int = 0) -> int:
        """Request-body bytes held at once: every admitted place's largest body (`slack` is framing on top),
        capped by max_body_memory, but never below one largest body."""
        largest = self.max_bytes + slack
        return max(largest, min((self.max_concurrency + self.max_queue) * largest, self.max_body_memory))

    def batch_wait_for(self, device: str) -> float:
        """The batching wait in ms for a model on `device` ('cpu' or 'cuda'): the setting, or auto's choice."""
        return self.AUTO_BATCH_WAIT_MS.get(device, 0.0) if self.batch_wait_ms is None else self.batch_wait_ms

    def public(self) -> dict[str, Any]:
        """The limits a client may see (no token)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "api_token"}
        return {**out, "auth": bool(self.api_token)}


def _with_alias(env: Mapping[str, str], aliases: Mapping[str, str]) -> Mapping[str, str]:
    """The environment with each old variable name read as its new one; both set and different is an error."""
    out = dict(env)
    for old, new in aliases.items():
        if env.get(old, "").strip():
            logger.warning("%s is deprecated: it is the refusal limit, now named %s", old, new)
            if env.get(new, "").strip() and env[new].strip() != env[old].strip():
                raise ConfigError(f"{old}={env[old]!r} and {new}={env[new]!r} disagree: set only {new}")
            out[new] = env[old]
    return out
