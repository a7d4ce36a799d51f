"""`tessera events dlq list|replay` against a real NATS."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid

import pytest

from services.kit.broker import DLQ_STREAM, Broker
from services.kit.consumer import (
    ATTEMPTS_HEADER,
    CONSUMER_HEADER,
    ERROR_HEADER,
    EVENT_ID_HEADER,
    FAILED_AT_HEADER,
    ORIGINAL_SUBJECT_HEADER,
    REPLAY_FOR_HEADER,
    dlq_subject,
)
from services.kit.events import stream_name
from tessera.common.v1.event_pb2 import EventEnvelope
from tessera_cli.embedded import free_port
from tests.cli.conftest import RunCli

pytestmark = pytest.mark.gate("S08")


async def _cli(run_cli: RunCli, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_cli, *args, **env)


async def test_dlq_list_of_an_empty_dead_letter_queue(run_cli: RunCli, nats_url: str) -> None:
    consumer = f"cli_empty_{uuid.uuid4().hex[:8]}"
    as_json = await _cli(run_cli, "events", "dlq", "list", "--consumer", consumer, "--json", TESSERA_NATS_URL=nats_url)
    assert as_json.returncode == 0, as_json.stdout + as_json.stderr
    assert json.loads(as_json.stdout) == []
    table = await _cli(run_cli, "events", "dlq", "list", "--consumer", consumer, TESSERA_NATS_URL=nats_url)
    assert table.returncode == 0, table.stdout + table.stderr
    assert f"no dead letters of consumer {consumer}" in table.stdout


async def test_dlq_list_shows_a_dead_letter_and_replay_sends_it_back_to_its_consumer(
    run_cli: RunCli, nats_url: str
) -> None:
    source = f"cli{uuid.uuid4().hex[:8]}"
    consumer = f"{source}_projector"
    original_subject = f"tessera.{source}.thing_happened"
    envelope = EventEnvelope(id=str(uuid.uuid4()), type="tessera.test.v1.ThingHappenedEvent", source=source)
    broker = Broker(nats_url, name="cli-test")
    await broker.connect()
    try:
        await broker.ensure_streams(source)
        ack = await broker.js.publish(
            dlq_subject(consumer),
            envelope.SerializeToString(),
            headers={
                CONSUMER_HEADER: consumer,
                ORIGINAL_SUBJECT_HEADER: original_subject,
                EVENT_ID_HEADER: envelope.id,
                ERROR_HEADER: "RuntimeError: handler is broken",
                ATTEMPTS_HEADER: "5",
                FAILED_AT_HEADER: "2026-01-01T00:00:00+00:00",
            },
        )
        assert ack.stream == DLQ_STREAM

        listed = await _cli(run_cli, "events", "dlq", "list", "-c", consumer, "--json", TESSERA_NATS_URL=nats_url)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        [letter] = json.loads(listed.stdout)
        assert letter["seq"] == ack.seq
        assert letter["consumer"] == consumer
        assert letter["original_subject"] == original_subject
        assert letter["event_id"] == envelope.id
        assert letter["attempts"] == 5
        assert letter["error"] == "RuntimeError: handler is broken"

        refused = await _cli(run_cli, "events", "dlq", "replay", TESSERA_NATS_URL=nats_url)
        assert refused.returncode == 2
        assert "give either sequence numbers or --all" in refused.stdout

        wrong_consumer = await _cli(
            run_cli, "events", "dlq", "replay", str(ack.seq), "-c", "someone_else", TESSERA_NATS_URL=nats_url
        )
        assert wrong_consumer.returncode == 1
        assert f"belongs to consumer {consumer}" in wrong_consumer.stdout

        replayed = await _cli(run_cli, "events", "dlq", "replay", str(ack.seq), TESSERA_NATS_URL=nats_url)
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        assert f"replayed to {original_subject} for {consumer}" in replayed.stdout

        # Back on its original stream, addressed to that consumer only, and gone from the dead letters.
        info = await broker.js.stream_info(stream_name(source))
        assert info.state.messages == 1
        message = await broker.js.get_msg(stream_name(source), seq=info.state.last_seq)
        assert message.subject == original_subject
        assert (message.headers or {})[REPLAY_FOR_HEADER] == consumer
        republished = EventEnvelope()
        republished.ParseFromString(message.data or b"")
        assert republished.id == envelope.id

        after = await _cli(run_cli, "events", "dlq", "list", "-c", consumer, "--json", TESSERA_NATS_URL=nats_url)
        assert json.loads(after.stdout) == []
        again = await _cli(run_cli, "events", "dlq", "replay", str(ack.seq), TESSERA_NATS_URL=nats_url)
        assert again.returncode == 1
        assert f"no dead letter with sequence {ack.seq}" in again.stdout
    finally:
        await broker.close()


def test_dlq_list_without_nats_says_how_to_configure_it(run_cli: RunCli) -> None:
    result = run_cli("events", "dlq", "list")
    assert result.returncode == 1
    assert "no NATS: set TESSERA_NATS_URL" in result.stdout


def test_dlq_list_with_unreachable_nats_names_the_url(run_cli: RunCli) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    result = run_cli("events", "dlq", "list", TESSERA_NATS_URL=url)
    assert result.returncode == 1
    assert f"cannot connect to NATS: no NATS server answered at {url}" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
