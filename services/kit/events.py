"""Event envelopes and subjects (`tessera.<domain>.<event>`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from services.kit.ids import uuid7
from tessera.common.v1.event_pb2 import EventEnvelope

SUBJECT_PREFIX = "tessera"
DLQ_SUBJECT_PREFIX = "tessera_dlq"
ENVELOPE_SCHEMA_VERSION = 1

_CAMEL_BOUNDARY = re.compile(r"(?<!^)(?=[A-Z])")


def event_name(message_name: str) -> str:
    """`WorkspaceCreatedEvent` -> `workspace_created`."""
    return _CAMEL_BOUNDARY.sub("_", message_name.removesuffix("Event")).lower()


def subject_for(source: str, event: Message) -> str:
    """The NATS subject an event of `source` is published on."""
    return f"{SUBJECT_PREFIX}.{source}.{event_name(event.DESCRIPTOR.name)}"


def stream_name(source: str) -> str:
    """The JetStream stream holding one domain's events."""
    return f"TESSERA_{source.upper()}"


def build_envelope(
    event: Message,
    *,
    source: str,
    tenant_id: str,
    subject: str,
    request_id: str = "",
    traceparent: str = "",
    tracestate: str = "",
    occurred_at: datetime | None = None,
) -> EventEnvelope:
    """Wrap an event payload in the common envelope with a fresh UUIDv7 id."""
    payload = any_pb2.Any()
    payload.Pack(event)
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(occurred_at or datetime.now(UTC))
    return EventEnvelope(
        id=str(uuid7()),
        type=event.DESCRIPTOR.full_name,
        source=source,
        tenant_id=tenant_id,
        subject=subject,
        occurred_at=ts,
        traceparent=traceparent,
        tracestate=tracestate,
        schema_version=ENVELOPE_SCHEMA_VERSION,
        payload=payload,
        request_id=request_id,
    )
