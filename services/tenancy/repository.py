"""All SQL of the tenancy service: SQLAlchemy Core statements compiled once (`Query`), run in the unit of work.

Every query filters by the caller's visibility itself (creator or tenant) even though row-level
security enforces the same rule: RLS is the backstop, not the only check. Nothing here commits.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from services.kit.db import UnitOfWork
from services.kit.sql import Query
from services.tenancy.models import Workspace, WorkspaceState, workspaces

_WORKSPACE_COLUMNS = (
    workspaces.c.id,
    workspaces.c.display_name,
    workspaces.c.state,
    workspaces.c.creator,
    workspaces.c.create_time,
    workspaces.c.update_time,
)


@dataclass(frozen=True, slots=True)
class IdempotentCreate:
    """A workspace found under a request_id, with the fingerprint of the payload that created it."""

    workspace: Workspace
    request_fingerprint: str | None


def _workspace(row: Any) -> Workspace:
    return Workspace(
        id=row["id"],
        display_name=row["display_name"],
        state=WorkspaceState(row["state"]),
        creator=row["creator"],
        create_time=row["create_time"],
        update_time=row["update_time"],
    )


# Visibility is the same rule as the RLS policy `workspace_tenant`: created by the viewer, or the
# viewer's tenant (`tenant` is NULL for a user-level caller, so only the creator clause can match).
_VISIBLE = sa.or_(
    workspaces.c.creator == sa.bindparam("viewer"),
    workspaces.c.tenant_id == sa.bindparam("tenant", type_=sa.Uuid),
)

_INSERT = Query(
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

_BY_REQUEST_ID = Query(
    sa.select(*_WORKSPACE_COLUMNS, workspaces.c.request_fingerprint).where(
        workspaces.c.creator == sa.bindparam("creator"), workspaces.c.request_id == sa.bindparam("request_id")
    )
)

_GET_VISIBLE = Query(sa.select(*_WORKSPACE_COLUMNS).where(workspaces.c.id == sa.bindparam("id"), _VISIBLE))

_LIST_FIRST_PAGE = sa.select(*_WORKSPACE_COLUMNS).where(workspaces.c.creator == sa.bindparam("creator"))
_NEWEST_FIRST = (workspaces.c.create_time.desc(), workspaces.c.id.desc())
_LIST_FIRST = Query(_LIST_FIRST_PAGE.order_by(*_NEWEST_FIRST).limit(sa.bindparam("limit")))
# Row comparison matches the index (creator, create_time DESC, id DESC) scanned forward.
_LIST_AFTER = Query(
    _LIST_FIRST_PAGE.where(
        sa.tuple_(workspaces.c.create_time, workspaces.c.id)
        < sa.tuple_(
            sa.bindparam("last_time", type_=workspaces.c.create_time.type),
            sa.bindparam("last_id", type_=workspaces.c.id.type),
        )
    )
    .order_by(*_NEWEST_FIRST)
    .limit(sa.bindparam("limit"))
)

_ACTIVATE = Query(
    sa.update(workspaces)
    .where(
        workspaces.c.tenant_id == sa.bindparam("id"),
        workspaces.c.id == sa.bindparam("id"),
        workspaces.c.state == WorkspaceState.PROVISIONING.value,
    )
    .values(state=WorkspaceState.ACTIVE.value, update_time=sa.func.now())
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
            _INSERT,
            id=workspace_id,
            display_name=display_name,
            creator=creator,
            request_id=request_id,
            request_fingerprint=request_fingerprint,
        )
        return _workspace(row) if row is not None else None

    async def find_by_request_id(self, *, creator: uuid.UUID, request_id: uuid.UUID) -> IdempotentCreate | None:
        """The workspace the creator made with this request_id, if any."""
        row = await self.uow.fetchrow(_BY_REQUEST_ID, creator=creator, request_id=request_id)
        if row is None:
            return None
        return IdempotentCreate(_workspace(row), row["request_fingerprint"])

    async def get_visible(
        self, *, workspace_id: uuid.UUID, viewer: uuid.UUID, tenant_id: uuid.UUID | None
    ) -> Workspace | None:
        """One workspace by primary key, if the viewer may see it."""
        row = await self.uow.fetchrow(_GET_VISIBLE, id=workspace_id, viewer=viewer, tenant=tenant_id)
        return _workspace(row) if row is not None else None

    async def list_created_by(
        self,
        *,
        creator: uuid.UUID,
        after: tuple[datetime, uuid.UUID] | None,
        limit: int,
    ) -> Sequence[Workspace]:
        """The creator's workspaces, newest first, strictly after the keyset `(create_time, id)`."""
        if after is None:
            rows = await self.uow.fetch(_LIST_FIRST, creator=creator, limit=limit)
        else:
            rows = await self.uow.fetch(_LIST_AFTER, creator=creator, last_time=after[0], last_id=after[1], limit=limit)
        return [_workspace(row) for row in rows]

    async def activate(self, *, workspace_id: uuid.UUID) -> Workspace | None:
        """PROVISIONING → ACTIVE in the workspace's own tenant; None if it is absent or not provisioning."""
        row = await self.uow.fetchrow(_ACTIVATE, id=workspace_id)
        return _workspace(row) if row is not None else None
