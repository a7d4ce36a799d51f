"""Kit fixtures: a `kit_test` schema of its own (outbox, inbox, two RLS tenant tables) and NATS brokers.

The kit is tested without any service: the schema is created here as the superuser, and the Database
under test logs in as `tessera_kit_test`, a login role that is no superuser, has no BYPASSRLS and owns
nothing, exactly like a service role. Each test gets its own event source (hence its own stream).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import sqlalchemy as sa
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from sqlalchemy.ext.asyncio import create_async_engine

from services.kit.broker import DLQ_STREAM, Broker
from services.kit.consumer import dlq_subject
from services.kit.db import Database, UnitOfWork, inbox_table, outbox_table, with_user
from services.kit.events import stream_name
from services.kit.ids import uuid7
from tessera.common.v1.event_pb2 import EventEnvelope
from tessera.tenancy.v1 import tenancy_events_pb2, tenancy_pb2

KIT_SCHEMA = "kit_test"
KIT_ROLE = "tessera_kit_test"
KIT_PASSWORD = "tessera_kit_test"  # only for external servers that do not trust local logins

TENANT_POLICY = "tenant_id = NULLIF(current_setting('tessera.tenant_id', true), '')::uuid"

_TENANT_TABLES = f"""
CREATE TABLE {KIT_SCHEMA}.notes (
    tenant_id uuid NOT NULL,
    id uuid PRIMARY KEY,
    body text NOT NULL
);
CREATE INDEX notes_tenant_idx ON {KIT_SCHEMA}.notes (tenant_id, id);
ALTER TABLE {KIT_SCHEMA}.notes ENABLE ROW LEVEL SECURITY;
ALTER TABLE {KIT_SCHEMA}.notes FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON {KIT_SCHEMA}.notes USING ({TENANT_POLICY}) WITH CHECK ({TENANT_POLICY});

-- The effect of test consumers: one row per (consumer, event), `applied` counts how often it ran.
CREATE TABLE {KIT_SCHEMA}.effects (
    tenant_id uuid NOT NULL,
    consumer text NOT NULL,
    event_id uuid NOT NULL,
    applied integer NOT NULL,
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX effects_tenant_idx ON {KIT_SCHEMA}.effects (tenant_id, consumer);
ALTER TABLE {KIT_SCHEMA}.effects ENABLE ROW LEVEL SECURITY;
ALTER TABLE {KIT_SCHEMA}.effects FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON {KIT_SCHEMA}.effects USING ({TENANT_POLICY}) WITH CHECK ({TENANT_POLICY});
"""


async def _create_kit_schema(admin_url: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {KIT_SCHEMA} CASCADE")
        await conn.execute(f"CREATE SCHEMA {KIT_SCHEMA}")
        await conn.execute(_TENANT_TABLES)
        await conn.execute(
            f"""
            DO $$ BEGIN
                IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{KIT_ROLE}') THEN
                    CREATE ROLE {KIT_ROLE} NOLOGIN;
                END IF;
            END $$;
            ALTER ROLE {KIT_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE PASSWORD '{KIT_PASSWORD}';
            """
        )
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {KIT_ROLE}')
    finally:
        await conn.close()

    metadata = sa.MetaData()
    outbox_table(metadata, KIT_SCHEMA)
    inbox_table(metadata, KIT_SCHEMA)
    engine = create_async_engine("postgresql+asyncpg://" + admin_url.split("://", 1)[1])
    try:
        async with engine.begin() as sa_conn:
            await sa_conn.run_sync(metadata.create_all)
            await sa_conn.execute(sa.text(f"GRANT USAGE ON SCHEMA {KIT_SCHEMA} TO {KIT_ROLE}"))
            await sa_conn.execute(
                sa.text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {KIT_SCHEMA} TO {KIT_ROLE}")
            )
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
async def kit_db_url(admin_url: str) -> str:
    """URL of the session database as `tessera_kit_test` (non-superuser, no BYPASSRLS, not owner)."""
    await _create_kit_schema(admin_url)
    return with_user(admin_url, KIT_ROLE, KIT_PASSWORD)


@pytest.fixture
async def kit_clean(admin_conn: asyncpg.Connection, kit_db_url: str) -> asyncpg.Connection:
    """Empty kit tables at the start of a test; the superuser connection, for assertions on raw rows."""
    await admin_conn.execute(
        f"TRUNCATE {KIT_SCHEMA}.outbox, {KIT_SCHEMA}.inbox, {KIT_SCHEMA}.notes, {KIT_SCHEMA}.effects"
    )
    return admin_conn


@pytest.fixture
def kit_source() -> str:
    """An event source name of this test alone (streams are named after the source)."""
    return f"kittest{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def kit_db(kit_db_url: str, kit_source: str, kit_clean: asyncpg.Connection) -> AsyncIterator[Database]:
    """A Database of the source of this test, logged in as the kit test role."""
    db = Database(kit_db_url, service=kit_source, schema=KIT_SCHEMA, pool_size=5)
    try:
        yield db
    finally:
        await db.dispose()


async def _drop_test_streams(js: JetStreamContext, source: str, consumers: list[str]) -> None:
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(stream_name(source))
    for consumer in consumers:
        with contextlib.suppress(NotFoundError):
            await js.purge_stream(DLQ_STREAM, subject=dlq_subject(consumer))


@pytest.fixture
def dlq_consumers() -> list[str]:
    """Consumer names a test registers so that their dead letters are purged afterwards."""
    return []


@pytest.fixture
async def broker(nats_url: str, kit_source: str, dlq_consumers: list[str]) -> AsyncIterator[Broker]:
    """A connected broker on the session NATS; the test's stream and dead letters are removed afterwards."""
    b = Broker(nats_url, name=f"kit-test-{kit_source}")
    await b.connect()
    try:
        yield b
    finally:
        if b.is_connected:
            await _drop_test_streams(b.js, kit_source, dlq_consumers)
        await b.close()


def workspace_event(name: str = "Acme") -> tenancy_events_pb2.WorkspaceCreatedEvent:
    """A generated event message to carry through the outbox."""
    ws_id = str(uuid7())
    return tenancy_events_pb2.WorkspaceCreatedEvent(
        workspace=tenancy_pb2.Workspace(name=f"workspaces/{ws_id}", display_name=name)
    )


async def apply_effect(uow: UnitOfWork, consumer: str, envelope: EventEnvelope) -> None:
    """The effect of a test handler: count one application of the event (RLS: needs the event's tenant)."""
    await uow.execute(
        sa.text(
            f"INSERT INTO {KIT_SCHEMA}.effects (tenant_id, consumer, event_id, applied) "
            "VALUES (CAST(:tenant AS uuid), :consumer, CAST(:event AS uuid), 1) "
            "ON CONFLICT (consumer, event_id) DO UPDATE SET applied = effects.applied + 1"
        ),
        tenant=envelope.tenant_id,
        consumer=consumer,
        event=envelope.id,
    )


async def effects(admin: asyncpg.Connection, consumer: str) -> dict[str, int]:
    """event id -> number of times the consumer's effect was applied (read as superuser)."""
    rows = await admin.fetch(f"SELECT event_id, applied FROM {KIT_SCHEMA}.effects WHERE consumer = $1", consumer)
    return {str(row["event_id"]): row["applied"] for row in rows}


async def outbox_count(admin: asyncpg.Connection) -> int:
    return int(await admin.fetchval(f"SELECT count(*) FROM {KIT_SCHEMA}.outbox"))
