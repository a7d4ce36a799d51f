"""Fixtures of the migration tests: a scratch database per test on the session's PostgreSQL server."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import asyncpg
import pytest


async def admin_execute(url: str, statement: str) -> None:
    """Run one statement as the admin (a superuser: RLS does not apply to it)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
def scratch_url(pg_server_url: str) -> Iterator[str]:
    """A database of this test alone on the session's server, dropped afterwards."""
    name = f"tessera_migrations_{uuid.uuid4().hex[:10]}"
    asyncio.run(admin_execute(pg_server_url, f'CREATE DATABASE "{name}"'))
    try:
        yield f"{pg_server_url.rpartition('/')[0]}/{name}"
    finally:
        asyncio.run(admin_execute(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# Two workflows that give the same state id different categories: the backfill must read each item's own
# project. Shape of projects.workflow as services/workflow/models.py documents it.
WORKFLOWS: dict[str, list[tuple[str, str]]] = {
    "standard": [("todo", "BACKLOG"), ("doing", "ACTIVE"), ("done", "DONE"), ("dropped", "CANCELLED")],
    "review": [("todo", "ACTIVE"), ("review", "ACTIVE"), ("shipped", "DONE"), ("later", "BACKLOG")],
}

ItemKey = tuple[uuid.UUID, uuid.UUID]


def workflow_json(name: str) -> str:
    states = [{"id": state, "display_name": state.title(), "category": category} for state, category in WORKFLOWS[name]]
    return json.dumps({"states": states, "transitions": [], "initial": states[0]["id"]})


async def seed_items(url: str, *, tenants: int, items: int) -> dict[ItemKey, str]:
    """Projects (one per workflow) in `tenants` workspaces and `items` items spread over them, written as
    the admin at revision 0004 (no status_category yet). Returns each item's expected category."""
    conn = await asyncpg.connect(url)
    try:
        projects: list[tuple[uuid.UUID, uuid.UUID, str]] = []
        for _ in range(tenants):
            tenant = uuid.uuid4()
            for workflow in WORKFLOWS:
                project = uuid.uuid4()
                projects.append((tenant, project, workflow))
                await conn.execute(
                    "INSERT INTO workflow.projects (tenant_id, id, display_name, workflow, creator) "
                    "VALUES ($1, $2, $3, $4::jsonb, 'users/seed')",
                    tenant,
                    project,
                    f"{workflow} project",
                    workflow_json(workflow),
                )
        expected: dict[ItemKey, str] = {}
        rows = []
        for index in range(items):
            tenant, project, workflow = projects[index % len(projects)]
            status, category = WORKFLOWS[workflow][index % len(WORKFLOWS[workflow])]
            key = (tenant, uuid.uuid4())
            expected[key] = category
            rows.append((tenant, key[1], project, f"item {index}", status))
        await conn.executemany(
            "INSERT INTO workflow.items (tenant_id, id, project_id, title, status, creator, updater) "
            "VALUES ($1, $2, $3, $4, $5, 'users/seed', 'users/seed')",
            rows,
        )
        return expected
    finally:
        await conn.close()


async def categories(url: str) -> dict[ItemKey, str | None]:
    """Every item's status_category, read as the admin."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tenant_id, id, status_category FROM workflow.items")
        return {(row["tenant_id"], row["id"]): row["status_category"] for row in rows}
    finally:
        await conn.close()


async def fetchval(url: str, query: str, *args: object) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()
