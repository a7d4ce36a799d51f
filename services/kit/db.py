"""Database access: the async engine and the unit of work that every RPC and consumer runs in.

One unit of work is one transaction. It starts with `BEGIN` and, in the same round trip, sets
`tessera.tenant_id` and `tessera.subject` transaction-locally (`set_config(..., true)`), so
row-level security sees the caller's tenant before any other statement runs and the setting is gone
when the pooled connection is handed to the next caller.
Events emitted during the unit of work are written to the service's outbox in the same
transaction; services and repositories never commit.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import sqlalchemy as sa
from google.protobuf.message import Message
from opentelemetry import propagate
from prometheus_client import Histogram
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from services.kit.context import request_id_var
from services.kit.events import build_envelope, subject_for
from services.kit.principal import Principal
from services.kit.sql import Query, as_query
from tessera.common.v1.event_pb2 import EventEnvelope

TENANT_SETTING = "tessera.tenant_id"
SUBJECT_SETTING = "tessera.subject"

UOW_SECONDS = Histogram(
    "tessera_uow_duration_seconds",
    "Duration of units of work (one transaction each)",
    ["service", "outcome"],
)


def asyncpg_url(url: str) -> str:
    """Normalise a postgresql:// URL to the SQLAlchemy asyncpg dialect."""
    scheme, rest = url.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    return url


def with_user(url: str, user: str, password: str | None = None) -> str:
    """The same server and database, logged in as another role."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = user + (f":{password}" if password else "") + "@" + host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def outbox_table(metadata: sa.MetaData, schema: str) -> sa.Table:
    """The transactional outbox of one service (system table: read only by the relay, no RPC exposes it)."""
    return sa.Table(
        "outbox",
        metadata,
        sa.Column("id", sa.Uuid, primary_key=True, comment="event id (UUIDv7), also the Nats-Msg-Id"),
        sa.Column("nats_subject", sa.Text, nullable=False),
        sa.Column("envelope", sa.LargeBinary, nullable=False, comment="serialized tessera.common.v1.EventEnvelope"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text),
        schema=schema,
    )


def inbox_table(metadata: sa.MetaData, schema: str) -> sa.Table:
    """Events a consumer has already handled: the effect and this row commit together."""
    return sa.Table(
        "inbox",
        metadata,
        sa.Column("consumer", sa.Text, primary_key=True),
        sa.Column("event_id", sa.Uuid, primary_key=True),
        sa.Column("handled_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        schema=schema,
    )


class Database:
    """The engine of one service, bound to that service's schema (outbox, inbox) and event source name."""

    def __init__(
        self,
        url: str,
        *,
        service: str,
        schema: str,
        pool_size: int = 10,
        echo: bool = False,
        server_settings: Mapping[str, str] | None = None,
    ) -> None:
        """`server_settings`: PostgreSQL settings for every connection of the pool, on top of the kit's."""
        self.service = service
        self.schema = schema
        settings = {"application_name": f"tessera-{service}", "jit": "off", **(server_settings or {})}
        self.engine: AsyncEngine = create_async_engine(
            asyncpg_url(url),
            pool_size=pool_size,
            max_overflow=0,
            pool_pre_ping=False,
            echo=echo,
            connect_args={"server_settings": settings},
        )
        self.metadata = sa.MetaData()
        self.outbox = outbox_table(self.metadata, schema)
        self.inbox = inbox_table(self.metadata, schema)
        self.outbox_insert = Query(
            sa.insert(self.outbox).values(
                id=sa.bindparam("id"), nats_subject=sa.bindparam("nats_subject"), envelope=sa.bindparam("envelope")
            )
        )
        self._event_listeners: list[Callable[[], None]] = []

    def on_events_committed(self, listener: Callable[[], None]) -> None:
        """Register a callback run after a transaction that wrote outbox rows commits (wakes the relay)."""
        self._event_listeners.append(listener)

    def _events_committed(self) -> None:
        for listener in self._event_listeners:
            listener()

    def unit_of_work(self, principal: Principal | None, *, tenant_id: str | None = None) -> UnitOfWork:
        """A transaction scoped to the principal and tenant (the principal's, unless given explicitly)."""
        tenant = tenant_id if tenant_id is not None else (principal.tenant_id if principal else None)
        return UnitOfWork(self, principal, tenant)

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()


class UnitOfWork:
    """One transaction: tenant context first, then the work, then the outbox rows, then commit.

    Statements run on the asyncpg connection under SQLAlchemy's pooled connection (see
    `services.kit.sql.Query`); SQLAlchemy provides the pool, Core statements and migrations.
    """

    def __init__(self, db: Database, principal: Principal | None, tenant_id: str | None) -> None:
        self.db = db
        self.principal = principal
        self.tenant_id = tenant_id
        self._pooled: AsyncConnection | None = None
        self._driver: asyncpg.Connection | None = None
        self._pending: list[tuple[EventEnvelope, str]] = []
        self._started = 0.0

    @property
    def driver(self) -> asyncpg.Connection:
        """The asyncpg connection this transaction runs on."""
        if self._driver is None:
            raise RuntimeError("unit of work used outside its `async with` block")
        return self._driver

    async def __aenter__(self) -> UnitOfWork:
        self._started = time.perf_counter()
        # Validated before they reach SQL: they are inlined so BEGIN and the context cost one round trip.
        tenant = str(uuid.UUID(self.tenant_id)) if self.tenant_id else ""
        subject = str(uuid.UUID(self.principal.subject)) if self.principal else ""
        pooled = await self.db.engine.connect()
        try:
            driver = (await pooled.get_raw_connection()).driver_connection
            assert driver is not None, "the pool handed out a closed connection"
            await driver.execute(
                f"BEGIN; SELECT set_config('{TENANT_SETTING}', '{tenant}', true), "
                f"set_config('{SUBJECT_SETTING}', '{subject}', true)"
            )
        except BaseException:
            await pooled.invalidate()
            await pooled.close()
            raise
        self._pooled, self._driver = pooled, driver
        return self

    async def fetch(self, query: Query | sa.ClauseElement, **params: Any) -> list[asyncpg.Record]:
        """All rows of a query."""
        q = as_query(query)
        return await self.driver.fetch(q.sql, *q.arguments(params))  # type: ignore[no-any-return]

    async def fetchrow(self, query: Query | sa.ClauseElement, **params: Any) -> asyncpg.Record | None:
        """The first row of a query, or None."""
        q = as_query(query)
        return await self.driver.fetchrow(q.sql, *q.arguments(params))

    async def fetchval(self, query: Query | sa.ClauseElement, **params: Any) -> Any:
        """The first column of the first row, or None."""
        q = as_query(query)
        return await self.driver.fetchval(q.sql, *q.arguments(params))

    async def execute(self, query: Query | sa.ClauseElement, **params: Any) -> str:
        """Run a statement; returns the command status (e.g. `UPDATE 1`)."""
        q = as_query(query)
        return await self.driver.execute(q.sql, *q.arguments(params))  # type: ignore[no-any-return]

    def emit(self, event: Message, *, subject: str, tenant_id: str | None = None) -> EventEnvelope:
        """Record an event; it is written to the outbox in this transaction and published after commit."""
        tenant = tenant_id or self.tenant_id
        if not tenant:
            raise ValueError("an event needs a tenant: open the unit of work for a tenant or pass tenant_id")
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        envelope = build_envelope(
            event,
            source=self.db.service,
            tenant_id=tenant,
            subject=subject,
            request_id=request_id_var.get() or "",
            traceparent=carrier.get("traceparent", ""),
            tracestate=carrier.get("tracestate", ""),
        )
        self._pending.append((envelope, subject_for(self.db.service, event)))
        return envelope

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pooled, driver = self._pooled, self.driver
        assert pooled is not None
        outcome = "rollback"
        committed_events = False
        try:
            if exc_type is None:
                if self._pending:
                    insert = self.db.outbox_insert
                    rows = [
                        insert.arguments(
                            {
                                "id": uuid.UUID(envelope.id),
                                "nats_subject": nats_subject,
                                "envelope": envelope.SerializeToString(),
                            }
                        )
                        for envelope, nats_subject in self._pending
                    ]
                    if len(rows) == 1:  # the common case: execute costs less than a batch of one
                        await driver.execute(insert.sql, *rows[0])
                    else:
                        await driver.executemany(insert.sql, rows)
                await driver.execute("COMMIT")
                outcome = "commit"
                committed_events = bool(self._pending)
            else:
                await driver.execute("ROLLBACK")
        except BaseException:
            # The connection's state is unknown (cancelled mid-statement, broken socket, failed COMMIT):
            # never hand it to the next caller.
            await pooled.invalidate()
            raise
        finally:
            self._pending.clear()
            self._pooled = self._driver = None
            await pooled.close()
            UOW_SECONDS.labels(self.db.service, outcome).observe(time.perf_counter() - self._started)
        if committed_events:
            self.db._events_committed()
