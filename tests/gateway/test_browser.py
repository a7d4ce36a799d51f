"""Browser sessions through a real uvicorn server and the real identity/tenancy services (gate S02).

The app under test mounts `gateway.browser` routes next to three small handlers that do what the
gateway core does for any RPC: ask `BrowserAuth.resolve_credentials` for the token, then call tenancy
over gRPC with it (ListWorkspaces, CreateWorkspace, GetWorkspace with a workspace-token exchange).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
import uvicorn
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.app import create_app
from gateway.browser import BrowserAuth, BrowserHttpError, BrowserSettings, request_id_of
from gateway.descriptors import domain_of
from gateway.errors import rpc_error_response
from gateway.ratelimit import RateLimitMiddleware, RateLimitSettings
from gateway.settings import GatewaySettings
from tessera.identity.v1 import identity_service_pb2 as ids
from tessera.identity.v1 import identity_service_pb2_grpc as ids_grpc
from tessera.tenancy.v1 import tenancy_pb2
from tessera.tenancy.v1 import tenancy_service_pb2 as ts
from tessera.tenancy.v1 import tenancy_service_pb2_grpc as ts_grpc
from tessera_cli.embedded import free_port
from tests.e2e.stack import Mesh, running_mesh
from tests.helpers import eventually
from tests.identity.oidc_provider import OidcProvider, register_client, running_provider, set_user, sign_in_at_provider

pytestmark = pytest.mark.gate("S02")

ORIGIN = "http://localhost:5173"
EVIL_ORIGIN = "https://evil.example"
PASSWORD = "correct horse battery staple 7"  # test password
IDENTITY = "tessera.identity.v1.IdentityService"
TENANCY = "tessera.tenancy.v1.TenancyService"
OIDC_REDIRECT_URI = f"{ORIGIN}/auth/oidc/callback"


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """Run `app` on a real uvicorn server on a free loopback port; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: _started(server, task), timeout=10, what="uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def _started(server: uvicorn.Server, task: asyncio.Task[None]) -> bool:
    if task.done():
        task.result()
    return bool(server.started)


def tenancy_app(auth: BrowserAuth, tenancy: Any, *, rate_limit: RateLimitSettings) -> Any:
    """A minimal gateway: the browser routes plus handlers calling tenancy with the resolved credentials."""

    async def credentials(request: Request, workspace_id: str | None) -> tuple[tuple[str, str], ...]:
        token = await auth.resolve_credentials(request, workspace_id)
        return (("authorization", f"Bearer {token}"),) if token else ()

    async def call(
        request: Request, workspace_id: str | None, rpc: Callable[..., Awaitable[Any]], message: Any
    ) -> Response:
        try:
            try:
                response = await rpc(message, metadata=await credentials(request, workspace_id), timeout=10)
            except grpc.aio.AioRpcError as error:
                # A cached workspace token that stopped working (e.g. the role changed): exchange again, once.
                unauthenticated = error.code() == grpc.StatusCode.UNAUTHENTICATED
                if not (unauthenticated and workspace_id and auth.forget_workspace_token(request, workspace_id)):
                    raise
                response = await rpc(message, metadata=await credentials(request, workspace_id), timeout=10)
        except BrowserHttpError as error:
            return error.response(request_id_of(request))
        except grpc.aio.AioRpcError as error:
            return rpc_error_response(error, request_id=request_id_of(request))
        return JSONResponse(json_format.MessageToDict(response))

    async def list_workspaces(request: Request) -> Response:
        return await call(request, None, tenancy.ListWorkspaces, ts.ListWorkspacesRequest())

    async def create_workspace(request: Request) -> Response:
        body = await request.json()
        workspace = tenancy_pb2.Workspace(display_name=body["displayName"])
        return await call(request, None, tenancy.CreateWorkspace, ts.CreateWorkspaceRequest(workspace=workspace))

    async def get_workspace(request: Request) -> Response:
        workspace_id = request.path_params["workspace"]
        message = ts.GetWorkspaceRequest(name=f"workspaces/{workspace_id}")
        return await call(request, workspace_id, tenancy.GetWorkspace, message)

    app = Starlette(
        routes=[
            *auth.routes(),
            Route("/v1/workspaces", list_workspaces, methods=["GET"]),
            Route("/v1/workspaces", create_workspace, methods=["POST"]),
            Route("/v1/workspaces/{workspace}", get_workspace, methods=["GET"]),
        ]
    )
    return RateLimitMiddleware(app, settings=rate_limit, client_key=auth.client_key)


@dataclass
class Stack:
    url: str
    auth: BrowserAuth
    identity: Any
    tenancy: Any
    channels: dict[str, grpc.aio.Channel]
    secure_url: str
    addresses: dict[str, str]
    provider: OidcProvider


@pytest.fixture(scope="module")
async def stack(admin_url: str, nats_url: str) -> AsyncIterator[Stack]:
    with running_provider() as provider:
        async with httpx.AsyncClient(timeout=10) as http:
            oidc_client = await register_client(http, provider, redirect_uris=[OIDC_REDIRECT_URI])
        oidc = {
            "issuer": provider.issuer,
            "client_id": oidc_client.client_id,
            "client_secret": oidc_client.client_secret,
            "redirect_uris": [OIDC_REDIRECT_URI],
        }
        # No grace window: a replayed refresh token must count as reuse at once.
        identity = {"refresh_grace_seconds": 0, "oidc_providers": {"mock": oidc}}
        async with (
            running_mesh(admin_url, nats_url, identity=identity) as mesh,
            _started_stack(mesh, provider) as stack,
        ):
            yield stack


@asynccontextmanager
async def _started_stack(mesh: Mesh, provider: OidcProvider) -> AsyncIterator[Stack]:
    channels = {name: grpc.aio.insecure_channel(address) for name, address in mesh.addresses.items()}
    identity = ids_grpc.IdentityServiceStub(channels[IDENTITY])
    tenancy = ts_grpc.TenancyServiceStub(channels[TENANCY])
    auth = BrowserAuth(BrowserSettings(allowed_origins=(ORIGIN,), cookie_secure=False), channels[IDENTITY])
    secure = BrowserAuth(BrowserSettings(allowed_origins=("https://app.example",)), channels[IDENTITY])
    generous = RateLimitSettings(requests_per_second=10_000, burst=10_000)
    try:
        async with (
            serving(tenancy_app(auth, tenancy, rate_limit=generous)) as url,
            serving(tenancy_app(secure, tenancy, rate_limit=generous)) as secure_url,
        ):
            yield Stack(url, auth, identity, tenancy, channels, secure_url, mesh.addresses, provider)
    finally:
        for channel in channels.values():
            await channel.close()


async def sign_up(stack: Stack, label: str) -> str:
    """A new user's email (password PASSWORD)."""
    email = f"{label}.{uuid.uuid4().hex[:10]}@example.com"
    await stack.identity.SignUp(ids.SignUpRequest(email=email, password=PASSWORD, display_name=label))
    return email


def set_cookies(response: httpx.Response) -> dict[str, Any]:
    """The cookies a response sets, by name (morsels with their attributes)."""
    cookies: dict[str, Any] = {}
    for header in response.headers.get_list("set-cookie"):
        parsed: SimpleCookie = SimpleCookie()
        parsed.load(header)
        for name, morsel in parsed.items():
            cookies[name] = morsel
    return cookies


class Browser:
    """A browser-like client: keeps the session cookies itself and sends them (with the Origin) explicitly."""

    def __init__(self, client: httpx.AsyncClient, *, origin: str = ORIGIN) -> None:
        self.client = client
        self.origin = origin
        self.jar: dict[str, str] = {}

    def absorb(self, response: httpx.Response) -> None:
        for name, morsel in set_cookies(response).items():
            if morsel["max-age"] == "0":
                self.jar.pop(name, None)
            else:
                self.jar[name] = morsel.value

    def cookie_header(self, names: tuple[str, ...] | None = None) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.jar.items() if names is None or k in names)

    async def request(
        self, method: str, path: str, *, csrf: bool = True, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> httpx.Response:
        sent = {"origin": self.origin, "cookie": self.cookie_header()}
        if csrf and "tessera_csrf" in self.jar:
            sent["x-csrf-token"] = self.jar["tessera_csrf"]
        sent.update(headers or {})
        self.client.cookies.clear()  # only this browser's own jar is sent
        response = await self.client.request(method, path, headers={k: v for k, v in sent.items() if v}, **kwargs)
        self.client.cookies.clear()
        self.absorb(response)
        return response

    async def sign_in(self, email: str, password: str = PASSWORD) -> httpx.Response:
        return await self.request("POST", "/auth/sign-in", json={"email": email, "password": password})


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url, timeout=20) as client:
        yield client


async def signed_in(stack: Stack, client: httpx.AsyncClient, label: str) -> Browser:
    browser = Browser(client)
    response = await browser.sign_in(await sign_up(stack, label))
    assert response.status_code == 200, response.text
    return browser


async def test_sign_in_sets_session_cookies_and_returns_only_the_user(stack: Stack, client: httpx.AsyncClient) -> None:
    email = await sign_up(stack, "cookies")
    browser = Browser(client)
    response = await browser.sign_in(email)
    assert response.status_code == 200, response.text
    assert response.json()["user"]["email"] == email
    cookies = set_cookies(response)
    access, refresh, csrf = cookies["tessera_access"], cookies["tessera_refresh"], cookies["tessera_csrf"]
    assert access.value not in response.text
    assert refresh.value not in response.text
    assert response.json()["csrfToken"] == csrf.value  # for pages on another allowed origin
    assert access["httponly"]
    assert refresh["httponly"]
    assert not csrf["httponly"]
    assert access["samesite"].lower() == refresh["samesite"].lower() == "lax"
    assert access["path"] == "/"
    assert refresh["path"] == "/auth"
    assert csrf["path"] == "/"
    assert 500 <= int(access["max-age"]) <= 600  # the access token's 10 minutes
    assert int(refresh["max-age"]) > 86_400  # the refresh token's days
    assert not access["secure"]  # turned off for http://localhost development only
    assert response.headers["cache-control"] == "no-store"


async def test_secure_cookies_by_default(stack: Stack) -> None:
    email = await sign_up(stack, "secure")
    async with httpx.AsyncClient(base_url=stack.secure_url) as client:
        response = await client.post(
            "/auth/sign-in", json={"email": email, "password": PASSWORD}, headers={"origin": "https://app.example"}
        )
    assert response.status_code == 200, response.text
    cookies = set_cookies(response)
    assert all(cookies[name]["secure"] for name in ("tessera_access", "tessera_refresh", "tessera_csrf"))


def test_insecure_cookies_refused_for_a_non_local_origin() -> None:
    with pytest.raises(ValueError, match="only for http://localhost"):
        BrowserSettings(allowed_origins=("https://app.example",), cookie_secure=False)


async def test_wrong_password_sets_no_cookie(stack: Stack, client: httpx.AsyncClient) -> None:
    email = await sign_up(stack, "wrong")
    response = await Browser(client).sign_in(email, "not the password at all")
    assert response.status_code == 401
    assert response.json()["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert not set_cookies(response)


async def test_sign_in_from_a_foreign_origin_is_refused(stack: Stack, client: httpx.AsyncClient) -> None:
    email = await sign_up(stack, "logincsrf")
    response = await Browser(client, origin=EVIL_ORIGIN).sign_in(email)
    assert response.status_code == 403
    assert response.json()["message"] == "CSRF check failed"
    assert not set_cookies(response)


async def test_cookie_session_call_refresh_reuse_and_revocation(stack: Stack, client: httpx.AsyncClient) -> None:
    browser = await signed_in(stack, client, "flow")
    listed = await browser.request("GET", "/v1/workspaces")
    assert listed.status_code == 200, listed.text

    created = await browser.request("POST", "/v1/workspaces", json={"displayName": "browser flow"})
    assert created.status_code == 200, created.text
    workspace_id = created.json()["workspace"]["name"].removeprefix("workspaces/")

    # Workspace-level RPC: the session is exchanged for a workspace token, then served from the cache.
    cache = stack.auth.workspace_tokens
    misses, hits = cache.misses, cache.hits
    first = await browser.request("GET", f"/v1/workspaces/{workspace_id}")
    assert first.status_code == 200, first.text
    assert first.json()["workspace"]["displayName"] == "browser flow"
    assert (cache.misses, cache.hits) == (misses + 1, hits)
    second = await browser.request("GET", f"/v1/workspaces/{workspace_id}")
    assert second.status_code == 200, second.text
    assert (cache.misses, cache.hits) == (misses + 1, hits + 1)

    # Refresh: both tokens rotate.
    old = dict(browser.jar)
    refreshed = await browser.request("POST", "/auth/refresh")
    assert refreshed.status_code == 200, refreshed.text
    assert browser.jar["tessera_access"] != old["tessera_access"]
    assert browser.jar["tessera_refresh"] != old["tessera_refresh"]
    assert "tessera_access" not in refreshed.text
    assert (await browser.request("GET", f"/v1/workspaces/{workspace_id}")).status_code == 200
    assert cache.misses == misses + 2  # a new session token: a new exchange

    # Replaying the spent refresh token: 401, cookies cleared, and the whole session is revoked.
    replay = Browser(client)
    replay.jar = dict(old)
    replayed = await replay.request("POST", "/auth/refresh")
    assert replayed.status_code == 401
    assert replayed.headers["www-authenticate"].startswith("Bearer")
    cleared = set_cookies(replayed)
    assert {cleared[name]["max-age"] for name in ("tessera_access", "tessera_refresh", "tessera_csrf")} == {"0"}

    async def rejected() -> bool:
        response = await browser.request("GET", "/v1/workspaces")
        return response.status_code == 401

    await eventually(rejected, timeout=10, what="the rotated session's access cookie to be rejected")
    assert (await browser.request("POST", "/auth/refresh")).status_code == 401


async def test_sign_out_clears_cookies_and_ends_the_session(stack: Stack, client: httpx.AsyncClient) -> None:
    browser = await signed_in(stack, client, "signout")
    access = browser.jar["tessera_access"]
    response = await browser.request("POST", "/auth/sign-out")
    assert response.status_code == 200, response.text
    assert response.json() == {"revokedSessions": 1}
    cleared = set_cookies(response)
    assert {cleared[name]["max-age"] for name in ("tessera_access", "tessera_refresh", "tessera_csrf")} == {"0"}
    assert cleared["tessera_refresh"]["path"] == "/auth"
    assert browser.jar == {}

    stale = Browser(client)
    stale.jar = {"tessera_access": access}

    async def rejected() -> bool:
        return (await stale.request("GET", "/v1/workspaces")).status_code == 401

    await eventually(rejected, timeout=10, what="the signed-out session's access cookie to be rejected")


async def test_sign_out_after_the_access_cookie_expired_uses_the_refresh_cookie(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    browser = await signed_in(stack, client, "expired")
    refresh = browser.jar["tessera_refresh"]
    del browser.jar["tessera_access"]  # what the browser does once its Max-Age is over
    response = await browser.request("POST", "/auth/sign-out")
    assert response.status_code == 200, response.text
    assert response.json() == {"revokedSessions": 1}
    later = Browser(client)
    later.jar = {"tessera_refresh": refresh, "tessera_csrf": "x"}
    assert (await later.request("POST", "/auth/refresh")).status_code == 401


@pytest.mark.parametrize(
    ("case", "headers"),
    [
        ("no CSRF header", {"x-csrf-token": ""}),
        ("wrong CSRF token", {"x-csrf-token": "not-the-cookie"}),
        ("foreign Origin", {"origin": EVIL_ORIGIN}),
        ("no Origin nor Referer", {"origin": ""}),
        ("foreign Referer without Origin", {"origin": "", "referer": f"{EVIL_ORIGIN}/page"}),
    ],
)
async def test_csrf_rejections(stack: Stack, client: httpx.AsyncClient, case: str, headers: dict[str, str]) -> None:
    browser = await signed_in(stack, client, "csrf")
    response = await browser.request("POST", "/v1/workspaces", headers=headers, json={"displayName": case})
    assert response.status_code == 403, case
    body = response.json()
    assert body["code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert body["message"] == "CSRF check failed"
    assert body["details"][0]["reason"] == "CSRF_FAILED"
    # Nothing was created.
    listed = await browser.request("GET", "/v1/workspaces")
    assert case not in listed.text
    # Refresh and sign-out are cookie-authenticated and state-changing too.
    assert (await browser.request("POST", "/auth/refresh", headers=headers)).status_code == 403
    assert (await browser.request("POST", "/auth/sign-out", headers=headers)).status_code == 403
    assert (await browser.request("GET", "/v1/workspaces")).status_code == 200


async def test_csrf_acceptance(stack: Stack, client: httpx.AsyncClient) -> None:
    browser = await signed_in(stack, client, "csrfok")
    ok = await browser.request("POST", "/v1/workspaces", json={"displayName": "with origin"})
    assert ok.status_code == 200, ok.text
    by_referer = await browser.request(
        "POST", "/v1/workspaces", headers={"origin": "", "referer": f"{ORIGIN}/settings"}, json={"displayName": "ref"}
    )
    assert by_referer.status_code == 200, by_referer.text
    # Same origin as the gateway itself is allowed without listing it.
    same = await browser.request("POST", "/v1/workspaces", headers={"origin": stack.url}, json={"displayName": "same"})
    assert same.status_code == 200, same.text
    # Safe methods need no token.
    assert (
        await browser.request("GET", "/v1/workspaces", csrf=False, headers={"origin": EVIL_ORIGIN})
    ).status_code == 200


async def test_bearer_header_bypasses_csrf_and_wins_over_cookies(stack: Stack, client: httpx.AsyncClient) -> None:
    email = await sign_up(stack, "bearer")
    signed = await stack.identity.SignIn(ids.SignInRequest(email=email, password=PASSWORD))
    token = signed.tokens.access_token
    created = await client.post(
        "/v1/workspaces",
        json={"displayName": "bearer made"},
        headers={"authorization": f"Bearer {token}", "origin": EVIL_ORIGIN},
    )
    assert created.status_code == 200, created.text
    # With another user's session cookie present, the bearer token still decides who is calling.
    other = await signed_in(stack, client, "cookieuser")
    listed = await client.get(
        "/v1/workspaces", headers={"authorization": f"Bearer {token}", "cookie": other.cookie_header()}
    )
    assert listed.status_code == 200
    assert "bearer made" in listed.text
    malformed = await client.get("/v1/workspaces", headers={"authorization": "Basic Zm9vOmJhcg=="})
    assert malformed.status_code == 401


async def test_workspace_of_someone_else_is_not_found(stack: Stack, client: httpx.AsyncClient) -> None:
    owner = await signed_in(stack, client, "owner")
    created = await owner.request("POST", "/v1/workspaces", json={"displayName": "private"})
    workspace_id = created.json()["workspace"]["name"].removeprefix("workspaces/")
    intruder = await signed_in(stack, client, "intruder")
    response = await intruder.request("GET", f"/v1/workspaces/{workspace_id}")
    assert response.status_code == 404
    assert "private" not in response.text


async def test_no_session_is_unauthenticated(stack: Stack, client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/workspaces")
    assert response.status_code == 401
    assert (await client.post("/auth/refresh", headers={"origin": ORIGIN})).status_code == 401


async def test_rate_limit_is_per_verified_subject(stack: Stack) -> None:
    auth = BrowserAuth(BrowserSettings(allowed_origins=(ORIGIN,), cookie_secure=False), stack.channels[IDENTITY])
    tight = RateLimitSettings(requests_per_second=0.01, burst=2)
    first, second = [
        await stack.identity.SignIn(ids.SignInRequest(email=await sign_up(stack, label), password=PASSWORD))
        for label in ("rl1", "rl2")
    ]
    async with serving(tenancy_app(auth, stack.tenancy, rate_limit=tight)) as url, httpx.AsyncClient(base_url=url) as c:

        async def get(token: str) -> httpx.Response:
            return await c.get("/v1/workspaces", headers={"authorization": f"Bearer {token}"})

        assert [(await get(first.tokens.access_token)).status_code for _ in range(3)] == [200, 200, 429]
        # Same IP, another user: a bucket of its own.
        assert (await get(second.tokens.access_token)).status_code == 200
        # A token that does not verify is no subject: it counts against the IP.
        forged = first.tokens.access_token[:-4] + ("AAAA" if not first.tokens.access_token.endswith("AAAA") else "BBBB")
        assert [(await get(forged)).status_code for _ in range(2)] == [401, 401]
        limited = await get(forged)
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1


async def test_cors_preflight_of_the_gateway_app(stack: Stack) -> None:
    settings = GatewaySettings(
        addresses={domain_of(name): address for name, address in stack.addresses.items()}, cors_origins=[ORIGIN]
    )
    async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as client:
        preflight = {
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, x-csrf-token",
        }
        allowed = await client.options("/v1/workspaces", headers={"origin": ORIGIN, **preflight})
        refused = await client.options("/v1/workspaces", headers={"origin": EVIL_ORIGIN, **preflight})
        simple = await client.get("/v1/workspaces", headers={"origin": EVIL_ORIGIN})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "x-csrf-token" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in refused.headers
    assert "access-control-allow-origin" not in simple.headers


async def test_oidc_sign_in_through_the_gateway(stack: Stack, client: httpx.AsyncClient) -> None:
    sub = f"sub-{uuid.uuid4().hex[:10]}"
    email = f"oidc.{uuid.uuid4().hex[:10]}@example.com"
    async with httpx.AsyncClient(timeout=10) as http:
        await set_user(http, stack.provider, sub, {"email": email, "email_verified": True, "name": "Oidc"})
        browser = Browser(client)
        started = await browser.request(
            "POST", "/auth/oidc/start", json={"provider": "mock", "redirectUri": OIDC_REDIRECT_URI}
        )
        assert started.status_code == 200, started.text
        bound = set_cookies(started)["tessera_oidc_state"]
        assert bound["httponly"]
        assert bound["path"] == "/auth"
        returned = await sign_in_at_provider(http, started.json()["authorizationUrl"], sub=sub)

    # The callback reaching another browser (no state cookie: login CSRF) signs nobody in.
    stranger = Browser(client)
    query = {"state": returned.state, "code": returned.code}
    refused = await stranger.request("GET", "/auth/oidc/callback", params=query)
    assert refused.status_code == 303
    assert refused.headers["location"] == "/?error=state_mismatch"
    assert "tessera_access" not in stranger.jar

    completed = await browser.request("GET", "/auth/oidc/callback", params=query)
    assert completed.status_code == 303
    assert completed.headers["location"] == "/"
    assert {"tessera_access", "tessera_refresh", "tessera_csrf"} <= set(browser.jar)
    assert "tessera_oidc_state" not in browser.jar
    listed = await browser.request("GET", "/v1/workspaces")
    assert listed.status_code == 200, listed.text

    # The state is single-use: replaying the callback fails and sets no session.
    replay = Browser(client)
    replay.jar = {"tessera_oidc_state": bound.value}
    again = await replay.request("GET", "/auth/oidc/callback", params=query)
    assert again.headers["location"] == "/?error=oidc_failed"
    assert "tessera_access" not in replay.jar


async def test_oidc_start_refuses_an_unknown_provider(stack: Stack, client: httpx.AsyncClient) -> None:
    response = await Browser(client).request(
        "POST", "/auth/oidc/start", json={"provider": "nope", "redirectUri": OIDC_REDIRECT_URI}
    )
    assert response.status_code == 400
    assert response.json()["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_role_change_renews_the_cached_workspace_token(
    stack: Stack, client: httpx.AsyncClient, admin_url: str
) -> None:
    owner = await signed_in(stack, client, "roleowner")
    created = await owner.request("POST", "/v1/workspaces", json={"displayName": "roles"})
    workspace_id = created.json()["workspace"]["name"].removeprefix("workspaces/")
    member_email = await sign_up(stack, "rolemember")
    member = Browser(client)
    signed = await member.sign_in(member_email)
    member_id = signed.json()["user"]["name"].removeprefix("users/")
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(
            "INSERT INTO tenancy.members (tenant_id, user_id, role) VALUES ($1, $2, 'viewer')",
            uuid.UUID(workspace_id),
            uuid.UUID(member_id),
        )
    finally:
        await admin.close()
    assert (await member.request("GET", f"/v1/workspaces/{workspace_id}")).status_code == 200

    owner_token = await stack.identity.IssueWorkspaceToken(
        ids.IssueWorkspaceTokenRequest(workspace=f"workspaces/{workspace_id}"),
        metadata=(("authorization", f"Bearer {owner.jar['tessera_access']}"),),
    )
    await stack.tenancy.UpdateMember(
        ts.UpdateMemberRequest(
            member=tenancy_pb2.Member(name=f"workspaces/{workspace_id}/members/{member_id}", role="member")
        ),
        metadata=(("authorization", f"Bearer {owner_token.tokens.access_token}"),),
    )
    # The membership change revokes the cached token; every call still succeeds, through a new exchange.
    cache = stack.auth.workspace_tokens
    misses = cache.misses

    async def renewed() -> bool:
        response = await member.request("GET", f"/v1/workspaces/{workspace_id}")
        assert response.status_code == 200, response.text
        return cache.misses > misses

    await eventually(renewed, timeout=10, what="the revoked workspace token to be exchanged again")


async def test_browser_session_through_the_gateway_app(stack: Stack) -> None:
    settings = GatewaySettings(
        addresses={domain_of(name): address for name, address in stack.addresses.items()},
        cors_origins=[ORIGIN],
        browser=BrowserSettings(cookie_secure=False),
    )
    email = await sign_up(stack, "gatewayapp")
    async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
        browser = Browser(client)
        assert (await browser.sign_in(email)).status_code == 200
        created = await browser.request("POST", "/v1/workspaces", json={"displayName": "via gateway"})
        assert created.status_code == 200, created.text
        workspace_id = created.json()["workspace"]["name"].removeprefix("workspaces/")
        got = await browser.request("GET", f"/v1/workspaces/{workspace_id}")  # workspace token exchange
        assert got.status_code == 200, got.text
        assert "via gateway" in got.text
        refused = await browser.request("POST", "/v1/workspaces", csrf=False, json={"displayName": "forged"})
        assert refused.status_code == 403
        assert refused.json()["message"] == "CSRF check failed"
        assert refused.headers["x-request-id"]
        signed_out = await browser.request("POST", "/auth/sign-out")
        assert signed_out.status_code == 200
        assert (await browser.request("GET", "/v1/workspaces")).status_code == 401
