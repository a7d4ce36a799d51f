"""State-machine property tests: random operation sequences never break the workflow invariants.

`WorkflowMachine` (hypothesis `RuleBasedStateMachine`) drives the real `WorkflowService` through its
service-layer API, with real units of work on the migrated PostgreSQL, on one project of a fresh
workspace per example. Its rules create items (top-level or sub-items, with new, retried and reused
request ids), update them (title, labels, priority, assignee, parent — cycles included, with current,
missing or stale etags), move them to random, legal or guarded states, archive/unarchive, delete/undelete
and batch-update them (sometimes with one poisoned entry), and switch the project between workflows (a
re-categorised state, a removed state); any call may also be rolled back after it succeeded. A plain model
predicts each call's outcome (the result or the exact error); after every step the database is compared
with the model and checked against the invariants that need no model:

- every item's status is a state of the workflow and `status_category` is that state's category;
- every status change since the previous step is an allowed transition whose guards hold;
- parent chains have no cycle; the usage counter equals the number of live items;
- the activity log holds exactly the entries of the committed changes (the last TRANSITIONED entry's
  `after` is the current status);
- the outbox holds exactly one event per committed change (type, subject, etag, changed fields), none for
  a refused or rolled-back call.

The machine runs on an event loop of its own (hypothesis' rules are synchronous) with its own `Database`
and a superuser connection for raw rows. No relay runs in this module, so committed events stay in
`workflow.outbox`; only rows newer than the example's start are read.

The other tests race two changes of one item (same etag: one wins, the other is ABORTED), two parent
moves that together would close a cycle, and retries of one create; the last one pins a known deviation
(a retried create is validated again, see `test_a_retried_create_returns_the_first_item`).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import os
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import asyncpg
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from services.kit.authz import MEMBER, OWNER
from services.kit.db import Database, UnitOfWork
from services.kit.errors import (
    Aborted,
    AlreadyExists,
    AppError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.kit.ids import uuid7
from services.kit.principal import Principal
from services.workflow.errors import (
    ETAG_MISMATCH,
    LIMIT_EXCEEDED,
    PARENT_CYCLE,
    REQUEST_ID_REUSED,
    RESOURCE_ARCHIVED,
    TRANSITION_GUARD_FAILED,
    TRANSITION_NOT_ALLOWED,
)
from services.workflow.models import (
    ITEM_FIELDS,
    SCHEMA,
    SERVICE,
    ActivityKind,
    Item,
    ItemFields,
    ItemUpdate,
    Priority,
    item_name,
    project_name,
)
from services.workflow.service import WorkflowService
from services.workflow.workflow import DEFAULT_WORKFLOW, Guard, StateCategory, Workflow
from tessera.common.v1.event_pb2 import EventEnvelope
from tessera.workflow.v1 import workflow_events_pb2
from tests.workflow.conftest import Scene, acting, make_service, outbox_events

pytestmark = pytest.mark.gate("S04")

# The workflows the project switches between: the default; the same with "todo" re-categorised as ACTIVE
# (items in todo must follow); the default without "cancelled" (refused while an item is cancelled).
WORKFLOWS = {
    "default": DEFAULT_WORKFLOW,
    "todo_active": dataclasses.replace(
        DEFAULT_WORKFLOW,
        states=tuple(
            dataclasses.replace(state, category=StateCategory.ACTIVE) if state.id == "todo" else state
            for state in DEFAULT_WORKFLOW.states
        ),
    ),
    "no_cancel": dataclasses.replace(
        DEFAULT_WORKFLOW,
        states=tuple(state for state in DEFAULT_WORKFLOW.states if state.id != "cancelled"),
        transitions=tuple(t for t in DEFAULT_WORKFLOW.transitions if "cancelled" not in (t.from_state, t.to_state)),
    ),
}
STATES = DEFAULT_WORKFLOW.state_ids
ITEM_LIMIT = 4  # small, so that creates and undeletes reach the workspace's limit
UPDATABLE = ("title", "labels", "priority", "assignee", "parent")

# The event type (full message name) each kind of change emits.
EVENT_TYPES = {
    kind: message.DESCRIPTOR.full_name
    for kind, message in (
        (ActivityKind.CREATED, workflow_events_pb2.ItemCreatedEvent),
        (ActivityKind.UPDATED, workflow_events_pb2.ItemUpdatedEvent),
        (ActivityKind.TRANSITIONED, workflow_events_pb2.ItemTransitionedEvent),
        (ActivityKind.ARCHIVED, workflow_events_pb2.ItemArchivedEvent),
        (ActivityKind.UNARCHIVED, workflow_events_pb2.ItemUnarchivedEvent),
        (ActivityKind.DELETED, workflow_events_pb2.ItemDeletedEvent),
        (ActivityKind.UNDELETED, workflow_events_pb2.ItemUndeletedEvent),
    )
}
PROJECT_CREATED = workflow_events_pb2.ProjectCreatedEvent.DESCRIPTOR.full_name
PROJECT_UPDATED = workflow_events_pb2.ProjectUpdatedEvent.DESCRIPTOR.full_name

# (kind, field, before, after) of one activity row, JSON values decoded.
Entry = tuple[str, str, Any, Any]
# (type, subject, item etag, item status, detail): detail is the changed fields or (from, to) of a move.
EventRecord = tuple[str, str, str, str, tuple[str, ...]]


# --- the model ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """The error a call is expected to fail with: its class, reason and (INVALID_ARGUMENT) field."""

    error: type[AppError]
    reason: str
    field: str = ""
    request_index: int | None = None


@dataclass
class ModelItem:
    """What the database should hold for one item, and its expected activity log."""

    id: uuid.UUID
    name: str
    title: str
    priority: int
    assignee: str | None  # users/{id}
    labels: tuple[str, ...]
    parent: uuid.UUID | None
    status: str = DEFAULT_WORKFLOW.initial_state
    archived: bool = False
    deleted: bool = False
    version: int = 1
    log: list[Entry] = field(default_factory=list)

    @property
    def etag(self) -> str:
        return f'"v{self.version}"'


@dataclass(frozen=True)
class Payload:
    """A create's payload as the request_id fingerprint sees it (labels normalised)."""

    title: str
    priority: int
    assignee: str | None
    labels: tuple[str, ...]
    parent: uuid.UUID | None


@dataclass
class Model:
    """The project (workflow, version), its items, the events the outbox should hold, the request ids used."""

    workspace_id: uuid.UUID
    project_id: uuid.UUID
    workflow: Workflow = DEFAULT_WORKFLOW
    project_version: int = 1
    items: dict[uuid.UUID, ModelItem] = field(default_factory=dict)
    events: list[EventRecord] = field(default_factory=list)
    requests: dict[uuid.UUID, tuple[Payload, uuid.UUID]] = field(default_factory=dict)

    def pick(self, index: int) -> ModelItem:
        ordered = list(self.items.values())
        return ordered[index % len(ordered)]

    def name_of(self, item_id: uuid.UUID | None) -> str | None:
        return item_name(self.workspace_id, self.project_id, item_id) if item_id else None

    def live_count(self) -> int:
        return sum(not item.deleted for item in self.items.values())

    def open_children(self, item_id: uuid.UUID) -> list[ModelItem]:
        return [
            child
            for child in self.items.values()
            if child.parent == item_id and not child.deleted and not self.workflow.category_of(child.status).closed
        ]

    def ancestors_or_self(self, start: uuid.UUID) -> set[uuid.UUID]:
        seen: set[uuid.UUID] = set()
        current: uuid.UUID | None = start
        while current is not None and current not in seen:
            seen.add(current)
            current = self.items[current].parent
        return seen

    def emit(self, kind: ActivityKind, item: ModelItem, detail: tuple[str, ...] = ()) -> None:
        self.events.append((EVENT_TYPES[kind], item.name, item.etag, item.status, detail))


def normalized(labels: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted({label.strip() for label in labels}))


def blank_label(labels: tuple[str, ...]) -> int | None:
    return next((index for index, label in enumerate(labels) if not label.strip()), None)


def priority_json(priority: int) -> str:
    return f"PRIORITY_{Priority(priority).name}"


@dataclass(frozen=True)
class Edit:
    """One generated update; item, parent and assignee choices are resolved against the model when it runs."""

    item: int
    mask: tuple[str, ...]  # empty: every field
    title: str
    labels: tuple[str, ...]
    priority: int
    assignee: str  # "none", "member" or "stranger" (not a member of the workspace)
    parent: int | None
    etag: str  # "none", "current" or "stale"


@dataclass(frozen=True)
class Resolved:
    """An edit resolved against the model: the target item and the request's values."""

    item: ModelItem
    edit: Edit
    assignee: str | None
    parent: uuid.UUID | None
    etag: str


def plan_update(model: Model, change: Resolved, *, prefix: str = "") -> Refusal | list[Entry]:
    """The UPDATED entries an update writes (none for a no-op), or the refusal, in the service's order."""
    item, edit = change.item, change.edit
    if item.deleted:
        return Refusal(NotFound, "RESOURCE_NOT_FOUND")
    if item.archived:
        return Refusal(FailedPrecondition, RESOURCE_ARCHIVED)
    if change.etag and change.etag != item.etag:
        return Refusal(Aborted, ETAG_MISMATCH)
    paths = edit.mask or ITEM_FIELDS
    for path in paths:
        if path == "title" and not edit.title.strip():
            return Refusal(InvalidArgument, "INVALID_ARGUMENT", f"{prefix}item.title")
        if path == "labels" and (index := blank_label(edit.labels)) is not None:
            return Refusal(InvalidArgument, "INVALID_ARGUMENT", f"{prefix}item.labels[{index}]")
    after = {
        "title": edit.title if "title" in paths else item.title,
        "priority": priority_json(edit.priority) if "priority" in paths else priority_json(item.priority),
        "assignee": change.assignee if "assignee" in paths else item.assignee,
        "labels": list(normalized(edit.labels)) if "labels" in paths else list(item.labels),
        "parent": model.name_of(change.parent) if "parent" in paths else model.name_of(item.parent),
    }
    before = {
        "title": item.title,
        "priority": priority_json(item.priority),
        "assignee": item.assignee,
        "labels": list(item.labels),
        "parent": model.name_of(item.parent),
    }
    entries = [
        (ActivityKind.UPDATED.value, path, before[path], after[path])
        for path in ("title", "priority", "assignee", "labels", "parent")
        if before[path] != after[path]
    ]
    changed = {entry[1] for entry in entries}
    if "assignee" in changed and edit.assignee == "stranger":
        return Refusal(InvalidArgument, "INVALID_ARGUMENT", f"{prefix}item.assignee")
    if "parent" in changed and change.parent is not None:
        if change.parent == item.id:
            return Refusal(FailedPrecondition, PARENT_CYCLE)
        if model.items[change.parent].deleted:
            return Refusal(InvalidArgument, "INVALID_ARGUMENT", f"{prefix}item.parent")
        if item.id in model.ancestors_or_self(change.parent):
            return Refusal(FailedPrecondition, PARENT_CYCLE)
    return entries


def apply_update(model: Model, change: Resolved, entries: list[Entry]) -> None:
    """Commit a planned update to the model (a no-op changes nothing)."""
    if not entries:
        return
    item, edit = change.item, change.edit
    changed = [entry[1] for entry in entries]
    if "title" in changed:
        item.title = edit.title
    if "priority" in changed:
        item.priority = edit.priority
    if "assignee" in changed:
        item.assignee = change.assignee
    if "labels" in changed:
        item.labels = normalized(edit.labels)
    if "parent" in changed:
        item.parent = change.parent
    item.version += 1
    item.log.extend(entries)
    model.emit(ActivityKind.UPDATED, item, tuple(changed))


# --- strategies --------------------------------------------------------------------------------------------

TITLES = st.sampled_from(["alpha", "beta", "gamma", "alpha", "beta", "gamma", "alpha", "  "])
LABELS = st.sampled_from([(), (), ("bug",), (" bug ", "ui"), ("ui", "bug", "ui"), ("ops",), ("ui",), ("ops", "  ")])
PRIORITIES = st.integers(min_value=0, max_value=4)
ASSIGNEES = st.sampled_from(["none", "member", "member", "member", "stranger"])
ITEM_INDEX = st.integers(min_value=0, max_value=63)
PARENTS = st.none() | ITEM_INDEX
ETAGS = st.sampled_from(["none", "current", "current", "stale"])
ROLLBACK = st.sampled_from([False, False, False, False, True])
MASKS = st.lists(st.sampled_from(UPDATABLE), unique=True, max_size=len(UPDATABLE)).map(tuple)
EDITS = st.builds(
    Edit,
    item=ITEM_INDEX,
    mask=MASKS,
    title=TITLES,
    labels=LABELS,
    priority=PRIORITIES,
    assignee=ASSIGNEES,
    parent=PARENTS,
    etag=ETAGS,
)


class _RolledBack(Exception):
    """Raised inside a unit of work after a successful call, so that its transaction rolls back."""

    def __init__(self, result: Any) -> None:
        super().__init__("rolled back on purpose")
        self.result = result


# --- the harness: an event loop, a Database and a superuser connection of the machine's own -----------------


@dataclass
class Harness:
    """The machine's event loop, the service's Database on it, a superuser connection and the service."""

    loop: asyncio.AbstractEventLoop
    db: Database
    admin: asyncpg.Connection
    service: WorkflowService

    def run(self, awaitable: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(awaitable)


@pytest.fixture(scope="module")
def harness(workflow_url: str, admin_url: str) -> Iterator[Harness]:
    loop = asyncio.new_event_loop()
    db = Database(workflow_url, service=SERVICE, schema=SCHEMA, pool_size=2)
    admin = loop.run_until_complete(asyncpg.connect(admin_url))
    try:
        yield Harness(loop, db, admin, make_service(max_items_per_workspace=ITEM_LIMIT))
    finally:
        loop.run_until_complete(admin.close())
        loop.run_until_complete(db.dispose())
        loop.close()


# --- the machine -------------------------------------------------------------------------------------------


class WorkflowMachine(RuleBasedStateMachine):
    """Random operations on one project of a fresh workspace, checked against a model after every step."""

    harness: ClassVar[Harness]
    seen: ClassVar[Counter[str]]

    def __init__(self) -> None:
        super().__init__()
        self.workspace_id = uuid7()
        self.started = uuid7()  # outbox rows of this example have larger ids (UUIDv7, monotonic per process)
        self.actor = acting(self.workspace_id, MEMBER)
        self.owner = acting(self.workspace_id, OWNER)
        self.assignee = f"users/{uuid7()}"
        self.stranger = f"users/{uuid7()}"
        self.model = Model(self.workspace_id, uuid7())
        self.observed: dict[uuid.UUID, str] = {}  # status of each item at the previous check

    # --- plumbing --------------------------------------------------------------------------------------

    def call(
        self,
        operation: Callable[[UnitOfWork], Awaitable[Any]],
        *,
        rollback: bool = False,
        principal: Principal | None = None,
    ) -> tuple[Any, AppError | None]:
        """Run one service call in its own unit of work: (result, None) or (None, the AppError raised)."""

        async def run() -> tuple[Any, AppError | None]:
            try:
                async with self.harness.db.unit_of_work(principal or self.actor) as uow:
                    result = await operation(uow)
                    if rollback:
                        raise _RolledBack(result)
                    return result, None
            except _RolledBack as rolled:
                return rolled.result, None
            except AppError as error:
                return None, error

        result: tuple[Any, AppError | None] = self.harness.run(run())
        return result

    def expect_refusal(self, label: str, refusal: Refusal, error: AppError | None) -> None:
        assert error is not None, f"{label}: expected {refusal}, but the call succeeded"
        assert isinstance(error, refusal.error), f"{label}: expected {refusal}, got {error!r} ({error.message})"
        assert error.reason == refusal.reason, f"{label}: expected {refusal}, got {error.reason}: {error.message}"
        if refusal.field:
            assert [v.field for v in error.violations] == [refusal.field], (label, error.violations)
        if refusal.request_index is not None:
            assert error.metadata.get("request_index") == str(refusal.request_index), (label, error.metadata)
        self.note(f"{label}: {refusal.reason}")
        if refusal.reason == LIMIT_EXCEEDED:
            self.note("limit reached")

    def expect_success(self, label: str, error: AppError | None) -> None:
        assert error is None, f"{label}: expected success, got {error!r} ({error.message if error else ''})"
        self.note(f"{label}: ok")

    def note(self, outcome: str) -> None:
        event(outcome)
        self.seen[outcome] += 1

    def resolve(self, edit: Edit) -> Resolved:
        item = self.model.pick(edit.item)
        parent = self.model.pick(edit.parent).id if edit.parent is not None else None
        return Resolved(item, edit, self.assignee_of(edit.assignee), parent, self.etag_of(edit.etag, item))

    def assignee_of(self, choice: str) -> str | None:
        return {"none": None, "member": self.assignee, "stranger": self.stranger}[choice]

    @staticmethod
    def etag_of(choice: str, item: ModelItem) -> str:
        return {"none": "", "current": item.etag, "stale": f'"v{item.version - 1}"'}[choice]

    def item_update(self, change: Resolved) -> ItemUpdate:
        edit = change.edit
        fields = ItemFields(
            title=edit.title,
            priority=edit.priority,
            assignee=self.assignee_of(edit.assignee) or "",
            labels=edit.labels,
            parent=self.model.name_of(change.parent) or "",
        )
        return ItemUpdate(self.workspace_id, self.model.project_id, change.item.id, fields, edit.mask, change.etag)

    def check_returned(self, returned: Item, expected: ModelItem) -> None:
        """The item a call returned is the model's item."""
        assert returned.name == expected.name
        assert (returned.version, returned.status, returned.status_category) == (
            expected.version,
            expected.status,
            self.model.workflow.category_of(expected.status).value,
        )
        assert (returned.title, int(returned.priority), returned.labels) == (
            expected.title,
            expected.priority,
            expected.labels,
        )
        assert (f"users/{returned.assignee}" if returned.assignee else None) == expected.assignee
        assert returned.parent_id == expected.parent
        assert (returned.archived, returned.deleted) == (expected.archived, expected.deleted)

    # --- rules -----------------------------------------------------------------------------------------

    @initialize()
    def create_project(self) -> None:
        """A fresh workspace with the acting member and an assignable member, and one default project."""

        async def setup() -> None:
            for subject in (self.actor.subject, self.assignee.removeprefix("users/")):
                async with self.harness.db.unit_of_work(None, tenant_id=str(self.workspace_id)) as uow:
                    await self.harness.service.record_membership(
                        uow,
                        workspace_id=self.workspace_id,
                        user_id=uuid.UUID(subject),
                        role=MEMBER,
                        change_time=datetime.now(UTC),
                    )
            async with self.harness.db.unit_of_work(self.owner) as uow:
                await self.harness.service.create_project(
                    uow,
                    self.owner,
                    workspace_id=self.workspace_id,
                    project_id=self.model.project_id,
                    display_name="Properties",
                )

        self.harness.run(setup())
        self.model.events.append((PROJECT_CREATED, self.project_name, '"v1"', "", ()))

    @property
    def project_name(self) -> str:
        return project_name(self.workspace_id, self.model.project_id)

    @rule(
        title=TITLES,
        labels=LABELS,
        priority=PRIORITIES,
        assignee=ASSIGNEES,
        parent=PARENTS,
        request=st.sampled_from(["none", "new", "retry", "reuse"]),
        request_index=ITEM_INDEX,
        rollback=ROLLBACK,
    )
    def create(
        self,
        title: str,
        labels: tuple[str, ...],
        priority: int,
        assignee: str,
        parent: int | None,
        request: str,
        request_index: int,
        rollback: bool,
    ) -> None:
        """CreateItem; `retry` repeats an earlier committed create exactly, `reuse` sends a new payload."""
        model = self.model
        parent_id = model.pick(parent).id if parent is not None and model.items else None
        payload = Payload(title, priority, self.assignee_of(assignee), normalized(labels), parent_id)
        request_id: uuid.UUID | None = None
        earlier: tuple[Payload, uuid.UUID] | None = None
        if request in ("retry", "reuse") and model.requests:
            request_id = list(model.requests)[request_index % len(model.requests)]
            earlier = model.requests[request_id]
            if request == "retry":
                payload = earlier[0]
                title, labels, priority = payload.title, payload.labels, payload.priority
                assignee = {None: "none", self.assignee: "member", self.stranger: "stranger"}[payload.assignee]
                parent_id = payload.parent
        elif request != "none":
            request_id = uuid7()
        item_id = uuid7()
        fields = ItemFields(
            title=title,
            priority=priority,
            assignee=payload.assignee or "",
            labels=labels,
            parent=model.name_of(parent_id) or "",
        )
        result, error = self.call(
            lambda uow: self.harness.service.create_item(
                uow,
                self.actor,
                workspace_id=self.workspace_id,
                project_id=model.project_id,
                item_id=item_id,
                fields=fields,
                request_id=request_id,
            ),
            rollback=rollback,
        )
        label = "create"
        refusal: Refusal | None = None
        if not title.strip():
            refusal = Refusal(InvalidArgument, "INVALID_ARGUMENT", "item.title")
        elif (index := blank_label(labels)) is not None:
            refusal = Refusal(InvalidArgument, "INVALID_ARGUMENT", f"item.labels[{index}]")
        elif earlier is not None and earlier[0] == payload:
            # A retry returns the item the first call created, whatever happened to it (or its parent) since.
            self.expect_success("create retry", error)
            self.check_returned(result, model.items[earlier[1]])
            return
        elif earlier is not None:  # a reused request_id is a conflict before the references are looked at
            refusal = Refusal(AlreadyExists, REQUEST_ID_REUSED)
        elif assignee == "stranger":
            refusal = Refusal(InvalidArgument, "INVALID_ARGUMENT", "item.assignee")
        elif parent_id is not None and model.items[parent_id].deleted:
            refusal = Refusal(InvalidArgument, "INVALID_ARGUMENT", "item.parent")
        elif model.live_count() >= ITEM_LIMIT:
            refusal = Refusal(ResourceExhausted, LIMIT_EXCEEDED)
        if refusal is not None:
            self.expect_refusal(label, refusal, error)
            return
        self.expect_success(label, error)
        created = ModelItem(
            id=item_id,
            name=model.name_of(item_id) or "",
            title=title,
            priority=priority,
            assignee=payload.assignee,
            labels=payload.labels,
            parent=parent_id,
            status=model.workflow.initial_state,
        )
        created.log.append(
            (
                ActivityKind.CREATED.value,
                "",
                None,
                {
                    "title": title,
                    "description": "",
                    "status": created.status,
                    "priority": priority_json(priority),
                    "assignee": payload.assignee,
                    "labels": list(payload.labels),
                    "due_time": None,
                    "custom_fields": {},
                    "parent": model.name_of(parent_id),
                },
            )
        )
        self.check_returned(result, created)
        if rollback:
            self.note("create rolled back")
            return
        model.items[item_id] = created
        model.emit(ActivityKind.CREATED, created)
        if request_id is not None:
            model.requests[request_id] = (payload, item_id)

    @precondition(lambda self: self.model.items)
    @rule(edit=EDITS, rollback=ROLLBACK)
    def update(self, edit: Edit, rollback: bool) -> None:
        """UpdateItem with a random mask, values, parent (cycles included) and etag."""
        change = self.resolve(edit)
        result, error = self.call(
            lambda uow: self.harness.service.update_item(uow, self.actor, update=self.item_update(change)),
            rollback=rollback,
        )
        plan = plan_update(self.model, change)
        if isinstance(plan, Refusal):
            self.expect_refusal("update", plan, error)
            return
        self.expect_success("update" if plan else "update no-op", error)
        model = copy.deepcopy(self.model) if rollback else self.model
        apply_update(model, dataclasses.replace(change, item=model.items[change.item.id]), plan)
        self.check_returned(result, model.items[change.item.id])
        if rollback:
            self.note("update rolled back")

    @precondition(lambda self: self.model.items)
    @rule(index=ITEM_INDEX, status=st.sampled_from([*STATES, "nowhere"]), etag=ETAGS, rollback=ROLLBACK)
    def transition(self, index: int, status: str, etag: str, rollback: bool) -> None:
        """TransitionItem to any state, legal or not."""
        item = self.model.pick(index)
        self.move(item, status, self.etag_of(etag, item), rollback)

    @precondition(lambda self: any(not item.deleted and not item.archived for item in self.model.items.values()))
    @rule(index=ITEM_INDEX, choice=ITEM_INDEX, rollback=ROLLBACK)
    def advance(self, index: int, choice: int, rollback: bool) -> None:
        """TransitionItem along an allowed transition of a live item (guards may still refuse it)."""
        live = [item for item in self.model.items.values() if not item.deleted and not item.archived]
        item = live[index % len(live)]
        targets = self.model.workflow.allowed_next(item.status)
        self.move(item, targets[choice % len(targets)], item.etag, rollback)

    @precondition(lambda self: self.guarded_candidates())
    @rule(index=ITEM_INDEX, choice=ITEM_INDEX, rollback=ROLLBACK)
    def guarded_move(self, index: int, choice: int, rollback: bool) -> None:
        """TransitionItem along an allowed transition that has guards (into in_progress, into done)."""
        candidates = self.guarded_candidates()
        item = candidates[index % len(candidates)]
        targets = self.guarded_targets(item.status)
        self.move(item, targets[choice % len(targets)], item.etag, rollback)

    def guarded_candidates(self) -> list[ModelItem]:
        return [
            item
            for item in self.model.items.values()
            if not item.deleted and not item.archived and self.guarded_targets(item.status)
        ]

    def guarded_targets(self, status: str) -> list[str]:
        return [t.to_state for t in self.model.workflow.transitions if t.from_state == status and t.guards]

    def move(self, item: ModelItem, status: str, etag: str, rollback: bool) -> None:
        result, error = self.call(
            lambda uow: self.harness.service.transition_item(
                uow,
                self.actor,
                workspace_id=self.workspace_id,
                project_id=self.model.project_id,
                item_id=item.id,
                status=status,
                etag=etag,
            ),
            rollback=rollback,
        )
        refusal: Refusal | None = None
        workflow = self.model.workflow
        transition = workflow.check_transition(item.status, status)
        if item.deleted:
            refusal = Refusal(NotFound, "RESOURCE_NOT_FOUND")
        elif item.archived:
            refusal = Refusal(FailedPrecondition, RESOURCE_ARCHIVED)
        elif etag and etag != item.etag:
            refusal = Refusal(Aborted, ETAG_MISMATCH)
        elif workflow.state(status) is None:
            refusal = Refusal(InvalidArgument, "INVALID_ARGUMENT", "status")
        elif status == item.status:
            self.expect_success("transition no-op", error)
            self.check_returned(result, item)
            return
        elif transition is None:
            refusal = Refusal(FailedPrecondition, TRANSITION_NOT_ALLOWED)
        else:
            for guard in transition.guards:
                holds = (
                    item.assignee is not None
                    if guard is Guard.ASSIGNEE_REQUIRED
                    else not self.model.open_children(item.id)
                )
                if not holds:
                    self.note(f"guard {guard.value} refused")
                    refusal = Refusal(FailedPrecondition, TRANSITION_GUARD_FAILED)
                    break
        if refusal is not None:
            self.expect_refusal("transition", refusal, error)
            if refusal.reason == TRANSITION_NOT_ALLOWED:
                assert error is not None
                assert error.metadata["allowed_next_states"] == ",".join(workflow.allowed_next(item.status))
            return
        self.expect_success(f"transition to {status}", error)
        moved = copy.deepcopy(item) if rollback else item
        moved.log.append((ActivityKind.TRANSITIONED.value, "status", moved.status, status))
        detail = (moved.status, status)
        moved.status = status
        moved.version += 1
        self.check_returned(result, moved)
        if rollback:
            self.note("transition rolled back")
            return
        self.model.emit(ActivityKind.TRANSITIONED, moved, detail)

    @precondition(lambda self: self.model.items)
    @rule(
        action=st.sampled_from(["archive", "unarchive", "delete", "undelete"]),
        index=ITEM_INDEX,
        etag=ETAGS,
        rollback=ROLLBACK,
    )
    def mark(self, action: str, index: int, etag: str, rollback: bool) -> None:
        """ArchiveItem / UnarchiveItem / DeleteItem / UndeleteItem of any item."""
        self.change_mark(action, self.model.pick(index), etag, rollback)

    @precondition(lambda self: any(item.deleted for item in self.model.items.values()))
    @rule(index=ITEM_INDEX, rollback=ROLLBACK)
    def restore(self, index: int, rollback: bool) -> None:
        """UndeleteItem of a deleted item (refused at the workspace's item limit)."""
        deleted = [item for item in self.model.items.values() if item.deleted]
        self.change_mark("undelete", deleted[index % len(deleted)], "none", rollback)

    def change_mark(self, action: str, item: ModelItem, etag: str, rollback: bool) -> None:
        """Archive, unarchive, delete or undelete (which takes no etag) one item."""
        options = {} if action == "undelete" else {"etag": self.etag_of(etag, item)}
        method = getattr(self.harness.service, f"{action}_item")
        result, error = self.call(
            lambda uow: method(
                uow,
                self.actor,
                workspace_id=self.workspace_id,
                project_id=self.model.project_id,
                item_id=item.id,
                **options,
            ),
            rollback=rollback,
        )
        stale = bool(options.get("etag")) and options["etag"] != item.etag
        refusal: Refusal | None = None
        if action == "undelete":
            if not item.deleted:
                refusal = Refusal(FailedPrecondition, "FAILED_PRECONDITION")
            elif self.model.live_count() >= ITEM_LIMIT:
                refusal = Refusal(ResourceExhausted, LIMIT_EXCEEDED)
        elif item.deleted:
            refusal = Refusal(NotFound, "RESOURCE_NOT_FOUND")
        elif stale:
            refusal = Refusal(Aborted, ETAG_MISMATCH)
        elif action == "archive" and item.archived:
            refusal = Refusal(FailedPrecondition, RESOURCE_ARCHIVED)
        elif action == "unarchive" and not item.archived:
            refusal = Refusal(FailedPrecondition, "FAILED_PRECONDITION")
        if refusal is not None:
            self.expect_refusal(action, refusal, error)
            return
        self.expect_success(action, error)
        kind = {
            "archive": ActivityKind.ARCHIVED,
            "unarchive": ActivityKind.UNARCHIVED,
            "delete": ActivityKind.DELETED,
            "undelete": ActivityKind.UNDELETED,
        }[action]
        marked = copy.deepcopy(item) if rollback else item
        if action in ("archive", "unarchive"):
            marked.archived = action == "archive"
        else:
            marked.deleted = action == "delete"
        marked.version += 1
        marked.log.append((kind.value, "", None, None))
        self.check_returned(result, marked)
        if rollback:
            self.note(f"{action} rolled back")
            return
        self.model.emit(kind, marked)

    @precondition(lambda self: self.model.items)
    @rule(
        edits=st.lists(EDITS, min_size=1, max_size=4),
        duplicate=st.sampled_from([False, False, False, True]),
        poison=st.sampled_from([None, None, None, None, None, 0, 1, 2]),
        rollback=ROLLBACK,
    )
    def batch_update(self, edits: list[Edit], duplicate: bool, poison: int | None, rollback: bool) -> None:
        """BatchUpdateItems on distinct items (or one named twice); `poison` blanks one entry's title."""
        changes: list[Resolved] = []
        for edit in edits:
            change = self.resolve(edit)
            if duplicate or all(other.item.id != change.item.id for other in changes):
                changes.append(change)
        if poison is not None:
            target = changes[poison % len(changes)]
            mask = target.edit.mask
            if mask and "title" not in mask:
                mask = (*mask, "title")
            changes[poison % len(changes)] = dataclasses.replace(
                target, edit=dataclasses.replace(target.edit, title=" ", mask=mask)
            )
        updates = [self.item_update(change) for change in changes]
        result, error = self.call(
            lambda uow: self.harness.service.batch_update_items(
                uow, self.actor, workspace_id=self.workspace_id, project_id=self.model.project_id, updates=updates
            ),
            rollback=rollback,
        )
        first_seen: dict[uuid.UUID, int] = {}
        for index, change in enumerate(changes):
            if change.item.id in first_seen:
                self.expect_refusal(
                    "batch", Refusal(InvalidArgument, "INVALID_ARGUMENT", f"requests[{index}].item.name"), error
                )
                return
            first_seen[change.item.id] = index
        scratch = copy.deepcopy(self.model)
        for index, change in enumerate(changes):
            mirrored = dataclasses.replace(change, item=scratch.items[change.item.id])
            plan = plan_update(scratch, mirrored, prefix=f"requests[{index}].")
            if isinstance(plan, Refusal):
                self.expect_refusal("batch", Refusal(plan.error, plan.reason, plan.field, index), error)
                return
            apply_update(scratch, mirrored, plan)
        self.expect_success(f"batch of {len(changes)}", error)
        assert [item.id for item in result] == [change.item.id for change in changes]
        for returned in result:
            self.check_returned(returned, scratch.items[returned.id])
        if rollback:
            self.note("batch rolled back")
            return
        self.model = scratch

    @precondition(lambda self: self.model.items)
    @rule(variant=st.sampled_from(sorted(WORKFLOWS)), etag=ETAGS, rollback=ROLLBACK)
    def change_workflow(self, variant: str, etag: str, rollback: bool) -> None:
        """UpdateProject's workflow: states in use must stay; a re-categorised state's items follow it."""
        model, workflow = self.model, WORKFLOWS[variant]
        etag_value = {"none": "", "current": f'"v{model.project_version}"', "stale": '"v0"'}[etag]
        result, error = self.call(
            lambda uow: self.harness.service.update_project(
                uow,
                self.owner,
                workspace_id=self.workspace_id,
                project_id=model.project_id,
                workflow=workflow,
                update_mask=("workflow",),
                etag=etag_value,
            ),
            rollback=rollback,
            principal=self.owner,
        )
        removed = set(model.workflow.state_ids) - set(workflow.state_ids)
        if etag_value and etag_value != f'"v{model.project_version}"':
            self.expect_refusal("workflow", Refusal(Aborted, ETAG_MISMATCH), error)
            return
        if workflow == model.workflow:
            self.expect_success("workflow no-op", error)
            assert result.etag == f'"v{model.project_version}"'
            return
        if any(item.status in removed for item in model.items.values()):
            self.expect_refusal("workflow", Refusal(FailedPrecondition, "FAILED_PRECONDITION"), error)
            return
        self.expect_success(f"workflow {variant}", error)
        assert (result.workflow, result.etag) == (workflow, f'"v{model.project_version + 1}"')
        if rollback:
            self.note("workflow rolled back")
            return
        model.workflow, model.project_version = workflow, model.project_version + 1
        model.events.append((PROJECT_UPDATED, self.project_name, result.etag, "", ("workflow",)))

    # --- invariants ------------------------------------------------------------------------------------

    @invariant()
    def database_matches_model(self) -> None:
        rows, activity_rows, outbox, usage = self.harness.run(self.read_database())
        by_id = {row["id"]: row for row in rows}
        assert set(by_id) == set(self.model.items), "the project's items are not the committed creates"
        for item_id, row in by_id.items():
            self.check_row(row, by_id)
            expected = self.model.items[item_id]
            assert (
                row["title"],
                row["priority"],
                f"users/{row['assignee']}" if row["assignee"] else None,
                tuple(row["labels"]),
                row["parent_id"],
                row["status"],
                row["archived"],
                row["deleted"],
                row["version"],
            ) == (
                expected.title,
                expected.priority,
                expected.assignee,
                expected.labels,
                expected.parent,
                expected.status,
                expected.archived,
                expected.deleted,
                expected.version,
            ), f"{expected.name} differs from the model"
        logs: dict[uuid.UUID, list[Entry]] = {item_id: [] for item_id in by_id}
        for row in activity_rows:
            before = None if row["before"] is None else json.loads(row["before"])
            after = None if row["after"] is None else json.loads(row["after"])
            logs.setdefault(row["item_id"], []).append((row["kind"], row["field"], before, after))
            assert row["actor"] == f"users/{self.actor.subject}"
        for item_id, log in logs.items():
            assert log == self.model.items[item_id].log, f"activity log of {item_id} differs from the model"
            moves = [entry for entry in log if entry[0] == ActivityKind.TRANSITIONED.value]
            current = by_id[item_id]["status"]
            assert (moves[-1][3] if moves else log[0][3]["status"]) == current
        assert outbox == self.model.events, "the outbox does not hold exactly one event per committed change"
        assert usage == self.model.live_count(), "the usage counter is not the number of live items"

    def check_row(self, row: asyncpg.Record, by_id: dict[uuid.UUID, asyncpg.Record]) -> None:
        """The model-free invariants of one item row: a real state, its category, legal moves, guards, no cycle."""
        status = row["status"]
        workflow = self.model.workflow
        state = workflow.state(status)
        assert state is not None, f"{row['id']} is in {status!r}, not a state of the workflow"
        assert row["status_category"] == state.category.value
        previous = self.observed.get(row["id"])
        if previous is not None and previous != status:
            transition = workflow.check_transition(previous, status)
            assert transition is not None, f"{row['id']} moved {previous} → {status}, not an allowed transition"
            for guard in transition.guards:
                if guard is Guard.ASSIGNEE_REQUIRED:
                    assert row["assignee"] is not None, f"{row['id']} entered {status} without an assignee"
                elif guard is Guard.SUBITEMS_CLOSED:
                    still_open = [
                        child["id"]
                        for child in by_id.values()
                        if child["parent_id"] == row["id"]
                        and not child["deleted"]
                        and not StateCategory(child["status_category"]).closed
                    ]
                    assert not still_open, f"{row['id']} entered {status} with open sub-items {still_open}"
        self.observed[row["id"]] = status
        chain: list[uuid.UUID] = [row["id"]]
        parent = row["parent_id"]
        while parent is not None:
            assert parent not in chain, f"parent cycle: {[*chain, parent]}"
            assert parent in by_id, f"{chain[-1]} has a parent {parent} outside the project"
            chain.append(parent)
            parent = by_id[parent]["parent_id"]

    async def read_database(self) -> tuple[list[asyncpg.Record], list[asyncpg.Record], list[EventRecord], int]:
        admin, tenant = self.harness.admin, self.workspace_id
        rows = await admin.fetch(
            "SELECT id, title, status, status_category, priority, assignee, labels, parent_id, version, "
            "archive_time IS NOT NULL AS archived, delete_time IS NOT NULL AS deleted "
            "FROM workflow.items WHERE tenant_id = $1 AND project_id = $2",
            tenant,
            self.model.project_id,
        )
        activity_rows = await admin.fetch(
            "SELECT item_id, kind, field, before::text AS before, after::text AS after, actor "
            "FROM workflow.activities WHERE tenant_id = $1 ORDER BY id",
            tenant,
        )
        envelopes = [
            EventEnvelope.FromString(row["envelope"])
            for row in await admin.fetch("SELECT envelope FROM workflow.outbox WHERE id > $1 ORDER BY id", self.started)
        ]
        usage = await admin.fetchval("SELECT sum(item_count) FROM workflow.usage WHERE tenant_id = $1", tenant)
        return rows, activity_rows, [_record(e) for e in envelopes if e.tenant_id == str(tenant)], usage or 0


def _record(envelope: EventEnvelope) -> EventRecord:
    """The parts of an outbox event the model predicts."""
    if envelope.type in (PROJECT_CREATED, PROJECT_UPDATED):
        project_event = getattr(workflow_events_pb2, envelope.type.rpartition(".")[2])()
        assert envelope.payload.Unpack(project_event), envelope.type
        changed = tuple(getattr(project_event, "changed_fields", ()))
        return (envelope.type, envelope.subject, project_event.project.etag, "", changed)
    message_class = getattr(workflow_events_pb2, envelope.type.rpartition(".")[2])
    message = message_class()
    assert envelope.payload.Unpack(message), envelope.type
    detail: tuple[str, ...] = ()
    if isinstance(message, workflow_events_pb2.ItemUpdatedEvent):
        detail = tuple(message.changed_fields)
    elif isinstance(message, workflow_events_pb2.ItemTransitionedEvent):
        detail = (message.from_status, message.to_status)
    assert message.item.name == envelope.subject
    return (envelope.type, envelope.subject, message.item.etag, message.item.status, detail)


SETTINGS = settings(
    max_examples=80,
    stateful_step_count=30,
    deadline=None,
    database=None,  # nothing written into the repository; a failure prints its steps and a reproduce blob
    print_blob=True,
    # The same 80 sequences on every run: the coverage check below (MUST_SEE) is then a fact about the
    # code, not a dice roll. Random seeds once missed the rare `archive, then change it` outcome in CI.
    # Set TESSERA_HYPOTHESIS_RANDOM=1 to explore new sequences locally.
    derandomize=not os.environ.get("TESSERA_HYPOTHESIS_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# Outcomes (substrings of the noted labels) every run of SETTINGS reaches many times over: seeing each
# shows that the rules reach deep states (refused guards, cycles, failed batches), not only bounce off.
MUST_SEE = (
    "create: ok",
    "create retry: ok",
    f"create: {REQUEST_ID_REUSED}",
    "update: ok",
    "update no-op: ok",
    f": {PARENT_CYCLE}",
    f": {ETAG_MISMATCH}",
    f"transition: {TRANSITION_NOT_ALLOWED}",
    f"transition: {TRANSITION_GUARD_FAILED}",
    "transition to in_progress: ok",
    "transition to done: ok",
    f": {RESOURCE_ARCHIVED}",
    "archive: ok",
    "delete: ok",
    "batch of",
    "batch: ",
    "rolled back",
    "workflow todo_active: ok",
    "workflow no_cancel: ok",
)


@pytest.mark.timeout(900)  # a failure's shrinking may take Hypothesis' full five minutes before it reports
def test_random_operations_keep_the_invariants(harness: Harness) -> None:
    seen: Counter[str] = Counter()
    machine = type("WorkflowMachineRun", (WorkflowMachine,), {"harness": harness, "seen": seen})
    run_state_machine_as_test(machine, settings=SETTINGS)
    missing = [outcome for outcome in MUST_SEE if not any(outcome in label for label in seen)]
    assert not missing, f"the run never reached {missing}; outcomes seen: {dict(seen)}"


# --- concurrency: two changes of one item with the same etag -------------------------------------------------


async def _wait_until_blocked(admin: asyncpg.Connection, pid: int) -> None:
    """Until the backend `pid` waits for a lock (a row lock or an advisory lock)."""
    for _ in range(500):
        if await admin.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid) == "Lock":
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"backend {pid} never waited for a lock")


async def _overlapped(
    scene: Scene,
    admin: asyncpg.Connection,
    first: Callable[[UnitOfWork], Awaitable[Item]],
    second: Callable[[UnitOfWork], Awaitable[Item]],
) -> tuple[Item | AppError, Item | AppError]:
    """Run `first` and keep its transaction open until `second` blocks on it; both outcomes."""
    first_done, second_pid = asyncio.Event(), asyncio.get_running_loop().create_future()

    async def run_first() -> Item | AppError:
        try:
            async with scene.db.unit_of_work(scene.member) as uow:
                result = await first(uow)
                first_done.set()
                await _wait_until_blocked(admin, await second_pid)
                return result
        except AppError as error:
            first_done.set()
            return error

    async def run_second() -> Item | AppError:
        await first_done.wait()
        try:
            async with scene.db.unit_of_work(scene.member) as uow:
                second_pid.set_result(uow.driver.get_server_pid())
                return await second(uow)
        except AppError as error:
            return error

    return await asyncio.gather(run_first(), run_second())


def _transition(scene: Scene, item: Item, status: str) -> Callable[[UnitOfWork], Awaitable[Item]]:
    return lambda uow: scene.service.transition_item(
        uow,
        scene.member,
        workspace_id=item.workspace_id,
        project_id=item.project_id,
        item_id=item.id,
        status=status,
        etag=item.etag,
    )


def _update(scene: Scene, item: Item, **values: Any) -> Callable[[UnitOfWork], Awaitable[Item]]:
    update = ItemUpdate(item.workspace_id, item.project_id, item.id, ItemFields(**values), tuple(values), item.etag)
    return lambda uow: scene.service.update_item(uow, scene.member, update=update)


async def _counts(admin: asyncpg.Connection, scene: Scene, item: Item) -> tuple[int, int, int]:
    """The item's version, activity rows and outbox events."""
    version = await admin.fetchval(
        "SELECT version FROM workflow.items WHERE tenant_id = $1 AND id = $2", item.workspace_id, item.id
    )
    activities = await admin.fetchval(
        "SELECT count(*) FROM workflow.activities WHERE tenant_id = $1 AND item_id = $2", item.workspace_id, item.id
    )
    events = [e for e in await outbox_events(admin, tenant=scene.workspace_id) if e.subject == item.name]
    return version, activities, len(events)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("transition", "todo"), ("transition", "cancelled")),
        (("update", "one"), ("update", "two")),
        (("update", "one"), ("transition", "todo")),
        (("transition", "todo"), ("update", "two")),
    ],
)
async def test_concurrent_changes_with_one_etag_one_wins(
    scene: Scene, admin_conn: asyncpg.Connection, first: tuple[str, str], second: tuple[str, str]
) -> None:
    project = await scene.create_project()

    def operation(item: Item, spec: tuple[str, str]) -> Callable[[UnitOfWork], Awaitable[Item]]:
        kind, value = spec
        return _transition(scene, item, value) if kind == "transition" else _update(scene, item, title=value)

    # Overlapped: the second call waits on the first one's row lock, then sees the new version.
    item = await scene.create_item(project, title="zero")
    won, lost = await _overlapped(scene, admin_conn, operation(item, first), operation(item, second))
    assert isinstance(won, Item), won
    assert won.version == 2
    assert isinstance(lost, Aborted), lost
    assert lost.reason == ETAG_MISMATCH
    assert lost.metadata["etag"] == won.etag
    assert await _counts(admin_conn, scene, item) == (2, 2, 2)

    # Raced: whichever commits first wins; the other is ABORTED, and only the winner left traces.
    for _ in range(5):
        item = await scene.create_item(project, title="zero")

        async def attempt(spec: tuple[str, str], target: Item = item) -> Item | AppError:
            try:
                async with scene.db.unit_of_work(scene.member) as uow:
                    return await operation(target, spec)(uow)
            except AppError as error:
                return error

        outcomes = await asyncio.gather(attempt(first), attempt(second))
        winners = [outcome for outcome in outcomes if isinstance(outcome, Item)]
        losers = [outcome for outcome in outcomes if isinstance(outcome, Aborted)]
        assert (len(winners), len(losers)) == (1, 1), outcomes
        assert await _counts(admin_conn, scene, item) == (2, 2, 2)
        final = await scene.get_item(item)
        assert final.etag == winners[0].etag
        assert (final.status, final.title) == (winners[0].status, winners[0].title)


async def test_concurrent_parent_moves_cannot_close_a_cycle(scene: Scene, admin_conn: asyncpg.Connection) -> None:
    project = await scene.create_project()
    for overlapped in (True, False, False, False):
        a = await scene.create_item(project, title="a")
        b = await scene.create_item(project, title="b")
        under_b, under_a = _update(scene, a, parent=b.name), _update(scene, b, parent=a.name)
        if overlapped:  # b's move waits for the parent-change lock a's move holds
            outcomes = list(await _overlapped(scene, admin_conn, under_b, under_a))
        else:

            async def attempt(operation: Callable[[UnitOfWork], Awaitable[Item]]) -> Item | AppError:
                try:
                    async with scene.db.unit_of_work(scene.member) as uow:
                        return await operation(uow)
                except AppError as error:
                    return error

            outcomes = list(await asyncio.gather(attempt(under_b), attempt(under_a)))
        winners = [outcome for outcome in outcomes if isinstance(outcome, Item)]
        losers = [outcome for outcome in outcomes if isinstance(outcome, FailedPrecondition)]
        assert (len(winners), len(losers)) == (1, 1), outcomes
        assert losers[0].reason == PARENT_CYCLE
        parents = {
            row["id"]: row["parent_id"]
            for row in await admin_conn.fetch(
                "SELECT id, parent_id FROM workflow.items WHERE tenant_id = $1 AND id = ANY($2::uuid[])",
                scene.workspace_id,
                [a.id, b.id],
            )
        }
        assert list(parents.values()).count(None) == 1, parents
        for item in (a, b):
            version, activities, events = await _counts(admin_conn, scene, item)
            moved = parents[item.id] is not None
            assert (version, activities, events) == (1 + moved, 1 + moved, 1 + moved)


async def test_concurrent_retries_of_one_create_make_one_item(scene: Scene, admin_conn: asyncpg.Connection) -> None:
    project = await scene.create_project()
    request_id = uuid7()

    def create(uow: UnitOfWork) -> Awaitable[Item]:
        return scene.service.create_item(
            uow,
            scene.member,
            workspace_id=scene.workspace_id,
            project_id=project.id,
            item_id=uuid7(),
            fields=ItemFields(title="once"),
            request_id=request_id,
        )

    # Overlapped: the retry's insert waits on the first one's uncommitted row, then returns that item.
    first, retry = await _overlapped(scene, admin_conn, create, create)
    assert isinstance(first, Item), first
    assert isinstance(retry, Item), retry
    assert retry.id == first.id

    async def attempt() -> Item:
        async with scene.db.unit_of_work(scene.member) as uow:
            return await create(uow)

    raced = await asyncio.gather(*(attempt() for _ in range(4)))
    assert {item.id for item in raced} == {first.id}
    assert await _counts(admin_conn, scene, first) == (1, 1, 1)
    usage = await admin_conn.fetchval(
        "SELECT sum(item_count) FROM workflow.usage WHERE tenant_id = $1", scene.workspace_id
    )
    assert usage == 1


@pytest.mark.parametrize("since", ["parent deleted", "assignee left"])
async def test_a_retried_create_returns_the_first_item(
    scene: Scene, admin_conn: asyncpg.Connection, since: str
) -> None:
    """AIP-155: a retry (same request_id, same payload) returns the first call's item, whatever changed since."""
    project = await scene.create_project()
    parent = await scene.create_item(project, title="parent")
    assignee = await scene.add_member(MEMBER)
    request_id = uuid7()

    async def create() -> Item:
        return await scene.create_item(project, request_id=request_id, title="c", parent=parent.name, assignee=assignee)

    child = await create()
    if since == "parent deleted":
        await scene.mark("delete", parent)
    else:
        await scene.add_member(None, user_id=uuid.UUID(assignee.removeprefix("users/")))
    retried = await create()
    assert retried.id == child.id
    assert await _counts(admin_conn, scene, child) == (1, 1, 1)
