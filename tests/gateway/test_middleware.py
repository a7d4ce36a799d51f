"""The hot-path middleware answers exactly as the Starlette layers it stands in for, through a real uvicorn."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from gateway.descriptors import domains
from gateway.main import uvicorn_config
from gateway.middleware import ContractDispatch, OriginOnlyCORSMiddleware
from gateway.settings import GatewaySettingsError, load_settings
from gateway.transport import CoalescingHttpToolsProtocol
from tests.gateway.conftest import serve

pytestmark = pytest.mark.gate("S01")

ORIGIN = "http://app.tessera.localhost:5173"
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
CORS = {
    "allow_origins": [ORIGIN],
    "allow_credentials": True,
    "allow_methods": METHODS,
    "allow_headers": ["authorization", "content-type"],
    "expose_headers": ["x-request-id"],
    "max_age": 600,
}


async def local(request: Request) -> Response:
    return PlainTextResponse(f"local {request.url.path}", headers={"vary": "Accept"})


async def catch_all(request: Request) -> Response:
    return JSONResponse({"handler": "catch-all", "path": request.url.path, "method": request.method})


DISPATCHED: list[str] = []


async def contract(scope: Scope, receive: Receive, send: Send) -> None:
    """What the gateway answers; the same as the router's catch-all route."""
    DISPATCHED.append(f"{scope['method']} {scope['path']}")
    response = await catch_all(Request(scope, receive))
    await response(scope, receive, send)


def local_routes() -> list[BaseRoute]:
    return [
        Route("/healthz", local, methods=["GET"]),
        Route("/docs/assets/{filename}", local, methods=["GET"]),
        Route("/auth/sign-in", local, methods=["POST"]),
    ]


def app(middleware: Sequence[Middleware]) -> Starlette:
    routes = [*local_routes(), Route("/{path:path}", catch_all, methods=METHODS)]
    return Starlette(routes=routes, middleware=list(middleware))


async def answers(url: str, requests: list[tuple[str, str, dict[str, str]]]) -> list[tuple[int, str, list[Any]]]:
    """Status, body and the headers that matter here, for each (method, path, headers)."""
    found = []
    async with httpx.AsyncClient(base_url=url) as client:
        for method, path, headers in requests:
            response = await client.request(method, path, headers=headers)
            kept = sorted((k, v) for k, v in response.headers.multi_items() if k.startswith(("access-control", "vary")))
            found.append((response.status_code, response.text, kept))
    return found


async def test_cors_for_origins_only_answers_like_starlette_cors() -> None:
    preflight = {"origin": ORIGIN, "access-control-request-method": "POST"}
    requests = [
        ("GET", "/v1/things", {}),
        ("GET", "/healthz", {}),  # a response that already varies (Accept): Origin is added to it
        ("GET", "/v1/things", {"origin": ORIGIN}),
        ("GET", "/v1/things", {"origin": "https://evil.example"}),
        ("OPTIONS", "/v1/things", preflight),
        ("OPTIONS", "/v1/things", {**preflight, "origin": "https://evil.example"}),
        ("OPTIONS", "/v1/things", {**preflight, "access-control-request-headers": "x-unknown"}),
        ("OPTIONS", "/v1/things", {}),
    ]
    async with serve(app([Middleware(CORSMiddleware, **CORS)])) as url:
        expected = await answers(url, requests)
    async with serve(app([Middleware(OriginOnlyCORSMiddleware, **CORS)])) as url:
        found = await answers(url, requests)

    assert found == expected
    assert ("vary", "Origin") in found[0][2]
    assert ("vary", "Accept, Origin") in found[1][2]


async def test_contract_dispatch_answers_like_the_router() -> None:
    requests = [
        ("GET", "/v1/workspaces/w", {}),
        ("POST", "/v1/workspaces", {}),
        ("GET", "/healthz", {}),
        ("POST", "/healthz", {}),  # the local route takes GET only: the router falls through to the catch-all
        ("GET", "/docs/assets/swagger-ui.css", {}),
        ("GET", "/auth/sign-in", {}),
        ("POST", "/auth/sign-in", {}),
        ("TRACE", "/v1/workspaces", {}),  # a method the catch-all does not take: the router's 405
        ("GET", "/", {}),
    ]
    async with serve(app([])) as url:
        expected = await answers(url, requests)
    dispatch = Middleware(ContractDispatch, gateway=contract, local_routes=local_routes(), methods=METHODS)
    async with serve(app([dispatch])) as url:
        found = await answers(url, requests)

    assert found == expected
    assert [status for status, _, _ in found] == [200, 200, 200, 200, 200, 200, 200, 405, 200]
    # Only paths no local route has went past the router.
    assert DISPATCHED == ["GET /v1/workspaces/w", "POST /v1/workspaces", "GET /"]


def test_contract_dispatch_leaves_unknown_route_kinds_to_the_router() -> None:
    class NoPath(BaseRoute):
        pass

    dispatch = ContractDispatch(contract, gateway=contract, local_routes=[NoPath()], methods=METHODS)
    assert dispatch.local_paths is None  # every request goes through the router


def _settings(**overrides: Any) -> Any:
    return load_settings(addresses={domain: "127.0.0.1:1" for domain in domains()}, **overrides)


def test_uvicorn_runs_lean_by_default_and_trusts_only_configured_proxies() -> None:
    default = uvicorn_config(_settings())
    assert (default.http, default.access_log, default.proxy_headers) == (CoalescingHttpToolsProtocol, False, False)

    behind_proxy = uvicorn_config(_settings(forwarded_allow_ips="10.0.0.5, 10.1.0.0/16", access_log=True))
    assert behind_proxy.proxy_headers is True
    assert behind_proxy.forwarded_allow_ips == ["10.0.0.5", "10.1.0.0/16"]
    assert behind_proxy.access_log is True


def test_a_malformed_proxy_address_fails_fast_naming_the_variable() -> None:
    with pytest.raises(GatewaySettingsError, match="TESSERA_GATEWAY_FORWARDED_ALLOW_IPS"):
        _settings(forwarded_allow_ips="10.0.0.5, proxy.internal")
