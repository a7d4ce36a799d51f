"""The expand/contract pair 0005/0006 (items.status_category) on real data: batches, resume, rollback.

Runbook: docs/runbooks/workflow-status-category.md. Each test migrates a scratch database to 0004,
writes projects and items directly (as the admin, a superuser, so RLS does not apply), then runs the
revisions through the runner as `tessera migrate up` does.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from migrations import runner
from migrations.online import BackfillIncomplete, BackfillProgress
from tests.migrations.conftest import admin_execute, categories, fetchval, seed_items

pytestmark = pytest.mark.gate("S04")

BEFORE = "0004_workflow"
EXPAND = "0005_status_category_expand"
CONTRACT = "0006_status_category_contract"
TESSERA = str(Path(sys.executable).parent / "tessera")


class Interrupted(Exception):
    """Stands for a crash or Ctrl-C in the middle of the backfill."""


def backfill_events(events: list[runner.Progress]) -> list[BackfillProgress]:
    return [event for event in events if isinstance(event, BackfillProgress)]


def leftover_backfill_policies(url: str) -> object:
    return asyncio.run(
        fetchval(url, "SELECT count(*) FROM pg_policies WHERE policyname LIKE '%status_category_backfill'")
    )


def column_state(url: str) -> tuple[object, object]:
    """(is status_category NOT NULL, is its CHECK constraint validated); (None, None) without the column."""

    async def read() -> tuple[object, object]:
        conn = await asyncpg.connect(url)
        try:
            row = await conn.fetchrow(
                "SELECT a.attnotnull, (SELECT c.convalidated FROM pg_constraint c "
                "  WHERE c.conrelid = a.attrelid AND c.conname = 'ck_items_status_category') AS validated "
                "FROM pg_attribute a WHERE a.attrelid = 'workflow.items'::regclass "
                "AND a.attname = 'status_category' AND NOT a.attisdropped"
            )
            return (None, None) if row is None else (row["attnotnull"], row["validated"])
        finally:
            await conn.close()

    return asyncio.run(read())


def test_expand_backfills_every_item_in_batches_with_its_project_category(scratch_url: str) -> None:
    runner.migrate(scratch_url, BEFORE)
    expected = asyncio.run(seed_items(scratch_url, tenants=3, items=3000))
    events: list[runner.Progress] = []

    runner.upgrade(scratch_url, EXPAND, options=runner.MigrationOptions(batch_size=500, progress=events.append))

    assert asyncio.run(categories(scratch_url)) == expected
    progress = backfill_events(events)
    assert [event.batches for event in progress if not event.done] == [1, 2, 3, 4, 5, 6]
    assert [event.updated for event in progress if not event.done] == [500, 1000, 1500, 2000, 2500, 3000]
    assert progress[-1].done
    assert (progress[-1].updated, progress[-1].scanned) == (3000, 3000)
    assert runner.current(scratch_url) == EXPAND
    assert leftover_backfill_policies(scratch_url) == 0
    assert column_state(scratch_url) == (False, None)


def test_interrupted_backfill_resumes_then_contract_and_rollback_keep_the_data(scratch_url: str) -> None:
    runner.migrate(scratch_url, BEFORE)
    expected = asyncio.run(seed_items(scratch_url, tenants=2, items=2000))

    def crash_after_third_batch(event: runner.Progress) -> None:
        if isinstance(event, BackfillProgress) and event.batches == 3 and not event.done:
            raise Interrupted

    with pytest.raises(Interrupted):
        runner.upgrade(
            scratch_url, EXPAND, options=runner.MigrationOptions(batch_size=400, progress=crash_after_third_batch)
        )

    # The revision is not recorded, but the column and the three committed batches are there.
    assert runner.current(scratch_url) == BEFORE
    partial = asyncio.run(categories(scratch_url))
    done = {key: category for key, category in partial.items() if category is not None}
    assert len(done) == 1200
    assert all(expected[key] == category for key, category in done.items())

    events: list[runner.Progress] = []
    runner.upgrade(scratch_url, EXPAND, options=runner.MigrationOptions(batch_size=400, progress=events.append))

    final = backfill_events(events)[-1]
    assert final.done
    assert (final.updated, final.scanned) == (800, 2000)  # only the rows not done before
    assert asyncio.run(categories(scratch_url)) == expected
    assert leftover_backfill_policies(scratch_url) == 0

    runner.upgrade(scratch_url, CONTRACT)
    assert column_state(scratch_url) == (True, True)
    assert asyncio.run(categories(scratch_url)) == expected

    async def items() -> set[tuple[object, ...]]:
        conn = await asyncpg.connect(scratch_url)
        try:
            rows = await conn.fetch("SELECT tenant_id, id, project_id, title, status, version FROM workflow.items")
            return {tuple(row) for row in rows}
        finally:
            await conn.close()

    before_rollback = asyncio.run(items())
    runner.downgrade(scratch_url, BEFORE)
    assert runner.current(scratch_url) == BEFORE
    assert column_state(scratch_url) == (None, None)
    assert asyncio.run(items()) == before_rollback
    assert len(before_rollback) == 2000


def test_items_whose_status_is_no_state_of_their_workflow_stop_the_expand_step(scratch_url: str) -> None:
    runner.migrate(scratch_url, BEFORE)
    expected = asyncio.run(seed_items(scratch_url, tenants=1, items=300))
    tenant, _ = next(iter(expected))
    asyncio.run(
        admin_execute(
            scratch_url,
            f"UPDATE workflow.items SET status = 'ghost' WHERE id IN "
            f"(SELECT id FROM workflow.items WHERE tenant_id = '{tenant}' ORDER BY id LIMIT 2)",
        )
    )

    with pytest.raises(BackfillIncomplete, match=r"2 rows of workflow\.items are still pending"):
        runner.upgrade(scratch_url, EXPAND, options=runner.MigrationOptions(batch_size=100))

    assert runner.current(scratch_url) == BEFORE
    assert sum(category is None for category in asyncio.run(categories(scratch_url)).values()) == 2
    # The runbook's fix: give those items a state of their workflow, then run the upgrade again.
    asyncio.run(admin_execute(scratch_url, "UPDATE workflow.items SET status = 'todo' WHERE status = 'ghost'"))
    runner.upgrade(scratch_url, EXPAND, options=runner.MigrationOptions(batch_size=100))
    assert runner.current(scratch_url) == EXPAND
    assert None not in asyncio.run(categories(scratch_url)).values()


async def _as_workflow_service(url: str, tenant: uuid.UUID, statement: str, *args: object) -> object:
    """One statement in a transaction of the workflow service's login role, with the tenant set (RLS)."""
    conn = await asyncpg.connect(runner.service_url(url, "workflow"))
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('tessera.tenant_id', $1, true)", str(tenant))
            return await conn.fetchval(statement, *args)
    finally:
        await conn.close()


def test_between_expand_and_contract_writers_unaware_of_the_column_keep_it_right(scratch_url: str) -> None:
    runner.migrate(scratch_url, BEFORE)
    asyncio.run(seed_items(scratch_url, tenants=1, items=0))
    runner.upgrade(scratch_url, EXPAND)

    async def standard_project() -> tuple[uuid.UUID, uuid.UUID]:
        conn = await asyncpg.connect(scratch_url)
        try:
            row = await conn.fetchrow(
                "SELECT tenant_id, id FROM workflow.projects WHERE workflow->>'initial' = 'todo' "
                "AND workflow->'states'->0->>'category' = 'BACKLOG'"
            )
            return row["tenant_id"], row["id"]
        finally:
            await conn.close()

    tenant, project = asyncio.run(standard_project())
    item = uuid.uuid4()

    def service(statement: str, *args: object) -> object:
        return asyncio.run(_as_workflow_service(scratch_url, tenant, statement, *args))

    # An older service version: inserts and transitions without the column; the sync trigger fills it.
    created = service(
        "INSERT INTO workflow.items (tenant_id, id, project_id, title, status, creator, updater) "
        "VALUES ($1, $2, $3, 'old writer', 'doing', 'users/a', 'users/a') RETURNING status_category",
        tenant,
        item,
        project,
    )
    assert created == "ACTIVE"
    assert service("UPDATE workflow.items SET status = 'done' WHERE id = $1 RETURNING status_category", item) == "DONE"
    # A newer version writes both; what it writes stands.
    assert (
        service(
            "UPDATE workflow.items SET status = 'dropped', status_category = 'CANCELLED' WHERE id = $1 "
            "RETURNING status_category",
            item,
        )
        == "CANCELLED"
    )

    runner.upgrade(scratch_url, CONTRACT)

    # After the contract step the column is required and checked; the trigger is gone.
    with pytest.raises(asyncpg.NotNullViolationError):
        service(
            "INSERT INTO workflow.items (tenant_id, id, project_id, title, status, creator, updater) "
            "VALUES ($1, $2, $3, 'old writer', 'doing', 'users/a', 'users/a')",
            tenant,
            uuid.uuid4(),
            project,
        )
    with pytest.raises(asyncpg.CheckViolationError):
        service("UPDATE workflow.items SET status_category = 'SOMEDAY' WHERE id = $1", item)
    triggers = "SELECT count(*) FROM pg_trigger WHERE tgname = 'items_sync_status_category'"
    assert asyncio.run(fetchval(scratch_url, triggers)) == 0


def test_contract_step_fails_on_a_missing_category_and_succeeds_once_fixed(scratch_url: str) -> None:
    runner.migrate(scratch_url, BEFORE)
    expected = asyncio.run(seed_items(scratch_url, tenants=1, items=200))
    runner.upgrade(scratch_url, EXPAND)
    tenant, item = next(iter(expected))
    # A status outside the workflow (written past the service): the trigger finds no category for it.
    asyncio.run(admin_execute(scratch_url, f"UPDATE workflow.items SET status = 'ghost' WHERE id = '{item}'"))
    assert asyncio.run(categories(scratch_url))[(tenant, item)] is None

    with pytest.raises(Exception, match="ck_items_status_category"):
        runner.upgrade(scratch_url, CONTRACT)

    assert runner.current(scratch_url) == EXPAND
    assert column_state(scratch_url) == (False, False)  # step 1 (NOT VALID) was committed, nothing else
    asyncio.run(admin_execute(scratch_url, f"UPDATE workflow.items SET status = 'todo' WHERE id = '{item}'"))
    runner.upgrade(scratch_url, CONTRACT)
    assert runner.current(scratch_url) == CONTRACT
    assert column_state(scratch_url) == (True, True)


def test_the_contract_constraint_lets_set_not_null_skip_its_table_scan(scratch_url: str) -> None:
    """0006 relies on PostgreSQL proving NOT NULL from the validated CHECK instead of scanning under
    ACCESS EXCLUSIVE; replay its last step on the head schema and read the server's debug message."""
    runner.migrate(scratch_url)

    async def replay() -> list[str]:
        conn = await asyncpg.connect(scratch_url)
        messages: list[str] = []
        conn.add_log_listener(lambda _conn, message: messages.append(str(message)))
        try:
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute("ALTER TABLE workflow.items ALTER COLUMN status_category DROP NOT NULL")
            await conn.execute("SET LOCAL client_min_messages = debug1")
            await conn.execute("ALTER TABLE workflow.items ALTER COLUMN status_category SET NOT NULL")
            await transaction.rollback()
            return messages
        finally:
            await conn.close()

    messages = asyncio.run(replay())
    assert any("sufficient to prove that it does not contain nulls" in message for message in messages), messages


def run_cli(tmp_path: Path, *args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("TESSERA_")}
    env |= {"TESSERA_HOME": str(tmp_path / "home"), "TESSERA_DATABASE_URL": database_url, "COLUMNS": "400"}
    return subprocess.run([TESSERA, *args], env=env, capture_output=True, text=True, timeout=300)


def test_cli_upgrade_reports_the_backfill_and_refuses_a_malformed_timeout(scratch_url: str, tmp_path: Path) -> None:
    runner.migrate(scratch_url, BEFORE)
    asyncio.run(seed_items(scratch_url, tenants=1, items=600))

    refused = run_cli(tmp_path, "migrate", "up", "--lock-timeout", "5 seconds; DROP", database_url=scratch_url)
    assert refused.returncode == 2
    assert "lock_timeout must be a duration" in refused.stdout
    assert runner.current(scratch_url) == BEFORE

    result = run_cli(tmp_path, "migrate", "up", EXPAND, "--batch-size", "100", database_url=scratch_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backfill status_category: done, 600 rows updated, 600 scanned in 6 batches" in result.stdout
    assert f"current: {EXPAND}" in result.stdout
