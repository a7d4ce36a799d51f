"""Identity business rules: users, passwords, sessions, token rotation, workspace tokens, API keys, OIDC.

Every method takes the unit of work and the caller explicitly, `(uow, principal, *, ...)`; none
commits (the kit's unit of work does) and events are emitted into the same transaction.

Some failures have effects that must survive them: a failed sign-in is audited, a reused refresh token
ends its session. Those methods return an `Outcome` instead of raising: the caller lets the unit of
work commit, then calls `settle(outcome)`, which applies revocations to this process's revocation list
and raises the error, if any. Revocations are only applied in-process after the commit, so a rolled
back sign-out never rejects tokens of a session that is still live.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import unicodedata
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar, cast

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf import timestamp_pb2

from services.identity import errors
from services.identity.keys import KeyRing
from services.identity.memberships import MembershipLookup
from services.identity.models import (
    DISPLAY_NAME_MAX_CHARS,
    USER_LEVEL_TENANT,
    ApiKey,
    AuditAction,
    EmailTokenPurpose,
    RevokeReason,
    Session,
    TokenSet,
    User,
    api_key_message,
    api_key_name,
    user_message,
    user_name,
    workspace_name,
)
from services.identity.oidc import AuthorizationRequest, OidcClient, VerifiedIdentity, state_hash
from services.identity.passwords import PasswordHasher, check_password_strength
from services.identity.ratelimit import Limit, RateLimiter
from services.identity.repository import (
    ApiKeyRepository,
    AuditRepository,
    EmailTokenRepository,
    OidcRepository,
    SessionRepository,
    UserRepository,
)
from services.kit.authz import ASSIGNABLE_ROLES
from services.kit.context import request_id_var
from services.kit.db import UnitOfWork
from services.kit.errors import Aborted, AppError, FailedPrecondition, InvalidArgument, Unavailable
from services.kit.ids import uuid7
from services.kit.principal import Principal
from services.kit.revocation import RevocationList
from services.kit.tokens import KIND_API_KEY
from tessera.identity.v1 import identity_events_pb2

T = TypeVar("T")

API_KEY_PREFIX = "tsk"
# What ApiKey.prefix shows: `tsk_<workspace hex>_` and the first characters of the random part.
API_KEY_VISIBLE_RANDOM_CHARS = 8
PASSWORD_METHOD = "password"  # noqa: S105  # a session method name, not a secret
MAX_EMAIL_CHARS = 254
# Domain separation for the key that encrypts a rotated refresh token's successor (see _seal_successor).
_SUCCESSOR_KEY_CONTEXT = b"tessera/identity/refresh-successor/v1"

log = structlog.get_logger("tessera.identity")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def secret_hash(secret: str) -> bytes:
    """SHA-256 of a high-entropy secret (refresh tokens, mailed tokens, API keys): the only form stored."""
    return hashlib.sha256(secret.encode()).digest()


def new_secret() -> str:
    """256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def normalize_email(email: str) -> str:
    """Trimmed and lower-cased (emails are unique case-insensitively)."""
    return email.strip().lower()


def _hashed_key(kind: str, value: str) -> str:
    """A rate-limit key that does not store the value (an email) in clear."""
    return f"{kind}:{hashlib.sha256(value.encode()).hexdigest()[:32]}"


@dataclass(frozen=True, slots=True)
class Outcome(Generic[T]):
    """The result of a method whose failure must commit: a value or an error, and sessions revoked."""

    value: T | None = None
    error: AppError | None = None
    revoked: tuple[uuid.UUID, ...] = ()

    def unwrap(self) -> T:
        """The value, or raise the error."""
        if self.error is not None:
            raise self.error
        return cast(T, self.value)


@dataclass(frozen=True, slots=True)
class IdentityPolicy:
    """Lifetimes and limits the service enforces (from IdentitySettings)."""

    access_token_ttl: timedelta = timedelta(minutes=10)
    refresh_token_ttl: timedelta = timedelta(days=14)
    session_max: timedelta = timedelta(days=30)
    refresh_grace: timedelta = timedelta(seconds=10)
    email_verification_ttl: timedelta = timedelta(hours=48)
    password_reset_ttl: timedelta = timedelta(hours=1)
    oidc_login_ttl: timedelta = timedelta(minutes=10)
    public_base_url: str = "http://localhost:8080"
    sign_in_per_account: int = 10
    sign_in_per_address: int = 30
    refresh_per_session: int = 30
    refresh_per_address: int = 300
    sign_up_per_address: int = 10
    mail_per_account: int = 5
    api_key_exchange_per_address: int = 300


@dataclass(frozen=True, slots=True)
class SignedIn:
    """A new session's user and tokens."""

    user: User
    tokens: TokenSet
    session_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class WorkspaceToken:
    """An access token for one workspace, and the role it carries."""

    tokens: TokenSet
    role: str


@dataclass(frozen=True, slots=True)
class CreatedApiKey:
    """A new API key and its secret (returned once, never stored)."""

    api_key: ApiKey
    secret: str


@dataclass(frozen=True, slots=True)
class OidcLogin:
    """A started OIDC sign-in, as remembered under the hash of its state."""

    provider: str
    nonce: str
    code_verifier: str
    redirect_uri: str


class IdentityService:
    """Identity rules; holds keys, hasher, limiter and collaborators (no connections, no request state)."""

    def __init__(
        self,
        *,
        keys: KeyRing,
        hasher: PasswordHasher,
        limiter: RateLimiter,
        policy: IdentityPolicy = IdentityPolicy(),
        memberships: MembershipLookup | None = None,
        revocations: RevocationList | None = None,
        oidc_clients: Mapping[str, OidcClient] | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.keys = keys
        self.hasher = hasher
        self.limiter = limiter
        self.policy = policy
        self.memberships = memberships
        self.revocations = revocations
        self.oidc_clients: Mapping[str, OidcClient] = dict(oidc_clients or {})
        self.clock = clock

    # -- outcomes and limits ---------------------------------------------------------------------

    def settle(self, outcome: Outcome[T]) -> T:
        """After the commit: apply the outcome's revocations in this process, then return or raise."""
        if self.revocations is not None:
            for session_id in outcome.revoked:
                self.revocations.revoke_session(str(session_id))
        return outcome.unwrap()

    async def enforce_limits(self, uow: UnitOfWork, limits: Sequence[Limit], *, what: str) -> None:
        """Count one hit on each limit; RESOURCE_EXHAUSTED (with RetryInfo) if one is exceeded.

        Run it in a unit of work of its own before the action: the counters' row locks are then held only
        for that short transaction (a rejected call rolls back its own hit; the count is already over).
        """
        exceeded = await self.limiter.hit(uow, limits, now=self.clock())
        if exceeded is not None:
            log.warning("rate limit exceeded", limit=exceeded.limit.key.split(":", 2)[:2], what=what)
            raise errors.rate_limited(what, retry_after=exceeded.retry_after)

    def sign_in_limits(self, *, email: str, source: str) -> list[Limit]:
        """Sign-in attempts per account (email) and per source address."""
        return [
            Limit(_hashed_key("sign_in:account", normalize_email(email)), self.policy.sign_in_per_account),
            Limit(f"sign_in:address:{source}", self.policy.sign_in_per_address),
        ]

    def sign_up_limits(self, *, source: str) -> list[Limit]:
        """Sign-ups per source address."""
        return [Limit(f"sign_up:address:{source}", self.policy.sign_up_per_address)]

    def mail_limits(self, *, email: str, source: str) -> list[Limit]:
        """Requested mails per account and (with the sign-up budget) per address."""
        return [
            Limit(_hashed_key("mail:account", normalize_email(email)), self.policy.mail_per_account),
            Limit(f"sign_up:address:{source}", self.policy.sign_up_per_address),
        ]

    async def refresh_limits(self, uow: UnitOfWork, *, refresh_token: str, source: str) -> list[Limit]:
        """Refreshes per session (when the token names one) and per source address."""
        limits = [Limit(f"refresh:address:{source}", self.policy.refresh_per_address)]
        session_id = await SessionRepository(uow).refresh_token_session(secret_hash(refresh_token))
        if session_id is not None:
            limits.append(Limit(f"refresh:session:{session_id}", self.policy.refresh_per_session))
        return limits

    def api_key_exchange_limits(self, *, source: str) -> list[Limit]:
        """API key exchanges per source address."""
        return [Limit(f"api_key_exchange:address:{source}", self.policy.api_key_exchange_per_address)]

    # -- sign-up, verification, reset ------------------------------------------------------------

    async def sign_up(
        self,
        uow: UnitOfWork,
        principal: Principal | None,
        *,
        email: str,
        password: str,
        display_name: str,
        source: str | None = None,
    ) -> User:
        """Create a user with a password and mail a verification link; ALREADY_EXISTS if the email is taken."""
        email = validate_email(email)
        validate_display_name(display_name, field="display_name")
        check_password_strength(password, email=email, field="password")
        password_hash = await self.hasher.hash(password)
        now = self.clock()
        users = UserRepository(uow)
        user = await users.insert(user_id=uuid7(), email=email, display_name=display_name, verified_at=None, now=now)
        if user is None:
            raise errors.email_taken()
        await users.set_password(user_id=user.id, password_hash=password_hash, now=now)
        await self._mail_token(uow, user, EmailTokenPurpose.VERIFY_EMAIL, now=now)
        self._emit_user_level(uow, identity_events_pb2.UserSignedUpEvent(user=user_message(user)), user)
        await self._audit(uow, AuditAction.SIGN_UP, now=now, actor=user.id, target=user.name, source=source)
        log.info("user signed up", user=user.name)
        return user

    async def verify_email(self, uow: UnitOfWork, principal: Principal | None, *, token: str) -> User:
        """Mark the email of the token's user verified; INVALID_ARGUMENT for an unknown, used or expired token."""
        now = self.clock()
        user_id = await EmailTokenRepository(uow).consume(
            token_hash=secret_hash(token), purpose=EmailTokenPurpose.VERIFY_EMAIL, now=now
        )
        if user_id is None:
            raise errors.invalid_email_token()
        user = await UserRepository(uow).mark_email_verified(user_id=user_id, now=now)
        if user is None:
            raise errors.invalid_email_token()
        await self._audit(uow, AuditAction.EMAIL_VERIFIED, now=now, actor=user.id, target=user.name)
        return user

    async def request_password_reset(self, uow: UnitOfWork, principal: Principal | None, *, email: str) -> None:
        """Mail a reset link if the email has an account; the same (empty) answer either way."""
        email = validate_email(email)
        now = self.clock()
        user = await UserRepository(uow).find_by_email(email)
        if user is None:
            log.info("password reset requested for an unknown email")
            return
        tokens = EmailTokenRepository(uow)
        await tokens.retire_all(user_id=user.id, purpose=EmailTokenPurpose.RESET_PASSWORD, now=now)
        await self._mail_token(uow, user, EmailTokenPurpose.RESET_PASSWORD, now=now)

    async def reset_password(
        self, uow: UnitOfWork, principal: Principal | None, *, token: str, new_password: str, source: str | None = None
    ) -> Outcome[None]:
        """Set a new password with a reset token (single use) and end every session of the user."""
        now = self.clock()
        user_id = await EmailTokenRepository(uow).consume(
            token_hash=secret_hash(token), purpose=EmailTokenPurpose.RESET_PASSWORD, now=now
        )
        if user_id is None:
            raise errors.invalid_email_token()
        users = UserRepository(uow)
        user = await users.get(user_id)
        if user is None:
            raise errors.invalid_email_token()
        # A weak password raises: the transaction rolls back and the token stays usable.
        check_password_strength(new_password, email=user.email, field="new_password")
        await users.set_password(user_id=user.id, password_hash=await self.hasher.hash(new_password), now=now)
        # The mailed link proves control of the address.
        await users.mark_email_verified(user_id=user.id, now=now)
        await EmailTokenRepository(uow).retire_all(user_id=user.id, purpose=EmailTokenPurpose.RESET_PASSWORD, now=now)
        revoked = await self._revoke_sessions(uow, user.id, reason=RevokeReason.PASSWORD_RESET, now=now, source=source)
        await self._audit(uow, AuditAction.PASSWORD_RESET, now=now, actor=user.id, target=user.name, source=source)
        return Outcome(value=None, revoked=tuple(revoked))

    async def _mail_token(self, uow: UnitOfWork, user: User, purpose: EmailTokenPurpose, *, now: datetime) -> None:
        token = new_secret()
        if purpose is EmailTokenPurpose.VERIFY_EMAIL:
            ttl, template, path = self.policy.email_verification_ttl, "verify_email", "verify-email"
        else:
            ttl, template, path = self.policy.password_reset_ttl, "reset_password", "reset-password"
        await EmailTokenRepository(uow).insert(
            token_hash=secret_hash(token), user_id=user.id, purpose=purpose, now=now, expire=now + ttl
        )
        link = f"{self.policy.public_base_url.rstrip('/')}/{path}?token={token}"
        mail = identity_events_pb2.MailRequestedEvent(
            to=user.email,
            template=template,
            params={
                "link": link,
                "token": token,
                "display_name": user.display_name,
                "expire_time": (now + ttl).isoformat(),
            },
        )
        self._emit_user_level(uow, mail, user)

    # -- sign-in and sessions --------------------------------------------------------------------

    async def sign_in(
        self, uow: UnitOfWork, principal: Principal | None, *, email: str, password: str, source: str | None = None
    ) -> Outcome[SignedIn]:
        """A new session for a correct email and password; one UNAUTHENTICATED answer for every failure."""
        email = normalize_email(email)
        now = self.clock()
        found = await UserRepository(uow).find_with_password(email) if len(email) <= MAX_EMAIL_CHARS else None
        user, password_hash = found if found is not None else (None, None)
        if user is None or password_hash is None:
            # Spend the time of a real verification so that timing does not tell unknown accounts apart.
            await self.hasher.verify_dummy(password)
            user_id = user.id if user is not None else None
            await self._audit_sign_in_failure(uow, now=now, user_id=user_id, email=email, source=source)
            return Outcome(error=errors.invalid_credentials())
        if not await self.hasher.verify(password_hash, password):
            await self._audit_sign_in_failure(uow, now=now, user_id=user.id, email=email, source=source)
            return Outcome(error=errors.invalid_credentials())
        if self.hasher.needs_rehash(password_hash):
            await UserRepository(uow).set_password(
                user_id=user.id, password_hash=await self.hasher.hash(password), now=now
            )
        signed_in = await self._start_session(uow, user, method=PASSWORD_METHOD, now=now)
        await self._audit(
            uow,
            AuditAction.SIGN_IN_SUCCEEDED,
            now=now,
            actor=user.id,
            target=user.name,
            after={"method": PASSWORD_METHOD, "session": str(signed_in.session_id)},
            source=source,
        )
        return Outcome(value=signed_in)

    async def _audit_sign_in_failure(
        self, uow: UnitOfWork, *, now: datetime, user_id: uuid.UUID | None, email: str, source: str | None
    ) -> None:
        # The actor is the account signed into (so its owner can see attempts), NULL for unknown emails.
        await self._audit(
            uow,
            AuditAction.SIGN_IN_FAILED,
            now=now,
            actor=user_id,
            target=user_name(user_id) if user_id is not None else None,
            after={"method": PASSWORD_METHOD, "email_hash": hashlib.sha256(email.encode()).hexdigest()},
            source=source,
        )

    async def _start_session(self, uow: UnitOfWork, user: User, *, method: str, now: datetime) -> SignedIn:
        session_id = uuid7()
        absolute_expire = now + self.policy.session_max
        refresh_expire = min(now + self.policy.refresh_token_ttl, absolute_expire)
        sessions = SessionRepository(uow)
        await sessions.insert(
            session_id=session_id,
            user_id=user.id,
            method=method,
            now=now,
            expire=refresh_expire,
            absolute_expire=absolute_expire,
        )
        refresh_token = new_secret()
        await sessions.insert_refresh_token(
            token_hash=secret_hash(refresh_token), session_id=session_id, generation=0, now=now, expire=refresh_expire
        )
        tokens = await self._user_tokens(user.id, session_id, refresh_token, refresh_expire, now=now)
        return SignedIn(user, tokens, session_id)

    async def _user_tokens(
        self,
        user_id: uuid.UUID,
        session_id: uuid.UUID,
        refresh_token: str,
        refresh_expire: datetime,
        *,
        now: datetime,
    ) -> TokenSet:
        signer = await self.keys.signer()
        access_token, access_expire = signer.sign(
            subject=str(user_id), session_id=str(session_id), ttl=self.policy.access_token_ttl, now=now
        )
        return TokenSet(access_token, access_expire, refresh_token, refresh_expire)

    async def refresh_tokens(
        self, uow: UnitOfWork, principal: Principal | None, *, refresh_token: str, source: str | None = None
    ) -> Outcome[TokenSet]:
        """Rotate a refresh token (see the module notes on reuse and the grace window)."""
        now = self.clock()
        token_hash = secret_hash(refresh_token)
        sessions = SessionRepository(uow)
        # Locked: a concurrent refresh of the same token waits here and then sees this one's rotation.
        row = await sessions.lock_refresh_token(token_hash)
        if row is None:
            await self._audit(
                uow, AuditAction.REFRESH_FAILED, now=now, after={"reason": "unknown_token"}, source=source
            )
            return Outcome(error=errors.invalid_refresh_token())
        session = await sessions.get(row.session_id)
        if session is None or not session.live_at(now) or now >= row.expire_time:
            ended = session is None or session.revoke_time is not None
            await self._audit(
                uow,
                AuditAction.REFRESH_FAILED,
                now=now,
                actor=session.user_id if session is not None else None,
                target=session.name if session is not None else None,
                after={"reason": "session_revoked" if ended else "expired"},
                source=source,
            )
            return Outcome(error=errors.session_ended(expired=not ended))
        if row.rotate_time is not None:
            if now - row.rotate_time <= self.policy.refresh_grace and row.successor_box is not None:
                successor = _open_successor(refresh_token, token_hash, row.successor_box)
                if successor is not None:
                    log.info("refresh within the grace window: same successor", session=str(session.id))
                    return Outcome(value=successor)
            # Reuse of a spent token: someone else may hold the family. End the session.
            revoked = await sessions.revoke(
                user_id=session.user_id, reason=RevokeReason.REFRESH_TOKEN_REUSE.value, now=now, only=session.id
            )
            await self._announce_revocation(
                uow, session.user_id, revoked, reason=RevokeReason.REFRESH_TOKEN_REUSE, now=now, source=source
            )
            await self._audit(
                uow,
                AuditAction.REFRESH_TOKEN_REUSED,
                now=now,
                actor=session.user_id,
                target=session.name,
                after={"generation": row.generation},
                source=source,
            )
            log.warning("refresh token reuse: session revoked", session=str(session.id))
            return Outcome(error=errors.refresh_token_reused(), revoked=tuple(revoked))
        successor_token = new_secret()
        successor_hash = secret_hash(successor_token)
        refresh_expire = min(now + self.policy.refresh_token_ttl, session.absolute_expire_time)
        await sessions.insert_refresh_token(
            token_hash=successor_hash,
            session_id=session.id,
            generation=row.generation + 1,
            now=now,
            expire=refresh_expire,
        )
        tokens = await self._user_tokens(session.user_id, session.id, successor_token, refresh_expire, now=now)
        await sessions.mark_rotated(
            token_hash=token_hash,
            successor_hash=successor_hash,
            successor_box=_seal_successor(refresh_token, token_hash, tokens),
            now=now,
        )
        await sessions.touch(session_id=session.id, now=now, expire=refresh_expire)
        # Earlier generations' successors are past their grace window by now: drop them.
        await sessions.clear_successor_boxes(session_id=session.id, before=now - self.policy.refresh_grace)
        return Outcome(value=tokens)

    async def sign_out(self, uow: UnitOfWork, principal: Principal, *, scope: str) -> Outcome[int]:
        """End the caller's session (`current`), all their sessions (`all`) or all others (`others`)."""
        user_id, session_id = self._user_session(principal)
        now = self.clock()
        sessions = SessionRepository(uow)
        if scope == "all":
            revoked = await sessions.revoke(user_id=user_id, reason=RevokeReason.SIGN_OUT.value, now=now)
        elif scope == "others":
            revoked = await sessions.revoke(
                user_id=user_id, reason=RevokeReason.SIGN_OUT.value, now=now, keep=session_id
            )
        elif scope == "current":
            # A principal without a session (auth disabled in development) has no current session.
            revoked = (
                await sessions.revoke(user_id=user_id, reason=RevokeReason.SIGN_OUT.value, now=now, only=session_id)
                if session_id is not None
                else []
            )
        else:
            raise InvalidArgument.for_field("scope", f"unknown scope {scope!r}")
        await self._announce_revocation(uow, user_id, revoked, reason=RevokeReason.SIGN_OUT, now=now)
        return Outcome(value=len(revoked), revoked=tuple(revoked))

    async def change_password(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        current_password: str,
        new_password: str,
        source: str | None = None,
    ) -> Outcome[int]:
        """Replace the caller's password and end their other sessions; PERMISSION_DENIED if the current one is wrong."""
        user_id, session_id = self._user_session(principal)
        now = self.clock()
        users = UserRepository(uow)
        user = await users.get(user_id)
        if user is None:
            raise errors.user_not_found(user_id)
        password_hash = await users.password_hash(user_id)
        if password_hash is None:
            await self.hasher.verify_dummy(current_password)
            ok = False
        else:
            ok = await self.hasher.verify(password_hash, current_password)
        if not ok:
            await self._audit(
                uow, AuditAction.PASSWORD_CHANGE_FAILED, now=now, actor=user.id, target=user.name, source=source
            )
            return Outcome(error=errors.wrong_current_password())
        check_password_strength(new_password, email=user.email, field="new_password")
        await users.set_password(user_id=user.id, password_hash=await self.hasher.hash(new_password), now=now)
        revoked = await SessionRepository(uow).revoke(
            user_id=user.id, reason=RevokeReason.PASSWORD_CHANGED.value, now=now, keep=session_id
        )
        await self._announce_revocation(
            uow, user.id, revoked, reason=RevokeReason.PASSWORD_CHANGED, now=now, source=source
        )
        await self._audit(uow, AuditAction.PASSWORD_CHANGED, now=now, actor=user.id, target=user.name, source=source)
        return Outcome(value=len(revoked), revoked=tuple(revoked))

    async def revoke_user_sessions(
        self, uow: UnitOfWork, principal: Principal | None, *, user_id: uuid.UUID, reason: RevokeReason
    ) -> Outcome[int]:
        """End every live session of a user (operators: see docs/runbooks/identity.md)."""
        revoked = await self._revoke_sessions(uow, user_id, reason=reason, now=self.clock())
        return Outcome(value=len(revoked), revoked=tuple(revoked))

    async def get_current_user(self, uow: UnitOfWork, principal: Principal) -> User:
        """The calling user."""
        user_id, _ = self._user_session(principal)
        user = await UserRepository(uow).get(user_id)
        if user is None:
            raise errors.user_not_found(user_id)
        return user

    async def list_sessions(self, uow: UnitOfWork, principal: Principal) -> list[Session]:
        """The caller's live sessions, newest first."""
        user_id, _ = self._user_session(principal)
        return await SessionRepository(uow).list_live(user_id=user_id, now=self.clock())

    async def require_live_session(self, uow: UnitOfWork, principal: Principal) -> None:
        """UNAUTHENTICATED unless the caller's session is still live in the database (the authority)."""
        user_id, session_id = self._user_session(principal)
        session = await SessionRepository(uow).get(session_id) if session_id is not None else None
        if session is None or session.user_id != user_id or not session.live_at(self.clock()):
            raise errors.session_ended()

    async def issue_workspace_token(self, principal: Principal, *, workspace_id: uuid.UUID) -> WorkspaceToken:
        """An access token for the workspace with the caller's role there (asked of tenancy; no transaction)."""
        user_id, session_id = self._user_session(principal)
        if session_id is None:
            raise errors.session_ended()
        if self.memberships is None:
            raise Unavailable("workspace tokens are unavailable: no tenancy service is configured")
        role = await self.memberships.caller_role(workspace_id=workspace_id)
        now = self.clock()
        signer = await self.keys.signer()
        token, expire = signer.sign(
            subject=str(user_id),
            session_id=str(session_id),
            workspace_id=str(workspace_id),
            role=role,
            ttl=self.policy.access_token_ttl,
            now=now,
        )
        return WorkspaceToken(TokenSet(token, expire), role)

    async def jwks(self) -> list[dict[str, str]]:
        """The public keys that verify access tokens (active and, during a rotation, previous)."""
        return await self.keys.jwks()

    def _user_session(self, principal: Principal) -> tuple[uuid.UUID, uuid.UUID | None]:
        if principal.kind == KIND_API_KEY:
            raise errors.user_token_required()
        session_id = uuid.UUID(principal.session_id) if principal.session_id else None
        return uuid.UUID(principal.subject), session_id

    async def _revoke_sessions(
        self,
        uow: UnitOfWork,
        user_id: uuid.UUID,
        *,
        reason: RevokeReason,
        now: datetime,
        keep: uuid.UUID | None = None,
        source: str | None = None,
    ) -> list[uuid.UUID]:
        revoked = await SessionRepository(uow).revoke(user_id=user_id, reason=reason.value, now=now, keep=keep)
        await self._announce_revocation(uow, user_id, revoked, reason=reason, now=now, source=source)
        return revoked

    async def _announce_revocation(
        self,
        uow: UnitOfWork,
        user_id: uuid.UUID,
        session_ids: Sequence[uuid.UUID],
        *,
        reason: RevokeReason,
        now: datetime,
        source: str | None = None,
    ) -> None:
        """SessionsRevokedEvent (every service rejects those sessions' tokens) and an audit row."""
        if not session_ids:
            return
        event = identity_events_pb2.SessionsRevokedEvent(
            user=user_name(user_id),
            session_ids=[str(session_id) for session_id in session_ids],
            reason=reason.value,
            revoke_time=_timestamp(now),
        )
        uow.emit(event, subject=user_name(user_id), tenant_id=str(USER_LEVEL_TENANT))
        await self._audit(
            uow,
            AuditAction.SESSIONS_REVOKED,
            now=now,
            actor=user_id,
            target=user_name(user_id),
            after={"sessions": [str(session_id) for session_id in session_ids], "reason": reason.value},
            source=source,
        )

    # -- API keys --------------------------------------------------------------------------------

    async def create_api_key(
        self, uow: UnitOfWork, principal: Principal, *, workspace_id: uuid.UUID, display_name: str, role: str
    ) -> CreatedApiKey:
        """A new API key of the workspace with a role; its secret is returned here only."""
        principal.require_tenant(str(workspace_id), resource=workspace_name(workspace_id))
        validate_display_name(display_name, field="api_key.display_name")
        if role not in ASSIGNABLE_ROLES:
            raise InvalidArgument.for_field("api_key.role", f"must be one of {', '.join(ASSIGNABLE_ROLES)}")
        secret = f"{API_KEY_PREFIX}_{workspace_id.hex}_{new_secret()}"
        prefix = secret[: len(API_KEY_PREFIX) + 1 + 32 + 1 + API_KEY_VISIBLE_RANDOM_CHARS]
        now = self.clock()
        key = await ApiKeyRepository(uow).insert(
            workspace_id=workspace_id,
            key_id=uuid7(),
            display_name=display_name,
            role=role,
            key_hash=secret_hash(secret),
            prefix=prefix,
            created_by=uuid.UUID(principal.subject),
            now=now,
        )
        await self._audit(
            uow,
            AuditAction.API_KEY_CREATED,
            now=now,
            tenant_id=workspace_id,
            actor=uuid.UUID(principal.subject),
            target=key.name,
            after={"display_name": key.display_name, "role": key.role, "prefix": key.prefix},
        )
        log.info("api key created", api_key=key.name, role=role)
        return CreatedApiKey(key, secret)

    async def list_api_keys(self, uow: UnitOfWork, principal: Principal, *, workspace_id: uuid.UUID) -> list[ApiKey]:
        """The workspace's API keys, newest first, revoked ones included."""
        principal.require_tenant(str(workspace_id), resource=workspace_name(workspace_id))
        return await ApiKeyRepository(uow).list(workspace_id=workspace_id)

    async def revoke_api_key(
        self, uow: UnitOfWork, principal: Principal, *, workspace_id: uuid.UUID, key_id: uuid.UUID
    ) -> Outcome[ApiKey]:
        """Revoke an API key (idempotent) and announce it; NOT_FOUND if absent or of another workspace."""
        principal.require_tenant(str(workspace_id), resource=api_key_name(workspace_id, key_id))
        now = self.clock()
        repository = ApiKeyRepository(uow)
        key = await repository.revoke(workspace_id=workspace_id, key_id=key_id, now=now)
        if key is None:
            raise errors.api_key_not_found(workspace_id, key_id)
        if key.revoke_time != now:  # revoked earlier: nothing new to announce
            return Outcome(value=key)
        uow.emit(
            identity_events_pb2.ApiKeyRevokedEvent(api_key=api_key_message(key)),
            subject=key.name,
            tenant_id=str(workspace_id),
        )
        await self._audit(
            uow,
            AuditAction.API_KEY_REVOKED,
            now=now,
            tenant_id=workspace_id,
            actor=uuid.UUID(principal.subject),
            target=key.name,
            before={"revoke_time": None},
            after={"revoke_time": now.isoformat()},
        )
        log.info("api key revoked", api_key=key.name)
        return Outcome(value=key, revoked=(key.id,))

    async def exchange_api_key(
        self, uow: UnitOfWork, principal: Principal | None, *, secret: str, source: str | None = None
    ) -> TokenSet:
        """A workspace token (kind `api_key`, sub = sid = the key's id) for a live key; UNAUTHENTICATED otherwise.

        The unit of work must be opened in the workspace the secret names (`api_key_workspace`).
        """
        workspace_id = api_key_workspace(secret)
        if workspace_id is None or uow.tenant_id is None or uuid.UUID(uow.tenant_id) != workspace_id:
            raise errors.invalid_api_key()
        now = self.clock()
        key = await ApiKeyRepository(uow).use(workspace_id=workspace_id, key_hash=secret_hash(secret), now=now)
        if key is None:
            log.info("api key exchange refused", workspace=workspace_name(workspace_id), source=source)
            raise errors.invalid_api_key()
        signer = await self.keys.signer()
        token, expire = signer.sign(
            subject=str(key.id),
            session_id=str(key.id),
            kind=KIND_API_KEY,
            workspace_id=str(workspace_id),
            role=key.role,
            ttl=self.policy.access_token_ttl,
            now=now,
        )
        return TokenSet(token, expire)

    # -- OIDC ------------------------------------------------------------------------------------

    def oidc_client(self, provider: str) -> OidcClient:
        """The client of a configured provider; INVALID_ARGUMENT naming `provider` otherwise."""
        client = self.oidc_clients.get(provider)
        if client is None:
            raise InvalidArgument.for_field("provider", f"unknown OIDC provider {provider!r}")
        return client

    async def oidc_authorization(self, *, provider: str, redirect_uri: str) -> AuthorizationRequest:
        """The provider's authorization URL with fresh state, nonce and PKCE challenge (no transaction)."""
        return await self.oidc_client(provider).authorization_request(redirect_uri)

    async def remember_oidc_login(
        self,
        uow: UnitOfWork,
        principal: Principal | None,
        *,
        provider: str,
        request: AuthorizationRequest,
        redirect_uri: str,
    ) -> None:
        """Store a started sign-in under the hash of its state, until it expires."""
        now = self.clock()
        await OidcRepository(uow).insert_login(
            state_hash=state_hash(request.state),
            provider=provider,
            nonce=request.nonce,
            code_verifier=request.code_verifier,
            redirect_uri=redirect_uri,
            now=now,
            expire=now + self.policy.oidc_login_ttl,
        )

    async def consume_oidc_login(self, uow: UnitOfWork, principal: Principal | None, *, state: str) -> OidcLogin:
        """The started sign-in of a state, marked used; INVALID_ARGUMENT naming `state` if unknown, used or expired."""
        found = await OidcRepository(uow).consume_login(state_hash=state_hash(state), now=self.clock())
        if found is None:
            raise InvalidArgument.for_field("state", "is unknown, used or expired")
        login = OidcLogin(
            provider=found["provider"],
            nonce=found["nonce"],
            code_verifier=found["code_verifier"],
            redirect_uri=found["redirect_uri"],
        )
        if login.provider not in self.oidc_clients:
            raise InvalidArgument.for_field("state", "belongs to a provider that is no longer configured")
        return login

    async def verify_oidc_callback(self, *, login: OidcLogin, code: str) -> VerifiedIdentity:
        """Redeem the code at the provider and validate the ID token (no transaction: it calls the provider)."""
        return await self.oidc_client(login.provider).complete(
            code=code, redirect_uri=login.redirect_uri, code_verifier=login.code_verifier, expected_nonce=login.nonce
        )

    async def audit_oidc_failure(
        self, uow: UnitOfWork, principal: Principal | None, *, provider: str, reason: str, source: str | None = None
    ) -> None:
        """Record a failed OIDC sign-in."""
        await self._audit(
            uow,
            AuditAction.OIDC_SIGN_IN_FAILED,
            now=self.clock(),
            after={"provider": provider, "reason": reason},
            source=source,
        )

    async def oidc_sign_in(
        self,
        uow: UnitOfWork,
        principal: Principal | None,
        *,
        provider: str,
        identity: VerifiedIdentity,
        source: str | None = None,
    ) -> Outcome[SignedIn]:
        """A session for the user linked to the provider account; links or creates the user by verified email.

        An existing account is linked by email only when the provider verified the email
        (FAILED_PRECONDITION otherwise). Linking to an account whose own email was never verified also
        removes its password and ends its sessions: whoever signed up with that address without
        controlling it (a pre-registered squatter) loses the account to its verified owner.
        """
        now = self.clock()
        users = UserRepository(uow)
        oidc = OidcRepository(uow)
        revoked: list[uuid.UUID] = []
        user: User | None = None
        linked_user_id = await oidc.find_identity(issuer=identity.issuer, subject=identity.subject)
        if linked_user_id is not None:
            user = await users.get(linked_user_id)
        if user is None:
            if identity.email is None:
                raise FailedPrecondition("the OIDC provider did not share an email address")
            email = normalize_email(identity.email)
            user = await users.find_by_email(email)
            if user is not None:
                if not identity.email_verified:
                    raise FailedPrecondition(
                        "an account with this email exists and the provider has not verified the email",
                        reason=errors.OIDC_EMAIL_NOT_VERIFIED,
                    )
                if not user.email_verified:
                    await self._evict_unverified_owner(uow, user, now=now)
                    revoked = await self._revoke_sessions(
                        uow, user.id, reason=RevokeReason.PASSWORD_RESET, now=now, source=source
                    )
                    user = await users.mark_email_verified(user_id=user.id, now=now) or user
            else:
                user = await self._create_oidc_user(uow, identity, email=email, now=now)
            await oidc.link_identity(
                issuer=identity.issuer,
                subject=identity.subject,
                provider=provider,
                user_id=user.id,
                email=identity.email,
                now=now,
            )
            await self._audit(
                uow,
                AuditAction.OIDC_IDENTITY_LINKED,
                now=now,
                actor=user.id,
                target=user.name,
                after={"provider": provider, "issuer": identity.issuer},
                source=source,
            )
        else:
            await oidc.link_identity(
                issuer=identity.issuer,
                subject=identity.subject,
                provider=provider,
                user_id=user.id,
                email=identity.email,
                now=now,
            )
        method = f"oidc:{provider}"
        signed_in = await self._start_session(uow, user, method=method, now=now)
        await self._audit(
            uow,
            AuditAction.OIDC_SIGN_IN_SUCCEEDED,
            now=now,
            actor=user.id,
            target=user.name,
            after={"method": method, "session": str(signed_in.session_id)},
            source=source,
        )
        return Outcome(value=signed_in, revoked=tuple(revoked))

    async def _create_oidc_user(
        self, uow: UnitOfWork, identity: VerifiedIdentity, *, email: str, now: datetime
    ) -> User:
        display_name = (identity.name or email.partition("@")[0] or "user").strip()[:DISPLAY_NAME_MAX_CHARS] or "user"
        user = await UserRepository(uow).insert(
            user_id=uuid7(),
            email=email,
            display_name=display_name,
            verified_at=now if identity.email_verified else None,
            now=now,
        )
        if user is None:  # the same email signed up concurrently
            raise Aborted("an account with this email was created concurrently; retry")
        self._emit_user_level(uow, identity_events_pb2.UserSignedUpEvent(user=user_message(user)), user)
        await self._audit(uow, AuditAction.SIGN_UP, now=now, actor=user.id, target=user.name, after={"method": "oidc"})
        return user

    async def _evict_unverified_owner(self, uow: UnitOfWork, user: User, *, now: datetime) -> None:
        """Replace the password of an unverified account by an unusable one before linking it."""
        await UserRepository(uow).set_password(
            user_id=user.id, password_hash=await self.hasher.hash(new_secret()), now=now
        )
        log.warning("unverified account claimed by a verified OIDC identity", user=user.name)

    # -- housekeeping ------------------------------------------------------------------------------

    async def purge_expired(self, uow: UnitOfWork) -> dict[str, int]:
        """Delete what can no longer be used (old counters, expired tokens and sessions, stale successors)."""
        now = self.clock()
        sessions = SessionRepository(uow)
        return {
            "rate_limits": await self.limiter.purge(uow, now=now),
            "email_tokens": await EmailTokenRepository(uow).purge(cutoff=now - timedelta(days=1)),
            "oidc_logins": await OidcRepository(uow).purge_logins(cutoff=now - timedelta(days=1)),
            "sessions": await sessions.purge(cutoff=now - timedelta(days=1)),
            "successor_boxes": await sessions.clear_successor_boxes(
                session_id=None, before=now - self.policy.refresh_grace
            ),
        }

    # -- helpers -----------------------------------------------------------------------------------

    def _emit_user_level(self, uow: UnitOfWork, event: Any, user: User) -> None:
        uow.emit(event, subject=user.name, tenant_id=str(USER_LEVEL_TENANT))

    async def _audit(
        self,
        uow: UnitOfWork,
        action: AuditAction,
        *,
        now: datetime,
        tenant_id: uuid.UUID | None = None,
        actor: uuid.UUID | None = None,
        target: str | None = None,
        before: Mapping[str, Any] | None = None,
        after: Mapping[str, Any] | None = None,
        source: str | None = None,
    ) -> None:
        await AuditRepository(uow).append(
            action=action.value,
            now=now,
            tenant_id=tenant_id,
            actor=actor,
            target=target,
            before=before,
            after=after,
            source_address=source,
            request_id=request_id_var.get(),
        )


def api_key_workspace(secret: str) -> uuid.UUID | None:
    """The workspace an API key secret names (`tsk_<workspace hex>_<random>`), or None if malformed."""
    prefix, _, rest = secret.partition("_")
    workspace_hex, _, random_part = rest.partition("_")
    if prefix != API_KEY_PREFIX or len(workspace_hex) != 32 or not random_part:
        return None
    try:
        return uuid.UUID(hex=workspace_hex)
    except ValueError:
        return None


def validate_email(email: str) -> str:
    """The normalized email; INVALID_ARGUMENT naming `email` if it is clearly not one."""
    normalized = normalize_email(email)
    local, at, domain = normalized.rpartition("@")
    if (
        not at
        or not local
        or "." not in domain
        or len(normalized) > MAX_EMAIL_CHARS
        or any(c.isspace() for c in normalized)
    ):
        raise InvalidArgument.for_field("email", "must be an email address")
    return normalized


def validate_display_name(display_name: str, *, field: str) -> None:
    """1 to 100 characters, not only whitespace, no control characters."""
    if not display_name.strip():
        raise InvalidArgument.for_field(field, "must not be empty or only whitespace")
    if len(display_name) > DISPLAY_NAME_MAX_CHARS:
        raise InvalidArgument.for_field(field, f"must be at most {DISPLAY_NAME_MAX_CHARS} characters")
    if any(unicodedata.category(char) == "Cc" for char in display_name):
        raise InvalidArgument.for_field(field, "must not contain control characters")


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


# -- the grace window's sealed successor ------------------------------------------------------------
#
# A rotated refresh token row keeps its successor tokens (refresh and access token) for the grace
# window, so that a second refresh racing the first (two browser tabs) gets the same answer. They are
# encrypted with AES-256-GCM under a key derived from the *rotated token itself* (HMAC-SHA256 keyed
# with the token, with a fixed context), and bound to the row by its hash as associated data. Only the
# token's SHA-256 is stored, so neither a database dump nor an operator can open the box; only a
# caller presenting the rotated token can, and only within the grace window (the box is cleared
# afterwards). Outside the window, presenting the rotated token is reuse and ends the session.


def _successor_key(refresh_token: str) -> bytes:
    return hmac.new(refresh_token.encode(), _SUCCESSOR_KEY_CONTEXT, hashlib.sha256).digest()


def _seal_successor(refresh_token: str, token_hash: bytes, tokens: TokenSet) -> bytes:
    assert tokens.refresh_token_expire_time is not None
    plaintext = json.dumps(
        {
            "access_token": tokens.access_token,
            "access_token_expire_time": tokens.access_token_expire_time.isoformat(),
            "refresh_token": tokens.refresh_token,
            "refresh_token_expire_time": tokens.refresh_token_expire_time.isoformat(),
        },
        separators=(",", ":"),
    ).encode()
    nonce = os.urandom(12)
    return nonce + AESGCM(_successor_key(refresh_token)).encrypt(nonce, plaintext, token_hash)


def _open_successor(refresh_token: str, token_hash: bytes, box: bytes) -> TokenSet | None:
    try:
        plaintext = AESGCM(_successor_key(refresh_token)).decrypt(box[:12], box[12:], token_hash)
        data = json.loads(plaintext)
        return TokenSet(
            access_token=data["access_token"],
            access_token_expire_time=datetime.fromisoformat(data["access_token_expire_time"]),
            refresh_token=data["refresh_token"],
            refresh_token_expire_time=datetime.fromisoformat(data["refresh_token_expire_time"]),
        )
    except (InvalidTag, ValueError, KeyError):
        return None
