"""Periodic clean-up of what can no longer be used: expired tokens and sessions, old rate-limit windows,
successor tokens past their grace window, and signing keys retired longer than the overlap ago."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import structlog

from services.identity.keys import purge_retired_keys
from services.identity.service import IdentityService
from services.kit.db import Database

log = structlog.get_logger("tessera.identity.housekeeping")


class Housekeeper:
    """A BackgroundService running `purge()` every `interval_seconds` (several replicas may run it)."""

    def __init__(
        self, database: Database, service: IdentityService, *, interval_seconds: float, key_overlap: timedelta
    ) -> None:
        self.database = database
        self.service = service
        self.interval_seconds = interval_seconds
        self.key_overlap = key_overlap
        self._task: asyncio.Task[None] | None = None

    async def purge(self) -> dict[str, int]:
        """One clean-up round in one transaction; the number of rows affected per kind."""
        async with self.database.unit_of_work(None) as uow:
            counts = await self.service.purge_expired(uow)
            counts["signing_keys"] = await purge_retired_keys(uow, now=self.service.clock(), overlap=self.key_overlap)
        if any(counts.values()):
            log.info("expired identity data purged", **counts)
        return counts

    async def start(self) -> None:
        """Start the periodic task."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="identity-housekeeping")

    async def stop(self) -> None:
        """Stop the periodic task (a round in progress is cancelled and rolls back)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_seconds)
            try:
                await self.purge()
            except Exception as error:  # the next round tries again
                log.warning("identity housekeeping failed", error=repr(error))
