"""Workspace tokens and API keys across two real services: identity and tenancy, both with auth enforced.

Tenancy verifies tokens with identity's JWKS (GetJwks over gRPC); identity asks tenancy for the
caller's membership (LookupMembership, with the caller's own token) before it issues a workspace token.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import jwt
import pytest

from migrations import runner
from services.identity.main import build as build_identity
from services.kit.server import ServiceRuntime
from services.kit.settings import load_settings
from services.tenancy.main import build as build_tenancy
from services.tenancy.settings import TenancySettings
from tessera.identity.v1 import identity_pb2, identity_service_pb2, identity_service_pb2_grpc
from tessera.tenancy.v1 import tenancy_pb2, tenancy_service_pb2, tenancy_service_pb2_grpc
from tessera_cli.embedded import free_port
from tests.auth_helpers import bearer
from tests.identity.conftest import GOOD_PASSWORD, unique_email
from tests.identity.helpers import details, rejected, runtime_settings
from tests.identity.mail_server import SmtpServer, running_smtp_server

pytestmark = pytest.mark.gate("S02")

IdentityStub = identity_service_pb2_grpc.IdentityServiceStub
TenancyStub = tenancy_service_pb2_grpc.TenancyServiceStub


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpServer]:
    with running_smtp_server() as server:
        yield server


@pytest.fixture(scope="module")
def tenancy_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
async def identity(admin_url: str, nats_url: str, smtp: SmtpServer, tenancy_port: int) -> AsyncIterator[ServiceRuntime]:
    settings = runtime_settings(admin_url, nats_url, smtp, tenancy_address=f"127.0.0.1:{tenancy_port}")
    runtime = await build_identity(settings)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


@pytest.fixture(scope="module")
async def tenancy(
    admin_url: str, nats_url: str, identity: ServiceRuntime, tenancy_port: int
) -> AsyncIterator[ServiceRuntime]:
    settings = load_settings(
        TenancySettings,
        database_url=runner.service_url(admin_url, "tenancy"),
        nats_url=nats_url,
        auth="enforced",
        identity_address=f"127.0.0.1:{identity.port}",
        environment="test",
        grpc_host="127.0.0.1",
        grpc_port=tenancy_port,
        metrics_port=None,
        outbox_poll_seconds=0.2,
        shutdown_grace_seconds=2.0,
    )
    runtime = await build_tenancy(settings)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


@pytest.fixture(scope="module")
async def stubs(identity: ServiceRuntime, tenancy: ServiceRuntime) -> AsyncIterator[tuple[IdentityStub, TenancyStub]]:
    identity_channel = grpc.aio.insecure_channel(f"127.0.0.1:{identity.port}")
    tenancy_channel = grpc.aio.insecure_channel(f"127.0.0.1:{tenancy.port}")
    try:
        yield (
            identity_service_pb2_grpc.IdentityServiceStub(identity_channel),
            tenancy_service_pb2_grpc.TenancyServiceStub(tenancy_channel),
        )
    finally:
        await identity_channel.close()
        await tenancy_channel.close()


async def signed_in_user(stub: IdentityStub) -> tuple[identity_pb2.User, str]:
    """A new user and a user-level access token of theirs."""
    email = unique_email()
    signed_up = await stub.SignUp(
        identity_service_pb2.SignUpRequest(email=email, password=GOOD_PASSWORD, display_name="Ada")
    )
    signed_in = await stub.SignIn(identity_service_pb2.SignInRequest(email=email, password=GOOD_PASSWORD))
    return signed_up.user, signed_in.tokens.access_token


async def new_workspace(tenancy: TenancyStub, token: str) -> str:
    response = await tenancy.CreateWorkspace(
        tenancy_service_pb2.CreateWorkspaceRequest(workspace=tenancy_pb2.Workspace(display_name="Acme")),
        metadata=bearer(token),
    )
    return str(response.workspace.name)


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


async def workspace_token(
    stub: IdentityStub, token: str, workspace: str
) -> identity_service_pb2.IssueWorkspaceTokenResponse:
    response: identity_service_pb2.IssueWorkspaceTokenResponse = await stub.IssueWorkspaceToken(
        identity_service_pb2.IssueWorkspaceTokenRequest(workspace=workspace), metadata=bearer(token)
    )
    return response


async def test_member_gets_a_workspace_token_with_their_role(stubs: tuple[IdentityStub, TenancyStub]) -> None:
    identity, tenancy = stubs
    user, token = await signed_in_user(identity)
    workspace = await new_workspace(tenancy, token)

    issued = await workspace_token(identity, token, workspace)

    assert issued.role == "owner"
    assert issued.tokens.refresh_token == ""
    claims = claims_of(issued.tokens.access_token)
    assert claims["ws"] == workspace.removeprefix("workspaces/")
    assert (claims["role"], claims["sub"], claims["kind"]) == ("owner", user.name.removeprefix("users/"), "user")
    assert claims["sid"] == claims_of(token)["sid"]
    got = await tenancy.GetWorkspace(
        tenancy_service_pb2.GetWorkspaceRequest(name=workspace), metadata=bearer(issued.tokens.access_token)
    )
    assert got.workspace.name == workspace


async def test_non_member_gets_not_found(stubs: tuple[IdentityStub, TenancyStub]) -> None:
    identity, tenancy = stubs
    _, owner_token = await signed_in_user(identity)
    workspace = await new_workspace(tenancy, owner_token)
    _, stranger_token = await signed_in_user(identity)

    error = await rejected(workspace_token(identity, stranger_token, workspace))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await rejected(workspace_token(identity, stranger_token, f"workspaces/{uuid.uuid4()}"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_signed_out_session_gets_no_workspace_token(stubs: tuple[IdentityStub, TenancyStub]) -> None:
    identity, tenancy = stubs
    _, token = await signed_in_user(identity)
    workspace = await new_workspace(tenancy, token)
    await identity.SignOut(identity_service_pb2.SignOutRequest(), metadata=bearer(token))

    error = await rejected(workspace_token(identity, token, workspace))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_api_key_lifecycle(stubs: tuple[IdentityStub, TenancyStub]) -> None:
    identity, tenancy = stubs
    _, token = await signed_in_user(identity)
    workspace = await new_workspace(tenancy, token)
    owner = (await workspace_token(identity, token, workspace)).tokens.access_token

    created = await identity.CreateApiKey(
        identity_service_pb2.CreateApiKeyRequest(
            parent=workspace, api_key=identity_pb2.ApiKey(display_name="deploy bot", role="admin")
        ),
        metadata=bearer(owner),
    )
    secret = created.secret
    assert created.api_key.name.startswith(f"{workspace}/apiKeys/")
    assert secret.startswith(created.api_key.prefix)
    listed = await identity.ListApiKeys(
        identity_service_pb2.ListApiKeysRequest(parent=workspace), metadata=bearer(owner)
    )
    assert [key.name for key in listed.api_keys] == [created.api_key.name]
    assert secret not in str(listed)

    exchanged = await identity.ExchangeApiKey(identity_service_pb2.ExchangeApiKeyRequest(secret=secret))
    key_token = exchanged.tokens.access_token
    key_id = created.api_key.name.rsplit("/", 1)[1]
    claims = claims_of(key_token)
    assert (claims["kind"], claims["sub"], claims["sid"], claims["role"]) == ("api_key", key_id, key_id, "admin")
    # The key's token works on both services, within its workspace.
    await tenancy.GetWorkspace(tenancy_service_pb2.GetWorkspaceRequest(name=workspace), metadata=bearer(key_token))
    used = await identity.ListApiKeys(
        identity_service_pb2.ListApiKeysRequest(parent=workspace), metadata=bearer(key_token)
    )
    assert used.api_keys[0].HasField("last_used_time")

    revoked = await identity.RevokeApiKey(
        identity_service_pb2.RevokeApiKeyRequest(name=created.api_key.name), metadata=bearer(owner)
    )
    assert revoked.api_key.HasField("revoke_time")

    error = await rejected(identity.ExchangeApiKey(identity_service_pb2.ExchangeApiKeyRequest(secret=secret)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    error = await rejected(
        identity.ListApiKeys(identity_service_pb2.ListApiKeysRequest(parent=workspace), metadata=bearer(key_token))
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_api_keys_of_another_workspace_are_not_found_and_roles_are_checked(
    stubs: tuple[IdentityStub, TenancyStub],
) -> None:
    identity, tenancy = stubs
    _, token = await signed_in_user(identity)
    mine = await new_workspace(tenancy, token)
    theirs = await new_workspace(tenancy, (await signed_in_user(identity))[1])
    owner = (await workspace_token(identity, token, mine)).tokens.access_token

    error = await rejected(
        identity.ListApiKeys(identity_service_pb2.ListApiKeysRequest(parent=theirs), metadata=bearer(owner))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await rejected(
        identity.CreateApiKey(
            identity_service_pb2.CreateApiKeyRequest(
                parent=mine, api_key=identity_pb2.ApiKey(display_name="root", role="owner")
            ),
            metadata=bearer(owner),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(error)[1] == ["api_key.role"]

    viewer_key = await identity.CreateApiKey(
        identity_service_pb2.CreateApiKeyRequest(
            parent=mine, api_key=identity_pb2.ApiKey(display_name="ro", role="viewer")
        ),
        metadata=bearer(owner),
    )
    viewer = (
        await identity.ExchangeApiKey(identity_service_pb2.ExchangeApiKeyRequest(secret=viewer_key.secret))
    ).tokens.access_token
    error = await rejected(
        identity.ListApiKeys(identity_service_pb2.ListApiKeysRequest(parent=mine), metadata=bearer(viewer))
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    # A user-level token is not enough for workspace RPCs.
    error = await rejected(
        identity.ListApiKeys(identity_service_pb2.ListApiKeysRequest(parent=mine), metadata=bearer(token))
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
