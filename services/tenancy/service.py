"""Tenancy business rules: workspaces, memberships, invitations and the audit log.

Every method takes the unit of work and the caller explicitly, `(uow, principal, *, ...)`; none
commits (the kit's unit of work does), and events and audit entries are written into the same
transaction. Workspace-level methods check again what the interceptor already checked (the caller
acts in this workspace, and its role grants the permission the contract declares for the RPC), so
the rules hold for any caller of this class, not only for the gRPC servicer.

Membership changes of one workspace are serialised by locking its workspace row first, so the
last-owner rule cannot be broken by two concurrent demotions.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import unicodedata
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import structlog

from services.kit.authz import ADMIN, ASSIGNABLE_ROLES, OWNER, ROLES, WORKSPACE, auth_rule_for
from services.kit.context import request_id_var
from services.kit.db import UnitOfWork
from services.kit.errors import Aborted, AlreadyExists, FailedPrecondition, Internal, InvalidArgument, NotFound
from services.kit.paging import INVALID_PAGE_TOKEN, PageTokenCodec, page_size, query_key
from services.kit.principal import Principal
from services.tenancy import errors
from services.tenancy.models import (
    API_KEY_NAME_PREFIX,
    DISPLAY_NAME_MAX_CHARS,
    AuditAction,
    AuditPage,
    CreatedInvitation,
    Invitation,
    InvitationPage,
    InvitationState,
    Member,
    MemberPage,
    Transfer,
    Workspace,
    WorkspacePage,
    invitation_message,
    invitation_name,
    member_name,
    timestamp,
    user_name,
    workspace_message,
    workspace_name,
)
from services.tenancy.repository import (
    AuditRepository,
    Cursor,
    InvitationRepository,
    MemberRepository,
    WorkspaceRepository,
)
from tessera.tenancy.v1 import tenancy_events_pb2, tenancy_service_pb2

DISPLAY_NAME_FIELD = "workspace.display_name"
PAGE_TOKEN_FIELD = "page_token"  # noqa: S105  # a field name, not a secret
UPDATABLE_WORKSPACE_FIELDS = frozenset({"display_name"})
DEFAULT_WORKSPACE_PAGE_SIZE = 50
DEFAULT_MEMBER_PAGE_SIZE = 100
DEFAULT_INVITATION_PAGE_SIZE = 100
DEFAULT_AUDIT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
DEFAULT_INVITATION_TTL = timedelta(days=7)
DEFAULT_RESTORE_WINDOW = timedelta(days=30)
EMAIL_MAX_CHARS = 254
INVITATION_TOKEN_PREFIX = "inv_"  # noqa: S105  # the token format's prefix, not a secret

# `local@domain.tld`: no spaces, one @, a dot in the domain. Deliverability is the mail sender's problem.
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+")
_TOKEN = re.compile(r"inv_([0-9a-f]{32})_([A-Za-z0-9_-]{43})")

_SERVICE = tenancy_service_pb2.DESCRIPTOR.services_by_name["TenancyService"]

log = structlog.get_logger("tessera.tenancy")

T = TypeVar("T")


def _workspace_permissions() -> dict[str, str]:
    """The permission each workspace-level RPC declares in the contract (the proto is the one source)."""
    return {
        method.name: rule.permission
        for method in _SERVICE.methods
        if (rule := auth_rule_for(method)) is not None and rule.level == WORKSPACE
    }


def _query_key(method: str, *parts: str) -> bytes:
    return query_key(f"{_SERVICE.full_name}/{method}", *parts)


def validate_display_name(display_name: str) -> None:
    """1 to 100 characters, not only whitespace, no control characters."""
    if not display_name.strip():
        raise errors.invalid_field(DISPLAY_NAME_FIELD, "must not be empty or only whitespace")
    if len(display_name) > DISPLAY_NAME_MAX_CHARS:
        raise errors.invalid_field(DISPLAY_NAME_FIELD, f"must be at most {DISPLAY_NAME_MAX_CHARS} characters")
    if any(unicodedata.category(char) == "Cc" for char in display_name):
        raise errors.invalid_field(DISPLAY_NAME_FIELD, "must not contain control characters")


def normalize_email(email: str, *, field: str = "invitation.email") -> str:
    """The address trimmed and lower-cased; INVALID_ARGUMENT unless it looks like `local@domain.tld`."""
    normalized = email.strip().lower()
    if len(normalized) > EMAIL_MAX_CHARS or not _EMAIL.fullmatch(normalized):
        raise errors.invalid_field(field, "must be an email address like name@example.com")
    return normalized


def create_fingerprint(*, display_name: str) -> str:
    """A stable hash of the CreateWorkspace payload, to tell a retry from a reused request_id."""
    canonical = json.dumps({"display_name": display_name}, sort_keys=True, separators=(",", ":"))
    return "v1:" + hashlib.sha256(canonical.encode()).hexdigest()


def new_invitation_token(workspace_id: uuid.UUID) -> str:
    """`inv_<workspace hex>_<32 random bytes, url-safe base64>`: AcceptInvitation finds the tenant in it."""
    return f"{INVITATION_TOKEN_PREFIX}{workspace_id.hex}_{secrets.token_urlsafe(32)}"


def invitation_token_workspace(token: str) -> uuid.UUID:
    """The workspace an invitation token belongs to; INVALID_ARGUMENT (field `token`) if it is malformed."""
    match = _TOKEN.fullmatch(token)
    if match is None:
        raise errors.invitation_token_invalid("is not an invitation token")
    return uuid.UUID(hex=match.group(1))


def token_hash(token: str) -> bytes:
    """What is stored of a token: its SHA-256 (the token has 256 random bits, so no salt or stretching)."""
    return hashlib.sha256(token.encode()).digest()


def actor_name(principal: Principal) -> str:
    """The caller as a resource name for audit entries: `users/{id}` or `apiKeys/{id}`."""
    if principal.kind == "api_key":
        return f"{API_KEY_NAME_PREFIX}{principal.subject}"
    return user_name(principal.subject)


class TenancyService:
    """Tenancy rules; holds only configuration (page token codec, invitation TTL, restore window)."""

    PERMISSIONS: dict[str, str] = _workspace_permissions()

    def __init__(
        self,
        *,
        page_tokens: PageTokenCodec,
        invitation_ttl: timedelta = DEFAULT_INVITATION_TTL,
        restore_window: timedelta = DEFAULT_RESTORE_WINDOW,
    ) -> None:
        if invitation_ttl <= timedelta(0) or restore_window < timedelta(0):
            raise ValueError("invitation_ttl must be positive and restore_window not negative")
        self.page_tokens = page_tokens
        self.invitation_ttl = invitation_ttl
        self.restore_window = restore_window

    # --- workspaces -------------------------------------------------------------------------------------

    async def create_workspace(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        workspace_id: uuid.UUID,
        display_name: str,
        request_id: uuid.UUID | None = None,
    ) -> Workspace:
        """Create a PROVISIONING workspace with the caller as owner; a retried request_id returns the first one.

        The unit of work must be opened for the new workspace (`tenant_id=workspace_id`): the rows are
        written into that tenant.
        """
        _require_uow_tenant(uow, workspace_id)
        if principal.kind != "user":
            raise errors.user_required("create a workspace")
        validate_display_name(display_name)
        creator = uuid.UUID(principal.subject)
        fingerprint = create_fingerprint(display_name=display_name) if request_id is not None else None
        repository = WorkspaceRepository(uow)
        created = await repository.insert(
            workspace_id=workspace_id,
            display_name=display_name,
            creator=creator,
            request_id=request_id,
            request_fingerprint=fingerprint,
        )
        if created is None:
            # Only a request_id conflict skips the insert: this is a retry (or a reuse) of an earlier call.
            if request_id is None:
                raise Internal("workspace insert skipped without a request_id")
            earlier = await repository.find_by_request_id(creator=creator, request_id=request_id)
            if earlier is None:  # the creator no longer belongs to the workspace made under this request_id
                raise Aborted(
                    "the workspace created with this request_id is no longer available; use a new request_id",
                    metadata={"request_id": str(request_id)},
                )
            if earlier.request_fingerprint != fingerprint:
                raise errors.request_id_reused(request_id)
            return earlier.workspace
        owner = await MemberRepository(uow).insert(workspace_id=created.id, user_id=creator, role=OWNER)
        if owner is None:
            raise Internal("a new workspace already had a member")
        uow.emit(
            tenancy_events_pb2.WorkspaceCreatedEvent(workspace=workspace_message(created)),
            subject=created.name,
            tenant_id=str(created.tenant_id),
        )
        audit = AuditRepository(uow)
        await self._audit(
            audit, principal, created.id, AuditAction.WORKSPACE_CREATED, created.name, None, created.snapshot()
        )
        await self._member_added(uow, audit, principal, owner)
        log.info("workspace created", workspace=created.name, creator=str(creator))
        return created

    async def get_workspace(self, uow: UnitOfWork, principal: Principal, *, workspace_id: uuid.UUID) -> Workspace:
        """The caller's workspace; NOT_FOUND if it is another one, absent or soft-deleted (they look alike)."""
        name = workspace_name(workspace_id)
        self._authorize(principal, workspace_id, "GetWorkspace", resource=name)
        workspace = await WorkspaceRepository(uow).get_live(workspace_id=workspace_id)
        if workspace is None:
            raise errors.workspace_not_found(workspace_id)
        return workspace

    async def list_workspaces(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        requested_page_size: int = 0,
        page_token: str = "",
        show_deleted: bool = False,
    ) -> WorkspacePage:
        """The workspaces the caller is a member of, newest first, one keyset page at a time."""
        size = page_size(requested_page_size, default=DEFAULT_WORKSPACE_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        key = _query_key("ListWorkspaces", "create_time desc, id desc", f"show_deleted={show_deleted}")
        after = self._decode_cursor(page_token, key=key, issued_to=principal.subject)
        rows = await WorkspaceRepository(uow).list_of_member(
            user_id=uuid.UUID(principal.subject), show_deleted=show_deleted, after=after, limit=size + 1
        )
        page, token = self._page(rows, size, key=key, principal=principal, cursor=lambda w: (w.create_time, w.id))
        return WorkspacePage(page, token)

    async def update_workspace(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        workspace_id: uuid.UUID,
        display_name: str,
        update_mask: Sequence[str] = (),
        etag: str = "",
    ) -> Workspace:
        """Change the fields in update_mask (only display_name; empty: display_name); ABORTED on a stale etag."""
        name = workspace_name(workspace_id)
        self._authorize(principal, workspace_id, "UpdateWorkspace", resource=name)
        paths = set(update_mask) or {"display_name"}
        if "*" in paths:
            paths = (paths - {"*"}) | UPDATABLE_WORKSPACE_FIELDS
        unknown = sorted(paths - UPDATABLE_WORKSPACE_FIELDS)
        if unknown:
            raise errors.invalid_field("update_mask", f"cannot update {', '.join(unknown)}; only display_name")
        validate_display_name(display_name)
        repository = WorkspaceRepository(uow)
        locked = await repository.lock(workspace_id=workspace_id)
        if locked is None or locked.workspace.deleted:
            raise errors.workspace_not_found(workspace_id)
        before = locked.workspace
        _check_etag(before, etag)
        if before.display_name == display_name:
            return before
        after = await repository.rename(workspace_id=workspace_id, display_name=display_name)
        await self._audit(
            AuditRepository(uow),
            principal,
            workspace_id,
            AuditAction.WORKSPACE_UPDATED,
            name,
            before.snapshot(),
            after.snapshot(),
        )
        return after

    async def delete_workspace(
        self, uow: UnitOfWork, principal: Principal, *, workspace_id: uuid.UUID, etag: str = ""
    ) -> Workspace:
        """Soft-delete: the workspace disappears and can be restored until its purge_time."""
        name = workspace_name(workspace_id)
        self._authorize(principal, workspace_id, "DeleteWorkspace", resource=name)
        repository = WorkspaceRepository(uow)
        locked = await repository.lock(workspace_id=workspace_id)
        if locked is None or locked.workspace.deleted:
            raise errors.workspace_not_found(workspace_id)
        _check_etag(locked.workspace, etag)
        deleted = await repository.soft_delete(workspace_id=workspace_id, restore_window=self.restore_window)
        assert deleted is not None, "the locked live workspace vanished"
        uow.emit(tenancy_events_pb2.WorkspaceDeletedEvent(workspace=workspace_message(deleted)), subject=name)
        await self._audit(
            AuditRepository(uow),
            principal,
            workspace_id,
            AuditAction.WORKSPACE_DELETED,
            name,
            locked.workspace.snapshot(),
            deleted.snapshot(),
        )
        log.info("workspace deleted", workspace=name, purge_time=str(deleted.purge_time))
        return deleted

    async def undelete_workspace(self, uow: UnitOfWork, principal: Principal, *, workspace_id: uuid.UUID) -> Workspace:
        """Restore a soft-deleted workspace before its purge_time; FAILED_PRECONDITION if not deleted or too late."""
        name = workspace_name(workspace_id)
        self._authorize(principal, workspace_id, "UndeleteWorkspace", resource=name)
        repository = WorkspaceRepository(uow)
        locked = await repository.lock(workspace_id=workspace_id)
        if locked is None:
            raise errors.workspace_not_found(workspace_id)
        before = locked.workspace
        if before.purge_time is None:
            raise FailedPrecondition(f"{name} is not deleted", reason=errors.WORKSPACE_NOT_DELETED)
        if before.purge_time <= locked.now:
            raise FailedPrecondition(
                f"{name} can no longer be restored: its restore window ended at {before.purge_time.isoformat()}",
                reason=errors.RESTORE_WINDOW_EXPIRED,
                metadata={"purge_time": before.purge_time.isoformat()},
            )
        restored = await repository.undelete(workspace_id=workspace_id)
        assert restored is not None, "the locked deleted workspace vanished"
        uow.emit(tenancy_events_pb2.WorkspaceUndeletedEvent(workspace=workspace_message(restored)), subject=name)
        await self._audit(
            AuditRepository(uow),
            principal,
            workspace_id,
            AuditAction.WORKSPACE_UNDELETED,
            name,
            before.snapshot(),
            restored.snapshot(),
        )
        log.info("workspace restored", workspace=name)
        return restored

    async def provision_workspace(self, uow: UnitOfWork, *, workspace_id: uuid.UUID) -> Workspace | None:
        """Mark a PROVISIONING workspace ACTIVE and emit WorkspaceProvisionedEvent; None if nothing to do."""
        if uow.tenant_id is None or uuid.UUID(uow.tenant_id) != workspace_id:
            raise ValueError(f"provisioning workspaces/{workspace_id} outside its own tenant ({uow.tenant_id})")
        activated = await WorkspaceRepository(uow).activate(workspace_id=workspace_id)
        if activated is None:
            log.info("workspace not provisioning; nothing to do", workspace=f"workspaces/{workspace_id}")
            return None
        uow.emit(
            tenancy_events_pb2.WorkspaceProvisionedEvent(workspace=workspace_message(activated)),
            subject=activated.name,
            tenant_id=str(activated.tenant_id),
        )
        log.info("workspace provisioned", workspace=activated.name)
        return activated

    # --- memberships ------------------------------------------------------------------------------------

    async def lookup_membership(self, uow: UnitOfWork, principal: Principal, *, workspace_id: uuid.UUID) -> Member:
        """The caller's own membership (identity issues workspace tokens from it).

        A soft-deleted workspace still inside its restore window keeps its owners' memberships usable,
        so an owner can get a token and call UndeleteWorkspace; every other RPC answers NOT_FOUND for it.
        """
        if principal.kind != "user":  # an API key is nobody's member
            raise errors.workspace_not_found(workspace_id)
        member = await MemberRepository(uow).own_usable_membership(
            workspace_id=workspace_id, user_id=uuid.UUID(principal.subject)
        )
        if member is None:
            raise errors.workspace_not_found(workspace_id)
        return member

    async def list_members(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        workspace_id: uuid.UUID,
        requested_page_size: int = 0,
        page_token: str = "",
    ) -> MemberPage:
        """Members of the caller's workspace, oldest first."""
        self._authorize(principal, workspace_id, "ListMembers", resource=workspace_name(workspace_id))
        await self._live_workspace(uow, workspace_id)
        size = page_size(requested_page_size, default=DEFAULT_MEMBER_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        key = _query_key("ListMembers", str(workspace_id), "create_time asc, user_id asc")
        after = self._decode_cursor(page_token, key=key, issued_to=principal.subject)
        rows = await MemberRepository(uow).page(workspace_id=workspace_id, after=after, limit=size + 1)
        page, token = self._page(rows, size, key=key, principal=principal, cursor=lambda m: (m.create_time, m.user_id))
        return MemberPage(page, token)

    async def update_member(
        self, uow: UnitOfWork, principal: Principal, *, workspace_id: uuid.UUID, user_id: uuid.UUID, role: str
    ) -> Member:
        """Change a member's role. Only owners grant or take away `owner`; the last owner keeps it."""
        name = member_name(workspace_id, user_id)
        self._authorize(principal, workspace_id, "UpdateMember", resource=name)
        if role not in ROLES:
            raise errors.invalid_field("member.role", f"must be one of {', '.join(ROLES)}")
        await self._lock_live_workspace(uow, workspace_id)
        members = MemberRepository(uow)
        target = await members.get(workspace_id=workspace_id, user_id=user_id)
        if target is None:
            raise NotFound.resource(name)
        if target.role == role:
            return target
        if OWNER in (role, target.role):
            await self._require_owner(members, principal, workspace_id, "grant or take away the owner role")
        if target.role == OWNER and await members.count_owners(workspace_id=workspace_id) <= 1:
            raise errors.last_owner(name, "cannot be demoted")
        updated = await members.set_role(workspace_id=workspace_id, user_id=user_id, role=role)
        self._emit_membership_changed(uow, updated.name, previous_role=target.role, role=role)
        await self._audit(
            AuditRepository(uow),
            principal,
            workspace_id,
            AuditAction.MEMBER_ROLE_CHANGED,
            name,
            target.snapshot(),
            updated.snapshot(),
        )
        return updated

    async def remove_member(
        self, uow: UnitOfWork, principal: Principal, *, workspace_id: uuid.UUID, user_id: uuid.UUID
    ) -> Member:
        """End someone's membership. Only owners remove owners; the last owner cannot be removed."""
        name = member_name(workspace_id, user_id)
        self._authorize(principal, workspace_id, "RemoveMember", resource=name)
        return await self._end_membership(
            uow, principal, workspace_id, user_id, action=AuditAction.MEMBER_REMOVED, refusal="cannot be removed"
        )

    async def leave_workspace(self, uow: UnitOfWork, principal: Principal, *, workspace_id: uuid.UUID) -> Member:
        """The caller leaves; the last owner cannot (transfer ownership first)."""
        self._authorize(principal, workspace_id, "LeaveWorkspace", resource=workspace_name(workspace_id))
        if principal.kind != "user":
            raise errors.user_required("leave a workspace")
        return await self._end_membership(
            uow,
            principal,
            workspace_id,
            uuid.UUID(principal.subject),
            action=AuditAction.MEMBER_LEFT,
            refusal="cannot leave",
        )

    async def transfer_ownership(
        self, uow: UnitOfWork, principal: Principal, *, workspace_id: uuid.UUID, new_owner: uuid.UUID
    ) -> Transfer:
        """Make another member owner and the calling owner an admin, in one transaction."""
        name = workspace_name(workspace_id)
        self._authorize(principal, workspace_id, "TransferOwnership", resource=name)
        if principal.kind != "user":
            raise errors.user_required("transfer ownership")
        caller = uuid.UUID(principal.subject)
        target_name = member_name(workspace_id, new_owner)
        if new_owner == caller:
            raise errors.invalid_field("new_owner", "must be another member than the caller")
        await self._lock_live_workspace(uow, workspace_id)
        members = MemberRepository(uow)
        current = await self._require_owner(members, principal, workspace_id, "transfer ownership")
        target = await members.get(workspace_id=workspace_id, user_id=new_owner, lock=True)
        if target is None:
            raise NotFound.resource(target_name)
        promoted = target
        if target.role != OWNER:
            promoted = await members.set_role(workspace_id=workspace_id, user_id=new_owner, role=OWNER)
            self._emit_membership_changed(uow, promoted.name, previous_role=target.role, role=OWNER)
        demoted = await members.set_role(workspace_id=workspace_id, user_id=caller, role=ADMIN)
        self._emit_membership_changed(uow, demoted.name, previous_role=OWNER, role=ADMIN)
        await self._audit(
            AuditRepository(uow),
            principal,
            workspace_id,
            AuditAction.OWNERSHIP_TRANSFERRED,
            name,
            {"previous_owner": current.snapshot(), "new_owner": target.snapshot()},
            {"previous_owner": demoted.snapshot(), "new_owner": promoted.snapshot()},
        )
        log.info("ownership transferred", workspace=name, new_owner=target_name)
        return Transfer(new_owner=promoted, previous_owner=demoted)

    # --- invitations ------------------------------------------------------------------------------------

    async def create_invitation(
        self, uow: UnitOfWork, principal: Principal, *, workspace_id: uuid.UUID, email: str, role: str
    ) -> CreatedInvitation:
        """Invite an address with a role; the token goes out only in the InvitationCreatedEvent (mailed)."""
        self._authorize(principal, workspace_id, "CreateInvitation", resource=workspace_name(workspace_id))
        address = normalize_email(email)
        if role not in ASSIGNABLE_ROLES:
            choices = ", ".join(ASSIGNABLE_ROLES)
            raise errors.invalid_field("invitation.role", f"must be one of {choices} (owners are made, not invited)")
        workspace = await self._live_workspace(uow, workspace_id)
        token = new_invitation_token(workspace_id)
        invitation = await InvitationRepository(uow).insert(
            workspace_id=workspace_id,
            email=address,
            role=role,
            token_hash=token_hash(token),
            inviter=actor_name(principal),
            ttl=self.invitation_ttl,
        )
        if invitation is None:
            raise AlreadyExists(
                f"an invitation for {address} to {workspace.name} is already pending; revoke it to invite again",
                reason=errors.INVITATION_PENDING,
                metadata={"email": address},
            )
        uow.emit(
            tenancy_events_pb2.InvitationCreatedEvent(
                invitation=invitation_message(invitation),
                token=token,
                workspace_display_name=workspace.display_name,
            ),
            subject=invitation.name,
        )
        await self._audit(
            AuditRepository(uow),
            principal,
            workspace_id,
            AuditAction.INVITATION_CREATED,
            invitation.name,
            None,
            invitation.snapshot(),
        )
        return CreatedInvitation(invitation, token)

    async def list_invitations(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        workspace_id: uuid.UUID,
        requested_page_size: int = 0,
        page_token: str = "",
    ) -> InvitationPage:
        """Invitations of the caller's workspace, newest first (expired ones read as EXPIRED)."""
        self._authorize(principal, workspace_id, "ListInvitations", resource=workspace_name(workspace_id))
        await self._live_workspace(uow, workspace_id)
        size = page_size(requested_page_size, default=DEFAULT_INVITATION_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        key = _query_key("ListInvitations", str(workspace_id), "create_time desc, id desc")
        after = self._decode_cursor(page_token, key=key, issued_to=principal.subject)
        rows = await InvitationRepository(uow).page(workspace_id=workspace_id, after=after, limit=size + 1)
        page, token = self._page(rows, size, key=key, principal=principal, cursor=lambda i: (i.create_time, i.id))
        return InvitationPage(page, token)

    async def revoke_invitation(
        self, uow: UnitOfWork, principal: Principal, *, workspace_id: uuid.UUID, invitation_id: uuid.UUID
    ) -> Invitation:
        """Revoke a pending invitation; FAILED_PRECONDITION once it is accepted, revoked or expired."""
        name = invitation_name(workspace_id, invitation_id)
        self._authorize(principal, workspace_id, "RevokeInvitation", resource=name)
        await self._live_workspace(uow, workspace_id)
        repository = InvitationRepository(uow)
        invitation = await repository.lock(workspace_id=workspace_id, invitation_id=invitation_id)
        if invitation is None:
            raise NotFound.resource(name)
        if invitation.state is not InvitationState.PENDING:
            raise FailedPrecondition(
                f"{name} is {invitation.state.value.lower()}, not pending",
                reason=errors.INVITATION_NOT_PENDING,
                metadata={"state": invitation.state.value},
            )
        revoked = await repository.revoke(workspace_id=workspace_id, invitation_id=invitation_id)
        assert revoked is not None, "the locked pending invitation changed"
        await self._audit(
            AuditRepository(uow),
            principal,
            workspace_id,
            AuditAction.INVITATION_REVOKED,
            name,
            invitation.snapshot(),
            revoked.snapshot(),
        )
        return revoked

    async def accept_invitation(self, uow: UnitOfWork, principal: Principal, *, token: str) -> Member:
        """Join the token's workspace with the invited role; the token works once.

        The unit of work must be opened for the token's workspace (`invitation_token_workspace(token)`).
        """
        workspace_id = invitation_token_workspace(token)
        _require_uow_tenant(uow, workspace_id)
        if principal.kind != "user":
            raise errors.user_required("accept an invitation")
        if await WorkspaceRepository(uow).get_live(workspace_id=workspace_id) is None:
            raise errors.invitation_token_invalid("is not a valid invitation token")
        invitations = InvitationRepository(uow)
        invitation = await invitations.lock_by_token_hash(workspace_id=workspace_id, token_hash=token_hash(token))
        if invitation is None:
            raise errors.invitation_token_invalid("is not a valid invitation token")
        if invitation.state is not InvitationState.PENDING:
            reason, description = {
                InvitationState.ACCEPTED: (errors.INVITATION_USED, "was already used"),
                InvitationState.REVOKED: (errors.INVITATION_REVOKED, "was revoked"),
                InvitationState.EXPIRED: (errors.INVITATION_EXPIRED, "has expired"),
            }[invitation.state]
            raise errors.invitation_token_invalid(f"invitation {description}", reason=reason)
        user_id = uuid.UUID(principal.subject)
        member = await MemberRepository(uow).insert(workspace_id=workspace_id, user_id=user_id, role=invitation.role)
        if member is None:
            # Rolled back with the whole unit of work: the invitation stays pending for its real invitee.
            raise errors.already_a_member(member_name(workspace_id, user_id))
        accepted = await invitations.accept(workspace_id=workspace_id, invitation_id=invitation.id, user_id=user_id)
        assert accepted is not None, "the locked pending invitation changed"
        audit = AuditRepository(uow)
        await self._audit(
            audit,
            principal,
            workspace_id,
            AuditAction.INVITATION_ACCEPTED,
            invitation.name,
            invitation.snapshot(),
            accepted.snapshot(),
        )
        await self._member_added(uow, audit, principal, member)
        log.info("invitation accepted", invitation=invitation.name, member=member.name)
        return member

    # --- audit log --------------------------------------------------------------------------------------

    async def list_audit_events(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        workspace_id: uuid.UUID,
        requested_page_size: int = 0,
        page_token: str = "",
    ) -> AuditPage:
        """The workspace's audit log, newest first."""
        self._authorize(principal, workspace_id, "ListAuditEvents", resource=workspace_name(workspace_id))
        await self._live_workspace(uow, workspace_id)
        size = page_size(requested_page_size, default=DEFAULT_AUDIT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        key = _query_key("ListAuditEvents", str(workspace_id), "create_time desc, id desc")
        after = self._decode_cursor(page_token, key=key, issued_to=principal.subject)
        rows = await AuditRepository(uow).page(workspace_id=workspace_id, after=after, limit=size + 1)
        page, token = self._page(rows, size, key=key, principal=principal, cursor=lambda e: (e.create_time, e.id))
        return AuditPage(page, token)

    # --- helpers ----------------------------------------------------------------------------------------

    def _authorize(self, principal: Principal, workspace_id: uuid.UUID, method: str, *, resource: str) -> None:
        """NOT_FOUND unless the caller acts in this workspace; PERMISSION_DENIED unless its role allows the RPC."""
        principal.require_tenant(str(workspace_id), resource=resource)
        permission = self.PERMISSIONS[method]
        if not principal.has_permission(permission):
            raise errors.missing_permission(permission)

    async def _live_workspace(self, uow: UnitOfWork, workspace_id: uuid.UUID) -> Workspace:
        workspace = await WorkspaceRepository(uow).get_live(workspace_id=workspace_id)
        if workspace is None:
            raise errors.workspace_not_found(workspace_id)
        return workspace

    async def _lock_live_workspace(self, uow: UnitOfWork, workspace_id: uuid.UUID) -> None:
        """Lock the workspace row: membership changes of one workspace run one at a time."""
        locked = await WorkspaceRepository(uow).lock(workspace_id=workspace_id)
        if locked is None or locked.workspace.deleted:
            raise errors.workspace_not_found(workspace_id)

    @staticmethod
    async def _require_owner(
        members: MemberRepository, principal: Principal, workspace_id: uuid.UUID, action: str
    ) -> Member:
        """The caller's own owner membership; PERMISSION_DENIED unless both the token and the row say owner."""
        # The row decides too: a demotion can be newer than the token. Callers hold the workspace lock.
        if principal.role != OWNER or principal.kind != "user":
            raise errors.owner_required(action)
        own = await members.get(workspace_id=workspace_id, user_id=uuid.UUID(principal.subject))
        if own is None or own.role != OWNER:
            raise errors.owner_required(action)
        return own

    async def _end_membership(
        self,
        uow: UnitOfWork,
        principal: Principal,
        workspace_id: uuid.UUID,
        user_id: uuid.UUID,
        *,
        action: AuditAction,
        refusal: str,
    ) -> Member:
        name = member_name(workspace_id, user_id)
        await self._lock_live_workspace(uow, workspace_id)
        members = MemberRepository(uow)
        target = await members.get(workspace_id=workspace_id, user_id=user_id, lock=True)
        if target is None:
            raise NotFound.resource(name)
        if target.role == OWNER:
            if action is AuditAction.MEMBER_REMOVED:
                await self._require_owner(members, principal, workspace_id, "remove an owner")
            if await members.count_owners(workspace_id=workspace_id) <= 1:
                raise errors.last_owner(name, refusal)
        removed = await members.delete(workspace_id=workspace_id, user_id=user_id)
        assert removed is not None, "the locked membership vanished"
        self._emit_membership_changed(uow, name, previous_role=removed.role, role="")
        await self._audit(AuditRepository(uow), principal, workspace_id, action, name, removed.snapshot(), None)
        log.info("membership ended", member=name, action=action.value)
        return removed

    async def _member_added(
        self, uow: UnitOfWork, audit: AuditRepository, principal: Principal, member: Member
    ) -> None:
        self._emit_membership_changed(uow, member.name, previous_role="", role=member.role)
        await self._audit(
            audit, principal, member.workspace_id, AuditAction.MEMBER_ADDED, member.name, None, member.snapshot()
        )

    @staticmethod
    def _emit_membership_changed(uow: UnitOfWork, name: str, *, previous_role: str, role: str) -> None:
        # change_time is taken after the change was written, as late before COMMIT as we can: every
        # service rejects workspace tokens of this member issued at or before it (RevocationList), and a
        # token issued after the commit is always later.
        uow.emit(
            tenancy_events_pb2.MembershipChangedEvent(
                member=name, previous_role=previous_role, role=role, change_time=timestamp(datetime.now(UTC))
            ),
            subject=name,
        )

    @staticmethod
    async def _audit(
        audit: AuditRepository,
        principal: Principal,
        workspace_id: uuid.UUID,
        action: AuditAction,
        target: str,
        before: dict[str, object] | None,
        after: dict[str, object] | None,
    ) -> None:
        await audit.record(
            workspace_id=workspace_id,
            action=action.value,
            actor=actor_name(principal),
            target=target,
            before=before,
            after=after,
            request_id=request_id_var.get() or "",
        )

    def _page(
        self,
        rows: Sequence[T],
        size: int,
        *,
        key: bytes,
        principal: Principal,
        cursor: Callable[[T], Cursor],
    ) -> tuple[list[T], str]:
        page = list(rows[:size])
        if len(rows) <= size:
            return page, ""
        last_time, last_id = cursor(page[-1])
        values = [last_time.isoformat(), str(last_id)]
        return page, self.page_tokens.encode(values, query_key=key, issued_to=principal.subject)

    def _decode_cursor(self, token: str, *, key: bytes, issued_to: str) -> Cursor | None:
        if not token:
            return None
        values = self.page_tokens.decode(token, query_key=key, issued_to=issued_to)
        try:
            time_text, id_text = values
            last_time = datetime.fromisoformat(time_text)
            if last_time.tzinfo is None:
                raise ValueError("naive timestamp")
            return last_time, uuid.UUID(id_text)
        except ValueError as error:
            # Signed by us but not a cursor of this query: treat like any other bad token.
            raise InvalidArgument.for_field(
                PAGE_TOKEN_FIELD, "page token is not valid for this query", reason=INVALID_PAGE_TOKEN
            ) from error


def _require_uow_tenant(uow: UnitOfWork, workspace_id: uuid.UUID) -> None:
    if uow.tenant_id is None or uuid.UUID(uow.tenant_id) != workspace_id:
        raise Internal(f"unit of work opened for tenant {uow.tenant_id}, not workspaces/{workspace_id}")


def _check_etag(workspace: Workspace, etag: str) -> None:
    if etag and etag != workspace.etag:
        raise Aborted(
            f"{workspace.name} changed since it was read (etag {etag} is stale); read it again and retry",
            reason=errors.ETAG_MISMATCH,
            metadata={"etag": workspace.etag},
        )
