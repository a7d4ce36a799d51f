"""Operator commands of the identity service (docs/runbooks/identity.md), run next to a deployment.

    python -m services.identity.admin rotate-signing-key
    python -m services.identity.admin revoke-sessions <user uuid>

They read the same TESSERA_* settings as the service and connect as its login role. Events they cause
(SessionsRevokedEvent) go to the outbox and are published by any running identity replica's relay.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from datetime import timedelta

from services.identity.keys import KeyRing
from services.identity.models import SCHEMA, SERVICE, RevokeReason
from services.identity.passwords import PasswordHasher
from services.identity.ratelimit import RateLimiter
from services.identity.service import IdentityService
from services.identity.settings import IdentitySettings
from services.kit.db import Database
from services.kit.settings import SettingsError, load_settings


def _key_ring(database: Database, settings: IdentitySettings) -> KeyRing:
    return KeyRing(
        database,
        overlap=settings.signing_key_overlap,
        cache_seconds=settings.signing_key_cache_seconds,
        issuer=settings.token_issuer,
        audience=settings.token_audience,
    )


async def rotate_signing_key(settings: IdentitySettings) -> str:
    """Make a new signing key active (the previous one verifies for the overlap window); the new kid."""
    database = Database(settings.database_url, service=SERVICE, schema=SCHEMA, pool_size=1)
    try:
        return await _key_ring(database, settings).rotate()
    finally:
        await database.dispose()


async def revoke_sessions(settings: IdentitySettings, user_id: uuid.UUID) -> int:
    """End every live session of a user and announce it (SessionsRevokedEvent); how many ended."""
    database = Database(settings.database_url, service=SERVICE, schema=SCHEMA, pool_size=1)
    try:
        service = IdentityService(
            keys=_key_ring(database, settings),
            hasher=PasswordHasher(time_cost=1, memory_kib=64, parallelism=1),  # hashes nothing here
            limiter=RateLimiter(window=timedelta(seconds=settings.rate_limit_window_seconds)),
        )
        async with database.unit_of_work(None) as uow:
            outcome = await service.revoke_user_sessions(uow, None, user_id=user_id, reason=RevokeReason.OPERATOR)
        return service.settle(outcome)
    finally:
        await database.dispose()


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one command."""
    parser = argparse.ArgumentParser(prog="python -m services.identity.admin", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("rotate-signing-key", help="make a new access-token signing key active")
    revoke = commands.add_parser("revoke-sessions", help="end every session of a user")
    revoke.add_argument("user", type=uuid.UUID, help="the user's id (UUID)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(IdentitySettings)
    except SettingsError as exc:
        print(f"IdentitySettings: {exc}", file=sys.stderr)
        return 2
    if args.command == "rotate-signing-key":
        print(f"active signing key: {asyncio.run(rotate_signing_key(settings))}")
    else:
        print(f"sessions ended: {asyncio.run(revoke_sessions(settings, args.user))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
