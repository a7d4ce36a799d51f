"""Dead letters: list them without consuming them, and replay them to the consumer that gave up.

A replay republishes the original envelope on its original subject with a new `Nats-Msg-Id` (so the
stream's duplicate window does not swallow it) and `Tessera-Replay-For: <consumer>`, which every other
consumer of that subject acknowledges without handling. The dead letter is deleted afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.message import DecodeError
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from services.kit.broker import DLQ_STREAM
from services.kit.consumer import (
    ATTEMPTS_HEADER,
    CONSUMER_HEADER,
    ERROR_HEADER,
    EVENT_ID_HEADER,
    FAILED_AT_HEADER,
    MSG_ID_HEADER,
    ORIGINAL_SUBJECT_HEADER,
    REPLAY_FOR_HEADER,
    dlq_subject,
)
from services.kit.events import DLQ_SUBJECT_PREFIX
from tessera.common.v1.event_pb2 import EventEnvelope


class DeadLetterNotFoundError(LookupError):
    """No dead letter with that sequence number (already replayed or deleted)."""


@dataclass(frozen=True)
class DeadLetter:
    """One message a consumer gave up on, with the last error and the number of deliveries."""

    seq: int
    consumer: str
    original_subject: str
    event_id: str
    error: str
    attempts: int
    failed_at: datetime | None
    envelope: EventEnvelope
    data: bytes = b""


def _parse_time(value: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _dead_letter(raw: RawStreamMsg) -> DeadLetter:
    headers: dict[str, str] = dict(raw.headers or {})
    data = raw.data or b""
    envelope = EventEnvelope()
    with contextlib.suppress(DecodeError):  # a malformed message is dead-lettered as it came
        envelope.ParseFromString(data)
    subject = raw.subject or ""
    consumer = headers.get(CONSUMER_HEADER) or subject.removeprefix(f"{DLQ_SUBJECT_PREFIX}.")
    try:
        attempts = int(headers.get(ATTEMPTS_HEADER, "0"))
    except ValueError:
        attempts = 0
    return DeadLetter(
        seq=raw.seq or 0,
        consumer=consumer,
        original_subject=headers.get(ORIGINAL_SUBJECT_HEADER, ""),
        event_id=headers.get(EVENT_ID_HEADER) or envelope.id,
        error=headers.get(ERROR_HEADER, ""),
        attempts=attempts,
        failed_at=_parse_time(headers.get(FAILED_AT_HEADER, "")),
        envelope=envelope,
        data=data,
    )


async def _scan(js: JetStreamContext, consumer: str | None) -> AsyncIterator[DeadLetter]:
    """Dead letters from oldest to newest, up to the last one stored when the scan began."""
    try:
        info = await js.stream_info(DLQ_STREAM)
    except NotFoundError:
        return
    subject = dlq_subject(consumer) if consumer else f"{DLQ_SUBJECT_PREFIX}.>"
    seq, last = max(info.state.first_seq, 1), info.state.last_seq
    while seq <= last:
        try:
            raw = await js.get_msg(DLQ_STREAM, seq=seq, subject=subject, next=True)
        except NotFoundError:
            return
        if raw.seq is None or raw.seq > last:
            return
        yield _dead_letter(raw)
        seq = raw.seq + 1


async def list_dead_letters(js: JetStreamContext, *, consumer: str | None = None, limit: int = 100) -> list[DeadLetter]:
    """The oldest `limit` dead letters (of one consumer, or all), read without consuming them."""
    letters: list[DeadLetter] = []
    if limit <= 0:
        return letters
    async for letter in _scan(js, consumer):
        letters.append(letter)
        if len(letters) >= limit:
            break
    return letters


async def get_dead_letter(js: JetStreamContext, seq: int) -> DeadLetter:
    """One dead letter by its sequence number in the dead-letter stream."""
    try:
        raw = await js.get_msg(DLQ_STREAM, seq=seq)
    except NotFoundError as error:
        raise DeadLetterNotFoundError(f"no dead letter with sequence {seq}") from error
    return _dead_letter(raw)


async def replay(js: JetStreamContext, seq: int) -> DeadLetter:
    """Republish one dead letter to its original subject, for its consumer only, then delete it."""
    letter = await get_dead_letter(js, seq)
    if not letter.original_subject or not letter.consumer:
        raise ValueError(f"dead letter {seq} lacks its original subject or consumer")
    headers = {
        MSG_ID_HEADER: f"{letter.event_id or 'unknown'}:replay:{seq}",
        REPLAY_FOR_HEADER: letter.consumer,
    }
    if letter.envelope.traceparent:
        headers["traceparent"] = letter.envelope.traceparent
    await js.publish(letter.original_subject, letter.data, headers=headers)
    await js.delete_msg(DLQ_STREAM, seq)
    return letter


async def replay_all(js: JetStreamContext, *, consumer: str | None = None) -> int:
    """Replay every dead letter stored now (of one consumer, or all); the number replayed."""
    count = 0
    async for letter in _scan(js, consumer):
        try:
            await replay(js, letter.seq)
        except DeadLetterNotFoundError:
            continue  # replayed concurrently by someone else
        count += 1
    return count
