"""Per-client rate limiting: an in-memory token bucket per client, as ASGI middleware (429 + Retry-After).

A client is the `sub` of its verified access token when it sends one (so users behind one NAT do not
share a bucket), else its IP address (`scope["client"]`; list the reverse proxy in
`TESSERA_GATEWAY_FORWARDED_ALLOW_IPS` for its `X-Forwarded-For` to count). Buckets live in one process:
with N gateway replicas the effective limit is N times the configured one.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import error_response, request_info

ERROR_DOMAIN = "tessera.dev"

ClientKey = Callable[[Scope], Awaitable[str | None]]


class RateLimitSettings(BaseModel):
    """Token-bucket parameters (embed in the gateway settings)."""

    enabled: bool = True
    requests_per_second: float = Field(default=50.0, gt=0, description="sustained requests per client")
    burst: int = Field(default=200, ge=1, description="requests a client may make at once")
    max_clients: int = Field(default=100_000, ge=1, description="buckets kept; the least recently used go first")
    exempt_paths: tuple[str, ...] = Field(default=("/healthz", "/readyz"), description="never limited")


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """Token buckets by client key, bounded (least recently used evicted)."""

    def __init__(
        self, *, rate: float, burst: int, max_clients: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, key: str) -> float:
        """Take one token for `key`: 0.0 when allowed, else the seconds until a token is available."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(tokens=float(self.burst), updated=now)
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)


def client_address(scope: Scope) -> str:
    """The client's IP address as the ASGI server saw it (`unknown` when the server gives none)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class RateLimitMiddleware:
    """ASGI middleware answering 429 with `Retry-After` once a client's bucket is empty."""

    def __init__(self, app: ASGIApp, *, settings: RateLimitSettings, client_key: ClientKey | None = None) -> None:
        self.app = app
        self.settings = settings
        self.client_key = client_key
        self.buckets = TokenBuckets(
            rate=settings.requests_per_second, burst=settings.burst, max_clients=settings.max_clients
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Limit HTTP requests; pass everything else through."""
        if scope["type"] != "http" or not self.settings.enabled or scope["path"] in self.settings.exempt_paths:
            await self.app(scope, receive, send)
            return
        subject = await self.client_key(scope) if self.client_key is not None else None
        key = f"sub:{subject}" if subject else f"ip:{client_address(scope)}"
        wait = self.buckets.take(key)
        if wait <= 0.0:
            await self.app(scope, receive, send)
            return
        response = _too_many_requests(scope, retry_after=max(1, math.ceil(wait)))
        await response(scope, receive, send)


def _too_many_requests(scope: Scope, *, retry_after: int) -> Response:
    request_id = Headers(scope=scope).get("x-request-id") or uuid.uuid4().hex
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="RATE_LIMITED", domain=ERROR_DOMAIN))
    retry = any_pb2.Any()
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=retry_after)))
    return error_response(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "rate limit exceeded",
        details=[info, retry, request_info(request_id)],
        request_id=request_id,
    )
