"""The unit of work: tenant context per transaction, row-level security as the backstop, no leaks."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import sqlalchemy as sa

from services.kit.db import DATABASE_UNAVAILABLE, Database
from services.kit.errors import Unavailable
from services.kit.ids import uuid7
from services.kit.sql import Query
from tessera_cli.embedded import free_port
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
    async with kit_db.connection() as conn:
        row = await conn.fetchrow(
            "SELECT r.rolsuper, r.rolbypassrls, c.relowner = r.oid AS owns_notes "
            "FROM pg_roles r, pg_class c WHERE r.rolname = current_user AND c.oid = 'kit_test.notes'::regclass"
        )
    assert (row["rolsuper"], row["rolbypassrls"], row["owns_notes"]) == (False, False, False)


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

    async with db.connection() as conn:
        assert await conn.fetchval("SELECT pg_backend_pid()") == pid
        assert await conn.fetchval("SELECT current_setting('tessera.tenant_id', true)") in ("", None)
        assert await conn.fetch(Query(SELECT_NOTES).sql) == []

    with pytest.raises(RuntimeError, match="boom"):
        async with db.unit_of_work(None, tenant_id=TENANT_B):
            raise RuntimeError("boom")
    async with db.connection() as conn:
        assert await conn.fetchval("SELECT pg_backend_pid()") == pid  # the same connection: nothing was left set
        assert await conn.fetchval("SELECT current_setting('tessera.tenant_id', true)") in ("", None)


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


@pytest.mark.gate("S02")
async def test_a_busy_or_unreachable_database_is_unavailable_not_internal(kit_db_url: str, kit_source: str) -> None:
    """No connection free in time, or none can be opened: UNAVAILABLE (retryable), and the pool recovers."""
    db = Database(kit_db_url, service=kit_source, schema=KIT_SCHEMA, pool_size=1, acquire_timeout=0.05)
    try:
        async with db.connection() as held:
            with pytest.raises(Unavailable, match=r"no database connection free within 0\.05s") as busy:
                async with db.unit_of_work(None, tenant_id=TENANT_A):
                    pass
            assert busy.value.reason == DATABASE_UNAVAILABLE
            held_pid = await held.fetchval("SELECT pg_backend_pid()")
        async with db.unit_of_work(None, tenant_id=TENANT_A) as uow:  # released: the next caller gets it
            assert await uow.fetchval(sa.text("SELECT pg_backend_pid()")) == held_pid
    finally:
        await db.dispose()
    nowhere = Database(
        f"postgresql://nobody@127.0.0.1:{free_port()}/nothing", service=kit_source, schema=KIT_SCHEMA, pool_size=1
    )
    try:
        with pytest.raises(Unavailable, match="cannot be reached") as down:
            await nowhere.ping()
        assert down.value.reason == DATABASE_UNAVAILABLE
    finally:
        await nowhere.dispose()


@pytest.mark.gate("S02")
async def test_json_parameters_are_json_text_and_results_are_parsed(kit_db: Database) -> None:
    async with kit_db.connection() as conn:
        assert await conn.fetchval("SELECT $1::jsonb", '{"a": [1, "x"]}') == {"a": [1, "x"]}
        assert await conn.fetchval("SELECT $1::json", "[true, null]") == [True, None]
        with pytest.raises((TypeError, asyncpg.DataError), match="passed as JSON text"):
            await conn.fetchval("SELECT $1::jsonb", {"a": 1})


@pytest.mark.gate("S03")
async def test_a_connection_that_failed_mid_transaction_is_never_handed_out_again(
    one_connection_db: Database, kit_clean: asyncpg.Connection
) -> None:
    """A cancelled statement is rolled back and the connection reused clean; a connection whose rollback
    fails too (here: the server ended the session) is closed and replaced, never handed out again."""
    db = one_connection_db

    async def slow() -> None:
        async with db.unit_of_work(None, tenant_id=TENANT_A) as uow:
            await uow.execute(sa.text("SELECT pg_sleep(10)"))

    task = asyncio.create_task(slow())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with db.unit_of_work(None, tenant_id=TENANT_B) as uow:
        pid = await uow.fetchval(sa.text("SELECT pg_backend_pid()"))
        assert await uow.fetchval(sa.text("SELECT current_setting('tessera.tenant_id', true)")) == TENANT_B

    async def session_ended() -> None:
        async with db.unit_of_work(None, tenant_id=TENANT_A) as uow:
            await kit_clean.execute("SELECT pg_terminate_backend($1)", pid)
            await uow.execute(sa.text("SELECT 1"))

    # The session is gone: the statement fails, and so does the ROLLBACK after it.
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
        await session_ended()
    async with db.unit_of_work(None, tenant_id=TENANT_B) as uow:
        assert await uow.fetchval(sa.text("SELECT pg_backend_pid()")) != pid
        assert await uow.fetchval(sa.text("SELECT current_setting('tessera.tenant_id', true)")) == TENANT_B
