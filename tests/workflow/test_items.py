"""Item rules of WorkflowService: create (idempotency, validation), get, update (mask, etag, no-op, parents)."""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from services.kit.authz import VIEWER
from services.kit.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.kit.ids import uuid7
from services.workflow.errors import ETAG_MISMATCH, PARENT_CYCLE, REQUEST_ID_REUSED
from services.workflow.models import Priority
from tessera.workflow.v1 import workflow_events_pb2
from tests.workflow.conftest import Scene, acting, activity_rows, outbox_events

pytestmark = pytest.mark.gate("S04")

ITEM_CREATED = "tessera.workflow.v1.ItemCreatedEvent"
ITEM_UPDATED = "tessera.workflow.v1.ItemUpdatedEvent"
DUE = datetime(2026, 12, 24, 18, 0, tzinfo=UTC)


def violations(error: InvalidArgument) -> list[str]:
    return [violation.field for violation in error.violations]


class TestCreateItem:
    async def test_created_in_the_initial_state_with_one_activity_and_one_event(
        self, scene: Scene, admin_conn: asyncpg.Connection
    ) -> None:
        project = await scene.create_project()
        assignee = scene.user_name("member")
        item = await scene.create_item(
            project,
            title="Write the docs",
            description="**markdown**",
            priority=Priority.HIGH,
            assignee=assignee,
            labels=(" docs", "b", "docs", "a "),
            due_time=DUE,
            custom_fields={"estimate": 3.0, "severity": "high", "review_at": "2026-12-01T10:00:00+01:00"},
        )

        assert (item.status, item.status_category, item.priority) == ("backlog", "BACKLOG", Priority.HIGH)
        assert item.labels == ("a", "b", "docs")
        assert item.assignee == uuid.UUID(scene.member.subject)
        assert item.custom_fields == {"estimate": 3, "severity": "high", "review_at": "2026-12-01T09:00:00Z"}
        assert item.creator == item.updater == f"users/{scene.member.subject}"
        assert item.name == f"{project.name}/items/{item.id}"
        assert (item.etag, item.archived, item.deleted) == ('"v1"', False, False)

        [row] = await activity_rows(admin_conn, item)
        assert (row["kind"], row["field"], row["before"], row["actor"]) == ("CREATED", "", None, item.creator)
        assert json.loads(row["after"])["title"] == "Write the docs"
        # Logged by the insert itself, from the request's values: the same as the stored item's snapshot.
        assert json.loads(row["after"]) == item.snapshot()
        assert row["request_id"] == ""  # no request id outside an RPC
        [envelope] = await outbox_events(admin_conn, tenant=scene.workspace_id, event_type=ITEM_CREATED)
        event = workflow_events_pb2.ItemCreatedEvent()
        assert envelope.payload.Unpack(event)
        assert (event.item.name, event.item.status, event.item.assignee) == (item.name, "backlog", assignee)
        assert envelope.subject == item.name
        child = await scene.create_item(project, title="A part", parent=item.name, labels=("x",))
        [child_row] = await activity_rows(admin_conn, child)
        assert json.loads(child_row["after"]) == child.snapshot()
        assert json.loads(child_row["after"])["parent"] == item.name

    async def test_get_returns_what_was_created(self, scene: Scene) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project, labels=("x",))
        assert await scene.get_item(item) == item

    async def test_same_request_id_and_payload_returns_the_same_item_once(
        self, scene: Scene, admin_conn: asyncpg.Connection
    ) -> None:
        project = await scene.create_project()
        request_id = uuid.uuid4()
        first = await scene.create_item(project, title="Once", labels=("b", "a"), request_id=request_id)
        again = await scene.create_item(project, title="Once", labels=("a", "b", "a"), request_id=request_id)
        assert again == first
        assert len(await outbox_events(admin_conn, tenant=scene.workspace_id, event_type=ITEM_CREATED)) == 1
        assert len(await activity_rows(admin_conn, first)) == 1
        count = await admin_conn.fetchval(
            "SELECT sum(item_count) FROM workflow.usage WHERE tenant_id = $1", scene.workspace_id
        )
        assert count == 1

    async def test_same_request_id_with_another_payload_is_already_exists(self, scene: Scene) -> None:
        project = await scene.create_project()
        request_id = uuid.uuid4()
        await scene.create_item(project, title="Once", request_id=request_id)
        with pytest.raises(AlreadyExists) as caught:
            await scene.create_item(project, title="Other", request_id=request_id)
        assert caught.value.reason == REQUEST_ID_REUSED
        other_project = await scene.create_project()
        with pytest.raises(AlreadyExists):
            await scene.create_item(other_project, title="Once", request_id=request_id)

    @pytest.mark.parametrize(
        ("values", "field"),
        [
            ({"title": ""}, "item.title"),
            ({"title": "   "}, "item.title"),
            ({"title": "x" * 301}, "item.title"),
            ({"title": "tab\there"}, "item.title"),
            ({"description": "x" * 100_001}, "item.description"),
            ({"priority": 9}, "item.priority"),
            ({"assignee": "alice"}, "item.assignee"),
            ({"labels": ("ok", "  ")}, "item.labels[1]"),
            ({"labels": ("x" * 51,)}, "item.labels[0]"),
            ({"labels": tuple(f"l{i}" for i in range(21))}, "item.labels"),
            ({"custom_fields": {"nope": 1}}, "item.custom_fields.nope"),
            ({"custom_fields": {"estimate": "three"}}, "item.custom_fields.estimate"),
            ({"custom_fields": {"severity": "medium"}}, "item.custom_fields.severity"),
            ({"custom_fields": {"blocked": "yes"}}, "item.custom_fields.blocked"),
            ({"custom_fields": {"review_at": "soon"}}, "item.custom_fields.review_at"),
            ({"parent": "items/1"}, "item.parent"),
        ],
    )
    async def test_bad_fields_are_invalid_argument_naming_the_field(
        self, scene: Scene, values: dict[str, object], field: str
    ) -> None:
        project = await scene.create_project()
        with pytest.raises(InvalidArgument) as caught:
            await scene.create_item(project, **values)
        assert violations(caught.value) == [field]

    async def test_assignee_must_be_a_current_member(self, scene: Scene) -> None:
        project = await scene.create_project()
        outsider = f"users/{uuid7()}"
        with pytest.raises(InvalidArgument, match="not a member") as caught:
            await scene.create_item(project, assignee=outsider)
        assert violations(caught.value) == ["item.assignee"]
        left = await scene.add_member(None)  # a membership that ended
        with pytest.raises(InvalidArgument):
            await scene.create_item(project, assignee=left)

    async def test_parent_must_be_a_live_item_of_the_same_project(self, scene: Scene) -> None:
        project = await scene.create_project()
        other = await scene.create_project()
        foreign_parent = await scene.create_item(other)
        with pytest.raises(InvalidArgument, match="must be an item of") as caught:
            await scene.create_item(project, parent=foreign_parent.name)
        assert violations(caught.value) == ["item.parent"]
        parent = await scene.create_item(project)
        child = await scene.create_item(project, parent=parent.name)
        assert (child.parent_id, child.parent_name) == (parent.id, parent.name)
        await scene.mark("delete", parent)
        with pytest.raises(InvalidArgument, match="not a live item"):
            await scene.create_item(project, parent=parent.name)
        with pytest.raises(InvalidArgument, match="not a live item"):
            await scene.create_item(project, parent=f"{project.name}/items/{uuid7()}")

    async def test_viewers_cannot_create_and_other_workspaces_are_not_found(self, scene: Scene) -> None:
        project = await scene.create_project()
        with pytest.raises(PermissionDenied):
            await scene.create_item(project, scene.by_role[VIEWER])
        with pytest.raises(NotFound):
            await scene.create_item(project, acting(uuid7(), "owner"))
        with pytest.raises(NotFound):
            await scene.create_item(dataclasses.replace(project, id=uuid7()))

    async def test_api_key_callers_are_recorded_as_api_keys(self, scene: Scene) -> None:
        project = await scene.create_project()
        key = acting(scene.workspace_id, "member", kind="api_key")
        item = await scene.create_item(project, key)
        assert item.creator == f"apiKeys/{key.subject}"

    async def test_get_of_another_workspace_or_absent_item_is_not_found(self, scene: Scene) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project)
        with pytest.raises(NotFound):
            await scene.get_item(item, acting(uuid7(), "owner"))
        with pytest.raises(NotFound):
            await scene.get_item(dataclasses.replace(item, id=uuid7()))


class TestUpdateItem:
    @pytest.mark.parametrize(
        ("path", "values", "check"),
        [
            ("title", {"title": "New title"}, lambda i: i.title == "New title"),
            ("description", {"description": "New"}, lambda i: i.description == "New"),
            ("priority", {"priority": Priority.URGENT}, lambda i: i.priority is Priority.URGENT),
            ("labels", {"labels": ("z", " y")}, lambda i: i.labels == ("y", "z")),
            ("due_time", {"due_time": DUE}, lambda i: i.due_time == DUE),
            ("custom_fields", {"custom_fields": {"team": "core"}}, lambda i: i.custom_fields == {"team": "core"}),
            ("custom_fields.estimate", {"custom_fields": {"estimate": 8}}, lambda i: i.custom_fields["estimate"] == 8),
        ],
    )
    async def test_each_path_changes_only_its_field(
        self, scene: Scene, admin_conn: asyncpg.Connection, path: str, values: dict[str, object], check: object
    ) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project, title="Before", custom_fields={"severity": "low"})
        updated = await scene.update_item(
            item, mask=(path,), etag=item.etag, **{"title": "ignored unless masked", **values}
        )

        assert callable(check)
        assert check(updated)
        assert updated.etag == '"v2"'
        untouched = {"title", "description", "priority", "labels", "due_time", "assignee", "parent_id"} - {path}
        for name in untouched:
            assert getattr(updated, name) == getattr(item, name), name
        if path == "custom_fields.estimate":
            assert updated.custom_fields == {"severity": "low", "estimate": 8}
        rows = await activity_rows(admin_conn, item)
        assert rows[0]["kind"] == "CREATED"
        changed = [row["field"] for row in rows[1:]]
        expected = {
            "custom_fields": ["custom_fields.severity", "custom_fields.team"],
            "custom_fields.estimate": ["custom_fields.estimate"],
        }.get(path, [path])
        assert changed == expected
        assert {row["kind"] for row in rows[1:]} == {"UPDATED"}
        [envelope] = await outbox_events(admin_conn, tenant=scene.workspace_id, event_type=ITEM_UPDATED)
        event = workflow_events_pb2.ItemUpdatedEvent()
        assert envelope.payload.Unpack(event)
        assert list(event.changed_fields) == expected

    async def test_assignee_and_parent_paths(self, scene: Scene) -> None:
        project = await scene.create_project()
        parent = await scene.create_item(project)
        item = await scene.create_item(project)
        assigned = await scene.update_item(item, mask=("assignee",), assignee=scene.user_name("owner"))
        assert assigned.assignee == uuid.UUID(scene.owner.subject)
        moved = await scene.update_item(assigned, mask=("parent",), parent=parent.name)
        assert moved.parent_id == parent.id
        cleared = await scene.update_item(moved, mask=("assignee", "parent"))
        assert (cleared.assignee, cleared.parent_id) == (None, None)

    async def test_empty_mask_or_star_sets_every_field(self, scene: Scene) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project, title="T", labels=("a",), custom_fields={"team": "x"})
        for mask in ((), ("*",)):
            updated = await scene.update_item(item, mask=mask, title="All")
            assert (updated.title, updated.labels, dict(updated.custom_fields)) == ("All", (), {})
            item = updated

    async def test_activity_records_before_and_after(self, scene: Scene, admin_conn: asyncpg.Connection) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project, title="Old", priority=Priority.LOW)
        await scene.update_item(item, mask=("title", "priority"), title="New", priority=Priority.HIGH)
        rows = await activity_rows(admin_conn, item)
        assert [(r["field"], json.loads(r["before"]), json.loads(r["after"])) for r in rows[1:]] == [
            ("title", "Old", "New"),
            ("priority", "PRIORITY_LOW", "PRIORITY_HIGH"),
        ]

    async def test_status_in_the_mask_points_at_transition_item(self, scene: Scene) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project)
        with pytest.raises(InvalidArgument, match="TransitionItem") as caught:
            await scene.update_item(item, mask=("status",))
        assert violations(caught.value) == ["update_mask"]

    @pytest.mark.parametrize("path", ["name", "creator", "archived", "custom_fields.unknown", "custom_fields."])
    async def test_unknown_paths_are_named(self, scene: Scene, path: str) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project)
        with pytest.raises(InvalidArgument) as caught:
            await scene.update_item(item, mask=(path,), title="x")
        assert violations(caught.value) == ["update_mask"]
        assert path in caught.value.message

    async def test_bad_value_names_the_field(self, scene: Scene) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project)
        with pytest.raises(InvalidArgument) as caught:
            await scene.update_item(item, mask=("custom_fields.estimate",), custom_fields={"estimate": "x"})
        assert violations(caught.value) == ["item.custom_fields.estimate"]

    async def test_stale_etag_is_aborted_and_changes_nothing(
        self, scene: Scene, admin_conn: asyncpg.Connection
    ) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project, title="One")
        await scene.update_item(item, mask=("title",), title="Two", etag=item.etag)
        with pytest.raises(Aborted) as caught:
            await scene.update_item(item, mask=("title",), title="Three", etag=item.etag)
        assert caught.value.reason == ETAG_MISMATCH
        assert caught.value.metadata == {"etag": '"v2"'}
        assert (await scene.get_item(item)).title == "Two"
        assert len(await outbox_events(admin_conn, tenant=scene.workspace_id, event_type=ITEM_UPDATED)) == 1

    async def test_noop_update_writes_nothing(self, scene: Scene, admin_conn: asyncpg.Connection) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project, title="Same", labels=("a", "b"), custom_fields={"estimate": 2})
        same = await scene.update_item(
            item,
            mask=("title", "labels", "custom_fields.estimate"),
            title="Same",
            labels=("b", " a"),
            custom_fields={"estimate": 2.0},
        )
        assert same == item
        assert len(await activity_rows(admin_conn, item)) == 1
        assert await outbox_events(admin_conn, tenant=scene.workspace_id, event_type=ITEM_UPDATED) == []

    async def test_parent_cycle_is_failed_precondition(self, scene: Scene, admin_conn: asyncpg.Connection) -> None:
        project = await scene.create_project()
        a = await scene.create_item(project, title="A")
        b = await scene.create_item(project, title="B", parent=a.name)
        c = await scene.create_item(project, title="C", parent=b.name)
        for new_parent in (c, b, a):
            with pytest.raises(FailedPrecondition) as caught:
                await scene.update_item(a, mask=("parent",), parent=new_parent.name)
            assert caught.value.reason == PARENT_CYCLE
        assert (await scene.get_item(a)).parent_id is None
        # Moving C under A directly is fine: no cycle.
        moved = await scene.update_item(c, mask=("parent",), parent=a.name)
        assert moved.parent_id == a.id
        assert await outbox_events(admin_conn, tenant=scene.workspace_id, event_type=ITEM_UPDATED) != []

    async def test_viewer_cannot_update(self, scene: Scene) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project)
        with pytest.raises(PermissionDenied):
            await scene.update_item(item, mask=("title",), title="x", principal=scene.viewer)

    async def test_former_assignee_does_not_block_other_changes(self, scene: Scene) -> None:
        project = await scene.create_project()
        user = await scene.add_member("member")
        item = await scene.create_item(project, assignee=user)
        await scene.add_member(None, user_id=uuid.UUID(user.removeprefix("users/")))
        updated = await scene.update_item(item, assignee=user, title="Renamed")  # mask: all fields
        assert (updated.title, updated.assignee) == ("Renamed", item.assignee)
