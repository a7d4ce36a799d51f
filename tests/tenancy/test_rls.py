"""Tenant isolation in the database itself (gate S03): policy coverage, role hygiene, the RLS backstop."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from migrations import runner
from services.kit.ids import uuid7

pytestmark = pytest.mark.gate("S03")

SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast")
SERVICE_ROLES = [runner.service_role(service) for service in runner.SERVICES]


async def test_every_tenant_table_has_forced_rls_and_a_tenant_policy(admin_conn: asyncpg.Connection) -> None:
    tables = await admin_conn.fetch(
        """
        SELECT n.nspname AS schema, c.relname AS table, c.relrowsecurity AS enabled, c.relforcerowsecurity AS forced,
               (SELECT count(*) FROM pg_policy p
                 WHERE p.polrelid = c.oid
                   AND (pg_get_expr(p.polqual, p.polrelid) LIKE '%tessera.tenant_id%')
                   AND (p.polcmd <> '*' OR pg_get_expr(p.polwithcheck, p.polrelid) LIKE '%tessera.tenant_id%')
               ) AS tenant_policies
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped
        WHERE c.relkind IN ('r', 'p')
          AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
          AND n.nspname NOT LIKE 'pg_temp_%'
        ORDER BY 1, 2
        """
    )
    covered = {f"{t['schema']}.{t['table']}" for t in tables}
    assert "tenancy.workspaces" in covered  # the check really sees the service tables

    offenders = [
        f"{t['schema']}.{t['table']} (enabled={t['enabled']}, forced={t['forced']}, policies={t['tenant_policies']})"
        for t in tables
        if not (t["enabled"] and t["forced"] and t["tenant_policies"] > 0)
    ]
    assert offenders == [], "tenant tables without forced RLS and a tessera.tenant_id policy"


async def test_every_tenant_table_has_an_index_leading_with_tenant_id(admin_conn: asyncpg.Connection) -> None:
    missing = await admin_conn.fetch(
        """
        SELECT n.nspname || '.' || c.relname AS table
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped
        WHERE c.relkind IN ('r', 'p')
          AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
          AND NOT EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indkey[0] = a.attnum)
        """
    )
    assert [row["table"] for row in missing] == []


@pytest.mark.parametrize("role", [runner.OWNER_ROLE, *SERVICE_ROLES])
async def test_tessera_roles_are_not_superuser_and_do_not_bypass_rls(admin_conn: asyncpg.Connection, role: str) -> None:
    row = await admin_conn.fetchrow(
        "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolcanlogin FROM pg_roles WHERE rolname = $1", role
    )
    assert row is not None, f"role {role} missing"
    assert (row["rolsuper"], row["rolbypassrls"], row["rolcreaterole"], row["rolcreatedb"]) == (False,) * 4
    assert row["rolcanlogin"] is (role != runner.OWNER_ROLE)


@pytest.mark.parametrize("role", SERVICE_ROLES)
async def test_service_role_owns_nothing_and_is_not_a_member_of_the_owner(
    admin_conn: asyncpg.Connection, role: str
) -> None:
    owned = await admin_conn.fetch(
        """
        SELECT c.relname FROM pg_class c WHERE c.relowner = (SELECT oid FROM pg_roles WHERE rolname = $1)
        UNION ALL
        SELECT n.nspname FROM pg_namespace n WHERE n.nspowner = (SELECT oid FROM pg_roles WHERE rolname = $1)
        """,
        role,
    )
    assert owned == []
    assert await admin_conn.fetchval("SELECT pg_has_role($1, $2, 'MEMBER')", role, runner.OWNER_ROLE) is False
    owner_of_tenancy = await admin_conn.fetchval(
        "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'tenancy.workspaces'::regclass"
    )
    assert owner_of_tenancy == runner.OWNER_ROLE


@pytest.mark.parametrize("service", runner.SERVICES)
async def test_service_role_has_privileges_only_on_its_own_schema(admin_conn: asyncpg.Connection, service: str) -> None:
    role = runner.service_role(service)
    schema_privileges = await admin_conn.fetch(
        """
        SELECT nspname,
               has_schema_privilege($1, oid, 'USAGE') AS usage,
               has_schema_privilege($1, oid, 'CREATE') AS create
        FROM pg_namespace
        WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') AND nspname NOT LIKE 'pg_temp_%'
          AND nspname NOT LIKE 'pg_toast_temp_%'
        """,
        role,
    )
    by_schema = {row["nspname"]: (row["usage"], row["create"]) for row in schema_privileges}
    assert by_schema[service] == (True, False)  # may use its schema, may not create objects in it
    assert "tessera_meta" in by_schema
    # `public` is PostgreSQL's default schema (USAGE for everyone, no objects of ours); nothing else is reachable.
    others = {name: grants for name, grants in by_schema.items() if name not in (service, "public") and any(grants)}
    assert others == {}
    assert by_schema.get("public", (False, False))[1] is False

    foreign_tables = await admin_conn.fetch(
        """
        SELECT n.nspname || '.' || c.relname AS table
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'v', 'm') AND n.nspname <> $2
          AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
          AND has_table_privilege($1, c.oid, 'SELECT,INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER')
        """,
        role,
        service,
    )
    assert [row["table"] for row in foreign_tables] == []


# --- the backstop: raw SQL as the tenancy login role, without the repository's own filters ----------


@pytest.fixture
async def tenancy_conn(tenancy_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(tenancy_url)
    try:
        yield conn
    finally:
        await conn.close()


async def _insert_as_admin(admin: asyncpg.Connection, *, creator: uuid.UUID) -> uuid.UUID:
    workspace_id = uuid7()
    await admin.execute(
        "INSERT INTO tenancy.workspaces (tenant_id, id, display_name, state, creator) "
        "VALUES ($1, $1, $2, 'ACTIVE', $3)",
        workspace_id,
        f"ws {workspace_id}",
        creator,
    )
    return workspace_id


async def _set_context(conn: asyncpg.Connection, *, tenant: uuid.UUID | None, subject: uuid.UUID | None) -> None:
    await conn.execute(
        "SELECT set_config('tessera.tenant_id', $1, true), set_config('tessera.subject', $2, true)",
        str(tenant) if tenant else "",
        str(subject) if subject else "",
    )


async def test_rls_hides_and_protects_other_tenants_rows(
    admin_conn: asyncpg.Connection, tenancy_conn: asyncpg.Connection
) -> None:
    tenant_a = await _insert_as_admin(admin_conn, creator=uuid7())
    tenant_b = await _insert_as_admin(admin_conn, creator=uuid7())
    outsider = uuid7()

    async with tenancy_conn.transaction():
        await _set_context(tenancy_conn, tenant=tenant_a, subject=outsider)
        visible = await tenancy_conn.fetch("SELECT id FROM tenancy.workspaces")
        of_b = await tenancy_conn.fetch("SELECT id FROM tenancy.workspaces WHERE tenant_id = $1", tenant_b)
        updated = await tenancy_conn.execute(
            "UPDATE tenancy.workspaces SET display_name = 'pwned' WHERE id = $1", tenant_b
        )
        deleted = await tenancy_conn.execute("DELETE FROM tenancy.workspaces WHERE id = $1", tenant_b)

    assert [row["id"] for row in visible] == [tenant_a]
    assert of_b == []
    assert (updated, deleted) == ("UPDATE 0", "DELETE 0")
    assert await admin_conn.fetchval("SELECT display_name FROM tenancy.workspaces WHERE id = $1", tenant_b) != "pwned"


async def test_rls_rejects_writing_a_row_into_another_tenant(
    admin_conn: asyncpg.Connection, tenancy_conn: asyncpg.Connection
) -> None:
    tenant_a = await _insert_as_admin(admin_conn, creator=uuid7())
    tenant_b = uuid7()
    outsider = uuid7()

    async def as_tenant_a(statement: str, *args: object) -> None:
        async with tenancy_conn.transaction():
            await _set_context(tenancy_conn, tenant=tenant_a, subject=outsider)
            await tenancy_conn.execute(statement, *args)

    insert = (
        "INSERT INTO tenancy.workspaces (tenant_id, id, display_name, state, creator) "
        "VALUES ($1, $1, 'intruder', 'ACTIVE', $2)"
    )
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        await as_tenant_a(insert, tenant_b, uuid7())
    move = "UPDATE tenancy.workspaces SET tenant_id = $2, id = $2 WHERE id = $1"
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        await as_tenant_a(move, tenant_a, tenant_b)
    assert await admin_conn.fetchval("SELECT count(*) FROM tenancy.workspaces WHERE id = $1", tenant_b) == 0


async def test_no_tenant_and_no_subject_sees_nothing(
    admin_conn: asyncpg.Connection, tenancy_conn: asyncpg.Connection
) -> None:
    await _insert_as_admin(admin_conn, creator=uuid7())

    async with tenancy_conn.transaction():
        await _set_context(tenancy_conn, tenant=None, subject=None)
        with_empty_settings = await tenancy_conn.fetchval("SELECT count(*) FROM tenancy.workspaces")
    never_set = await tenancy_conn.fetchval("SELECT count(*) FROM tenancy.workspaces")

    assert with_empty_settings == 0
    assert never_set == 0
    assert await admin_conn.fetchval("SELECT count(*) FROM tenancy.workspaces") > 0


async def test_creator_clause_shows_only_the_subjects_own_workspaces(
    admin_conn: asyncpg.Connection, tenancy_conn: asyncpg.Connection
) -> None:
    user = uuid7()
    own = {await _insert_as_admin(admin_conn, creator=user) for _ in range(2)}
    await _insert_as_admin(admin_conn, creator=uuid7())

    async with tenancy_conn.transaction():
        await _set_context(tenancy_conn, tenant=None, subject=user)
        visible = {row["id"] for row in await tenancy_conn.fetch("SELECT id FROM tenancy.workspaces")}

    assert visible == own


async def test_service_role_cannot_switch_off_rls_or_become_the_owner(tenancy_conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await tenancy_conn.execute("ALTER TABLE tenancy.workspaces DISABLE ROW LEVEL SECURITY")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await tenancy_conn.execute(f"SET ROLE {runner.OWNER_ROLE}")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await tenancy_conn.execute("CREATE TABLE tenancy.sneaky (id int)")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await tenancy_conn.fetch("SELECT * FROM tessera_meta.alembic_version")
