"""Calls on behalf of the caller: token, request id and deadline travel from one service to the next.

Two enforced-auth runtimes in this process: `front` serves GetWorkspace by calling GetWorkspace on
`back` with `outgoing_metadata()` and `outgoing_timeout()`; `back` records what it received.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from services.kit.client import outgoing_metadata, outgoing_timeout, service_channel
from services.kit.server import ServiceRuntime
from tessera.tenancy.v1 import tenancy_service_pb2, tenancy_service_pb2_grpc
from tests.auth_helpers import TestKeys, bearer
from tests.kit.fake_service import FakeTenancy, fake_binding, kit_settings

pytestmark = pytest.mark.gate("S02")


class Chain:
    def __init__(self, keys: TestKeys, front: FakeTenancy, back: FakeTenancy, stub: object) -> None:
        self.keys = keys
        self.front = front
        self.back = back
        self.stub = stub


@pytest.fixture
async def chain() -> AsyncIterator[Chain]:
    keys = TestKeys()
    back = FakeTenancy()
    back_rt = ServiceRuntime(
        name="back", settings=kit_settings(auth="enforced"), bindings=[fake_binding(back)], verifier=keys.verifier
    )
    back_port = await back_rt.start()
    front = FakeTenancy(downstream=f"127.0.0.1:{back_port}")
    front_rt = ServiceRuntime(
        name="front", settings=kit_settings(auth="enforced"), bindings=[fake_binding(front)], verifier=keys.verifier
    )
    front_port = await front_rt.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{front_port}")
    try:
        yield Chain(keys, front, back, tenancy_service_pb2_grpc.TenancyServiceStub(channel))
    finally:
        await channel.close()
        await front_rt.stop()
        await back_rt.stop()


async def test_the_callee_sees_the_callers_token_request_id_and_an_earlier_deadline(chain: Chain) -> None:
    user, workspace = str(uuid.uuid4()), str(uuid.uuid4())
    token = chain.keys.workspace_token(user, workspace, "viewer")
    request = tenancy_service_pb2.GetWorkspaceRequest(name=f"workspaces/{workspace}")
    stub: tenancy_service_pb2_grpc.TenancyServiceStub = chain.stub  # type: ignore[assignment]
    response = await stub.GetWorkspace(request, metadata=(*bearer(token), ("x-request-id", "chain-req-1")), timeout=7)

    # The back service authorized the original caller, not some service identity.
    assert (response.workspace.creator, response.workspace.name, response.workspace.etag) == (
        user,
        f"workspaces/{workspace}",
        "viewer",
    )
    [(_, front_deadline)] = chain.front.seen
    [(back_metadata, back_deadline)] = chain.back.seen
    assert back_metadata["authorization"] == f"Bearer {token}"
    assert back_metadata["x-request-id"] == "chain-req-1"
    assert front_deadline is not None
    assert back_deadline is not None
    assert back_deadline <= front_deadline


async def test_a_short_caller_deadline_caps_the_default_timeout(chain: Chain) -> None:
    user, workspace = str(uuid.uuid4()), str(uuid.uuid4())
    stub: tenancy_service_pb2_grpc.TenancyServiceStub = chain.stub  # type: ignore[assignment]
    await stub.GetWorkspace(
        tenancy_service_pb2.GetWorkspaceRequest(name=f"workspaces/{workspace}"),
        metadata=bearer(chain.keys.workspace_token(user, workspace, "owner")),
        timeout=2,
    )
    [(_, front_deadline)] = chain.front.seen
    [(_, back_deadline)] = chain.back.seen
    assert front_deadline is not None
    assert back_deadline is not None
    assert back_deadline <= front_deadline  # the front's default is 30 s: the caller's deadline won


async def test_without_a_token_the_chain_stops_at_the_front(chain: Chain) -> None:
    stub: tenancy_service_pb2_grpc.TenancyServiceStub = chain.stub  # type: ignore[assignment]
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.GetWorkspace(tenancy_service_pb2.GetWorkspaceRequest(name=f"workspaces/{uuid.uuid4()}"))
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert chain.back.seen == []


async def test_outside_an_rpc_nothing_is_forwarded_and_the_default_timeout_holds() -> None:
    assert outgoing_metadata() == ()
    assert outgoing_timeout(3.5) == 3.5
    assert service_channel("127.0.0.1:1") is service_channel("127.0.0.1:1")
