"""Identity domain types, the Core tables they live in, and their mapping to the contract.

The tables mirror migrations/versions/0003_identity.py; migrations own the schema, these objects only
describe it to SQLAlchemy Core. Users, sessions, tokens and signing keys belong to no workspace
(user-level tables, guarded by the service); `api_keys` and `audit_log` carry a tenant.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from google.protobuf import timestamp_pb2
from sqlalchemy.dialects import postgresql

from tessera.identity.v1 import identity_pb2

SERVICE = "identity"
SCHEMA = "identity"

# Events about users and sessions belong to no workspace, but every envelope needs a tenant: they
# carry the nil UUID. Consumers (the mail sender, revocation lists) treat it as "user-level".
USER_LEVEL_TENANT = uuid.UUID(int=0)

USER_NAME_PREFIX = "users/"
WORKSPACE_NAME_PREFIX = "workspaces/"
API_KEY_COLLECTION = "apiKeys"
TOKEN_TYPE = "Bearer"  # noqa: S105  # the OAuth token type, not a secret
DISPLAY_NAME_MAX_CHARS = 100

metadata = sa.MetaData(schema=SCHEMA)


def _ts(name: str, *, nullable: bool = True) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("email", sa.Text, nullable=False),
    sa.Column("display_name", sa.Text, nullable=False),
    _ts("email_verify_time"),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

password_credentials = sa.Table(
    "password_credentials",
    metadata,
    sa.Column("user_id", sa.Uuid, primary_key=True),
    sa.Column("password_hash", sa.Text, nullable=False),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

email_tokens = sa.Table(
    "email_tokens",
    metadata,
    sa.Column("token_hash", sa.LargeBinary, primary_key=True),
    sa.Column("user_id", sa.Uuid, nullable=False),
    sa.Column("purpose", sa.Text, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    _ts("expire_time", nullable=False),
    _ts("use_time"),
)

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("user_id", sa.Uuid, nullable=False),
    sa.Column("method", sa.Text, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    _ts("last_refresh_time"),
    _ts("expire_time", nullable=False),
    _ts("absolute_expire_time", nullable=False),
    _ts("revoke_time"),
    sa.Column("revoke_reason", sa.Text),
)

refresh_tokens = sa.Table(
    "refresh_tokens",
    metadata,
    sa.Column("token_hash", sa.LargeBinary, primary_key=True),
    sa.Column("session_id", sa.Uuid, nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    _ts("expire_time", nullable=False),
    _ts("rotate_time"),
    sa.Column("successor_hash", sa.LargeBinary),
    sa.Column("successor_box", sa.LargeBinary),
)

signing_keys = sa.Table(
    "signing_keys",
    metadata,
    sa.Column("kid", sa.Text, primary_key=True),
    sa.Column("algorithm", sa.Text, nullable=False),
    sa.Column("private_key", sa.LargeBinary, nullable=False),
    sa.Column("public_key", sa.LargeBinary, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    _ts("activate_time", nullable=False),
    _ts("retire_time"),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("tenant_id", sa.Uuid, primary_key=True),
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("key_hash", sa.LargeBinary, nullable=False),
    sa.Column("prefix", sa.Text, nullable=False),
    sa.Column("created_by", sa.Uuid, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    _ts("last_used_time"),
    _ts("revoke_time"),
)

oidc_logins = sa.Table(
    "oidc_logins",
    metadata,
    sa.Column("state_hash", sa.LargeBinary, primary_key=True),
    sa.Column("provider", sa.Text, nullable=False),
    sa.Column("nonce", sa.Text, nullable=False),
    sa.Column("code_verifier", sa.Text, nullable=False),
    sa.Column("redirect_uri", sa.Text, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    _ts("expire_time", nullable=False),
    _ts("use_time"),
)

oidc_identities = sa.Table(
    "oidc_identities",
    metadata,
    sa.Column("issuer", sa.Text, primary_key=True),
    sa.Column("subject", sa.Text, primary_key=True),
    sa.Column("provider", sa.Text, nullable=False),
    sa.Column("user_id", sa.Uuid, nullable=False),
    sa.Column("email", sa.Text),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    _ts("last_sign_in_time"),
)

rate_limits = sa.Table(
    "rate_limits",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("window_start", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("count", sa.Integer, nullable=False),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("tenant_id", sa.Uuid),
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("actor", sa.Uuid),
    sa.Column("target", sa.Text),
    sa.Column("before", postgresql.JSONB),
    sa.Column("after", postgresql.JSONB),
    sa.Column("source_address", sa.Text),
    sa.Column("request_id", sa.Text),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)


class EmailTokenPurpose(enum.StrEnum):
    """What a mailed token is for."""

    VERIFY_EMAIL = "verify_email"
    RESET_PASSWORD = "reset_password"  # noqa: S105  # a purpose name, not a secret


class RevokeReason(enum.StrEnum):
    """Why sessions ended (SessionsRevokedEvent.reason)."""

    # S105: reason names, not secrets.
    SIGN_OUT = "sign_out"
    REFRESH_TOKEN_REUSE = "refresh_token_reuse"  # noqa: S105  # a name, not a secret
    PASSWORD_CHANGED = "password_changed"  # noqa: S105  # a name, not a secret
    PASSWORD_RESET = "password_reset"  # noqa: S105  # a name, not a secret
    OPERATOR = "operator"


class AuditAction(enum.StrEnum):
    """Audited actions of the identity service."""

    SIGN_UP = "user.signed_up"
    SIGN_IN_SUCCEEDED = "sign_in.succeeded"
    SIGN_IN_FAILED = "sign_in.failed"
    REFRESH_TOKEN_REUSED = "refresh_token.reused"  # noqa: S105  # an action name, not a secret
    REFRESH_FAILED = "refresh.failed"
    SESSIONS_REVOKED = "sessions.revoked"
    PASSWORD_CHANGED = "password.changed"  # noqa: S105  # a name, not a secret
    PASSWORD_CHANGE_FAILED = "password.change_failed"  # noqa: S105  # a name, not a secret
    PASSWORD_RESET = "password.reset"  # noqa: S105  # a name, not a secret
    EMAIL_VERIFIED = "email.verified"
    API_KEY_CREATED = "api_key.created"
    API_KEY_REVOKED = "api_key.revoked"
    OIDC_SIGN_IN_SUCCEEDED = "oidc_sign_in.succeeded"
    OIDC_SIGN_IN_FAILED = "oidc_sign_in.failed"
    OIDC_IDENTITY_LINKED = "oidc_identity.linked"


@dataclass(frozen=True, slots=True)
class User:
    """A person who signs in; the email is stored lower-cased."""

    id: uuid.UUID
    email: str
    display_name: str
    email_verify_time: datetime | None
    create_time: datetime

    @property
    def name(self) -> str:
        return user_name(self.id)

    @property
    def email_verified(self) -> bool:
        return self.email_verify_time is not None


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in session: one refresh-token family."""

    id: uuid.UUID
    user_id: uuid.UUID
    method: str
    create_time: datetime
    last_refresh_time: datetime | None
    expire_time: datetime
    absolute_expire_time: datetime
    revoke_time: datetime | None

    @property
    def name(self) -> str:
        return f"{user_name(self.user_id)}/sessions/{self.id}"

    def live_at(self, moment: datetime) -> bool:
        """Not revoked and not expired at `moment`."""
        return self.revoke_time is None and moment < self.expire_time


@dataclass(frozen=True, slots=True)
class RefreshTokenRow:
    """A stored refresh token (only its hash)."""

    token_hash: bytes
    session_id: uuid.UUID
    generation: int
    expire_time: datetime
    rotate_time: datetime | None
    successor_hash: bytes | None
    successor_box: bytes | None


@dataclass(frozen=True, slots=True)
class TokenSet:
    """Tokens handed to a client: an access token and (for sessions) a refresh token."""

    access_token: str
    access_token_expire_time: datetime
    refresh_token: str = ""
    refresh_token_expire_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key of a service account (its secret is never stored, only its hash)."""

    workspace_id: uuid.UUID
    id: uuid.UUID
    display_name: str
    role: str
    prefix: str
    created_by: uuid.UUID
    create_time: datetime
    last_used_time: datetime | None
    revoke_time: datetime | None

    @property
    def name(self) -> str:
        return api_key_name(self.workspace_id, self.id)


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A stored signing key."""

    kid: str
    private_key: bytes
    public_key: bytes
    activate_time: datetime
    retire_time: datetime | None


def user_name(user_id: uuid.UUID) -> str:
    """The resource name `users/{id}`."""
    return f"{USER_NAME_PREFIX}{user_id}"


def workspace_name(workspace_id: uuid.UUID) -> str:
    """The resource name `workspaces/{id}`."""
    return f"{WORKSPACE_NAME_PREFIX}{workspace_id}"


def api_key_name(workspace_id: uuid.UUID, key_id: uuid.UUID) -> str:
    """The resource name `workspaces/{ws}/apiKeys/{key}`."""
    return f"{workspace_name(workspace_id)}/{API_KEY_COLLECTION}/{key_id}"


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def user_message(user: User) -> identity_pb2.User:
    """The contract form of a user."""
    return identity_pb2.User(
        name=user.name,
        email=user.email,
        display_name=user.display_name,
        email_verified=user.email_verified,
        create_time=_timestamp(user.create_time),
    )


def session_message(session: Session, *, current_session: str | None) -> identity_pb2.Session:
    """The contract form of a session; `current` marks the caller's own."""
    message = identity_pb2.Session(
        name=session.name,
        method=session.method,
        create_time=_timestamp(session.create_time),
        expire_time=_timestamp(session.expire_time),
        current=current_session is not None and str(session.id) == current_session,
    )
    if session.last_refresh_time is not None:
        message.last_refresh_time.CopyFrom(_timestamp(session.last_refresh_time))
    return message


def token_set_message(tokens: TokenSet) -> identity_pb2.TokenSet:
    """The contract form of a token set."""
    message = identity_pb2.TokenSet(
        access_token=tokens.access_token,
        access_token_expire_time=_timestamp(tokens.access_token_expire_time),
        refresh_token=tokens.refresh_token,
        token_type=TOKEN_TYPE,
    )
    if tokens.refresh_token_expire_time is not None:
        message.refresh_token_expire_time.CopyFrom(_timestamp(tokens.refresh_token_expire_time))
    return message


def api_key_message(key: ApiKey) -> identity_pb2.ApiKey:
    """The contract form of an API key (never its secret)."""
    message = identity_pb2.ApiKey(
        name=key.name,
        display_name=key.display_name,
        role=key.role,
        prefix=key.prefix,
        create_time=_timestamp(key.create_time),
    )
    if key.last_used_time is not None:
        message.last_used_time.CopyFrom(_timestamp(key.last_used_time))
    if key.revoke_time is not None:
        message.revoke_time.CopyFrom(_timestamp(key.revoke_time))
    return message
