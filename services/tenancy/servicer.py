"""gRPC transport of TenancyService: protobuf in, domain calls, protobuf out; nothing else.

Each RPC opens one unit of work for the caller. Until memberships exist (next issue) the caller's
principal carries no tenant, so the unit of work runs with the caller as `tessera.subject` only and
row-level security shows exactly the workspaces they created.
"""

from __future__ import annotations

import uuid
from typing import Any

from services.kit.db import Database
from services.kit.interceptors import current_principal
from services.kit.server import ServicerBinding
from services.tenancy.errors import invalid_field
from services.tenancy.models import WORKSPACE_NAME_PREFIX, workspace_message
from services.tenancy.service import TenancyService
from tessera.tenancy.v1 import tenancy_service_pb2, tenancy_service_pb2_grpc

SERVICE_NAME: str = tenancy_service_pb2.DESCRIPTOR.services_by_name["TenancyService"].full_name


def parse_workspace_name(name: str, *, field: str = "name") -> uuid.UUID:
    """`workspaces/{uuid}` → the id; INVALID_ARGUMENT naming `field` otherwise."""
    if not name.startswith(WORKSPACE_NAME_PREFIX):
        raise invalid_field(field, "must be a workspace name: workspaces/{uuid}")
    try:
        return uuid.UUID(name.removeprefix(WORKSPACE_NAME_PREFIX))
    except ValueError:
        raise invalid_field(field, "must be a workspace name: workspaces/{uuid}") from None


def parse_request_id(value: str) -> uuid.UUID | None:
    """The optional idempotency key (a UUID); INVALID_ARGUMENT if present and malformed."""
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise invalid_field("request_id", "must be a UUID") from None


class TenancyServicer:
    """Implements tessera.tenancy.v1.TenancyService on top of TenancyService."""

    def __init__(self, database: Database, service: TenancyService) -> None:
        self.database = database
        self.service = service

    async def CreateWorkspace(
        self, request: tenancy_service_pb2.CreateWorkspaceRequest, context: Any
    ) -> tenancy_service_pb2.CreateWorkspaceResponse:
        """Create a workspace owned by the caller."""
        principal = current_principal()
        request_id = parse_request_id(request.request_id)
        async with self.database.unit_of_work(principal) as uow:
            workspace = await self.service.create_workspace(
                uow, principal, display_name=request.workspace.display_name, request_id=request_id
            )
        return tenancy_service_pb2.CreateWorkspaceResponse(workspace=workspace_message(workspace))

    async def GetWorkspace(
        self, request: tenancy_service_pb2.GetWorkspaceRequest, context: Any
    ) -> tenancy_service_pb2.GetWorkspaceResponse:
        """Get a workspace visible to the caller."""
        principal = current_principal()
        workspace_id = parse_workspace_name(request.name)
        async with self.database.unit_of_work(principal) as uow:
            workspace = await self.service.get_workspace(uow, principal, workspace_id=workspace_id)
        return tenancy_service_pb2.GetWorkspaceResponse(workspace=workspace_message(workspace))

    async def ListWorkspaces(
        self, request: tenancy_service_pb2.ListWorkspacesRequest, context: Any
    ) -> tenancy_service_pb2.ListWorkspacesResponse:
        """List the caller's workspaces, newest first."""
        principal = current_principal()
        async with self.database.unit_of_work(principal) as uow:
            page = await self.service.list_workspaces(
                uow, principal, requested_page_size=request.page_size, page_token=request.page_token
            )
        return tenancy_service_pb2.ListWorkspacesResponse(
            workspaces=[workspace_message(workspace) for workspace in page.workspaces],
            next_page_token=page.next_page_token,
        )


def binding(servicer: TenancyServicer) -> ServicerBinding:
    """The servicer as the kit runtime registers it."""
    return ServicerBinding(
        service_name=SERVICE_NAME,
        servicer=servicer,
        add_to_server=tenancy_service_pb2_grpc.add_TenancyServiceServicer_to_server,
    )
