"""The `members` read model: order-safe upserts, and the real consumer of tenancy's MembershipChangedEvent."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from services.kit.broker import Broker
from services.kit.consumer import EventConsumer
from services.kit.db import Database
from services.kit.errors import Internal, InvalidArgument
from services.kit.events import build_envelope, subject_for
from services.kit.ids import uuid7
from services.workflow.consumers import members_consumer
from services.workflow.service import WorkflowService
from tessera.tenancy.v1 import tenancy_events_pb2
from tests.helpers import eventually
from tests.workflow.conftest import Scene

pytestmark = pytest.mark.gate("S04")

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


async def stored(admin: asyncpg.Connection, workspace_id: uuid.UUID, user_id: uuid.UUID) -> tuple[str | None, datetime]:
    row = await admin.fetchrow(
        "SELECT role, change_time FROM workflow.members WHERE tenant_id = $1 AND user_id = $2", workspace_id, user_id
    )
    assert row is not None
    return row["role"], row["change_time"]


class TestReadModel:
    async def test_newest_change_wins_whatever_the_arrival_order(
        self, scene: Scene, admin_conn: asyncpg.Connection
    ) -> None:
        user = uuid7()
        await scene.add_member("member", user_id=user, at=T0)
        await scene.add_member(None, user_id=user, at=T0 + timedelta(minutes=5))  # left
        await scene.add_member("admin", user_id=user, at=T0 + timedelta(minutes=1))  # an older event, late
        assert await stored(admin_conn, scene.workspace_id, user) == (None, T0 + timedelta(minutes=5))
        await scene.add_member("member", user_id=user, at=T0 + timedelta(minutes=5))  # same time: no change
        assert (await stored(admin_conn, scene.workspace_id, user))[0] is None
        await scene.add_member("viewer", user_id=user, at=T0 + timedelta(minutes=9))  # rejoined
        assert await stored(admin_conn, scene.workspace_id, user) == ("viewer", T0 + timedelta(minutes=9))

    async def test_an_ended_membership_cannot_be_assigned(self, scene: Scene) -> None:
        project = await scene.create_project()
        user = await scene.add_member("member", at=T0)
        await scene.create_item(project, assignee=user)
        await scene.add_member(None, user_id=uuid.UUID(user.removeprefix("users/")), at=T0 + timedelta(seconds=1))
        with pytest.raises(InvalidArgument, match="not a member"):
            await scene.create_item(project, assignee=user)

    async def test_the_unit_of_work_must_be_the_workspaces(
        self, workflow_db: Database, service: WorkflowService
    ) -> None:
        async with workflow_db.unit_of_work(None, tenant_id=str(uuid7())) as uow:
            with pytest.raises(Internal, match="unit of work opened for tenant"):
                await service.record_membership(
                    uow, workspace_id=uuid7(), user_id=uuid7(), role="member", change_time=T0
                )


# --- through JetStream, as deployed -------------------------------------------------------------------------


@pytest.fixture
async def broker(nats_url: str) -> AsyncIterator[Broker]:
    connection = Broker(nats_url, name="workflow-members-test")
    await connection.connect()
    await connection.ensure_streams("tenancy")
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def consumer(workflow_db: Database, broker: Broker, service: WorkflowService) -> AsyncIterator[EventConsumer]:
    running = EventConsumer(members_consumer(service), workflow_db, broker)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def publish(broker: Broker, workspace_id: uuid.UUID, user_id: uuid.UUID, role: str, at: datetime) -> str:
    event = tenancy_events_pb2.MembershipChangedEvent(member=f"workspaces/{workspace_id}/members/{user_id}", role=role)
    event.change_time.FromDatetime(at)
    envelope = build_envelope(event, source="tenancy", tenant_id=str(workspace_id), subject=event.member)
    data = envelope.SerializeToString()
    await broker.js.publish(subject_for("tenancy", event), data, headers={"Nats-Msg-Id": envelope.id})
    return envelope.id


async def test_the_consumer_keeps_the_read_model_order_safe_and_idempotent(
    consumer: EventConsumer, broker: Broker, admin_conn: asyncpg.Connection
) -> None:
    workspace_id, user_id = uuid7(), uuid7()

    async def role() -> tuple[str | None, datetime] | None:
        row = await admin_conn.fetchrow(
            "SELECT role, change_time FROM workflow.members WHERE tenant_id = $1 AND user_id = $2",
            workspace_id,
            user_id,
        )
        return (row["role"], row["change_time"]) if row is not None else None

    await publish(broker, workspace_id, user_id, "member", T0)
    await eventually(role, what="the membership in the read model")
    ended = await publish(broker, workspace_id, user_id, "", T0 + timedelta(minutes=2))

    async def ended_seen() -> bool:
        return await role() == (None, T0 + timedelta(minutes=2))

    await eventually(ended_seen, what="the ended membership")
    # An older change arriving late has no effect.
    late = await publish(broker, workspace_id, user_id, "admin", T0 + timedelta(minutes=1))

    async def handled(event_id: str) -> bool:
        query = "SELECT count(*) FROM workflow.inbox WHERE consumer = 'workflow-members' AND event_id = $1"
        return bool(await admin_conn.fetchval(query, uuid.UUID(event_id)))

    await eventually(lambda: handled(late), what="the late event handled")
    assert await role() == (None, T0 + timedelta(minutes=2))
    assert await handled(ended)
