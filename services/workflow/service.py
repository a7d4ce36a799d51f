"""Workflow business rules: projects, items, transitions, the activity log, the entitlement hook.

Every method takes the unit of work and the caller explicitly, `(uow, principal, *, ...)`; none commits.
Each committed change writes its activity log entries and emits exactly one event per changed item (or
project) in the same transaction, so a rolled-back call leaves neither. A call that changes nothing (a
no-op update, a transition to the current state) writes nothing, emits nothing and keeps the etag.

Methods check again what the interceptor already checked (the caller acts in this workspace and its role
grants the permission the contract declares), so the rules hold for any caller of this class.

Concurrency (lock order in `services.workflow.repository`): item changes read the project `FOR KEY SHARE`,
so a project update (`FOR UPDATE`) never sees an item move into a state it is removing; each change locks
its item rows before reading them (several in id order); parent changes of a project are serialised by
an advisory lock so that two concurrent moves cannot close a cycle.
"""

from __future__ import annotations

import functools
import hashlib
import json
import unicodedata
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from services.kit.authz import WORKSPACE, auth_rule_for
from services.kit.context import request_id_var
from services.kit.db import UnitOfWork
from services.kit.errors import AppError, Internal, InvalidArgument
from services.kit.paging import INVALID_PAGE_TOKEN, PageTokenCodec, page_size, query_key
from services.kit.principal import Principal
from services.kit.sql import Query
from services.workflow import errors
from services.workflow.models import (
    API_KEY_NAME_PREFIX,
    CUSTOM_FIELDS_PREFIX,
    DESCRIPTION_MAX_CHARS,
    ITEM_FIELDS,
    LABEL_MAX_CHARS,
    MAX_LABELS,
    PROJECT_DESCRIPTION_MAX_CHARS,
    PROJECT_DISPLAY_NAME_MAX_CHARS,
    TITLE_MAX_CHARS,
    ActivityKind,
    ActivityPage,
    Item,
    ItemCounts,
    ItemFields,
    ItemPage,
    ItemUpdate,
    Priority,
    Project,
    ProjectPage,
    field_value,
    item_message,
    item_name,
    parse_name,
    parse_user_name,
    project_message,
    project_name,
    rfc3339,
    user_name,
)
from services.workflow.query import CompiledList, ItemQuery, compile_count, compile_list
from services.workflow.repository import (
    LISTED_PROJECT_FIELDS,
    ActivityRepository,
    ItemRepository,
    MemberRepository,
    NewActivity,
    ProjectRepository,
    UsageRepository,
    custom_field_types_of,
    with_project_custom_fields,
)
from services.workflow.settings import DEFAULT_MAX_ITEMS_PER_WORKSPACE
from services.workflow.workflow import (
    DEFAULT_WORKFLOW,
    CustomFieldDefinition,
    CustomFieldType,
    Guard,
    StateCategory,
    Workflow,
    custom_field_types,
    custom_fields_to_json,
    validate_custom_field_definitions,
    validate_custom_field_value,
    validate_workflow,
)
from tessera.workflow.v1 import workflow_events_pb2, workflow_service_pb2

PAGE_TOKEN_FIELD = "page_token"  # noqa: S105  # a field name, not a secret
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_BATCH_UPDATES = 100
UPDATABLE_PROJECT_FIELDS: tuple[str, ...] = ("display_name", "description", "workflow", "custom_fields")
GROUPINGS = frozenset({"", "status", "assignee", "label"})
_UNSAVED = datetime(1970, 1, 1, tzinfo=UTC)  # the times of an item not inserted yet (no snapshot holds them)

_SERVICE = workflow_service_pb2.DESCRIPTOR.services_by_name["WorkflowService"]

log = structlog.get_logger("tessera.workflow")


def _workspace_permissions() -> dict[str, str]:
    """The permission each workspace-level RPC declares in the contract (the proto is the one source)."""
    return {
        method.name: rule.permission
        for method in _SERVICE.methods
        if (rule := auth_rule_for(method)) is not None and rule.level == WORKSPACE
    }


def _query_key(method: str, *parts: str) -> bytes:
    return query_key(f"{_SERVICE.full_name}/{method}", *parts)


def actor_name(principal: Principal) -> str:
    """The caller as a resource name: `users/{id}` or `apiKeys/{id}`."""
    if principal.kind == "api_key":
        return f"{API_KEY_NAME_PREFIX}{principal.subject}"
    return user_name(principal.subject)


def fingerprint(payload: Mapping[str, Any]) -> str:
    """A stable hash of a create payload, to tell a retry from a request_id reused for something else."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return "v1:" + hashlib.sha256(canonical.encode()).hexdigest()


def _check_text(value: str, field: str, *, maximum: int, required: bool) -> None:
    if required and not value.strip():
        raise errors.invalid_field(field, "must not be empty or only whitespace")
    if len(value) > maximum:
        raise errors.invalid_field(field, f"must be at most {maximum} characters")


def _check_single_line(value: str, field: str) -> None:
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise errors.invalid_field(field, "must not contain control characters")


def _check_project_display_name(display_name: str) -> None:
    _check_text(display_name, "project.display_name", maximum=PROJECT_DISPLAY_NAME_MAX_CHARS, required=True)
    _check_single_line(display_name, "project.display_name")


def _check_project_description(description: str) -> None:
    _check_text(description, "project.description", maximum=PROJECT_DESCRIPTION_MAX_CHARS, required=False)


def normalize_labels(labels: Iterable[str], *, field: str) -> tuple[str, ...]:
    """Labels trimmed, de-duplicated and sorted; INVALID_ARGUMENT for an empty or too long one or too many."""
    normalized: set[str] = set()
    for index, label in enumerate(labels):
        trimmed = label.strip()
        if not trimmed or len(trimmed) > LABEL_MAX_CHARS:
            raise errors.invalid_field(f"{field}[{index}]", f"must be 1 to {LABEL_MAX_CHARS} characters, not blank")
        _check_single_line(trimmed, f"{field}[{index}]")
        normalized.add(trimmed)
    if len(normalized) > MAX_LABELS:
        raise errors.invalid_field(field, f"must have at most {MAX_LABELS} distinct labels")
    return tuple(sorted(normalized))


@dataclass(frozen=True, slots=True)
class _Change:
    """One changed field of an item: its path and its JSON values before and after."""

    path: str
    before: Any
    after: Any


async def _replayed_item(
    repository: ItemRepository, workspace_id: uuid.UUID, request_id: uuid.UUID, request_fingerprint: str | None
) -> Item | None:
    """The item an earlier CreateItem made under request_id (None if none); ALREADY_EXISTS for another payload."""
    earlier = await repository.find_by_request_id(workspace_id=workspace_id, request_id=request_id)
    if earlier is None:
        return None
    if earlier.request_fingerprint != request_fingerprint:
        raise errors.request_id_reused(request_id, "item")
    return earlier.item


@functools.lru_cache(maxsize=1024)
def _first_page_query(
    query: ItemQuery, field_types: tuple[tuple[str, str], ...], limit: int
) -> tuple[CompiledList, Query]:
    """A ListItems query compiled, with its first page's SQL compiled once (an LRU of recent queries).

    Parsing the filter and compiling the statement cost about 1.5 ms of CPU; a board refreshes the same
    first page of the same project again and again. The key is the whole query (tenant, project,
    filter, order, search, flags), the project's custom field types and the page size, so a hit is
    exactly the statement a miss would compile. Errors are raised, never cached.
    """
    compiled = compile_list(query, dict(field_types))
    return compiled, Query(with_project_custom_fields(compiled.statement(None, limit), query))


# Projects whose custom field types ListItems compiled with last, at most this many remembered.
_LISTED_PROJECTS = 10_000


class WorkflowService:
    """Workflow rules; holds only configuration (page token codec, item limit)."""

    PERMISSIONS: dict[str, str] = _workspace_permissions()

    def __init__(
        self, *, page_tokens: PageTokenCodec, max_items_per_workspace: int = DEFAULT_MAX_ITEMS_PER_WORKSPACE
    ) -> None:
        if max_items_per_workspace <= 0:
            raise ValueError("max_items_per_workspace must be positive")
        self.page_tokens = page_tokens
        self.max_items_per_workspace = max_items_per_workspace
        self._listed_field_types: dict[tuple[uuid.UUID, uuid.UUID], tuple[tuple[str, str], ...]] = {}

    # --- projects ---------------------------------------------------------------------------------------

    async def create_project(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        workspace_id: uuid.UUID,
        project_id: uuid.UUID,
        display_name: str,
        description: str = "",
        workflow: Workflow | None = None,
        custom_fields: Sequence[CustomFieldDefinition] = (),
        request_id: uuid.UUID | None = None,
    ) -> Project:
        """Create a project (the default workflow when none is given); a retried request_id returns the first."""
        self._authorize(principal, workspace_id, "CreateProject", resource=project_name(workspace_id, project_id))
        _check_project_display_name(display_name)
        _check_project_description(description)
        workflow = workflow if workflow is not None else DEFAULT_WORKFLOW
        validate_workflow(workflow, field="project.workflow")
        validate_custom_field_definitions(custom_fields, field="project.custom_fields")
        workflow_json, fields_json = workflow.to_json(), custom_fields_to_json(custom_fields)
        request_fingerprint = None
        if request_id is not None:
            request_fingerprint = fingerprint(
                {
                    "display_name": display_name,
                    "description": description,
                    "workflow": workflow_json,
                    "custom_fields": fields_json,
                }
            )
        repository = ProjectRepository(uow)
        created = await repository.insert(
            workspace_id=workspace_id,
            project_id=project_id,
            display_name=display_name,
            description=description,
            workflow=workflow_json,
            custom_fields=fields_json,
            creator=actor_name(principal),
            request_id=request_id,
            request_fingerprint=request_fingerprint,
        )
        if created is None:
            # Only a request_id conflict skips the insert: a retry (or a reuse) of an earlier call.
            if request_id is None:
                raise Internal("project insert skipped without a request_id")
            earlier = await repository.find_by_request_id(workspace_id=workspace_id, request_id=request_id)
            if earlier is None:
                raise Internal("a conflicting request_id has no project")
            if earlier.request_fingerprint != request_fingerprint:
                raise errors.request_id_reused(request_id, "project")
            return earlier.project
        uow.emit(
            workflow_events_pb2.ProjectCreatedEvent(project=project_message(created)),
            subject=created.name,
            tenant_id=str(workspace_id),
        )
        log.info("project created", project=created.name)
        return created

    async def get_project(
        self, uow: UnitOfWork, principal: Principal, *, workspace_id: uuid.UUID, project_id: uuid.UUID
    ) -> Project:
        """A project of the caller's workspace; NOT_FOUND otherwise."""
        name = project_name(workspace_id, project_id)
        self._authorize(principal, workspace_id, "GetProject", resource=name)
        return await self._project(uow, workspace_id, project_id, missing=name)

    async def list_projects(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        workspace_id: uuid.UUID,
        requested_page_size: int = 0,
        page_token: str = "",
    ) -> ProjectPage:
        """The workspace's projects, oldest first, one keyset page at a time."""
        self._authorize(principal, workspace_id, "ListProjects", resource=f"workspaces/{workspace_id}")
        size = page_size(requested_page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        key = _query_key("ListProjects", str(workspace_id), "create_time asc, id asc")
        issued_to = _issued_to(principal, workspace_id)
        after: tuple[datetime, uuid.UUID] | None = None
        if page_token:
            after = _time_and_id(self.page_tokens.decode(page_token, query_key=key, issued_to=issued_to))
        rows = await ProjectRepository(uow).page(workspace_id=workspace_id, after=after, limit=size + 1)
        page = rows[:size]
        token = ""
        if len(rows) > size:
            last = page[-1]
            token = self.page_tokens.encode(
                [last.create_time.isoformat(), str(last.id)], query_key=key, issued_to=issued_to
            )
        return ProjectPage(page, token)

    async def update_project(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        workspace_id: uuid.UUID,
        project_id: uuid.UUID,
        display_name: str = "",
        description: str = "",
        workflow: Workflow | None = None,
        custom_fields: Sequence[CustomFieldDefinition] = (),
        update_mask: Sequence[str] = (),
        etag: str = "",
    ) -> Project:
        """Change the fields in update_mask (empty or `*`: all); states and custom fields in use must stay.

        Without a mask and without a workflow the workflow is kept; `*` or `workflow` in the mask needs one.
        """
        name = project_name(workspace_id, project_id)
        self._authorize(principal, workspace_id, "UpdateProject", resource=name)
        paths = set(update_mask)
        if not paths and workflow is None:
            # A project always has a workflow: an update without a mask keeps it unless one is given.
            paths = set(UPDATABLE_PROJECT_FIELDS) - {"workflow"}
        elif not paths or "*" in paths:
            paths = (paths - {"*"}) | set(UPDATABLE_PROJECT_FIELDS)
        unknown = sorted(paths - set(UPDATABLE_PROJECT_FIELDS))
        if unknown:
            raise errors.invalid_field(
                "update_mask", f"cannot update {', '.join(unknown)}; only {', '.join(UPDATABLE_PROJECT_FIELDS)}"
            )
        if "display_name" in paths:
            _check_project_display_name(display_name)
        if "description" in paths:
            _check_project_description(description)
        if "workflow" in paths:
            if workflow is None:
                raise errors.invalid_field("project.workflow", "is required when update_mask includes workflow")
            validate_workflow(workflow, field="project.workflow")
        if "custom_fields" in paths:
            validate_custom_field_definitions(custom_fields, field="project.custom_fields")
        repository = ProjectRepository(uow)
        current = await self._project(uow, workspace_id, project_id, missing=name, lock="update")
        _check_etag(name, current.etag, etag)
        new_display_name = display_name if "display_name" in paths else current.display_name
        new_description = description if "description" in paths else current.description
        new_workflow = workflow if "workflow" in paths and workflow is not None else current.workflow
        new_fields = tuple(custom_fields) if "custom_fields" in paths else current.custom_fields
        changed = [
            path
            for path, before, after in (
                ("display_name", current.display_name, new_display_name),
                ("description", current.description, new_description),
                ("workflow", current.workflow.to_json(), new_workflow.to_json()),
                ("custom_fields", custom_fields_to_json(current.custom_fields), custom_fields_to_json(new_fields)),
            )
            if before != after
        ]
        if not changed:
            return current
        if "workflow" in changed:
            await self._check_workflow_change(repository, current, new_workflow)
        if "custom_fields" in changed:
            await self._check_custom_fields_change(repository, current, new_fields)
        updated = await repository.update(
            workspace_id=workspace_id,
            project_id=project_id,
            display_name=new_display_name,
            description=new_description,
            workflow=new_workflow.to_json(),
            custom_fields=custom_fields_to_json(new_fields),
        )
        uow.emit(
            workflow_events_pb2.ProjectUpdatedEvent(project=project_message(updated), changed_fields=changed),
            subject=name,
            tenant_id=str(workspace_id),
        )
        log.info("project updated", project=name, changed_fields=changed)
        return updated

    async def _check_workflow_change(self, repository: ProjectRepository, current: Project, new: Workflow) -> None:
        """FAILED_PRECONDITION if a removed state is in use; re-derives the category of re-categorised states."""
        removed = set(current.workflow.state_ids) - set(new.state_ids)
        if removed:
            used = await repository.states_in_use(
                workspace_id=current.workspace_id, project_id=current.id, states=removed
            )
            if used:
                listed = ",".join(sorted(used))
                raise errors.precondition(
                    current.name,
                    f"the new workflow drops states that items are in: {listed}; move those items first",
                    states_in_use=listed,
                )
        recategorized = {
            state.id: state.category.value
            for state in new.states
            if (old := current.workflow.state(state.id)) is not None and old.category != state.category
        }
        if recategorized:
            await repository.recategorize(
                workspace_id=current.workspace_id, project_id=current.id, categories=recategorized
            )

    async def _check_custom_fields_change(
        self, repository: ProjectRepository, current: Project, new: Sequence[CustomFieldDefinition]
    ) -> None:
        """FAILED_PRECONDITION if a removed or retyped field, or a removed ENUM value, is in use."""
        by_key = {definition.key: definition for definition in new}
        dropped = {
            old.key for old in current.custom_fields if old.key not in by_key or by_key[old.key].type != old.type
        }
        if dropped:
            used = await repository.custom_keys_in_use(
                workspace_id=current.workspace_id, project_id=current.id, keys=dropped
            )
            if used:
                listed = ",".join(sorted(used))
                raise errors.precondition(
                    current.name,
                    f"removed or retyped custom fields still have values on items: {listed}; clear them first",
                    custom_fields_in_use=listed,
                )
        for old in current.custom_fields:
            replacement = by_key.get(old.key)
            if old.type is not CustomFieldType.ENUM or replacement is None or replacement.type != old.type:
                continue
            lost = set(old.allowed_values) - set(replacement.allowed_values)
            if not lost:
                continue
            used = await repository.custom_values_in_use(
                workspace_id=current.workspace_id, project_id=current.id, key=old.key, values=lost
            )
            if used:
                listed = ",".join(sorted(used))
                raise errors.precondition(
                    current.name,
                    f"removed values of custom field {old.key} are still used by items: {listed}",
                    custom_field=old.key,
                    values_in_use=listed,
                )

    # --- items ------------------------------------------------------------------------------------------

    async def create_item(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        workspace_id: uuid.UUID,
        project_id: uuid.UUID,
        item_id: uuid.UUID,
        fields: ItemFields,
        request_id: uuid.UUID | None = None,
    ) -> Item:
        """Create an item in the workflow's initial state; a retried request_id returns the first item.

        The same request_id with another payload is ALREADY_EXISTS; the workspace's item limit is
        RESOURCE_EXHAUSTED (`check_item_quota`).
        """
        parent = project_name(workspace_id, project_id)
        self._authorize(principal, workspace_id, "CreateItem", resource=parent)
        project = await self._project(uow, workspace_id, project_id, missing=parent, lock="share")
        values: dict[str, Any] = {}
        for path in ITEM_FIELDS:
            values.update(self._validated_field(project, fields, path, prefix="item"))
        repository = ItemRepository(uow)
        request_fingerprint = None
        if request_id is not None:
            request_fingerprint = fingerprint({"project": str(project_id), **values})
            # A retry returns the first item whatever changed since (its parent deleted, its assignee
            # gone): the references were checked when it was created.
            earlier = await _replayed_item(repository, workspace_id, request_id, request_fingerprint)
            if earlier is not None:
                return earlier
        await self._check_assignee(uow, project, values["assignee"], field="item.assignee")
        await self._check_parent_exists(uow, project, values["parent_id"], field="item.parent")
        status = project.workflow.initial_state
        category = project.workflow.category_of(status).value
        actor = actor_name(principal)
        # The CREATED entry is written by the same statement as the item: its snapshot comes from the values
        # (Item.snapshot holds no column the database fills in).
        unsaved = Item(
            workspace_id=workspace_id,
            id=item_id,
            project_id=project_id,
            status=status,
            status_category=category,
            creator=actor,
            updater=actor,
            create_time=_UNSAVED,
            update_time=_UNSAVED,
            **values,
        )
        created = await repository.insert(
            workspace_id=workspace_id,
            project_id=project_id,
            item_id=item_id,
            values=values,
            status=status,
            status_category=category,
            actor=actor,
            request_id=request_id,
            request_fingerprint=request_fingerprint,
            snapshot=unsaved.snapshot(),
            log_request_id=request_id_var.get() or "",
        )
        if created is None:  # a concurrent call with the same request_id committed first
            if request_id is None:
                raise Internal("item insert skipped without a request_id")
            earlier = await _replayed_item(repository, workspace_id, request_id, request_fingerprint)
            if earlier is None:
                raise Internal("a conflicting request_id has no item")
            return earlier
        # Last: the usage row is the workspace's hot row, so it is locked for as short a time as possible.
        await self.check_item_quota(uow, workspace_id=workspace_id)
        uow.emit(
            workflow_events_pb2.ItemCreatedEvent(item=item_message(created)),
            subject=created.name,
            tenant_id=str(workspace_id),
        )
        return created

    async def check_item_quota(self, uow: UnitOfWork, *, workspace_id: uuid.UUID) -> None:
        """The entitlement hook: count one more live item, or RESOURCE_EXHAUSTED at the workspace's limit.

        Every path that makes an item live (create, undelete) goes through here; later plans will
        decide the limit per workspace.
        """
        maximum = self.max_items_per_workspace
        if not await UsageRepository(uow).count_item(workspace_id=workspace_id, maximum=maximum):
            log.info("item limit reached", workspace=str(workspace_id), limit=maximum)
            raise errors.limit_exceeded(errors.MAX_ITEMS_LIMIT, maximum)

    async def get_item(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        workspace_id: uuid.UUID,
        project_id: uuid.UUID,
        item_id: uuid.UUID,
    ) -> Item:
        """An item of the caller's workspace, soft-deleted ones included; NOT_FOUND otherwise."""
        name = item_name(workspace_id, project_id, item_id)
        self._authorize(principal, workspace_id, "GetItem", resource=name)
        item = await ItemRepository(uow).get(workspace_id=workspace_id, project_id=project_id, item_id=item_id)
        if item is None:
            raise errors.not_found(name)
        return item

    async def update_item(self, uow: UnitOfWork, principal: Principal, *, update: ItemUpdate) -> Item:
        """Change the fields in update_mask (empty or `*`: all); status moves only through transition_item."""
        self._authorize(principal, update.workspace_id, "UpdateItem", resource=update.name)
        paths = _item_mask(update.update_mask, field="update_mask")
        project = await self._project(uow, update.workspace_id, update.project_id, missing=update.name, lock="share")
        current = await ItemRepository(uow).get(
            workspace_id=update.workspace_id, project_id=update.project_id, item_id=update.item_id, lock=True
        )
        return await self._apply_update(uow, principal, project, current, update, paths, prefix="")

    async def batch_update_items(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        workspace_id: uuid.UUID,
        project_id: uuid.UUID,
        updates: Sequence[ItemUpdate],
    ) -> list[Item]:
        """Apply up to 100 updates to items of one project in this one transaction: all of them or none."""
        parent = project_name(workspace_id, project_id)
        self._authorize(principal, workspace_id, "BatchUpdateItems", resource=parent)
        if not updates or len(updates) > MAX_BATCH_UPDATES:
            raise errors.invalid_field("requests", f"must have 1 to {MAX_BATCH_UPDATES} updates")
        seen: dict[uuid.UUID, int] = {}
        masks = []
        for index, update in enumerate(updates):
            field = f"requests[{index}].item.name"
            if (update.workspace_id, update.project_id) != (workspace_id, project_id):
                raise errors.invalid_field(field, f"must be an item of {parent}")
            if update.item_id in seen:
                raise errors.invalid_field(field, f"names the same item as requests[{seen[update.item_id]}]")
            seen[update.item_id] = index
            masks.append(_item_mask(update.update_mask, field=f"requests[{index}].update_mask"))
        project = await self._project(uow, workspace_id, project_id, missing=parent, lock="share")
        locked = await ItemRepository(uow).lock_many(
            workspace_id=workspace_id, project_id=project_id, item_ids=[update.item_id for update in updates]
        )
        results = []
        for index, (update, paths) in enumerate(zip(updates, masks, strict=True)):
            try:
                results.append(
                    await self._apply_update(
                        uow, principal, project, locked.get(update.item_id), update, paths, prefix=f"requests[{index}]."
                    )
                )
            except AppError as error:
                _name_request(error, index)
                raise
        return results

    async def _apply_update(
        self,
        uow: UnitOfWork,
        principal: Principal,
        project: Project,
        current: Item | None,
        update: ItemUpdate,
        paths: Sequence[str],
        *,
        prefix: str,
    ) -> Item:
        """One validated update of a locked item; `prefix` names the request in a batch (`requests[3].`)."""
        if current is None or current.deleted:
            raise errors.not_found(update.name)
        if current.archived:
            raise errors.archived(current.name, "be updated")
        _check_etag(current.name, current.etag, update.etag)
        values = _current_values(current)
        for path in _checked_paths(paths, project, field=f"{prefix}update_mask"):
            values.update(self._validated_field(project, update.fields, path, prefix=f"{prefix}item"))
        changes = _changes(current, values)
        if not changes:
            return current
        changed = {change.path.partition(".")[0] for change in changes}
        if "assignee" in changed:
            await self._check_assignee(uow, project, values["assignee"], field=f"{prefix}item.assignee")
        if "parent" in changed and values["parent_id"] is not None:
            await self._check_parent(uow, project, current, values["parent_id"], field=f"{prefix}item.parent")
        updated = await ItemRepository(uow).update_fields(
            workspace_id=current.workspace_id,
            project_id=current.project_id,
            item_id=current.id,
            values=values,
            actor=actor_name(principal),
        )
        await self._record(
            uow,
            principal,
            [NewActivity(updated, ActivityKind.UPDATED, c.path, c.before, c.after) for c in changes],
        )
        uow.emit(
            workflow_events_pb2.ItemUpdatedEvent(
                item=item_message(updated), changed_fields=[change.path for change in changes]
            ),
            subject=updated.name,
            tenant_id=str(updated.workspace_id),
        )
        return updated

    async def transition_item(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        workspace_id: uuid.UUID,
        project_id: uuid.UUID,
        item_id: uuid.UUID,
        status: str,
        etag: str = "",
    ) -> Item:
        """Move an item along a transition of its workflow once every guard holds."""
        name = item_name(workspace_id, project_id, item_id)
        self._authorize(principal, workspace_id, "TransitionItem", resource=name)
        project = await self._project(uow, workspace_id, project_id, missing=name, lock="share")
        repository = ItemRepository(uow)
        item = await repository.get(workspace_id=workspace_id, project_id=project_id, item_id=item_id, lock=True)
        if item is None or item.deleted:
            raise errors.not_found(name)
        if item.archived:
            raise errors.archived(name, "change its status")
        _check_etag(name, item.etag, etag)
        workflow = project.workflow
        target = workflow.state(status)
        if target is None:
            states = ", ".join(workflow.state_ids)
            raise errors.invalid_field("status", f"is not a state of {project.name} (states: {states})")
        if status == item.status:
            return item
        transition = workflow.check_transition(item.status, status)
        if transition is None:
            raise errors.transition_not_allowed(name, item.status, status, workflow.allowed_next(item.status))
        for guard in transition.guards:
            await self._check_guard(repository, item, guard)
        moved = await repository.set_status(
            workspace_id=workspace_id,
            project_id=project_id,
            item_id=item_id,
            status=status,
            status_category=target.category.value,
            actor=actor_name(principal),
        )
        await self._record(
            uow, principal, [NewActivity(moved, ActivityKind.TRANSITIONED, "status", item.status, status)]
        )
        uow.emit(
            workflow_events_pb2.ItemTransitionedEvent(
                item=item_message(moved), from_status=item.status, to_status=status
            ),
            subject=name,
            tenant_id=str(workspace_id),
        )
        return moved

    @staticmethod
    async def _check_guard(repository: ItemRepository, item: Item, guard: Guard) -> None:
        if guard is Guard.ASSIGNEE_REQUIRED:
            if item.assignee is None:
                raise errors.guard_failed(item.name, guard.value, "the item needs an assignee")
        elif guard is Guard.SUBITEMS_CLOSED:
            categories = await repository.subitem_categories(workspace_id=item.workspace_id, item_id=item.id)
            still_open = sum(1 for category in categories if not StateCategory(category).closed)
            if still_open:
                raise errors.guard_failed(
                    item.name, guard.value, f"{still_open} sub-item(s) are not in a DONE or CANCELLED state"
                )
        else:
            raise Internal(f"unknown guard {guard}")

    async def archive_item(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        workspace_id: uuid.UUID,
        project_id: uuid.UUID,
        item_id: uuid.UUID,
        etag: str = "",
    ) -> Item:
        """Archive an item: readable, but refusing updates and transitions until unarchived."""
        item = await self._locked_live(uow, principal, "ArchiveItem", workspace_id, project_id, item_id, etag)
        if item.archived:
            raise errors.archived(item.name, "be archived again")
        return await self._mark(uow, principal, item, ActivityKind.ARCHIVED)

    async def unarchive_item(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        workspace_id: uuid.UUID,
        project_id: uuid.UUID,
        item_id: uuid.UUID,
        etag: str = "",
    ) -> Item:
        """Unarchive an archived item; FAILED_PRECONDITION if it is not archived."""
        item = await self._locked_live(uow, principal, "UnarchiveItem", workspace_id, project_id, item_id, etag)
        if not item.archived:
            raise errors.precondition(item.name, "is not archived", resource=item.name)
        return await self._mark(uow, principal, item, ActivityKind.UNARCHIVED)

    async def delete_item(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        workspace_id: uuid.UUID,
        project_id: uuid.UUID,
        item_id: uuid.UUID,
        etag: str = "",
    ) -> Item:
        """Soft-delete an item (AIP-164); it no longer counts against the workspace's limit."""
        item = await self._locked_live(uow, principal, "DeleteItem", workspace_id, project_id, item_id, etag)
        deleted = await self._mark(uow, principal, item, ActivityKind.DELETED)
        await UsageRepository(uow).uncount_item(workspace_id=workspace_id)
        return deleted

    async def undelete_item(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        workspace_id: uuid.UUID,
        project_id: uuid.UUID,
        item_id: uuid.UUID,
    ) -> Item:
        """Restore a soft-deleted item; FAILED_PRECONDITION if it is live, RESOURCE_EXHAUSTED at the limit."""
        name = item_name(workspace_id, project_id, item_id)
        self._authorize(principal, workspace_id, "UndeleteItem", resource=name)
        await self._project(uow, workspace_id, project_id, missing=name, lock="share")
        item = await ItemRepository(uow).get(
            workspace_id=workspace_id, project_id=project_id, item_id=item_id, lock=True
        )
        if item is None:
            raise errors.not_found(name)
        if not item.deleted:
            raise errors.precondition(name, "is not deleted", resource=name)
        restored = await self._mark(uow, principal, item, ActivityKind.UNDELETED)
        await self.check_item_quota(uow, workspace_id=workspace_id)
        return restored

    async def _locked_live(
        self,
        uow: UnitOfWork,
        principal: Principal,
        method: str,
        workspace_id: uuid.UUID,
        project_id: uuid.UUID,
        item_id: uuid.UUID,
        etag: str,
    ) -> Item:
        """The item locked after the permission and etag checks; NOT_FOUND if absent or deleted."""
        name = item_name(workspace_id, project_id, item_id)
        self._authorize(principal, workspace_id, method, resource=name)
        await self._project(uow, workspace_id, project_id, missing=name, lock="share")
        item = await ItemRepository(uow).get(
            workspace_id=workspace_id, project_id=project_id, item_id=item_id, lock=True
        )
        if item is None or item.deleted:
            raise errors.not_found(name)
        _check_etag(name, item.etag, etag)
        return item

    async def _mark(self, uow: UnitOfWork, principal: Principal, item: Item, kind: ActivityKind) -> Item:
        """Archive/unarchive/delete/undelete a locked item, with its activity entry and event."""
        marked = await ItemRepository(uow).mark(
            kind,
            workspace_id=item.workspace_id,
            project_id=item.project_id,
            item_id=item.id,
            actor=actor_name(principal),
        )
        await self._record(uow, principal, [NewActivity(marked, kind)])
        event = {
            ActivityKind.ARCHIVED: workflow_events_pb2.ItemArchivedEvent,
            ActivityKind.UNARCHIVED: workflow_events_pb2.ItemUnarchivedEvent,
            ActivityKind.DELETED: workflow_events_pb2.ItemDeletedEvent,
            ActivityKind.UNDELETED: workflow_events_pb2.ItemUndeletedEvent,
        }[kind]
        uow.emit(event(item=item_message(marked)), subject=marked.name, tenant_id=str(marked.workspace_id))
        return marked

    # --- queries ----------------------------------------------------------------------------------------

    async def list_items(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        workspace_id: uuid.UUID,
        project_id: uuid.UUID,
        filter: str = "",  # the AIP-160 field name
        order_by: str = "",
        search: str = "",
        show_deleted: bool = False,
        show_archived: bool = False,
        requested_page_size: int = 0,
        page_token: str = "",
    ) -> ItemPage:
        """A project's items matching filter and search, in order_by order, one keyset page at a time.

        The filter compiles against the project's custom field types. Once a project has been listed, the
        types it had are remembered, and the page is read with the project's definitions beside it, in
        one statement (one round trip fewer): if they still give those types, the page stands. A page
        that cannot say (no rows, or the project gone), stale types or a request the remembered types
        refuse is answered as on a project's first listing: read the project (NOT_FOUND first), then
        compile with its types.
        """
        parent = project_name(workspace_id, project_id)
        self._authorize(principal, workspace_id, "ListItems", resource=parent)
        size = page_size(requested_page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        query = ItemQuery(
            tenant_id=workspace_id,
            project_id=project_id,
            filter=filter,
            order_by=order_by,
            search=search,
            show_deleted=show_deleted,
            show_archived=show_archived,
        )
        issued_to = _issued_to(principal, workspace_id)
        remembered = self._listed_field_types.get((workspace_id, project_id))
        if remembered is not None:
            try:
                page = await self._item_page(uow, query, remembered, size, page_token, issued_to, checked=False)
            except InvalidArgument:
                page = None  # perhaps only under stale types; and a missing project's NOT_FOUND comes first
            if page is not None:
                return page
        project = await self._project(uow, workspace_id, project_id, missing=parent)
        field_types = tuple(sorted(custom_field_types(project.custom_fields).items()))
        if len(self._listed_field_types) >= _LISTED_PROJECTS:
            self._listed_field_types.clear()
        self._listed_field_types[workspace_id, project_id] = field_types
        page = await self._item_page(uow, query, field_types, size, page_token, issued_to, checked=True)
        assert page is not None
        return page

    async def _item_page(
        self,
        uow: UnitOfWork,
        query: ItemQuery,
        field_types: tuple[tuple[str, str], ...],
        size: int,
        page_token: str,
        issued_to: str,
        *,
        checked: bool,
    ) -> ItemPage | None:
        """One page compiled with `field_types`; unless `checked` (the caller read the project), None when
        the rows do not show that the project still has those types."""
        compiled, first_page = _first_page_query(query, field_types, size + 1)
        key = _query_key("ListItems", *compiled.key_parts)
        if page_token:
            after = self.page_tokens.decode(page_token, query_key=key, issued_to=issued_to)
            rows = await uow.fetch(with_project_custom_fields(compiled.statement(after, size + 1), query))
        else:
            rows = await uow.fetch(first_page)
        if not checked:
            definitions = rows[0][LISTED_PROJECT_FIELDS] if rows else None
            if definitions is None or custom_field_types_of(definitions) != field_types:
                return None
        token = ""
        if len(rows) > size:
            token = self.page_tokens.encode(compiled.cursor(rows[size - 1]), query_key=key, issued_to=issued_to)
        return ItemPage(rows[:size], token)

    async def count_items(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        workspace_id: uuid.UUID,
        project_id: uuid.UUID,
        filter: str = "",  # the AIP-160 field name
        search: str = "",
        group_by: str = "",
        show_archived: bool = False,
    ) -> ItemCounts:
        """How many of a project's items match, grouped by status, assignee or label ("" for one group)."""
        parent = project_name(workspace_id, project_id)
        self._authorize(principal, workspace_id, "CountItems", resource=parent)
        if group_by not in GROUPINGS:
            raise errors.invalid_field("group_by", "must be status, assignee, label or unspecified")
        project = await self._project(uow, workspace_id, project_id, missing=parent)
        query = ItemQuery(
            tenant_id=workspace_id, project_id=project_id, filter=filter, search=search, show_archived=show_archived
        )
        types = custom_field_types(project.custom_fields)
        rows = await uow.fetch(compile_count(query, types, group_by))
        counts = [(str(row["key"]), int(row["count"])) for row in rows]
        if group_by == "label":  # an item with several labels counts in several groups
            total = int((await uow.fetch(compile_count(query, types, "")))[0]["count"])
        else:
            total = sum(count for _, count in counts)
        return ItemCounts(counts, total)

    async def list_item_activities(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        workspace_id: uuid.UUID,
        project_id: uuid.UUID,
        item_id: uuid.UUID,
        requested_page_size: int = 0,
        page_token: str = "",
    ) -> ActivityPage:
        """An item's activity log, oldest first (soft-deleted items' too)."""
        name = item_name(workspace_id, project_id, item_id)
        self._authorize(principal, workspace_id, "ListItemActivities", resource=name)
        item = await ItemRepository(uow).get(workspace_id=workspace_id, project_id=project_id, item_id=item_id)
        if item is None:
            raise errors.not_found(name)
        size = page_size(requested_page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        key = _query_key("ListItemActivities", name, "id asc")
        issued_to = _issued_to(principal, workspace_id)
        after = None
        if page_token:
            [last_id] = _uuids(self.page_tokens.decode(page_token, query_key=key, issued_to=issued_to), count=1)
            after = last_id
        rows = await ActivityRepository(uow).page(
            workspace_id=workspace_id, item_id=item_id, after=after, limit=size + 1
        )
        page = rows[:size]
        token = ""
        if len(rows) > size:
            token = self.page_tokens.encode([str(page[-1].id)], query_key=key, issued_to=issued_to)
        return ActivityPage(page, token)

    # --- the members read model -------------------------------------------------------------------------

    async def record_membership(
        self,
        uow: UnitOfWork,
        *,
        workspace_id: uuid.UUID,
        user_id: uuid.UUID,
        role: str | None,
        change_time: datetime,
    ) -> bool:
        """Store a membership change (role None: it ended) unless a newer one is stored; whether it was stored.

        Events may arrive twice or out of order: the newest change_time wins, so an old event never
        revives an ended membership. The unit of work must be opened for the workspace.
        """
        if uow.tenant_id is None or uuid.UUID(uow.tenant_id) != workspace_id:
            raise Internal(f"unit of work opened for tenant {uow.tenant_id}, not workspaces/{workspace_id}")
        return await MemberRepository(uow).record(
            workspace_id=workspace_id, user_id=user_id, role=role or None, change_time=change_time
        )

    # --- helpers ----------------------------------------------------------------------------------------

    def _authorize(self, principal: Principal, workspace_id: uuid.UUID, method: str, *, resource: str) -> None:
        """NOT_FOUND unless the caller acts in this workspace; PERMISSION_DENIED unless its role allows the RPC."""
        principal.require_tenant(str(workspace_id), resource=resource)
        permission = self.PERMISSIONS[method]
        if not principal.has_permission(permission):
            raise errors.missing_permission(permission)

    @staticmethod
    async def _project(
        uow: UnitOfWork, workspace_id: uuid.UUID, project_id: uuid.UUID, *, missing: str, lock: str = ""
    ) -> Project:
        project = await ProjectRepository(uow).get(workspace_id=workspace_id, project_id=project_id, lock=lock)
        if project is None:
            raise errors.not_found(missing)
        return project

    async def _record(self, uow: UnitOfWork, principal: Principal, entries: Sequence[NewActivity]) -> None:
        workspace_id = entries[0].item.workspace_id
        await ActivityRepository(uow).record(
            entries, workspace_id=workspace_id, actor=actor_name(principal), request_id=request_id_var.get() or ""
        )

    @staticmethod
    def _validated_field(project: Project, fields: ItemFields, path: str, *, prefix: str) -> dict[str, Any]:
        """The column value(s) one update_mask path sets, validated; errors name `{prefix}.{field}`."""
        field = f"{prefix}.{path}"
        if path == "title":
            _check_text(fields.title, field, maximum=TITLE_MAX_CHARS, required=True)
            _check_single_line(fields.title, field)
            return {"title": fields.title}
        if path == "description":
            _check_text(fields.description, field, maximum=DESCRIPTION_MAX_CHARS, required=False)
            return {"description": fields.description}
        if path == "priority":
            if fields.priority not in set(Priority):
                raise errors.invalid_field(field, "must be a defined Priority")
            return {"priority": Priority(fields.priority)}
        if path == "assignee":
            if not fields.assignee:
                return {"assignee": None}
            user_id = parse_user_name(fields.assignee)
            if user_id is None:
                raise errors.invalid_field(field, "must be a user name: users/{uuid}, or empty")
            return {"assignee": user_id}
        if path == "labels":
            return {"labels": normalize_labels(fields.labels, field=field)}
        if path == "due_time":
            return {"due_time": fields.due_time}
        if path == "parent":
            return {"parent_id": _parent_id(project, fields.parent, field=field)}
        if path == "custom_fields":
            values = {}
            for key, value in fields.custom_fields.items():
                definition = project.custom_field(key)
                if definition is None:
                    raise errors.invalid_field(f"{field}.{key}", f"is not a custom field of {project.name}")
                if value is not None:
                    values[key] = validate_custom_field_value(definition, value, path=f"{field}.{key}")
            return {"custom_fields": values}
        if path.startswith(CUSTOM_FIELDS_PREFIX):
            key = path.removeprefix(CUSTOM_FIELDS_PREFIX)
            definition = project.custom_field(key)
            assert definition is not None, "custom field paths are checked against the project first"
            value = fields.custom_fields.get(key)
            if value is None:
                return {CUSTOM_FIELDS_PREFIX + key: None}
            return {CUSTOM_FIELDS_PREFIX + key: validate_custom_field_value(definition, value, path=field)}
        raise Internal(f"no rule for item field {path}")

    @staticmethod
    async def _check_assignee(uow: UnitOfWork, project: Project, assignee: uuid.UUID | None, *, field: str) -> None:
        if assignee is None:
            return
        if not await MemberRepository(uow).is_member(workspace_id=project.workspace_id, user_id=assignee):
            raise errors.invalid_field(
                field, f"{user_name(assignee)} is not a member of workspaces/{project.workspace_id}"
            )

    @staticmethod
    async def _check_parent_exists(
        uow: UnitOfWork, project: Project, parent_id: uuid.UUID | None, *, field: str
    ) -> None:
        if parent_id is None:
            return
        exists = await ItemRepository(uow).live_exists(
            workspace_id=project.workspace_id, project_id=project.id, item_id=parent_id
        )
        if not exists:
            name = item_name(project.workspace_id, project.id, parent_id)
            raise errors.invalid_field(field, f"{name} is not a live item of {project.name}")

    async def _check_parent(
        self, uow: UnitOfWork, project: Project, item: Item, parent_id: uuid.UUID, *, field: str
    ) -> None:
        """The new parent is live and not the item or one of its descendants (PARENT_CYCLE)."""
        parent = item_name(project.workspace_id, project.id, parent_id)
        if parent_id == item.id:
            raise errors.parent_cycle(item.name, parent)
        await self._check_parent_exists(uow, project, parent_id, field=field)
        repository = ItemRepository(uow)
        await repository.lock_parent_changes(project_id=project.id)
        if await repository.is_ancestor_or_self(workspace_id=item.workspace_id, item_id=item.id, start=parent_id):
            raise errors.parent_cycle(item.name, parent)


def _issued_to(principal: Principal, workspace_id: uuid.UUID) -> str:
    """Whom a page token is bound to: the workspace and the caller in it."""
    return f"{workspace_id}/{principal.subject}"


def _invalid_token() -> InvalidArgument:
    return InvalidArgument.for_field(
        PAGE_TOKEN_FIELD, "page token is not valid for this query", reason=INVALID_PAGE_TOKEN
    )


def _time_and_id(values: Sequence[str]) -> tuple[datetime, uuid.UUID]:
    try:
        time_text, id_text = values
        last_time = datetime.fromisoformat(time_text)
        if last_time.tzinfo is None:
            raise ValueError("naive timestamp")
        return last_time, uuid.UUID(id_text)
    except ValueError:
        raise _invalid_token() from None


def _uuids(values: Sequence[str], *, count: int) -> list[uuid.UUID]:
    try:
        if len(values) != count:
            raise ValueError("wrong cursor length")
        return [uuid.UUID(value) for value in values]
    except ValueError:
        raise _invalid_token() from None


def _check_etag(name: str, current: str, etag: str) -> None:
    if etag and etag != current:
        raise errors.etag_mismatch(name, etag, current)


def _name_request(error: AppError, index: int) -> None:
    """Say which request of a batch failed (field violations already name it)."""
    error.message = f"requests[{index}]: {error.message}"
    error.metadata.setdefault("request_index", str(index))


def _item_mask(update_mask: Sequence[str], *, field: str) -> list[str]:
    """The update_mask paths (empty or `*`: every field); INVALID_ARGUMENT for status or an unknown path."""
    paths = list(dict.fromkeys(update_mask))
    if not paths or "*" in paths:
        return list(ITEM_FIELDS)
    for path in paths:
        if path == "status":
            raise errors.invalid_field(field, "status cannot be updated: use TransitionItem")
        if path not in ITEM_FIELDS and not (
            path.startswith(CUSTOM_FIELDS_PREFIX) and len(path) > len(CUSTOM_FIELDS_PREFIX)
        ):
            allowed = ", ".join((*ITEM_FIELDS, "custom_fields.<key>"))
            raise errors.invalid_field(field, f"cannot update {path}; updatable: {allowed}")
    return paths


def _checked_paths(paths: Sequence[str], project: Project, *, field: str) -> list[str]:
    """The paths with every `custom_fields.<key>` checked against the project's definitions."""
    for path in paths:
        if path.startswith(CUSTOM_FIELDS_PREFIX):
            key = path.removeprefix(CUSTOM_FIELDS_PREFIX)
            if project.custom_field(key) is None:
                raise errors.invalid_field(field, f"{path}: {key} is not a custom field of {project.name}")
    return list(paths)


def _current_values(item: Item) -> dict[str, Any]:
    return {
        "title": item.title,
        "description": item.description,
        "priority": item.priority,
        "assignee": item.assignee,
        "labels": item.labels,
        "due_time": item.due_time,
        "custom_fields": dict(item.custom_fields),
        "parent_id": item.parent_id,
    }


def _changes(item: Item, values: dict[str, Any]) -> list[_Change]:
    """Fold single custom field paths into `custom_fields` and list what differs from the item, field by field.

    Custom fields are compared key by key and reported as `custom_fields.<key>`.
    """
    custom = values["custom_fields"]
    for path in [path for path in values if path.startswith(CUSTOM_FIELDS_PREFIX)]:
        key, value = path.removeprefix(CUSTOM_FIELDS_PREFIX), values.pop(path)
        if value is None:
            custom.pop(key, None)
        else:
            custom[key] = value
    changes = []
    for path in ITEM_FIELDS:
        if path == "custom_fields":
            for key in sorted(set(item.custom_fields) | set(custom)):
                before, after = item.custom_fields.get(key), custom.get(key)
                if not _same_json(before, after):
                    changes.append(_Change(CUSTOM_FIELDS_PREFIX + key, before, after))
            continue
        before = field_value(item, path)
        after = _json_of(path, values, item)
        if before != after:
            changes.append(_Change(path, before, after))
    return changes


def _json_of(path: str, values: Mapping[str, Any], item: Item) -> Any:
    """The activity (JSON) form of a new column value."""
    if path == "priority":
        return f"PRIORITY_{Priority(values['priority']).name}"
    if path == "assignee":
        return user_name(values["assignee"]) if values["assignee"] else None
    if path == "labels":
        return list(values["labels"])
    if path == "due_time":
        return rfc3339(values["due_time"]) if values["due_time"] else None
    if path == "parent":
        parent_id = values["parent_id"]
        return item_name(item.workspace_id, item.project_id, parent_id) if parent_id else None
    return values[path]


def _same_json(a: Any, b: Any) -> bool:
    """JSON equality: 3 and 3.0 are the same number, but true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


def _parent_id(project: Project, parent: str, *, field: str) -> uuid.UUID | None:
    if not parent:
        return None
    ids = parse_name(parent, ("projects", "items"))
    if ids is None:
        raise errors.invalid_field(field, "must be an item name: workspaces/{ws}/projects/{p}/items/{item}, or empty")
    workspace_id, project_id, item_id = ids
    if (workspace_id, project_id) != (project.workspace_id, project.id):
        raise errors.invalid_field(field, f"must be an item of {project.name}")
    return item_id
