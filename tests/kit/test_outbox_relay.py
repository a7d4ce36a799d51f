"""The outbox relay: no event lost while NATS is down, none applied twice, nothing left behind at stop."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import REGISTRY

from services.kit.broker import Broker
from services.kit.consumer import ConsumerSpec, EventConsumer
from services.kit.db import Database, UnitOfWork
from services.kit.events import build_envelope, stream_name, subject_for
from services.kit.ids import uuid7
from services.kit.relay import OutboxRelay
from tessera.common.v1.event_pb2 import EventEnvelope
from tessera.tenancy.v1.tenancy_events_pb2 import WorkspaceCreatedEvent
from tessera_cli.embedded import EmbeddedNats
from tests.helpers import eventually
from tests.kit.conftest import KIT_SCHEMA, apply_effect, effects, outbox_count, workspace_event

TENANT_A = str(uuid7())
TENANT_B = str(uuid7())
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def emit_events(db: Database, count: int) -> list[EventEnvelope]:
    """Commit `count` units of work for alternating tenants, each emitting one event."""
    envelopes = []
    for i in range(count):
        tenant = TENANT_A if i % 2 else TENANT_B
        async with db.unit_of_work(None, tenant_id=tenant) as uow:
            event = workspace_event(f"ws {i}")
            envelopes.append(uow.emit(event, subject=event.workspace.name))
    return envelopes


async def insert_raw_outbox_row(admin: asyncpg.Connection, source: str, *, traceparent: str = "") -> EventEnvelope:
    """An outbox row written behind the relay's back (no wake-up), as another process would."""
    event = workspace_event()
    envelope = build_envelope(
        event, source=source, tenant_id=TENANT_A, subject=event.workspace.name, traceparent=traceparent
    )
    await admin.execute(
        f"INSERT INTO {KIT_SCHEMA}.outbox (id, nats_subject, envelope) VALUES ($1, $2, $3)",
        uuid.UUID(envelope.id),
        subject_for(source, event),
        envelope.SerializeToString(),
    )
    return envelope


async def stream_messages(broker: Broker, source: str) -> int:
    return int((await broker.js.stream_info(stream_name(source))).state.messages)


@pytest.mark.gate("S08")
async def test_events_wait_out_a_nats_outage_and_each_is_applied_exactly_once(
    private_nats: EmbeddedNats, kit_db: Database, kit_clean: asyncpg.Connection, kit_source: str
) -> None:
    count = 20
    consumer_name = f"{kit_source}_effects"

    async def handler(uow: UnitOfWork, envelope: EventEnvelope, payload: WorkspaceCreatedEvent) -> None:
        assert payload.workspace.name.startswith("workspaces/")
        await apply_effect(uow, consumer_name, envelope)

    broker = Broker(private_nats.url, name="kit-durability", reconnect_time_wait=0.1)
    await broker.connect()
    relay = OutboxRelay(kit_db, broker, poll_seconds=0.1)
    spec = ConsumerSpec(consumer_name, kit_source, WorkspaceCreatedEvent, handler, backoff=(0.05,), fetch_timeout=0.5)
    consumer = EventConsumer(spec, kit_db, broker)
    await relay.start()
    await consumer.start()
    try:
        await asyncio.to_thread(private_nats.stop)

        async def disconnected() -> bool:
            return not broker.is_connected

        await eventually(disconnected, what="the broker to notice the outage")
        failures_before = metric("tessera_outbox_publish_failures_total", service=kit_source)

        envelopes = await emit_events(kit_db, count)

        async def failed_attempt_recorded() -> bool:
            return bool(await kit_clean.fetchval(f"SELECT max(attempts) > 0 FROM {KIT_SCHEMA}.outbox"))

        await eventually(failed_attempt_recorded, what="the relay to record a failed publish")
        assert await outbox_count(kit_clean) == count
        last_error = await kit_clean.fetchval(
            f"SELECT last_error FROM {KIT_SCHEMA}.outbox WHERE last_error IS NOT NULL LIMIT 1"
        )
        assert "not connected" in last_error
        assert metric("tessera_outbox_publish_failures_total", service=kit_source) > failures_before
        assert await effects(kit_clean, consumer_name) == {}

        await asyncio.to_thread(private_nats.start)

        async def all_applied() -> dict[str, int] | None:
            applied = await effects(kit_clean, consumer_name)
            if len(applied) == count and await outbox_count(kit_clean) == 0:
                return applied
            return None

        applied = await eventually(all_applied, timeout=30, what="every event to reach the consumer")
        assert applied == {envelope.id: 1 for envelope in envelopes}
        assert await stream_messages(broker, kit_source) == count

        # Redeliveries with new message ids pass JetStream's dedup: only the inbox stops them.
        duplicates_before = metric("tessera_consumer_duplicates_total", consumer=consumer_name)
        handled_before = metric("tessera_consumer_handled_total", consumer=consumer_name)
        again = envelopes[:5]
        for envelope in again:
            await broker.js.publish(
                subject_for(kit_source, WorkspaceCreatedEvent()),
                envelope.SerializeToString(),
                headers={"Nats-Msg-Id": f"{envelope.id}:again"},
            )
        assert await stream_messages(broker, kit_source) == count + len(again)

        async def duplicates_seen() -> bool:
            seen = metric("tessera_consumer_duplicates_total", consumer=consumer_name) - duplicates_before
            return seen >= len(again)

        await eventually(duplicates_seen, what="the duplicates to be skipped")
        assert metric("tessera_consumer_duplicates_total", consumer=consumer_name) - duplicates_before == len(again)
        assert metric("tessera_consumer_handled_total", consumer=consumer_name) == handled_before
        assert await effects(kit_clean, consumer_name) == {envelope.id: 1 for envelope in envelopes}
        inbox = await kit_clean.fetchval(f"SELECT count(*) FROM {KIT_SCHEMA}.inbox WHERE consumer = $1", consumer_name)
        assert inbox == count
    finally:
        await consumer.stop()
        await relay.stop()
        await broker.close()


@pytest.mark.gate("S08")
async def test_relay_keeps_a_row_it_cannot_publish_and_sends_it_once_possible(
    kit_db: Database, kit_clean: asyncpg.Connection, broker: Broker, kit_source: str
) -> None:
    relay = OutboxRelay(kit_db, broker)  # not started: the source's stream does not exist yet
    [envelope] = await emit_events(kit_db, 1)
    traced = await insert_raw_outbox_row(kit_clean, kit_source, traceparent=TRACEPARENT)

    assert await relay.relay_once() == (0, True)
    row = await kit_clean.fetchrow(
        f"SELECT attempts, last_error FROM {KIT_SCHEMA}.outbox WHERE id = $1", uuid.UUID(envelope.id)
    )
    assert row is not None
    assert row["attempts"] == 1
    assert "NoStreamResponseError" in row["last_error"]
    assert await outbox_count(kit_clean) == 2

    await relay.start()  # creates the stream
    try:
        await relay.flush(5)
        assert await outbox_count(kit_clean) == 0
        stream = stream_name(kit_source)
        first = await broker.js.get_msg(stream, seq=1)
        second = await broker.js.get_msg(stream, seq=2)
        assert first.subject == f"tessera.{kit_source}.workspace_created"
        assert first.data == envelope.SerializeToString()
        assert first.headers is not None
        assert first.headers["Nats-Msg-Id"] == envelope.id
        assert "traceparent" not in first.headers
        assert second.headers is not None
        assert second.headers["Nats-Msg-Id"] == traced.id
        assert second.headers["traceparent"] == TRACEPARENT
        assert EventEnvelope.FromString(second.data or b"") == traced
    finally:
        await relay.stop()


@pytest.mark.gate("S08")
async def test_stop_flushes_events_committed_right_before_it(
    kit_db: Database, kit_clean: asyncpg.Connection, broker: Broker, kit_source: str
) -> None:
    relay = OutboxRelay(kit_db, broker, poll_seconds=60)
    await relay.start()
    await emit_events(kit_db, 5)
    # Rows the relay is never woken for: only the flush in stop() can publish them before the next poll.
    for _ in range(5):
        await insert_raw_outbox_row(kit_clean, kit_source)
    started = time.monotonic()
    await relay.stop()
    assert time.monotonic() - started < 5
    assert await outbox_count(kit_clean) == 0
    assert await stream_messages(broker, kit_source) == 10


@pytest.mark.gate("S08")
async def test_flush_times_out_while_the_broker_is_down(
    tmp_path: Path, kit_db: Database, kit_clean: asyncpg.Connection, kit_source: str
) -> None:
    server = EmbeddedNats(tmp_path / "nats").start()
    broker = Broker(server.url, name="kit-flush-timeout", reconnect_time_wait=0.1)
    try:
        await broker.connect()
        relay = OutboxRelay(kit_db, broker, poll_seconds=60, stop_timeout=0.5)
        await broker.ensure_streams(kit_source)
        await asyncio.to_thread(server.stop)
        await emit_events(kit_db, 2)
        with pytest.raises(TimeoutError):
            await relay.flush(0.3)
        await relay.stop()  # bounded by stop_timeout, rows kept
        assert await outbox_count(kit_clean) == 2
    finally:
        await broker.close()
        server.stop()


@pytest.mark.gate("S08")
async def test_two_relay_replicas_publish_each_row_once(
    kit_db_url: str, kit_db: Database, kit_clean: asyncpg.Connection, broker: Broker, kit_source: str
) -> None:
    other_db = Database(kit_db_url, service=kit_source, schema=KIT_SCHEMA, pool_size=2)
    relays = [OutboxRelay(kit_db, broker, batch_size=7), OutboxRelay(other_db, broker, batch_size=7)]
    published_before = metric("tessera_outbox_published_total", service=kit_source)
    lag_before = metric("tessera_outbox_publish_lag_seconds_count", service=kit_source)
    count = 60
    try:
        for _ in range(count):
            await insert_raw_outbox_row(kit_clean, kit_source)
        await asyncio.gather(*(relay.start() for relay in relays))

        async def drained() -> bool:
            return await outbox_count(kit_clean) == 0

        await eventually(drained, what="both relays to drain the outbox")
        assert metric("tessera_outbox_published_total", service=kit_source) - published_before == count
        assert metric("tessera_outbox_publish_lag_seconds_count", service=kit_source) - lag_before == count
        assert metric("tessera_outbox_pending", service=kit_source) == 0
        assert await stream_messages(broker, kit_source) == count
    finally:
        await asyncio.gather(*(relay.stop() for relay in relays))
        await other_db.dispose()
