"""workflow: projects, items, activity log, membership read model, usage counter; outbox and inbox

Revision ID: 0004_workflow
Revises: 0003_identity
Create Date: 2026-11-29

Creates the schema `workflow` (owned by tessera_owner) for the workflow service. Every tenant table is
keyed by (tenant_id, id), has RLS enabled and forced, and one policy admitting the rows of the
transaction's `tessera.tenant_id` for every command (USING and WITH CHECK):
- `projects`: display name, description, the workflow (states, transitions, guards) and the custom
  field definitions as JSONB; request_id/fingerprint for idempotent creation; version = etag.
- `items`: the work items. `search` is a stored generated tsvector over title (A) and description (B)
  with a GIN index; `labels` is a text[] with a GIN index; b-tree indexes serve the default order
  (create_time DESC, id DESC), the status board (status, then priority and age), the assignee filter, sub-item lookups and the
  request_id idempotency check (partial unique index).
- `activities`: the append-only activity log (SELECT and INSERT only for the login role).
- `members`: the service's read model of tenancy memberships (fed by MembershipChangedEvent), used to
  check that an assignee belongs to the workspace.
- `usage`: live items per workspace, the entitlement hook's counter, split over shard rows (the count
  is their sum) so that concurrent creates in one workspace do not queue on a single row lock.
Plus the kit's `outbox` and `inbox` system tables (no tenant_id by design, as in 0001).

Downgrade drops the schema and every row in it (see docs/runbooks/workflow.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004_workflow"
down_revision: str | Sequence[str] | None = "0003_identity"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "workflow"
LOGIN_ROLE = "tessera_workflow"
SEARCH_CONFIG = "english"

CURRENT_TENANT = "NULLIF(current_setting('tessera.tenant_id', true), '')::uuid"
TENANT_TABLES = ("projects", "items", "activities", "members", "usage")


def _time(name: str, *, nullable: bool = False, default_now: bool = False) -> sa.Column:
    return sa.Column(
        name, sa.DateTime(timezone=True), nullable=nullable, server_default=sa.func.now() if default_now else None
    )


def upgrade() -> None:
    op.execute(f"CREATE SCHEMA {SCHEMA}")
    op.execute(f"COMMENT ON SCHEMA {SCHEMA} IS 'workflow service: projects, work items, activity log'")
    op.execute(f"GRANT USAGE ON SCHEMA {SCHEMA} TO {LOGIN_ROLE}")

    op.create_table(
        "projects",
        sa.Column("tenant_id", sa.Uuid, nullable=False),
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("display_name", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("workflow", postgresql.JSONB, nullable=False),
        sa.Column("custom_fields", postgresql.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("creator", sa.Text, nullable=False),
        sa.Column("request_id", sa.Uuid, nullable=True),
        sa.Column("request_fingerprint", sa.Text, nullable=True),
        _time("create_time", default_now=True),
        _time("update_time", default_now=True),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
        sa.PrimaryKeyConstraint("tenant_id", "id", name="pk_projects"),
        sa.CheckConstraint("char_length(display_name) BETWEEN 1 AND 100", name="ck_projects_display_name"),
        schema=SCHEMA,
        comment="projects of a workspace, with their workflow and custom field definitions",
    )
    op.create_index(
        "uq_projects_request_id",
        "projects",
        ["tenant_id", "request_id"],
        unique=True,
        schema=SCHEMA,
        postgresql_where=sa.text("request_id IS NOT NULL"),
    )
    op.create_index("ix_projects_create_time", "projects", ["tenant_id", "create_time", "id"], schema=SCHEMA)

    op.create_table(
        "items",
        sa.Column("tenant_id", sa.Uuid, nullable=False),
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("project_id", sa.Uuid, nullable=False),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("priority", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("assignee", sa.Uuid, nullable=True),
        sa.Column("labels", postgresql.ARRAY(sa.Text), nullable=False, server_default=sa.text("'{}'::text[]")),
        _time("due_time", nullable=True),
        sa.Column("custom_fields", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("parent_id", sa.Uuid, nullable=True),
        sa.Column("creator", sa.Text, nullable=False),
        sa.Column("updater", sa.Text, nullable=False),
        sa.Column("request_id", sa.Uuid, nullable=True),
        sa.Column("request_fingerprint", sa.Text, nullable=True),
        _time("create_time", default_now=True),
        _time("update_time", default_now=True),
        _time("archive_time", nullable=True),
        _time("delete_time", nullable=True),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
        sa.Column(
            "search",
            postgresql.TSVECTOR,
            sa.Computed(
                f"setweight(to_tsvector('{SEARCH_CONFIG}', title), 'A') || "
                f"setweight(to_tsvector('{SEARCH_CONFIG}', description), 'B')",
                persisted=True,
            ),
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name="pk_items"),
        sa.ForeignKeyConstraint(
            ["tenant_id", "project_id"],
            [f"{SCHEMA}.projects.tenant_id", f"{SCHEMA}.projects.id"],
            name="fk_items_project",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "parent_id"], [f"{SCHEMA}.items.tenant_id", f"{SCHEMA}.items.id"], name="fk_items_parent"
        ),
        sa.CheckConstraint("char_length(title) BETWEEN 1 AND 300", name="ck_items_title"),
        sa.CheckConstraint("priority BETWEEN 0 AND 4", name="ck_items_priority"),
        sa.CheckConstraint("parent_id IS DISTINCT FROM id", name="ck_items_not_own_parent"),
        sa.CheckConstraint("jsonb_typeof(custom_fields) = 'object'", name="ck_items_custom_fields_object"),
        schema=SCHEMA,
        comment="work items; status is a state id of the project's workflow",
    )
    op.create_index(
        "ix_items_project_create_time",
        "items",
        ["tenant_id", "project_id", sa.text("create_time DESC"), sa.text("id DESC")],
        schema=SCHEMA,
    )
    # The board query: one status, ordered by priority then age (scanned backwards for DESC, keyset-friendly).
    op.create_index(
        "ix_items_project_status",
        "items",
        ["tenant_id", "project_id", "status", "priority", "create_time", "id"],
        schema=SCHEMA,
    )
    op.create_index(
        "ix_items_project_assignee",
        "items",
        ["tenant_id", "project_id", "assignee"],
        schema=SCHEMA,
        postgresql_where=sa.text("assignee IS NOT NULL"),
    )
    op.create_index(
        "ix_items_parent",
        "items",
        ["tenant_id", "parent_id"],
        schema=SCHEMA,
        postgresql_where=sa.text("parent_id IS NOT NULL"),
    )
    op.create_index(
        "uq_items_request_id",
        "items",
        ["tenant_id", "request_id"],
        unique=True,
        schema=SCHEMA,
        postgresql_where=sa.text("request_id IS NOT NULL"),
    )
    op.create_index("ix_items_search", "items", ["search"], schema=SCHEMA, postgresql_using="gin")
    op.create_index("ix_items_labels", "items", ["labels"], schema=SCHEMA, postgresql_using="gin")

    op.create_table(
        "activities",
        sa.Column("tenant_id", sa.Uuid, nullable=False),
        sa.Column("id", sa.Uuid, nullable=False, comment="UUIDv7: ordered by time"),
        sa.Column("item_id", sa.Uuid, nullable=False),
        sa.Column("project_id", sa.Uuid, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("field", sa.Text, nullable=False, server_default=""),
        sa.Column("before", postgresql.JSONB, nullable=True),
        sa.Column("after", postgresql.JSONB, nullable=True),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("request_id", sa.Text, nullable=False, server_default=""),
        _time("create_time", default_now=True),
        sa.PrimaryKeyConstraint("tenant_id", "id", name="pk_activities"),
        sa.ForeignKeyConstraint(
            ["tenant_id", "item_id"], [f"{SCHEMA}.items.tenant_id", f"{SCHEMA}.items.id"], name="fk_activities_item"
        ),
        sa.CheckConstraint(
            "kind IN ('CREATED', 'UPDATED', 'TRANSITIONED', 'ARCHIVED', 'UNARCHIVED', 'DELETED', 'UNDELETED')",
            name="ck_activities_kind",
        ),
        schema=SCHEMA,
        comment="append-only activity log of items",
    )
    op.create_index("ix_activities_item", "activities", ["tenant_id", "item_id", "id"], schema=SCHEMA)

    op.create_table(
        "members",
        sa.Column("tenant_id", sa.Uuid, nullable=False),
        sa.Column("user_id", sa.Uuid, nullable=False),
        sa.Column("role", sa.Text, nullable=True, comment="NULL once the membership ended"),
        _time("change_time"),
        sa.PrimaryKeyConstraint("tenant_id", "user_id", name="pk_members"),
        schema=SCHEMA,
        comment="read model of tenancy memberships (MembershipChangedEvent): who can be assigned",
    )

    op.create_table(
        "usage",
        sa.Column("tenant_id", sa.Uuid, nullable=False),
        sa.Column("shard", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("item_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("tenant_id", "shard", name="pk_usage"),
        sa.CheckConstraint("item_count >= 0", name="ck_usage_item_count"),
        schema=SCHEMA,
        comment="live (not deleted) items per workspace (sum over shards), for the entitlement hook",
    )

    for table in TENANT_TABLES:
        op.execute(f"ALTER TABLE {SCHEMA}.{table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {SCHEMA}.{table} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY {table}_tenant ON {SCHEMA}.{table} "
            f"USING (tenant_id = {CURRENT_TENANT}) WITH CHECK (tenant_id = {CURRENT_TENANT})"
        )

    op.create_table(
        "outbox",
        sa.Column("id", sa.Uuid, nullable=False, comment="event id (UUIDv7), also the Nats-Msg-Id"),
        sa.Column("nats_subject", sa.Text, nullable=False),
        sa.Column("envelope", sa.LargeBinary, nullable=False, comment="serialized tessera.common.v1.EventEnvelope"),
        _time("created_at", default_now=True),
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
        _time("handled_at", default_now=True),
        sa.PrimaryKeyConstraint("consumer", "event_id", name="pk_inbox"),
        schema=SCHEMA,
        comment="events each consumer has handled (system table; makes handling idempotent)",
    )

    for table in ("projects", "items", "members", "usage", "outbox", "inbox"):
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {SCHEMA}.{table} TO {LOGIN_ROLE}")
    op.execute(f"GRANT SELECT, INSERT ON {SCHEMA}.activities TO {LOGIN_ROLE}")


def downgrade() -> None:
    # Dropping the tables drops their policies, indexes and grants with them. DROP SCHEMA without
    # CASCADE fails loudly if anything not created here ended up in the schema.
    for table in ("inbox", "outbox", "usage", "members", "activities", "items", "projects"):
        op.drop_table(table, schema=SCHEMA)
    op.execute(f"REVOKE USAGE ON SCHEMA {SCHEMA} FROM {LOGIN_ROLE}")
    op.execute(f"DROP SCHEMA {SCHEMA}")
