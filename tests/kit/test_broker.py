"""The broker connection: a first connect to an unreachable NATS fails fast with a clear error."""

from __future__ import annotations

import time

import pytest

from services.kit.broker import Broker
from tessera_cli.embedded import free_port


@pytest.mark.gate("S01")
async def test_first_connect_to_an_unreachable_nats_fails_with_the_url_named() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    broker = Broker(url, name="unreachable", connect_timeout=1)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=url):
        await broker.connect()
    assert time.monotonic() - started < 10, "start-up must not hang on an unreachable NATS"
    assert not broker.is_connected


async def test_connect_is_idempotent_and_close_is_quiet(nats_url: str) -> None:
    broker = Broker(nats_url, name="twice")
    await broker.connect()
    first = broker.nc
    await broker.connect()
    assert broker.nc is first
    await broker.close()
    assert not broker.is_connected
    await broker.close()
