"""Tenant isolation of the workflow tables in the database itself (gate S03): the RLS backstop.

Raw SQL and the repositories as `tessera_workflow`, without the service's own tenant checks.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from services.kit.db import Database, UnitOfWork
from services.kit.ids import uuid7
from services.kit.principal import Principal
from services.workflow.repository import (
    ActivityRepository,
    ItemRepository,
    MemberRepository,
    ProjectRepository,
    UsageRepository,
)
from services.workflow.workflow import DEFAULT_WORKFLOW

pytestmark = pytest.mark.gate("S03")

TENANT_TABLES = ("projects", "items", "activities", "members", "usage")


@pytest.fixture
async def workflow_conn(workflow_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(workflow_url)
    try:
        yield conn
    finally:
        await conn.close()


class Tenant:
    """A workspace with one row in every workflow tenant table (inserted as superuser, bypassing RLS)."""

    def __init__(self) -> None:
        self.id = uuid7()
        self.project = uuid7()
        self.item = uuid7()
        self.user = uuid7()

    async def insert(self, admin: asyncpg.Connection) -> Tenant:
        await admin.execute(
            "INSERT INTO workflow.projects (tenant_id, id, display_name, workflow, creator) "
            "VALUES ($1, $2, 'P', $3::jsonb, 'users/x')",
            self.id,
            self.project,
            json.dumps(DEFAULT_WORKFLOW.to_json()),
        )
        await admin.execute(
            "INSERT INTO workflow.items (tenant_id, id, project_id, title, status, status_category, creator, updater) "
            "VALUES ($1, $2, $3, 'secret', 'backlog', 'BACKLOG', 'users/x', 'users/x')",
            self.id,
            self.item,
            self.project,
        )
        await admin.execute(
            "INSERT INTO workflow.activities (tenant_id, id, item_id, project_id, kind, actor) "
            "VALUES ($1, $2, $3, $4, 'CREATED', 'users/x')",
            self.id,
            uuid7(),
            self.item,
            self.project,
        )
        await admin.execute(
            "INSERT INTO workflow.members (tenant_id, user_id, role, change_time) VALUES ($1, $2, 'member', now())",
            self.id,
            self.user,
        )
        await admin.execute("INSERT INTO workflow.usage (tenant_id, item_count) VALUES ($1, 1)", self.id)
        return self


async def _context(conn: asyncpg.Connection, tenant: uuid.UUID | None) -> None:
    await conn.execute(
        "SELECT set_config('tessera.tenant_id', $1, true), set_config('tessera.subject', '', true)",
        str(tenant) if tenant else "",
    )


async def _execute_as(conn: asyncpg.Connection, tenant: uuid.UUID, statement: str, *args: object) -> None:
    """One statement in its own transaction under the tenant's context."""
    async with conn.transaction():
        await _context(conn, tenant)
        await conn.execute(statement, *args)


@pytest.mark.parametrize("table", TENANT_TABLES)
async def test_rls_hides_and_protects_other_tenants_rows(
    admin_conn: asyncpg.Connection, workflow_conn: asyncpg.Connection, table: str
) -> None:
    a = await Tenant().insert(admin_conn)
    b = await Tenant().insert(admin_conn)
    async with workflow_conn.transaction():
        await _context(workflow_conn, a.id)
        visible = {row["tenant_id"] for row in await workflow_conn.fetch(f"SELECT tenant_id FROM workflow.{table}")}
        of_b = await workflow_conn.fetch(f"SELECT * FROM workflow.{table} WHERE tenant_id = $1", b.id)
        if table != "activities":  # append-only: the service role may not UPDATE it at all
            status = await workflow_conn.execute(
                f"UPDATE workflow.{table} SET tenant_id = tenant_id WHERE tenant_id = $1", b.id
            )
            assert status == "UPDATE 0"
    assert visible == {a.id}
    assert of_b == []
    assert await admin_conn.fetchval(f"SELECT count(*) FROM workflow.{table} WHERE tenant_id = $1", b.id) == 1


async def test_no_tenant_sees_nothing(admin_conn: asyncpg.Connection, workflow_conn: asyncpg.Connection) -> None:
    await Tenant().insert(admin_conn)
    for table in TENANT_TABLES:
        async with workflow_conn.transaction():
            await _context(workflow_conn, None)
            assert await workflow_conn.fetchval(f"SELECT count(*) FROM workflow.{table}") == 0, table


async def test_the_activity_log_is_append_only(
    admin_conn: asyncpg.Connection, workflow_conn: asyncpg.Connection
) -> None:
    a = await Tenant().insert(admin_conn)
    for statement in (
        "UPDATE workflow.activities SET kind = 'UPDATED' WHERE tenant_id = $1",
        "DELETE FROM workflow.activities WHERE tenant_id = $1",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await _execute_as(workflow_conn, a.id, statement, a.id)


Write = Callable[[UnitOfWork], Awaitable[Any]]


async def test_repositories_under_a_foreign_tenant_read_nothing_and_write_nothing(
    admin_conn: asyncpg.Connection, workflow_db: Database
) -> None:
    """The service-layer checks bypassed: repositories called directly in tenant A's unit of work, about B."""
    a = await Tenant().insert(admin_conn)
    b = await Tenant().insert(admin_conn)
    caller = Principal(subject=str(uuid7())).in_tenant(str(a.id), "owner")

    async with workflow_db.unit_of_work(caller) as uow:
        projects, items = ProjectRepository(uow), ItemRepository(uow)
        assert await projects.get(workspace_id=b.id, project_id=b.project) is None
        assert await projects.get(workspace_id=b.id, project_id=b.project, lock="update") is None
        assert await projects.page(workspace_id=b.id, after=None, limit=10) == []
        assert await projects.states_in_use(workspace_id=b.id, project_id=b.project, states=["backlog"]) == set()
        assert await items.get(workspace_id=b.id, project_id=b.project, item_id=b.item, lock=True) is None
        assert await items.lock_many(workspace_id=b.id, project_id=b.project, item_ids=[b.item]) == {}
        assert not await items.live_exists(workspace_id=b.id, project_id=b.project, item_id=b.item)
        assert await ActivityRepository(uow).page(workspace_id=b.id, item_id=b.item, after=None, limit=10) == []
        assert not await MemberRepository(uow).is_member(workspace_id=b.id, user_id=b.user)
        assert await UsageRepository(uow).item_count(workspace_id=b.id) == 0
        await UsageRepository(uow).uncount_item(workspace_id=b.id)
        await projects.recategorize(workspace_id=b.id, project_id=b.project, categories={"backlog": "DONE"})

    values = {
        "title": "intruder",
        "description": "",
        "priority": 0,
        "assignee": None,
        "labels": (),
        "due_time": None,
        "custom_fields": {},
        "parent_id": None,
    }
    writes: list[Write] = [
        lambda uow: ProjectRepository(uow).insert(
            workspace_id=b.id,
            project_id=uuid7(),
            display_name="intruder",
            description="",
            workflow=DEFAULT_WORKFLOW.to_json(),
            custom_fields=[],
            creator="users/x",
            request_id=None,
            request_fingerprint=None,
        ),
        lambda uow: ItemRepository(uow).insert(
            workspace_id=b.id,
            project_id=b.project,
            item_id=uuid7(),
            values=values,
            status="backlog",
            status_category="BACKLOG",
            actor="users/x",
            request_id=None,
            request_fingerprint=None,
            snapshot={"title": "t"},
            log_request_id="",
        ),
        lambda uow: MemberRepository(uow).record(
            workspace_id=b.id, user_id=uuid7(), role="owner", change_time=datetime.now(UTC)
        ),
        lambda uow: UsageRepository(uow).count_item(workspace_id=b.id, maximum=10),
    ]
    for write in writes:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            async with workflow_db.unit_of_work(caller) as uow:
                await write(uow)

    for table in TENANT_TABLES:
        count = await admin_conn.fetchval(f"SELECT count(*) FROM workflow.{table} WHERE tenant_id = $1", b.id)
        assert count == 1, table
    assert await admin_conn.fetchval("SELECT sum(item_count) FROM workflow.usage WHERE tenant_id = $1", b.id) == 1
    assert await admin_conn.fetchval("SELECT status_category FROM workflow.items WHERE id = $1", b.item) == "BACKLOG"
