"""Durable JetStream consumers with an exactly-once effect: inbox row and handler effect commit together.

Delivery is at least once. Each message is handled in one unit of work for the event's tenant that
first inserts `(consumer, event_id)` into the service's inbox: a conflict means the effect was already
committed, so the message is acknowledged and skipped. A failing handler rolls back, the message is
redelivered with backoff (`nak(delay)`), and after `max_deliver` deliveries it is published to the
dead-letter stream (`tessera_dlq.<consumer>`) with the last error, then acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
import structlog
from google.protobuf.message import DecodeError, Message
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Counter, Histogram
from sqlalchemy.dialects.postgresql import insert as pg_insert

from services.kit.broker import Broker
from services.kit.context import request_id_var, tenant_id_var
from services.kit.db import Database, UnitOfWork
from services.kit.events import DLQ_SUBJECT_PREFIX, stream_name, subject_for
from services.kit.sql import Query
from tessera.common.v1.event_pb2 import EventEnvelope

M = TypeVar("M", bound=Message)

# Headers of a dead letter (and of a replayed message), read back by services.kit.dlq.
MSG_ID_HEADER = "Nats-Msg-Id"
CONSUMER_HEADER = "Tessera-Consumer"
ORIGINAL_SUBJECT_HEADER = "Tessera-Original-Subject"
EVENT_ID_HEADER = "Tessera-Event-Id"
ERROR_HEADER = "Tessera-Error"
ATTEMPTS_HEADER = "Tessera-Attempts"
FAILED_AT_HEADER = "Tessera-Failed-At"
REPLAY_FOR_HEADER = "Tessera-Replay-For"

MAX_ERROR_HEADER_CHARS = 1000
_CONSUMER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")

HANDLED = Counter("tessera_consumer_handled_total", "Events handled and committed", ["consumer"])
DUPLICATES = Counter("tessera_consumer_duplicates_total", "Redelivered events skipped by the inbox", ["consumer"])
FAILED = Counter("tessera_consumer_failed_total", "Handler attempts that failed and rolled back", ["consumer"])
DEAD_LETTERED = Counter("tessera_consumer_dead_lettered_total", "Events moved to the dead-letter stream", ["consumer"])
REPLAYS_SKIPPED = Counter(
    "tessera_consumer_replays_skipped_total", "Replayed events addressed to another consumer", ["consumer"]
)
HANDLING_SECONDS = Histogram(
    "tessera_consumer_handling_seconds", "Time to handle one delivered event", ["consumer", "outcome"]
)

log = structlog.get_logger("tessera.consumer")
tracer = trace.get_tracer("tessera.consumer")


class MalformedEventError(ValueError):
    """A message that can never be handled (not an envelope, wrong payload type): dead-lettered at once."""


def dlq_subject(consumer: str) -> str:
    """The dead-letter subject of one consumer."""
    return f"{DLQ_SUBJECT_PREFIX}.{consumer}"


def error_header(error: BaseException | str) -> str:
    """An error as a single-line header value of at most ~1 KB."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())[:MAX_ERROR_HEADER_CHARS]


@dataclass(frozen=True)
class ConsumerSpec(Generic[M]):
    """What one durable consumer listens to and how it handles, retries and dead-letters events."""

    name: str
    source: str
    event_type: type[M]
    handler: Callable[[UnitOfWork, EventEnvelope, M], Awaitable[None]]
    _: KW_ONLY
    max_deliver: int = 5
    backoff: Sequence[float] = (1.0, 5.0, 15.0, 60.0)
    subject: str | None = None
    ack_wait: float = 30.0
    max_in_flight: int = 16
    fetch_timeout: float = 1.0

    def __post_init__(self) -> None:
        if not _CONSUMER_NAME.match(self.name):
            raise ValueError(f"consumer name {self.name!r} must match {_CONSUMER_NAME.pattern}")
        if self.max_deliver < 1:
            raise ValueError("max_deliver must be at least 1")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")

    @property
    def filter_subject(self) -> str:
        return self.subject or subject_for(self.source, self.event_type())

    @property
    def stream(self) -> str:
        return stream_name(self.source)

    def backoff_for(self, num_delivered: int) -> float:
        """Redelivery delay after the num_delivered-th failed delivery."""
        if not self.backoff:
            return 0.0
        return float(self.backoff[min(max(num_delivered, 1), len(self.backoff)) - 1])


class EventConsumer:
    """A durable pull consumer running a bounded number of handlers concurrently (a BackgroundService)."""

    def __init__(self, spec: ConsumerSpec[Any], db: Database, broker: Broker) -> None:
        self.spec = spec
        self.db = db
        self.broker = broker
        self._sub: JetStreamContext.PullSubscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._inbox_insert = Query(
            pg_insert(db.inbox)
            .values(consumer=sa.bindparam("consumer"), event_id=sa.bindparam("event_id"))
            .on_conflict_do_nothing()
            .returning(db.inbox.c.event_id)
        )

    @property
    def name(self) -> str:
        return self.spec.name

    async def start(self) -> None:
        """Create or update the durable consumer and start fetching."""
        if self._task is not None:
            return
        spec = self.spec
        await self.broker.ensure_streams(spec.source)
        config = ConsumerConfig(
            name=spec.name,
            durable_name=spec.name,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=spec.ack_wait,
            filter_subject=spec.filter_subject,
            max_ack_pending=max(1000, spec.max_in_flight * 4),
        )
        js = self.broker.js
        await js.add_consumer(spec.stream, config=config)
        self._sub = await js.pull_subscribe_bind(durable=spec.name, stream=spec.stream)
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"consumer-{spec.name}")
        log.info("consumer started", consumer=spec.name, stream=spec.stream, subject=spec.filter_subject)

    async def stop(self) -> None:
        """Stop fetching, let in-flight handlers finish, then drop the subscription."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            await task
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        sub, self._sub = self._sub, None
        if sub is not None and self.broker.is_connected:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _run(self) -> None:
        assert self._sub is not None
        sub = self._sub
        while not self._stopping:
            free = self.spec.max_in_flight - len(self._inflight)
            if free <= 0:
                await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                # One message per pull request: it returns as soon as a message arrives, and no pull
                # request is left open on the server to strand messages when the consumer stops.
                [msg] = await sub.fetch(1, timeout=self.spec.fetch_timeout)
            except TimeoutError:
                continue
            except Exception as error:
                log.warning("consumer fetch failed", consumer=self.name, error=repr(error))
                await asyncio.sleep(self.spec.fetch_timeout)
                continue
            task = asyncio.create_task(self._handle(msg))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _handle(self, msg: Msg) -> None:
        started = time.perf_counter()
        outcome = "error"
        try:
            outcome = await self._process(msg)
        except Exception as error:  # acking or naking itself failed: JetStream redelivers after ack_wait
            log.error("consumer could not settle message", consumer=self.name, error=repr(error))
        finally:
            HANDLING_SECONDS.labels(self.name, outcome).observe(time.perf_counter() - started)

    async def _process(self, msg: Msg) -> str:
        spec = self.spec
        attempts = msg.metadata.num_delivered
        replay_for = (msg.headers or {}).get(REPLAY_FOR_HEADER)
        if replay_for and replay_for != spec.name:
            await msg.ack()
            REPLAYS_SKIPPED.labels(spec.name).inc()
            return "skipped"
        try:
            envelope, payload = self._decode(msg.data)
        except MalformedEventError as error:
            log.error("malformed event", consumer=spec.name, subject=msg.subject, error=str(error))
            FAILED.labels(spec.name).inc()
            await self._dead_letter(msg, event_id="", error=error, attempts=attempts)
            return "malformed"
        request_id_var.set(envelope.request_id or None)
        tenant_id_var.set(envelope.tenant_id)
        context = propagate.extract({"traceparent": envelope.traceparent, "tracestate": envelope.tracestate})
        with tracer.start_as_current_span(
            f"{msg.subject} process",
            context=context,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": msg.subject,
                "messaging.consumer.group.name": spec.name,
                "messaging.message.id": envelope.id,
                "messaging.message.delivery_count": attempts,
                "tessera.tenant_id": envelope.tenant_id,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                handled = await self._apply(envelope, payload)
            except Exception as error:
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, str(error)))
                FAILED.labels(spec.name).inc()
                log.warning(
                    "event handler failed",
                    consumer=spec.name,
                    event_id=envelope.id,
                    event_type=envelope.type,
                    attempts=attempts,
                    max_deliver=spec.max_deliver,
                    error=repr(error),
                )
                if attempts >= spec.max_deliver:
                    await self._dead_letter(msg, event_id=envelope.id, error=error, attempts=attempts)
                    return "dead_lettered"
                await msg.nak(delay=spec.backoff_for(attempts))
                return "failed"
            await msg.ack()
        if handled:
            HANDLED.labels(spec.name).inc()
            return "handled"
        DUPLICATES.labels(spec.name).inc()
        log.info("duplicate event skipped", consumer=spec.name, event_id=envelope.id, attempts=attempts)
        return "duplicate"

    def _decode(self, data: bytes) -> tuple[EventEnvelope, Message]:
        envelope = EventEnvelope()
        try:
            envelope.ParseFromString(data)
        except DecodeError as error:
            raise MalformedEventError(f"not an EventEnvelope: {error}") from error
        try:
            uuid.UUID(envelope.id)
        except ValueError as error:
            raise MalformedEventError(f"envelope id {envelope.id!r} is not a UUID") from error
        try:
            uuid.UUID(envelope.tenant_id)
        except ValueError as error:
            raise MalformedEventError(f"envelope tenant_id {envelope.tenant_id!r} is not a UUID") from error
        payload = self.spec.event_type()
        if not envelope.payload.Unpack(payload):
            raise MalformedEventError(
                f"payload is {envelope.payload.type_url!r}, expected {payload.DESCRIPTOR.full_name}"
            )
        return envelope, payload

    async def _apply(self, envelope: EventEnvelope, payload: Message) -> bool:
        async with self.db.unit_of_work(None, tenant_id=envelope.tenant_id) as uow:
            inserted = await uow.fetchval(self._inbox_insert, consumer=self.spec.name, event_id=uuid.UUID(envelope.id))
            if inserted is None:
                return False
            await self.spec.handler(uow, envelope, payload)
        return True

    async def _dead_letter(self, msg: Msg, *, event_id: str, error: BaseException, attempts: int) -> None:
        spec = self.spec
        meta = msg.metadata
        headers = {
            # One dead letter per stored message, even if this delivery is retried after a lost ack.
            MSG_ID_HEADER: f"{spec.name}:{meta.stream}:{meta.sequence.stream}",
            CONSUMER_HEADER: spec.name,
            ORIGINAL_SUBJECT_HEADER: msg.subject,
            EVENT_ID_HEADER: event_id,
            ERROR_HEADER: error_header(error),
            ATTEMPTS_HEADER: str(attempts),
            FAILED_AT_HEADER: datetime.now(UTC).isoformat(),
        }
        try:
            await self.broker.js.publish(dlq_subject(spec.name), msg.data, headers=headers)
        except Exception as publish_error:
            log.error(
                "dead-letter publish failed; retrying delivery",
                consumer=spec.name,
                event_id=event_id,
                error=repr(publish_error),
            )
            await msg.nak(delay=spec.backoff_for(attempts))
            return
        await msg.term()
        DEAD_LETTERED.labels(spec.name).inc()
        log.error(
            "event dead-lettered",
            consumer=spec.name,
            event_id=event_id,
            attempts=attempts,
            error=headers[ERROR_HEADER],
        )
