"""Revision 0002 (memberships) on a scratch database: the backfill, the policy swap, and its downgrade (gate S04)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from migrations import runner

pytestmark = pytest.mark.gate("S04")

REVISION = "0002_tenancy_memberships"


async def _admin(url: str, statement: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(statement, *args)  # type: ignore[no-any-return]  # asyncpg is untyped
    finally:
        await conn.close()


def admin(url: str, statement: str, *args: object) -> list[asyncpg.Record]:
    return asyncio.run(_admin(url, statement, *args))


async def _as_subject(url: str, subject: uuid.UUID, statement: str) -> list[asyncpg.Record]:
    """A statement as tessera_tenancy with only `tessera.subject` set (a user-level transaction)."""
    conn = await asyncpg.connect(runner.service_url(url, "tenancy"))
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('tessera.subject', $1, true)", str(subject))
            return await conn.fetch(statement)  # type: ignore[no-any-return]  # asyncpg is untyped
    finally:
        await conn.close()


@pytest.fixture
def scratch_url(pg_server_url: str) -> Iterator[str]:
    name = f"tessera_m0002_{uuid.uuid4().hex[:10]}"
    admin(pg_server_url, f'CREATE DATABASE "{name}"')
    try:
        yield f"{pg_server_url.rpartition('/')[0]}/{name}"
    finally:
        admin(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_upgrade_makes_each_creator_the_owner_and_downgrade_restores_creator_visibility(scratch_url: str) -> None:
    runner.bootstrap(scratch_url)
    runner.upgrade(scratch_url, "0001")
    creators = [uuid.uuid4() for _ in range(3)]
    for index, creator in enumerate(creators):
        admin(
            scratch_url,
            "INSERT INTO tenancy.workspaces (tenant_id, id, display_name, state, creator) "
            "VALUES ($1, $1, $2, 'ACTIVE', $3)",
            uuid.uuid4(),
            f"ws {index}",
            creator,
        )

    runner.upgrade(scratch_url, REVISION)

    owners = admin(scratch_url, "SELECT m.user_id, m.role FROM tenancy.members m ORDER BY m.create_time")
    assert sorted((row["user_id"], row["role"]) for row in owners) == sorted((c, "owner") for c in creators)
    # Visibility is by membership now: each creator sees exactly their workspace.
    visible = asyncio.run(_as_subject(scratch_url, creators[0], "SELECT display_name FROM tenancy.workspaces"))
    assert [row["display_name"] for row in visible] == ["ws 0"]
    forced = admin(
        scratch_url,
        "SELECT relname, relforcerowsecurity FROM pg_class WHERE relnamespace = 'tenancy'::regnamespace "
        "AND relkind = 'r' ORDER BY relname",
    )
    assert {row["relname"]: row["relforcerowsecurity"] for row in forced} == {
        "audit_log": True,
        "inbox": False,
        "invitations": True,
        "members": True,
        "outbox": False,
        "workspaces": True,  # forced again after the backfill lifted it
    }

    # Downgrade: memberships go, creators still see their own workspaces through 0001's creator clause.
    admin(scratch_url, "DELETE FROM tenancy.members WHERE user_id = $1", creators[0])
    runner.downgrade(scratch_url, "0001")
    assert runner.current(scratch_url) == "0001"
    visible = asyncio.run(_as_subject(scratch_url, creators[0], "SELECT display_name FROM tenancy.workspaces"))
    assert [row["display_name"] for row in visible] == ["ws 0"]
    columns = admin(
        scratch_url,
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = 'tenancy' AND table_name = 'workspaces'",
    )
    assert {"delete_time", "purge_time", "version"}.isdisjoint({row["column_name"] for row in columns})
