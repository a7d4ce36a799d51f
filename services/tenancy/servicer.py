"""gRPC transport of TenancyService: protobuf in, domain calls, protobuf out; nothing else.

Each RPC opens one unit of work. Workspace-level RPCs (the contract's AUTH_LEVEL_WORKSPACE) run in the
caller's workspace (the token's tenant) after `require_tenant`, so a name of another workspace is
NOT_FOUND before any SQL runs. User-level RPCs run with the caller as `tessera.subject`: row-level
security then shows the caller's own memberships. CreateWorkspace and AcceptInvitation open the unit of
work in the workspace they write to (the new one, the one the invitation token names).
"""

from __future__ import annotations

import uuid
from typing import Any

from services.kit.db import Database
from services.kit.ids import uuid7
from services.kit.interceptors import current_principal
from services.kit.principal import Principal
from services.kit.server import ServicerBinding
from services.tenancy.errors import invalid_field
from services.tenancy.models import (
    WORKSPACE_NAME_PREFIX,
    audit_event_message,
    invitation_message,
    member_message,
    workspace_message,
)
from services.tenancy.service import TenancyService, invitation_token_workspace
from tessera.tenancy.v1 import tenancy_service_pb2 as pb
from tessera.tenancy.v1 import tenancy_service_pb2_grpc

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["TenancyService"].full_name


def parse_workspace_name(name: str, *, field: str = "name") -> uuid.UUID:
    """`workspaces/{uuid}` → the id; INVALID_ARGUMENT naming `field` otherwise."""
    if not name.startswith(WORKSPACE_NAME_PREFIX):
        raise invalid_field(field, "must be a workspace name: workspaces/{uuid}")
    try:
        return uuid.UUID(name.removeprefix(WORKSPACE_NAME_PREFIX))
    except ValueError:
        raise invalid_field(field, "must be a workspace name: workspaces/{uuid}") from None


def parse_child_name(name: str, collection: str, *, field: str) -> tuple[uuid.UUID, uuid.UUID]:
    """`workspaces/{uuid}/{collection}/{uuid}` → (workspace id, child id); INVALID_ARGUMENT otherwise."""
    parts = name.split("/")
    if len(parts) == 4 and parts[0] == WORKSPACE_NAME_PREFIX.rstrip("/") and parts[2] == collection:
        try:
            return uuid.UUID(parts[1]), uuid.UUID(parts[3])
        except ValueError:
            pass
    raise invalid_field(field, f"must be a name like workspaces/{{uuid}}/{collection}/{{uuid}}")


def parse_request_id(value: str) -> uuid.UUID | None:
    """The optional idempotency key (a UUID); INVALID_ARGUMENT if present and malformed."""
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise invalid_field("request_id", "must be a UUID") from None


def _in_workspace(name: str, *, field: str) -> tuple[Principal, uuid.UUID]:
    """The caller and the workspace a workspace-level request names; NOT_FOUND if it is not the caller's."""
    principal = current_principal()
    workspace_id = parse_workspace_name(name, field=field)
    principal.require_tenant(str(workspace_id), resource=name)
    return principal, workspace_id


def _child_in_workspace(name: str, collection: str, *, field: str) -> tuple[Principal, uuid.UUID, uuid.UUID]:
    """The caller, workspace and child id of a `workspaces/{ws}/{collection}/{id}` name of the caller's workspace."""
    principal = current_principal()
    workspace_id, child_id = parse_child_name(name, collection, field=field)
    principal.require_tenant(str(workspace_id), resource=name)
    return principal, workspace_id, child_id


class TenancyServicer:
    """Implements tessera.tenancy.v1.TenancyService on top of TenancyService."""

    def __init__(self, database: Database, service: TenancyService) -> None:
        self.database = database
        self.service = service

    # --- workspaces -------------------------------------------------------------------------------------

    async def CreateWorkspace(self, request: pb.CreateWorkspaceRequest, context: Any) -> pb.CreateWorkspaceResponse:
        """Create a workspace owned by the caller."""
        principal = current_principal()
        request_id = parse_request_id(request.request_id)
        workspace_id = uuid7()
        async with self.database.unit_of_work(principal, tenant_id=str(workspace_id)) as uow:
            workspace = await self.service.create_workspace(
                uow,
                principal,
                workspace_id=workspace_id,
                display_name=request.workspace.display_name,
                request_id=request_id,
            )
        return pb.CreateWorkspaceResponse(workspace=workspace_message(workspace))

    async def GetWorkspace(self, request: pb.GetWorkspaceRequest, context: Any) -> pb.GetWorkspaceResponse:
        """Get the caller's workspace."""
        principal, workspace_id = _in_workspace(request.name, field="name")
        async with self.database.unit_of_work(principal) as uow:
            workspace = await self.service.get_workspace(uow, principal, workspace_id=workspace_id)
        return pb.GetWorkspaceResponse(workspace=workspace_message(workspace))

    async def ListWorkspaces(self, request: pb.ListWorkspacesRequest, context: Any) -> pb.ListWorkspacesResponse:
        """List the caller's workspaces, newest first."""
        principal = current_principal()
        async with self.database.unit_of_work(principal) as uow:
            page = await self.service.list_workspaces(
                uow,
                principal,
                requested_page_size=request.page_size,
                page_token=request.page_token,
                show_deleted=request.show_deleted,
            )
        return pb.ListWorkspacesResponse(
            workspaces=[workspace_message(workspace) for workspace in page.workspaces],
            next_page_token=page.next_page_token,
        )

    async def UpdateWorkspace(self, request: pb.UpdateWorkspaceRequest, context: Any) -> pb.UpdateWorkspaceResponse:
        """Update the caller's workspace (display_name), honouring update_mask and etag."""
        principal, workspace_id = _in_workspace(request.workspace.name, field="workspace.name")
        async with self.database.unit_of_work(principal) as uow:
            workspace = await self.service.update_workspace(
                uow,
                principal,
                workspace_id=workspace_id,
                display_name=request.workspace.display_name,
                update_mask=list(request.update_mask.paths),
                etag=request.workspace.etag,
            )
        return pb.UpdateWorkspaceResponse(workspace=workspace_message(workspace))

    async def DeleteWorkspace(self, request: pb.DeleteWorkspaceRequest, context: Any) -> pb.DeleteWorkspaceResponse:
        """Soft-delete the caller's workspace."""
        principal, workspace_id = _in_workspace(request.name, field="name")
        async with self.database.unit_of_work(principal) as uow:
            workspace = await self.service.delete_workspace(
                uow, principal, workspace_id=workspace_id, etag=request.etag
            )
        return pb.DeleteWorkspaceResponse(workspace=workspace_message(workspace))

    async def UndeleteWorkspace(
        self, request: pb.UndeleteWorkspaceRequest, context: Any
    ) -> pb.UndeleteWorkspaceResponse:
        """Restore the caller's soft-deleted workspace."""
        principal, workspace_id = _in_workspace(request.name, field="name")
        async with self.database.unit_of_work(principal) as uow:
            workspace = await self.service.undelete_workspace(uow, principal, workspace_id=workspace_id)
        return pb.UndeleteWorkspaceResponse(workspace=workspace_message(workspace))

    # --- memberships ------------------------------------------------------------------------------------

    async def LookupMembership(self, request: pb.LookupMembershipRequest, context: Any) -> pb.LookupMembershipResponse:
        """The caller's own membership of a workspace."""
        principal = current_principal()
        workspace_id = parse_workspace_name(request.workspace, field="workspace")
        async with self.database.unit_of_work(principal) as uow:
            member = await self.service.lookup_membership(uow, principal, workspace_id=workspace_id)
        return pb.LookupMembershipResponse(member=member_message(member))

    async def ListMembers(self, request: pb.ListMembersRequest, context: Any) -> pb.ListMembersResponse:
        """List the members of the caller's workspace."""
        principal, workspace_id = _in_workspace(request.parent, field="parent")
        async with self.database.unit_of_work(principal) as uow:
            page = await self.service.list_members(
                uow,
                principal,
                workspace_id=workspace_id,
                requested_page_size=request.page_size,
                page_token=request.page_token,
            )
        return pb.ListMembersResponse(
            members=[member_message(member) for member in page.members], next_page_token=page.next_page_token
        )

    async def UpdateMember(self, request: pb.UpdateMemberRequest, context: Any) -> pb.UpdateMemberResponse:
        """Change a member's role."""
        principal, workspace_id, user_id = _child_in_workspace(request.member.name, "members", field="member.name")
        paths = set(request.update_mask.paths)
        if paths - {"role", "*"}:
            raise invalid_field("update_mask", "only role can be updated")
        async with self.database.unit_of_work(principal) as uow:
            member = await self.service.update_member(
                uow, principal, workspace_id=workspace_id, user_id=user_id, role=request.member.role
            )
        return pb.UpdateMemberResponse(member=member_message(member))

    async def RemoveMember(self, request: pb.RemoveMemberRequest, context: Any) -> pb.RemoveMemberResponse:
        """Remove a member from the caller's workspace."""
        principal, workspace_id, user_id = _child_in_workspace(request.name, "members", field="name")
        async with self.database.unit_of_work(principal) as uow:
            await self.service.remove_member(uow, principal, workspace_id=workspace_id, user_id=user_id)
        return pb.RemoveMemberResponse()

    async def LeaveWorkspace(self, request: pb.LeaveWorkspaceRequest, context: Any) -> pb.LeaveWorkspaceResponse:
        """The caller leaves its workspace."""
        principal, workspace_id = _in_workspace(request.name, field="name")
        async with self.database.unit_of_work(principal) as uow:
            await self.service.leave_workspace(uow, principal, workspace_id=workspace_id)
        return pb.LeaveWorkspaceResponse()

    async def TransferOwnership(
        self, request: pb.TransferOwnershipRequest, context: Any
    ) -> pb.TransferOwnershipResponse:
        """Make another member owner and the caller admin."""
        principal, workspace_id = _in_workspace(request.name, field="name")
        target_workspace, new_owner = parse_child_name(request.new_owner, "members", field="new_owner")
        if target_workspace != workspace_id:
            raise invalid_field("new_owner", f"must be a member of {request.name}")
        async with self.database.unit_of_work(principal) as uow:
            transfer = await self.service.transfer_ownership(
                uow, principal, workspace_id=workspace_id, new_owner=new_owner
            )
        return pb.TransferOwnershipResponse(
            new_owner=member_message(transfer.new_owner), previous_owner=member_message(transfer.previous_owner)
        )

    # --- invitations ------------------------------------------------------------------------------------

    async def CreateInvitation(self, request: pb.CreateInvitationRequest, context: Any) -> pb.CreateInvitationResponse:
        """Invite an email address to the caller's workspace."""
        principal, workspace_id = _in_workspace(request.parent, field="parent")
        async with self.database.unit_of_work(principal) as uow:
            created = await self.service.create_invitation(
                uow,
                principal,
                workspace_id=workspace_id,
                email=request.invitation.email,
                role=request.invitation.role,
            )
        return pb.CreateInvitationResponse(invitation=invitation_message(created.invitation))

    async def ListInvitations(self, request: pb.ListInvitationsRequest, context: Any) -> pb.ListInvitationsResponse:
        """List the invitations of the caller's workspace."""
        principal, workspace_id = _in_workspace(request.parent, field="parent")
        async with self.database.unit_of_work(principal) as uow:
            page = await self.service.list_invitations(
                uow,
                principal,
                workspace_id=workspace_id,
                requested_page_size=request.page_size,
                page_token=request.page_token,
            )
        return pb.ListInvitationsResponse(
            invitations=[invitation_message(invitation) for invitation in page.invitations],
            next_page_token=page.next_page_token,
        )

    async def RevokeInvitation(self, request: pb.RevokeInvitationRequest, context: Any) -> pb.RevokeInvitationResponse:
        """Revoke a pending invitation of the caller's workspace."""
        principal, workspace_id, invitation_id = _child_in_workspace(request.name, "invitations", field="name")
        async with self.database.unit_of_work(principal) as uow:
            invitation = await self.service.revoke_invitation(
                uow, principal, workspace_id=workspace_id, invitation_id=invitation_id
            )
        return pb.RevokeInvitationResponse(invitation=invitation_message(invitation))

    async def AcceptInvitation(self, request: pb.AcceptInvitationRequest, context: Any) -> pb.AcceptInvitationResponse:
        """Join the workspace an invitation token names."""
        principal = current_principal()
        workspace_id = invitation_token_workspace(request.token)
        async with self.database.unit_of_work(principal, tenant_id=str(workspace_id)) as uow:
            member = await self.service.accept_invitation(uow, principal, token=request.token)
        return pb.AcceptInvitationResponse(member=member_message(member))

    # --- audit log --------------------------------------------------------------------------------------

    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context: Any) -> pb.ListAuditEventsResponse:
        """List the audit log of the caller's workspace, newest first."""
        principal, workspace_id = _in_workspace(request.parent, field="parent")
        async with self.database.unit_of_work(principal) as uow:
            page = await self.service.list_audit_events(
                uow,
                principal,
                workspace_id=workspace_id,
                requested_page_size=request.page_size,
                page_token=request.page_token,
            )
        return pb.ListAuditEventsResponse(
            audit_events=[audit_event_message(event) for event in page.audit_events],
            next_page_token=page.next_page_token,
        )


def binding(servicer: TenancyServicer) -> ServicerBinding:
    """The servicer as the kit runtime registers it."""
    return ServicerBinding(
        service_name=SERVICE_NAME,
        servicer=servicer,
        add_to_server=tenancy_service_pb2_grpc.add_TenancyServiceServicer_to_server,
    )
