"""Project rules of WorkflowService against the real database, as the workflow login role (RLS on)."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from services.kit.authz import ADMIN, MEMBER, VIEWER
from services.kit.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.kit.ids import uuid7
from services.workflow.errors import REQUEST_ID_REUSED
from services.workflow.workflow import (
    DEFAULT_WORKFLOW,
    CustomFieldDefinition,
    CustomFieldType,
    State,
    StateCategory,
    Transition,
    Workflow,
)
from tessera.workflow.v1 import workflow_events_pb2
from tests.workflow.conftest import CUSTOM_FIELDS, ESTIMATE, SEVERITY, Scene, acting, outbox_events

pytestmark = pytest.mark.gate("S04")

PROJECT_CREATED = "tessera.workflow.v1.ProjectCreatedEvent"
PROJECT_UPDATED = "tessera.workflow.v1.ProjectUpdatedEvent"

SIMPLE = Workflow(
    states=(State("open", "Open", StateCategory.BACKLOG), State("closed", "Closed", StateCategory.DONE)),
    transitions=(Transition("open", "closed"), Transition("closed", "open")),
    initial_state="open",
)


class TestCreateProject:
    async def test_default_workflow_when_none_is_given_and_one_event(
        self, scene: Scene, admin_conn: asyncpg.Connection
    ) -> None:
        project = await scene.create_project(display_name="Roadmap")

        assert project.workflow == DEFAULT_WORKFLOW
        assert project.custom_fields == CUSTOM_FIELDS
        assert project.name == f"workspaces/{scene.workspace_id}/projects/{project.id}"
        assert project.creator == f"users/{scene.owner.subject}"
        assert project.etag == '"v1"'
        [envelope] = await outbox_events(admin_conn, tenant=scene.workspace_id, event_type=PROJECT_CREATED)
        event = workflow_events_pb2.ProjectCreatedEvent()
        assert envelope.payload.Unpack(event)
        assert (event.project.name, event.project.display_name) == (project.name, "Roadmap")
        assert envelope.subject == project.name
        assert len(event.project.workflow.states) == 5

    async def test_custom_workflow_is_kept(self, scene: Scene) -> None:
        project = await scene.create_project(workflow=SIMPLE)
        async with scene.db.unit_of_work(scene.viewer) as uow:
            again = await scene.service.get_project(
                uow, scene.viewer, workspace_id=scene.workspace_id, project_id=project.id
            )
        assert again.workflow == SIMPLE

    async def test_unsound_workflow_is_invalid_argument_with_paths(self, scene: Scene) -> None:
        broken = Workflow(states=(State("a", "A", StateCategory.BACKLOG),), transitions=(), initial_state="b")
        with pytest.raises(InvalidArgument) as caught:
            await scene.create_project(workflow=broken)
        assert [v.field for v in caught.value.violations] == ["project.workflow.initial_state"]

    @pytest.mark.parametrize(
        ("display_name", "field"),
        [("", "project.display_name"), ("   ", "project.display_name"), ("x" * 101, "project.display_name")],
    )
    async def test_bad_display_name(self, scene: Scene, display_name: str, field: str) -> None:
        with pytest.raises(InvalidArgument) as caught:
            await scene.create_project(display_name=display_name)
        assert [v.field for v in caught.value.violations] == [field]

    async def test_bad_custom_field_definitions(self, scene: Scene) -> None:
        with pytest.raises(InvalidArgument) as caught:
            await scene.create_project(custom_fields=(CustomFieldDefinition("x", "X", CustomFieldType.ENUM),))
        assert [v.field for v in caught.value.violations] == ["project.custom_fields[0].allowed_values"]

    async def test_same_request_id_same_payload_returns_the_first_project_once(
        self, scene: Scene, admin_conn: asyncpg.Connection
    ) -> None:
        request_id = uuid.uuid4()
        first = await scene.create_project(display_name="Once", request_id=request_id)
        again = await scene.create_project(display_name="Once", request_id=request_id)
        assert again == first
        assert len(await outbox_events(admin_conn, tenant=scene.workspace_id, event_type=PROJECT_CREATED)) == 1

    async def test_same_request_id_other_payload_is_already_exists(self, scene: Scene) -> None:
        request_id = uuid.uuid4()
        await scene.create_project(display_name="Once", request_id=request_id)
        with pytest.raises(AlreadyExists) as caught:
            await scene.create_project(display_name="Twice", request_id=request_id)
        assert caught.value.reason == REQUEST_ID_REUSED

    @pytest.mark.parametrize("role", [MEMBER, VIEWER])
    async def test_members_and_viewers_cannot_create_projects(self, scene: Scene, role: str) -> None:
        with pytest.raises(PermissionDenied):
            await scene.create_project(scene.by_role[role])
        await scene.create_project(scene.by_role[ADMIN])  # projects.manage: owner and admin

    async def test_another_workspace_is_not_found(self, scene: Scene) -> None:
        stranger = acting(uuid7(), "owner")
        with pytest.raises(NotFound):
            await scene.create_project(stranger)


class TestGetAndListProjects:
    async def test_get_of_another_workspace_is_not_found(self, scene: Scene) -> None:
        project = await scene.create_project()
        stranger = acting(uuid7(), "owner")
        async with scene.db.unit_of_work(stranger) as uow:
            with pytest.raises(NotFound):
                await scene.service.get_project(uow, stranger, workspace_id=scene.workspace_id, project_id=project.id)
        async with scene.db.unit_of_work(scene.viewer) as uow:
            with pytest.raises(NotFound):
                await scene.service.get_project(uow, scene.viewer, workspace_id=scene.workspace_id, project_id=uuid7())

    async def test_list_pages_oldest_first_with_bound_tokens(self, scene: Scene) -> None:
        created = [await scene.create_project(display_name=f"P{i}") for i in range(5)]
        seen: list[uuid.UUID] = []
        token = ""
        pages = 0
        while True:
            async with scene.db.unit_of_work(scene.viewer) as uow:
                page = await scene.service.list_projects(
                    uow, scene.viewer, workspace_id=scene.workspace_id, requested_page_size=2, page_token=token
                )
            seen += [project.id for project in page.projects]
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert seen == [project.id for project in created]
        assert pages == 3
        async with scene.db.unit_of_work(scene.viewer) as uow:
            first = await scene.service.list_projects(
                uow, scene.viewer, workspace_id=scene.workspace_id, requested_page_size=2
            )
        async with scene.db.unit_of_work(scene.member) as uow:
            with pytest.raises(InvalidArgument, match="another caller"):
                await scene.service.list_projects(
                    uow, scene.member, workspace_id=scene.workspace_id, page_token=first.next_page_token
                )


class TestUpdateProject:
    async def test_update_display_name_with_mask_and_event(self, scene: Scene, admin_conn: asyncpg.Connection) -> None:
        project = await scene.create_project(display_name="Old")
        updated = await scene.update_project(
            project, display_name="New", update_mask=["display_name"], etag=project.etag
        )
        assert (updated.display_name, updated.etag, updated.workflow) == ("New", '"v2"', project.workflow)
        [envelope] = await outbox_events(admin_conn, tenant=scene.workspace_id, event_type=PROJECT_UPDATED)
        event = workflow_events_pb2.ProjectUpdatedEvent()
        assert envelope.payload.Unpack(event)
        assert list(event.changed_fields) == ["display_name"]

    async def test_stale_etag_is_aborted_and_noop_keeps_the_version(
        self, scene: Scene, admin_conn: asyncpg.Connection
    ) -> None:
        project = await scene.create_project(display_name="Same")
        same = await scene.update_project(project, display_name="Same", update_mask=["display_name"])
        assert same.etag == project.etag
        assert await outbox_events(admin_conn, tenant=scene.workspace_id, event_type=PROJECT_UPDATED) == []
        await scene.update_project(project, display_name="Changed", update_mask=["display_name"])
        with pytest.raises(Aborted):
            await scene.update_project(project, display_name="Again", update_mask=["display_name"], etag=project.etag)

    async def test_unknown_mask_path_and_missing_workflow(self, scene: Scene) -> None:
        project = await scene.create_project()
        with pytest.raises(InvalidArgument) as caught:
            await scene.update_project(project, update_mask=["creator"])
        assert [v.field for v in caught.value.violations] == ["update_mask"]
        for mask in (["workflow"], ["*"]):
            with pytest.raises(InvalidArgument) as caught:
                await scene.update_project(project, display_name="P", update_mask=mask)
            assert [v.field for v in caught.value.violations] == ["project.workflow"]

    async def test_no_mask_replaces_every_field_but_keeps_an_absent_workflow(self, scene: Scene) -> None:
        project = await scene.create_project(display_name="Old", workflow=SIMPLE)
        updated = await scene.update_project(project, display_name="New")
        assert (updated.display_name, updated.description, updated.workflow) == ("New", "", SIMPLE)
        assert updated.custom_fields == ()
        replaced = await scene.update_project(updated, display_name="New", workflow=DEFAULT_WORKFLOW)
        assert replaced.workflow == DEFAULT_WORKFLOW

    async def test_members_cannot_update(self, scene: Scene) -> None:
        project = await scene.create_project()
        with pytest.raises(PermissionDenied):
            await scene.update_project(project, principal=scene.member, display_name="x", update_mask=["display_name"])

    async def test_a_new_workflow_must_keep_every_state_in_use(self, scene: Scene) -> None:
        project = await scene.create_project()
        await scene.create_item(project)  # in backlog
        with pytest.raises(FailedPrecondition) as caught:
            await scene.update_project(project, workflow=SIMPLE, update_mask=["workflow"])
        assert caught.value.metadata["states_in_use"] == "backlog"
        assert "backlog" in caught.value.message

    async def test_category_change_recategorises_items_in_the_same_transaction(
        self, scene: Scene, admin_conn: asyncpg.Connection
    ) -> None:
        project = await scene.create_project()
        item = await scene.create_item(project)
        assert item.status_category == "BACKLOG"
        states = tuple(
            State(s.id, s.display_name, StateCategory.ACTIVE) if s.id == "backlog" else s
            for s in DEFAULT_WORKFLOW.states
        )
        recategorised = Workflow(states, DEFAULT_WORKFLOW.transitions, DEFAULT_WORKFLOW.initial_state)
        updated = await scene.update_project(project, workflow=recategorised, update_mask=["workflow"])
        assert updated.workflow.category_of("backlog") is StateCategory.ACTIVE
        stored = await admin_conn.fetchval("SELECT status_category FROM workflow.items WHERE id = $1", item.id)
        assert stored == "ACTIVE"
        assert (await scene.get_item(item)).etag == item.etag  # derived column: the item's version stays

    async def test_removing_a_custom_field_in_use_is_refused_unused_is_fine(self, scene: Scene) -> None:
        project = await scene.create_project()
        await scene.create_item(project, custom_fields={"estimate": 3})
        without_estimate = tuple(d for d in CUSTOM_FIELDS if d.key != "estimate")
        with pytest.raises(FailedPrecondition) as caught:
            await scene.update_project(project, custom_fields=without_estimate, update_mask=["custom_fields"])
        assert caught.value.metadata["custom_fields_in_use"] == "estimate"
        retyped = tuple(
            CustomFieldDefinition("estimate", "E", CustomFieldType.STRING) if d is ESTIMATE else d
            for d in CUSTOM_FIELDS
        )
        with pytest.raises(FailedPrecondition):
            await scene.update_project(project, custom_fields=retyped, update_mask=["custom_fields"])
        without_team = tuple(d for d in CUSTOM_FIELDS if d.key != "team")
        updated = await scene.update_project(project, custom_fields=without_team, update_mask=["custom_fields"])
        assert updated.custom_field("team") is None

    async def test_removing_an_enum_value_in_use_is_refused(self, scene: Scene) -> None:
        project = await scene.create_project()
        await scene.create_item(project, custom_fields={"severity": "high"})
        narrowed = tuple(
            CustomFieldDefinition("severity", "Severity", CustomFieldType.ENUM, ("low",)) if d is SEVERITY else d
            for d in CUSTOM_FIELDS
        )
        with pytest.raises(FailedPrecondition) as caught:
            await scene.update_project(project, custom_fields=narrowed, update_mask=["custom_fields"])
        assert caught.value.metadata == {"custom_field": "severity", "values_in_use": "high"}
