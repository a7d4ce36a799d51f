"""Tenancy domain types, the Core tables they live in, and their mapping to the contract.

The tables mirror migrations/versions/0001_tenancy_workspaces.py and 0002_tenancy_memberships.py;
migrations own the schema, these objects only describe it to SQLAlchemy Core (no ORM: the hot paths
run a single Core statement).
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from google.protobuf import timestamp_pb2
from sqlalchemy.dialects import postgresql

from tessera.tenancy.v1 import tenancy_pb2

SERVICE = "tenancy"
SCHEMA = "tenancy"
WORKSPACE_NAME_PREFIX = "workspaces/"
USER_NAME_PREFIX = "users/"
API_KEY_NAME_PREFIX = "apiKeys/"
DISPLAY_NAME_MAX_CHARS = 100

metadata = sa.MetaData(schema=SCHEMA)

workspaces = sa.Table(
    "workspaces",
    metadata,
    sa.Column("tenant_id", sa.Uuid, nullable=False),
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("creator", sa.Uuid, nullable=False),
    sa.Column("request_id", sa.Uuid),
    sa.Column("request_fingerprint", sa.Text),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("delete_time", sa.DateTime(timezone=True)),
    sa.Column("purge_time", sa.DateTime(timezone=True)),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
)

members = sa.Table(
    "members",
    metadata,
    sa.Column("tenant_id", sa.Uuid, primary_key=True),
    sa.Column("user_id", sa.Uuid, primary_key=True),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

invitations = sa.Table(
    "invitations",
    metadata,
    sa.Column("tenant_id", sa.Uuid, primary_key=True),
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("email", sa.Text, nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("token_hash", sa.LargeBinary, nullable=False),
    sa.Column("inviter", sa.Text, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("expire_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("accept_time", sa.DateTime(timezone=True)),
    sa.Column("accepted_by", sa.Uuid),
    sa.Column("revoke_time", sa.DateTime(timezone=True)),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("tenant_id", sa.Uuid, primary_key=True),
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("target", sa.Text, nullable=False),
    sa.Column("before", postgresql.JSONB),
    sa.Column("after", postgresql.JSONB),
    sa.Column("request_id", sa.Text, nullable=False, server_default=""),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)


class WorkspaceState(enum.StrEnum):
    """Lifecycle of a workspace: PROVISIONING until the provisioner handled its creation event."""

    PROVISIONING = "PROVISIONING"
    ACTIVE = "ACTIVE"


class InvitationState(enum.StrEnum):
    """Lifecycle of an invitation; a PENDING row past its expire_time is read as EXPIRED."""

    PENDING = "PENDING"
    ACCEPTED = "ACCEPTED"
    REVOKED = "REVOKED"
    EXPIRED = "EXPIRED"


class AuditAction(enum.StrEnum):
    """What an audit log entry records."""

    WORKSPACE_CREATED = "workspace.created"
    WORKSPACE_UPDATED = "workspace.updated"
    WORKSPACE_DELETED = "workspace.deleted"
    WORKSPACE_UNDELETED = "workspace.undeleted"
    MEMBER_ADDED = "member.added"
    MEMBER_ROLE_CHANGED = "member.role_changed"
    MEMBER_REMOVED = "member.removed"
    MEMBER_LEFT = "member.left"
    OWNERSHIP_TRANSFERRED = "ownership.transferred"
    INVITATION_CREATED = "invitation.created"
    INVITATION_REVOKED = "invitation.revoked"
    INVITATION_ACCEPTED = "invitation.accepted"


@dataclass(frozen=True, slots=True)
class Workspace:
    """A workspace, the tenant: every tenant-owned resource lives under `workspaces/{id}`."""

    id: uuid.UUID
    display_name: str
    state: WorkspaceState
    creator: uuid.UUID
    create_time: datetime
    update_time: datetime
    delete_time: datetime | None = None
    purge_time: datetime | None = None
    version: int = 1

    @property
    def name(self) -> str:
        return workspace_name(self.id)

    @property
    def tenant_id(self) -> uuid.UUID:
        return self.id

    @property
    def etag(self) -> str:
        return etag_for(self.version)

    @property
    def deleted(self) -> bool:
        return self.delete_time is not None

    def snapshot(self) -> dict[str, object]:
        """The audited form (JSON-ready)."""
        return {
            "name": self.name,
            "display_name": self.display_name,
            "state": self.state.value,
            "delete_time": _iso(self.delete_time),
            "purge_time": _iso(self.purge_time),
            "etag": self.etag,
        }


@dataclass(frozen=True, slots=True)
class Member:
    """A user's membership of a workspace with one role."""

    workspace_id: uuid.UUID
    user_id: uuid.UUID
    role: str
    create_time: datetime
    update_time: datetime

    @property
    def name(self) -> str:
        return member_name(self.workspace_id, self.user_id)

    def snapshot(self) -> dict[str, object]:
        """The audited form (JSON-ready)."""
        return {"name": self.name, "user": user_name(self.user_id), "role": self.role}


@dataclass(frozen=True, slots=True)
class Invitation:
    """An invitation by email; the token itself is never stored, only its hash."""

    workspace_id: uuid.UUID
    id: uuid.UUID
    email: str
    role: str
    state: InvitationState
    inviter: str
    create_time: datetime
    expire_time: datetime
    accept_time: datetime | None = None
    accepted_by: uuid.UUID | None = None
    revoke_time: datetime | None = None

    @property
    def name(self) -> str:
        return invitation_name(self.workspace_id, self.id)

    def snapshot(self) -> dict[str, object]:
        """The audited form (JSON-ready; never the token or its hash)."""
        return {
            "name": self.name,
            "email": self.email,
            "role": self.role,
            "state": self.state.value,
            "inviter": self.inviter,
            "expire_time": _iso(self.expire_time),
        }


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audit log entry; before/after are JSON text (empty when absent)."""

    workspace_id: uuid.UUID
    id: uuid.UUID
    action: str
    actor: str
    target: str
    before_json: str
    after_json: str
    request_id: str
    create_time: datetime

    @property
    def name(self) -> str:
        return f"{workspace_name(self.workspace_id)}/auditEvents/{self.id}"


@dataclass(frozen=True, slots=True)
class WorkspacePage:
    """One page of a listing and the token of the next one ("" on the last page)."""

    workspaces: list[Workspace] = field(default_factory=list)
    next_page_token: str = ""


@dataclass(frozen=True, slots=True)
class MemberPage:
    """One page of members and the token of the next one."""

    members: list[Member] = field(default_factory=list)
    next_page_token: str = ""


@dataclass(frozen=True, slots=True)
class InvitationPage:
    """One page of invitations and the token of the next one."""

    invitations: list[Invitation] = field(default_factory=list)
    next_page_token: str = ""


@dataclass(frozen=True, slots=True)
class AuditPage:
    """One page of audit events and the token of the next one."""

    audit_events: list[AuditEvent] = field(default_factory=list)
    next_page_token: str = ""


@dataclass(frozen=True, slots=True)
class CreatedInvitation:
    """A new invitation and its token (which exists only here and in the InvitationCreatedEvent)."""

    invitation: Invitation
    token: str


@dataclass(frozen=True, slots=True)
class Transfer:
    """The two memberships after an ownership transfer."""

    new_owner: Member
    previous_owner: Member


def etag_for(version: int) -> str:
    """The etag of a workspace version (opaque to clients)."""
    return f'"v{version}"'


def workspace_name(workspace_id: uuid.UUID) -> str:
    """The resource name `workspaces/{id}`."""
    return f"{WORKSPACE_NAME_PREFIX}{workspace_id}"


def member_name(workspace_id: uuid.UUID, user_id: uuid.UUID) -> str:
    """The resource name `workspaces/{ws}/members/{user}`."""
    return f"{WORKSPACE_NAME_PREFIX}{workspace_id}/members/{user_id}"


def invitation_name(workspace_id: uuid.UUID, invitation_id: uuid.UUID) -> str:
    """The resource name `workspaces/{ws}/invitations/{id}`."""
    return f"{WORKSPACE_NAME_PREFIX}{workspace_id}/invitations/{invitation_id}"


def user_name(user_id: uuid.UUID | str) -> str:
    """The resource name `users/{id}`."""
    return f"{USER_NAME_PREFIX}{user_id}"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


_STATE_TO_PROTO = {
    WorkspaceState.PROVISIONING: tenancy_pb2.WORKSPACE_STATE_PROVISIONING,
    WorkspaceState.ACTIVE: tenancy_pb2.WORKSPACE_STATE_ACTIVE,
}

_INVITATION_STATE_TO_PROTO = {
    InvitationState.PENDING: tenancy_pb2.INVITATION_STATE_PENDING,
    InvitationState.ACCEPTED: tenancy_pb2.INVITATION_STATE_ACCEPTED,
    InvitationState.REVOKED: tenancy_pb2.INVITATION_STATE_REVOKED,
    InvitationState.EXPIRED: tenancy_pb2.INVITATION_STATE_EXPIRED,
}


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp of an aware datetime."""
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def workspace_message(workspace: Workspace) -> tenancy_pb2.Workspace:
    """The contract form of a workspace (used for responses and event payloads alike)."""
    message = tenancy_pb2.Workspace(
        name=workspace.name,
        display_name=workspace.display_name,
        state=_STATE_TO_PROTO[workspace.state],
        creator=str(workspace.creator),
        create_time=timestamp(workspace.create_time),
        update_time=timestamp(workspace.update_time),
        etag=workspace.etag,
    )
    if workspace.delete_time is not None:
        message.delete_time.CopyFrom(timestamp(workspace.delete_time))
    if workspace.purge_time is not None:
        message.purge_time.CopyFrom(timestamp(workspace.purge_time))
    return message


def member_message(member: Member) -> tenancy_pb2.Member:
    """The contract form of a membership."""
    return tenancy_pb2.Member(
        name=member.name,
        role=member.role,
        user=user_name(member.user_id),
        create_time=timestamp(member.create_time),
        update_time=timestamp(member.update_time),
    )


def invitation_message(invitation: Invitation) -> tenancy_pb2.Invitation:
    """The contract form of an invitation."""
    return tenancy_pb2.Invitation(
        name=invitation.name,
        email=invitation.email,
        role=invitation.role,
        state=_INVITATION_STATE_TO_PROTO[invitation.state],
        inviter=invitation.inviter,
        create_time=timestamp(invitation.create_time),
        expire_time=timestamp(invitation.expire_time),
    )


def audit_event_message(event: AuditEvent) -> tenancy_pb2.AuditEvent:
    """The contract form of an audit log entry."""
    return tenancy_pb2.AuditEvent(
        name=event.name,
        action=event.action,
        actor=event.actor,
        target=event.target,
        before_json=event.before_json,
        after_json=event.after_json,
        create_time=timestamp(event.create_time),
        request_id=event.request_id,
    )
