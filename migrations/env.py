"""Alembic environment of Tessera.

`migrations.runner` passes an open connection (already `SET ROLE tessera_owner`, inside a transaction
holding the migration advisory lock) in `config.attributes["connection"]`. Without one (the plain
`alembic -c migrations/alembic.ini -x url=postgresql://... upgrade head` command line) this file opens
its own asyncpg connection and does the same. Offline mode (`--sql`) prints the SQL instead.
The version table is `tessera_meta.alembic_version`.
"""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

OWNER_ROLE = "tessera_owner"
META_SCHEMA = "tessera_meta"
MIGRATION_LOCK_KEY = 0x7E55E2A_0001

config = context.config


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: use migrations.runner, or pass -x url=postgresql://...")
    scheme, rest = url.split("://", 1)
    return f"postgresql+asyncpg://{rest}" if scheme in ("postgresql", "postgres") else url


def run_migrations_offline() -> None:
    """Emit the migration SQL to stdout (`alembic ... --sql`)."""
    context.configure(
        url=_url(),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        version_table_schema=META_SCHEMA,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.execute(f"SET LOCAL ROLE {OWNER_ROLE}")
        context.run_migrations()


def _run_on(connection: Connection) -> None:
    context.configure(connection=connection, version_table_schema=META_SCHEMA, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_standalone() -> None:
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as conn:
            await conn.begin()
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            await conn.execute(sa.text(f"SET LOCAL ROLE {OWNER_ROLE}"))
            await conn.run_sync(_run_on)
            await conn.commit()
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    """Run the migrations on the connection the runner passed in, or on a connection of our own."""
    connection = config.attributes.get("connection")
    if connection is None:
        asyncio.run(_run_standalone())
    else:
        _run_on(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
