"""All SQL of the identity service: SQLAlchemy Core statements compiled once (`Query`), run in the unit of work.

User-level tables (users, sessions, tokens) have no tenant: every statement here names the user,
session or secret hash it touches, and the service only passes values taken from a verified token or
from a secret the caller presented. API keys are tenant rows: their statements filter by tenant_id
as well as RLS does. Nothing here commits.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from services.identity.models import (
    ApiKey,
    EmailTokenPurpose,
    RefreshTokenRow,
    Session,
    User,
    api_keys,
    audit_log,
    email_tokens,
    oidc_identities,
    oidc_logins,
    password_credentials,
    refresh_tokens,
    sessions,
    users,
)
from services.kit.db import UnitOfWork
from services.kit.ids import uuid7
from services.kit.sql import Query

_NOW = sa.bindparam("now", type_=sa.DateTime(timezone=True))

# --- users -------------------------------------------------------------------------------------------

_USER_COLUMNS = (users.c.id, users.c.email, users.c.display_name, users.c.email_verify_time, users.c.create_time)


def _user(row: Any) -> User:
    return User(
        id=row["id"],
        email=row["email"],
        display_name=row["display_name"],
        email_verify_time=row["email_verify_time"],
        create_time=row["create_time"],
    )


_INSERT_USER = Query(
    pg_insert(users)
    .values(
        id=sa.bindparam("id"),
        email=sa.bindparam("email"),
        display_name=sa.bindparam("display_name"),
        email_verify_time=sa.bindparam("email_verify_time", type_=sa.DateTime(timezone=True)),
        create_time=_NOW,
        update_time=_NOW,
    )
    .on_conflict_do_nothing(index_elements=[sa.func.lower(users.c.email)])
    .returning(*_USER_COLUMNS)
)
_USER_BY_ID = Query(sa.select(*_USER_COLUMNS).where(users.c.id == sa.bindparam("id")))
_USER_BY_EMAIL = Query(sa.select(*_USER_COLUMNS).where(sa.func.lower(users.c.email) == sa.bindparam("email")))
_USER_WITH_PASSWORD_BY_EMAIL = Query(
    sa.select(*_USER_COLUMNS, password_credentials.c.password_hash)
    .select_from(users.outerjoin(password_credentials, password_credentials.c.user_id == users.c.id))
    .where(sa.func.lower(users.c.email) == sa.bindparam("email"))
)
_PASSWORD_HASH = Query(
    sa.select(password_credentials.c.password_hash).where(password_credentials.c.user_id == sa.bindparam("user_id"))
)
_SET_PASSWORD = Query(
    pg_insert(password_credentials)
    .values(user_id=sa.bindparam("user_id"), password_hash=sa.bindparam("password_hash"), update_time=_NOW)
    .on_conflict_do_update(
        index_elements=[password_credentials.c.user_id],
        set_={"password_hash": sa.bindparam("password_hash"), "update_time": _NOW},
    )
)
_VERIFY_EMAIL = Query(
    sa.update(users)
    .where(users.c.id == sa.bindparam("id"))
    .values(email_verify_time=sa.func.coalesce(users.c.email_verify_time, _NOW), update_time=_NOW)
    .returning(*_USER_COLUMNS)
)


class UserRepository:
    """Users and their password credentials."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    async def insert(
        self, *, user_id: uuid.UUID, email: str, display_name: str, verified_at: datetime | None, now: datetime
    ) -> User | None:
        """A new user; None if the email is taken."""
        row = await self.uow.fetchrow(
            _INSERT_USER,
            id=user_id,
            email=email,
            display_name=display_name,
            email_verify_time=verified_at,
            now=now,
        )
        return _user(row) if row is not None else None

    async def get(self, user_id: uuid.UUID) -> User | None:
        """A user by id."""
        row = await self.uow.fetchrow(_USER_BY_ID, id=user_id)
        return _user(row) if row is not None else None

    async def find_by_email(self, email: str) -> User | None:
        """A user by (lower-cased) email."""
        row = await self.uow.fetchrow(_USER_BY_EMAIL, email=email)
        return _user(row) if row is not None else None

    async def find_with_password(self, email: str) -> tuple[User, str | None] | None:
        """A user by email with their password hash (None if they have no password)."""
        row = await self.uow.fetchrow(_USER_WITH_PASSWORD_BY_EMAIL, email=email)
        return (_user(row), row["password_hash"]) if row is not None else None

    async def password_hash(self, user_id: uuid.UUID) -> str | None:
        """The user's password hash, if they have a password."""
        value = await self.uow.fetchval(_PASSWORD_HASH, user_id=user_id)
        return str(value) if value is not None else None

    async def set_password(self, *, user_id: uuid.UUID, password_hash: str, now: datetime) -> None:
        """Create or replace the user's password hash."""
        await self.uow.execute(_SET_PASSWORD, user_id=user_id, password_hash=password_hash, now=now)

    async def mark_email_verified(self, *, user_id: uuid.UUID, now: datetime) -> User | None:
        """Set the verification time (kept if already verified)."""
        row = await self.uow.fetchrow(_VERIFY_EMAIL, id=user_id, now=now)
        return _user(row) if row is not None else None


# --- email tokens --------------------------------------------------------------------------------------

_INSERT_EMAIL_TOKEN = Query(
    sa.insert(email_tokens).values(
        token_hash=sa.bindparam("token_hash"),
        user_id=sa.bindparam("user_id"),
        purpose=sa.bindparam("purpose"),
        create_time=_NOW,
        expire_time=sa.bindparam("expire_time"),
    )
)
# Single use under concurrency: only one UPDATE can see use_time IS NULL.
_CONSUME_EMAIL_TOKEN = Query(
    sa.update(email_tokens)
    .where(
        email_tokens.c.token_hash == sa.bindparam("token_hash"),
        email_tokens.c.purpose == sa.bindparam("purpose"),
        email_tokens.c.use_time.is_(None),
        email_tokens.c.expire_time > _NOW,
    )
    .values(use_time=_NOW)
    .returning(email_tokens.c.user_id)
)
_RETIRE_EMAIL_TOKENS = Query(
    sa.update(email_tokens)
    .where(
        email_tokens.c.user_id == sa.bindparam("user_id"),
        email_tokens.c.purpose == sa.bindparam("purpose"),
        email_tokens.c.use_time.is_(None),
    )
    .values(use_time=_NOW)
)
_PURGE_EMAIL_TOKENS = Query(sa.delete(email_tokens).where(email_tokens.c.expire_time < sa.bindparam("cutoff")))


class EmailTokenRepository:
    """Verification and reset tokens (hashes only)."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    async def insert(
        self, *, token_hash: bytes, user_id: uuid.UUID, purpose: EmailTokenPurpose, now: datetime, expire: datetime
    ) -> None:
        """Store a new token's hash."""
        await self.uow.execute(
            _INSERT_EMAIL_TOKEN,
            token_hash=token_hash,
            user_id=user_id,
            purpose=purpose.value,
            now=now,
            expire_time=expire,
        )

    async def consume(self, *, token_hash: bytes, purpose: EmailTokenPurpose, now: datetime) -> uuid.UUID | None:
        """Use a live token once; its user, or None if it is unknown, used or expired."""
        value = await self.uow.fetchval(_CONSUME_EMAIL_TOKEN, token_hash=token_hash, purpose=purpose.value, now=now)
        return value if isinstance(value, uuid.UUID) else None

    async def retire_all(self, *, user_id: uuid.UUID, purpose: EmailTokenPurpose, now: datetime) -> None:
        """Mark every unused token of the user for this purpose as used."""
        await self.uow.execute(_RETIRE_EMAIL_TOKENS, user_id=user_id, purpose=purpose.value, now=now)

    async def purge(self, *, cutoff: datetime) -> int:
        """Delete tokens that expired before the cutoff."""
        return _count(await self.uow.execute(_PURGE_EMAIL_TOKENS, cutoff=cutoff))


# --- sessions and refresh tokens -------------------------------------------------------------------------

_SESSION_COLUMNS = (
    sessions.c.id,
    sessions.c.user_id,
    sessions.c.method,
    sessions.c.create_time,
    sessions.c.last_refresh_time,
    sessions.c.expire_time,
    sessions.c.absolute_expire_time,
    sessions.c.revoke_time,
)


def _session(row: Any) -> Session:
    return Session(
        id=row["id"],
        user_id=row["user_id"],
        method=row["method"],
        create_time=row["create_time"],
        last_refresh_time=row["last_refresh_time"],
        expire_time=row["expire_time"],
        absolute_expire_time=row["absolute_expire_time"],
        revoke_time=row["revoke_time"],
    )


_INSERT_SESSION = Query(
    sa.insert(sessions)
    .values(
        id=sa.bindparam("id"),
        user_id=sa.bindparam("user_id"),
        method=sa.bindparam("method"),
        create_time=_NOW,
        expire_time=sa.bindparam("expire_time"),
        absolute_expire_time=sa.bindparam("absolute_expire_time"),
    )
    .returning(*_SESSION_COLUMNS)
)
_SESSION_BY_ID = Query(sa.select(*_SESSION_COLUMNS).where(sessions.c.id == sa.bindparam("id")))
_LIVE_SESSIONS = Query(
    sa.select(*_SESSION_COLUMNS)
    .where(
        sessions.c.user_id == sa.bindparam("user_id"), sessions.c.revoke_time.is_(None), sessions.c.expire_time > _NOW
    )
    .order_by(sessions.c.create_time.desc(), sessions.c.id.desc())
)
_TOUCH_SESSION = Query(
    sa.update(sessions)
    .where(sessions.c.id == sa.bindparam("id"))
    .values(last_refresh_time=_NOW, expire_time=sa.bindparam("expire_time"))
)
_KEEP = sa.bindparam("keep", type_=sa.Uuid)
_ONLY = sa.bindparam("only", type_=sa.Uuid)
# Revokes the user's live sessions: all of them, all but `keep`, or only `only` (NULL means "no filter").
_REVOKE_SESSIONS = Query(
    sa.update(sessions)
    .where(
        sessions.c.user_id == sa.bindparam("user_id"),
        sessions.c.revoke_time.is_(None),
        sessions.c.expire_time > _NOW,
        sa.or_(_KEEP.is_(None), sessions.c.id != _KEEP),
        sa.or_(_ONLY.is_(None), sessions.c.id == _ONLY),
    )
    .values(revoke_time=_NOW, revoke_reason=sa.bindparam("reason"))
    .returning(sessions.c.id)
)
_PURGE_SESSIONS = Query(sa.delete(sessions).where(sessions.c.absolute_expire_time < sa.bindparam("cutoff")))

_REFRESH_COLUMNS = (
    refresh_tokens.c.token_hash,
    refresh_tokens.c.session_id,
    refresh_tokens.c.generation,
    refresh_tokens.c.expire_time,
    refresh_tokens.c.rotate_time,
    refresh_tokens.c.successor_hash,
    refresh_tokens.c.successor_box,
)


def _refresh_token(row: Any) -> RefreshTokenRow:
    return RefreshTokenRow(
        token_hash=bytes(row["token_hash"]),
        session_id=row["session_id"],
        generation=row["generation"],
        expire_time=row["expire_time"],
        rotate_time=row["rotate_time"],
        successor_hash=bytes(row["successor_hash"]) if row["successor_hash"] is not None else None,
        successor_box=bytes(row["successor_box"]) if row["successor_box"] is not None else None,
    )


_INSERT_REFRESH_TOKEN = Query(
    sa.insert(refresh_tokens).values(
        token_hash=sa.bindparam("token_hash"),
        session_id=sa.bindparam("session_id"),
        generation=sa.bindparam("generation"),
        create_time=_NOW,
        expire_time=sa.bindparam("expire_time"),
    )
)
# FOR UPDATE: concurrent refreshes of one token queue here; the second sees the first one's rotation.
_LOCK_REFRESH_TOKEN = Query(
    sa.select(*_REFRESH_COLUMNS).where(refresh_tokens.c.token_hash == sa.bindparam("token_hash")).with_for_update()
)
_REFRESH_SESSION_ID = Query(
    sa.select(refresh_tokens.c.session_id).where(refresh_tokens.c.token_hash == sa.bindparam("token_hash"))
)
_MARK_ROTATED = Query(
    sa.update(refresh_tokens)
    .where(refresh_tokens.c.token_hash == sa.bindparam("token_hash"))
    .values(
        rotate_time=_NOW,
        successor_hash=sa.bindparam("successor_hash"),
        successor_box=sa.bindparam("successor_box"),
    )
)
# Successor tokens are kept (encrypted) for the grace window only: cleared on the session's next
# rotation, on revocation, and by the periodic purge.
_CLEAR_BOXES = Query(
    sa.update(refresh_tokens)
    .where(
        refresh_tokens.c.session_id == sa.bindparam("session_id"),
        refresh_tokens.c.successor_box.is_not(None),
        refresh_tokens.c.rotate_time < sa.bindparam("before"),
    )
    .values(successor_box=None)
)
_CLEAR_ALL_BOXES = Query(
    sa.update(refresh_tokens)
    .where(refresh_tokens.c.successor_box.is_not(None), refresh_tokens.c.rotate_time < sa.bindparam("before"))
    .values(successor_box=None)
)
_CLEAR_SESSION_BOXES = Query(
    sa.update(refresh_tokens)
    .where(
        refresh_tokens.c.session_id == sa.func.any(sa.bindparam("session_ids", type_=sa.ARRAY(sa.Uuid))),
        refresh_tokens.c.successor_box.is_not(None),
    )
    .values(successor_box=None)
)


class SessionRepository:
    """Sessions and their refresh-token families."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    async def insert(
        self,
        *,
        session_id: uuid.UUID,
        user_id: uuid.UUID,
        method: str,
        now: datetime,
        expire: datetime,
        absolute_expire: datetime,
    ) -> Session:
        """A new session."""
        row = await self.uow.fetchrow(
            _INSERT_SESSION,
            id=session_id,
            user_id=user_id,
            method=method,
            now=now,
            expire_time=expire,
            absolute_expire_time=absolute_expire,
        )
        assert row is not None
        return _session(row)

    async def get(self, session_id: uuid.UUID) -> Session | None:
        """A session by id."""
        row = await self.uow.fetchrow(_SESSION_BY_ID, id=session_id)
        return _session(row) if row is not None else None

    async def list_live(self, *, user_id: uuid.UUID, now: datetime) -> list[Session]:
        """The user's sessions that are neither revoked nor expired, newest first."""
        return [_session(row) for row in await self.uow.fetch(_LIVE_SESSIONS, user_id=user_id, now=now)]

    async def touch(self, *, session_id: uuid.UUID, now: datetime, expire: datetime) -> None:
        """Record a refresh and the session's new expiry."""
        await self.uow.execute(_TOUCH_SESSION, id=session_id, now=now, expire_time=expire)

    async def revoke(
        self,
        *,
        user_id: uuid.UUID,
        reason: str,
        now: datetime,
        keep: uuid.UUID | None = None,
        only: uuid.UUID | None = None,
    ) -> list[uuid.UUID]:
        """Revoke the user's live sessions (all, all but `keep`, or just `only`); the ids revoked."""
        rows = await self.uow.fetch(_REVOKE_SESSIONS, user_id=user_id, reason=reason, now=now, keep=keep, only=only)
        revoked = [row["id"] for row in rows]
        if revoked:
            await self.uow.execute(_CLEAR_SESSION_BOXES, session_ids=revoked)
        return revoked

    async def insert_refresh_token(
        self, *, token_hash: bytes, session_id: uuid.UUID, generation: int, now: datetime, expire: datetime
    ) -> None:
        """Store a refresh token's hash."""
        await self.uow.execute(
            _INSERT_REFRESH_TOKEN,
            token_hash=token_hash,
            session_id=session_id,
            generation=generation,
            now=now,
            expire_time=expire,
        )

    async def lock_refresh_token(self, token_hash: bytes) -> RefreshTokenRow | None:
        """The refresh token row, locked until the end of the transaction."""
        row = await self.uow.fetchrow(_LOCK_REFRESH_TOKEN, token_hash=token_hash)
        return _refresh_token(row) if row is not None else None

    async def refresh_token_session(self, token_hash: bytes) -> uuid.UUID | None:
        """The session of a refresh token (no lock), for rate limiting."""
        value = await self.uow.fetchval(_REFRESH_SESSION_ID, token_hash=token_hash)
        return value if isinstance(value, uuid.UUID) else None

    async def mark_rotated(
        self, *, token_hash: bytes, successor_hash: bytes, successor_box: bytes, now: datetime
    ) -> None:
        """Record that a refresh token was exchanged for its successor."""
        await self.uow.execute(
            _MARK_ROTATED, token_hash=token_hash, successor_hash=successor_hash, successor_box=successor_box, now=now
        )

    async def clear_successor_boxes(self, *, session_id: uuid.UUID | None, before: datetime) -> int:
        """Drop stored successor tokens rotated before `before` (of one session, or of all)."""
        if session_id is None:
            return _count(await self.uow.execute(_CLEAR_ALL_BOXES, before=before))
        return _count(await self.uow.execute(_CLEAR_BOXES, session_id=session_id, before=before))

    async def purge(self, *, cutoff: datetime) -> int:
        """Delete sessions (and their tokens) whose absolute lifetime ended before the cutoff."""
        return _count(await self.uow.execute(_PURGE_SESSIONS, cutoff=cutoff))


# --- API keys ------------------------------------------------------------------------------------------

_API_KEY_COLUMNS = (
    api_keys.c.tenant_id,
    api_keys.c.id,
    api_keys.c.display_name,
    api_keys.c.role,
    api_keys.c.prefix,
    api_keys.c.created_by,
    api_keys.c.create_time,
    api_keys.c.last_used_time,
    api_keys.c.revoke_time,
)


def _api_key(row: Any) -> ApiKey:
    return ApiKey(
        workspace_id=row["tenant_id"],
        id=row["id"],
        display_name=row["display_name"],
        role=row["role"],
        prefix=row["prefix"],
        created_by=row["created_by"],
        create_time=row["create_time"],
        last_used_time=row["last_used_time"],
        revoke_time=row["revoke_time"],
    )


_TENANT = sa.bindparam("tenant_id", type_=sa.Uuid)
_INSERT_API_KEY = Query(
    sa.insert(api_keys)
    .values(
        tenant_id=_TENANT,
        id=sa.bindparam("id"),
        display_name=sa.bindparam("display_name"),
        role=sa.bindparam("role"),
        key_hash=sa.bindparam("key_hash"),
        prefix=sa.bindparam("prefix"),
        created_by=sa.bindparam("created_by"),
        create_time=_NOW,
    )
    .returning(*_API_KEY_COLUMNS)
)
_LIST_API_KEYS = Query(
    sa.select(*_API_KEY_COLUMNS)
    .where(api_keys.c.tenant_id == _TENANT)
    .order_by(api_keys.c.create_time.desc(), api_keys.c.id.desc())
)
_REVOKE_API_KEY = Query(
    sa.update(api_keys)
    .where(api_keys.c.tenant_id == _TENANT, api_keys.c.id == sa.bindparam("id"))
    .values(revoke_time=sa.func.coalesce(api_keys.c.revoke_time, _NOW))
    .returning(*_API_KEY_COLUMNS)
)
# Exchange: a live key of this tenant with this hash; last_used is recorded in the same statement.
_USE_API_KEY = Query(
    sa.update(api_keys)
    .where(
        api_keys.c.tenant_id == _TENANT,
        api_keys.c.key_hash == sa.bindparam("key_hash"),
        api_keys.c.revoke_time.is_(None),
    )
    .values(last_used_time=_NOW)
    .returning(*_API_KEY_COLUMNS)
)


class ApiKeyRepository:
    """API keys of one workspace (tenant rows)."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    async def insert(
        self,
        *,
        workspace_id: uuid.UUID,
        key_id: uuid.UUID,
        display_name: str,
        role: str,
        key_hash: bytes,
        prefix: str,
        created_by: uuid.UUID,
        now: datetime,
    ) -> ApiKey:
        """A new API key."""
        row = await self.uow.fetchrow(
            _INSERT_API_KEY,
            tenant_id=workspace_id,
            id=key_id,
            display_name=display_name,
            role=role,
            key_hash=key_hash,
            prefix=prefix,
            created_by=created_by,
            now=now,
        )
        assert row is not None
        return _api_key(row)

    async def list(self, *, workspace_id: uuid.UUID) -> list[ApiKey]:
        """The workspace's keys, newest first, revoked ones included."""
        return [_api_key(row) for row in await self.uow.fetch(_LIST_API_KEYS, tenant_id=workspace_id)]

    async def revoke(self, *, workspace_id: uuid.UUID, key_id: uuid.UUID, now: datetime) -> ApiKey | None:
        """Revoke a key (idempotent: the first revoke time is kept); None if absent."""
        row = await self.uow.fetchrow(_REVOKE_API_KEY, tenant_id=workspace_id, id=key_id, now=now)
        return _api_key(row) if row is not None else None

    async def use(self, *, workspace_id: uuid.UUID, key_hash: bytes, now: datetime) -> ApiKey | None:
        """The live key with this hash, its last-used time set to now; None if unknown or revoked."""
        row = await self.uow.fetchrow(_USE_API_KEY, tenant_id=workspace_id, key_hash=key_hash, now=now)
        return _api_key(row) if row is not None else None


# --- OIDC ------------------------------------------------------------------------------------------------

_INSERT_OIDC_LOGIN = Query(
    sa.insert(oidc_logins).values(
        state_hash=sa.bindparam("state_hash"),
        provider=sa.bindparam("provider"),
        nonce=sa.bindparam("nonce"),
        code_verifier=sa.bindparam("code_verifier"),
        redirect_uri=sa.bindparam("redirect_uri"),
        create_time=_NOW,
        expire_time=sa.bindparam("expire_time"),
    )
)
_CONSUME_OIDC_LOGIN = Query(
    sa.update(oidc_logins)
    .where(
        oidc_logins.c.state_hash == sa.bindparam("state_hash"),
        oidc_logins.c.use_time.is_(None),
        oidc_logins.c.expire_time > _NOW,
    )
    .values(use_time=_NOW)
    .returning(oidc_logins.c.provider, oidc_logins.c.nonce, oidc_logins.c.code_verifier, oidc_logins.c.redirect_uri)
)
_PURGE_OIDC_LOGINS = Query(sa.delete(oidc_logins).where(oidc_logins.c.expire_time < sa.bindparam("cutoff")))
_OIDC_IDENTITY = Query(
    sa.select(oidc_identities.c.user_id).where(
        oidc_identities.c.issuer == sa.bindparam("issuer"), oidc_identities.c.subject == sa.bindparam("subject")
    )
)
_LINK_OIDC_IDENTITY = Query(
    pg_insert(oidc_identities)
    .values(
        issuer=sa.bindparam("issuer"),
        subject=sa.bindparam("subject"),
        provider=sa.bindparam("provider"),
        user_id=sa.bindparam("user_id"),
        email=sa.bindparam("email", type_=sa.Text),
        create_time=_NOW,
        last_sign_in_time=_NOW,
    )
    .on_conflict_do_update(
        index_elements=[oidc_identities.c.issuer, oidc_identities.c.subject],
        set_={"last_sign_in_time": _NOW},
    )
    .returning(oidc_identities.c.user_id)
)


class OidcRepository:
    """OIDC sign-ins in progress and linked provider accounts."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    async def insert_login(
        self,
        *,
        state_hash: bytes,
        provider: str,
        nonce: str,
        code_verifier: str,
        redirect_uri: str,
        now: datetime,
        expire: datetime,
    ) -> None:
        """Remember a started sign-in by the hash of its state."""
        await self.uow.execute(
            _INSERT_OIDC_LOGIN,
            state_hash=state_hash,
            provider=provider,
            nonce=nonce,
            code_verifier=code_verifier,
            redirect_uri=redirect_uri,
            now=now,
            expire_time=expire,
        )

    async def consume_login(self, *, state_hash: bytes, now: datetime) -> Mapping[str, str] | None:
        """Use a started sign-in once: provider, nonce, code_verifier, redirect_uri; None if unknown/used/expired."""
        row = await self.uow.fetchrow(_CONSUME_OIDC_LOGIN, state_hash=state_hash, now=now)
        return dict(row) if row is not None else None

    async def find_identity(self, *, issuer: str, subject: str) -> uuid.UUID | None:
        """The user linked to a provider account."""
        value = await self.uow.fetchval(_OIDC_IDENTITY, issuer=issuer, subject=subject)
        return value if isinstance(value, uuid.UUID) else None

    async def link_identity(
        self, *, issuer: str, subject: str, provider: str, user_id: uuid.UUID, email: str | None, now: datetime
    ) -> uuid.UUID:
        """Link a provider account to a user (or record a sign-in of an existing link); the linked user."""
        value = await self.uow.fetchval(
            _LINK_OIDC_IDENTITY,
            issuer=issuer,
            subject=subject,
            provider=provider,
            user_id=user_id,
            email=email,
            now=now,
        )
        assert isinstance(value, uuid.UUID)
        return value

    async def purge_logins(self, *, cutoff: datetime) -> int:
        """Delete sign-ins that expired before the cutoff."""
        return _count(await self.uow.execute(_PURGE_OIDC_LOGINS, cutoff=cutoff))


# --- audit ---------------------------------------------------------------------------------------------

_INSERT_AUDIT = Query(
    sa.insert(audit_log).values(
        tenant_id=_TENANT,
        id=sa.bindparam("id"),
        action=sa.bindparam("action"),
        actor=sa.bindparam("actor", type_=sa.Uuid),
        target=sa.bindparam("target", type_=sa.Text),
        before=sa.bindparam("before", type_=audit_log.c.before.type),
        after=sa.bindparam("after", type_=audit_log.c.after.type),
        source_address=sa.bindparam("source_address", type_=sa.Text),
        request_id=sa.bindparam("request_id", type_=sa.Text),
        create_time=_NOW,
    )
)


class AuditRepository:
    """The append-only audit log."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    async def append(
        self,
        *,
        action: str,
        now: datetime,
        tenant_id: uuid.UUID | None = None,
        actor: uuid.UUID | None = None,
        target: str | None = None,
        before: Mapping[str, Any] | None = None,
        after: Mapping[str, Any] | None = None,
        source_address: str | None = None,
        request_id: str | None = None,
    ) -> uuid.UUID:
        """Append one row; its id."""
        row_id = uuid7()
        await self.uow.execute(
            _INSERT_AUDIT,
            tenant_id=tenant_id,
            id=row_id,
            action=action,
            actor=actor,
            target=target,
            before=_json(before),
            after=_json(after),
            source_address=source_address,
            request_id=request_id,
            now=now,
        )
        return row_id


def _json(value: Mapping[str, Any] | None) -> str | None:
    return json.dumps(dict(value), sort_keys=True, separators=(",", ":")) if value is not None else None


def _count(status: str) -> int:
    """The row count of a command status (`UPDATE 3` -> 3)."""
    return int(status.split()[-1])
