"""workflow: items.status_category, expand step (nullable column, sync trigger, batched backfill)

Revision ID: 0005_status_category_expand
Revises: 0004_workflow
Create Date: 2026-11-29

Expand half of an expand/contract change (0006 is the contract half; runbook:
docs/runbooks/workflow-status-category.md). Items get `status_category`, the category (BACKLOG, ACTIVE,
DONE, CANCELLED) of their status in their project's workflow, denormalised so the sub-items guard and
category filters need no join with the workflow JSON.

1. One short transaction (lock_timeout applies): add the nullable column (catalog-only, no rewrite);
   a trigger that fills the column whenever a writer leaves it unset or changes `status` without it,
   so service versions that do not know the column keep it right until 0006; and two policies that let
   `tessera_owner` read projects and update items across tenants while the session setting
   `tessera.backfill` is `status_category` (RLS is forced for the owner too).
2. Autocommit: the backfill, in batches of `batch_size` rows over the key (tenant_id, id), each batch
   its own statement and commit; resumable (only rows still NULL are written). Rows whose status is
   not a state of their project's workflow stay NULL and fail the step with their count.
3. One short transaction: drop the two policies; the version moves to this revision.

No index on status_category: CountItems groups by status (served by ix_items_project_status) and the
sub-items guard reads the children of one parent (ix_items_parent); a low-cardinality category index
would not be chosen over them.

Downgrade drops the policies, the trigger, its function and the column (no data lost: the column is
derived from projects.workflow).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.online import backfill_in_batches, session_settings

revision: str = "0005_status_category_expand"
down_revision: str | Sequence[str] | None = "0004_workflow"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "workflow"
OWNER_ROLE = "tessera_owner"
BACKFILL_SETTING = "tessera.backfill"
BACKFILL_NAME = "status_category"
BACKFILL_POLICIES = {
    "items": "items_status_category_backfill",
    "projects": "projects_status_category_backfill",
}

# The category of NEW.status in the project's workflow; NULL when the status is no state of it.
SYNC_FUNCTION = f"""
CREATE OR REPLACE FUNCTION {SCHEMA}.items_sync_status_category() RETURNS trigger
LANGUAGE plpgsql AS $function$
BEGIN
    IF NEW.status_category IS NULL
       OR (TG_OP = 'UPDATE' AND NEW.status IS DISTINCT FROM OLD.status
           AND NEW.status_category IS NOT DISTINCT FROM OLD.status_category) THEN
        NEW.status_category := (
            SELECT s.state ->> 'category'
            FROM {SCHEMA}.projects p, jsonb_array_elements(p.workflow -> 'states') AS s(state)
            WHERE p.tenant_id = NEW.tenant_id AND p.id = NEW.project_id AND s.state ->> 'id' = NEW.status
            LIMIT 1
        );
    END IF;
    RETURN NEW;
END
$function$
"""

# One batch: the category of each pending item of the range, then the items that have one.
BACKFILL_UPDATE = f"""
WITH found AS MATERIALIZED (
    SELECT i.tenant_id, i.id, (
        SELECT s.state ->> 'category'
        FROM {SCHEMA}.projects p, jsonb_array_elements(p.workflow -> 'states') AS s(state)
        WHERE p.tenant_id = i.tenant_id AND p.id = i.project_id AND s.state ->> 'id' = i.status
        LIMIT 1
    ) AS category
    FROM {SCHEMA}.items i
    WHERE {{in_batch:i}} AND i.status_category IS NULL
)
UPDATE {SCHEMA}.items i SET status_category = f.category
FROM found f
WHERE {{in_batch:i}} AND i.tenant_id = f.tenant_id AND i.id = f.id
  AND f.category IS NOT NULL AND i.status_category IS NULL
RETURNING i.tenant_id
"""


def _drop_backfill_policies() -> None:
    for table, policy in BACKFILL_POLICIES.items():
        op.execute(f"DROP POLICY IF EXISTS {policy} ON {SCHEMA}.{table}")


def upgrade() -> None:
    # Every statement tolerates a previous, interrupted run of this revision (it committed step 1).
    op.execute(f"ALTER TABLE {SCHEMA}.items ADD COLUMN IF NOT EXISTS status_category text")
    op.execute(
        f"COMMENT ON COLUMN {SCHEMA}.items.status_category IS "
        "'category of status in the project workflow: BACKLOG, ACTIVE, DONE or CANCELLED'"
    )
    op.execute(SYNC_FUNCTION)
    op.execute(f"DROP TRIGGER IF EXISTS items_sync_status_category ON {SCHEMA}.items")
    op.execute(
        f"CREATE TRIGGER items_sync_status_category BEFORE INSERT OR UPDATE ON {SCHEMA}.items "
        f"FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.items_sync_status_category()"
    )
    _drop_backfill_policies()
    backfilling = f"current_setting('{BACKFILL_SETTING}', true) = '{BACKFILL_NAME}'"
    op.execute(
        f"CREATE POLICY {BACKFILL_POLICIES['projects']} ON {SCHEMA}.projects FOR SELECT TO {OWNER_ROLE} "
        f"USING ({backfilling})"
    )
    op.execute(
        f"CREATE POLICY {BACKFILL_POLICIES['items']} ON {SCHEMA}.items FOR ALL TO {OWNER_ROLE} "
        f"USING ({backfilling}) WITH CHECK ({backfilling})"
    )

    with op.get_context().autocommit_block(), session_settings({BACKFILL_SETTING: BACKFILL_NAME}):
        backfill_in_batches(
            BACKFILL_NAME,
            table=f"{SCHEMA}.items",
            key=("tenant_id", "id"),
            pending="status_category IS NULL",
            update=BACKFILL_UPDATE,
        )

    _drop_backfill_policies()


def downgrade() -> None:
    _drop_backfill_policies()
    op.execute(f"DROP TRIGGER IF EXISTS items_sync_status_category ON {SCHEMA}.items")
    op.execute(f"DROP FUNCTION IF EXISTS {SCHEMA}.items_sync_status_category()")
    op.execute(f"ALTER TABLE {SCHEMA}.items DROP COLUMN IF EXISTS status_category")
