"""Access-token signing keys: Ed25519 keys in the database, rotation with an overlap window, the JWKS.

At any time exactly one key is active (the newest one not retired): it signs new tokens. `rotate()`
creates a new active key and retires the previous one; a retired key stays in the JWKS for the overlap
window (settings: at least the access token lifetime plus the key cache time), so every token it
signed still verifies until it expires. Each process caches its view of the keys for
`cache_seconds`; after a rotation by another replica a process keeps signing with the retired key for
at most that long, which the overlap covers.

The private keys are stored as raw bytes for now (docs/runbooks/identity.md says how to protect and
rotate them); the identity login role is the only role that can read the table.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from services.identity.models import SigningKey, signing_keys
from services.kit.db import Database, UnitOfWork
from services.kit.sql import Query
from services.kit.tokens import ALGORITHM, DEFAULT_AUDIENCE, DEFAULT_ISSUER, TokenSigner, public_key_to_jwk

# Serialises key creation and rotation across replicas (transaction-scoped advisory lock).
SIGNING_KEY_LOCK = 0x7E55_1D_0001

log = structlog.get_logger("tessera.identity.keys")

_COLUMNS = (
    signing_keys.c.kid,
    signing_keys.c.private_key,
    signing_keys.c.public_key,
    signing_keys.c.activate_time,
    signing_keys.c.retire_time,
)

_LOCK = Query(sa.select(sa.func.pg_advisory_xact_lock(sa.bindparam("key", type_=sa.BigInteger))))

# Keys that verify tokens: not retired, or retired within the overlap window. Newest first.
_PUBLISHED = Query(
    sa.select(*_COLUMNS)
    .where(sa.or_(signing_keys.c.retire_time.is_(None), signing_keys.c.retire_time > sa.bindparam("cutoff")))
    .order_by(signing_keys.c.activate_time.desc(), signing_keys.c.kid.desc())
)

_ACTIVE = Query(
    sa.select(*_COLUMNS)
    .where(signing_keys.c.retire_time.is_(None))
    .order_by(signing_keys.c.activate_time.desc(), signing_keys.c.kid.desc())
    .limit(1)
)

_INSERT = Query(
    sa.insert(signing_keys)
    .values(
        kid=sa.bindparam("kid"),
        algorithm=ALGORITHM,
        private_key=sa.bindparam("private_key"),
        public_key=sa.bindparam("public_key"),
        create_time=sa.bindparam("now"),
        activate_time=sa.bindparam("now"),
    )
    .returning(*_COLUMNS)
)

_RETIRE_OTHERS = Query(
    sa.update(signing_keys)
    .where(signing_keys.c.retire_time.is_(None), signing_keys.c.kid != sa.bindparam("kid"))
    .values(retire_time=sa.bindparam("now"))
)

_PURGE = Query(sa.delete(signing_keys).where(signing_keys.c.retire_time < sa.bindparam("cutoff")))


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _signing_key(row: Any) -> SigningKey:
    return SigningKey(
        kid=row["kid"],
        private_key=bytes(row["private_key"]),
        public_key=bytes(row["public_key"]),
        activate_time=row["activate_time"],
        retire_time=row["retire_time"],
    )


def new_kid(now: datetime) -> str:
    """A key id: the creation date (for operators) and 64 random bits."""
    return f"{now:%Y%m%d}-{secrets.token_hex(8)}"


async def _insert_new_key(uow: UnitOfWork, *, now: datetime) -> SigningKey:
    private = Ed25519PrivateKey.generate()
    row = await uow.fetchrow(
        _INSERT,
        kid=new_kid(now),
        private_key=private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
        public_key=private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
        now=now,
    )
    assert row is not None
    return _signing_key(row)


async def ensure_active_key(uow: UnitOfWork, *, now: datetime) -> SigningKey:
    """The active signing key, created if there is none (first start)."""
    await uow.execute(_LOCK, key=SIGNING_KEY_LOCK)
    row = await uow.fetchrow(_ACTIVE)
    if row is not None:
        return _signing_key(row)
    key = await _insert_new_key(uow, now=now)
    log.info("signing key created", kid=key.kid)
    return key


async def rotate_signing_key(uow: UnitOfWork, *, now: datetime) -> SigningKey:
    """Make a new key active and retire the others (they stay in the JWKS for the overlap window)."""
    await uow.execute(_LOCK, key=SIGNING_KEY_LOCK)
    key = await _insert_new_key(uow, now=now)
    await uow.execute(_RETIRE_OTHERS, kid=key.kid, now=now)
    log.info("signing key rotated", kid=key.kid)
    return key


async def purge_retired_keys(uow: UnitOfWork, *, now: datetime, overlap: timedelta) -> int:
    """Delete keys retired longer than the overlap window ago (they verify nothing any more)."""
    status = await uow.execute(_PURGE, cutoff=now - overlap)
    return int(status.split()[-1])


@dataclass(frozen=True, slots=True)
class _View:
    signer: TokenSigner
    public_keys: dict[str, Ed25519PublicKey]
    loaded_at: float


class KeyRing:
    """This process's cached view of the signing keys: the active signer and the published public keys.

    It is also the JwksProvider of the identity process's own TokenVerifier (`keys()`).
    """

    def __init__(
        self,
        database: Database,
        *,
        overlap: timedelta,
        cache_seconds: float = 30.0,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.database = database
        self.overlap = overlap
        self.cache_seconds = cache_seconds
        self.issuer = issuer
        self.audience = audience
        self.clock = clock
        self._view: _View | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Create the first key if there is none and load the view (called before serving)."""
        async with self.database.unit_of_work(None) as uow:
            await ensure_active_key(uow, now=self.clock())
        await self.reload()

    async def stop(self) -> None:
        """Nothing to release (the database is closed by the runtime)."""

    async def reload(self) -> None:
        """Read the keys from the database now."""
        async with self._lock:
            await self._load()

    async def _load(self) -> _View:
        now = self.clock()
        async with self.database.unit_of_work(None) as uow:
            rows = await uow.fetch(_PUBLISHED, cutoff=now - self.overlap)
            if not rows or rows[0]["retire_time"] is not None:
                # No active key (first start raced, or an operator deleted it): make one.
                await ensure_active_key(uow, now=now)
                rows = await uow.fetch(_PUBLISHED, cutoff=now - self.overlap)
        keys = [_signing_key(row) for row in rows]
        active = next(key for key in keys if key.retire_time is None)
        signer = TokenSigner(
            Ed25519PrivateKey.from_private_bytes(active.private_key),
            kid=active.kid,
            issuer=self.issuer,
            audience=self.audience,
        )
        public = {key.kid: Ed25519PublicKey.from_public_bytes(key.public_key) for key in keys}
        self._view = view = _View(signer, public, time.monotonic())
        return view

    async def _current(self, *, refresh: bool = False) -> _View:
        view = self._view
        if view is not None and not refresh and time.monotonic() - view.loaded_at < self.cache_seconds:
            return view
        async with self._lock:
            view = self._view
            if view is not None and not refresh and time.monotonic() - view.loaded_at < self.cache_seconds:
                return view  # another caller reloaded while this one waited
            return await self._load()

    async def signer(self) -> TokenSigner:
        """The signer of the active key."""
        return (await self._current()).signer

    async def keys(self, *, refresh: bool = False) -> Mapping[str, Ed25519PublicKey]:
        """The published public keys, kid -> key (the JwksProvider protocol)."""
        return dict((await self._current(refresh=refresh)).public_keys)

    async def jwks(self) -> list[dict[str, str]]:
        """The published keys as JWKs, the active key first."""
        view = await self._current()
        return [public_key_to_jwk(kid, key) for kid, key in view.public_keys.items()]

    async def rotate(self) -> str:
        """Rotate the signing key (see `rotate_signing_key`) and reload; returns the new kid."""
        async with self.database.unit_of_work(None) as uow:
            key = await rotate_signing_key(uow, now=self.clock())
        await self.reload()
        return key.kid
