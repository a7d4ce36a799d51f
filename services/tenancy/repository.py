"""All SQL of the tenancy service: SQLAlchemy Core statements compiled once (`Query`), run in the unit of work.

Every query names the tenant (or the user whose memberships it reads) itself, even though row-level
security enforces the same rule: RLS is the backstop, not the only check. Times come from the
database (`now()`, the transaction's start), so expiry and restore windows are judged by one clock.
Nothing here commits.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert as pg_insert

from services.kit.db import UnitOfWork
from services.kit.ids import uuid7
from services.kit.sql import Query
from services.tenancy.models import (
    AuditEvent,
    Invitation,
    InvitationState,
    Member,
    Workspace,
    WorkspaceState,
    audit_log,
    invitations,
    members,
    workspaces,
)

Cursor = tuple[datetime, uuid.UUID]

_NOW = sa.func.now()

# --- workspaces -------------------------------------------------------------------------------------------

_WORKSPACE_COLUMNS = (
    workspaces.c.id,
    workspaces.c.display_name,
    workspaces.c.state,
    workspaces.c.creator,
    workspaces.c.create_time,
    workspaces.c.update_time,
    workspaces.c.delete_time,
    workspaces.c.purge_time,
    workspaces.c.version,
)


@dataclass(frozen=True, slots=True)
class IdempotentCreate:
    """A workspace found under a request_id, with the fingerprint of the payload that created it."""

    workspace: Workspace
    request_fingerprint: str | None


@dataclass(frozen=True, slots=True)
class LockedWorkspace:
    """A workspace row locked for this transaction, with the database's `now()`."""

    workspace: Workspace
    now: datetime


def _workspace(row: Any) -> Workspace:
    return Workspace(
        id=row["id"],
        display_name=row["display_name"],
        state=WorkspaceState(row["state"]),
        creator=row["creator"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        delete_time=row["delete_time"],
        purge_time=row["purge_time"],
        version=row["version"],
    )


_IN_WORKSPACE = sa.and_(workspaces.c.tenant_id == sa.bindparam("id"), workspaces.c.id == sa.bindparam("id"))
_LIVE = workspaces.c.delete_time.is_(None)

_INSERT_WORKSPACE = Query(
    pg_insert(workspaces)
    .values(
        tenant_id=sa.bindparam("id"),
        id=sa.bindparam("id"),
        display_name=sa.bindparam("display_name"),
        state=WorkspaceState.PROVISIONING.value,
        creator=sa.bindparam("creator"),
        request_id=sa.bindparam("request_id", type_=sa.Uuid),
        request_fingerprint=sa.bindparam("request_fingerprint", type_=sa.Text),
    )
    .on_conflict_do_nothing(index_elements=[workspaces.c.creator, workspaces.c.request_id])
    .returning(*_WORKSPACE_COLUMNS)
)

# Row-level security shows the earlier workspace only while the creator is still one of its members.
_BY_REQUEST_ID = Query(
    sa.select(*_WORKSPACE_COLUMNS, workspaces.c.request_fingerprint).where(
        workspaces.c.creator == sa.bindparam("creator"), workspaces.c.request_id == sa.bindparam("request_id")
    )
)

_GET_LIVE = Query(sa.select(*_WORKSPACE_COLUMNS).where(_IN_WORKSPACE, _LIVE))
_LOCK = Query(sa.select(*_WORKSPACE_COLUMNS, _NOW.label("now")).where(_IN_WORKSPACE).with_for_update(of=workspaces))

# The user's memberships joined to their workspaces, newest workspace first; soft-deleted ones only on
# request and only while they can still be restored.
_MEMBER_WORKSPACES = (
    sa.select(*_WORKSPACE_COLUMNS)
    .select_from(workspaces.join(members, members.c.tenant_id == workspaces.c.id))
    .where(
        members.c.user_id == sa.bindparam("user"),
        sa.or_(_LIVE, sa.and_(sa.bindparam("show_deleted", type_=sa.Boolean), workspaces.c.purge_time > _NOW)),
    )
)
_NEWEST_WORKSPACES_FIRST = (workspaces.c.create_time.desc(), workspaces.c.id.desc())
_LIST_MEMBER_WORKSPACES_FIRST = Query(
    _MEMBER_WORKSPACES.order_by(*_NEWEST_WORKSPACES_FIRST).limit(sa.bindparam("limit"))
)
_LIST_MEMBER_WORKSPACES_AFTER = Query(
    _MEMBER_WORKSPACES.where(
        sa.tuple_(workspaces.c.create_time, workspaces.c.id)
        < sa.tuple_(
            sa.bindparam("last_time", type_=workspaces.c.create_time.type),
            sa.bindparam("last_id", type_=workspaces.c.id.type),
        )
    )
    .order_by(*_NEWEST_WORKSPACES_FIRST)
    .limit(sa.bindparam("limit"))
)

_ACTIVATE = Query(
    sa.update(workspaces)
    .where(_IN_WORKSPACE, workspaces.c.state == WorkspaceState.PROVISIONING.value)
    .values(state=WorkspaceState.ACTIVE.value, update_time=_NOW, version=workspaces.c.version + 1)
    .returning(*_WORKSPACE_COLUMNS)
)

_RENAME = Query(
    sa.update(workspaces)
    .where(_IN_WORKSPACE)
    .values(display_name=sa.bindparam("display_name"), update_time=_NOW, version=workspaces.c.version + 1)
    .returning(*_WORKSPACE_COLUMNS)
)

_SOFT_DELETE = Query(
    sa.update(workspaces)
    .where(_IN_WORKSPACE, _LIVE)
    .values(
        delete_time=_NOW,
        purge_time=_NOW + sa.bindparam("restore_window", type_=sa.Interval),
        update_time=_NOW,
        version=workspaces.c.version + 1,
    )
    .returning(*_WORKSPACE_COLUMNS)
)

_UNDELETE = Query(
    sa.update(workspaces)
    .where(_IN_WORKSPACE, workspaces.c.delete_time.is_not(None))
    .values(delete_time=None, purge_time=None, update_time=_NOW, version=workspaces.c.version + 1)
    .returning(*_WORKSPACE_COLUMNS)
)


class WorkspaceRepository:
    """Workspaces in one unit of work."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    async def insert(
        self,
        *,
        workspace_id: uuid.UUID,
        display_name: str,
        creator: uuid.UUID,
        request_id: uuid.UUID | None,
        request_fingerprint: str | None,
    ) -> Workspace | None:
        """Insert a PROVISIONING workspace; None if the creator already used request_id."""
        row = await self.uow.fetchrow(
            _INSERT_WORKSPACE,
            id=workspace_id,
            display_name=display_name,
            creator=creator,
            request_id=request_id,
            request_fingerprint=request_fingerprint,
        )
        return _workspace(row) if row is not None else None

    async def find_by_request_id(self, *, creator: uuid.UUID, request_id: uuid.UUID) -> IdempotentCreate | None:
        """The workspace the creator made with this request_id, if the creator still belongs to it."""
        row = await self.uow.fetchrow(_BY_REQUEST_ID, creator=creator, request_id=request_id)
        if row is None:
            return None
        return IdempotentCreate(_workspace(row), row["request_fingerprint"])

    async def get_live(self, *, workspace_id: uuid.UUID) -> Workspace | None:
        """The workspace unless it is absent or soft-deleted."""
        row = await self.uow.fetchrow(_GET_LIVE, id=workspace_id)
        return _workspace(row) if row is not None else None

    async def lock(self, *, workspace_id: uuid.UUID) -> LockedWorkspace | None:
        """The workspace (live or soft-deleted) locked FOR UPDATE: serialises changes of one workspace."""
        row = await self.uow.fetchrow(_LOCK, id=workspace_id)
        return LockedWorkspace(_workspace(row), row["now"]) if row is not None else None

    async def list_of_member(
        self, *, user_id: uuid.UUID, show_deleted: bool, after: Cursor | None, limit: int
    ) -> Sequence[Workspace]:
        """The user's workspaces, newest first, strictly after the keyset `(create_time, id)`."""
        if after is None:
            rows = await self.uow.fetch(
                _LIST_MEMBER_WORKSPACES_FIRST, user=user_id, show_deleted=show_deleted, limit=limit
            )
        else:
            rows = await self.uow.fetch(
                _LIST_MEMBER_WORKSPACES_AFTER,
                user=user_id,
                show_deleted=show_deleted,
                last_time=after[0],
                last_id=after[1],
                limit=limit,
            )
        return [_workspace(row) for row in rows]

    async def activate(self, *, workspace_id: uuid.UUID) -> Workspace | None:
        """PROVISIONING → ACTIVE in the workspace's own tenant; None if it is absent or not provisioning."""
        row = await self.uow.fetchrow(_ACTIVATE, id=workspace_id)
        return _workspace(row) if row is not None else None

    async def rename(self, *, workspace_id: uuid.UUID, display_name: str) -> Workspace:
        """Set the display name (the caller holds the row lock)."""
        row = await self.uow.fetchrow(_RENAME, id=workspace_id, display_name=display_name)
        assert row is not None, "renamed a workspace that is not there"
        return _workspace(row)

    async def soft_delete(self, *, workspace_id: uuid.UUID, restore_window: timedelta) -> Workspace | None:
        """Mark a live workspace deleted, restorable for `restore_window`; None if it is not live."""
        row = await self.uow.fetchrow(_SOFT_DELETE, id=workspace_id, restore_window=restore_window)
        return _workspace(row) if row is not None else None

    async def undelete(self, *, workspace_id: uuid.UUID) -> Workspace | None:
        """Clear the deletion of a soft-deleted workspace; None if it is not deleted."""
        row = await self.uow.fetchrow(_UNDELETE, id=workspace_id)
        return _workspace(row) if row is not None else None


# --- members ----------------------------------------------------------------------------------------------

_MEMBER_COLUMNS = (
    members.c.tenant_id,
    members.c.user_id,
    members.c.role,
    members.c.create_time,
    members.c.update_time,
)


def _member(row: Any) -> Member:
    return Member(
        workspace_id=row["tenant_id"],
        user_id=row["user_id"],
        role=row["role"],
        create_time=row["create_time"],
        update_time=row["update_time"],
    )


_MEMBER_KEY = sa.and_(members.c.tenant_id == sa.bindparam("tenant"), members.c.user_id == sa.bindparam("user"))

_INSERT_MEMBER = Query(
    pg_insert(members)
    .values(tenant_id=sa.bindparam("tenant"), user_id=sa.bindparam("user"), role=sa.bindparam("role"))
    .on_conflict_do_nothing(index_elements=[members.c.tenant_id, members.c.user_id])
    .returning(*_MEMBER_COLUMNS)
)
_GET_MEMBER = Query(sa.select(*_MEMBER_COLUMNS).where(_MEMBER_KEY))
_LOCK_MEMBER = Query(sa.select(*_MEMBER_COLUMNS).where(_MEMBER_KEY).with_for_update())
# The caller's own usable membership (a user-level transaction: RLS shows own memberships): of a live
# workspace, or, for its owners only, of a soft-deleted one still inside its restore window, so that
# an owner can get a workspace token to undelete it.
_OWN_USABLE_MEMBERSHIP = Query(
    sa.select(*_MEMBER_COLUMNS)
    .select_from(members.join(workspaces, workspaces.c.id == members.c.tenant_id))
    .where(
        _MEMBER_KEY,
        sa.or_(
            workspaces.c.delete_time.is_(None),
            sa.and_(members.c.role == "owner", workspaces.c.purge_time > sa.func.now()),
        ),
    )
)
_COUNT_OWNERS = Query(
    sa.select(sa.func.count()).where(members.c.tenant_id == sa.bindparam("tenant"), members.c.role == "owner")
)
_SET_ROLE = Query(
    sa.update(members)
    .where(_MEMBER_KEY)
    .values(role=sa.bindparam("role"), update_time=_NOW)
    .returning(*_MEMBER_COLUMNS)
)
_DELETE_MEMBER = Query(sa.delete(members).where(_MEMBER_KEY).returning(*_MEMBER_COLUMNS))

_OLDEST_MEMBERS_FIRST = (members.c.create_time.asc(), members.c.user_id.asc())
_LIST_MEMBERS = sa.select(*_MEMBER_COLUMNS).where(members.c.tenant_id == sa.bindparam("tenant"))
_LIST_MEMBERS_FIRST = Query(_LIST_MEMBERS.order_by(*_OLDEST_MEMBERS_FIRST).limit(sa.bindparam("limit")))
_LIST_MEMBERS_AFTER = Query(
    _LIST_MEMBERS.where(
        sa.tuple_(members.c.create_time, members.c.user_id)
        > sa.tuple_(
            sa.bindparam("last_time", type_=members.c.create_time.type),
            sa.bindparam("last_id", type_=members.c.user_id.type),
        )
    )
    .order_by(*_OLDEST_MEMBERS_FIRST)
    .limit(sa.bindparam("limit"))
)


class MemberRepository:
    """Memberships in one unit of work."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    async def insert(self, *, workspace_id: uuid.UUID, user_id: uuid.UUID, role: str) -> Member | None:
        """Add a member; None if the user already is one."""
        row = await self.uow.fetchrow(_INSERT_MEMBER, tenant=workspace_id, user=user_id, role=role)
        return _member(row) if row is not None else None

    async def get(self, *, workspace_id: uuid.UUID, user_id: uuid.UUID, lock: bool = False) -> Member | None:
        """One membership (locked FOR UPDATE if asked)."""
        row = await self.uow.fetchrow(_LOCK_MEMBER if lock else _GET_MEMBER, tenant=workspace_id, user=user_id)
        return _member(row) if row is not None else None

    async def own_usable_membership(self, *, workspace_id: uuid.UUID, user_id: uuid.UUID) -> Member | None:
        """The user's membership if the workspace is live, or deleted but restorable and the user an owner."""
        row = await self.uow.fetchrow(_OWN_USABLE_MEMBERSHIP, tenant=workspace_id, user=user_id)
        return _member(row) if row is not None else None

    async def count_owners(self, *, workspace_id: uuid.UUID) -> int:
        """How many owners the workspace has."""
        return int(await self.uow.fetchval(_COUNT_OWNERS, tenant=workspace_id))

    async def set_role(self, *, workspace_id: uuid.UUID, user_id: uuid.UUID, role: str) -> Member:
        """Change a member's role (the caller checked that the member exists)."""
        row = await self.uow.fetchrow(_SET_ROLE, tenant=workspace_id, user=user_id, role=role)
        assert row is not None, "changed the role of a member that is not there"
        return _member(row)

    async def delete(self, *, workspace_id: uuid.UUID, user_id: uuid.UUID) -> Member | None:
        """End a membership; the removed row, or None if there was none."""
        row = await self.uow.fetchrow(_DELETE_MEMBER, tenant=workspace_id, user=user_id)
        return _member(row) if row is not None else None

    async def page(self, *, workspace_id: uuid.UUID, after: Cursor | None, limit: int) -> Sequence[Member]:
        """Members oldest first, strictly after the keyset `(create_time, user_id)`."""
        if after is None:
            rows = await self.uow.fetch(_LIST_MEMBERS_FIRST, tenant=workspace_id, limit=limit)
        else:
            rows = await self.uow.fetch(
                _LIST_MEMBERS_AFTER, tenant=workspace_id, last_time=after[0], last_id=after[1], limit=limit
            )
        return [_member(row) for row in rows]


# --- invitations ------------------------------------------------------------------------------------------

_PENDING = InvitationState.PENDING.value
# The effective state: a pending invitation past its expiry reads as EXPIRED (by the database clock).
_EFFECTIVE_STATE = sa.case(
    (sa.and_(invitations.c.state == _PENDING, invitations.c.expire_time <= _NOW), InvitationState.EXPIRED.value),
    else_=invitations.c.state,
).label("state")

_INVITATION_COLUMNS = (
    invitations.c.tenant_id,
    invitations.c.id,
    invitations.c.email,
    invitations.c.role,
    _EFFECTIVE_STATE,
    invitations.c.inviter,
    invitations.c.create_time,
    invitations.c.expire_time,
    invitations.c.accept_time,
    invitations.c.accepted_by,
    invitations.c.revoke_time,
)


def _invitation(row: Any) -> Invitation:
    return Invitation(
        workspace_id=row["tenant_id"],
        id=row["id"],
        email=row["email"],
        role=row["role"],
        state=InvitationState(row["state"]),
        inviter=row["inviter"],
        create_time=row["create_time"],
        expire_time=row["expire_time"],
        accept_time=row["accept_time"],
        accepted_by=row["accepted_by"],
        revoke_time=row["revoke_time"],
    )


_IN_TENANT = invitations.c.tenant_id == sa.bindparam("tenant")
_INVITATION_KEY = sa.and_(_IN_TENANT, invitations.c.id == sa.bindparam("id"))
_STILL_PENDING = sa.and_(invitations.c.state == _PENDING, invitations.c.expire_time > _NOW)

# Pending invitations past their expiry stop blocking a new one for the same address.
_EXPIRE_STALE = Query(
    sa.update(invitations)
    .where(
        _IN_TENANT,
        sa.func.lower(invitations.c.email) == sa.func.lower(sa.bindparam("email")),
        invitations.c.state == _PENDING,
        invitations.c.expire_time <= _NOW,
    )
    .values(state=InvitationState.EXPIRED.value)
)
_INSERT_INVITATION = Query(
    pg_insert(invitations)
    .values(
        tenant_id=sa.bindparam("tenant"),
        id=sa.bindparam("id"),
        email=sa.bindparam("email"),
        role=sa.bindparam("role"),
        state=_PENDING,
        token_hash=sa.bindparam("token_hash"),
        inviter=sa.bindparam("inviter"),
        expire_time=_NOW + sa.bindparam("ttl", type_=sa.Interval),
    )
    .on_conflict_do_nothing(
        index_elements=[invitations.c.tenant_id, sa.func.lower(invitations.c.email)],
        index_where=sa.text("state = 'PENDING'"),
    )
    .returning(*_INVITATION_COLUMNS)
)
_LOCK_INVITATION = Query(sa.select(*_INVITATION_COLUMNS).where(_INVITATION_KEY).with_for_update())
_LOCK_INVITATION_BY_TOKEN = Query(
    sa.select(*_INVITATION_COLUMNS)
    .where(_IN_TENANT, invitations.c.token_hash == sa.bindparam("token_hash"))
    .with_for_update()
)
_ACCEPT = Query(
    sa.update(invitations)
    .where(_INVITATION_KEY, _STILL_PENDING)
    .values(state=InvitationState.ACCEPTED.value, accept_time=_NOW, accepted_by=sa.bindparam("user"))
    .returning(*_INVITATION_COLUMNS)
)
_REVOKE = Query(
    sa.update(invitations)
    .where(_INVITATION_KEY, _STILL_PENDING)
    .values(state=InvitationState.REVOKED.value, revoke_time=_NOW)
    .returning(*_INVITATION_COLUMNS)
)
_NEWEST_INVITATIONS_FIRST = (invitations.c.create_time.desc(), invitations.c.id.desc())
_LIST_INVITATIONS = sa.select(*_INVITATION_COLUMNS).where(_IN_TENANT)
_LIST_INVITATIONS_FIRST = Query(_LIST_INVITATIONS.order_by(*_NEWEST_INVITATIONS_FIRST).limit(sa.bindparam("limit")))
_LIST_INVITATIONS_AFTER = Query(
    _LIST_INVITATIONS.where(
        sa.tuple_(invitations.c.create_time, invitations.c.id)
        < sa.tuple_(
            sa.bindparam("last_time", type_=invitations.c.create_time.type),
            sa.bindparam("last_id", type_=invitations.c.id.type),
        )
    )
    .order_by(*_NEWEST_INVITATIONS_FIRST)
    .limit(sa.bindparam("limit"))
)


class InvitationRepository:
    """Invitations in one unit of work."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    async def insert(
        self,
        *,
        workspace_id: uuid.UUID,
        email: str,
        role: str,
        token_hash: bytes,
        inviter: str,
        ttl: timedelta,
    ) -> Invitation | None:
        """A new pending invitation; None if one is already pending for that address."""
        await self.uow.execute(_EXPIRE_STALE, tenant=workspace_id, email=email)
        row = await self.uow.fetchrow(
            _INSERT_INVITATION,
            tenant=workspace_id,
            id=uuid7(),
            email=email,
            role=role,
            token_hash=token_hash,
            inviter=inviter,
            ttl=ttl,
        )
        return _invitation(row) if row is not None else None

    async def lock(self, *, workspace_id: uuid.UUID, invitation_id: uuid.UUID) -> Invitation | None:
        """One invitation, locked FOR UPDATE."""
        row = await self.uow.fetchrow(_LOCK_INVITATION, tenant=workspace_id, id=invitation_id)
        return _invitation(row) if row is not None else None

    async def lock_by_token_hash(self, *, workspace_id: uuid.UUID, token_hash: bytes) -> Invitation | None:
        """The invitation a token belongs to, locked FOR UPDATE."""
        row = await self.uow.fetchrow(_LOCK_INVITATION_BY_TOKEN, tenant=workspace_id, token_hash=token_hash)
        return _invitation(row) if row is not None else None

    async def accept(
        self, *, workspace_id: uuid.UUID, invitation_id: uuid.UUID, user_id: uuid.UUID
    ) -> Invitation | None:
        """PENDING (and unexpired) → ACCEPTED by the user; None if it was no longer pending."""
        row = await self.uow.fetchrow(_ACCEPT, tenant=workspace_id, id=invitation_id, user=user_id)
        return _invitation(row) if row is not None else None

    async def revoke(self, *, workspace_id: uuid.UUID, invitation_id: uuid.UUID) -> Invitation | None:
        """PENDING (and unexpired) → REVOKED; None if it was no longer pending."""
        row = await self.uow.fetchrow(_REVOKE, tenant=workspace_id, id=invitation_id)
        return _invitation(row) if row is not None else None

    async def page(self, *, workspace_id: uuid.UUID, after: Cursor | None, limit: int) -> Sequence[Invitation]:
        """Invitations newest first, strictly after the keyset `(create_time, id)`."""
        if after is None:
            rows = await self.uow.fetch(_LIST_INVITATIONS_FIRST, tenant=workspace_id, limit=limit)
        else:
            rows = await self.uow.fetch(
                _LIST_INVITATIONS_AFTER, tenant=workspace_id, last_time=after[0], last_id=after[1], limit=limit
            )
        return [_invitation(row) for row in rows]


# --- audit log --------------------------------------------------------------------------------------------

_AUDIT_COLUMNS = (
    audit_log.c.tenant_id,
    audit_log.c.id,
    audit_log.c.action,
    audit_log.c.actor,
    audit_log.c.target,
    # As JSON text: the driver's jsonb codec (set up by SQLAlchemy) would otherwise decode to Python objects.
    sa.cast(audit_log.c.before, sa.Text).label("before"),
    sa.cast(audit_log.c.after, sa.Text).label("after"),
    audit_log.c.request_id,
    audit_log.c.create_time,
)


def _audit_event(row: Any) -> AuditEvent:
    return AuditEvent(
        workspace_id=row["tenant_id"],
        id=row["id"],
        action=row["action"],
        actor=row["actor"],
        target=row["target"],
        before_json=row["before"] or "",
        after_json=row["after"] or "",
        request_id=row["request_id"],
        create_time=row["create_time"],
    )


_INSERT_AUDIT = Query(
    sa.insert(audit_log)
    .values(
        tenant_id=sa.bindparam("tenant"),
        id=sa.bindparam("id"),
        action=sa.bindparam("action"),
        actor=sa.bindparam("actor"),
        target=sa.bindparam("target"),
        before=sa.bindparam("before", type_=postgresql.JSONB),
        after=sa.bindparam("after", type_=postgresql.JSONB),
        request_id=sa.bindparam("request_id"),
    )
    .returning(*_AUDIT_COLUMNS)
)
_NEWEST_AUDIT_FIRST = (audit_log.c.create_time.desc(), audit_log.c.id.desc())
_LIST_AUDIT = sa.select(*_AUDIT_COLUMNS).where(audit_log.c.tenant_id == sa.bindparam("tenant"))
_LIST_AUDIT_FIRST = Query(_LIST_AUDIT.order_by(*_NEWEST_AUDIT_FIRST).limit(sa.bindparam("limit")))
_LIST_AUDIT_AFTER = Query(
    _LIST_AUDIT.where(
        sa.tuple_(audit_log.c.create_time, audit_log.c.id)
        < sa.tuple_(
            sa.bindparam("last_time", type_=audit_log.c.create_time.type),
            sa.bindparam("last_id", type_=audit_log.c.id.type),
        )
    )
    .order_by(*_NEWEST_AUDIT_FIRST)
    .limit(sa.bindparam("limit"))
)


def _json(value: Mapping[str, object] | None) -> str | None:
    return json.dumps(value, sort_keys=True, separators=(",", ":")) if value is not None else None


class AuditRepository:
    """The audit log of one workspace in one unit of work (append-only)."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    async def record(
        self,
        *,
        workspace_id: uuid.UUID,
        action: str,
        actor: str,
        target: str,
        before: Mapping[str, object] | None,
        after: Mapping[str, object] | None,
        request_id: str,
    ) -> AuditEvent:
        """Append one entry."""
        row = await self.uow.fetchrow(
            _INSERT_AUDIT,
            tenant=workspace_id,
            id=uuid7(),
            action=action,
            actor=actor,
            target=target,
            before=_json(before),
            after=_json(after),
            request_id=request_id,
        )
        assert row is not None
        return _audit_event(row)

    async def page(self, *, workspace_id: uuid.UUID, after: Cursor | None, limit: int) -> Sequence[AuditEvent]:
        """Entries newest first, strictly after the keyset `(create_time, id)`."""
        if after is None:
            rows = await self.uow.fetch(_LIST_AUDIT_FIRST, tenant=workspace_id, limit=limit)
        else:
            rows = await self.uow.fetch(
                _LIST_AUDIT_AFTER, tenant=workspace_id, last_time=after[0], last_id=after[1], limit=limit
            )
        return [_audit_event(row) for row in rows]
