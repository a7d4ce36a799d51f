"""TenancyService over real gRPC: the kit runtime (auth=development), generated stubs, PostgreSQL and NATS."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nats.js.api import ConsumerConfig, DeliverPolicy

from migrations import runner
from services.kit.broker import Broker
from services.kit.events import stream_name
from services.kit.ids import uuid7
from services.kit.principal import DEVELOPMENT_USER_HEADER
from services.kit.server import ServiceRuntime
from services.kit.settings import load_settings
from services.tenancy.main import build
from services.tenancy.settings import TenancySettings
from tessera.common.v1.event_pb2 import EventEnvelope
from tessera.tenancy.v1 import tenancy_events_pb2, tenancy_pb2, tenancy_service_pb2, tenancy_service_pb2_grpc
from tests.helpers import eventually

pytestmark = pytest.mark.gate("S03")

Metadata = tuple[tuple[str, str], ...]


@pytest.fixture(scope="module")
async def runtime(admin_url: str, nats_url: str) -> AsyncIterator[ServiceRuntime]:
    settings = load_settings(
        TenancySettings,
        database_url=runner.service_url(admin_url, "tenancy"),
        nats_url=nats_url,
        auth="development",
        environment="test",
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_port=None,
        outbox_poll_seconds=0.2,
        shutdown_grace_seconds=2.0,
    )
    service_runtime = await build(settings)
    await service_runtime.start()
    try:
        yield service_runtime
    finally:
        await service_runtime.stop()


@pytest.fixture(scope="module")
async def stub(runtime: ServiceRuntime) -> AsyncIterator[tenancy_service_pb2_grpc.TenancyServiceStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}")
    try:
        yield tenancy_service_pb2_grpc.TenancyServiceStub(channel)
    finally:
        await channel.close()


def as_user(user: uuid.UUID | None = None) -> Metadata:
    """Development-mode metadata selecting a user (a fresh one unless given)."""
    return ((DEVELOPMENT_USER_HEADER, str(user or uuid7())),)


def details(error: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    """The ErrorInfo and the BadRequest field paths of a failed call."""
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status details"
    info = error_details_pb2.ErrorInfo()
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields.extend(violation.field for violation in bad_request.field_violations)
    return info, fields


async def create(
    stub: tenancy_service_pb2_grpc.TenancyServiceStub, metadata: Metadata, display_name: str, request_id: str = ""
) -> tenancy_pb2.Workspace:
    response = await stub.CreateWorkspace(
        tenancy_service_pb2.CreateWorkspaceRequest(
            workspace=tenancy_pb2.Workspace(display_name=display_name), request_id=request_id
        ),
        metadata=metadata,
    )
    return response.workspace


async def test_create_get_and_list(stub: tenancy_service_pb2_grpc.TenancyServiceStub) -> None:
    user = uuid7()
    created = await create(stub, as_user(user), "Acme")

    assert created.name.startswith("workspaces/")
    assert created.display_name == "Acme"
    assert created.creator == str(user)
    assert created.state in (tenancy_pb2.WORKSPACE_STATE_PROVISIONING, tenancy_pb2.WORKSPACE_STATE_ACTIVE)
    assert created.create_time.seconds > 0

    fetched = (
        await stub.GetWorkspace(tenancy_service_pb2.GetWorkspaceRequest(name=created.name), metadata=as_user(user))
    ).workspace
    assert (fetched.name, fetched.display_name, fetched.creator) == (created.name, "Acme", str(user))

    second = await create(stub, as_user(user), "Beta")
    first_page = await stub.ListWorkspaces(
        tenancy_service_pb2.ListWorkspacesRequest(page_size=1), metadata=as_user(user)
    )
    assert [w.name for w in first_page.workspaces] == [second.name]
    assert first_page.next_page_token
    last_page = await stub.ListWorkspaces(
        tenancy_service_pb2.ListWorkspacesRequest(page_size=1, page_token=first_page.next_page_token),
        metadata=as_user(user),
    )
    assert [w.name for w in last_page.workspaces] == [created.name]
    assert last_page.next_page_token == ""


async def test_idempotent_create_over_grpc(stub: tenancy_service_pb2_grpc.TenancyServiceStub) -> None:
    user = uuid7()
    request_id = str(uuid.uuid4())
    first = await create(stub, as_user(user), "Acme", request_id)
    again = await create(stub, as_user(user), "Acme", request_id)
    assert again.name == first.name

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(stub, as_user(user), "Different", request_id)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    info, _ = details(caught.value)
    assert (info.domain, info.reason) == ("tessera.dev", "REQUEST_ID_REUSED")


@pytest.mark.parametrize(
    ("display_name", "why"),
    [("", "protovalidate min_len"), ("x" * 101, "protovalidate max_len"), ("   ", "service rule: blank")],
)
async def test_invalid_display_name_is_invalid_argument_with_field_violation(
    stub: tenancy_service_pb2_grpc.TenancyServiceStub, display_name: str, why: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(stub, as_user(), display_name)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, why
    info, fields = details(caught.value)
    assert fields == ["workspace.display_name"], why
    assert info.reason == "INVALID_ARGUMENT"


async def test_malformed_request_id_is_invalid_argument(stub: tenancy_service_pb2_grpc.TenancyServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(stub, as_user(), "Acme", request_id="not-a-uuid")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)[1] == ["request_id"]


@pytest.mark.parametrize("name", ["workspaces/not-a-uuid", "projects/0190c9a4-1c1e-7e0a-8b5e-0a1b2c3d4e5f", ""])
async def test_bad_workspace_name_is_invalid_argument(
    stub: tenancy_service_pb2_grpc.TenancyServiceStub, name: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetWorkspace(tenancy_service_pb2.GetWorkspaceRequest(name=name), metadata=as_user())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)[1] == ["name"]


async def test_foreign_workspace_is_not_found_like_an_absent_one(
    stub: tenancy_service_pb2_grpc.TenancyServiceStub,
) -> None:
    owner, stranger = uuid7(), uuid7()
    workspace = await create(stub, as_user(owner), "Private")
    absent = f"workspaces/{uuid7()}"

    outcomes = []
    for name in (workspace.name, absent):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetWorkspace(tenancy_service_pb2.GetWorkspaceRequest(name=name), metadata=as_user(stranger))
        info, _ = details(caught.value)
        outcomes.append((caught.value.code(), info.reason, caught.value.details().replace(name, "<name>")))

    assert outcomes[0] == outcomes[1] == (grpc.StatusCode.NOT_FOUND, "RESOURCE_NOT_FOUND", "<name> not found")
    stranger_list = await stub.ListWorkspaces(tenancy_service_pb2.ListWorkspacesRequest(), metadata=as_user(stranger))
    assert list(stranger_list.workspaces) == []


async def test_page_token_of_another_user_is_invalid_argument(
    stub: tenancy_service_pb2_grpc.TenancyServiceStub,
) -> None:
    owner = uuid7()
    for name in ("one", "two"):
        await create(stub, as_user(owner), name)
    page = await stub.ListWorkspaces(tenancy_service_pb2.ListWorkspacesRequest(page_size=1), metadata=as_user(owner))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListWorkspaces(
            tenancy_service_pb2.ListWorkspacesRequest(page_size=1, page_token=page.next_page_token), metadata=as_user()
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, fields = details(caught.value)
    assert (info.reason, fields) == ("INVALID_PAGE_TOKEN", ["page_token"])


@pytest.mark.gate("S08")
async def test_created_event_reaches_the_provisioner_and_the_workspace_becomes_active(
    stub: tenancy_service_pb2_grpc.TenancyServiceStub, nats_url: str
) -> None:
    user = uuid7()
    created = await create(stub, as_user(user), "Eventful")

    async def state() -> bool:
        response = await stub.GetWorkspace(
            tenancy_service_pb2.GetWorkspaceRequest(name=created.name), metadata=as_user(user)
        )
        return response.workspace.state == tenancy_pb2.WORKSPACE_STATE_ACTIVE

    await eventually(state, timeout=20.0, what=f"{created.name} to become ACTIVE")

    # The provisioner's own event went out through the outbox too.
    broker = Broker(nats_url, name="tenancy-test-reader")
    await broker.connect()
    try:
        sub = await broker.js.pull_subscribe(
            "tessera.tenancy.workspace_provisioned",
            stream=stream_name("tenancy"),
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0),
        )
        provisioned: list[str] = []

        async def provisioned_event_seen() -> bool:
            try:
                messages = await sub.fetch(100, timeout=0.5)
            except TimeoutError:
                return False
            for message in messages:
                await message.ack()
                envelope = EventEnvelope.FromString(message.data)
                event = tenancy_events_pb2.WorkspaceProvisionedEvent()
                assert envelope.payload.Unpack(event)
                if envelope.subject == created.name:
                    provisioned.append(event.workspace.name)
                    assert event.workspace.state == tenancy_pb2.WORKSPACE_STATE_ACTIVE
            return bool(provisioned)

        await eventually(provisioned_event_seen, timeout=20.0, what="WorkspaceProvisionedEvent")
        assert provisioned == [created.name]
        await sub.unsubscribe()
    finally:
        await broker.close()
