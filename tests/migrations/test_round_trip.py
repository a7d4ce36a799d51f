"""Migration safety (gate S04): upgrade head → downgrade base → upgrade head on a fresh database."""

from __future__ import annotations

import asyncio
import threading
import uuid

import asyncpg
import pytest

from migrations import runner
from migrations.online import BackfillProgress
from tests.migrations.conftest import admin_execute as _admin
from tests.migrations.conftest import fetchval, seed_items

pytestmark = pytest.mark.gate("S04")


def test_round_trip_restores_an_identical_schema(scratch_url: str) -> None:
    assert runner.current(scratch_url) is None

    report = runner.round_trip(scratch_url)

    assert report.head == runner.heads()[0]
    assert runner.current(scratch_url) == report.head
    assert runner.snapshot_diff(report.at_head, report.at_head_again) == []
    assert report.at_head == report.at_head_again
    # The comparison is not vacuous: the head schema has the tenancy tables under forced RLS, with the policy.
    relations = {(row[0], row[1]): row for row in report.at_head["relations"]}
    workspaces = relations[("tenancy", "workspaces")]
    assert workspaces[3:6] == ("tessera_owner", "True", "True")
    assert ("tenancy", "outbox") in relations
    assert ("tenancy", "inbox") in relations
    assert [row[2] for row in report.at_head["policies"] if row[:2] == ("tenancy", "workspaces")] == [
        "workspace_tenant"
    ]


def test_downgrade_to_base_leaves_no_service_schema(scratch_url: str) -> None:
    runner.migrate(scratch_url)
    runner.downgrade(scratch_url, "base")

    snapshot = runner.schema_snapshot(scratch_url)
    schemas = {row[0] for row in snapshot["schemas"]}
    assert schemas.isdisjoint(runner.SERVICES)
    assert [row for row in snapshot["relations"] if row[0] != runner.META_SCHEMA] == []
    assert snapshot["policies"] == []
    assert runner.current(scratch_url) is None


def test_every_object_a_migration_creates_is_owned_by_the_owner_role(scratch_url: str) -> None:
    runner.migrate(scratch_url)

    snapshot = runner.schema_snapshot(scratch_url)
    owners = {row[1] for row in snapshot["schemas"] if row[0] in (*runner.SERVICES, runner.META_SCHEMA)}
    owners |= {row[3] for row in snapshot["relations"]}
    assert owners == {runner.OWNER_ROLE}


def test_downgrade_discards_data_and_upgrade_starts_empty(scratch_url: str) -> None:
    """What the rollback note in docs/runbooks/migrations.md warns about: revision 0001's downgrade drops data."""
    runner.migrate(scratch_url)
    workspace_id = uuid.uuid4()
    asyncio.run(
        _admin(
            scratch_url,
            "INSERT INTO tenancy.workspaces (tenant_id, id, display_name, state, creator) "
            f"VALUES ('{workspace_id}', '{workspace_id}', 'kept?', 'ACTIVE', '{uuid.uuid4()}')",
        )
    )
    runner.downgrade(scratch_url, "base")
    runner.upgrade(scratch_url, "head")

    async def count() -> int:
        conn = await asyncpg.connect(scratch_url)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM tenancy.workspaces"))
        finally:
            await conn.close()

    assert asyncio.run(count()) == 0


def test_bootstrap_is_idempotent_and_sets_role_attributes(scratch_url: str) -> None:
    runner.bootstrap(scratch_url)
    runner.bootstrap(scratch_url)

    async def roles() -> dict[str, tuple[bool, bool, bool, bool]]:
        conn = await asyncpg.connect(scratch_url)
        try:
            rows = await conn.fetch(
                "SELECT rolname, rolsuper, rolbypassrls, rolcanlogin, rolinherit FROM pg_roles WHERE rolname = ANY($1)",
                [runner.OWNER_ROLE, *(runner.service_role(s) for s in runner.SERVICES)],
            )
            return {
                row["rolname"]: (row["rolsuper"], row["rolbypassrls"], row["rolcanlogin"], row["rolinherit"])
                for row in rows
            }
        finally:
            await conn.close()

    found = asyncio.run(roles())
    assert found[runner.OWNER_ROLE] == (False, False, False, True)
    for service in runner.SERVICES:
        assert found[runner.service_role(service)] == (False, False, True, False)


def test_concurrent_upgrades_of_one_database_serialise(scratch_url: str) -> None:
    runner.bootstrap(scratch_url)

    async def both() -> None:
        await asyncio.gather(
            asyncio.to_thread(runner.upgrade, scratch_url, "head"),
            asyncio.to_thread(runner.upgrade, scratch_url, "head"),
        )

    asyncio.run(both())
    assert runner.current(scratch_url) == runner.heads()[0]


def test_a_second_upgrade_waits_for_the_first_without_holding_a_snapshot(scratch_url: str) -> None:
    """The first run commits batches between its revisions' transactions, yet a second run still waits
    for all of it; while waiting it holds no snapshot, so a concurrent index build can finish."""
    runner.migrate(scratch_url, "0004_workflow")
    asyncio.run(seed_items(scratch_url, tenants=1, items=600))
    in_backfill, release = threading.Event(), threading.Event()
    first_events: list[runner.Progress] = []
    second_events: list[runner.Progress] = []
    second_waits = threading.Event()

    def pause_in_first_batch(event: runner.Progress) -> None:
        first_events.append(event)
        if isinstance(event, BackfillProgress) and event.batches == 1 and not event.done:
            in_backfill.set()
            assert release.wait(60), "the test never released the first run"

    def note_wait(event: runner.Progress) -> None:
        second_events.append(event)
        if isinstance(event, runner.LockWait):
            second_waits.set()

    errors: list[BaseException] = []

    def run(options: runner.MigrationOptions) -> None:
        try:
            runner.upgrade(scratch_url, "head", options=options)
        except BaseException as exc:
            errors.append(exc)

    first = threading.Thread(target=run, args=(runner.MigrationOptions(batch_size=100, progress=pause_in_first_batch),))
    second = threading.Thread(target=run, args=(runner.MigrationOptions(batch_size=100, progress=note_wait),))
    first.start()
    try:
        assert in_backfill.wait(60)
        second.start()
        assert second_waits.wait(30)
        [wait] = [event for event in second_events if isinstance(event, runner.LockWait)]
        assert wait.holder_pid is not None
        # The first run has committed a batch, but the revision is not recorded and the second run waits.
        assert runner.current(scratch_url) == "0004_workflow"
        assert second.is_alive()
        # A waiting `pg_advisory_lock()` call would hold a snapshot and this build would wait for it.
        asyncio.run(_admin(scratch_url, "CREATE TABLE public.probe (x int)"))
        asyncio.run(
            asyncio.wait_for(_admin(scratch_url, "CREATE INDEX CONCURRENTLY probe_x ON public.probe (x)"), timeout=20)
        )
    finally:
        release.set()
        first.join(120)
        second.join(120)

    assert errors == []
    assert runner.current(scratch_url) == runner.heads()[0]
    # The second run found nothing left to do: it never ran a batch.
    assert [event for event in second_events if isinstance(event, BackfillProgress) and event.batches] == []
    assert [event.updated for event in first_events if isinstance(event, BackfillProgress) and event.done] == [600]
    assert asyncio.run(fetchval(scratch_url, "SELECT count(*) FROM workflow.items WHERE status_category IS NULL")) == 0
