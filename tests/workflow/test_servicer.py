"""WorkflowService over real gRPC: the kit runtime with enforced auth, signed tokens, PostgreSQL and NATS.

Errors are read as clients read them: the status code, ErrorInfo (reason, metadata) and BadRequest field
violations in the `google.rpc.Status` details. Events are read from the JetStream stream the relay
publishes to.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2, struct_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nats.js.api import ConsumerConfig, DeliverPolicy

from migrations import runner
from services.kit.broker import Broker
from services.kit.events import stream_name
from services.kit.ids import uuid7
from services.kit.server import ServiceRuntime
from services.kit.settings import load_settings
from services.workflow.main import build
from services.workflow.settings import WorkflowSettings
from tessera.common.v1.event_pb2 import EventEnvelope
from tessera.workflow.v1 import workflow_pb2, workflow_service_pb2_grpc
from tessera.workflow.v1 import workflow_service_pb2 as pb
from tests.auth_helpers import TestKeys, bearer

pytestmark = pytest.mark.gate("S04")

Metadata = tuple[tuple[str, str], ...]
Stub = workflow_service_pb2_grpc.WorkflowServiceStub
LIMIT = 5


@pytest.fixture(scope="module")
def keys() -> TestKeys:
    return TestKeys()


@pytest.fixture(scope="module")
async def runtime(admin_url: str, nats_url: str, keys: TestKeys) -> AsyncIterator[ServiceRuntime]:
    settings = load_settings(
        WorkflowSettings,
        database_url=runner.service_url(admin_url, "workflow"),
        nats_url=nats_url,
        auth="enforced",
        environment="test",
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_port=None,
        outbox_poll_seconds=0.2,
        shutdown_grace_seconds=2.0,
        max_items_per_workspace=LIMIT,
    )
    service_runtime = await build(settings, verifier=keys.verifier)
    await service_runtime.start()
    try:
        yield service_runtime
    finally:
        await service_runtime.stop()


@pytest.fixture(scope="module")
async def stub(runtime: ServiceRuntime) -> AsyncIterator[Stub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}")
    try:
        yield workflow_service_pb2_grpc.WorkflowServiceStub(channel)
    finally:
        await channel.close()


@pytest.fixture(scope="module")
async def broker(nats_url: str) -> AsyncIterator[Broker]:
    reader = Broker(nats_url, name="workflow-test-reader")
    await reader.connect()
    try:
        yield reader
    finally:
        await reader.close()


class Workspace:
    """A workspace id with a workspace token per role (the tokens identity would issue)."""

    def __init__(self, keys: TestKeys) -> None:
        self.id = str(uuid7())
        self.name = f"workspaces/{self.id}"
        self.users = {role: str(uuid7()) for role in ("owner", "admin", "member", "viewer", "billing_manager")}
        self.tokens = {role: bearer(keys.workspace_token(user, self.id, role)) for role, user in self.users.items()}

    def __getitem__(self, role: str) -> Metadata:
        return self.tokens[role]


async def call(stub: Stub, method: str, request: Message, metadata: Metadata = ()) -> Any:
    """The response, or the AioRpcError."""
    try:
        return await getattr(stub, method)(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error


def details(error: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    """ErrorInfo and the BadRequest violation fields of an error."""
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status details"
    info, fields = error_details_pb2.ErrorInfo(), []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [violation.field for violation in bad.field_violations]
    return info, fields


async def project_in(stub: Stub, workspace: Workspace, **fields: Any) -> workflow_pb2.Project:
    response = await stub.CreateProject(
        pb.CreateProjectRequest(parent=workspace.name, project=workflow_pb2.Project(display_name="Board", **fields)),
        metadata=workspace["admin"],
    )
    return response.project


async def item_in(stub: Stub, workspace: Workspace, project: str, **fields: Any) -> workflow_pb2.Item:
    fields.setdefault("title", "Task")
    response = await stub.CreateItem(
        pb.CreateItemRequest(parent=project, item=workflow_pb2.Item(**fields)), metadata=workspace["member"]
    )
    return response.item


NUMBER_FIELD = workflow_pb2.CustomFieldDefinition(
    key="estimate", display_name="Estimate", type=workflow_pb2.CUSTOM_FIELD_TYPE_NUMBER
)


async def test_project_and_item_round_trip(stub: Stub, keys: TestKeys) -> None:
    workspace = Workspace(keys)
    project = await project_in(stub, workspace, custom_fields=[NUMBER_FIELD])
    assert [s.id for s in project.workflow.states] == ["backlog", "todo", "in_progress", "done", "cancelled"]
    item = await item_in(
        stub,
        workspace,
        project.name,
        title="Ship it",
        priority=workflow_pb2.PRIORITY_HIGH,
        labels=["b", " a "],
        custom_fields={"estimate": struct_pb2.Value(number_value=3)},
    )
    assert (item.status, item.priority, list(item.labels)) == ("backlog", workflow_pb2.PRIORITY_HIGH, ["a", "b"])
    assert item.custom_fields["estimate"].number_value == 3
    assert item.creator == f"users/{workspace.users['member']}"
    fetched = await stub.GetItem(pb.GetItemRequest(name=item.name), metadata=workspace["viewer"])
    assert fetched.item == item
    got = await stub.GetProject(pb.GetProjectRequest(name=project.name), metadata=workspace["viewer"])
    assert got.project == project
    listed = await stub.ListProjects(pb.ListProjectsRequest(parent=workspace.name), metadata=workspace["viewer"])
    assert [p.name for p in listed.projects] == [project.name]


async def test_illegal_transition_carries_the_allowed_next_states(stub: Stub, keys: TestKeys) -> None:
    workspace = Workspace(keys)
    project = await project_in(stub, workspace)
    item = await item_in(stub, workspace, project.name)
    error = await call(
        stub, "TransitionItem", pb.TransitionItemRequest(name=item.name, status="done"), workspace["member"]
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = details(error)
    assert info.reason == "TRANSITION_NOT_ALLOWED"
    assert info.metadata["allowed_next_states"] == "todo,in_progress,cancelled"
    guarded = await call(
        stub, "TransitionItem", pb.TransitionItemRequest(name=item.name, status="in_progress"), workspace["member"]
    )
    assert guarded.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (details(guarded)[0].reason, details(guarded)[0].metadata["guard"]) == (
        "TRANSITION_GUARD_FAILED",
        "ASSIGNEE_REQUIRED",
    )
    moved = await stub.TransitionItem(
        pb.TransitionItemRequest(name=item.name, status="todo", etag=item.etag), metadata=workspace["member"]
    )
    assert moved.item.status == "todo"


async def test_update_mask_etag_and_field_violations(stub: Stub, keys: TestKeys) -> None:
    workspace = Workspace(keys)
    project = await project_in(stub, workspace, custom_fields=[NUMBER_FIELD])
    item = await item_in(stub, workspace, project.name, title="Before")
    changed = workflow_pb2.Item(name=item.name, title="After", description="ignored")
    updated = await stub.UpdateItem(
        pb.UpdateItemRequest(item=changed, update_mask=field_mask_pb2.FieldMask(paths=["title"]), etag=item.etag),
        metadata=workspace["member"],
    )
    assert (updated.item.title, updated.item.description, updated.item.etag) == ("After", "", '"v2"')
    stale = await call(
        stub,
        "UpdateItem",
        pb.UpdateItemRequest(item=changed, update_mask=field_mask_pb2.FieldMask(paths=["title"]), etag=item.etag),
        workspace["member"],
    )
    assert (stale.code(), details(stale)[0].reason) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    bad_value = workflow_pb2.Item(
        name=item.name, title="x", custom_fields={"estimate": struct_pb2.Value(string_value="lots")}
    )
    invalid = await call(
        stub,
        "UpdateItem",
        pb.UpdateItemRequest(item=bad_value, update_mask=field_mask_pb2.FieldMask(paths=["custom_fields.estimate"])),
        workspace["member"],
    )
    assert (invalid.code(), details(invalid)[1]) == (grpc.StatusCode.INVALID_ARGUMENT, ["item.custom_fields.estimate"])
    status_path = await call(
        stub,
        "UpdateItem",
        pb.UpdateItemRequest(item=changed, update_mask=field_mask_pb2.FieldMask(paths=["status"])),
        workspace["member"],
    )
    assert (status_path.code(), details(status_path)[1]) == (grpc.StatusCode.INVALID_ARGUMENT, ["update_mask"])


async def test_batch_update_names_the_failing_request(stub: Stub, keys: TestKeys) -> None:
    workspace = Workspace(keys)
    project = await project_in(stub, workspace)
    items = [await item_in(stub, workspace, project.name, title=f"t{i}") for i in range(3)]
    mask = field_mask_pb2.FieldMask(paths=["title"])
    requests = [
        pb.UpdateItemRequest(item=workflow_pb2.Item(name=item.name, title=f"new {i}"), update_mask=mask)
        for i, item in enumerate(items)
    ]
    requests[2].item.labels.append("  ")  # passes the contract's length rule, blank once trimmed
    requests[2].update_mask.paths[:] = ["labels"]
    error = await call(
        stub,
        "BatchUpdateItems",
        pb.BatchUpdateItemsRequest(parent=project.name, requests=requests),
        workspace["member"],
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(error)[1] == ["requests[2].item.labels[0]"]
    titles = [
        (await stub.GetItem(pb.GetItemRequest(name=i.name), metadata=workspace["viewer"])).item.title for i in items
    ]
    assert titles == ["t0", "t1", "t2"]
    del requests[2]
    done = await stub.BatchUpdateItems(
        pb.BatchUpdateItemsRequest(parent=project.name, requests=requests), metadata=workspace["member"]
    )
    assert [i.title for i in done.items] == ["new 0", "new 1"]


async def test_archive_delete_undelete_and_activities(stub: Stub, keys: TestKeys) -> None:
    workspace = Workspace(keys)
    project = await project_in(stub, workspace)
    item = await item_in(stub, workspace, project.name)
    member = workspace["member"]
    archived = (await stub.ArchiveItem(pb.ArchiveItemRequest(name=item.name), metadata=member)).item
    assert archived.archived
    refused = await call(stub, "TransitionItem", pb.TransitionItemRequest(name=item.name, status="todo"), member)
    assert (refused.code(), details(refused)[0].reason) == (grpc.StatusCode.FAILED_PRECONDITION, "RESOURCE_ARCHIVED")
    await stub.UnarchiveItem(pb.UnarchiveItemRequest(name=item.name), metadata=member)
    deleted = (await stub.DeleteItem(pb.DeleteItemRequest(name=item.name), metadata=member)).item
    assert deleted.HasField("delete_time")
    again = await call(stub, "DeleteItem", pb.DeleteItemRequest(name=item.name), member)
    assert again.code() == grpc.StatusCode.NOT_FOUND
    await stub.UndeleteItem(pb.UndeleteItemRequest(name=item.name), metadata=member)
    log = await stub.ListItemActivities(
        pb.ListItemActivitiesRequest(parent=item.name, page_size=2), metadata=workspace["viewer"]
    )
    assert [a.kind for a in log.activities] == [workflow_pb2.ACTIVITY_KIND_CREATED, workflow_pb2.ACTIVITY_KIND_ARCHIVED]
    rest = await stub.ListItemActivities(
        pb.ListItemActivitiesRequest(parent=item.name, page_token=log.next_page_token), metadata=workspace["viewer"]
    )
    assert [a.kind for a in rest.activities] == [
        workflow_pb2.ACTIVITY_KIND_UNARCHIVED,
        workflow_pb2.ACTIVITY_KIND_DELETED,
        workflow_pb2.ACTIVITY_KIND_UNDELETED,
    ]
    assert rest.next_page_token == ""
    assert all(a.actor == f"users/{workspace.users['member']}" for a in log.activities)


async def test_list_and_count_items(stub: Stub, keys: TestKeys) -> None:
    workspace = Workspace(keys)
    project = await project_in(stub, workspace)
    for title, labels in (("a", ["bug"]), ("b", ["bug", "ui"]), ("c", [])):
        await item_in(stub, workspace, project.name, title=title, labels=labels)
    first = await stub.ListItems(
        pb.ListItemsRequest(parent=project.name, order_by="title", page_size=2), metadata=workspace["viewer"]
    )
    rest = await stub.ListItems(
        pb.ListItemsRequest(parent=project.name, order_by="title", page_token=first.next_page_token),
        metadata=workspace["viewer"],
    )
    assert [i.title for i in [*first.items, *rest.items]] == ["a", "b", "c"]
    other_query = await call(
        stub,
        "ListItems",
        pb.ListItemsRequest(parent=project.name, order_by="title desc", page_token=first.next_page_token),
        workspace["viewer"],
    )
    assert (other_query.code(), details(other_query)[0].reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
    counts = await stub.CountItems(
        pb.CountItemsRequest(parent=project.name, group_by=pb.ITEM_GROUPING_LABEL), metadata=workspace["viewer"]
    )
    assert [(c.key, c.count) for c in counts.counts] == [("bug", 2), ("", 1), ("ui", 1)]
    assert counts.total == 3
    bad_filter = await call(
        stub, "ListItems", pb.ListItemsRequest(parent=project.name, filter="title =="), workspace["viewer"]
    )
    assert bad_filter.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(bad_filter)[1] == ["filter"]


async def test_item_limit_is_resource_exhausted(stub: Stub, keys: TestKeys) -> None:
    workspace = Workspace(keys)
    project = await project_in(stub, workspace)
    for _ in range(LIMIT):
        await item_in(stub, workspace, project.name)
    error = await call(
        stub,
        "CreateItem",
        pb.CreateItemRequest(parent=project.name, item=workflow_pb2.Item(title="over")),
        workspace["member"],
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info, _ = details(error)
    assert (info.reason, dict(info.metadata)) == ("LIMIT_EXCEEDED", {"limit": "max_items_per_workspace", "max": "5"})


async def test_assignee_must_be_in_the_members_read_model(
    stub: Stub, keys: TestKeys, admin_conn: asyncpg.Connection
) -> None:
    workspace = Workspace(keys)
    project = await project_in(stub, workspace)
    user = workspace.users["member"]
    refused = await call(
        stub,
        "CreateItem",
        pb.CreateItemRequest(parent=project.name, item=workflow_pb2.Item(title="x", assignee=f"users/{user}")),
        workspace["member"],
    )
    assert (refused.code(), details(refused)[1]) == (grpc.StatusCode.INVALID_ARGUMENT, ["item.assignee"])
    await admin_conn.execute(
        "INSERT INTO workflow.members (tenant_id, user_id, role, change_time) VALUES ($1, $2, 'member', now())",
        uuid.UUID(workspace.id),
        uuid.UUID(user),
    )
    assigned = await item_in(stub, workspace, project.name, assignee=f"users/{user}")
    assert assigned.assignee == f"users/{user}"


@pytest.mark.gate("S03")
async def test_roles_other_workspaces_and_missing_tokens(stub: Stub, keys: TestKeys) -> None:
    workspace, other = Workspace(keys), Workspace(keys)
    project = await project_in(stub, workspace)
    create = pb.CreateItemRequest(parent=project.name, item=workflow_pb2.Item(title="x"))
    assert (await call(stub, "CreateItem", create, workspace["viewer"])).code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await call(stub, "CreateItem", create, other["owner"])).code() == grpc.StatusCode.NOT_FOUND
    assert (await call(stub, "CreateItem", create)).code() == grpc.StatusCode.UNAUTHENTICATED
    new_project = pb.CreateProjectRequest(parent=workspace.name, project=workflow_pb2.Project(display_name="P"))
    assert (await call(stub, "CreateProject", new_project, workspace["member"])).code() == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    got = await call(stub, "GetProject", pb.GetProjectRequest(name=project.name), other["owner"])
    assert got.code() == grpc.StatusCode.NOT_FOUND


async def test_events_reach_jetstream_once_per_change(stub: Stub, keys: TestKeys, broker: Broker) -> None:
    workspace = Workspace(keys)
    project = await project_in(stub, workspace)
    subscription = await broker.js.pull_subscribe(
        "tessera.workflow.>",
        stream=stream_name("workflow"),
        config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, inactive_threshold=30.0),
    )
    try:
        item = await item_in(stub, workspace, project.name)
        await stub.TransitionItem(pb.TransitionItemRequest(name=item.name, status="todo"), metadata=workspace["member"])
        failed = await call(
            stub, "TransitionItem", pb.TransitionItemRequest(name=item.name, status="done"), workspace["member"]
        )
        assert failed.code() == grpc.StatusCode.FAILED_PRECONDITION
        seen: list[tuple[str, str]] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(seen) < 3:
            try:
                messages = await subscription.fetch(10, timeout=0.3)
            except TimeoutError:
                if len(seen) >= 2:
                    break
                continue
            for message in messages:
                await message.ack()
                envelope = EventEnvelope.FromString(message.data)
                if envelope.subject == item.name:
                    seen.append((message.subject, envelope.type))
        assert seen == [
            ("tessera.workflow.item_created", "tessera.workflow.v1.ItemCreatedEvent"),
            ("tessera.workflow.item_transitioned", "tessera.workflow.v1.ItemTransitionedEvent"),
        ]
    finally:
        await subscription.unsubscribe()


async def test_the_service_plans_every_statement_for_its_own_tenant(runtime: ServiceRuntime) -> None:
    """Generic plans ignore how big the tenant is; the workflow pool always asks for custom plans."""
    assert runtime.database is not None
    async with runtime.database.unit_of_work(None) as uow:
        assert await uow.fetchval(sa.text("SHOW plan_cache_mode")) == "force_custom_plan"
