"""Tenant isolation in the database itself (gate S03): policy coverage, role hygiene, the RLS backstop."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from migrations import runner
from services.kit.db import Database
from services.kit.ids import uuid7
from services.kit.principal import Principal
from services.tenancy.repository import (
    AuditRepository,
    InvitationRepository,
    MemberRepository,
    WorkspaceRepository,
)

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
    # The check really sees the service tables.
    assert {"tenancy.workspaces", "tenancy.members", "tenancy.invitations", "tenancy.audit_log"} <= covered

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


TENANT_TABLES = ("workspaces", "members", "invitations", "audit_log")


async def _tenant_as_admin(admin: asyncpg.Connection, *, owner: uuid.UUID | None = None) -> uuid.UUID:
    """A workspace with one row in every tenant table (inserted as superuser, which bypasses RLS)."""
    workspace_id = uuid7()
    owner = owner or uuid7()
    await admin.execute(
        "INSERT INTO tenancy.workspaces (tenant_id, id, display_name, state, creator) "
        "VALUES ($1, $1, $2, 'ACTIVE', $3)",
        workspace_id,
        f"ws {workspace_id}",
        owner,
    )
    await admin.execute(
        "INSERT INTO tenancy.members (tenant_id, user_id, role) VALUES ($1, $2, 'owner')", workspace_id, owner
    )
    await admin.execute(
        "INSERT INTO tenancy.invitations (tenant_id, id, email, role, state, token_hash, inviter, expire_time) "
        "VALUES ($1, $2, 'x@example.com', 'member', 'PENDING', $3, $4, now() + interval '1 day')",
        workspace_id,
        uuid7(),
        uuid.uuid4().bytes * 2,
        f"users/{owner}",
    )
    await admin.execute(
        "INSERT INTO tenancy.audit_log (tenant_id, id, action, actor, target) VALUES ($1, $2, 'test', 'users/x', 'y')",
        workspace_id,
        uuid7(),
    )
    return workspace_id


async def _set_context(conn: asyncpg.Connection, *, tenant: uuid.UUID | None, subject: uuid.UUID | None) -> None:
    await conn.execute(
        "SELECT set_config('tessera.tenant_id', $1, true), set_config('tessera.subject', $2, true)",
        str(tenant) if tenant else "",
        str(subject) if subject else "",
    )


async def _execute_as(
    conn: asyncpg.Connection, statement: str, *args: object, tenant: uuid.UUID | None, subject: uuid.UUID | None
) -> str:
    """One statement in its own transaction with the given RLS context; returns the command status."""
    async with conn.transaction():
        await _set_context(conn, tenant=tenant, subject=subject)
        return await conn.execute(statement, *args)  # type: ignore[no-any-return]  # asyncpg is untyped


@pytest.mark.parametrize("table", TENANT_TABLES)
async def test_rls_hides_and_protects_other_tenants_rows(
    admin_conn: asyncpg.Connection, tenancy_conn: asyncpg.Connection, table: str
) -> None:
    tenant_a = await _tenant_as_admin(admin_conn)
    tenant_b = await _tenant_as_admin(admin_conn)
    outsider = uuid7()

    async with tenancy_conn.transaction():
        await _set_context(tenancy_conn, tenant=tenant_a, subject=outsider)
        visible = await tenancy_conn.fetch(f"SELECT DISTINCT tenant_id FROM tenancy.{table}")
        of_b = await tenancy_conn.fetch(f"SELECT * FROM tenancy.{table} WHERE tenant_id = $1", tenant_b)
        if table != "audit_log":  # append-only: the service role may not UPDATE it at all
            updated = await tenancy_conn.execute(
                f"UPDATE tenancy.{table} SET tenant_id = tenant_id WHERE tenant_id = $1", tenant_b
            )
            assert updated == "UPDATE 0"
        if table == "members":  # the only tenant table the service role may DELETE from
            deleted = await tenancy_conn.execute("DELETE FROM tenancy.members WHERE tenant_id = $1", tenant_b)
            assert deleted == "DELETE 0"

    assert [row["tenant_id"] for row in visible] == [tenant_a]
    assert of_b == []
    assert await admin_conn.fetchval(f"SELECT count(*) FROM tenancy.{table} WHERE tenant_id = $1", tenant_b) == 1


async def test_rls_rejects_writing_rows_into_another_tenant(
    admin_conn: asyncpg.Connection, tenancy_conn: asyncpg.Connection
) -> None:
    tenant_a = await _tenant_as_admin(admin_conn)
    tenant_b = await _tenant_as_admin(admin_conn)
    outsider = uuid7()

    async def as_tenant_a(statement: str, *args: object) -> None:
        async with tenancy_conn.transaction():
            await _set_context(tenancy_conn, tenant=tenant_a, subject=outsider)
            await tenancy_conn.execute(statement, *args)

    writes = [
        (
            "INSERT INTO tenancy.workspaces (tenant_id, id, display_name, state, creator) "
            "VALUES ($1, $1, 'intruder', 'ACTIVE', $2)",
            (uuid7(), outsider),
        ),
        ("UPDATE tenancy.workspaces SET tenant_id = $2, id = $2 WHERE id = $1", (tenant_a, uuid7())),
        ("INSERT INTO tenancy.members (tenant_id, user_id, role) VALUES ($1, $2, 'owner')", (tenant_b, outsider)),
        ("UPDATE tenancy.members SET tenant_id = $2 WHERE tenant_id = $1", (tenant_a, tenant_b)),
        (
            "INSERT INTO tenancy.invitations (tenant_id, id, email, role, state, token_hash, inviter, expire_time) "
            "VALUES ($1, $2, 'x@example.com', 'admin', 'PENDING', $3, 'users/x', now() + interval '1 day')",
            (tenant_b, uuid7(), uuid.uuid4().bytes * 2),
        ),
        ("UPDATE tenancy.invitations SET tenant_id = $2 WHERE tenant_id = $1", (tenant_a, tenant_b)),
        (
            "INSERT INTO tenancy.audit_log (tenant_id, id, action, actor, target) VALUES ($1, $2, 'x', 'y', 'z')",
            (tenant_b, uuid7()),
        ),
    ]
    for statement, args in writes:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await as_tenant_a(statement, *args)
    for table in TENANT_TABLES:
        count = await admin_conn.fetchval(f"SELECT count(*) FROM tenancy.{table} WHERE tenant_id = $1", tenant_b)
        assert count == 1, table


async def test_service_role_cannot_hard_delete_workspaces_or_rewrite_the_audit_log(
    admin_conn: asyncpg.Connection, tenancy_conn: asyncpg.Connection
) -> None:
    tenant = await _tenant_as_admin(admin_conn)
    for statement in (
        "DELETE FROM tenancy.workspaces WHERE id = $1",
        "DELETE FROM tenancy.audit_log WHERE tenant_id = $1",
        "UPDATE tenancy.audit_log SET action = 'forged' WHERE tenant_id = $1",
        "DELETE FROM tenancy.invitations WHERE tenant_id = $1",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await _execute_as(tenancy_conn, statement, tenant, tenant=tenant, subject=None)


async def test_no_tenant_and_no_subject_sees_nothing(
    admin_conn: asyncpg.Connection, tenancy_conn: asyncpg.Connection
) -> None:
    await _tenant_as_admin(admin_conn)

    for table in TENANT_TABLES:
        async with tenancy_conn.transaction():
            await _set_context(tenancy_conn, tenant=None, subject=None)
            with_empty_settings = await tenancy_conn.fetchval(f"SELECT count(*) FROM tenancy.{table}")
        never_set = await tenancy_conn.fetchval(f"SELECT count(*) FROM tenancy.{table}")
        assert (with_empty_settings, never_set) == (0, 0), table
        assert await admin_conn.fetchval(f"SELECT count(*) FROM tenancy.{table}") > 0


async def test_a_user_sees_own_memberships_and_their_workspaces_but_writes_nothing_without_a_tenant(
    admin_conn: asyncpg.Connection, tenancy_conn: asyncpg.Connection
) -> None:
    user = uuid7()
    own = {await _tenant_as_admin(admin_conn, owner=user) for _ in range(2)}
    created_then_left = await _tenant_as_admin(admin_conn, owner=user)
    await admin_conn.execute("DELETE FROM tenancy.members WHERE tenant_id = $1", created_then_left)
    await _tenant_as_admin(admin_conn)  # someone else's

    async with tenancy_conn.transaction():
        await _set_context(tenancy_conn, tenant=None, subject=user)
        workspaces = {row["id"] for row in await tenancy_conn.fetch("SELECT id FROM tenancy.workspaces")}
        memberships = {row["tenant_id"] for row in await tenancy_conn.fetch("SELECT tenant_id FROM tenancy.members")}
        invitations = await tenancy_conn.fetchval("SELECT count(*) FROM tenancy.invitations")
        audit = await tenancy_conn.fetchval("SELECT count(*) FROM tenancy.audit_log")

    # Membership, not creation, decides: the workspace the user created and left is gone from view.
    assert workspaces == memberships == own
    assert (invitations, audit) == (0, 0)
    # Reading is all a user-level context may do: writes need the tenant.
    # Own memberships are visible for SELECT only: UPDATE and DELETE do not even see them.
    for statement, status in (
        ("DELETE FROM tenancy.members WHERE user_id = $1", "DELETE 0"),
        ("UPDATE tenancy.members SET role = 'viewer' WHERE user_id = $1", "UPDATE 0"),
    ):
        assert await _execute_as(tenancy_conn, statement, user, tenant=None, subject=user) == status
    for statement, args in (
        ("UPDATE tenancy.workspaces SET display_name = 'x' WHERE id = ANY($1)", (list(own),)),
        ("INSERT INTO tenancy.members (tenant_id, user_id, role) VALUES ($1, $2, 'owner')", (created_then_left, user)),
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await _execute_as(tenancy_conn, statement, *args, tenant=None, subject=user)


async def test_repositories_under_a_foreign_tenant_read_nothing_and_write_nothing(
    admin_conn: asyncpg.Connection, tenancy_db: Database
) -> None:
    """The service-layer check bypassed: repositories called directly, in tenant A's unit of work, about B."""
    tenant_a = await _tenant_as_admin(admin_conn)
    owner_b = uuid7()
    tenant_b = await _tenant_as_admin(admin_conn, owner=owner_b)
    caller = Principal(subject=str(uuid7()), tenant_id=str(tenant_a), role="owner")

    async with tenancy_db.unit_of_work(caller) as uow:
        assert await WorkspaceRepository(uow).get_live(workspace_id=tenant_b) is None
        assert await WorkspaceRepository(uow).lock(workspace_id=tenant_b) is None
        assert (
            await WorkspaceRepository(uow).soft_delete(workspace_id=tenant_b, restore_window=timedelta(days=1)) is None
        )
        assert await MemberRepository(uow).page(workspace_id=tenant_b, after=None, limit=10) == []
        assert await MemberRepository(uow).get(workspace_id=tenant_b, user_id=owner_b) is None
        assert await MemberRepository(uow).count_owners(workspace_id=tenant_b) == 0
        assert await MemberRepository(uow).delete(workspace_id=tenant_b, user_id=owner_b) is None
        assert await InvitationRepository(uow).page(workspace_id=tenant_b, after=None, limit=10) == []
        assert await AuditRepository(uow).page(workspace_id=tenant_b, after=None, limit=10) == []

    writes = [
        lambda uow: MemberRepository(uow).insert(workspace_id=tenant_b, user_id=uuid7(), role="owner"),
        lambda uow: InvitationRepository(uow).insert(
            workspace_id=tenant_b,
            email="x@example.com",
            role="admin",
            token_hash=bytes(32),
            inviter="users/x",
            ttl=timedelta(days=1),
        ),
        lambda uow: AuditRepository(uow).record(
            workspace_id=tenant_b, action="forged", actor="users/x", target="y", before=None, after=None, request_id=""
        ),
    ]
    for write in writes:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            async with tenancy_db.unit_of_work(caller) as uow:
                await write(uow)

    for table in TENANT_TABLES:
        count = await admin_conn.fetchval(f"SELECT count(*) FROM tenancy.{table} WHERE tenant_id = $1", tenant_b)
        assert count == 1, table
    assert await admin_conn.fetchval("SELECT purge_time FROM tenancy.workspaces WHERE id = $1", tenant_b) is None


async def test_service_role_cannot_switch_off_rls_or_become_the_owner(tenancy_conn: asyncpg.Connection) -> None:
    for table in TENANT_TABLES:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await tenancy_conn.execute(f"ALTER TABLE tenancy.{table} DISABLE ROW LEVEL SECURITY")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await tenancy_conn.execute(f"SET ROLE {runner.OWNER_ROLE}")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await tenancy_conn.execute("CREATE TABLE tenancy.sneaky (id int)")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await tenancy_conn.fetch("SELECT * FROM tessera_meta.alembic_version")
