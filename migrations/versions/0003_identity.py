"""identity: users, passwords, sessions, refresh tokens, signing keys, API keys, OIDC, rate limits, audit

Revision ID: 0003_identity
Revises: 0002_tenancy_memberships
Create Date: 2026-11-29

Creates the schema `identity` (owned by tessera_owner) for the identity service.

User-level tables (no tenant_id): a user, a session or a signing key belongs to no workspace, so there
is no tenant for row-level security to compare with. The identity service guards them itself: every
query filters by the user id of the verified caller (or by the hash of a secret only the caller holds),
and no other service's login role has any privilege on this schema.
- `users` (email stored lower-cased, unique), `password_credentials` (argon2id hashes),
  `email_tokens` (verification and reset tokens, SHA-256 hashes only, single use, expiring),
- `sessions` (one refresh-token family each) and `refresh_tokens` (SHA-256 hashes only; a rotated row
  keeps its successor's hash and, for the grace window only, the successor tokens encrypted under a key
  derived from the rotated token itself, so the database alone cannot reveal them),
- `signing_keys` (Ed25519; the private key is stored as raw bytes for now, see
  docs/runbooks/identity.md), `oidc_logins` (state hash, nonce, PKCE verifier), `oidc_identities`,
- `rate_limits` (fixed windows per key).
Tenant tables (RLS enabled and forced):
- `api_keys`: tenant_id = the workspace; policy `api_key_tenant` on `tessera.tenant_id`.
- `audit_log`: tenant_id is NULL for user-level events (sign-in, password change, sessions revoked).
  Reading: rows of the current tenant, or tenant-less rows whose actor is the current subject.
  Writing: rows of the current tenant or tenant-less rows (a failed sign-in has no subject yet).
  No UPDATE or DELETE policy and no such grant: the log is append-only for the service.
Plus the kit's `outbox` and `inbox` system tables (no tenant_id by design, as in 0001).

Downgrade drops the schema and every row in it (see the rollback note in docs/runbooks/identity.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003_identity"
down_revision: str | Sequence[str] | None = "0002_tenancy_memberships"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "identity"
LOGIN_ROLE = "tessera_identity"

CURRENT_TENANT = "NULLIF(current_setting('tessera.tenant_id', true), '')::uuid"
CURRENT_SUBJECT = "NULLIF(current_setting('tessera.subject', true), '')::uuid"

API_KEY_ROLES = "('admin', 'member', 'viewer', 'billing_manager')"


def _timestamp(
    name: str, *, nullable: bool = False, default_now: bool = False, comment: str | None = None
) -> sa.Column:
    return sa.Column(
        name,
        sa.DateTime(timezone=True),
        nullable=nullable,
        server_default=sa.func.now() if default_now else None,
        comment=comment,
    )


def upgrade() -> None:
    op.execute(f"CREATE SCHEMA {SCHEMA}")
    op.execute(f"COMMENT ON SCHEMA {SCHEMA} IS 'identity service: users, sessions, tokens, API keys'")
    op.execute(f"GRANT USAGE ON SCHEMA {SCHEMA} TO {LOGIN_ROLE}")

    op.create_table(
        "users",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("email", sa.Text, nullable=False, comment="lower-cased"),
        sa.Column("display_name", sa.Text, nullable=False),
        _timestamp("email_verify_time", nullable=True, comment="when the email was verified; NULL until then"),
        _timestamp("create_time", default_now=True),
        _timestamp("update_time", default_now=True),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.CheckConstraint("email = lower(email)", name="ck_users_email_lower"),
        sa.CheckConstraint("char_length(display_name) BETWEEN 1 AND 100", name="ck_users_display_name"),
        schema=SCHEMA,
        comment="people who sign in (user-level: no tenant)",
    )
    op.create_index("uq_users_email", "users", [sa.text("lower(email)")], unique=True, schema=SCHEMA)

    op.create_table(
        "password_credentials",
        sa.Column("user_id", sa.Uuid, nullable=False),
        sa.Column("password_hash", sa.Text, nullable=False, comment="argon2id, PHC string format"),
        _timestamp("update_time", default_now=True),
        sa.PrimaryKeyConstraint("user_id", name="pk_password_credentials"),
        sa.ForeignKeyConstraint(
            ["user_id"], [f"{SCHEMA}.users.id"], name="fk_password_credentials_user", ondelete="CASCADE"
        ),
        schema=SCHEMA,
        comment="password hashes (user-level)",
    )

    op.create_table(
        "email_tokens",
        sa.Column("token_hash", sa.LargeBinary, nullable=False, comment="SHA-256 of the token"),
        sa.Column("user_id", sa.Uuid, nullable=False),
        sa.Column("purpose", sa.Text, nullable=False),
        _timestamp("create_time", default_now=True),
        _timestamp("expire_time"),
        _timestamp("use_time", nullable=True, comment="set when the token is used (single use)"),
        sa.PrimaryKeyConstraint("token_hash", name="pk_email_tokens"),
        sa.ForeignKeyConstraint(["user_id"], [f"{SCHEMA}.users.id"], name="fk_email_tokens_user", ondelete="CASCADE"),
        sa.CheckConstraint("purpose IN ('verify_email', 'reset_password')", name="ck_email_tokens_purpose"),
        schema=SCHEMA,
        comment="email verification and password reset tokens (hashes only; user-level)",
    )
    op.create_index("ix_email_tokens_user_purpose", "email_tokens", ["user_id", "purpose"], schema=SCHEMA)

    op.create_table(
        "sessions",
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("user_id", sa.Uuid, nullable=False),
        sa.Column("method", sa.Text, nullable=False, comment="password, oidc:<provider>"),
        _timestamp("create_time", default_now=True),
        _timestamp("last_refresh_time", nullable=True),
        _timestamp("expire_time", comment="expiry of the current refresh token (sliding)"),
        _timestamp("absolute_expire_time", comment="the session ends here however often it is refreshed"),
        _timestamp("revoke_time", nullable=True),
        sa.Column("revoke_reason", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sessions"),
        sa.ForeignKeyConstraint(["user_id"], [f"{SCHEMA}.users.id"], name="fk_sessions_user", ondelete="CASCADE"),
        schema=SCHEMA,
        comment="signed-in sessions, one refresh-token family each (user-level)",
    )
    op.create_index(
        "ix_sessions_user_create_time",
        "sessions",
        ["user_id", sa.text("create_time DESC"), sa.text("id DESC")],
        schema=SCHEMA,
    )

    op.create_table(
        "refresh_tokens",
        sa.Column("token_hash", sa.LargeBinary, nullable=False, comment="SHA-256 of the token"),
        sa.Column("session_id", sa.Uuid, nullable=False),
        sa.Column("generation", sa.Integer, nullable=False, comment="0 at sign-in, +1 per rotation"),
        _timestamp("create_time", default_now=True),
        _timestamp("expire_time"),
        _timestamp("rotate_time", nullable=True, comment="when it was exchanged for its successor"),
        sa.Column("successor_hash", sa.LargeBinary, nullable=True),
        sa.Column(
            "successor_box",
            sa.LargeBinary,
            nullable=True,
            comment="successor tokens, AES-GCM under a key derived from this token; kept for the grace window only",
        ),
        sa.PrimaryKeyConstraint("token_hash", name="pk_refresh_tokens"),
        sa.ForeignKeyConstraint(
            ["session_id"], [f"{SCHEMA}.sessions.id"], name="fk_refresh_tokens_session", ondelete="CASCADE"
        ),
        schema=SCHEMA,
        comment="refresh tokens (hashes only), rotated on every use (user-level)",
    )
    op.create_index("ix_refresh_tokens_session", "refresh_tokens", ["session_id", "generation"], schema=SCHEMA)

    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.Text, nullable=False),
        sa.Column("algorithm", sa.Text, nullable=False, server_default="EdDSA"),
        sa.Column("private_key", sa.LargeBinary, nullable=False, comment="raw Ed25519 private key (32 bytes)"),
        sa.Column("public_key", sa.LargeBinary, nullable=False, comment="raw Ed25519 public key (32 bytes)"),
        _timestamp("create_time", default_now=True),
        _timestamp("activate_time", comment="from then on it signs new tokens (until a newer key activates)"),
        _timestamp("retire_time", nullable=True, comment="stopped signing; stays in the JWKS for the overlap window"),
        sa.PrimaryKeyConstraint("kid", name="pk_signing_keys"),
        sa.CheckConstraint("algorithm = 'EdDSA'", name="ck_signing_keys_algorithm"),
        schema=SCHEMA,
        comment="access token signing keys (service-level: no tenant)",
    )

    op.create_table(
        "api_keys",
        sa.Column("tenant_id", sa.Uuid, nullable=False, comment="the workspace"),
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("display_name", sa.Text, nullable=False),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("key_hash", sa.LargeBinary, nullable=False, comment="SHA-256 of the secret"),
        sa.Column("prefix", sa.Text, nullable=False, comment="first characters of the secret, shown to recognise it"),
        sa.Column("created_by", sa.Uuid, nullable=False),
        _timestamp("create_time", default_now=True),
        _timestamp("last_used_time", nullable=True),
        _timestamp("revoke_time", nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "id", name="pk_api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
        sa.CheckConstraint(f"role IN {API_KEY_ROLES}", name="ck_api_keys_role"),
        sa.CheckConstraint("char_length(display_name) BETWEEN 1 AND 100", name="ck_api_keys_display_name"),
        schema=SCHEMA,
        comment="API keys of service accounts, one workspace and role each (tenant table)",
    )
    op.create_index(
        "ix_api_keys_tenant_create_time",
        "api_keys",
        ["tenant_id", sa.text("create_time DESC"), sa.text("id DESC")],
        schema=SCHEMA,
    )
    op.execute(f"ALTER TABLE {SCHEMA}.api_keys ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {SCHEMA}.api_keys FORCE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY api_key_tenant ON {SCHEMA}.api_keys "
        f"USING (tenant_id = {CURRENT_TENANT}) WITH CHECK (tenant_id = {CURRENT_TENANT})"
    )

    op.create_table(
        "oidc_logins",
        sa.Column("state_hash", sa.LargeBinary, nullable=False, comment="SHA-256 of the state parameter"),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("nonce", sa.Text, nullable=False),
        sa.Column("code_verifier", sa.Text, nullable=False, comment="PKCE verifier (useless without the code)"),
        sa.Column("redirect_uri", sa.Text, nullable=False),
        _timestamp("create_time", default_now=True),
        _timestamp("expire_time"),
        _timestamp("use_time", nullable=True),
        sa.PrimaryKeyConstraint("state_hash", name="pk_oidc_logins"),
        schema=SCHEMA,
        comment="OIDC sign-ins in progress (anonymous: user-level)",
    )

    op.create_table(
        "oidc_identities",
        sa.Column("issuer", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("user_id", sa.Uuid, nullable=False),
        sa.Column("email", sa.Text, nullable=True, comment="email claim at linking time"),
        _timestamp("create_time", default_now=True),
        _timestamp("last_sign_in_time", nullable=True),
        sa.PrimaryKeyConstraint("issuer", "subject", name="pk_oidc_identities"),
        sa.ForeignKeyConstraint(
            ["user_id"], [f"{SCHEMA}.users.id"], name="fk_oidc_identities_user", ondelete="CASCADE"
        ),
        schema=SCHEMA,
        comment="provider accounts linked to users (user-level)",
    )
    op.create_index("ix_oidc_identities_user", "oidc_identities", ["user_id"], schema=SCHEMA)

    op.create_table(
        "rate_limits",
        sa.Column("key", sa.Text, nullable=False, comment="what is limited, e.g. sign_in:address:192.0.2.1"),
        _timestamp("window_start"),
        sa.Column("count", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("key", "window_start", name="pk_rate_limits"),
        schema=SCHEMA,
        comment="fixed-window counters of rate-limited actions (user-level)",
    )
    op.create_index("ix_rate_limits_window_start", "rate_limits", ["window_start"], schema=SCHEMA)

    op.create_table(
        "audit_log",
        sa.Column("tenant_id", sa.Uuid, nullable=True, comment="the workspace; NULL for user-level events"),
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("action", sa.Text, nullable=False, comment="e.g. sign_in.succeeded, api_key.created"),
        sa.Column("actor", sa.Uuid, nullable=True, comment="user (or account signed into); NULL if unknown"),
        sa.Column("target", sa.Text, nullable=True, comment="resource name acted on"),
        sa.Column("before", postgresql.JSONB, nullable=True),
        sa.Column("after", postgresql.JSONB, nullable=True),
        sa.Column("source_address", sa.Text, nullable=True),
        sa.Column("request_id", sa.Text, nullable=True),
        _timestamp("create_time", default_now=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
        schema=SCHEMA,
        comment="security-relevant actions of the identity service (append-only)",
    )
    op.create_index(
        "ix_audit_log_tenant_create_time", "audit_log", ["tenant_id", sa.text("create_time DESC")], schema=SCHEMA
    )
    op.create_index(
        "ix_audit_log_actor_create_time", "audit_log", ["actor", sa.text("create_time DESC")], schema=SCHEMA
    )
    op.execute(f"ALTER TABLE {SCHEMA}.audit_log ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {SCHEMA}.audit_log FORCE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY audit_log_read ON {SCHEMA}.audit_log FOR SELECT "
        f"USING (tenant_id = {CURRENT_TENANT} OR (tenant_id IS NULL AND actor = {CURRENT_SUBJECT}))"
    )
    op.execute(
        f"CREATE POLICY audit_log_append ON {SCHEMA}.audit_log FOR INSERT "
        f"WITH CHECK (tenant_id IS NULL OR tenant_id = {CURRENT_TENANT})"
    )

    op.create_table(
        "outbox",
        sa.Column("id", sa.Uuid, nullable=False, comment="event id (UUIDv7), also the Nats-Msg-Id"),
        sa.Column("nats_subject", sa.Text, nullable=False),
        sa.Column("envelope", sa.LargeBinary, nullable=False, comment="serialized tessera.common.v1.EventEnvelope"),
        _timestamp("created_at", default_now=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        schema=SCHEMA,
        comment="transactional outbox (system table: the relay reads across tenants; no RPC exposes it)",
    )
    op.create_table(
        "inbox",
        sa.Column("consumer", sa.Text, nullable=False),
        sa.Column("event_id", sa.Uuid, nullable=False),
        _timestamp("handled_at", default_now=True),
        sa.PrimaryKeyConstraint("consumer", "event_id", name="pk_inbox"),
        schema=SCHEMA,
        comment="events each consumer has handled (system table; makes handling idempotent)",
    )

    for table in (
        "users",
        "password_credentials",
        "email_tokens",
        "sessions",
        "refresh_tokens",
        "signing_keys",
        "api_keys",
        "oidc_logins",
        "oidc_identities",
        "rate_limits",
        "outbox",
        "inbox",
    ):
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {SCHEMA}.{table} TO {LOGIN_ROLE}")
    op.execute(f"GRANT SELECT, INSERT ON {SCHEMA}.audit_log TO {LOGIN_ROLE}")


def downgrade() -> None:
    # Dropping the tables drops their policies, indexes and grants; DROP SCHEMA without CASCADE fails
    # loudly if anything not created here ended up in the schema.
    for table in (
        "inbox",
        "outbox",
        "audit_log",
        "rate_limits",
        "oidc_identities",
        "oidc_logins",
        "api_keys",
        "signing_keys",
        "refresh_tokens",
        "sessions",
        "email_tokens",
        "password_credentials",
        "users",
    ):
        op.drop_table(table, schema=SCHEMA)
    op.execute(f"DROP SCHEMA {SCHEMA}")
