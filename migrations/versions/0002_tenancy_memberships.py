"""tenancy: memberships, invitations, audit log, soft delete; membership-based row-level security

Revision ID: 0002_tenancy_memberships
Revises: 0001
Create Date: 2026-11-29

Adds to the schema `tenancy`:
- `members` (PK tenant_id, user_id): who belongs to which workspace with which role. Two policies:
  `member_tenant` (every command) admits the rows of the transaction's `tessera.tenant_id`;
  `member_self_read` (SELECT only) also shows a user their own memberships in every workspace, which is
  what ListWorkspaces, LookupMembership and the workspaces policy below read. Writes need the tenant.
- `invitations`: pending/accepted/revoked invitations; only the SHA-256 of the token is stored.
- `audit_log`: who did what to which resource, with before/after JSON and the request id; append-only
  (the login role gets SELECT and INSERT only).
- `workspaces` gains `delete_time`, `purge_time` (soft delete with a restore window) and `version` (the
  etag). Its policy `workspace_tenant` changes: the creator clause of 0001 is replaced by membership,
  `tenant_id = tessera.tenant_id OR id IN (the subject's memberships)`, and writes need the tenant
  (WITH CHECK). The login role loses DELETE on workspaces: deletion is soft (an UPDATE); a purge job
  will come with its own grant.
Existing workspaces get their creator as owner (backfill), so nobody loses access to what they created.

Downgrade drops the three tables with their rows and the soft-delete columns (soft-deleted workspaces
become live again) and restores the creator-only policy of 0001 (see docs/runbooks/migrations.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_tenancy_memberships"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "tenancy"
LOGIN_ROLE = "tessera_tenancy"

ROLES = ("owner", "admin", "member", "viewer", "billing_manager")
INVITABLE_ROLES = tuple(role for role in ROLES if role != "owner")
INVITATION_STATES = ("PENDING", "ACCEPTED", "REVOKED", "EXPIRED")

CURRENT_TENANT = "NULLIF(current_setting('tessera.tenant_id', true), '')::uuid"
CURRENT_SUBJECT = "NULLIF(current_setting('tessera.subject', true), '')::uuid"
IN_TENANT = f"tenant_id = {CURRENT_TENANT}"
WORKSPACE_VISIBLE = (
    f"{IN_TENANT} OR id IN (SELECT m.tenant_id FROM {SCHEMA}.members m WHERE m.user_id = {CURRENT_SUBJECT})"
)
# 0001's policy, restored by the downgrade.
TENANT_OR_CREATOR = f"{IN_TENANT} OR creator = {CURRENT_SUBJECT}"


def _in_list(values: Sequence[str]) -> str:
    return ", ".join(f"'{value}'" for value in values)


def _timestamps() -> list[sa.Column[object]]:
    return [
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    ]


def _force_rls(table: str) -> None:
    op.execute(f"ALTER TABLE {SCHEMA}.{table} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {SCHEMA}.{table} FORCE ROW LEVEL SECURITY")


def upgrade() -> None:
    # --- workspaces: soft delete and etag --------------------------------------------------------------
    op.add_column(
        "workspaces",
        sa.Column("delete_time", sa.DateTime(timezone=True), nullable=True, comment="set while soft-deleted"),
        schema=SCHEMA,
    )
    op.add_column(
        "workspaces",
        sa.Column(
            "purge_time", sa.DateTime(timezone=True), nullable=True, comment="end of the restore window (if deleted)"
        ),
        schema=SCHEMA,
    )
    op.add_column(
        "workspaces",
        sa.Column("version", sa.Integer, nullable=False, server_default="1", comment="bumped on every change: etag"),
        schema=SCHEMA,
    )
    op.create_check_constraint(
        "ck_workspaces_deleted_has_purge_time",
        "workspaces",
        "(delete_time IS NULL) = (purge_time IS NULL)",
        schema=SCHEMA,
    )
    # Listing is by membership now; the creator index only served the creator-based listing.
    op.drop_index("ix_workspaces_creator_create_time", table_name="workspaces", schema=SCHEMA)

    # --- members ---------------------------------------------------------------------------------------
    op.create_table(
        "members",
        sa.Column("tenant_id", sa.Uuid, nullable=False, comment="the workspace"),
        sa.Column("user_id", sa.Uuid, nullable=False),
        sa.Column("role", sa.Text, nullable=False),
        *_timestamps(),
        sa.PrimaryKeyConstraint("tenant_id", "user_id", name="pk_members"),
        sa.ForeignKeyConstraint(
            ["tenant_id"], [f"{SCHEMA}.workspaces.id"], name="fk_members_workspace", ondelete="CASCADE"
        ),
        sa.CheckConstraint(f"role IN ({_in_list(ROLES)})", name="ck_members_role"),
        schema=SCHEMA,
        comment="memberships: a user's role in a workspace",
    )
    # A user's workspaces (ListWorkspaces, LookupMembership, the workspaces policy).
    op.create_index("ix_members_user_id", "members", ["user_id", "tenant_id"], schema=SCHEMA)
    op.create_index(
        "ix_members_tenant_id_create_time", "members", ["tenant_id", "create_time", "user_id"], schema=SCHEMA
    )
    _force_rls("members")
    op.execute(f"CREATE POLICY member_tenant ON {SCHEMA}.members USING ({IN_TENANT}) WITH CHECK ({IN_TENANT})")
    op.execute(f"CREATE POLICY member_self_read ON {SCHEMA}.members FOR SELECT USING (user_id = {CURRENT_SUBJECT})")

    # --- invitations -----------------------------------------------------------------------------------
    op.create_table(
        "invitations",
        sa.Column("tenant_id", sa.Uuid, nullable=False, comment="the workspace"),
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("email", sa.Text, nullable=False, comment="invitee address, lower case"),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("token_hash", sa.LargeBinary, nullable=False, comment="SHA-256 of the token; never the token"),
        sa.Column("inviter", sa.Text, nullable=False, comment="resource name of who invited, e.g. users/{id}"),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("expire_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("accept_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("accepted_by", sa.Uuid, nullable=True, comment="user id that accepted"),
        sa.Column("revoke_time", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "id", name="pk_invitations"),
        sa.ForeignKeyConstraint(
            ["tenant_id"], [f"{SCHEMA}.workspaces.id"], name="fk_invitations_workspace", ondelete="CASCADE"
        ),
        sa.CheckConstraint(f"role IN ({_in_list(INVITABLE_ROLES)})", name="ck_invitations_role"),
        sa.CheckConstraint(f"state IN ({_in_list(INVITATION_STATES)})", name="ck_invitations_state"),
        sa.CheckConstraint("octet_length(token_hash) = 32", name="ck_invitations_token_hash"),
        schema=SCHEMA,
        comment="invitations by email with a single-use token (stored hashed)",
    )
    op.create_index("uq_invitations_token_hash", "invitations", ["tenant_id", "token_hash"], unique=True, schema=SCHEMA)
    # At most one pending invitation per address and workspace (CreateInvitation: ALREADY_EXISTS).
    op.create_index(
        "uq_invitations_pending_email",
        "invitations",
        ["tenant_id", sa.text("lower(email)")],
        unique=True,
        schema=SCHEMA,
        postgresql_where=sa.text("state = 'PENDING'"),
    )
    op.create_index(
        "ix_invitations_tenant_id_create_time",
        "invitations",
        ["tenant_id", sa.text("create_time DESC"), sa.text("id DESC")],
        schema=SCHEMA,
    )
    _force_rls("invitations")
    op.execute(f"CREATE POLICY invitation_tenant ON {SCHEMA}.invitations USING ({IN_TENANT}) WITH CHECK ({IN_TENANT})")

    # --- audit log -------------------------------------------------------------------------------------
    op.create_table(
        "audit_log",
        sa.Column("tenant_id", sa.Uuid, nullable=False, comment="the workspace"),
        sa.Column("id", sa.Uuid, nullable=False, comment="UUIDv7"),
        sa.Column("action", sa.Text, nullable=False, comment="e.g. member.role_changed"),
        sa.Column("actor", sa.Text, nullable=False, comment="resource name of the caller, e.g. users/{id}"),
        sa.Column("target", sa.Text, nullable=False, comment="resource name acted on"),
        sa.Column("before", postgresql.JSONB, nullable=True),
        sa.Column("after", postgresql.JSONB, nullable=True),
        sa.Column("request_id", sa.Text, nullable=False, server_default=""),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("tenant_id", "id", name="pk_audit_log"),
        sa.ForeignKeyConstraint(
            ["tenant_id"], [f"{SCHEMA}.workspaces.id"], name="fk_audit_log_workspace", ondelete="CASCADE"
        ),
        schema=SCHEMA,
        comment="security-relevant changes of a workspace (append-only for the service)",
    )
    op.create_index(
        "ix_audit_log_tenant_id_create_time",
        "audit_log",
        ["tenant_id", sa.text("create_time DESC"), sa.text("id DESC")],
        schema=SCHEMA,
    )
    _force_rls("audit_log")
    op.execute(f"CREATE POLICY audit_tenant ON {SCHEMA}.audit_log USING ({IN_TENANT}) WITH CHECK ({IN_TENANT})")

    # --- workspaces policy: membership instead of creator ------------------------------------------------
    op.execute(f"DROP POLICY workspace_tenant ON {SCHEMA}.workspaces")
    op.execute(
        f"CREATE POLICY workspace_tenant ON {SCHEMA}.workspaces USING ({WORKSPACE_VISIBLE}) WITH CHECK ({IN_TENANT})"
    )

    # --- backfill: each existing workspace's creator becomes its owner ------------------------------------
    # RLS is forced for the owner role too; lift it for this one statement inside the migration's transaction.
    for table in ("workspaces", "members"):
        op.execute(f"ALTER TABLE {SCHEMA}.{table} NO FORCE ROW LEVEL SECURITY")
    op.execute(
        f"INSERT INTO {SCHEMA}.members (tenant_id, user_id, role, create_time, update_time) "
        f"SELECT id, creator, 'owner', create_time, create_time FROM {SCHEMA}.workspaces "
        "ON CONFLICT DO NOTHING"
    )
    for table in ("workspaces", "members"):
        op.execute(f"ALTER TABLE {SCHEMA}.{table} FORCE ROW LEVEL SECURITY")

    # --- grants ----------------------------------------------------------------------------------------
    op.execute(f"REVOKE DELETE ON {SCHEMA}.workspaces FROM {LOGIN_ROLE}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {SCHEMA}.members TO {LOGIN_ROLE}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE ON {SCHEMA}.invitations TO {LOGIN_ROLE}")
    op.execute(f"GRANT SELECT, INSERT ON {SCHEMA}.audit_log TO {LOGIN_ROLE}")


def downgrade() -> None:
    op.execute(f"GRANT DELETE ON {SCHEMA}.workspaces TO {LOGIN_ROLE}")
    op.execute(f"DROP POLICY workspace_tenant ON {SCHEMA}.workspaces")
    op.execute(
        f"CREATE POLICY workspace_tenant ON {SCHEMA}.workspaces "
        f"USING ({TENANT_OR_CREATOR}) WITH CHECK ({TENANT_OR_CREATOR})"
    )
    # Dropping a table drops its policies, indexes and grants with it.
    op.drop_table("audit_log", schema=SCHEMA)
    op.drop_table("invitations", schema=SCHEMA)
    op.drop_table("members", schema=SCHEMA)
    op.create_index(
        "ix_workspaces_creator_create_time",
        "workspaces",
        ["creator", sa.text("create_time DESC"), sa.text("id DESC")],
        schema=SCHEMA,
    )
    op.drop_constraint("ck_workspaces_deleted_has_purge_time", "workspaces", schema=SCHEMA)
    op.drop_column("workspaces", "version", schema=SCHEMA)
    op.drop_column("workspaces", "purge_time", schema=SCHEMA)
    op.drop_column("workspaces", "delete_time", schema=SCHEMA)
