"""The NATS connection of one process and the JetStream streams events live in.

The connection reconnects forever: once connected, a NATS outage only delays publishing (the outbox
keeps the rows) and consuming (the durable consumers keep their position); it never stops the process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog
from nats.aio.client import Client
from nats.errors import NoServersError
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from services.kit.events import DLQ_SUBJECT_PREFIX, SUBJECT_PREFIX, stream_name

DLQ_STREAM = "TESSERA_DLQ"
DUPLICATE_WINDOW_SECONDS = 120.0

log = structlog.get_logger("tessera.broker")


def stream_config(source: str) -> StreamConfig:
    """The stream holding every event of one source (`tessera.<source>.>`), deduplicated by Nats-Msg-Id."""
    return StreamConfig(
        name=stream_name(source),
        subjects=[f"{SUBJECT_PREFIX}.{source}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
    )


def dlq_stream_config() -> StreamConfig:
    """The dead-letter stream shared by all consumers (`tessera_dlq.<consumer>`)."""
    return StreamConfig(
        name=DLQ_STREAM,
        subjects=[f"{DLQ_SUBJECT_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
    )


class Broker:
    """A NATS connection with JetStream that reconnects forever after the first successful connect."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        connect_timeout: int = 2,
        reconnect_time_wait: float = 0.25,
        request_timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.name = name
        self._connect_timeout = connect_timeout
        self._reconnect_time_wait = reconnect_time_wait
        self._request_timeout = request_timeout
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._reconnect_listeners: list[Callable[[], None]] = []
        self._errors_since_connect = 0
        self._closing = False

    @property
    def nc(self) -> Client:
        if self._nc is None:
            raise RuntimeError("broker not connected: call connect() first")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("broker not connected: call connect() first")
        return self._js

    @property
    def is_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def on_reconnected(self, listener: Callable[[], None]) -> None:
        """Register a callback run each time the connection is re-established (wakes the relay)."""
        self._reconnect_listeners.append(listener)

    async def connect(self) -> None:
        """Connect, or raise ConnectionError if NATS is unreachable now; afterwards reconnect forever on any outage."""
        if self._nc is not None:
            return
        nc = Client()
        try:
            # nats-py keeps retrying a first connect that fails; bound it so start-up fails with a clear message.
            await asyncio.wait_for(
                nc.connect(
                    servers=[self.url],
                    name=self.name,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    # nats-py annotates int but only sleeps on it: fractions of a second work.
                    reconnect_time_wait=self._reconnect_time_wait,  # type: ignore[arg-type]
                    connect_timeout=self._connect_timeout,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                ),
                timeout=self._connect_timeout * 3,
            )
        except (TimeoutError, OSError, NoServersError) as exc:
            self._closing = True
            with contextlib.suppress(Exception):
                await nc.close()
            self._closing = False
            raise ConnectionError(f"NATS at {self.url} is unreachable: {exc or 'timed out'}") from None
        self._nc = nc
        self._js = nc.jetstream(timeout=self._request_timeout)
        log.info("nats connected", broker=self.name, url=self.url)

    async def start(self) -> None:
        """BackgroundService hook: connect (list the broker before the relay and consumers using it)."""
        await self.connect()

    async def stop(self) -> None:
        """BackgroundService hook: close, after the relay and consumers listed after it have stopped."""
        await self.close()

    async def close(self) -> None:
        """Flush and close the connection (idempotent)."""
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            self._closing = True
            try:
                await nc.close()
            finally:
                self._closing = False

    async def ensure_streams(self, source: str) -> None:
        """Create or update the stream of `source` and the dead-letter stream."""
        for config in (stream_config(source), dlq_stream_config()):
            try:
                await self.js.update_stream(config)
            except NotFoundError:
                await self.js.add_stream(config)

    async def _on_error(self, error: Exception) -> None:
        # While NATS is down every reconnect attempt fails: warn on the first and every 100th only.
        self._errors_since_connect += 1
        level = log.warning if self._errors_since_connect % 100 == 1 else log.debug
        level("nats error", broker=self.name, error=repr(error), errors_since_connect=self._errors_since_connect)

    async def _on_disconnected(self) -> None:
        if self._closing:  # our own close(): not an outage
            return
        log.warning("nats disconnected", broker=self.name)

    async def _on_reconnected(self) -> None:
        log.info("nats reconnected", broker=self.name, errors_while_down=self._errors_since_connect)
        self._errors_since_connect = 0
        for listener in self._reconnect_listeners:
            listener()

    async def _on_closed(self) -> None:
        log.info("nats connection closed", broker=self.name)
