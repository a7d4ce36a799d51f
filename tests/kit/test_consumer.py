"""The event consumer: one unit of work per event for its tenant, retries with backoff, bounded concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from services.kit.broker import Broker
from services.kit.consumer import ConsumerSpec, EventConsumer
from services.kit.db import Database, UnitOfWork
from services.kit.dlq import DeadLetter, list_dead_letters
from services.kit.events import build_envelope, subject_for
from services.kit.ids import uuid7
from tessera.common.v1.event_pb2 import EventEnvelope
from tessera.tenancy.v1.tenancy_events_pb2 import WorkspaceCreatedEvent, WorkspaceProvisionedEvent
from tests.helpers import eventually
from tests.kit.conftest import KIT_SCHEMA, apply_effect, effects, workspace_event

TENANT_A = str(uuid7())
TENANT_B = str(uuid7())

Handler = Callable[[UnitOfWork, EventEnvelope, WorkspaceCreatedEvent], Awaitable[None]]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def publish(broker: Broker, source: str, envelope: EventEnvelope, *, msg_id: str | None = None) -> None:
    await broker.js.publish(
        subject_for(source, WorkspaceCreatedEvent()),
        envelope.SerializeToString(),
        headers={"Nats-Msg-Id": msg_id or envelope.id},
    )


def new_envelope(source: str, tenant: str = TENANT_A) -> EventEnvelope:
    event = workspace_event()
    return build_envelope(event, source=source, tenant_id=tenant, subject=event.workspace.name)


@pytest.fixture
async def run_consumer(
    kit_db: Database, broker: Broker, kit_source: str, dlq_consumers: list[str]
) -> AsyncIterator[Callable[..., Awaitable[EventConsumer]]]:
    """Start a consumer on the test's source; every consumer started is stopped at the end."""
    started: list[EventConsumer] = []

    async def start(name: str, handler: Handler, **options: object) -> EventConsumer:
        options.setdefault("backoff", (0.05,))
        options.setdefault("fetch_timeout", 0.3)
        spec = ConsumerSpec(name, kit_source, WorkspaceCreatedEvent, handler, **options)  # type: ignore[arg-type]  # options are the spec's keyword fields
        consumer = EventConsumer(spec, kit_db, broker)
        dlq_consumers.append(name)
        await consumer.start()
        started.append(consumer)
        return consumer

    try:
        yield start
    finally:
        for consumer in reversed(started):
            await consumer.stop()


@pytest.mark.gate("S08")
async def test_handler_runs_in_the_events_tenant_and_commits_with_the_inbox(
    run_consumer: Callable[..., Awaitable[EventConsumer]],
    broker: Broker,
    kit_source: str,
    kit_clean: asyncpg.Connection,
) -> None:
    name = f"{kit_source}_notes"
    seen: list[tuple[str, str]] = []

    async def handler(uow: UnitOfWork, envelope: EventEnvelope, payload: WorkspaceCreatedEvent) -> None:
        # RLS on notes only admits the row if the unit of work runs in the event's tenant.
        await uow.execute(
            sa.text(f"INSERT INTO {KIT_SCHEMA}.notes (tenant_id, id, body) VALUES (CAST(:t AS uuid), :id, :body)"),
            t=envelope.tenant_id,
            id=uuid7(),
            body=payload.workspace.display_name,
        )
        tenant = await uow.fetchval(sa.text("SELECT current_setting('tessera.tenant_id', true)"))
        seen.append((envelope.tenant_id, tenant))
        await apply_effect(uow, name, envelope)

    await run_consumer(name, handler)
    envelopes = [new_envelope(kit_source, TENANT_A), new_envelope(kit_source, TENANT_B)]
    for envelope in envelopes:
        await publish(broker, kit_source, envelope)

    async def both_applied() -> bool:
        return len(await effects(kit_clean, name)) == 2

    await eventually(both_applied)
    assert sorted(seen) == sorted([(TENANT_A, TENANT_A), (TENANT_B, TENANT_B)])
    tenants = await kit_clean.fetch(f"SELECT tenant_id::text AS t FROM {KIT_SCHEMA}.notes")
    assert sorted(row["t"] for row in tenants) == sorted([TENANT_A, TENANT_B])
    inbox = await kit_clean.fetch(f"SELECT event_id::text AS e FROM {KIT_SCHEMA}.inbox WHERE consumer = $1", name)
    assert sorted(row["e"] for row in inbox) == sorted(envelope.id for envelope in envelopes)


@pytest.mark.gate("S08")
async def test_a_transient_failure_rolls_back_and_is_retried_until_it_succeeds(
    run_consumer: Callable[..., Awaitable[EventConsumer]],
    broker: Broker,
    kit_source: str,
    kit_clean: asyncpg.Connection,
) -> None:
    name = f"{kit_source}_flaky"
    attempts: list[int] = []

    async def handler(uow: UnitOfWork, envelope: EventEnvelope, payload: WorkspaceCreatedEvent) -> None:
        await apply_effect(uow, name, envelope)  # written, then rolled back by the failure below
        attempts.append(len(attempts) + 1)
        if len(attempts) < 3:
            raise RuntimeError(f"transient failure {len(attempts)}")

    failed_before = metric("tessera_consumer_failed_total", consumer=name)
    await run_consumer(name, handler, max_deliver=5, backoff=(0.05, 0.1))
    envelope = new_envelope(kit_source)
    await publish(broker, kit_source, envelope)

    async def applied() -> dict[str, int]:
        return await effects(kit_clean, name)

    assert await eventually(applied) == {envelope.id: 1}
    assert attempts == [1, 2, 3]
    assert metric("tessera_consumer_failed_total", consumer=name) - failed_before == 2
    assert metric("tessera_consumer_handled_total", consumer=name) == 1
    assert await list_dead_letters(broker.js, consumer=name) == []


@pytest.mark.gate("S08")
async def test_malformed_and_mistyped_messages_are_dead_lettered_at_once(
    run_consumer: Callable[..., Awaitable[EventConsumer]],
    broker: Broker,
    kit_source: str,
    kit_clean: asyncpg.Connection,
) -> None:
    name = f"{kit_source}_strict"
    calls: list[str] = []

    async def handler(uow: UnitOfWork, envelope: EventEnvelope, payload: WorkspaceCreatedEvent) -> None:
        calls.append(envelope.id)

    await run_consumer(name, handler, max_deliver=5)
    subject = subject_for(kit_source, WorkspaceCreatedEvent())
    await broker.js.publish(subject, b"\xff\xff not protobuf", headers={"Nats-Msg-Id": str(uuid7())})
    wrong = build_envelope(
        WorkspaceProvisionedEvent(workspace=workspace_event().workspace),
        source=kit_source,
        tenant_id=TENANT_A,
        subject="workspaces/x",
    )
    await broker.js.publish(subject, wrong.SerializeToString(), headers={"Nats-Msg-Id": wrong.id})

    async def two_dead_letters() -> list[DeadLetter]:
        letters = await list_dead_letters(broker.js, consumer=name)
        return letters if len(letters) == 2 else []

    garbage, mistyped = await eventually(two_dead_letters)
    assert garbage.attempts == 1
    assert garbage.event_id == ""
    assert "not an EventEnvelope" in garbage.error
    assert garbage.data == b"\xff\xff not protobuf"
    assert mistyped.attempts == 1
    assert mistyped.event_id == wrong.id
    assert "WorkspaceCreatedEvent" in mistyped.error
    assert mistyped.envelope == wrong
    assert calls == []
    assert await kit_clean.fetchval(f"SELECT count(*) FROM {KIT_SCHEMA}.inbox") == 0


@pytest.mark.gate("S08")
async def test_concurrency_is_bounded_and_stop_waits_for_in_flight_handlers(
    run_consumer: Callable[..., Awaitable[EventConsumer]],
    broker: Broker,
    kit_source: str,
    kit_clean: asyncpg.Connection,
) -> None:
    name = f"{kit_source}_bounded"
    release = asyncio.Event()
    running = 0
    peak = 0

    async def handler(uow: UnitOfWork, envelope: EventEnvelope, payload: WorkspaceCreatedEvent) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await release.wait()
            await apply_effect(uow, name, envelope)
        finally:
            running -= 1

    consumer = await run_consumer(name, handler, max_in_flight=3)
    envelopes = [new_envelope(kit_source) for _ in range(8)]
    for envelope in envelopes:
        await publish(broker, kit_source, envelope)

    async def saturated() -> bool:
        return running == 3

    await eventually(saturated, what="three handlers in flight")
    await asyncio.sleep(0.1)  # a fourth handler, if the bound leaked, would have started by now
    assert peak == 3

    # Stop while handlers are still running: stop() lets them finish and commit.
    release.set()
    await consumer.stop()
    assert running == 0
    applied = await effects(kit_clean, name)
    assert applied
    assert set(applied.values()) == {1}
    info = await broker.js.consumer_info(consumer.spec.stream, name)
    assert info.num_ack_pending == 0, "every message a stopped consumer took was settled"

    # A new instance of the durable consumer picks up the rest; nothing is handled twice.
    await run_consumer(name, handler, max_in_flight=3)

    async def all_applied() -> dict[str, int] | None:
        done = await effects(kit_clean, name)
        return done if len(done) == len(envelopes) else None

    assert await eventually(all_applied) == {envelope.id: 1 for envelope in envelopes}
    assert peak == 3
