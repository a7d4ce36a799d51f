"""ListItems and CountItems through WorkflowService (the query compiler's own tests are test_query*.py)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest

from services.kit.errors import InvalidArgument, NotFound
from services.kit.ids import uuid7
from services.kit.principal import Principal
from services.workflow.models import (
    Item,
    ItemCounts,
    ItemPage,
    Priority,
    Project,
    RenderedItems,
    add_item_messages,
    item_message,
)
from services.workflow.workflow import CustomFieldDefinition, CustomFieldType
from tessera.workflow.v1 import workflow_service_pb2 as pb
from tests.workflow.conftest import ESTIMATE, TEAM, Scene

pytestmark = pytest.mark.gate("S04")


async def list_page(scene: Scene, project: Project, *, principal: Principal | None = None, **options: Any) -> ItemPage:
    caller = principal or scene.viewer
    async with scene.db.unit_of_work(caller) as uow:
        return await scene.service.list_items(
            uow,
            caller,
            workspace_id=project.workspace_id,
            project_id=project.id,
            **options,
        )


async def list_all(scene: Scene, project: Project, **options: Any) -> tuple[list[Item], int]:
    """Every page of a listing; the items and the number of pages."""
    found: list[Item] = []
    token, pages = "", 0
    while True:
        page = await list_page(scene, project, page_token=token, **options)
        found += page.items
        pages += 1
        token = page.next_page_token
        if not token:
            return found, pages


async def count(scene: Scene, project: Project, **options: Any) -> ItemCounts:
    async with scene.db.unit_of_work(scene.viewer) as uow:
        return await scene.service.count_items(
            uow,
            scene.viewer,
            workspace_id=project.workspace_id,
            project_id=project.id,
            **options,
        )


@pytest.fixture
async def board(scene: Scene) -> tuple[Project, list[Item]]:
    """Seven items: various priorities, labels and states; one archived, one deleted."""
    project = await scene.create_project()
    owner = scene.user_name("owner")
    items = [
        await scene.create_item(project, title="alpha", priority=Priority.HIGH, labels=("bug",), assignee=owner),
        await scene.create_item(project, title="bravo", priority=Priority.LOW, labels=("bug", "ui")),
        await scene.create_item(project, title="charlie", priority=Priority.HIGH, custom_fields={"estimate": 5}),
        await scene.create_item(project, title="delta", priority=Priority.URGENT, assignee=owner),
        await scene.create_item(project, title="echo", labels=("ui",)),
        await scene.create_item(project, title="archived one"),
        await scene.create_item(project, title="deleted one"),
    ]
    items[0] = await scene.transition(items[0], "in_progress")
    items[4] = await scene.transition(items[4], "todo")
    items[5] = await scene.mark("archive", items[5])
    items[6] = await scene.mark("delete", items[6])
    return project, items


async def test_filter_order_and_paging_return_each_item_once(scene: Scene, board: tuple[Project, list[Item]]) -> None:
    project, _ = board
    found, pages = await list_all(
        scene, project, filter="priority >= PRIORITY_HIGH", order_by="priority desc, title", requested_page_size=2
    )
    assert [item.title for item in found] == ["delta", "alpha", "charlie"]
    assert pages == 2
    everything, _ = await list_all(scene, project, requested_page_size=2)
    assert {item.title for item in everything} == {"alpha", "bravo", "charlie", "delta", "echo"}
    assert [item.create_time for item in everything] == sorted((item.create_time for item in everything), reverse=True)


async def test_show_archived_and_show_deleted(scene: Scene, board: tuple[Project, list[Item]]) -> None:
    project, _ = board
    with_archived, _ = await list_all(scene, project, show_archived=True)
    assert "archived one" in {item.title for item in with_archived}
    with_deleted, _ = await list_all(scene, project, show_deleted=True)
    titles = {item.title for item in with_deleted}
    assert "deleted one" in titles
    assert "archived one" not in titles


async def test_labels_custom_fields_and_search(scene: Scene, board: tuple[Project, list[Item]]) -> None:
    project, _ = board
    assert {i.title for i in (await list_all(scene, project, filter='labels:"ui"'))[0]} == {"bravo", "echo"}
    assert [i.title for i in (await list_all(scene, project, filter="custom_fields.estimate > 3"))[0]] == ["charlie"]
    assert [i.title for i in (await list_all(scene, project, search="bravo"))[0]] == ["bravo"]


async def test_page_tokens_are_bound_to_the_query_and_the_caller(
    scene: Scene, board: tuple[Project, list[Item]]
) -> None:
    project, _ = board
    first = await list_page(scene, project, filter='status = "backlog"', requested_page_size=1)
    assert first.next_page_token
    with pytest.raises(InvalidArgument, match="different query"):
        await list_page(scene, project, filter='status = "todo"', page_token=first.next_page_token)
    with pytest.raises(InvalidArgument, match="another caller"):
        await list_page(
            scene, project, principal=scene.member, filter='status = "backlog"', page_token=first.next_page_token
        )


async def test_filter_errors_pass_through_and_unknown_projects_are_not_found(
    scene: Scene, board: tuple[Project, list[Item]]
) -> None:
    project, _ = board
    with pytest.raises(InvalidArgument) as caught:
        await list_page(scene, project, filter="nonsense_field = 1")
    assert [v.field for v in caught.value.violations] == ["filter"]
    assert caught.value.metadata["position"] == "1"
    with pytest.raises(NotFound):
        await list_page(scene, dataclasses.replace(project, id=uuid7()))


async def test_counts_by_status_assignee_and_label(scene: Scene, board: tuple[Project, list[Item]]) -> None:
    project, _ = board
    by_status = await count(scene, project, group_by="status")
    assert by_status.counts == [("backlog", 3), ("in_progress", 1), ("todo", 1)]
    assert by_status.total == 5
    by_assignee = await count(scene, project, group_by="assignee")
    assert by_assignee.counts == [("", 3), (scene.user_name("owner"), 2)]
    by_label = await count(scene, project, group_by="label")
    assert by_label.counts == [("", 2), ("bug", 2), ("ui", 2)]
    assert by_label.total == 5
    total = await count(scene, project, filter="priority = PRIORITY_HIGH")
    assert (total.counts, total.total) == ([("", 2)], 2)
    with_archived = await count(scene, project, show_archived=True)
    assert with_archived.total == 6
    with pytest.raises(InvalidArgument):
        await count(scene, project, group_by="priority")


async def test_a_repeated_first_page_reuses_the_statement_but_reads_fresh_rows(scene: Scene) -> None:
    """The first page's compiled SQL is cached per query; the rows never are."""
    project = await scene.create_project()
    first = await scene.create_item(project, title="first", priority=Priority.HIGH)
    options = {"filter": "priority >= PRIORITY_HIGH", "order_by": "title"}
    assert [item.id for item in (await list_page(scene, project, **options)).items] == [first.id]
    second = await scene.create_item(project, title="second", priority=Priority.URGENT)
    await scene.create_item(project, title="low", priority=Priority.LOW)
    assert [item.id for item in (await list_page(scene, project, **options)).items] == [first.id, second.id]
    # Another project with the same filter is another statement (its own tenant and project values).
    other = await scene.create_project()
    assert (await list_page(scene, other, **options)).items == []


async def test_list_pages_render_the_same_messages_as_single_items(
    scene: Scene, board: tuple[Project, list[Item]]
) -> None:
    """ListItems renders rows straight to messages; they equal `item_message` of the same items."""
    project, items = board
    child = await scene.create_item(
        project,
        title="child",
        parent=items[0].name,
        due_time=datetime(2027, 3, 4, 5, 6, 7, 891011, tzinfo=UTC),
        custom_fields={"estimate": 2.5, "team": "core"},
    )
    page = await list_page(scene, project, show_deleted=True, show_archived=True, requested_page_size=100)
    response = pb.ListItemsResponse()
    add_item_messages(response.items, page.rows)
    by_name = {message.name: message for message in response.items}
    expected = [*items, child]
    assert sorted(by_name) == sorted(item.name for item in expected)
    for item in expected:
        single = await scene.get_item(item)
        assert by_name[item.name] == item_message(single), item.name
    # Every optional field is exercised: assignee, labels, parent, due, custom fields, archive and delete times.
    rendered = list(by_name.values())
    for field in ("due_time", "archive_time", "delete_time"):
        assert any(message.HasField(field) for message in rendered), field
    assert any(message.parent for message in rendered)
    assert any(message.assignee for message in rendered)
    assert any(message.custom_fields for message in rendered)
    assert any(message.labels for message in rendered)


def rendered(cache: RenderedItems, page: ItemPage) -> list[Any]:
    response = pb.ListItemsResponse(next_page_token=page.next_page_token)
    cache.add_to(response, page.rows)
    assert response.next_page_token == page.next_page_token
    return list(response.items)


async def test_pages_joined_from_rendered_items_equal_pages_built_field_by_field(
    scene: Scene, board: tuple[Project, list[Item]]
) -> None:
    """ListItems' cache of serialized items: the same messages, in order, from cold and warm, at any capacity."""
    project, items = board
    options: dict[str, Any] = {"show_deleted": True, "show_archived": True, "order_by": "title"}
    page = await list_page(scene, project, **options)
    built = pb.ListItemsResponse()
    add_item_messages(built.items, page.rows)
    expected = list(built.items)
    assert len(expected) == len(items)
    cache = RenderedItems(100)
    assert rendered(cache, page) == expected  # every item a miss
    assert len(cache) == len(items)
    assert rendered(cache, page) == expected  # every item a hit
    # A change moves the version on: the page shows the new form, never the cached old one.
    renamed = await scene.update_item(items[1], mask=("title",), title="bravo renamed", priority=Priority.LOW)
    moved = await scene.transition(items[2], "todo")
    page = await list_page(scene, project, **options)
    fresh = {message.name: message for message in rendered(cache, page)}
    assert fresh[renamed.name].title == "bravo renamed"
    assert fresh[moved.name].status == "todo"
    for item in (renamed, moved):
        assert fresh[item.name] == item_message(await scene.get_item(item))
    assert len(cache) == len(items) + 2  # the old forms stay until evicted; nothing reads them
    # Bounded: the oldest entries go; pages stay right. Capacity 0 builds every page field by field.
    small = RenderedItems(3)
    built = pb.ListItemsResponse()
    add_item_messages(built.items, page.rows)
    assert rendered(small, page) == list(built.items)
    assert len(small) == 3
    assert rendered(small, page) == list(built.items)
    off = RenderedItems(0)
    assert rendered(off, page) == list(built.items)
    assert len(off) == 0


async def test_listing_after_the_custom_fields_change_uses_the_new_definitions(scene: Scene) -> None:
    """After a project's first listing its filter compiles against the custom field types it had, checked
    against the definitions the page statement reads beside the rows: never listed under stale types."""
    project = await scene.create_project(custom_fields=(ESTIMATE,))
    plain = await scene.create_item(project, title="plain")
    assert [item.id for item in (await list_page(scene, project, filter="custom_fields.estimate > 1")).items] == []
    assert [item.id for item in (await list_page(scene, project)).items] == [plain.id]
    key = (project.workspace_id, project.id)
    assert scene.service._listed_field_types[key] == (("estimate", "NUMBER"),)
    # No item carries estimate: it may become a string, and team joins it.
    retyped = (CustomFieldDefinition("estimate", "Estimate", CustomFieldType.STRING), TEAM)
    await scene.update_project(project, custom_fields=retyped, update_mask=("custom_fields",))
    # A page compiled under the remembered types shows, beside its rows, that they are stale: read again.
    assert [item.id for item in (await list_page(scene, project)).items] == [plain.id]
    assert scene.service._listed_field_types[key] == (("estimate", "STRING"), ("team", "STRING"))
    tagged = await scene.create_item(project, title="tagged", custom_fields={"estimate": "large", "team": "core"})
    for text in ('custom_fields.estimate = "large"', 'custom_fields.team = "core"', "custom_fields.team:*"):
        assert [item.id for item in (await list_page(scene, project, filter=text)).items] == [tagged.id], text
    # What the current definitions refuse is refused, naming the field, whatever was remembered.
    with pytest.raises(InvalidArgument, match="estimate"):
        await list_page(scene, project, filter="custom_fields.estimate > 1")
    # An unknown project is NOT_FOUND, never an empty page.
    with pytest.raises(NotFound):
        await list_page(scene, dataclasses.replace(project, id=uuid7()))
