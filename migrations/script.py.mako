"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

Runs as tessera_owner in its own transaction (see migrations/runner.py, ADR 0009). Rules: every table
with tenant_id gets ENABLE and FORCE ROW LEVEL SECURITY and a policy on tessera.tenant_id; grant the
service login role only what it needs on its own schema; write table definitions out here (never
import application code); the downgrade must work; `tessera migrate lint` must pass (slow steps in
op.get_context().autocommit_block(), helpers in migrations/online.py); docs/runbooks/migrations.md
gets a rollback note if the change touches a table in use or loses data.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}

revision: str = ${repr(up_revision)}
down_revision: str | Sequence[str] | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
