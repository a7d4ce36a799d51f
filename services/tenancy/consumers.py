"""Event consumers of the tenancy service."""

from __future__ import annotations

import uuid

from services.kit.consumer import ConsumerSpec
from services.kit.db import UnitOfWork
from services.tenancy.models import SERVICE, workspace_name
from services.tenancy.service import TenancyService
from tessera.common.v1.event_pb2 import EventEnvelope
from tessera.tenancy.v1 import tenancy_events_pb2

PROVISIONER = "tenancy-provisioner"


def provisioner(service: TenancyService) -> ConsumerSpec[tenancy_events_pb2.WorkspaceCreatedEvent]:
    """`tenancy-provisioner`: a created workspace becomes ACTIVE (and WorkspaceProvisionedEvent follows)."""

    async def handle(uow: UnitOfWork, envelope: EventEnvelope, event: tenancy_events_pb2.WorkspaceCreatedEvent) -> None:
        # The envelope's tenant is the workspace (the consumer opened the unit of work for it).
        workspace_id = uuid.UUID(envelope.tenant_id)
        if event.workspace.name != workspace_name(workspace_id):
            raise ValueError(f"event for {event.workspace.name!r} arrived in tenant {workspace_id}")
        await service.provision_workspace(uow, workspace_id=workspace_id)

    return ConsumerSpec(PROVISIONER, SERVICE, tenancy_events_pb2.WorkspaceCreatedEvent, handle)
