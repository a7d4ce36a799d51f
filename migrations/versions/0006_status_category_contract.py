"""workflow: items.status_category, contract step (validated CHECK, NOT NULL, sync trigger removed)

Revision ID: 0006_status_category_contract
Revises: 0005_status_category_expand
Create Date: 2026-11-29

Contract half of the status_category change (runbook: docs/runbooks/workflow-status-category.md).
Deploy it only once every running workflow service version writes the column.

1. Short transaction: `ck_items_status_category` (not NULL and one of the four categories) is added
   NOT VALID: catalog only, existing rows are not checked, new writes are.
2. Autocommit: VALIDATE CONSTRAINT scans the table under SHARE UPDATE EXCLUSIVE, which blocks neither
   reads nor writes (its own statement_timeout, `validate_timeout`, since the scan is proportional to
   the table).
3. Short transaction: SET NOT NULL, which skips its table scan because the validated constraint already
   proves no NULL exists; the sync trigger of 0005 and its function are dropped (every writer now sets
   the column).

Downgrade restores 0005's state: the trigger and its function come back (so older service versions
can run again), then NOT NULL and the constraint go. No data is lost.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations.online import session_settings, squawk_ignore

revision: str = "0006_status_category_contract"
down_revision: str | Sequence[str] | None = "0005_status_category_expand"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "workflow"
CATEGORIES = "('BACKLOG', 'ACTIVE', 'DONE', 'CANCELLED')"
CONSTRAINT = "ck_items_status_category"
VALIDATE_TIMEOUT = "1h"

# Revision 0005's trigger function, repeated so that this revision stands alone.
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


def upgrade() -> None:
    op.execute(
        squawk_ignore(
            ["ban-drop-constraint"],
            "only the NOT VALID constraint of an interrupted earlier run of this revision can exist here",
            f"ALTER TABLE {SCHEMA}.items DROP CONSTRAINT IF EXISTS {CONSTRAINT}",
        )
    )
    op.execute(
        f"ALTER TABLE {SCHEMA}.items ADD CONSTRAINT {CONSTRAINT} "
        f"CHECK (status_category IS NOT NULL AND status_category IN {CATEGORIES}) NOT VALID"
    )
    with op.get_context().autocommit_block(), session_settings({"statement_timeout": VALIDATE_TIMEOUT}):
        op.execute(
            squawk_ignore(
                ["prefer-robust-stmts"],
                "VALIDATE is idempotent and must run outside the transaction that added the constraint",
                f"ALTER TABLE {SCHEMA}.items VALIDATE CONSTRAINT {CONSTRAINT}",
            )
        )
    op.execute(f"ALTER TABLE {SCHEMA}.items ALTER COLUMN status_category SET NOT NULL")
    op.execute(f"DROP TRIGGER IF EXISTS items_sync_status_category ON {SCHEMA}.items")
    op.execute(
        squawk_ignore(
            ["ban-drop-function"],
            "the contract step removes 0005's transitional trigger function, which only its trigger called",
            f"DROP FUNCTION IF EXISTS {SCHEMA}.items_sync_status_category()",
        )
    )


def downgrade() -> None:
    op.execute(SYNC_FUNCTION)
    op.execute(f"DROP TRIGGER IF EXISTS items_sync_status_category ON {SCHEMA}.items")
    op.execute(
        f"CREATE TRIGGER items_sync_status_category BEFORE INSERT OR UPDATE ON {SCHEMA}.items "
        f"FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.items_sync_status_category()"
    )
    op.execute(f"ALTER TABLE {SCHEMA}.items ALTER COLUMN status_category DROP NOT NULL")
    op.execute(f"ALTER TABLE {SCHEMA}.items DROP CONSTRAINT IF EXISTS {CONSTRAINT}")
