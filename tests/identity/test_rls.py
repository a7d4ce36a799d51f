"""Tenant isolation of identity's tenant tables in the database itself (gate S03): the RLS backstop.

Raw SQL and the repositories as `tessera_identity`, without the service's own tenant checks.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
import sqlalchemy as sa

from services.identity.models import api_keys
from services.identity.repository import ApiKeyRepository
from services.kit.db import Database
from services.kit.principal import Principal

pytestmark = pytest.mark.gate("S03")


@pytest.fixture
async def identity_conn(identity_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(identity_url)
    try:
        yield conn
    finally:
        await conn.close()


async def _context(conn: asyncpg.Connection, *, tenant: uuid.UUID | None, subject: uuid.UUID | None) -> None:
    await conn.execute(
        "SELECT set_config('tessera.tenant_id', $1, true), set_config('tessera.subject', $2, true)",
        str(tenant) if tenant else "",
        str(subject) if subject else "",
    )


async def _as(
    conn: asyncpg.Connection, tenant: uuid.UUID | None, subject: uuid.UUID | None, statement: str, *args: object
) -> None:
    """Run one statement in a transaction of its own under a tenant context."""
    async with conn.transaction():
        await _context(conn, tenant=tenant, subject=subject)
        await conn.execute(statement, *args)


async def _api_key_as_admin(admin: asyncpg.Connection, tenant: uuid.UUID) -> uuid.UUID:
    key_id = uuid.uuid4()
    await admin.execute(
        "INSERT INTO identity.api_keys (tenant_id, id, display_name, role, key_hash, prefix, created_by, create_time) "
        "VALUES ($1, $2, 'k', 'viewer', $3, 'tsk_x', $4, now())",
        tenant,
        key_id,
        uuid.uuid4().bytes,
        uuid.uuid4(),
    )
    return key_id


async def test_api_keys_of_another_tenant_are_invisible_and_untouchable(
    admin_conn: asyncpg.Connection, identity_conn: asyncpg.Connection
) -> None:
    tenant_a, tenant_b = uuid.uuid4(), uuid.uuid4()
    mine = await _api_key_as_admin(admin_conn, tenant_a)
    theirs = await _api_key_as_admin(admin_conn, tenant_b)

    async with identity_conn.transaction():
        await _context(identity_conn, tenant=tenant_a, subject=uuid.uuid4())
        visible = await identity_conn.fetch("SELECT id FROM identity.api_keys")
        updated = await identity_conn.execute("UPDATE identity.api_keys SET revoke_time = now() WHERE id = $1", theirs)
        deleted = await identity_conn.execute("DELETE FROM identity.api_keys WHERE id = $1", theirs)

    assert [row["id"] for row in visible] == [mine]
    assert (updated, deleted) == ("UPDATE 0", "DELETE 0")
    assert await admin_conn.fetchval("SELECT revoke_time FROM identity.api_keys WHERE id = $1", theirs) is None

    insert = (
        "INSERT INTO identity.api_keys (tenant_id, id, display_name, role, key_hash, prefix, created_by, create_time) "
        "VALUES ($1, $2, 'x', 'admin', $3, 'tsk_y', $2, now())"
    )
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        await _as(identity_conn, tenant_a, None, insert, tenant_b, uuid.uuid4(), uuid.uuid4().bytes)


async def test_without_a_tenant_no_api_key_is_visible(
    identity_database: Database, admin_conn: asyncpg.Connection
) -> None:
    tenant = uuid.uuid4()
    await _api_key_as_admin(admin_conn, tenant)
    async with identity_database.unit_of_work(None) as uow:
        rows = await uow.fetch(sa.select(api_keys.c.id))
    assert rows == []


async def test_the_repository_under_a_foreign_tenant_finds_nothing(
    identity_database: Database, admin_conn: asyncpg.Connection
) -> None:
    victim = uuid.uuid4()
    key_id = await _api_key_as_admin(admin_conn, victim)
    intruder = Principal(subject=str(uuid.uuid4()), tenant_id=str(uuid.uuid4()))

    # The repository is asked for the victim's workspace, but the transaction is in the intruder's tenant.
    async with identity_database.unit_of_work(intruder) as uow:
        listed = await ApiKeyRepository(uow).list(workspace_id=victim)
        revoked = await ApiKeyRepository(uow).revoke(workspace_id=victim, key_id=key_id, now=datetime.now(UTC))
    assert listed == []
    assert revoked is None
    assert await admin_conn.fetchval("SELECT revoke_time FROM identity.api_keys WHERE id = $1", key_id) is None


async def test_audit_rows_are_visible_to_their_tenant_or_their_actor_only(
    admin_conn: asyncpg.Connection, identity_conn: asyncpg.Connection
) -> None:
    tenant_a, tenant_b, alice, bob = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    rows = {
        "a": (tenant_a, alice),
        "b": (tenant_b, bob),
        "alice": (None, alice),
        "bob": (None, bob),
    }
    ids = {}
    for label, (tenant, actor) in rows.items():
        ids[label] = uuid.uuid4()
        await admin_conn.execute(
            "INSERT INTO identity.audit_log (tenant_id, id, action, actor) VALUES ($1, $2, $3, $4)",
            tenant,
            ids[label],
            f"test.{label}",
            actor,
        )
    wanted = list(ids.values())

    async with identity_conn.transaction():
        await _context(identity_conn, tenant=tenant_a, subject=alice)
        seen = {
            row["id"]
            for row in await identity_conn.fetch("SELECT id FROM identity.audit_log WHERE id = ANY($1)", wanted)
        }
    assert seen == {ids["a"], ids["alice"]}

    async with identity_conn.transaction():
        await _context(identity_conn, tenant=None, subject=None)
        anonymous = await identity_conn.fetch("SELECT id FROM identity.audit_log WHERE id = ANY($1)", wanted)
        # Anyone may append a user-level row (a failed sign-in has no subject yet) ...
        await identity_conn.execute(
            "INSERT INTO identity.audit_log (tenant_id, id, action) VALUES (NULL, $1, 'test.anonymous')", uuid.uuid4()
        )
    assert anonymous == []

    # ... but not into a tenant other than the transaction's, and nobody may rewrite the log.
    forged = "INSERT INTO identity.audit_log (tenant_id, id, action) VALUES ($1, $2, 'test.forged')"
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        await _as(identity_conn, tenant_a, alice, forged, tenant_b, uuid.uuid4())
    for statement in ("UPDATE identity.audit_log SET action = 'x'", "DELETE FROM identity.audit_log"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await _as(identity_conn, tenant_a, alice, statement)
