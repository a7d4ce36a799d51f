"""Migration safety (gate S04): upgrade head → downgrade base → upgrade head on a fresh database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from migrations import runner

pytestmark = pytest.mark.gate("S04")


async def _admin(server_url: str, statement: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
def scratch_url(pg_server_url: str) -> Iterator[str]:
    """A database of this test alone on the session's server, dropped afterwards."""
    name = f"tessera_migrations_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(pg_server_url, f'CREATE DATABASE "{name}"'))
    try:
        yield f"{pg_server_url.rpartition('/')[0]}/{name}"
    finally:
        asyncio.run(_admin(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_round_trip_restores_an_identical_schema(scratch_url: str) -> None:
    assert runner.current(scratch_url) is None

    report = runner.round_trip(scratch_url)

    assert report.head == runner.heads()[0]
    assert runner.current(scratch_url) == report.head
    assert runner.snapshot_diff(report.at_head, report.at_head_again) == []
    assert report.at_head == report.at_head_again
    # The comparison is not vacuous: the head schema has the tenancy tables under forced RLS, with the policy.
    relations = {(row[0], row[1]): row for row in report.at_head["relations"]}
    workspaces = relations[("tenancy", "workspaces")]
    assert workspaces[3:6] == ("tessera_owner", "True", "True")
    assert ("tenancy", "outbox") in relations
    assert ("tenancy", "inbox") in relations
    assert [row[2] for row in report.at_head["policies"] if row[:2] == ("tenancy", "workspaces")] == [
        "workspace_tenant"
    ]


def test_downgrade_to_base_leaves_no_service_schema(scratch_url: str) -> None:
    runner.migrate(scratch_url)
    runner.downgrade(scratch_url, "base")

    snapshot = runner.schema_snapshot(scratch_url)
    schemas = {row[0] for row in snapshot["schemas"]}
    assert schemas.isdisjoint(runner.SERVICES)
    assert [row for row in snapshot["relations"] if row[0] != runner.META_SCHEMA] == []
    assert snapshot["policies"] == []
    assert runner.current(scratch_url) is None


def test_every_object_a_migration_creates_is_owned_by_the_owner_role(scratch_url: str) -> None:
    runner.migrate(scratch_url)

    snapshot = runner.schema_snapshot(scratch_url)
    owners = {row[1] for row in snapshot["schemas"] if row[0] in (*runner.SERVICES, runner.META_SCHEMA)}
    owners |= {row[3] for row in snapshot["relations"]}
    assert owners == {runner.OWNER_ROLE}


def test_downgrade_discards_data_and_upgrade_starts_empty(scratch_url: str) -> None:
    """What the rollback note in docs/runbooks/migrations.md warns about: revision 0001's downgrade drops data."""
    runner.migrate(scratch_url)
    workspace_id = uuid.uuid4()
    asyncio.run(
        _admin(
            scratch_url,
            "INSERT INTO tenancy.workspaces (tenant_id, id, display_name, state, creator) "
            f"VALUES ('{workspace_id}', '{workspace_id}', 'kept?', 'ACTIVE', '{uuid.uuid4()}')",
        )
    )
    runner.downgrade(scratch_url, "base")
    runner.upgrade(scratch_url, "head")

    async def count() -> int:
        conn = await asyncpg.connect(scratch_url)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM tenancy.workspaces"))
        finally:
            await conn.close()

    assert asyncio.run(count()) == 0


def test_bootstrap_is_idempotent_and_sets_role_attributes(scratch_url: str) -> None:
    runner.bootstrap(scratch_url)
    runner.bootstrap(scratch_url)

    async def roles() -> dict[str, tuple[bool, bool, bool, bool]]:
        conn = await asyncpg.connect(scratch_url)
        try:
            rows = await conn.fetch(
                "SELECT rolname, rolsuper, rolbypassrls, rolcanlogin, rolinherit FROM pg_roles WHERE rolname = ANY($1)",
                [runner.OWNER_ROLE, *(runner.service_role(s) for s in runner.SERVICES)],
            )
            return {
                row["rolname"]: (row["rolsuper"], row["rolbypassrls"], row["rolcanlogin"], row["rolinherit"])
                for row in rows
            }
        finally:
            await conn.close()

    found = asyncio.run(roles())
    assert found[runner.OWNER_ROLE] == (False, False, False, True)
    for service in runner.SERVICES:
        assert found[runner.service_role(service)] == (False, False, True, False)


def test_concurrent_upgrades_of_one_database_serialise(scratch_url: str) -> None:
    runner.bootstrap(scratch_url)

    async def both() -> None:
        await asyncio.gather(
            asyncio.to_thread(runner.upgrade, scratch_url, "head"),
            asyncio.to_thread(runner.upgrade, scratch_url, "head"),
        )

    asyncio.run(both())
    assert runner.current(scratch_url) == runner.heads()[0]
