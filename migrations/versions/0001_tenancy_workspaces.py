"""tenancy: schema, workspaces under forced RLS, outbox and inbox

Revision ID: 0001
Revises:
Create Date: 2026-11-29

Creates the schema `tenancy` (owned by tessera_owner, like everything a migration creates) with:
- `workspaces`: the tenant itself, so `tenant_id` = `id` (a check constraint holds that). RLS is
  enabled and forced; the policy `workspace_tenant` admits a row when its tenant is the transaction's
  `tessera.tenant_id` OR its creator is the transaction's `tessera.subject`. The creator clause exists
  because memberships arrive only in the next issue: until then a user sees (and may create) exactly
  the workspaces they created. When memberships land, that clause is replaced by a membership check.
- `outbox` and `inbox`: the kit's system tables (services/kit/db.py), written out here because a
  migration must not import application code that may change. They have no tenant_id by design: the
  relay reads across tenants; the tenant travels inside each envelope.
The login role tessera_tenancy gets USAGE on the schema and DML on these tables, nothing else.

Downgrade drops the schema and every row in it (see docs/runbooks/migrations.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "tenancy"
LOGIN_ROLE = "tessera_tenancy"

TENANT_OR_CREATOR = (
    "tenant_id = NULLIF(current_setting('tessera.tenant_id', true), '')::uuid"
    " OR creator = NULLIF(current_setting('tessera.subject', true), '')::uuid"
)


def upgrade() -> None:
    op.execute(f"CREATE SCHEMA {SCHEMA}")
    op.execute(f"COMMENT ON SCHEMA {SCHEMA} IS 'tenancy service: workspaces (the tenants)'")
    op.execute(f"GRANT USAGE ON SCHEMA {SCHEMA} TO {LOGIN_ROLE}")

    op.create_table(
        "workspaces",
        sa.Column("tenant_id", sa.Uuid, nullable=False, comment="the workspace is its own tenant: equals id"),
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("display_name", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("creator", sa.Uuid, nullable=False, comment="user id of the creator"),
        sa.Column("request_id", sa.Uuid, nullable=True, comment="idempotency key of the CreateWorkspace call"),
        sa.Column(
            "request_fingerprint",
            sa.Text,
            nullable=True,
            comment="hash of the create payload; a different payload under the same request_id is refused",
        ),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_workspaces"),
        sa.CheckConstraint("tenant_id = id", name="ck_workspaces_tenant_is_id"),
        sa.CheckConstraint("state IN ('PROVISIONING', 'ACTIVE')", name="ck_workspaces_state"),
        sa.CheckConstraint("char_length(display_name) BETWEEN 1 AND 100", name="ck_workspaces_display_name"),
        schema=SCHEMA,
        comment="workspaces, the tenants of Tessera",
    )
    op.create_index("ix_workspaces_tenant_id", "workspaces", ["tenant_id"], schema=SCHEMA)
    op.create_index(
        "uq_workspaces_creator_request_id", "workspaces", ["creator", "request_id"], unique=True, schema=SCHEMA
    )
    op.create_index(
        "ix_workspaces_creator_create_time",
        "workspaces",
        ["creator", sa.text("create_time DESC"), sa.text("id DESC")],
        schema=SCHEMA,
    )
    op.execute(f"ALTER TABLE {SCHEMA}.workspaces ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {SCHEMA}.workspaces FORCE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY workspace_tenant ON {SCHEMA}.workspaces "
        f"USING ({TENANT_OR_CREATOR}) WITH CHECK ({TENANT_OR_CREATOR})"
    )

    op.create_table(
        "outbox",
        sa.Column("id", sa.Uuid, nullable=False, comment="event id (UUIDv7), also the Nats-Msg-Id"),
        sa.Column("nats_subject", sa.Text, nullable=False),
        sa.Column("envelope", sa.LargeBinary, nullable=False, comment="serialized tessera.common.v1.EventEnvelope"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
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
        sa.Column("handled_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("consumer", "event_id", name="pk_inbox"),
        schema=SCHEMA,
        comment="events each consumer has handled (system table; makes handling idempotent)",
    )

    for table in ("workspaces", "outbox", "inbox"):
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {SCHEMA}.{table} TO {LOGIN_ROLE}")


def downgrade() -> None:
    # Dropping the tables drops their policies, indexes and grants with them. DROP SCHEMA without
    # CASCADE fails loudly if anything not created here ended up in the schema.
    op.drop_table("inbox", schema=SCHEMA)
    op.drop_table("outbox", schema=SCHEMA)
    op.execute(f"DROP POLICY workspace_tenant ON {SCHEMA}.workspaces")
    op.drop_table("workspaces", schema=SCHEMA)
    op.execute(f"DROP SCHEMA {SCHEMA}")
