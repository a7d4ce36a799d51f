"""BatchUpdateItems (all or nothing), the activity log listing, and no events for rolled-back work."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import asyncpg
import pytest

from services.kit.context import request_id_var
from services.kit.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from services.kit.ids import uuid7
from services.kit.principal import Principal
from services.workflow.models import ActivityKind, ActivityPage, Item, ItemFields, ItemUpdate, Priority
from tests.workflow.conftest import Scene, activity_rows, outbox_events

pytestmark = pytest.mark.gate("S04")

ITEM_UPDATED = "tessera.workflow.v1.ItemUpdatedEvent"


def update_of(item: Item, *, mask: tuple[str, ...] = ("title",), etag: str = "", **values: Any) -> ItemUpdate:
    return ItemUpdate(item.workspace_id, item.project_id, item.id, ItemFields(**values), mask, etag)


async def batch(scene: Scene, project_item: Item, updates: list[ItemUpdate]) -> list[Item]:
    async with scene.db.unit_of_work(scene.member) as uow:
        return await scene.service.batch_update_items(
            uow,
            scene.member,
            workspace_id=project_item.workspace_id,
            project_id=project_item.project_id,
            updates=updates,
        )


async def titles(scene: Scene, items: list[Item]) -> list[str]:
    return [(await scene.get_item(item)).title for item in items]


class TestBatchUpdate:
    async def test_hundred_updates_in_one_transaction(self, scene: Scene, admin_conn: asyncpg.Connection) -> None:
        project = await scene.create_project()
        items = [await scene.create_item(project, title=f"t{i}") for i in range(100)]
        updated = await batch(
            scene, items[0], [update_of(item, title=f"new {i}", etag=item.etag) for i, item in enumerate(items)]
        )
        assert [item.title for item in updated] == [f"new {i}" for i in range(100)]
        assert [item.id for item in updated] == [item.id for item in items]
        events = await outbox_events(
            admin_conn, tenant=scene.workspace_id, event_type="tessera.workflow.v1.ItemUpdatedEvent"
        )
        assert len(events) == 100

    async def test_one_bad_request_in_a_hundred_changes_nothing(
        self, scene: Scene, admin_conn: asyncpg.Connection
    ) -> None:
        project = await scene.create_project()
        items = [await scene.create_item(project, title=f"t{i}") for i in range(100)]
        updates = [update_of(item, title=f"new {i}") for i, item in enumerate(items)]
        updates[73] = update_of(items[73], mask=("custom_fields.estimate",), custom_fields={"estimate": "lots"})
        with pytest.raises(InvalidArgument) as caught:
            await batch(scene, items[0], updates)
        assert [v.field for v in caught.value.violations] == ["requests[73].item.custom_fields.estimate"]
        assert caught.value.message.startswith("requests[73]: ")
        assert await titles(scene, items) == [f"t{i}" for i in range(100)]
        assert await outbox_events(admin_conn, tenant=scene.workspace_id, event_type=ITEM_UPDATED) == []
        assert [len(await activity_rows(admin_conn, item)) for item in items[72:75]] == [1, 1, 1]

    async def test_a_late_failure_rolls_back_earlier_updates(self, scene: Scene) -> None:
        project = await scene.create_project()
        first, second = await scene.create_item(project, title="a"), await scene.create_item(project, title="b")
        archived = await scene.mark("archive", await scene.create_item(project))
        await scene.transition(second, "todo")
        with pytest.raises(FailedPrecondition) as caught:
            await batch(scene, first, [update_of(first, title="changed"), update_of(archived, title="x")])
        assert caught.value.metadata["request_index"] == "1"
        with pytest.raises(Aborted):
            await batch(scene, first, [update_of(first, title="changed"), update_of(second, title="x", etag='"v1"')])
        assert await titles(scene, [first]) == ["a"]

    async def test_duplicates_other_projects_missing_items_and_bad_masks(self, scene: Scene) -> None:
        project = await scene.create_project()
        other = await scene.create_project()
        item = await scene.create_item(project)
        foreign = await scene.create_item(other)
        cases = [
            ([update_of(item), update_of(item)], "requests[1].item.name"),
            ([update_of(item), update_of(foreign)], "requests[1].item.name"),
            ([update_of(item, mask=("status",))], "requests[0].update_mask"),
            ([update_of(item, title="")], "requests[0].item.title"),
        ]
        for updates, field in cases:
            with pytest.raises(InvalidArgument) as caught:
                await batch(scene, item, updates)
            assert [v.field for v in caught.value.violations] == [field]
        missing = update_of(dataclasses.replace(item, id=uuid7()), title="x")
        with pytest.raises(NotFound) as not_found:
            await batch(scene, item, [update_of(item, title="y"), missing])
        assert not_found.value.metadata["request_index"] == "1"
        with pytest.raises(InvalidArgument) as caught:
            await batch(scene, item, [])
        assert [v.field for v in caught.value.violations] == ["requests"]
        with pytest.raises(InvalidArgument):
            await batch(scene, item, [update_of(item)] * 101)


class TestActivityLog:
    async def test_every_change_is_listed_oldest_first_with_paging(self, scene: Scene) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project, title="v0")
        for i in range(1, 5):
            item = await scene.update_item(item, mask=("title", "priority"), title=f"v{i}", priority=i % 5)
        item = await scene.transition(item, "todo")
        item = await scene.mark("archive", item)

        entries = []
        token = ""
        while True:
            async with scene.db.unit_of_work(scene.viewer) as uow:
                page = await scene.service.list_item_activities(
                    uow,
                    scene.viewer,
                    workspace_id=item.workspace_id,
                    project_id=item.project_id,
                    item_id=item.id,
                    requested_page_size=3,
                    page_token=token,
                )
            entries += page.activities
            token = page.next_page_token
            if not token:
                break
        kinds = [entry.kind for entry in entries]
        assert kinds == [
            ActivityKind.CREATED,
            *[ActivityKind.UPDATED] * 8,
            ActivityKind.TRANSITIONED,
            ActivityKind.ARCHIVED,
        ]
        assert [(e.field, e.before, e.after) for e in entries[1:3]] == [
            ("title", "v0", "v1"),
            ("priority", "PRIORITY_UNSPECIFIED", "PRIORITY_LOW"),
        ]
        assert all(e.actor == f"users/{scene.member.subject}" for e in entries)
        assert entries[0].name.startswith(f"{item.name}/activities/")
        assert [e.id for e in entries] == sorted(e.id for e in entries)

    async def test_page_token_is_bound_to_the_item_and_the_caller(self, scene: Scene) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project)
        item = await scene.transition(item, "todo")
        other = await scene.create_item(project)

        async def page_of(target: Item, token: str = "", principal: Principal | None = None) -> ActivityPage:
            caller = principal or scene.viewer
            async with scene.db.unit_of_work(caller) as uow:
                return await scene.service.list_item_activities(
                    uow,
                    caller,
                    workspace_id=target.workspace_id,
                    project_id=target.project_id,
                    item_id=target.id,
                    requested_page_size=1,
                    page_token=token,
                )

        first = await page_of(item)
        token = first.next_page_token
        assert token
        with pytest.raises(InvalidArgument, match="different query"):
            await page_of(other, token)
        with pytest.raises(InvalidArgument, match="another caller"):
            await page_of(item, token, scene.member)
        with pytest.raises(NotFound):
            await page_of(dataclasses.replace(item, id=uuid7()))

    async def test_request_id_is_recorded(self, scene: Scene, admin_conn: asyncpg.Connection) -> None:
        project = await scene.create_project()
        token = request_id_var.set("req-123")
        try:
            item = await scene.create_item(project)
        finally:
            request_id_var.reset(token)
        [row] = await activity_rows(admin_conn, item)
        assert row["request_id"] == "req-123"


class TestRollback:
    async def test_a_failed_unit_of_work_leaves_no_item_activity_event_or_usage(
        self, scene: Scene, admin_conn: asyncpg.Connection
    ) -> None:
        project = await scene.create_project()
        item_id = uuid7()

        async def create_then_fail() -> None:
            async with scene.db.unit_of_work(scene.member) as uow:
                await scene.service.create_item(
                    uow,
                    scene.member,
                    workspace_id=scene.workspace_id,
                    project_id=project.id,
                    item_id=item_id,
                    fields=ItemFields(title="Doomed", priority=Priority.LOW),
                )
                raise RuntimeError("failure after the change")

        with pytest.raises(RuntimeError, match="after the change"):
            await create_then_fail()
        for table in ("items", "activities"):
            column = "id" if table == "items" else "item_id"
            assert await admin_conn.fetchval(f"SELECT count(*) FROM workflow.{table} WHERE {column} = $1", item_id) == 0
        types = [e.type for e in await outbox_events(admin_conn, tenant=scene.workspace_id)]
        assert types == ["tessera.workflow.v1.ProjectCreatedEvent"]
        assert (
            await admin_conn.fetchval(
                "SELECT coalesce(sum(item_count), 0) FROM workflow.usage WHERE tenant_id = $1", scene.workspace_id
            )
            == 0
        )

    async def test_failed_transition_emits_nothing(self, scene: Scene, admin_conn: asyncpg.Connection) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project)
        before = len(await outbox_events(admin_conn, tenant=scene.workspace_id))
        with pytest.raises(FailedPrecondition):
            await scene.transition(item, "done")
        assert len(await outbox_events(admin_conn, tenant=scene.workspace_id)) == before
        assert [json.loads(r["after"])["status"] for r in await activity_rows(admin_conn, item)] == ["backlog"]
