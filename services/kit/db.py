"""Database access: the connection pool and the unit of work that every RPC and consumer runs in.

One unit of work is one transaction. It starts with `BEGIN` and, in the same round trip, sets
`tessera.tenant_id` and `tessera.subject` transaction-locally (`set_config(..., true)`), so
row-level security sees the caller's tenant before any other statement runs and the setting is gone
when the pooled connection is handed to the next caller.
Events emitted during the unit of work are written to the service's outbox in the same
transaction; services and repositories never commit.

Connections come from an asyncpg pool (ADR 0010): SQLAlchemy describes the schema and builds the
statements (`services.kit.sql.Query`), asyncpg runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import sqlalchemy as sa
import structlog
from google.protobuf.message import Message
from opentelemetry import propagate
from prometheus_client import Histogram

from services.kit.context import request_id_var
from services.kit.errors import Unavailable
from services.kit.events import build_envelope, subject_for
from services.kit.principal import Principal
from services.kit.sql import Query, as_query
from tessera.common.v1.event_pb2 import EventEnvelope

_log = structlog.get_logger(__name__)

TENANT_SETTING = "tessera.tenant_id"
SUBJECT_SETTING = "tessera.subject"

UOW_SECONDS = Histogram(
    "tessera_uow_duration_seconds",
    "Duration of units of work (one transaction each)",
    ["service", "outcome"],
)


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


# How long a caller waits for a free connection of the pool before its request fails (UNAVAILABLE).
ACQUIRE_TIMEOUT_SECONDS = 30.0
DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
# How long dispose() lets checked-out connections finish before closing them.
DISPOSE_TIMEOUT_SECONDS = 10.0


def dsn(url: str) -> str:
    """A postgresql:// URL for asyncpg (a SQLAlchemy `postgresql+asyncpg://` URL is accepted too)."""
    scheme, rest = url.split("://", 1)
    if scheme.startswith(("postgresql+", "postgres+")):
        return f"postgresql://{rest}"
    return url


def _json_text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a JSON parameter is passed as JSON text (json.dumps), not {type(value).__name__}")
    return value


async def _init_connection(conn: asyncpg.Connection) -> None:
    """JSON columns as statements use them: parameters are JSON text, results are parsed."""
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(type_name, schema="pg_catalog", encoder=_json_text, decoder=json.loads, format="text")


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Released connections are not reset: every unit of work ends its own transaction (COMMIT or
    ROLLBACK), its settings are transaction-local, and a connection in an unknown state is terminated
    before release, never handed out again."""


class Database:
    """The connection pool of one service, bound to that service's schema (outbox, inbox) and event source."""

    def __init__(
        self,
        url: str,
        *,
        service: str,
        schema: str,
        pool_size: int = 10,
        server_settings: Mapping[str, str] | None = None,
        acquire_timeout: float = ACQUIRE_TIMEOUT_SECONDS,
    ) -> None:
        """`server_settings`: PostgreSQL settings for every connection of the pool, on top of the kit's.

        The pool opens connections on first use, up to `pool_size`, in the event loop that first uses it.
        """
        self.service = service
        self.schema = schema
        self.dsn = dsn(url)
        self.pool_size = pool_size
        self.acquire_timeout = acquire_timeout
        self.server_settings = {"application_name": f"tessera-{service}", "jit": "off", **(server_settings or {})}
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self.metadata = sa.MetaData()
        self.outbox = outbox_table(self.metadata, schema)
        self.inbox = inbox_table(self.metadata, schema)
        self.outbox_insert = Query(
            sa.insert(self.outbox).values(
                id=sa.bindparam("id"), nats_subject=sa.bindparam("nats_subject"), envelope=sa.bindparam("envelope")
            )
        )
        self._event_listeners: list[Callable[[], None]] = []

    async def pool(self) -> asyncpg.Pool:
        """The pool, created on first use."""
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self.dsn,
                        min_size=0,
                        max_size=self.pool_size,
                        server_settings=self.server_settings,
                        init=_init_connection,
                        reset=_no_reset,
                    )
        return self._pool

    async def acquire(self) -> asyncpg.Connection:
        """A connection of the pool; give it back with `release`.

        Unavailable (retryable) when no connection frees up within `acquire_timeout`, or when a new one
        cannot be opened (server down, restarting, out of connection slots).
        """
        try:
            pool = await self.pool()
            return await pool.acquire(timeout=self.acquire_timeout)
        except TimeoutError:
            _log.warning("no database connection free in time", service=self.service, seconds=self.acquire_timeout)
            raise Unavailable(
                f"no database connection free within {self.acquire_timeout:g}s",
                reason=DATABASE_UNAVAILABLE,
                retry_after=1.0,
            ) from None
        except (OSError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError) as error:
            _log.warning("cannot connect to the database", service=self.service, error=repr(error))
            raise Unavailable("the database cannot be reached", reason=DATABASE_UNAVAILABLE, retry_after=1.0) from None

    async def release(self, conn: asyncpg.Connection, *, broken: bool = False) -> None:
        """Give a connection back; `broken` (its state unknown: cancelled mid-statement, failed COMMIT)
        closes it first, so the pool replaces it rather than hand it to the next caller."""
        if broken:
            conn.terminate()
        pool = self._pool
        assert pool is not None, "a connection released to a pool that was never created"
        await pool.release(conn)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection for work outside a unit of work (the relay, health checks); closed if the work fails."""
        conn = await self.acquire()
        try:
            yield conn
        except BaseException:
            await self.release(conn, broken=True)
            raise
        await self.release(conn)

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
        async with self.connection() as conn:
            await conn.fetchval("SELECT 1")

    async def dispose(self) -> None:
        """Close the pool: checked-out connections get DISPOSE_TIMEOUT_SECONDS to come back."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=DISPOSE_TIMEOUT_SECONDS)
        except TimeoutError:
            pool.terminate()


class UnitOfWork:
    """One transaction: tenant context first, then the work, then the outbox rows, then commit.

    Statements (`services.kit.sql.Query`) run on one connection of the service's asyncpg pool.
    """

    def __init__(self, db: Database, principal: Principal | None, tenant_id: str | None) -> None:
        self.db = db
        self.principal = principal
        self.tenant_id = tenant_id
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
        driver = await self.db.acquire()
        try:
            await driver.execute(
                f"BEGIN; SELECT set_config('{TENANT_SETTING}', '{tenant}', true), "
                f"set_config('{SUBJECT_SETTING}', '{subject}', true)"
            )
        except BaseException:
            await self.db.release(driver, broken=True)
            raise
        self._driver = driver
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
        driver = self.driver
        outcome = "rollback"
        broken = False
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
            broken = True
            raise
        finally:
            self._pending.clear()
            self._driver = None
            await self.db.release(driver, broken=broken)
            UOW_SECONDS.labels(self.db.service, outcome).observe(time.perf_counter() - self._started)
        if committed_events:
            self.db._events_committed()
