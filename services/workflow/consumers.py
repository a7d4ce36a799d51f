"""Event consumers of the workflow service."""

from __future__ import annotations

import uuid
from datetime import UTC

from services.kit.consumer import ConsumerSpec
from services.kit.db import UnitOfWork
from services.workflow.models import parse_name
from services.workflow.service import WorkflowService
from tessera.common.v1.event_pb2 import EventEnvelope
from tessera.tenancy.v1 import tenancy_events_pb2

MEMBERS = "workflow-members"
TENANCY = "tenancy"


def members_consumer(service: WorkflowService) -> ConsumerSpec[tenancy_events_pb2.MembershipChangedEvent]:
    """`workflow-members`: tenancy's MembershipChangedEvent kept in the `members` read model (newest wins)."""

    async def handle(
        uow: UnitOfWork, envelope: EventEnvelope, event: tenancy_events_pb2.MembershipChangedEvent
    ) -> None:
        ids = parse_name(event.member, ("members",))
        if ids is None:
            raise ValueError(f"member {event.member!r} is not workspaces/{{uuid}}/members/{{uuid}}")
        workspace_id, user_id = ids
        # The envelope's tenant is the workspace (the consumer opened the unit of work for it).
        if workspace_id != uuid.UUID(envelope.tenant_id):
            raise ValueError(f"event for {event.member!r} arrived in tenant {envelope.tenant_id}")
        if not event.HasField("change_time"):
            raise ValueError(f"membership change of {event.member!r} has no change_time")
        await service.record_membership(
            uow,
            workspace_id=workspace_id,
            user_id=user_id,
            role=event.role or None,
            change_time=event.change_time.ToDatetime(tzinfo=UTC),
        )

    return ConsumerSpec(MEMBERS, TENANCY, tenancy_events_pb2.MembershipChangedEvent, handle)
