"""The outbox relay: publishes committed outbox rows to JetStream and deletes them once acknowledged.

Each round locks a batch with `FOR UPDATE SKIP LOCKED` (so several replicas can relay side by side),
publishes every row with `Nats-Msg-Id` = event id and waits for the JetStream PubAck, then deletes the
published rows in the same transaction. A row whose publish fails stays, with `attempts` and
`last_error`, and the relay backs off. A crash between the PubAck and the commit republishes the row;
the stream's duplicate window and the consumers' inbox make that harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import sqlalchemy as sa
import structlog
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy.dialects import postgresql

from services.kit.broker import Broker
from services.kit.db import Database
from services.kit.sql import Query
from tessera.common.v1.event_pb2 import EventEnvelope

MSG_ID_HEADER = "Nats-Msg-Id"
MAX_ERROR_CHARS = 1000

PUBLISHED = Counter("tessera_outbox_published_total", "Outbox events published to JetStream", ["service"])
PUBLISH_FAILURES = Counter("tessera_outbox_publish_failures_total", "Failed outbox publish attempts", ["service"])
PENDING = Gauge("tessera_outbox_pending", "Outbox rows seen in the last relay round and not yet published", ["service"])
PUBLISH_LAG = Histogram(
    "tessera_outbox_publish_lag_seconds",
    "Time from outbox commit to JetStream acknowledgement",
    ["service"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

log = structlog.get_logger("tessera.relay")


def _publish_headers(row_id: uuid.UUID, envelope_bytes: bytes) -> dict[str, str]:
    headers = {MSG_ID_HEADER: str(row_id)}
    envelope = EventEnvelope()
    with contextlib.suppress(Exception):  # the row is published even if its envelope cannot be parsed
        envelope.ParseFromString(envelope_bytes)
        if envelope.traceparent:
            headers["traceparent"] = envelope.traceparent
        if envelope.tracestate:
            headers["tracestate"] = envelope.tracestate
    return headers


class OutboxRelay:
    """Background task moving one service's outbox rows to JetStream (at least once, in id order per round)."""

    def __init__(
        self,
        db: Database,
        broker: Broker,
        *,
        poll_seconds: float = 0.5,
        batch_size: int = 100,
        publish_timeout: float = 2.0,
        stop_timeout: float = 5.0,
        max_backoff_seconds: float = 5.0,
    ) -> None:
        self.db = db
        self.broker = broker
        self.poll_seconds = poll_seconds
        self.batch_size = batch_size
        self.publish_timeout = publish_timeout
        self.stop_timeout = stop_timeout
        self.max_backoff_seconds = max_backoff_seconds
        self._wake = asyncio.Event()
        self._retry_now = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        self._lock = asyncio.Lock()
        outbox = db.outbox
        # Compiled once and run on the asyncpg connection, as the unit of work runs its statements
        # (services.kit.sql): SQLAlchemy's execution machinery cost more than the rest of a round.
        self._select_batch = Query(
            sa.select(outbox.c.id, outbox.c.nats_subject, outbox.c.envelope, outbox.c.created_at)
            .order_by(outbox.c.id)
            .limit(sa.bindparam("limit", type_=sa.Integer))
            .with_for_update(skip_locked=True)
        )
        self._outbox_has_rows = Query(sa.select(sa.exists().select_from(outbox)))
        self._delete_published = Query(
            sa.delete(outbox).where(outbox.c.id == sa.any_(sa.bindparam("ids", type_=postgresql.ARRAY(sa.Uuid))))
        )
        self._record_failure = Query(
            sa.update(outbox)
            .where(outbox.c.id == sa.bindparam("failed_id", type_=sa.Uuid))
            .values(attempts=outbox.c.attempts + 1, last_error=sa.bindparam("error", type_=sa.Text))
        )
        db.on_events_committed(self.wake)
        broker.on_reconnected(self._on_reconnected)

    def wake(self) -> None:
        """Run a round now instead of at the next poll (called after a transaction that wrote events)."""
        self._wake.set()

    def _on_reconnected(self) -> None:
        self._failures = 0
        self._retry_now.set()
        self.wake()

    async def start(self) -> None:
        """Ensure the service's stream exists and start the relay loop."""
        if self._task is not None:
            return
        await self.broker.ensure_streams(self.db.service)
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"outbox-relay-{self.db.service}")

    async def stop(self) -> None:
        """Publish what is pending (bounded by stop_timeout), then stop the loop."""
        try:
            await self.flush(self.stop_timeout)
        except TimeoutError:
            log.warning("outbox not empty at shutdown", service=self.db.service, timeout=self.stop_timeout)
        except Exception as error:  # the database is unreachable: the rows stay for the next start
            log.warning("outbox flush failed at shutdown", service=self.db.service, error=repr(error))
        self._stopping = True
        self._wake.set()
        self._retry_now.set()
        task, self._task = self._task, None
        if task is not None:
            await task

    async def flush(self, timeout: float) -> None:
        """Return once the outbox is empty; raise TimeoutError if it is not within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            published, failed = await self.relay_once()
            if not failed and published == 0 and await self._is_empty():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"outbox of {self.db.service} not empty after {timeout}s")
            if failed:
                await asyncio.sleep(min(self._backoff(), remaining))
            elif published == 0:
                await asyncio.sleep(min(0.05, remaining))  # rows locked by another replica's round

    async def _is_empty(self) -> bool:
        query = self._outbox_has_rows
        async with self.db.connection() as conn:
            found = await conn.fetchval(query.sql, *query.arguments({}))
        return not found

    def _backoff(self) -> float:
        if self._failures == 0:
            return 0.0
        return float(min(self.max_backoff_seconds, 0.1 * 2 ** (self._failures - 1)))

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            self._retry_now.clear()
            try:
                published, failed = await self.relay_once()
            except Exception as error:
                # The database itself failed (down, restarting): keep the loop alive and retry later.
                self._failures += 1
                published, failed = 0, True
                log.warning("outbox relay round failed", service=self.db.service, error=repr(error))
            if self._stopping:
                return
            if published == self.batch_size and not failed:
                continue  # a full batch: more rows may be waiting, go again at once
            # Events committed during the round have set _wake again: the wait below returns at once.
            # After a failure only a reconnect (or stop) cuts the backoff short, not new events.
            event, delay = (self._retry_now, self._backoff()) if failed else (self._wake, self.poll_seconds)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=delay)

    async def relay_once(self) -> tuple[int, bool]:
        """One round: publish a locked batch and delete what JetStream acknowledged; (published, failed)."""
        # Failed or cancelled mid-statement, the connection is closed, never reused (Database.connection).
        async with self._lock, self.db.connection() as driver, driver.transaction():
            return await self._relay_batch(driver)

    async def _relay_batch(self, driver: asyncpg.Connection) -> tuple[int, bool]:
        query = self._select_batch
        rows = await driver.fetch(query.sql, *query.arguments({"limit": self.batch_size}))
        PENDING.labels(self.db.service).set(len(rows))
        if not rows:
            return 0, False
        published: list[uuid.UUID] = []
        failure: tuple[uuid.UUID, str] | None = None
        for row in rows:
            try:
                await self._publish(row["id"], row["nats_subject"], row["envelope"])
            except Exception as error:
                failure = (row["id"], f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS])
                break  # keep the order: later rows wait for the next round
            published.append(row["id"])
            PUBLISH_LAG.labels(self.db.service).observe(_lag_seconds(row["created_at"]))
        if published:
            query = self._delete_published
            await driver.execute(query.sql, *query.arguments({"ids": published}))
            PUBLISHED.labels(self.db.service).inc(len(published))
        PENDING.labels(self.db.service).set(len(rows) - len(published))
        if failure is None:
            self._failures = 0
            return len(published), False
        failed_id, error_text = failure
        query = self._record_failure
        await driver.execute(query.sql, *query.arguments({"failed_id": failed_id, "error": error_text}))
        self._failures += 1
        PUBLISH_FAILURES.labels(self.db.service).inc()
        log.warning(
            "outbox publish failed",
            service=self.db.service,
            event_id=str(failed_id),
            error=error_text,
            published=len(published),
            backoff=self._backoff(),
        )
        return len(published), True

    async def _publish(self, row_id: uuid.UUID, subject: str, envelope: bytes) -> None:
        if not self.broker.is_connected:
            # Publishing now would only queue the message in the client's reconnect buffer.
            raise ConnectionError("NATS is not connected")
        await self.broker.js.publish(
            subject,
            envelope,
            timeout=self.publish_timeout,
            headers=_publish_headers(row_id, envelope),
        )


def _lag_seconds(created_at: Any) -> float:
    if isinstance(created_at, datetime):
        return max(0.0, (datetime.now(UTC) - created_at).total_seconds())
    return 0.0
