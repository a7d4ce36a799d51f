"""The entitlement hook (gate S10): a per-workspace item limit enforced in one place, also under concurrency."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from services.kit.db import Database
from services.kit.errors import ResourceExhausted
from services.kit.ids import uuid7
from services.workflow.errors import LIMIT_EXCEEDED
from services.workflow.repository import UsageRepository
from tests.workflow.conftest import Scene, acting, make_service

pytestmark = pytest.mark.gate("S10")

LIMIT = 3


@pytest.fixture
async def limited(scene: Scene, workflow_db: Database) -> Scene:
    """The scene with a service limited to three live items per workspace."""
    return Scene(workflow_db, make_service(max_items_per_workspace=LIMIT), scene.workspace_id, scene.by_role)


async def usage(admin: asyncpg.Connection, scene: Scene) -> int:
    value = await admin.fetchval("SELECT sum(item_count) FROM workflow.usage WHERE tenant_id = $1", scene.workspace_id)
    return int(value or 0)


async def test_the_fourth_item_is_resource_exhausted_naming_the_limit(
    limited: Scene, admin_conn: asyncpg.Connection
) -> None:
    project = await limited.create_project()
    for i in range(LIMIT):
        await limited.create_item(project, title=f"item {i}")
    with pytest.raises(ResourceExhausted) as caught:
        await limited.create_item(project, title="one too many")
    error = caught.value
    assert error.reason == LIMIT_EXCEEDED
    assert error.metadata == {"limit": "max_items_per_workspace", "max": "3"}
    assert "max_items_per_workspace" in error.message
    items = "SELECT count(*) FROM workflow.items WHERE tenant_id = $1"
    assert await admin_conn.fetchval(items, limited.workspace_id) == LIMIT
    assert await usage(admin_conn, limited) == LIMIT


async def test_delete_frees_a_slot_and_undelete_is_refused_at_the_limit(
    limited: Scene, admin_conn: asyncpg.Connection
) -> None:
    project = await limited.create_project()
    items = [await limited.create_item(project) for _ in range(LIMIT)]
    deleted = await limited.mark("delete", items[0])
    assert await usage(admin_conn, limited) == LIMIT - 1
    await limited.create_item(project, title="takes the freed slot")
    with pytest.raises(ResourceExhausted):
        await limited.mark("undelete", deleted)
    assert (await limited.get_item(deleted)).deleted
    await limited.mark("delete", items[1])
    assert not (await limited.mark("undelete", deleted)).deleted
    assert await usage(admin_conn, limited) == LIMIT


async def test_a_retry_at_the_limit_returns_the_first_item(limited: Scene) -> None:
    project = await limited.create_project()
    request_id = uuid.uuid4()
    first = await limited.create_item(project, title="kept", request_id=request_id)
    for _ in range(LIMIT - 1):
        await limited.create_item(project)
    assert await limited.create_item(project, title="kept", request_id=request_id) == first


async def test_the_limit_is_per_workspace(limited: Scene) -> None:
    project = await limited.create_project()
    for _ in range(LIMIT):
        await limited.create_item(project)
    workspace_id = uuid7()
    other = Scene(
        limited.db, limited.service, workspace_id, {role: acting(workspace_id, role) for role in limited.by_role}
    )
    other_project = await other.create_project()
    assert (await other.create_item(other_project)).title == "An item"


async def test_concurrent_creates_never_exceed_the_limit(limited: Scene, admin_conn: asyncpg.Connection) -> None:
    project = await limited.create_project()
    results = await asyncio.gather(*(limited.create_item(project) for _ in range(10)), return_exceptions=True)
    created = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    assert (len(created), len(refused)) == (LIMIT, 10 - LIMIT)
    assert await usage(admin_conn, limited) == LIMIT


@pytest.mark.parametrize("limit", [17, 40])  # not a multiple of the shard count, and more than two shares each
async def test_a_limit_above_the_shard_count_is_exact_under_concurrency(
    scene: Scene, workflow_db: Database, admin_conn: asyncpg.Connection, limit: int
) -> None:
    """The counter is split over shard rows; their shares must add up to exactly the limit."""
    sharded = Scene(workflow_db, make_service(max_items_per_workspace=limit), scene.workspace_id, scene.by_role)
    project = await sharded.create_project()
    attempts = limit + 12
    results = await asyncio.gather(*(sharded.create_item(project) for _ in range(attempts)), return_exceptions=True)
    unexpected = [r for r in results if isinstance(r, BaseException) and not isinstance(r, ResourceExhausted)]
    assert not unexpected
    assert sum(not isinstance(r, BaseException) for r in results) == limit
    assert await usage(admin_conn, sharded) == limit
    # Deleting frees exactly one slot, whichever shard it is taken from.
    created = [r for r in results if not isinstance(r, BaseException)]
    await sharded.mark("delete", created[0])
    await sharded.create_item(project, title="refills the freed slot")
    with pytest.raises(ResourceExhausted):
        await sharded.create_item(project, title="one too many")
    assert await usage(admin_conn, sharded) == limit


async def test_a_create_that_finds_every_open_shard_held_waits_for_one_shard_only(
    scene: Scene, workflow_db: Database, admin_url: str, admin_conn: asyncpg.Connection
) -> None:
    """Only shard 5 has room and another transaction holds it; a third holds the full shard 0.

    The create waits for shard 5 alone: it commits as soon as shard 5's holder does, while shard 0 is
    still held (locking every shard in order would wait for shard 0 first).
    """
    limited = Scene(workflow_db, make_service(max_items_per_workspace=160), scene.workspace_id, scene.by_role)
    project = await limited.create_project()
    await limited.create_item(project, title="creates the shard rows")
    await admin_conn.execute(
        "UPDATE workflow.usage SET item_count = CASE WHEN shard = 5 THEN 0 ELSE 10 END WHERE tenant_id = $1",
        limited.workspace_id,
    )
    holder_of_5 = await asyncpg.connect(admin_url)
    holder_of_0 = await asyncpg.connect(admin_url)
    lock = "SELECT 1 FROM workflow.usage WHERE tenant_id = $1 AND shard = $2 FOR UPDATE"
    try:
        await holder_of_5.execute("BEGIN")
        await holder_of_5.execute(lock, limited.workspace_id, 5)
        await holder_of_0.execute("BEGIN")
        await holder_of_0.execute(lock, limited.workspace_id, 0)
        create = asyncio.create_task(limited.create_item(project, title="waits for shard 5"))
        await asyncio.sleep(0.3)
        assert not create.done()  # shard 5 is held
        await holder_of_5.execute("COMMIT")
        created = await asyncio.wait_for(create, timeout=5)  # shard 0 is still held
        assert created.title == "waits for shard 5"
        counts = dict(
            await admin_conn.fetch(
                "SELECT shard, item_count FROM workflow.usage WHERE tenant_id = $1", limited.workspace_id
            )
        )
        assert counts[5] == 1
        assert sum(counts.values()) == 15 * 10 + 1
    finally:
        await holder_of_0.execute("ROLLBACK")
        await holder_of_5.close()
        await holder_of_0.close()


async def test_concurrent_creates_and_deletes_at_the_limit_keep_the_count_exact(
    scene: Scene, workflow_db: Database, admin_conn: asyncpg.Connection
) -> None:
    """Creates and deletes racing at the limit: no deadlock, never past the limit, the count is the live items."""
    limit = 20
    sharded = Scene(workflow_db, make_service(max_items_per_workspace=limit), scene.workspace_id, scene.by_role)
    project = await sharded.create_project()
    existing = [await sharded.create_item(project, title=f"existing {i}") for i in range(limit)]
    operations = [sharded.mark("delete", item) for item in existing[:12]]
    operations += [sharded.create_item(project, title=f"racing {i}") for i in range(36)]
    results = await asyncio.gather(*operations, return_exceptions=True)
    unexpected = [r for r in results if isinstance(r, BaseException) and not isinstance(r, ResourceExhausted)]
    assert not unexpected
    assert all(not isinstance(r, BaseException) for r in results[:12])  # deletes are never refused
    live = await admin_conn.fetchval(
        "SELECT count(*) FROM workflow.items WHERE tenant_id = $1 AND delete_time IS NULL", sharded.workspace_id
    )
    assert live <= limit
    assert await usage(admin_conn, sharded) == live
    created = sum(not isinstance(r, BaseException) for r in results[12:])
    assert live == limit - 12 + created


async def test_each_create_and_delete_moves_the_counter_by_exactly_one_whatever_the_plan(
    workflow_db: Database, admin_conn: asyncpg.Connection
) -> None:
    """The counter's statements change exactly one shard per call, whatever plan PostgreSQL picks.

    With statistics that expect about one usage row per workspace (here: 48,000 rows of distinct
    workspaces), the planner ran the random shard pick once per shard row of the UPDATE it fed, drawing
    another shard each time: one create counted in several shards, and the limit was refused early.
    """
    others = [uuid.uuid4() for _ in range(48_000)]
    await admin_conn.execute(
        "INSERT INTO workflow.usage (tenant_id, shard, item_count) SELECT t, 0, 0 FROM unnest($1::uuid[]) AS t",
        others,
    )
    await admin_conn.execute("ANALYZE workflow.usage")
    try:
        maximum = 5
        for _ in range(40):
            workspace = uuid7()
            totals = []
            for _ in range(maximum):
                async with workflow_db.unit_of_work(None, tenant_id=str(workspace)) as uow:
                    assert await UsageRepository(uow).count_item(workspace_id=workspace, maximum=maximum)
                    totals.append(await UsageRepository(uow).item_count(workspace_id=workspace))
            for _ in range(maximum):
                async with workflow_db.unit_of_work(None, tenant_id=str(workspace)) as uow:
                    await UsageRepository(uow).uncount_item(workspace_id=workspace)
                    totals.append(await UsageRepository(uow).item_count(workspace_id=workspace))
            assert totals == [1, 2, 3, 4, 5, 4, 3, 2, 1, 0]
    finally:
        await admin_conn.execute("DELETE FROM workflow.usage WHERE tenant_id = ANY($1::uuid[])", others)
