"""All SQL of the tenancy service (SQLAlchemy Core on the unit of work's connection).

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
from sqlalchemy.ext.asyncio import AsyncConnection

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
        id=row.id,
        display_name=row.display_name,
        state=WorkspaceState(row.state),
        creator=row.creator,
        create_time=row.create_time,
        update_time=row.update_time,
    )


def _visible_to(viewer: uuid.UUID, tenant_id: uuid.UUID | None) -> sa.ColumnElement[bool]:
    """The same visibility rule as the RLS policy `workspace_tenant`: created by the viewer, or its tenant."""
    if tenant_id is None:
        return workspaces.c.creator == viewer
    return sa.or_(workspaces.c.creator == viewer, workspaces.c.tenant_id == tenant_id)


class WorkspaceRepository:
    """Workspaces on one unit of work's connection."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

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
        statement = (
            pg_insert(workspaces)
            .values(
                tenant_id=workspace_id,
                id=workspace_id,
                display_name=display_name,
                state=WorkspaceState.PROVISIONING.value,
                creator=creator,
                request_id=request_id,
                request_fingerprint=request_fingerprint,
            )
            .on_conflict_do_nothing(index_elements=[workspaces.c.creator, workspaces.c.request_id])
            .returning(*_WORKSPACE_COLUMNS)
        )
        row = (await self.conn.execute(statement)).one_or_none()
        return _workspace(row) if row is not None else None

    async def find_by_request_id(self, *, creator: uuid.UUID, request_id: uuid.UUID) -> IdempotentCreate | None:
        """The workspace the creator made with this request_id, if any."""
        statement = sa.select(*_WORKSPACE_COLUMNS, workspaces.c.request_fingerprint).where(
            workspaces.c.creator == creator, workspaces.c.request_id == request_id
        )
        row = (await self.conn.execute(statement)).one_or_none()
        if row is None:
            return None
        return IdempotentCreate(_workspace(row), row.request_fingerprint)

    async def get_visible(
        self, *, workspace_id: uuid.UUID, viewer: uuid.UUID, tenant_id: uuid.UUID | None
    ) -> Workspace | None:
        """One workspace by primary key, if the viewer may see it."""
        statement = sa.select(*_WORKSPACE_COLUMNS).where(
            workspaces.c.id == workspace_id, _visible_to(viewer, tenant_id)
        )
        row = (await self.conn.execute(statement)).one_or_none()
        return _workspace(row) if row is not None else None

    async def list_created_by(
        self,
        *,
        creator: uuid.UUID,
        after: tuple[datetime, uuid.UUID] | None,
        limit: int,
    ) -> Sequence[Workspace]:
        """The creator's workspaces, newest first, strictly after the keyset `(create_time, id)`."""
        statement = sa.select(*_WORKSPACE_COLUMNS).where(workspaces.c.creator == creator)
        if after is not None:
            # Row comparison matches the index (creator, create_time DESC, id DESC) scanned forward.
            last_time, last_id = after
            statement = statement.where(
                sa.tuple_(workspaces.c.create_time, workspaces.c.id)
                < sa.tuple_(
                    sa.literal(last_time, workspaces.c.create_time.type), sa.literal(last_id, workspaces.c.id.type)
                )
            )
        statement = statement.order_by(workspaces.c.create_time.desc(), workspaces.c.id.desc()).limit(limit)
        return [_workspace(row) for row in await self.conn.execute(statement)]

    async def activate(self, *, workspace_id: uuid.UUID) -> Workspace | None:
        """PROVISIONING → ACTIVE in the workspace's own tenant; None if it is absent or not provisioning."""
        statement = (
            sa.update(workspaces)
            .where(
                workspaces.c.tenant_id == workspace_id,
                workspaces.c.id == workspace_id,
                workspaces.c.state == WorkspaceState.PROVISIONING.value,
            )
            .values(state=WorkspaceState.ACTIVE.value, update_time=sa.func.now())
            .returning(*_WORKSPACE_COLUMNS)
        )
        row = (await self.conn.execute(statement)).one_or_none()
        return _workspace(row) if row is not None else None
