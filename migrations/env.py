"""Alembic environment of Tessera.

`migrations.runner` passes an open connection in `config.attributes["connection"]`: a migration session
(ADR 0009) that holds the migration advisory lock, is `SET ROLE tessera_owner` and has its
`lock_timeout`/`statement_timeout`, outside any transaction. Each revision runs in its own transaction
(`transaction_per_migration`); a revision may commit early with `op.get_context().autocommit_block()`.
Without a connection (the plain `alembic -c migrations/alembic.ini -x url=postgresql://... upgrade head`
command line) this file opens the same kind of session through the runner. Offline mode (`--sql`)
prints the SQL the session would run, session statements included: `tessera migrate lint` reads it.
The version table is `tessera_meta.alembic_version`.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

from migrations import online, runner

config = context.config

_COMMON: dict[str, Any] = {
    "version_table_schema": runner.META_SCHEMA,
    "transactional_ddl": True,
    "transaction_per_migration": True,
}


def _options() -> runner.MigrationOptions:
    configured = config.attributes.get(runner.RUN_OPTIONS_ATTRIBUTE)
    if isinstance(configured, runner.MigrationOptions):
        return configured
    arguments = context.get_x_argument(as_dictionary=True)
    defaults = runner.MigrationOptions()
    return runner.MigrationOptions(
        lock_timeout=arguments.get("lock_timeout", defaults.lock_timeout),
        statement_timeout=arguments.get("statement_timeout", defaults.statement_timeout),
        batch_size=int(arguments.get("batch_size", defaults.batch_size)),
        batch_timeout=arguments.get("batch_timeout", defaults.batch_timeout),
    )


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: use migrations.runner, or pass -x url=postgresql://...")
    return url


def run_migrations_offline() -> None:
    """Emit the SQL of a migration session to the output (`alembic ... --sql`, `tessera migrate lint`)."""
    context.configure(dialect_name="postgresql", literal_binds=True, dialect_opts={"paramstyle": "named"}, **_COMMON)
    context.execute(f"SELECT pg_advisory_lock({runner.MIGRATION_LOCK_KEY})")
    for statement in _options().session_statements():
        context.execute(statement)
    with context.begin_transaction():
        context.run_migrations()
    context.execute("RESET ROLE")
    context.execute(f"SELECT pg_advisory_unlock({runner.MIGRATION_LOCK_KEY})")


def _run_on(connection: Connection) -> None:
    context.configure(connection=connection, **_COMMON)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the runner's session, or on a migration session of our own."""
    connection = config.attributes.get("connection")
    if connection is None:
        config.attributes.setdefault(online.OPTIONS_ATTRIBUTE, _options().online())
        runner.run_in_migration_session(_url(), _run_on, _options())
    else:
        _run_on(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
