"""TransitionItem, archive/unarchive and soft delete/undelete rules, with their activities and events."""

from __future__ import annotations

import asyncpg
import pytest

from services.kit.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.workflow.errors import RESOURCE_ARCHIVED, TRANSITION_GUARD_FAILED, TRANSITION_NOT_ALLOWED
from services.workflow.models import Item, Project
from services.workflow.workflow import DEFAULT_WORKFLOW, Guard, State, StateCategory, Transition, Workflow
from tessera.workflow.v1 import workflow_events_pb2
from tests.workflow.conftest import Scene, activity_rows, outbox_events

pytestmark = pytest.mark.gate("S04")

TRANSITIONED = "tessera.workflow.v1.ItemTransitionedEvent"

# Every (from, to) pair of the default workflow and whether it is allowed.
STATES = [state.id for state in DEFAULT_WORKFLOW.states]
ALLOWED = {(t.from_state, t.to_state) for t in DEFAULT_WORKFLOW.transitions}


async def item_in(scene: Scene, project: Project, status: str) -> Item:
    """An assigned item without sub-items moved to `status` through allowed transitions."""
    item = await scene.create_item(project, assignee=scene.user_name("member"))
    path = {
        "backlog": [],
        "todo": ["todo"],
        "in_progress": ["in_progress"],
        "done": ["in_progress", "done"],
        "cancelled": ["cancelled"],
    }[status]
    for step in path:
        item = await scene.transition(item, step)
    return item


class TestTransitionRules:
    @pytest.mark.parametrize("source", STATES)
    async def test_every_pair_of_the_default_workflow(self, scene: Scene, source: str) -> None:
        project = await scene.create_project()
        for target in STATES:
            if target == source:
                continue
            item = await item_in(scene, project, source)
            if (source, target) in ALLOWED:
                moved = await scene.transition(item, target)
                assert (moved.status, moved.status_category) == (
                    target,
                    DEFAULT_WORKFLOW.category_of(target).value,
                )
            else:
                with pytest.raises(FailedPrecondition) as caught:
                    await scene.transition(item, target)
                assert caught.value.reason == TRANSITION_NOT_ALLOWED
                assert caught.value.metadata["allowed_next_states"] == ",".join(DEFAULT_WORKFLOW.allowed_next(source))
                assert caught.value.metadata["status"] == source
                assert (await scene.get_item(item)).status == source

    async def test_transition_writes_one_activity_and_one_event(
        self, scene: Scene, admin_conn: asyncpg.Connection
    ) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project)
        moved = await scene.transition(item, "todo", etag=item.etag)
        assert moved.etag == '"v2"'
        rows = await activity_rows(admin_conn, item)
        assert [(r["kind"], r["field"], r["before"], r["after"]) for r in rows[1:]] == [
            ("TRANSITIONED", "status", '"backlog"', '"todo"')
        ]
        [envelope] = await outbox_events(admin_conn, tenant=scene.workspace_id, event_type=TRANSITIONED)
        event = workflow_events_pb2.ItemTransitionedEvent()
        assert envelope.payload.Unpack(event)
        assert (event.from_status, event.to_status, event.item.status) == ("backlog", "todo", "todo")

    async def test_moving_to_the_current_state_changes_nothing(
        self, scene: Scene, admin_conn: asyncpg.Connection
    ) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project)
        assert await scene.transition(item, "backlog") == item
        assert await outbox_events(admin_conn, tenant=scene.workspace_id, event_type=TRANSITIONED) == []

    async def test_unknown_state_is_invalid_argument_and_stale_etag_aborted(self, scene: Scene) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project)
        with pytest.raises(InvalidArgument) as caught:
            await scene.transition(item, "shipped")
        assert [v.field for v in caught.value.violations] == ["status"]
        await scene.transition(item, "todo")
        with pytest.raises(Aborted):
            await scene.transition(item, "backlog", etag=item.etag)

    async def test_viewers_cannot_transition(self, scene: Scene) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project)
        with pytest.raises(PermissionDenied):
            await scene.transition(item, "todo", principal=scene.viewer)


class TestGuards:
    async def test_assignee_required_to_enter_in_progress(self, scene: Scene, admin_conn: asyncpg.Connection) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project)
        with pytest.raises(FailedPrecondition) as caught:
            await scene.transition(item, "in_progress")
        assert (caught.value.reason, caught.value.metadata) == (TRANSITION_GUARD_FAILED, {"guard": "ASSIGNEE_REQUIRED"})
        assert await outbox_events(admin_conn, tenant=scene.workspace_id, event_type=TRANSITIONED) == []
        assigned = await scene.update_item(item, mask=("assignee",), assignee=scene.user_name("member"))
        assert (await scene.transition(assigned, "in_progress")).status == "in_progress"

    async def test_done_needs_every_live_subitem_closed(self, scene: Scene) -> None:
        project = await scene.create_project()
        parent = await item_in(scene, project, "in_progress")
        open_child = await scene.create_item(project, parent=parent.name)
        done_child = await item_in(scene, project, "done")
        done_child = await scene.update_item(done_child, mask=("parent",), parent=parent.name)
        with pytest.raises(FailedPrecondition) as caught:
            await scene.transition(parent, "done")
        assert caught.value.metadata == {"guard": "SUBITEMS_CLOSED"}
        assert "1 sub-item(s)" in caught.value.message
        # A cancelled sub-item counts as closed.
        await scene.transition(open_child, "cancelled")
        assert (await scene.transition(parent, "done")).status == "done"

    async def test_deleted_subitems_do_not_block_done(self, scene: Scene) -> None:
        project = await scene.create_project()
        parent = await item_in(scene, project, "in_progress")
        child = await scene.create_item(project, parent=parent.name)
        with pytest.raises(FailedPrecondition):
            await scene.transition(parent, "done")
        await scene.mark("delete", child)
        assert (await scene.transition(parent, "done")).status == "done"

    async def test_custom_workflow_guards_and_categories(self, scene: Scene) -> None:
        workflow = Workflow(
            states=(
                State("new", "New", StateCategory.BACKLOG),
                State("doing", "Doing", StateCategory.ACTIVE),
                State("shipped", "Shipped", StateCategory.DONE),
            ),
            transitions=(
                Transition("new", "doing"),  # no guard: this workflow lets anyone start
                Transition("doing", "shipped", (Guard.ASSIGNEE_REQUIRED, Guard.SUBITEMS_CLOSED)),
            ),
            initial_state="new",
        )
        project = await scene.create_project(workflow=workflow)
        item = await scene.create_item(project)
        assert (item.status, item.status_category) == ("new", "BACKLOG")
        doing = await scene.transition(item, "doing")
        assert doing.status_category == "ACTIVE"
        with pytest.raises(FailedPrecondition) as caught:
            await scene.transition(doing, "shipped")
        assert caught.value.metadata == {"guard": "ASSIGNEE_REQUIRED"}
        with pytest.raises(FailedPrecondition) as caught:
            await scene.transition(doing, "new")
        assert caught.value.metadata["allowed_next_states"] == "shipped"


class TestArchive:
    async def test_archive_blocks_update_and_transition_until_unarchived(
        self, scene: Scene, admin_conn: asyncpg.Connection
    ) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project)
        archived = await scene.mark("archive", item, etag=item.etag)
        assert archived.archived
        assert archived.archive_time is not None
        for attempt in (
            scene.update_item(archived, mask=("title",), title="x"),
            scene.transition(archived, "todo"),
            scene.mark("archive", archived),
        ):
            with pytest.raises(FailedPrecondition) as caught:
                await attempt
            assert caught.value.reason == RESOURCE_ARCHIVED
        assert (await scene.get_item(item)).title == item.title  # still readable
        unarchived = await scene.mark("unarchive", archived)
        assert not unarchived.archived
        with pytest.raises(FailedPrecondition, match="not archived"):
            await scene.mark("unarchive", unarchived)
        assert (await scene.transition(unarchived, "todo")).status == "todo"
        kinds = [row["kind"] for row in await activity_rows(admin_conn, item)]
        assert kinds == ["CREATED", "ARCHIVED", "UNARCHIVED", "TRANSITIONED"]
        types = [e.type.rsplit(".", 1)[1] for e in await outbox_events(admin_conn, tenant=scene.workspace_id)]
        assert types[-4:] == ["ItemCreatedEvent", "ItemArchivedEvent", "ItemUnarchivedEvent", "ItemTransitionedEvent"]

    async def test_archive_with_a_stale_etag_is_aborted(self, scene: Scene) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project)
        await scene.transition(item, "todo")
        with pytest.raises(Aborted):
            await scene.mark("archive", item, etag=item.etag)


class TestSoftDelete:
    async def test_delete_then_undelete(self, scene: Scene, admin_conn: asyncpg.Connection) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project)
        deleted = await scene.mark("delete", item, etag=item.etag)
        assert deleted.deleted
        assert (await scene.get_item(item)).delete_time == deleted.delete_time  # Get shows deleted items
        for attempt in (
            scene.mark("delete", deleted),
            scene.update_item(deleted, mask=("title",), title="x"),
            scene.transition(deleted, "todo"),
            scene.mark("archive", deleted),
        ):
            with pytest.raises(NotFound):
                await attempt
        restored = await scene.mark("undelete", deleted)
        assert not restored.deleted
        with pytest.raises(FailedPrecondition, match="not deleted"):
            await scene.mark("undelete", restored)
        kinds = [row["kind"] for row in await activity_rows(admin_conn, item)]
        assert kinds == ["CREATED", "DELETED", "UNDELETED"]
        types = [e.type.rsplit(".", 1)[1] for e in await outbox_events(admin_conn, tenant=scene.workspace_id)]
        assert types == ["ProjectCreatedEvent", "ItemCreatedEvent", "ItemDeletedEvent", "ItemUndeletedEvent"]

    async def test_archived_items_can_be_deleted(self, scene: Scene) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project)
        archived = await scene.mark("archive", item)
        assert (await scene.mark("delete", archived)).deleted

    async def test_delete_with_a_stale_etag_is_aborted(self, scene: Scene) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project)
        await scene.transition(item, "todo")
        with pytest.raises(Aborted):
            await scene.mark("delete", item, etag=item.etag)
        assert not (await scene.get_item(item)).deleted
