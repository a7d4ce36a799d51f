"""Authentication and authorization in the kit interceptor, over a real gRPC server and the real contracts.

The fake servicer (tests/kit/fake_service.py) serves TenancyService methods with their contract rules
(CreateWorkspace: USER; GetWorkspace: WORKSPACE `workspace.read`; ...) and answers with the principal
the interceptor built, so each test sees both the status and who the handler believed was calling.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.kit.broker import Broker
from services.kit.interceptors import (
    MISSING_PERMISSION,
    NO_AUTH_RULE,
    TOKEN_REVOKED,
    WORKSPACE_TOKEN_REQUIRED,
)
from services.kit.principal import DEVELOPMENT_ROLE_HEADER, DEVELOPMENT_USER_HEADER, DEVELOPMENT_WORKSPACE_HEADER
from services.kit.revocation import RevocationList
from services.kit.server import ServiceRuntime
from services.kit.tokens import TOKEN_EXPIRED, TOKEN_INVALID, TokenSigner
from tessera.tenancy.v1 import tenancy_pb2, tenancy_service_pb2, tenancy_service_pb2_grpc
from tests.auth_helpers import TestKeys, bearer
from tests.kit.fake_service import (
    EMPTY_METHODS,
    PUBLIC_METHOD,
    SERVICE,
    UNDECLARED_METHOD,
    WATCH_METHOD,
    FakeTenancy,
    fake_binding,
    kit_settings,
)

pytestmark = pytest.mark.gate("S02")

ROLES = ("owner", "admin", "member", "viewer", "billing_manager")
# Which roles may call each fake method: the contract's permission and the documented matrix, written out.
ALLOWED = {
    "GetWorkspace": set(ROLES),  # workspace.read
    "UpdateWorkspace": {"owner", "admin"},  # workspace.update
    "DeleteWorkspace": {"owner"},  # workspace.delete
    "TransferOwnership": {"owner"},  # workspace.transfer
    "ListMembers": set(ROLES),  # members.read
    "CreateInvitation": {"owner", "admin"},  # members.manage
    "ListAuditEvents": {"owner", "admin"},  # audit.read
}
PERMISSION = {"GetWorkspace": "workspace.read", "UpdateWorkspace": "workspace.update", **EMPTY_METHODS}


class Enforced:
    """An enforced-auth runtime of the fake, its keys and its (local) revocation list."""

    def __init__(self, keys: TestKeys, revocations: RevocationList, channel: grpc.aio.Channel) -> None:
        self.keys = keys
        self.revocations = revocations
        self.channel = channel
        self.stub = tenancy_service_pb2_grpc.TenancyServiceStub(channel)

    async def call(self, method: str, request: Message, metadata: Any = ()) -> Any:
        """Call a TenancyService method; the response, or the AioRpcError."""
        response_type = getattr(tenancy_service_pb2, f"{method}Response")
        rpc = self.channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        try:
            return await rpc(request, metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as error:
            return error


@pytest.fixture(scope="module")
async def enforced() -> AsyncIterator[Enforced]:
    keys = TestKeys()
    revocations = RevocationList(None)
    rt = ServiceRuntime(
        name="fake-auth",
        settings=kit_settings(auth="enforced"),
        bindings=[fake_binding(FakeTenancy())],
        verifier=keys.verifier,
        revocations=revocations,
    )
    port = await rt.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Enforced(keys, revocations, channel)
    finally:
        await channel.close()
        await rt.stop()


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)
    assert status is not None, "no grpc-status-details-bin trailer"
    for item in status.details:
        if item.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            item.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo")


def assert_status(result: Any, code: grpc.StatusCode, reason: str) -> error_details_pb2.ErrorInfo:
    assert isinstance(result, grpc.aio.AioRpcError), f"expected {code.name}, got a response {result}"
    assert result.code() == code, f"{result.code()} {result.details()}"
    info = error_info(result)
    assert info.reason == reason, info
    return info


def get_request() -> tenancy_service_pb2.GetWorkspaceRequest:
    return tenancy_service_pb2.GetWorkspaceRequest(name=f"workspaces/{uuid.uuid4()}")


def ids() -> tuple[str, str]:
    return str(uuid.uuid4()), str(uuid.uuid4())


# -- who is calling -------------------------------------------------------------------------------------


async def test_a_workspace_token_becomes_the_principal(enforced: Enforced) -> None:
    user, workspace = ids()
    session = str(uuid.uuid4())
    token = enforced.keys.workspace_token(user, workspace, "member", session_id=session)
    response = await enforced.call("GetWorkspace", get_request(), bearer(token))
    assert not isinstance(response, grpc.aio.AioRpcError), response
    ws = response.workspace
    assert (ws.name, ws.etag, ws.creator, ws.display_name) == (
        f"workspaces/{workspace}",
        "member",
        user,
        f"user:{session}",
    )


async def test_an_api_key_token_is_a_principal_of_kind_api_key(enforced: Enforced) -> None:
    key_id, workspace = ids()
    token = enforced.keys.api_key_token(key_id, workspace, "viewer")
    response = await enforced.call("GetWorkspace", get_request(), bearer(token))
    assert response.workspace.display_name == f"api_key:{key_id}"
    assert response.workspace.creator == key_id


async def test_a_user_token_suffices_for_user_methods(enforced: Enforced) -> None:
    user, _ = ids()
    request = tenancy_service_pb2.CreateWorkspaceRequest(workspace=tenancy_pb2.Workspace(display_name="Acme"))
    response = await enforced.call("CreateWorkspace", request, bearer(enforced.keys.user_token(user)))
    assert response.workspace.creator == user


# -- UNAUTHENTICATED --------------------------------------------------------------------------------------


async def test_no_token_is_unauthenticated(enforced: Enforced) -> None:
    for method, request in (
        ("GetWorkspace", get_request()),
        ("CreateWorkspace", tenancy_service_pb2.CreateWorkspaceRequest()),
    ):
        assert_status(await enforced.call(method, request), grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")


@pytest.mark.parametrize(
    "header",
    ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "bearer not.a.jwt", "Token abc", "Bearer a.b.c"],
)
async def test_a_malformed_authorization_header_is_unauthenticated(enforced: Enforced, header: str) -> None:
    result = await enforced.call("GetWorkspace", get_request(), (("authorization", header),))
    assert_status(result, grpc.StatusCode.UNAUTHENTICATED, TOKEN_INVALID)


async def test_a_bare_token_without_the_bearer_scheme_is_unauthenticated(enforced: Enforced) -> None:
    user, workspace = ids()
    token = enforced.keys.workspace_token(user, workspace, "owner")
    result = await enforced.call("GetWorkspace", get_request(), (("authorization", token),))
    assert_status(result, grpc.StatusCode.UNAUTHENTICATED, TOKEN_INVALID)


async def test_the_bearer_scheme_is_case_insensitive(enforced: Enforced) -> None:
    user, workspace = ids()
    token = enforced.keys.workspace_token(user, workspace, "owner")
    response = await enforced.call("GetWorkspace", get_request(), (("authorization", f"bearer {token}"),))
    assert response.workspace.creator == user


async def test_an_expired_token_is_unauthenticated(enforced: Enforced) -> None:
    user, workspace = ids()
    token = enforced.keys.expired_token(user, workspace_id=workspace, role="owner")
    info = assert_status(
        await enforced.call("GetWorkspace", get_request(), bearer(token)),
        grpc.StatusCode.UNAUTHENTICATED,
        TOKEN_EXPIRED,
    )
    assert info.domain == "tessera.dev"


async def test_a_forged_token_is_unauthenticated(enforced: Enforced) -> None:
    user, workspace = ids()
    for token in (
        enforced.keys.forged_token(user, workspace_id=workspace, role="owner"),
        enforced.keys.forged_token(user),
    ):
        method = "GetWorkspace"
        result = await enforced.call(method, get_request(), bearer(token))
        assert_status(result, grpc.StatusCode.UNAUTHENTICATED, TOKEN_INVALID)


@pytest.mark.parametrize(("issuer", "audience"), [("tessera", "billing"), ("evil", "tessera")])
async def test_a_token_for_another_audience_or_from_another_issuer_is_unauthenticated(
    enforced: Enforced, issuer: str, audience: str
) -> None:
    user, workspace = ids()
    signer = TokenSigner(enforced.keys.private_key, kid=enforced.keys.kid, issuer=issuer, audience=audience)
    token, _ = signer.sign(subject=user, session_id=str(uuid.uuid4()), workspace_id=workspace, role="owner")
    result = await enforced.call("GetWorkspace", get_request(), bearer(token))
    assert_status(result, grpc.StatusCode.UNAUTHENTICATED, TOKEN_INVALID)


async def test_an_unknown_kid_refreshes_the_key_set_once_then_is_unauthenticated() -> None:
    keys = TestKeys()
    rt = ServiceRuntime(
        name="fake-kid",
        settings=kit_settings(auth="enforced"),
        bindings=[fake_binding(FakeTenancy())],
        verifier=keys.verifier,
    )
    port = await rt.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = tenancy_service_pb2_grpc.TenancyServiceStub(channel)
            user, workspace = ids()
            await stub.GetWorkspace(get_request(), metadata=bearer(keys.workspace_token(user, workspace, "viewer")))
            assert keys.provider.fetches == 1
            stranger = TestKeys()
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await stub.GetWorkspace(
                        get_request(), metadata=bearer(stranger.workspace_token(user, workspace, "owner"))
                    )
                assert_status(failure.value, grpc.StatusCode.UNAUTHENTICATED, TOKEN_INVALID)
            assert keys.provider.fetches == 2
    finally:
        await rt.stop()


# -- PERMISSION_DENIED ------------------------------------------------------------------------------------


async def test_a_user_token_on_a_workspace_method_needs_a_workspace_token(enforced: Enforced) -> None:
    user, _ = ids()
    result = await enforced.call("GetWorkspace", get_request(), bearer(enforced.keys.user_token(user)))
    info = assert_status(result, grpc.StatusCode.PERMISSION_DENIED, WORKSPACE_TOKEN_REQUIRED)
    assert info.metadata["permission"] == "workspace.read"


@pytest.mark.gate("S03")
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("method", list(ALLOWED))
async def test_each_role_reaches_exactly_the_methods_its_permissions_allow(
    enforced: Enforced, role: str, method: str
) -> None:
    user, workspace = ids()
    token = enforced.keys.workspace_token(user, workspace, role)
    request = getattr(tenancy_service_pb2, f"{method}Request")()  # empty: validation runs after authorization
    result = await enforced.call(method, request, bearer(token))
    if role in ALLOWED[method]:
        # Admitted: the request reached validation (an empty request is invalid) or the handler.
        if isinstance(result, grpc.aio.AioRpcError):
            assert result.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{role} {method}: {result.details()}"
    else:
        info = assert_status(result, grpc.StatusCode.PERMISSION_DENIED, MISSING_PERMISSION)
        assert dict(info.metadata) == {"permission": PERMISSION[method], "role": role}


async def test_authorization_comes_before_validation(enforced: Enforced) -> None:
    user, workspace = ids()
    viewer = enforced.keys.workspace_token(user, workspace, "viewer")
    invalid = tenancy_service_pb2.UpdateWorkspaceRequest()
    result = await enforced.call("UpdateWorkspace", invalid, bearer(viewer))
    assert_status(result, grpc.StatusCode.PERMISSION_DENIED, MISSING_PERMISSION)
    admin = enforced.keys.workspace_token(user, workspace, "admin")
    result = await enforced.call("UpdateWorkspace", invalid, bearer(admin))
    assert_status(result, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_a_method_without_an_auth_rule_is_refused_for_everyone(enforced: Enforced) -> None:
    user, workspace = ids()
    undeclared = enforced.channel.unary_unary(
        UNDECLARED_METHOD,
        request_serializer=tenancy_service_pb2.GetWorkspaceRequest.SerializeToString,
        response_deserializer=tenancy_service_pb2.GetWorkspaceResponse.FromString,
    )
    for metadata in ((), bearer(enforced.keys.workspace_token(user, workspace, "owner"))):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await undeclared(get_request(), metadata=metadata)
        assert_status(failure.value, grpc.StatusCode.PERMISSION_DENIED, NO_AUTH_RULE)


# -- PUBLIC and streaming ---------------------------------------------------------------------------------


async def test_public_methods_need_no_token_and_ignore_a_bad_one(enforced: Enforced) -> None:
    public = enforced.channel.unary_unary(
        PUBLIC_METHOD,
        request_serializer=tenancy_service_pb2.GetWorkspaceRequest.SerializeToString,
        response_deserializer=tenancy_service_pb2.GetWorkspaceResponse.FromString,
    )
    user, _ = ids()
    assert (await public(get_request())).workspace.creator == ""
    assert (await public(get_request(), metadata=bearer(enforced.keys.forged_token(user)))).workspace.creator == ""
    assert (await public(get_request(), metadata=bearer(enforced.keys.user_token(user)))).workspace.creator == user


async def test_streaming_methods_are_authenticated_too(enforced: Enforced) -> None:
    watch = enforced.channel.unary_stream(
        WATCH_METHOD,
        request_serializer=tenancy_service_pb2.GetWorkspaceRequest.SerializeToString,
        response_deserializer=tenancy_pb2.Workspace.FromString,
    )
    call = watch(get_request())
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call.read()
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
    user, _ = ids()
    events = [ws.display_name async for ws in watch(get_request(), metadata=bearer(enforced.keys.user_token(user)))]
    assert events == ["event 0", "event 1", "event 2"]


# -- revocation -------------------------------------------------------------------------------------------


async def test_a_token_of_a_revoked_session_is_unauthenticated(enforced: Enforced) -> None:
    user, workspace = ids()
    session, other_session = str(uuid.uuid4()), str(uuid.uuid4())
    token = enforced.keys.workspace_token(user, workspace, "owner", session_id=session)
    other = enforced.keys.workspace_token(user, workspace, "owner", session_id=other_session)
    assert (await enforced.call("GetWorkspace", get_request(), bearer(token))).workspace.creator == user
    enforced.revocations.revoke_session(session.upper())
    result = await enforced.call("GetWorkspace", get_request(), bearer(token))
    info = assert_status(result, grpc.StatusCode.UNAUTHENTICATED, TOKEN_REVOKED)
    assert "session revoked" in (result.details() or "")
    assert info.domain == "tessera.dev"
    assert (await enforced.call("GetWorkspace", get_request(), bearer(other))).workspace.creator == user


@pytest.mark.gate("S03")
async def test_a_workspace_token_older_than_a_membership_change_is_unauthenticated(enforced: Enforced) -> None:
    user, workspace = ids()
    session = str(uuid.uuid4())
    before = enforced.keys.token(
        user, session_id=session, workspace_id=workspace, role="admin", now=datetime.now(UTC) - timedelta(seconds=1)
    )
    user_level = enforced.keys.user_token(user, session_id=session)
    elsewhere = enforced.keys.workspace_token(user, str(uuid.uuid4()), "admin", session_id=session)
    enforced.revocations.membership_changed(user, workspace, at=datetime.now(UTC) - timedelta(milliseconds=500))
    result = await enforced.call("GetWorkspace", get_request(), bearer(before))
    assert_status(result, grpc.StatusCode.UNAUTHENTICATED, TOKEN_REVOKED)
    assert "membership changed" in (result.details() or "")
    # A token issued after the change, the user-level token and other workspaces are unaffected.
    after = enforced.keys.workspace_token(user, workspace, "viewer", session_id=session)
    assert (await enforced.call("GetWorkspace", get_request(), bearer(after))).workspace.etag == "viewer"
    assert (await enforced.call("GetWorkspace", get_request(), bearer(elsewhere))).workspace.etag == "admin"
    request = tenancy_service_pb2.CreateWorkspaceRequest(workspace=tenancy_pb2.Workspace(display_name="Acme"))
    assert (await enforced.call("CreateWorkspace", request, bearer(user_level))).workspace.creator == user


async def test_a_revocation_list_still_loading_fails_closed(nats_url: str) -> None:
    keys = TestKeys()
    loading = RevocationList(Broker(nats_url, name="never-started"))
    rt = ServiceRuntime(
        name="fake-loading",
        settings=kit_settings(auth="enforced"),
        bindings=[fake_binding(FakeTenancy())],
        verifier=keys.verifier,
    )
    rt.interceptor.revocations = loading  # as if a call arrived before start() had read the backlog
    port = await rt.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = tenancy_service_pb2_grpc.TenancyServiceStub(channel)
            user, workspace = ids()
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await stub.GetWorkspace(get_request(), metadata=bearer(keys.workspace_token(user, workspace, "owner")))
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await rt.stop()


# -- disabled mode ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def disabled_stub() -> AsyncIterator[tenancy_service_pb2_grpc.TenancyServiceStub]:
    rt = ServiceRuntime(
        name="fake-disabled", settings=kit_settings(auth="disabled"), bindings=[fake_binding(FakeTenancy())]
    )
    port = await rt.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield tenancy_service_pb2_grpc.TenancyServiceStub(channel)
    finally:
        await channel.close()
        await rt.stop()


def dev(user: str, workspace: str | None = None, role: str | None = None) -> tuple[tuple[str, str], ...]:
    metadata = [(DEVELOPMENT_USER_HEADER, user)]
    if workspace is not None:
        metadata.append((DEVELOPMENT_WORKSPACE_HEADER, workspace))
    if role is not None:
        metadata.append((DEVELOPMENT_ROLE_HEADER, role))
    return tuple(metadata)


async def test_disabled_mode_takes_the_caller_from_metadata_and_still_checks_permissions(
    disabled_stub: tenancy_service_pb2_grpc.TenancyServiceStub,
) -> None:
    user, workspace = ids()
    response = await disabled_stub.GetWorkspace(get_request(), metadata=dev(user, workspace, "viewer"))
    assert (response.workspace.name, response.workspace.etag, response.workspace.creator) == (
        f"workspaces/{workspace}",
        "viewer",
        user,
    )
    update = tenancy_service_pb2.UpdateWorkspaceRequest(
        workspace=tenancy_pb2.Workspace(name=f"workspaces/{workspace}", display_name="Renamed")
    )
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await disabled_stub.UpdateWorkspace(update, metadata=dev(user, workspace, "viewer"))
    assert_status(failure.value, grpc.StatusCode.PERMISSION_DENIED, MISSING_PERMISSION)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await disabled_stub.GetWorkspace(get_request(), metadata=dev(user))
    assert_status(failure.value, grpc.StatusCode.PERMISSION_DENIED, WORKSPACE_TOKEN_REQUIRED)


@pytest.mark.parametrize(
    ("workspace", "role"),
    [("not-a-uuid", "owner"), (str(uuid.uuid4()), "root"), (str(uuid.uuid4()), None), (None, "owner")],
)
async def test_disabled_mode_refuses_malformed_development_metadata(
    disabled_stub: tenancy_service_pb2_grpc.TenancyServiceStub, workspace: str | None, role: str | None
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await disabled_stub.GetWorkspace(get_request(), metadata=dev(str(uuid.uuid4()), workspace, role))
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_enforced_mode_ignores_development_metadata(enforced: Enforced) -> None:
    user, workspace = ids()
    result = await enforced.call("GetWorkspace", get_request(), dev(user, workspace, "owner"))
    assert_status(result, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")


def test_enforced_mode_without_a_verifier_or_identity_address_refuses_to_build() -> None:
    from services.kit.settings import SettingsError

    with pytest.raises(SettingsError, match="TESSERA_IDENTITY_ADDRESS"):
        ServiceRuntime(name="x", settings=kit_settings(auth="enforced"), bindings=[fake_binding(FakeTenancy())])
    rt = ServiceRuntime(
        name="x",
        settings=kit_settings(auth="enforced", identity_address="127.0.0.1:50052"),
        bindings=[fake_binding(FakeTenancy())],
    )
    assert rt.verifier is not None
