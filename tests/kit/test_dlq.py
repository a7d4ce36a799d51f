"""Dead letters: a handler that always fails ends in the dead-letter stream; replay reaches only its consumer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from prometheus_client import REGISTRY

from services.kit.broker import DLQ_STREAM, Broker
from services.kit.consumer import ConsumerSpec, EventConsumer
from services.kit.db import Database, UnitOfWork
from services.kit.dlq import DeadLetter, DeadLetterNotFoundError, list_dead_letters, replay, replay_all
from services.kit.events import build_envelope, subject_for
from services.kit.ids import uuid7
from services.kit.relay import OutboxRelay
from tessera.common.v1.event_pb2 import EventEnvelope
from tessera.tenancy.v1.tenancy_events_pb2 import WorkspaceCreatedEvent
from tests.helpers import eventually
from tests.kit.conftest import apply_effect, effects, workspace_event

TENANT = str(uuid7())

Handler = Callable[[UnitOfWork, EventEnvelope, WorkspaceCreatedEvent], Awaitable[None]]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def consumers(
    kit_db: Database, broker: Broker, kit_source: str, dlq_consumers: list[str]
) -> AsyncIterator[Callable[..., Awaitable[EventConsumer]]]:
    started: list[EventConsumer] = []

    async def start(name: str, handler: Handler, **options: object) -> EventConsumer:
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


async def dead_letters_of(broker: Broker, consumer: str, count: int) -> list[DeadLetter] | None:
    letters = await list_dead_letters(broker.js, consumer=consumer)
    return letters if len(letters) == count else None


@pytest.mark.gate("S08")
async def test_failing_handler_is_dead_lettered_and_replay_applies_it_once_for_that_consumer_only(
    consumers: Callable[..., Awaitable[EventConsumer]],
    kit_db: Database,
    broker: Broker,
    kit_source: str,
    kit_clean: asyncpg.Connection,
) -> None:
    failing, bystander = f"{kit_source}_failing", f"{kit_source}_bystander"
    fixed = False
    failing_calls: list[str] = []
    bystander_calls: list[str] = []

    async def failing_handler(uow: UnitOfWork, envelope: EventEnvelope, payload: WorkspaceCreatedEvent) -> None:
        failing_calls.append(envelope.id)
        await apply_effect(uow, failing, envelope)
        if not fixed:
            raise RuntimeError(f"cannot handle {payload.workspace.name}\nsecond line of the error")

    async def bystander_handler(uow: UnitOfWork, envelope: EventEnvelope, payload: WorkspaceCreatedEvent) -> None:
        bystander_calls.append(envelope.id)
        await apply_effect(uow, bystander, envelope)

    await consumers(failing, failing_handler, max_deliver=3, backoff=(0.05, 0.1))
    await consumers(bystander, bystander_handler)
    relay = OutboxRelay(kit_db, broker, poll_seconds=0.1)
    await relay.start()
    try:
        async with kit_db.unit_of_work(None, tenant_id=TENANT) as uow:
            event = workspace_event()
            envelope = uow.emit(event, subject=event.workspace.name)
        dead_before = metric("tessera_consumer_dead_lettered_total", consumer=failing)
        before_failure = datetime.now(UTC) - timedelta(seconds=1)

        letters = await eventually(lambda: dead_letters_of(broker, failing, 1), what="the dead letter")
        [letter] = letters
        assert failing_calls == [envelope.id] * 3
        assert letter.consumer == failing
        assert letter.event_id == envelope.id
        assert letter.attempts == 3
        assert letter.original_subject == f"tessera.{kit_source}.workspace_created"
        assert letter.error.startswith("RuntimeError: cannot handle workspaces/")
        assert "\n" not in letter.error
        assert "second line of the error" in letter.error
        assert letter.failed_at is not None
        assert letter.failed_at >= before_failure
        assert letter.envelope == envelope
        assert metric("tessera_consumer_dead_lettered_total", consumer=failing) - dead_before == 1
        assert await effects(kit_clean, failing) == {}
        assert await effects(kit_clean, bystander) == {envelope.id: 1}
        info = await broker.js.consumer_info(f"TESSERA_{kit_source.upper()}", failing)
        assert info.num_ack_pending == 0, "the dead-lettered original is settled, not redelivered"

        fixed = True
        skipped_before = metric("tessera_consumer_replays_skipped_total", consumer=bystander)
        duplicates_before = metric("tessera_consumer_duplicates_total", consumer=bystander)
        replayed = await replay(broker.js, letter.seq)
        assert replayed.event_id == envelope.id

        async def applied_once() -> dict[str, int]:
            return await effects(kit_clean, failing)

        assert await eventually(applied_once) == {envelope.id: 1}

        async def bystander_skipped() -> bool:
            return metric("tessera_consumer_replays_skipped_total", consumer=bystander) - skipped_before == 1

        await eventually(bystander_skipped, what="the bystander to skip the replay")
        assert failing_calls == [envelope.id] * 4
        assert bystander_calls == [envelope.id], "the other consumer did not handle the replay"
        assert metric("tessera_consumer_duplicates_total", consumer=bystander) == duplicates_before
        assert await effects(kit_clean, bystander) == {envelope.id: 1}
        assert await list_dead_letters(broker.js, consumer=failing) == []
        with pytest.raises(DeadLetterNotFoundError):
            await replay(broker.js, letter.seq)
    finally:
        await relay.stop()


@pytest.mark.gate("S08")
async def test_list_filters_by_consumer_and_replay_all_replays_each_once(
    consumers: Callable[..., Awaitable[EventConsumer]],
    broker: Broker,
    kit_source: str,
    kit_clean: asyncpg.Connection,
) -> None:
    first, second = f"{kit_source}_first", f"{kit_source}_second"
    broken = True

    def handler_for(name: str) -> Handler:
        async def handler(uow: UnitOfWork, envelope: EventEnvelope, payload: WorkspaceCreatedEvent) -> None:
            if broken:
                raise ValueError("still broken")
            await apply_effect(uow, name, envelope)

        return handler

    await consumers(first, handler_for(first), max_deliver=1)
    await consumers(second, handler_for(second), max_deliver=2, backoff=(0.02,))
    envelopes = []
    for _ in range(3):
        event = workspace_event()
        envelope = build_envelope(event, source=kit_source, tenant_id=TENANT, subject=event.workspace.name)
        envelopes.append(envelope)
        await broker.js.publish(
            subject_for(kit_source, event), envelope.SerializeToString(), headers={"Nats-Msg-Id": envelope.id}
        )

    await eventually(lambda: dead_letters_of(broker, first, 3), what="three dead letters of the first consumer")
    await eventually(lambda: dead_letters_of(broker, second, 3), what="three dead letters of the second consumer")
    listed = await list_dead_letters(broker.js, consumer=first)
    # Handlers run concurrently, so the dead letters may be stored in any order.
    assert sorted(letter.event_id for letter in listed) == sorted(envelope.id for envelope in envelopes)
    assert {letter.attempts for letter in listed} == {1}
    assert [letter.seq for letter in listed] == sorted(letter.seq for letter in listed)
    assert len(await list_dead_letters(broker.js, consumer=first, limit=2)) == 2
    everyone = await list_dead_letters(broker.js, limit=10_000)
    mine = [letter for letter in everyone if letter.consumer in (first, second)]
    assert len(mine) == 6

    broken = False
    assert await replay_all(broker.js, consumer=first) == 3
    assert await list_dead_letters(broker.js, consumer=first) == []
    assert len(await list_dead_letters(broker.js, consumer=second)) == 3, "other consumers' letters stay"

    async def first_applied() -> dict[str, int] | None:
        done = await effects(kit_clean, first)
        return done if len(done) == 3 else None

    assert await eventually(first_applied) == {envelope.id: 1 for envelope in envelopes}
    assert await replay_all(broker.js, consumer=second) == 3

    async def second_applied() -> dict[str, int] | None:
        done = await effects(kit_clean, second)
        return done if len(done) == 3 else None

    assert await eventually(second_applied) == {envelope.id: 1 for envelope in envelopes}
    assert await effects(kit_clean, first) == {envelope.id: 1 for envelope in envelopes}


@pytest.mark.gate("S08")
async def test_replay_of_an_unknown_sequence_fails_clearly(broker: Broker, kit_source: str) -> None:
    await broker.ensure_streams(kit_source)
    info = await broker.js.stream_info(DLQ_STREAM)
    with pytest.raises(DeadLetterNotFoundError):
        await replay(broker.js, info.state.last_seq + 1000)
