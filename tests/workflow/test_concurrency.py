"""Concurrent changes: parents never form a cycle, workflows never lose a state in use, no deadlocks."""

from __future__ import annotations

import asyncio

import pytest

from services.kit.errors import AppError, FailedPrecondition
from services.workflow.errors import PARENT_CYCLE
from services.workflow.models import ItemFields, ItemUpdate, Project
from services.workflow.workflow import State, StateCategory, Transition, Workflow
from tests.workflow.conftest import Scene

pytestmark = pytest.mark.gate("S04")


async def test_two_concurrent_moves_cannot_close_a_cycle(scene: Scene) -> None:
    project = await scene.create_project()
    for _ in range(5):
        a = await scene.create_item(project, title="A")
        b = await scene.create_item(project, title="B")
        results = await asyncio.gather(
            scene.update_item(a, mask=("parent",), parent=b.name),
            scene.update_item(b, mask=("parent",), parent=a.name),
            return_exceptions=True,
        )
        refused = [r for r in results if isinstance(r, FailedPrecondition)]
        assert len(refused) == 1, results
        assert refused[0].reason == PARENT_CYCLE
        a, b = await scene.get_item(a), await scene.get_item(b)
        assert (a.parent_id == b.id) != (b.parent_id == a.id)


async def test_a_workflow_change_and_a_transition_into_the_dropped_state(scene: Scene) -> None:
    """Either the item moves first (and the change is refused) or the state is gone first (and the move is)."""
    full = Workflow(
        states=(
            State("open", "Open", StateCategory.BACKLOG),
            State("review", "Review", StateCategory.ACTIVE),
            State("closed", "Closed", StateCategory.DONE),
        ),
        transitions=(Transition("open", "review"), Transition("open", "closed"), Transition("review", "closed")),
        initial_state="open",
    )
    without_review = Workflow(
        states=(full.states[0], full.states[2]), transitions=(Transition("open", "closed"),), initial_state="open"
    )
    for _ in range(5):
        project = await scene.create_project(workflow=full)
        item = await scene.create_item(project)

        async def drop_review(project: Project = project) -> object:
            async with scene.db.unit_of_work(scene.owner) as uow:
                return await scene.service.update_project(
                    uow,
                    scene.owner,
                    workspace_id=project.workspace_id,
                    project_id=project.id,
                    workflow=without_review,
                    update_mask=["workflow"],
                )

        results = await asyncio.gather(drop_review(), scene.transition(item, "review"), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert len(failures) == 1, results
        assert isinstance(failures[0], AppError)
        moved = await scene.get_item(item)
        async with scene.db.unit_of_work(scene.viewer) as uow:
            current = await scene.service.get_project(
                uow, scene.viewer, workspace_id=project.workspace_id, project_id=project.id
            )
        assert current.workflow.state(moved.status) is not None


async def test_batches_sub_items_and_transitions_on_one_tree_do_not_deadlock(scene: Scene) -> None:
    """Batches lock parent and sub-items in id order while sub-items are created and moved under them."""
    project = await scene.create_project()
    member = scene.user_name("member")
    parent = await scene.create_item(project, title="parent", assignee=member)
    children = [await scene.create_item(project, title=f"c{i}", parent=parent.name) for i in range(4)]
    tree = [parent, *children]

    async def batch(round_: int) -> object:
        updates = [
            ItemUpdate(i.workspace_id, i.project_id, i.id, ItemFields(title=f"{i.title}-{round_}"), ("title",))
            for i in reversed(tree)
        ]
        async with scene.db.unit_of_work(scene.member) as uow:
            return await scene.service.batch_update_items(
                uow, scene.member, workspace_id=parent.workspace_id, project_id=parent.project_id, updates=updates
            )

    for round_ in range(5):
        results = await asyncio.gather(
            batch(round_),
            scene.create_item(project, title="late child", parent=parent.name),
            scene.update_item(children[round_ % 4], mask=("parent",), parent=parent.name),
            scene.transition(children[(round_ + 1) % 4], "cancelled" if round_ % 2 == 0 else "backlog"),
            scene.update_item(parent, mask=("priority",), priority=round_ % 5),
            return_exceptions=True,
        )
        unexpected = [r for r in results if isinstance(r, BaseException) and not isinstance(r, AppError)]
        assert unexpected == [], unexpected
        children = [await scene.get_item(child) for child in children]
        tree = [await scene.get_item(parent), *children]
