"""Identity fixtures: the service's Database as `tessera_identity`, its key ring, a service instance, users."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from migrations import runner
from services.identity.keys import KeyRing
from services.identity.models import SCHEMA, SERVICE
from services.identity.passwords import PasswordHasher
from services.identity.ratelimit import RateLimiter
from services.identity.service import IdentityPolicy, IdentityService
from services.kit.db import Database
from services.kit.principal import Principal
from services.kit.revocation import RevocationList

# argon2id at test strength (the production floors are enforced by IdentitySettings).
FAST_ARGON2 = {"time_cost": 1, "memory_kib": 1024, "parallelism": 1}
GOOD_PASSWORD = "correct staple horse battery 42"  # a test password


@pytest.fixture(scope="session")
def identity_url(admin_url: str) -> str:
    """The session database as the identity login role (no superuser, no BYPASSRLS, owns nothing)."""
    return runner.service_url(admin_url, SERVICE)


@pytest.fixture(scope="session")
async def identity_database(identity_url: str) -> AsyncIterator[Database]:
    db = Database(identity_url, service=SERVICE, schema=SCHEMA, pool_size=4)
    try:
        yield db
    finally:
        await db.dispose()


@pytest.fixture(scope="session")
def hasher() -> PasswordHasher:
    return PasswordHasher(**FAST_ARGON2)


class Clock:
    """A settable clock for the service (starts at the real time; `advance` moves it on)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def keyring(identity_database: Database, clock: Clock) -> KeyRing:
    keys = KeyRing(identity_database, overlap=timedelta(minutes=20), cache_seconds=30, clock=clock)
    await keys.start()
    return keys


@pytest.fixture
def policy() -> IdentityPolicy:
    return IdentityPolicy()


@pytest.fixture
def revocations() -> RevocationList:
    """A local-only revocation list (no broker): what the identity process applies to itself."""
    return RevocationList(None)


@pytest.fixture
def identity_service(
    keyring: KeyRing,
    hasher: PasswordHasher,
    policy: IdentityPolicy,
    revocations: RevocationList,
    clock: Clock,
) -> IdentityService:
    return IdentityService(
        keys=keyring,
        hasher=hasher,
        limiter=RateLimiter(window=timedelta(minutes=1)),
        policy=policy,
        revocations=revocations,
        clock=clock,
    )


def unique_email(prefix: str = "user") -> str:
    """An email nobody else in the session uses (tests share one database)."""
    return f"{prefix}.{uuid.uuid4().hex[:12]}@example.com"


def user_principal(user_id: uuid.UUID, session_id: uuid.UUID | None) -> Principal:
    """The principal the interceptor builds from a user-level token of that session."""
    return Principal(subject=str(user_id), session_id=str(session_id) if session_id else None)
