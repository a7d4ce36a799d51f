"""The unit of work: tenant context per transaction, row-level security as the backstop, no leaks."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import sqlalchemy as sa

from services.kit.db import Database
from services.kit.ids import uuid7
from tests.kit.conftest import KIT_SCHEMA, outbox_count, workspace_event

TENANT_A = str(uuid7())
TENANT_B = str(uuid7())

INSERT_NOTE = sa.text(
    f"INSERT INTO {KIT_SCHEMA}.notes (tenant_id, id, body) VALUES (CAST(:tenant AS uuid), :id, :body)"
)
SELECT_NOTES = sa.text(f"SELECT tenant_id::text AS tenant_id, body FROM {KIT_SCHEMA}.notes ORDER BY id")


@pytest.fixture
async def one_connection_db(kit_db_url: str, kit_source: str, kit_clean: asyncpg.Connection) -> AsyncIterator[Database]:
    db = Database(kit_db_url, service=kit_source, schema=KIT_SCHEMA, pool_size=1)
    try:
        yield db
    finally:
        await db.dispose()


@pytest.mark.gate("S03")
async def test_role_under_test_cannot_bypass_rls(kit_db: Database) -> None:
    async with kit_db.engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text(
                    "SELECT r.rolsuper, r.rolbypassrls, c.relowner = r.oid AS owns_notes "
                    "FROM pg_roles r, pg_class c WHERE r.rolname = current_user AND c.oid = 'kit_test.notes'::regclass"
                )
            )
        ).one()
    assert (row.rolsuper, row.rolbypassrls, row.owns_notes) == (False, False, False)


@pytest.mark.gate("S03")
async def test_two_tenants_interleaved_on_one_pooled_connection_never_see_each_other(
    one_connection_db: Database, kit_clean: asyncpg.Connection
) -> None:
    db = one_connection_db
    rounds = 25
    order: list[str] = []
    backends: set[int] = set()

    async def work(tenant: str) -> None:
        for i in range(rounds):
            async with db.unit_of_work(None, tenant_id=tenant) as uow:
                order.append(tenant)
                backends.add(await uow.fetchval(sa.text("SELECT pg_backend_pid()")))
                await uow.execute(INSERT_NOTE, tenant=tenant, id=uuid7(), body=f"{tenant}:{i}")
                await asyncio.sleep(0)  # let the other tenant queue for the connection mid-transaction
                rows = await uow.fetch(SELECT_NOTES)
                assert {row["tenant_id"] for row in rows} == {tenant}
                assert [row["body"] for row in rows] == [f"{tenant}:{n}" for n in range(i + 1)]
            await asyncio.sleep(0)  # between transactions: the other tenant's waiting checkout goes first

    await asyncio.gather(work(TENANT_A), work(TENANT_B))

    assert len(backends) == 1, "both tenants must have shared the single pooled connection"
    switches = sum(1 for prev, cur in itertools.pairwise(order) if prev != cur)
    assert switches >= rounds, f"transactions of the two tenants did not interleave: {order}"
    counts = dict(await kit_clean.fetch(f"SELECT tenant_id::text, count(*) FROM {KIT_SCHEMA}.notes GROUP BY tenant_id"))
    assert counts == {TENANT_A: rounds, TENANT_B: rounds}


@pytest.mark.gate("S03")
async def test_no_tenant_sees_nothing_and_cannot_insert(kit_db: Database, kit_clean: asyncpg.Connection) -> None:
    async with kit_db.unit_of_work(None, tenant_id=TENANT_A) as uow:
        await uow.execute(INSERT_NOTE, tenant=TENANT_A, id=uuid7(), body="a")
    assert await kit_clean.fetchval(f"SELECT count(*) FROM {KIT_SCHEMA}.notes") == 1

    async with kit_db.unit_of_work(None) as uow:
        assert await uow.fetch(SELECT_NOTES) == []

    with pytest.raises(asyncpg.PostgresError, match="row-level security"):
        async with kit_db.unit_of_work(None) as uow:
            await uow.execute(INSERT_NOTE, tenant=TENANT_A, id=uuid7(), body="no tenant")

    with pytest.raises(asyncpg.PostgresError, match="row-level security"):
        async with kit_db.unit_of_work(None, tenant_id=TENANT_B) as uow:
            await uow.execute(INSERT_NOTE, tenant=TENANT_A, id=uuid7(), body="other tenant")

    async with kit_db.unit_of_work(None, tenant_id=TENANT_B) as uow:
        assert await uow.fetch(SELECT_NOTES) == []
        updated = await uow.execute(sa.text(f"UPDATE {KIT_SCHEMA}.notes SET body = 'stolen'"))
        assert updated == "UPDATE 0"
    assert await kit_clean.fetchval(f"SELECT count(*) FROM {KIT_SCHEMA}.notes WHERE body = 'a'") == 1


@pytest.mark.gate("S03")
async def test_tenant_setting_does_not_leak_to_the_next_transaction(one_connection_db: Database) -> None:
    db = one_connection_db
    async with db.unit_of_work(None, tenant_id=TENANT_A) as uow:
        pid = await uow.fetchval(sa.text("SELECT pg_backend_pid()"))
        assert await uow.fetchval(sa.text("SELECT current_setting('tessera.tenant_id', true)")) == TENANT_A
        await uow.execute(INSERT_NOTE, tenant=TENANT_A, id=uuid7(), body="a")

    async with db.engine.connect() as conn:
        assert await conn.scalar(sa.text("SELECT pg_backend_pid()")) == pid
        assert await conn.scalar(sa.text("SELECT current_setting('tessera.tenant_id', true)")) in ("", None)
        assert (await conn.execute(SELECT_NOTES)).all() == []
        await conn.rollback()

    with pytest.raises(RuntimeError, match="boom"):
        async with db.unit_of_work(None, tenant_id=TENANT_B):
            raise RuntimeError("boom")
    async with db.engine.connect() as conn:
        assert await conn.scalar(sa.text("SELECT current_setting('tessera.tenant_id', true)")) in ("", None)
        await conn.rollback()


@pytest.mark.gate("S08")
async def test_events_commit_and_roll_back_with_the_unit_of_work(
    kit_db: Database, kit_clean: asyncpg.Connection
) -> None:
    note_id = uuid7()

    async def fail_after_emit() -> None:
        async with kit_db.unit_of_work(None, tenant_id=TENANT_A) as uow:
            await uow.execute(INSERT_NOTE, tenant=TENANT_A, id=note_id, body="x")
            uow.emit(workspace_event(), subject="workspaces/x")
            raise RuntimeError("after emit")

    with pytest.raises(RuntimeError, match="after emit"):
        await fail_after_emit()
    assert await outbox_count(kit_clean) == 0
    assert await kit_clean.fetchval(f"SELECT count(*) FROM {KIT_SCHEMA}.notes") == 0

    woken: list[bool] = []
    kit_db.on_events_committed(lambda: woken.append(True))
    async with kit_db.unit_of_work(None, tenant_id=TENANT_A) as uow:
        await uow.execute(INSERT_NOTE, tenant=TENANT_A, id=note_id, body="x")
        envelope = uow.emit(workspace_event(), subject="workspaces/x")
    row = await kit_clean.fetchrow(f"SELECT id, nats_subject, attempts FROM {KIT_SCHEMA}.outbox")
    assert row is not None
    assert (row["id"], row["attempts"]) == (uuid.UUID(envelope.id), 0)
    assert row["nats_subject"] == f"tessera.{kit_db.service}.workspace_created"
    assert envelope.tenant_id == TENANT_A
    assert woken == [True]

    with pytest.raises(ValueError, match="tenant"):
        async with kit_db.unit_of_work(None) as uow:
            uow.emit(workspace_event(), subject="workspaces/x")
