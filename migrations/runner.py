"""Run the Alembic migrations: bootstrap the roles, upgrade, downgrade, the round trip check and the lint.

Roles (cluster-wide, shared by every database on the server):
- `tessera_owner` (NOLOGIN, no superuser, no BYPASSRLS) owns every schema, table and policy. The admin
  that runs migrations switches to it with `SET ROLE tessera_owner` before the first statement, so
  nothing a migration creates is owned by the admin.
- `tessera_<service>` (LOGIN, NOINHERIT, no superuser, no BYPASSRLS, owns nothing) is the role each
  service logs in with; a migration grants it what it needs on its own schema only.

A run (ADR 0009) is one admin session: it takes the session-level advisory lock `MIGRATION_LOCK_KEY`
(polling, so a waiting migrator holds no snapshot that a concurrent index build would wait for), sets
`ROLE tessera_owner`, `lock_timeout` and `statement_timeout` for the session, then applies each pending
revision in its own transaction. A revision may commit part of its work early with
`op.get_context().autocommit_block()` (batched backfills, `CREATE INDEX CONCURRENTLY`, `VALIDATE
CONSTRAINT`); see migrations/online.py.

The Alembic version table lives in the schema `tessera_meta` (owned by `tessera_owner`). Every entry
point here is synchronous (the CLI and the test fixtures call it); the work runs on asyncpg through
SQLAlchemy's async engine, in a worker thread when the caller already runs an event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from migrations.online import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BATCH_TIMEOUT,
    OPTIONS_ATTRIBUTE,
    BackfillProgress,
    OnlineOptions,
    check_duration,
)
from services.kit.db import with_user

SERVICES: tuple[str, ...] = ("tenancy", "identity", "workflow")
OWNER_ROLE = "tessera_owner"
META_SCHEMA = "tessera_meta"
VERSION_TABLE = "alembic_version"
RUN_OPTIONS_ATTRIBUTE = "tessera.migration_options"
SCRIPT_LOCATION = Path(__file__).resolve().parent
# Serialises concurrent `upgrade`/`downgrade` runs on one database (advisory locks are per database).
MIGRATION_LOCK_KEY = 0x7E55E2A_0001
LOCK_POLL_SECONDS = 0.2

log = logging.getLogger(__name__)
T = TypeVar("T")


class MigrationError(RuntimeError):
    """A migration run or the round trip check failed; the message says what differed."""


def service_role(service: str) -> str:
    """The login role of a service, e.g. `tessera_tenancy`."""
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; known: {', '.join(SERVICES)}")
    return f"tessera_{service}"


def service_url(admin_url: str, service: str, *, password: str | None = None) -> str:
    """The same server and database as admin_url, logged in as the service's login role."""
    return with_user(admin_url, service_role(service), password)


def _async_url(url: str) -> str:
    scheme, rest = url.split("://", 1)
    if scheme in ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2"):
        return f"postgresql+asyncpg://{rest}"
    return url


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code, even inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tessera-migrate") as executor:
        return executor.submit(asyncio.run, coro).result()


async def _with_connection(admin_url: str, work: Callable[[Connection], T]) -> T:
    """Open one admin connection and run `work(sync_connection)` in one transaction, then commit."""
    engine = create_async_engine(_async_url(admin_url), poolclass=pool.NullPool)
    try:
        async with engine.connect() as conn:
            await conn.begin()
            result = await conn.run_sync(work)
            await conn.commit()
            return result
    finally:
        await engine.dispose()


@dataclass(frozen=True, slots=True)
class LockWait:
    """The migration lock is held by another session: this run waits for it."""

    holder_pid: int | None

    def __str__(self) -> str:
        holder = f"backend pid {self.holder_pid}" if self.holder_pid else "another session"
        return f"waiting for the migration lock, held by {holder} (another `tessera migrate` run)"


Progress = BackfillProgress | LockWait


@dataclass(frozen=True, slots=True)
class MigrationOptions:
    """How a run behaves: session timeouts, backfill batches, where progress goes (default: the log)."""

    lock_timeout: str = "5s"
    statement_timeout: str = "60s"
    batch_size: int = DEFAULT_BATCH_SIZE
    batch_timeout: str = DEFAULT_BATCH_TIMEOUT
    progress: Callable[[Progress], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_duration(self.lock_timeout, name="lock_timeout")
        check_duration(self.statement_timeout, name="statement_timeout")
        self.online()  # validates batch_size and batch_timeout

    def report(self, event: Progress) -> None:
        if self.progress is not None:
            self.progress(event)
        else:
            log.info("%s", event)

    def online(self) -> OnlineOptions:
        return OnlineOptions(batch_size=self.batch_size, batch_timeout=self.batch_timeout, progress=self.report)

    def session_statements(self) -> list[str]:
        """What a migration session runs after taking the lock (also printed by offline `--sql` runs)."""
        return [
            f"SET ROLE {OWNER_ROLE}",
            f"SET lock_timeout = '{self.lock_timeout}'",
            f"SET statement_timeout = '{self.statement_timeout}'",
        ]


_LOCK_HOLDER = """
SELECT pid FROM pg_catalog.pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 1
  AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
  AND classid::bigint = :classid AND objid::bigint = :objid
LIMIT 1
"""


async def _acquire_migration_lock(conn: AsyncConnection, options: MigrationOptions) -> None:
    """Take the session-level migration lock, polling: a blocked `pg_advisory_lock` call would hold a
    snapshot, and `CREATE INDEX CONCURRENTLY` in the running migration would wait for it (deadlock)."""
    reported = False
    while True:
        acquired = (
            await conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        ).scalar_one()
        holder = None
        if not acquired and not reported:
            # A bigint advisory key shows in pg_locks as its high (classid) and low (objid) 32 bits.
            key = {"classid": MIGRATION_LOCK_KEY >> 32, "objid": MIGRATION_LOCK_KEY & 0xFFFFFFFF}
            holder = (await conn.execute(sa.text(_LOCK_HOLDER), key)).scalar_one_or_none()
        await conn.commit()
        if acquired:
            return
        if not reported:
            options.report(LockWait(holder))
            reported = True
        await asyncio.sleep(LOCK_POLL_SECONDS)


async def _release_migration_lock(conn: AsyncConnection) -> None:
    """Give the lock back and leave the owner role (closing the session would release them as well)."""
    try:
        await conn.rollback()
        await conn.execute(sa.text("RESET ROLE"))
        await conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
        await conn.commit()
    except sa.exc.SQLAlchemyError as exc:  # a broken session: the server drops its locks when it ends
        log.warning("could not release the migration lock explicitly (%s); closing the session releases it", exc)


async def _migration_session(admin_url: str, work: Callable[[Connection], T], options: MigrationOptions) -> T:
    """One admin session holding the migration lock, as `tessera_owner`, with the session timeouts.

    `work` gets the connection outside any transaction: Alembic opens one per revision
    (`transaction_per_migration`) and revisions may commit early in an autocommit block.
    """
    engine = create_async_engine(_async_url(admin_url), poolclass=pool.NullPool)
    try:
        async with engine.connect() as conn:
            await _acquire_migration_lock(conn, options)
            try:
                for statement in options.session_statements():
                    await conn.execute(sa.text(statement))
                await conn.commit()  # SET (not SET LOCAL) outlives the transaction: it is the session's
                return await conn.run_sync(work)
            finally:
                await _release_migration_lock(conn)
    finally:
        await engine.dispose()


def run_in_migration_session(
    admin_url: str, work: Callable[[Connection], T], options: MigrationOptions | None = None
) -> T:
    """Run `work` in a migration session (what `upgrade`/`downgrade` and the plain alembic CLI use)."""
    return _run(_migration_session(admin_url, work, options or MigrationOptions()))


# --- bootstrap -----------------------------------------------------------------------------------------

_ENSURE_ROLE = """
DO $bootstrap$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{role}') THEN
        CREATE ROLE {role} {attributes};
    END IF;
EXCEPTION
    -- another session created it between the check and CREATE ROLE (roles are cluster-wide)
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$bootstrap$
"""

_ROLE_ATTRIBUTES = (
    "rolsuper",
    "rolbypassrls",
    "rolcreaterole",
    "rolcreatedb",
    "rolcanlogin",
    "rolinherit",
    "rolreplication",
)


@dataclass(frozen=True, slots=True)
class _RoleSpec:
    name: str
    login: bool
    inherit: bool

    @property
    def attributes(self) -> str:
        return " ".join(
            [
                "LOGIN" if self.login else "NOLOGIN",
                "INHERIT" if self.inherit else "NOINHERIT",
                "NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB NOREPLICATION",
            ]
        )

    def expected(self) -> dict[str, bool]:
        return {
            "rolsuper": False,
            "rolbypassrls": False,
            "rolcreaterole": False,
            "rolcreatedb": False,
            "rolcanlogin": self.login,
            "rolinherit": self.inherit,
            "rolreplication": False,
        }


def _role_specs() -> list[_RoleSpec]:
    return [
        _RoleSpec(OWNER_ROLE, login=False, inherit=True),
        *(_RoleSpec(service_role(service), login=True, inherit=False) for service in SERVICES),
    ]


async def _bootstrap(admin_url: str, passwords: Mapping[str, str]) -> None:
    engine = create_async_engine(_async_url(admin_url), poolclass=pool.NullPool)
    try:
        # Roles are created in their own autocommitted statements: a concurrent session creating the
        # same role must not abort the rest of this bootstrap.
        async with engine.connect() as raw:
            conn = await raw.execution_options(isolation_level="AUTOCOMMIT")
            for spec in _role_specs():
                await conn.execute(sa.text(_ENSURE_ROLE.format(role=spec.name, attributes=spec.attributes)))
                await _enforce_role_attributes(conn, spec)
            for service, password in passwords.items():
                role = service_role(service)
                await conn.execute(sa.text(f"ALTER ROLE {role} PASSWORD {_quote_literal(password)}"))
            database = (await conn.execute(sa.text("SELECT current_database()"))).scalar_one()
            await conn.execute(sa.text(f"GRANT CREATE ON DATABASE {_quote_ident(database)} TO {OWNER_ROLE}"))
            is_member = (
                await conn.execute(sa.text(f"SELECT pg_has_role(current_user, '{OWNER_ROLE}', 'MEMBER')"))
            ).scalar_one()
            if not is_member:
                try:
                    await conn.execute(sa.text(f"GRANT {OWNER_ROLE} TO CURRENT_USER"))
                except sa.exc.DBAPIError as exc:
                    raise MigrationError(
                        f"the admin role cannot become a member of {OWNER_ROLE} (it needs ADMIN OPTION on it, "
                        f"e.g. because another admin created it); as a superuser run "
                        f"`GRANT {OWNER_ROLE} TO <admin role>`, then retry"
                    ) from exc
            await conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {META_SCHEMA} AUTHORIZATION {OWNER_ROLE}"))
            await conn.execute(sa.text(f"ALTER SCHEMA {META_SCHEMA} OWNER TO {OWNER_ROLE}"))
    finally:
        await engine.dispose()


async def _enforce_role_attributes(conn: AsyncConnection, spec: _RoleSpec) -> None:
    """Bring an existing role (maybe made by hand) back to the attributes Tessera relies on."""
    columns = ", ".join(_ROLE_ATTRIBUTES)
    row = (
        await conn.execute(sa.text(f"SELECT {columns} FROM pg_catalog.pg_roles WHERE rolname = :r"), {"r": spec.name})
    ).one()
    if dict(row._mapping) != spec.expected():
        log.warning("role %s had unexpected attributes; resetting them", spec.name)
        await conn.execute(sa.text(f"ALTER ROLE {spec.name} {spec.attributes}"))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def bootstrap(admin_url: str, *, passwords: Mapping[str, str] | None = None) -> None:
    """Create (idempotently) the owner and service roles, the owner's grants and the `tessera_meta` schema.

    admin_url must log in as a superuser or a role with CREATEROLE that owns the database. `passwords`
    maps service names to login passwords (production); by default the roles get none (local trust).
    """
    _run(_bootstrap(admin_url, passwords or {}))


# --- alembic ---------------------------------------------------------------------------------------------


def alembic_config() -> Config:
    """The Alembic configuration of Tessera (no alembic.ini needed; the connection is passed in)."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", str(SCRIPT_LOCATION / "versions"))
    return config


def heads() -> list[str]:
    """The head revision(s) of the migration scripts."""
    return list(ScriptDirectory.from_config(alembic_config()).get_heads())


def _alembic(admin_url: str, action: str, revision: str, options: MigrationOptions | None) -> None:
    config = alembic_config()
    options = options or MigrationOptions()
    config.attributes[OPTIONS_ATTRIBUTE] = options.online()
    config.attributes[RUN_OPTIONS_ATTRIBUTE] = options

    def work(connection: Connection) -> None:
        config.attributes["connection"] = connection
        if action == "upgrade":
            command.upgrade(config, revision)
        else:
            command.downgrade(config, revision)

    run_in_migration_session(admin_url, work, options)


def upgrade(admin_url: str, revision: str = "head", *, options: MigrationOptions | None = None) -> None:
    """Upgrade the database to `revision`, as `tessera_owner`, one transaction per revision."""
    _alembic(admin_url, "upgrade", revision, options)


def downgrade(admin_url: str, revision: str, *, options: MigrationOptions | None = None) -> None:
    """Downgrade the database to `revision` (`base` removes every Tessera schema), one transaction per revision."""
    _alembic(admin_url, "downgrade", revision, options)


def migrate(admin_url: str, revision: str = "head", *, options: MigrationOptions | None = None) -> None:
    """Bootstrap the roles, then upgrade to `revision`: what `tessera migrate` runs."""
    bootstrap(admin_url)
    upgrade(admin_url, revision, options=options)


def current(admin_url: str) -> str | None:
    """The revision the database is at (None before the first upgrade)."""

    def work(connection: Connection) -> str | None:
        context = MigrationContext.configure(
            connection, opts={"version_table_schema": META_SCHEMA, "version_table": VERSION_TABLE}
        )
        return context.get_current_revision()

    return _run(_with_connection(admin_url, work))


# --- schema snapshot and round trip ----------------------------------------------------------------------

_NON_SYSTEM = (
    "n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') AND n.nspname NOT LIKE 'pg_temp_%' "
    "AND n.nspname NOT LIKE 'pg_toast_temp_%'"
)

_SNAPSHOT_QUERIES: dict[str, str] = {
    "schemas": f"""
        SELECT n.nspname, pg_get_userbyid(n.nspowner), coalesce(n.nspacl::text, '')
        FROM pg_namespace n WHERE {_NON_SYSTEM} ORDER BY 1""",
    "relations": f"""
        SELECT n.nspname, c.relname, c.relkind::text, pg_get_userbyid(c.relowner),
               c.relrowsecurity, c.relforcerowsecurity, coalesce(c.relacl::text, ''),
               coalesce(obj_description(c.oid, 'pg_class'), '')
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {_NON_SYSTEM} AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') ORDER BY 1, 2""",
    "columns": f"""
        SELECT n.nspname, c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               coalesce(pg_get_expr(d.adbin, d.adrelid), ''), coalesce(col_description(c.oid, a.attnum), '')
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE {_NON_SYSTEM} AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY 1, 2, 3""",
    "constraints": f"""
        SELECT n.nspname, c.relname, k.conname, pg_get_constraintdef(k.oid)
        FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {_NON_SYSTEM} ORDER BY 1, 2, 3""",
    "indexes": f"""
        SELECT n.nspname, c.relname, pg_get_indexdef(i.indexrelid)
        FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {_NON_SYSTEM} ORDER BY 1, 2, 3""",
    "policies": """
        SELECT schemaname, tablename, policyname, permissive, array_to_string(roles, ','), cmd,
               coalesce(qual, ''), coalesce(with_check, '')
        FROM pg_policies ORDER BY 1, 2, 3""",
    "types": f"""
        SELECT n.nspname, t.typname, t.typtype::text, pg_get_userbyid(t.typowner)
        FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE {_NON_SYSTEM} AND t.typtype IN ('e', 'd', 'c')
          AND NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = t.typrelid AND c.relkind <> 'c')
        ORDER BY 1, 2""",
    "functions": f"""
        SELECT n.nspname, p.proname, pg_get_function_identity_arguments(p.oid), pg_get_userbyid(p.proowner),
               md5(p.prosrc)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE {_NON_SYSTEM} ORDER BY 1, 2, 3""",
    "triggers": f"""
        SELECT n.nspname, c.relname, t.tgname, pg_get_triggerdef(t.oid)
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {_NON_SYSTEM} AND NOT t.tgisinternal ORDER BY 1, 2, 3""",
}

Snapshot = dict[str, list[tuple[str, ...]]]


def schema_snapshot(admin_url: str) -> Snapshot:
    """A catalog dump (schemas, relations, columns, constraints, indexes, policies, ...) for comparisons."""

    def work(connection: Connection) -> Snapshot:
        return {
            name: [tuple(str(value) for value in row) for row in connection.execute(sa.text(query))]
            for name, query in _SNAPSHOT_QUERIES.items()
        }

    return _run(_with_connection(admin_url, work))


def snapshot_diff(before: Snapshot, after: Snapshot) -> list[str]:
    """Lines describing what differs between two snapshots (empty when they are equal)."""
    lines: list[str] = []
    for section in sorted(set(before) | set(after)):
        old, new = set(before.get(section, [])), set(after.get(section, []))
        lines.extend(f"{section}: only before: {row}" for row in sorted(old - new))
        lines.extend(f"{section}: only after: {row}" for row in sorted(new - old))
    return lines


@dataclass(frozen=True, slots=True)
class RoundTripReport:
    """What the round trip saw: the schema at head (twice) and at base."""

    head: str | None
    at_head: Snapshot
    at_base: Snapshot
    at_head_again: Snapshot


def round_trip(admin_url: str) -> RoundTripReport:
    """Upgrade to head, downgrade to base, upgrade to head again; fail unless both heads are identical.

    Destroys all data in the service schemas: run it on a scratch database (CI does), never in production.
    """
    bootstrap(admin_url)
    upgrade(admin_url, "head")
    at_head = schema_snapshot(admin_url)
    downgrade(admin_url, "base")
    at_base = schema_snapshot(admin_url)
    left_behind = sorted({row[0] for row in at_base["schemas"]} & set(SERVICES))
    if left_behind:
        raise MigrationError(f"downgrade to base left service schemas behind: {', '.join(left_behind)}")
    if current(admin_url) is not None:
        raise MigrationError("downgrade to base left a revision in the version table")
    upgrade(admin_url, "head")
    at_head_again = schema_snapshot(admin_url)
    differences = snapshot_diff(at_head, at_head_again)
    if differences:
        raise MigrationError("schema after the round trip differs:\n" + "\n".join(differences))
    return RoundTripReport(current(admin_url), at_head, at_base, at_head_again)
