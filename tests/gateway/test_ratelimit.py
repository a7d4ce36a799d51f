"""Per-client token buckets: 429 with Retry-After through a real uvicorn server (gate S02)."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.ratelimit import RateLimitMiddleware, RateLimitSettings, TokenBuckets
from tests.gateway.test_browser import serving

pytestmark = pytest.mark.gate("S02")


class FakeClock:
    """A clock the test advances by hand (time, not a service, is what is faked)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_the_burst_then_refills_at_the_rate() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(rate=2.0, burst=3, max_clients=10, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0  # another client, its own bucket
    clock.now += 0.5
    assert buckets.take("a") == 0.0
    assert buckets.take("a") == pytest.approx(0.5)
    clock.now += 100
    assert [buckets.take("a") for _ in range(4)][-1] > 0  # refilled to the burst, never beyond


def test_buckets_are_bounded() -> None:
    buckets = TokenBuckets(rate=1.0, burst=1, max_clients=2, clock=FakeClock())
    for key in ("a", "b", "c"):
        buckets.take(key)
    assert len(buckets) == 2
    assert buckets.take("a") == 0.0  # "a" was evicted: a fresh bucket


def app(settings: RateLimitSettings) -> RateLimitMiddleware:
    async def hello(request: Request) -> Response:
        return JSONResponse({"hello": "world"})

    routes = [Route("/v1/hello", hello), Route("/healthz", hello)]
    return RateLimitMiddleware(Starlette(routes=routes), settings=settings)


async def test_429_with_retry_after_per_client_address() -> None:
    settings = RateLimitSettings(requests_per_second=0.2, burst=2)
    async with serving(app(settings)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            statuses = [(await client.get("/v1/hello")).status_code for _ in range(2)]
            limited = await client.get("/v1/hello", headers={"x-request-id": "rl-test-1"})
            # Health probes are never limited.
            assert (await client.get("/healthz")).status_code == 200
        # Another client address (loopback 127.0.0.2) has its own bucket.
        other = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(base_url=url, transport=other) as client:
            assert (await client.get("/v1/hello")).status_code == 200
    assert statuses == [200, 200]
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 5
    assert limited.headers["x-request-id"] == "rl-test-1"
    body = limited.json()
    assert body["code"] == 8  # RESOURCE_EXHAUSTED
    assert body["message"] == "rate limit exceeded"
    types = {detail["@type"].rsplit(".", 1)[-1] for detail in body["details"]}
    assert {"ErrorInfo", "RetryInfo", "RequestInfo"} <= types


async def test_disabled_limiter_passes_everything() -> None:
    settings = RateLimitSettings(enabled=False, requests_per_second=0.01, burst=1)
    async with serving(app(settings)) as url, httpx.AsyncClient(base_url=url) as client:
        assert [(await client.get("/v1/hello")).status_code for _ in range(5)] == [200] * 5
