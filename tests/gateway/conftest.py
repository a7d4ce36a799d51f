"""Gateway fixtures: the real service mesh, and the gateway served by a real uvicorn on a free loopback port."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp

from gateway.descriptors import domain_of
from gateway.settings import GatewaySettings, load_settings
from gateway.transport import CoalescingHttpToolsProtocol
from tessera_cli.embedded import free_port
from tests.e2e.stack import Mesh, running_mesh

PASSWORD = "gateway staple horse battery 42"  # test password
ALLOWED_ORIGIN = "http://app.tessera.localhost:5173"
MAX_BODY_BYTES = 64 * 1024


@asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[str]:
    """Serve `app` with a real uvicorn server on a free loopback port; yields its base URL.

    The server speaks HTTP/1.1 through the gateway's own protocol class, as `python -m gateway.main` does.
    """
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", http=CoalescingHttpToolsProtocol
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(20):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def settings_for(mesh: Mesh, **overrides: Any) -> GatewaySettings:
    """Gateway settings pointing at every backend of the mesh."""
    addresses = {domain_of(service): address for service, address in mesh.addresses.items()}
    return load_settings(
        addresses={**addresses, **overrides.pop("addresses", {})},
        cors_origins=[ALLOWED_ORIGIN],
        max_body_bytes=MAX_BODY_BYTES,
        **overrides,
    )


# Module scope, not session: the mesh's outbox relays must not outlive the gateway tests, or they drain
# the outboxes that service-layer tests elsewhere in the session inspect.
@pytest.fixture(scope="module")
async def gateway_mesh(admin_url: str, nats_url: str) -> AsyncIterator[Mesh]:
    """Identity and tenancy running in-process with enforced auth."""
    async with running_mesh(admin_url, nats_url) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def gateway_settings(gateway_mesh: Mesh) -> GatewaySettings:
    return settings_for(gateway_mesh)


@pytest.fixture(scope="module")
async def gateway_url(gateway_settings: GatewaySettings) -> AsyncIterator[str]:
    """Base URL of the gateway (create_app with the session settings) under a real uvicorn."""
    from gateway.app import create_app

    async with serve(create_app(gateway_settings)) as url:
        yield url


@pytest.fixture
async def client(gateway_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway_url, timeout=20) as http:
        yield http


@dataclass
class GatewayUser:
    """A user signed up and signed in through the gateway."""

    email: str
    user_id: str
    token: str
    display_name: str
    workspace_tokens: dict[str, str] = field(default_factory=dict)

    def bearer(self, workspace_id: str | None = None) -> dict[str, str]:
        """Authorization header with the user-level token, or the workspace token of `workspace_id`."""
        token = self.workspace_tokens[workspace_id] if workspace_id else self.token
        return {"authorization": f"Bearer {token}"}


def expect(response: httpx.Response, status: int) -> Any:
    """The JSON body, after asserting the status (the body is shown when it differs)."""
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    return response.json()


async def sign_up_and_in(client: httpx.AsyncClient, label: str) -> GatewayUser:
    """Sign up and sign in through the gateway's own REST routes."""
    email = f"{label}.{uuid.uuid4().hex[:10]}@example.com"
    display_name = f"{label} {uuid.uuid4().hex[:6]}"
    created = expect(
        await client.post("/v1/users:signUp", json={"email": email, "password": PASSWORD, "displayName": display_name}),
        200,
    )
    signed_in = expect(await client.post("/v1/sessions:signIn", json={"email": email, "password": PASSWORD}), 200)
    user_id = created["user"]["name"].removeprefix("users/")
    return GatewayUser(email, user_id, signed_in["tokens"]["accessToken"], display_name)


async def create_workspace(client: httpx.AsyncClient, user: GatewayUser, display_name: str) -> dict[str, Any]:
    """A workspace created through the gateway, with the owner's workspace token stored on `user`."""
    workspace = expect(
        await client.post("/v1/workspaces", json={"displayName": display_name}, headers=user.bearer()), 200
    )["workspace"]
    workspace_id = workspace["name"].removeprefix("workspaces/")
    issued = expect(
        await client.post(
            "/v1/sessions:issueWorkspaceToken", json={"workspace": workspace["name"]}, headers=user.bearer()
        ),
        200,
    )
    user.workspace_tokens[workspace_id] = issued["tokens"]["accessToken"]
    return dict(workspace)
