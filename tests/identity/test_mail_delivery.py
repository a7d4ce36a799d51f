"""Mail events end to end: JetStream -> kit consumer (identity schema inbox) -> real SMTP server. Gate S08.

Events are published on the real subjects (`tessera.identity.mail_requested`,
`tessera.tenancy.invitation_created`) of the session NATS; each test runs its own durable consumer
(a unique name), so events other tests left in the stream may reach it too: assertions look only at
the test's own recipient.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from nats.js.errors import NotFoundError

from migrations import runner
from services.identity.mail import (
    INVITATION_MAIL_CONSUMER,
    MAIL_REQUESTED_CONSUMER,
    RESET_PASSWORD,
    VERIFY_EMAIL,
    SmtpMailSender,
    invitation_mail_consumer,
    mail_requested_consumer,
    message_id_for,
)
from services.kit.broker import DLQ_STREAM, Broker
from services.kit.consumer import ConsumerSpec, EventConsumer, dlq_subject
from services.kit.db import Database
from services.kit.dlq import list_dead_letters, replay_all
from services.kit.events import build_envelope, subject_for
from tessera.common.v1.event_pb2 import EventEnvelope
from tessera.identity.v1.identity_events_pb2 import MailRequestedEvent
from tessera.tenancy.v1 import tenancy_events_pb2, tenancy_pb2
from tessera_cli.embedded import free_port
from tests.helpers import eventually
from tests.identity.mail_server import SmtpServer, running_smtp_server

pytestmark = pytest.mark.gate("S08")

BASE_URL = "https://app.tessera.test"
MAIL_FROM = "Tessera <no-reply@tessera.test>"
USER_LEVEL_TENANT = str(uuid.UUID(int=0))
FAST_RETRIES: dict[str, Any] = {"max_deliver": 3, "backoff": (0.05,)}


@pytest.fixture
async def identity_db(admin_url: str) -> AsyncIterator[Database]:
    """The identity service's database as its own login role (the consumer writes identity.inbox)."""
    db = Database(runner.service_url(admin_url, "identity"), service="identity", schema="identity", pool_size=4)
    try:
        yield db
    finally:
        await db.dispose()


@pytest.fixture
async def broker(nats_url: str) -> AsyncIterator[Broker]:
    b = Broker(nats_url, name=f"mail-test-{uuid.uuid4().hex[:6]}")
    await b.connect()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
def consumer_name() -> str:
    return f"mailtest-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def smtp() -> Any:
    with running_smtp_server() as server:
        yield server


def sender_for(server_port: int) -> SmtpMailSender:
    return SmtpMailSender("127.0.0.1", server_port, sender=MAIL_FROM, timeout=5)


@contextlib.asynccontextmanager
async def running(spec: ConsumerSpec[Any], db: Database, broker: Broker) -> AsyncIterator[EventConsumer]:
    """Run a consumer; afterwards remove its durable state and dead letters from the shared NATS."""
    consumer = EventConsumer(dataclasses.replace(spec, fetch_timeout=0.2), db, broker)
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()
        with contextlib.suppress(NotFoundError):
            await broker.js.delete_consumer(spec.stream, spec.name)
        with contextlib.suppress(NotFoundError):
            await broker.js.purge_stream(DLQ_STREAM, subject=dlq_subject(spec.name))


async def publish(broker: Broker, event: Message, envelope: EventEnvelope, *, msg_id: str | None = None) -> int:
    """Publish an envelope on the event's subject; its stream sequence."""
    ack = await broker.js.publish(
        subject_for(envelope.source, event),
        envelope.SerializeToString(),
        headers={"Nats-Msg-Id": msg_id or envelope.id},
    )
    assert not ack.duplicate
    return int(ack.seq)


def mail_request(to: str, template: str = VERIFY_EMAIL, **params: str) -> tuple[MailRequestedEvent, EventEnvelope]:
    event = MailRequestedEvent(to=to, template=template, params={"token": uuid.uuid4().hex, **params})
    envelope = build_envelope(event, source="identity", tenant_id=USER_LEVEL_TENANT, subject="users/test")
    return event, envelope


async def settled(broker: Broker, spec: ConsumerSpec[Any], seq: int) -> bool:
    """Whether the consumer has delivered up to `seq` and nothing awaits an ack."""
    info = await broker.js.consumer_info(spec.stream, spec.name)
    return bool(info.delivered.stream_seq >= seq and info.num_ack_pending == 0 and info.num_pending == 0)


async def inbox_rows(admin: asyncpg.Connection, consumer: str, event_id: str) -> int:
    return int(
        await admin.fetchval(
            "SELECT count(*) FROM identity.inbox WHERE consumer = $1 AND event_id = $2", consumer, uuid.UUID(event_id)
        )
    )


def recipient() -> str:
    return f"user-{uuid.uuid4().hex[:10]}@example.com"


async def test_a_mail_request_delivered_twice_sends_one_mail(
    smtp: SmtpServer, identity_db: Database, broker: Broker, consumer_name: str, admin_conn: asyncpg.Connection
) -> None:
    to = recipient()
    event, envelope = mail_request(to, VERIFY_EMAIL, display_name="Ada")
    spec = mail_requested_consumer(sender_for(smtp.port), base_url=BASE_URL, name=consumer_name, **FAST_RETRIES)

    async with running(spec, identity_db, broker):
        await publish(broker, event, envelope)
        # The same event again, past the stream's duplicate window (as a relay retry after a lost ack would).
        last = await publish(broker, event, envelope, msg_id=f"{envelope.id}:again")
        await eventually(lambda: settled(broker, spec, last), what="both deliveries handled")

    [mail] = smtp.to(to)
    assert mail.subject == "Verify your email address for Tessera"
    assert f"{BASE_URL}/verify-email?token={event.params['token']}" in mail.text
    assert mail.message["Message-ID"] == message_id_for(envelope.id)
    assert await inbox_rows(admin_conn, consumer_name, envelope.id) == 1


async def test_smtp_outage_dead_letters_the_mail_and_replay_sends_it_once(
    identity_db: Database, broker: Broker, consumer_name: str, admin_conn: asyncpg.Connection
) -> None:
    port = free_port()  # nothing listens here until the server "comes back"
    to = recipient()
    event, envelope = mail_request(to, RESET_PASSWORD)
    spec = mail_requested_consumer(sender_for(port), base_url=BASE_URL, name=consumer_name, **FAST_RETRIES)

    async with running(spec, identity_db, broker):
        await publish(broker, event, envelope)

        async def dead_letter() -> Any:
            letters = await list_dead_letters(broker.js, consumer=consumer_name, limit=10_000)
            return next((letter for letter in letters if letter.event_id == envelope.id), None)

        letter = await eventually(dead_letter, what="the mail request in the dead-letter stream")
        assert letter.attempts == spec.max_deliver
        assert "MailDeliveryError" in letter.error
        assert await inbox_rows(admin_conn, consumer_name, envelope.id) == 0

        with running_smtp_server(port=port) as smtp:
            assert await replay_all(broker.js, consumer=consumer_name) >= 1
            await eventually(lambda: _async(smtp.to(to)), what="the replayed mail")
            await eventually(
                lambda: inbox_rows(admin_conn, consumer_name, envelope.id), what="the inbox row of the replayed mail"
            )
            assert not [
                letter
                for letter in await list_dead_letters(broker.js, consumer=consumer_name, limit=10_000)
                if letter.event_id == envelope.id
            ]
            [mail] = smtp.to(to)
    assert f"{BASE_URL}/reset-password?token={event.params['token']}" in mail.text


async def test_invitation_created_mails_the_invitee(
    smtp: SmtpServer, identity_db: Database, broker: Broker, consumer_name: str
) -> None:
    to = recipient()
    workspace_id = str(uuid.uuid4())
    expires = timestamp_pb2.Timestamp()
    expires.FromDatetime(datetime(2030, 1, 2, 3, 4, tzinfo=UTC) + timedelta(seconds=30))
    event = tenancy_events_pb2.InvitationCreatedEvent(
        invitation=tenancy_pb2.Invitation(
            name=f"workspaces/{workspace_id}/invitations/{uuid.uuid4()}",
            email=to,
            role="member",
            inviter=f"users/{uuid.uuid4()}",
            expire_time=expires,
        ),
        token=f"inv_{uuid.UUID(workspace_id).hex}_secret",
        workspace_display_name="Acme Research",
    )
    envelope = build_envelope(event, source="tenancy", tenant_id=workspace_id, subject=event.invitation.name)
    spec = invitation_mail_consumer(sender_for(smtp.port), base_url=BASE_URL, name=consumer_name, **FAST_RETRIES)
    assert spec.filter_subject == "tessera.tenancy.invitation_created"

    async with running(spec, identity_db, broker):
        last = await publish(broker, event, envelope)
        await publish(broker, event, envelope, msg_id=f"{envelope.id}:again")
        await eventually(lambda: _async(smtp.to(to)), what="the invitation mail")
        await eventually(lambda: settled(broker, spec, last + 1), what="the duplicate handled")

    [mail] = smtp.to(to)
    assert mail.subject == "You are invited to join Acme Research on Tessera"
    assert f"{BASE_URL}/accept-invitation?token={event.token}" in mail.text
    assert "as member" in mail.text
    assert "2030-01-02 03:04 UTC" in mail.text


async def test_unknown_template_is_dead_lettered_without_sending(
    smtp: SmtpServer, identity_db: Database, broker: Broker, consumer_name: str
) -> None:
    to = recipient()
    event, envelope = mail_request(to, "newsletter")
    spec = mail_requested_consumer(sender_for(smtp.port), base_url=BASE_URL, name=consumer_name, **FAST_RETRIES)

    async with running(spec, identity_db, broker):
        await publish(broker, event, envelope)

        async def dead_letter() -> Any:
            letters = await list_dead_letters(broker.js, consumer=consumer_name, limit=10_000)
            return next((letter for letter in letters if letter.event_id == envelope.id), None)

        letter = await eventually(dead_letter, what="the bad request dead-lettered")
    assert "MailTemplateError" in letter.error
    assert smtp.to(to) == []


def test_production_consumer_names() -> None:
    sender = sender_for(25)
    assert mail_requested_consumer(sender, base_url=BASE_URL).name == MAIL_REQUESTED_CONSUMER == "identity-mailer"
    spec = invitation_mail_consumer(sender, base_url=BASE_URL)
    assert spec.name == INVITATION_MAIL_CONSUMER == "identity-invitation-mailer"
    assert spec.stream == "TESSERA_TENANCY"


async def _async(value: Any) -> Any:
    return value
