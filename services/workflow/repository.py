"""All SQL of the workflow service: SQLAlchemy Core statements compiled once (`Query`), run in the unit of work.

Every statement names the tenant itself, even though row-level security enforces the same rule: RLS is
the backstop, not the only check. Times come from the database (`now()`, the transaction's start), so
every row a transaction writes carries the same time. JSONB values are written as JSON text and read
back as Python values (the driver's jsonb codec), except a project's workflow and custom field
definitions: they are read as text and parsed once per distinct text (every item change and list reads
its project). Nothing here commits.

Lock order, followed by every caller to stay free of deadlocks: the project row (`FOR KEY SHARE` by item
changes, `FOR UPDATE` by project updates), then item rows (`FOR NO KEY UPDATE`, several in id order),
then the project's parent-change advisory lock, then the workspace's usage row. Item rows are locked
`FOR NO KEY UPDATE`, the lock an UPDATE of them takes anyway: it serialises changes of one item but not
the `FOR KEY SHARE` that the items → parent foreign key takes when a sub-item is created or moved under
a locked item, so those never wait in a cycle with a batch holding the parent.
"""

from __future__ import annotations

import functools
import json
import random
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert as pg_insert

from services.kit.db import UnitOfWork
from services.kit.errors import Aborted
from services.kit.ids import uuid7
from services.kit.sql import Query
from services.workflow.models import (
    ITEM_COLUMNS,
    Activity,
    ActivityKind,
    Item,
    Project,
    activities,
    item_from_row,
    items,
    members,
    projects,
    usage,
)
from services.workflow.query import ItemQuery
from services.workflow.workflow import (
    CustomFieldDefinition,
    Workflow,
    custom_field_types,
    custom_fields_from_json,
)

Cursor = tuple[datetime, uuid.UUID]

_NOW = sa.func.now()
_JSONB = postgresql.JSONB


def to_json(value: Any) -> str:
    """JSON text for a JSONB parameter (compact, keys sorted)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# --- projects ----------------------------------------------------------------------------------------------

_PROJECT_COLUMNS = (
    projects.c.tenant_id,
    projects.c.id,
    projects.c.display_name,
    projects.c.description,
    # As text: `_project` parses each distinct definition once (see `_parsed_workflow`).
    sa.cast(projects.c.workflow, sa.Text).label("workflow"),
    sa.cast(projects.c.custom_fields, sa.Text).label("custom_fields"),
    projects.c.creator,
    projects.c.create_time,
    projects.c.update_time,
    projects.c.version,
)


@functools.lru_cache(maxsize=4096)
def _parsed_workflow(text: str) -> Workflow:
    """A stored workflow, parsed once per distinct JSON text (`Workflow` is immutable, so it can be shared)."""
    return Workflow.from_json(json.loads(text))


@functools.lru_cache(maxsize=4096)
def _parsed_custom_fields(text: str) -> tuple[CustomFieldDefinition, ...]:
    """Stored custom field definitions, parsed once per distinct JSON text (immutable, like workflows)."""
    return custom_fields_from_json(json.loads(text))


def _project(row: Mapping[str, Any]) -> Project:
    return Project(
        workspace_id=row["tenant_id"],
        id=row["id"],
        display_name=row["display_name"],
        description=row["description"],
        workflow=_parsed_workflow(row["workflow"]),
        custom_fields=_parsed_custom_fields(row["custom_fields"]),
        creator=row["creator"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        version=row["version"],
    )


# The column `with_project_custom_fields` adds to a list statement.
LISTED_PROJECT_FIELDS = "listed_project_custom_fields"


def with_project_custom_fields(statement: sa.Select[Any], query: ItemQuery) -> sa.Select[Any]:
    """A list statement of `query` plus the column LISTED_PROJECT_FIELDS: its project's custom field
    definitions as JSON text (NULL if the project is not there), read in the same snapshot as the rows."""
    definitions = (
        sa.select(sa.cast(projects.c.custom_fields, sa.Text))
        .where(
            projects.c.tenant_id == sa.bindparam("listed_project_tenant", query.tenant_id, type_=sa.Uuid),
            projects.c.id == sa.bindparam("listed_project_id", query.project_id, type_=sa.Uuid),
        )
        .scalar_subquery()
    )
    return statement.add_columns(definitions.label(LISTED_PROJECT_FIELDS))


@functools.lru_cache(maxsize=4096)
def custom_field_types_of(text: str) -> tuple[tuple[str, str], ...]:
    """`(key, type name)` pairs, sorted, of stored custom field definitions (JSON text)."""
    return tuple(sorted(custom_field_types(_parsed_custom_fields(text)).items()))


@dataclass(frozen=True, slots=True)
class IdempotentProject:
    """A project found under a request_id, with the fingerprint of the payload that created it."""

    project: Project
    request_fingerprint: str | None


_PROJECT_KEY = sa.and_(projects.c.tenant_id == sa.bindparam("tenant"), projects.c.id == sa.bindparam("id"))

_INSERT_PROJECT = Query(
    pg_insert(projects)
    .values(
        tenant_id=sa.bindparam("tenant"),
        id=sa.bindparam("id"),
        display_name=sa.bindparam("display_name"),
        description=sa.bindparam("description"),
        workflow=sa.bindparam("workflow", type_=_JSONB),
        custom_fields=sa.bindparam("custom_fields", type_=_JSONB),
        creator=sa.bindparam("creator"),
        request_id=sa.bindparam("request_id", type_=sa.Uuid),
        request_fingerprint=sa.bindparam("request_fingerprint", type_=sa.Text),
    )
    .on_conflict_do_nothing(
        index_elements=[projects.c.tenant_id, projects.c.request_id],
        index_where=projects.c.request_id.is_not(None),
    )
    .returning(*_PROJECT_COLUMNS)
)
_PROJECT_BY_REQUEST_ID = Query(
    sa.select(*_PROJECT_COLUMNS, projects.c.request_fingerprint).where(
        projects.c.tenant_id == sa.bindparam("tenant"), projects.c.request_id == sa.bindparam("request_id")
    )
)
_GET_PROJECT = Query(sa.select(*_PROJECT_COLUMNS).where(_PROJECT_KEY))
_LOCK_PROJECT = Query(sa.select(*_PROJECT_COLUMNS).where(_PROJECT_KEY).with_for_update())
# What item changes take: it keeps the workflow from changing under them (UpdateProject locks FOR UPDATE)
# and is the lock the items → projects foreign key takes anyway.
_SHARE_PROJECT = Query(sa.select(*_PROJECT_COLUMNS).where(_PROJECT_KEY).with_for_update(read=True, key_share=True))
_UPDATE_PROJECT = Query(
    sa.update(projects)
    .where(_PROJECT_KEY)
    .values(
        display_name=sa.bindparam("display_name"),
        description=sa.bindparam("description"),
        workflow=sa.bindparam("workflow", type_=_JSONB),
        custom_fields=sa.bindparam("custom_fields", type_=_JSONB),
        update_time=_NOW,
        version=projects.c.version + 1,
    )
    .returning(*_PROJECT_COLUMNS)
)
_OLDEST_PROJECTS_FIRST = (projects.c.create_time.asc(), projects.c.id.asc())
_LIST_PROJECTS = sa.select(*_PROJECT_COLUMNS).where(projects.c.tenant_id == sa.bindparam("tenant"))
_LIST_PROJECTS_FIRST = Query(_LIST_PROJECTS.order_by(*_OLDEST_PROJECTS_FIRST).limit(sa.bindparam("limit")))
_LIST_PROJECTS_AFTER = Query(
    _LIST_PROJECTS.where(
        sa.tuple_(projects.c.create_time, projects.c.id)
        > sa.tuple_(
            sa.bindparam("last_time", type_=projects.c.create_time.type),
            sa.bindparam("last_id", type_=projects.c.id.type),
        )
    )
    .order_by(*_OLDEST_PROJECTS_FIRST)
    .limit(sa.bindparam("limit"))
)

_IN_PROJECT = sa.and_(items.c.tenant_id == sa.bindparam("tenant"), items.c.project_id == sa.bindparam("project"))
_STATES_IN_USE = Query(
    sa.select(items.c.status)
    .where(_IN_PROJECT, items.c.status == sa.func.any(sa.bindparam("states", type_=postgresql.ARRAY(sa.Text))))
    .distinct()
)
# Items keep the category of their status: one statement re-derives it from a {state id: category} map.
_RECATEGORIZE = Query(
    sa.update(items)
    .where(_IN_PROJECT, items.c.status == sa.func.any(sa.bindparam("states", type_=postgresql.ARRAY(sa.Text))))
    .values(status_category=sa.bindparam("categories", type_=_JSONB).op("->>")(items.c.status))
)
_CUSTOM_KEYS_IN_USE = Query(
    sa.select(sa.func.jsonb_object_keys(items.c.custom_fields).label("key"))
    .where(_IN_PROJECT, items.c.custom_fields.has_any(sa.bindparam("keys", type_=postgresql.ARRAY(sa.Text))))
    .distinct()
)
_CUSTOM_VALUES_IN_USE = Query(
    sa.select(items.c.custom_fields.op("->>")(sa.bindparam("key", type_=sa.Text)).label("value"))
    .where(
        _IN_PROJECT,
        items.c.custom_fields.op("->>")(sa.bindparam("key", type_=sa.Text))
        == sa.func.any(sa.bindparam("values", type_=postgresql.ARRAY(sa.Text))),
    )
    .distinct()
)


class ProjectRepository:
    """Projects in one unit of work."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    async def insert(
        self,
        *,
        workspace_id: uuid.UUID,
        project_id: uuid.UUID,
        display_name: str,
        description: str,
        workflow: Mapping[str, Any],
        custom_fields: Sequence[Mapping[str, Any]],
        creator: str,
        request_id: uuid.UUID | None,
        request_fingerprint: str | None,
    ) -> Project | None:
        """Insert a project; None if request_id was already used in the workspace."""
        row = await self.uow.fetchrow(
            _INSERT_PROJECT,
            tenant=workspace_id,
            id=project_id,
            display_name=display_name,
            description=description,
            workflow=to_json(workflow),
            custom_fields=to_json(custom_fields),
            creator=creator,
            request_id=request_id,
            request_fingerprint=request_fingerprint,
        )
        return _project(row) if row is not None else None

    async def find_by_request_id(self, *, workspace_id: uuid.UUID, request_id: uuid.UUID) -> IdempotentProject | None:
        """The project created in the workspace with this request_id."""
        row = await self.uow.fetchrow(_PROJECT_BY_REQUEST_ID, tenant=workspace_id, request_id=request_id)
        return IdempotentProject(_project(row), row["request_fingerprint"]) if row is not None else None

    async def get(self, *, workspace_id: uuid.UUID, project_id: uuid.UUID, lock: str = "") -> Project | None:
        """One project; `lock`: "" (none), "share" (FOR KEY SHARE) or "update" (FOR UPDATE)."""
        statement = {"": _GET_PROJECT, "share": _SHARE_PROJECT, "update": _LOCK_PROJECT}[lock]
        row = await self.uow.fetchrow(statement, tenant=workspace_id, id=project_id)
        return _project(row) if row is not None else None

    async def page(self, *, workspace_id: uuid.UUID, after: Cursor | None, limit: int) -> list[Project]:
        """Projects oldest first, strictly after the keyset `(create_time, id)`."""
        if after is None:
            rows = await self.uow.fetch(_LIST_PROJECTS_FIRST, tenant=workspace_id, limit=limit)
        else:
            rows = await self.uow.fetch(
                _LIST_PROJECTS_AFTER, tenant=workspace_id, last_time=after[0], last_id=after[1], limit=limit
            )
        return [_project(row) for row in rows]

    async def update(
        self,
        *,
        workspace_id: uuid.UUID,
        project_id: uuid.UUID,
        display_name: str,
        description: str,
        workflow: Mapping[str, Any],
        custom_fields: Sequence[Mapping[str, Any]],
    ) -> Project:
        """Write every field of a project the caller holds locked; the version goes up by one."""
        row = await self.uow.fetchrow(
            _UPDATE_PROJECT,
            tenant=workspace_id,
            id=project_id,
            display_name=display_name,
            description=description,
            workflow=to_json(workflow),
            custom_fields=to_json(custom_fields),
        )
        assert row is not None, "updated a project that is not there"
        return _project(row)

    async def states_in_use(self, *, workspace_id: uuid.UUID, project_id: uuid.UUID, states: Iterable[str]) -> set[str]:
        """Which of these states some item of the project (deleted ones included) is in."""
        rows = await self.uow.fetch(_STATES_IN_USE, tenant=workspace_id, project=project_id, states=list(states))
        return {row["status"] for row in rows}

    async def recategorize(
        self, *, workspace_id: uuid.UUID, project_id: uuid.UUID, categories: Mapping[str, str]
    ) -> None:
        """Set status_category of the project's items in these states to the state's new category."""
        await self.uow.execute(
            _RECATEGORIZE,
            tenant=workspace_id,
            project=project_id,
            states=list(categories),
            categories=to_json(dict(categories)),
        )

    async def custom_keys_in_use(
        self, *, workspace_id: uuid.UUID, project_id: uuid.UUID, keys: Iterable[str]
    ) -> set[str]:
        """Which of these custom field keys some item of the project (deleted ones included) has a value for."""
        wanted = set(keys)
        rows = await self.uow.fetch(_CUSTOM_KEYS_IN_USE, tenant=workspace_id, project=project_id, keys=list(wanted))
        return {row["key"] for row in rows} & wanted

    async def custom_values_in_use(
        self, *, workspace_id: uuid.UUID, project_id: uuid.UUID, key: str, values: Iterable[str]
    ) -> set[str]:
        """Which of these values some item of the project has in the custom field `key`."""
        rows = await self.uow.fetch(
            _CUSTOM_VALUES_IN_USE, tenant=workspace_id, project=project_id, key=key, values=list(values)
        )
        return {row["value"] for row in rows}


# --- items -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdempotentItem:
    """An item found under a request_id, with the fingerprint of the payload that created it."""

    item: Item
    request_fingerprint: str | None


_ITEM_KEY = sa.and_(
    items.c.tenant_id == sa.bindparam("tenant"),
    items.c.project_id == sa.bindparam("project"),
    items.c.id == sa.bindparam("id"),
)
_ITEM_VALUES = {
    "title": sa.bindparam("title"),
    "description": sa.bindparam("description"),
    "priority": sa.bindparam("priority", type_=sa.SmallInteger),
    "assignee": sa.bindparam("assignee", type_=sa.Uuid),
    "labels": sa.bindparam("labels", type_=postgresql.ARRAY(sa.Text)),
    "due_time": sa.bindparam("due_time", type_=items.c.due_time.type),
    "custom_fields": sa.bindparam("custom_fields", type_=_JSONB),
    "parent_id": sa.bindparam("parent_id", type_=sa.Uuid),
}
_ITEM_FIELD_NAMES = tuple(_ITEM_VALUES)

_created = (
    pg_insert(items)
    .values(
        tenant_id=sa.bindparam("tenant"),
        id=sa.bindparam("id"),
        project_id=sa.bindparam("project"),
        status=sa.bindparam("status"),
        status_category=sa.bindparam("status_category"),
        creator=sa.bindparam("actor"),
        updater=sa.bindparam("actor"),
        request_id=sa.bindparam("request_id", type_=sa.Uuid),
        request_fingerprint=sa.bindparam("request_fingerprint", type_=sa.Text),
        **_ITEM_VALUES,
    )
    .on_conflict_do_nothing(
        index_elements=[items.c.tenant_id, items.c.request_id], index_where=items.c.request_id.is_not(None)
    )
    .returning(*ITEM_COLUMNS)
    .cte("created")
)
# The item and its CREATED activity entry in one statement (one round trip fewer per create); a request_id
# already used inserts neither.
_INSERT_ITEM = Query(
    sa.select(*_created.c).add_cte(
        sa.insert(activities)
        .from_select(
            ["tenant_id", "id", "item_id", "project_id", "kind", "field", "after", "actor", "request_id"],
            sa.select(
                _created.c.tenant_id,
                sa.bindparam("activity_id", type_=sa.Uuid),
                _created.c.id,
                _created.c.project_id,
                sa.literal(ActivityKind.CREATED.value, sa.Text),
                sa.literal("", sa.Text),
                sa.bindparam("after", type_=_JSONB),
                sa.bindparam("actor", type_=sa.Text),
                sa.bindparam("log_request_id", type_=sa.Text),
            ),
        )
        .cte("logged")
    )
)
_ITEM_BY_REQUEST_ID = Query(
    sa.select(*ITEM_COLUMNS, items.c.request_fingerprint).where(
        items.c.tenant_id == sa.bindparam("tenant"), items.c.request_id == sa.bindparam("request_id")
    )
)
_GET_ITEM = Query(sa.select(*ITEM_COLUMNS).where(_ITEM_KEY))
_LOCK_ITEM = Query(sa.select(*ITEM_COLUMNS).where(_ITEM_KEY).with_for_update(key_share=True))
_LOCK_ITEMS = Query(
    sa.select(*ITEM_COLUMNS)
    .where(_IN_PROJECT, items.c.id == sa.func.any(sa.bindparam("ids", type_=postgresql.ARRAY(sa.Uuid))))
    .order_by(items.c.id)
    .with_for_update(key_share=True)
)
_LIVE_ITEM_EXISTS = Query(sa.select(sa.exists().where(_ITEM_KEY, items.c.delete_time.is_(None))))
_CHANGED = {"updater": sa.bindparam("actor"), "update_time": _NOW, "version": items.c.version + 1}
_UPDATE_ITEM = Query(sa.update(items).where(_ITEM_KEY).values(**_ITEM_VALUES, **_CHANGED).returning(*ITEM_COLUMNS))
_SET_STATUS = Query(
    sa.update(items)
    .where(_ITEM_KEY)
    .values(status=sa.bindparam("status"), status_category=sa.bindparam("status_category"), **_CHANGED)
    .returning(*ITEM_COLUMNS)
)
_ARCHIVE = Query(sa.update(items).where(_ITEM_KEY).values(archive_time=_NOW, **_CHANGED).returning(*ITEM_COLUMNS))
_UNARCHIVE = Query(sa.update(items).where(_ITEM_KEY).values(archive_time=None, **_CHANGED).returning(*ITEM_COLUMNS))
_DELETE = Query(sa.update(items).where(_ITEM_KEY).values(delete_time=_NOW, **_CHANGED).returning(*ITEM_COLUMNS))
_UNDELETE = Query(sa.update(items).where(_ITEM_KEY).values(delete_time=None, **_CHANGED).returning(*ITEM_COLUMNS))

# The live sub-items' categories. Not locked: a sub-item reopened concurrently commits either before the
# parent's move (and is seen here) or after it, like any later change of a sub-item of a closed item.
_SUBITEM_CATEGORIES = Query(
    sa.select(items.c.status_category).where(
        items.c.tenant_id == sa.bindparam("tenant"),
        items.c.parent_id == sa.bindparam("id"),
        items.c.delete_time.is_(None),
    )
)

# The ancestors of `start` (itself included), walking parent_id upwards; UNION (not ALL) ends the walk
# even on a cycle, which the service never lets exist.
_ancestors = (
    sa.select(items.c.id, items.c.parent_id)
    .where(items.c.tenant_id == sa.bindparam("tenant"), items.c.id == sa.bindparam("start"))
    .cte("ancestors", recursive=True)
)
_parents = items.alias("parents")
_ancestors = _ancestors.union(
    sa.select(_parents.c.id, _parents.c.parent_id).where(
        _parents.c.tenant_id == sa.bindparam("tenant"), _parents.c.id == _ancestors.c.parent_id
    )
)
_IS_ANCESTOR_OR_SELF = Query(sa.select(sa.exists().where(_ancestors.c.id == sa.bindparam("item"))))

# Serialises parent changes within one project, so two concurrent moves cannot form a cycle together.
_PARENT_CHANGE_LOCK = Query(
    sa.select(
        sa.func.pg_advisory_xact_lock(
            sa.func.hashtextextended(sa.literal("workflow.parent:") + sa.bindparam("project", type_=sa.Text), 0)
        )
    )
)


class ItemRepository:
    """Items of one workspace in one unit of work."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    async def insert(
        self,
        *,
        workspace_id: uuid.UUID,
        project_id: uuid.UUID,
        item_id: uuid.UUID,
        values: Mapping[str, Any],
        status: str,
        status_category: str,
        actor: str,
        request_id: uuid.UUID | None,
        request_fingerprint: str | None,
        snapshot: Mapping[str, Any],
        log_request_id: str,
    ) -> Item | None:
        """Insert an item with the field values of `values` and its CREATED activity entry (`snapshot` as its
        `after`, `log_request_id` the call's request id); None, and nothing written, if request_id was used."""
        row = await self.uow.fetchrow(
            _INSERT_ITEM,
            tenant=workspace_id,
            project=project_id,
            id=item_id,
            status=status,
            status_category=status_category,
            actor=actor,
            request_id=request_id,
            request_fingerprint=request_fingerprint,
            activity_id=uuid7(),
            after=to_json(snapshot),
            log_request_id=log_request_id,
            **_field_params(values),
        )
        return item_from_row(row) if row is not None else None

    async def find_by_request_id(self, *, workspace_id: uuid.UUID, request_id: uuid.UUID) -> IdempotentItem | None:
        """The item created in the workspace with this request_id."""
        row = await self.uow.fetchrow(_ITEM_BY_REQUEST_ID, tenant=workspace_id, request_id=request_id)
        return IdempotentItem(item_from_row(row), row["request_fingerprint"]) if row is not None else None

    async def get(
        self, *, workspace_id: uuid.UUID, project_id: uuid.UUID, item_id: uuid.UUID, lock: bool = False
    ) -> Item | None:
        """One item of the project, soft-deleted or not (locked FOR NO KEY UPDATE if asked)."""
        row = await self.uow.fetchrow(
            _LOCK_ITEM if lock else _GET_ITEM, tenant=workspace_id, project=project_id, id=item_id
        )
        return item_from_row(row) if row is not None else None

    async def lock_many(
        self, *, workspace_id: uuid.UUID, project_id: uuid.UUID, item_ids: Iterable[uuid.UUID]
    ) -> dict[uuid.UUID, Item]:
        """Items of the project locked FOR NO KEY UPDATE in id order (the order every multi-item lock follows)."""
        rows = await self.uow.fetch(_LOCK_ITEMS, tenant=workspace_id, project=project_id, ids=sorted(set(item_ids)))
        return {row["id"]: item_from_row(row) for row in rows}

    async def live_exists(self, *, workspace_id: uuid.UUID, project_id: uuid.UUID, item_id: uuid.UUID) -> bool:
        """Whether the project has this item and it is not soft-deleted."""
        return bool(await self.uow.fetchval(_LIVE_ITEM_EXISTS, tenant=workspace_id, project=project_id, id=item_id))

    async def update_fields(
        self,
        *,
        workspace_id: uuid.UUID,
        project_id: uuid.UUID,
        item_id: uuid.UUID,
        values: Mapping[str, Any],
        actor: str,
    ) -> Item:
        """Write every user field of a locked item from `values`; version and update_time move on."""
        row = await self.uow.fetchrow(
            _UPDATE_ITEM, tenant=workspace_id, project=project_id, id=item_id, actor=actor, **_field_params(values)
        )
        assert row is not None, "updated an item that is not there"
        return item_from_row(row)

    async def set_status(
        self,
        *,
        workspace_id: uuid.UUID,
        project_id: uuid.UUID,
        item_id: uuid.UUID,
        status: str,
        status_category: str,
        actor: str,
    ) -> Item:
        """Move a locked item to another state."""
        row = await self.uow.fetchrow(
            _SET_STATUS,
            tenant=workspace_id,
            project=project_id,
            id=item_id,
            status=status,
            status_category=status_category,
            actor=actor,
        )
        assert row is not None, "moved an item that is not there"
        return item_from_row(row)

    async def mark(
        self, kind: ActivityKind, *, workspace_id: uuid.UUID, project_id: uuid.UUID, item_id: uuid.UUID, actor: str
    ) -> Item:
        """Archive, unarchive, soft-delete or undelete a locked item."""
        statement = {
            ActivityKind.ARCHIVED: _ARCHIVE,
            ActivityKind.UNARCHIVED: _UNARCHIVE,
            ActivityKind.DELETED: _DELETE,
            ActivityKind.UNDELETED: _UNDELETE,
        }[kind]
        row = await self.uow.fetchrow(statement, tenant=workspace_id, project=project_id, id=item_id, actor=actor)
        assert row is not None, "marked an item that is not there"
        return item_from_row(row)

    async def subitem_categories(self, *, workspace_id: uuid.UUID, item_id: uuid.UUID) -> list[str]:
        """The status categories of the item's live sub-items."""
        rows = await self.uow.fetch(_SUBITEM_CATEGORIES, tenant=workspace_id, id=item_id)
        return [row["status_category"] for row in rows]

    async def lock_parent_changes(self, *, project_id: uuid.UUID) -> None:
        """Take the project's parent-change lock (transaction-scoped)."""
        await self.uow.fetchval(_PARENT_CHANGE_LOCK, project=str(project_id))

    async def is_ancestor_or_self(self, *, workspace_id: uuid.UUID, item_id: uuid.UUID, start: uuid.UUID) -> bool:
        """Whether `item_id` is `start` or one of its ancestors."""
        return bool(await self.uow.fetchval(_IS_ANCESTOR_OR_SELF, tenant=workspace_id, start=start, item=item_id))


def _field_params(values: Mapping[str, Any]) -> dict[str, Any]:
    params = {name: values[name] for name in _ITEM_FIELD_NAMES}
    params["custom_fields"] = to_json(params["custom_fields"])
    params["labels"] = list(params["labels"])
    params["priority"] = int(params["priority"])
    return params


# --- activities --------------------------------------------------------------------------------------------

_ACTIVITY_COLUMNS = (
    activities.c.tenant_id,
    activities.c.id,
    activities.c.item_id,
    activities.c.project_id,
    activities.c.kind,
    activities.c.field,
    activities.c.before,
    activities.c.after,
    activities.c.actor,
    activities.c.request_id,
    activities.c.create_time,
)


def _activity(row: Mapping[str, Any]) -> Activity:
    return Activity(
        workspace_id=row["tenant_id"],
        id=row["id"],
        item_id=row["item_id"],
        project_id=row["project_id"],
        kind=ActivityKind(row["kind"]),
        field=row["field"],
        before=row["before"],
        after=row["after"],
        actor=row["actor"],
        request_id=row["request_id"],
        create_time=row["create_time"],
    )


@dataclass(frozen=True, slots=True)
class NewActivity:
    """An activity log entry to record."""

    item: Item
    kind: ActivityKind
    field: str = ""
    before: Any = None
    after: Any = None


_new_activities = (
    sa.func.unnest(
        sa.bindparam("ids", type_=postgresql.ARRAY(sa.Uuid)),
        sa.bindparam("item_ids", type_=postgresql.ARRAY(sa.Uuid)),
        sa.bindparam("project_ids", type_=postgresql.ARRAY(sa.Uuid)),
        sa.bindparam("kinds", type_=postgresql.ARRAY(sa.Text)),
        sa.bindparam("fields", type_=postgresql.ARRAY(sa.Text)),
        sa.bindparam("befores", type_=postgresql.ARRAY(_JSONB)),
        sa.bindparam("afters", type_=postgresql.ARRAY(_JSONB)),
    )
    .table_valued("id", "item_id", "project_id", "kind", "field", "before", "after")
    .render_derived(name="new")
)
# Any number of entries in one round trip.
_INSERT_ACTIVITIES = Query(
    sa.insert(activities).from_select(
        ["tenant_id", "id", "item_id", "project_id", "kind", "field", "before", "after", "actor", "request_id"],
        sa.select(
            sa.bindparam("tenant", type_=sa.Uuid),
            _new_activities.c.id,
            _new_activities.c.item_id,
            _new_activities.c.project_id,
            _new_activities.c.kind,
            _new_activities.c.field,
            _new_activities.c.before,
            _new_activities.c.after,
            sa.bindparam("actor", type_=sa.Text),
            sa.bindparam("request_id", type_=sa.Text),
        ),
    )
)
_OLDEST_ACTIVITIES_FIRST = activities.c.id.asc()
_LIST_ACTIVITIES = sa.select(*_ACTIVITY_COLUMNS).where(
    activities.c.tenant_id == sa.bindparam("tenant"), activities.c.item_id == sa.bindparam("item")
)
_LIST_ACTIVITIES_FIRST = Query(_LIST_ACTIVITIES.order_by(_OLDEST_ACTIVITIES_FIRST).limit(sa.bindparam("limit")))
_LIST_ACTIVITIES_AFTER = Query(
    _LIST_ACTIVITIES.where(activities.c.id > sa.bindparam("last_id", type_=sa.Uuid))
    .order_by(_OLDEST_ACTIVITIES_FIRST)
    .limit(sa.bindparam("limit"))
)


class ActivityRepository:
    """The append-only activity log of one workspace in one unit of work."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    async def record(
        self, entries: Sequence[NewActivity], *, workspace_id: uuid.UUID, actor: str, request_id: str
    ) -> None:
        """Append entries (ids are UUIDv7 in the given order, so the log reads in that order)."""
        if not entries:
            return
        await self.uow.execute(
            _INSERT_ACTIVITIES,
            tenant=workspace_id,
            ids=[uuid7() for _ in entries],
            item_ids=[entry.item.id for entry in entries],
            project_ids=[entry.item.project_id for entry in entries],
            kinds=[entry.kind.value for entry in entries],
            fields=[entry.field for entry in entries],
            befores=[None if entry.before is None else to_json(entry.before) for entry in entries],
            afters=[None if entry.after is None else to_json(entry.after) for entry in entries],
            actor=actor,
            request_id=request_id,
        )

    async def page(
        self, *, workspace_id: uuid.UUID, item_id: uuid.UUID, after: uuid.UUID | None, limit: int
    ) -> list[Activity]:
        """Entries of one item, oldest first, strictly after the activity id `after`."""
        if after is None:
            rows = await self.uow.fetch(_LIST_ACTIVITIES_FIRST, tenant=workspace_id, item=item_id, limit=limit)
        else:
            rows = await self.uow.fetch(
                _LIST_ACTIVITIES_AFTER, tenant=workspace_id, item=item_id, last_id=after, limit=limit
            )
        return [_activity(row) for row in rows]


# --- members read model and usage --------------------------------------------------------------------------

_MEMBER_KEY = sa.and_(members.c.tenant_id == sa.bindparam("tenant"), members.c.user_id == sa.bindparam("user"))
_IS_MEMBER = Query(sa.select(sa.exists().where(_MEMBER_KEY, members.c.role.is_not(None))))
_upsert_member = pg_insert(members).values(
    tenant_id=sa.bindparam("tenant"),
    user_id=sa.bindparam("user"),
    role=sa.bindparam("role", type_=sa.Text),
    change_time=sa.bindparam("change_time", type_=members.c.change_time.type),
)
# Newer wins: an event older than what is stored (redelivered, or overtaken) changes nothing.
_RECORD_MEMBERSHIP = Query(
    _upsert_member.on_conflict_do_update(
        index_elements=[members.c.tenant_id, members.c.user_id],
        set_={"role": _upsert_member.excluded.role, "change_time": _upsert_member.excluded.change_time},
        where=members.c.change_time < _upsert_member.excluded.change_time,
    ).returning(members.c.user_id)
)

# The live-item counter is split over USAGE_SHARDS rows per workspace, so concurrent creates in one
# workspace do not queue on one row lock held until each commit's WAL flush. The limit stays exact:
# shard i may hold `max // N` items, plus one for the first `max % N` shards, which sums to `max`, and
# no shard ever goes past its share, so the sum never passes `max`. `count_item` repeats, until it counts
# or refuses:
# 1. a random shard with room whose row no other transaction holds (SKIP LOCKED: it never waits);
# 2. a read of every shard without locks: if each one is at its share, the workspace is at its limit
#    (as committed), and the create is refused;
# 3. otherwise every shard with room is held by a transaction in flight: it waits for one of them,
#    picked at random, and counts there if it still has room once the holder commits (the UPDATE
#    re-checks its condition on the row it waited for).
# The waits cannot form a cycle: a transaction that counted never waits for a shard again; step 3 waits
# only for a shard with room, in a savepoint whose rollback releases it if it is full by then; and the
# lock that step 1 may keep on a row it skipped as full on re-checking (READ COMMITTED keeps it) is on a
# full row, which step 3 never waits for. An earlier version locked every
# shard in order after step 1: with 32 creates in flight and 16 shards each of those waited for most of
# the others to commit (p99 400 ms in bench_workflow.py), and could deadlock with such a kept lock.
# `uncount_item` works the same way with "a shard above zero" for "a shard with room".
USAGE_SHARDS = 16
_TENANT = sa.bindparam("tenant", type_=sa.Uuid)
_MAX = sa.bindparam("max", type_=sa.BigInteger)
_SHARE = f"(:max / {USAGE_SHARDS} + CASE WHEN shard < :max % {USAGE_SHARDS} THEN 1 ELSE 0 END)"
# The pick is a MATERIALIZED CTE: it runs once, so the UPDATE changes at most one shard. As a subquery
# in UPDATE ... FROM, the planner may put it on the inner side of a nested loop over the workspace's 16
# rows and run it again for each, drawing a new random shard each time: one create then counted in
# several shards (seen with a large usage table, where the plan flips; the limit was then refused early).
_COUNT_ITEM_FAST = Query(
    sa.text(
        f"WITH pick AS MATERIALIZED (SELECT shard FROM {usage.fullname} WHERE tenant_id = :tenant "
        f"AND item_count < {_SHARE} ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED) "
        f"UPDATE {usage.fullname} AS u SET item_count = u.item_count + 1 FROM pick "
        "WHERE u.tenant_id = :tenant AND u.shard = pick.shard RETURNING u.shard"
    ).bindparams(_TENANT, _MAX)
)
_READ_SHARDS = Query(
    sa.select(usage.c.shard, usage.c.item_count).where(usage.c.tenant_id == _TENANT).order_by(usage.c.shard)
)
_COUNT_ITEM_IN_SHARD = Query(
    sa.text(
        f"UPDATE {usage.fullname} SET item_count = item_count + 1 "
        f"WHERE tenant_id = :tenant AND shard = :shard AND item_count < {_SHARE} RETURNING shard"
    ).bindparams(_TENANT, _MAX, sa.bindparam("shard", type_=sa.SmallInteger))
)
_SAVEPOINT = Query(sa.text("SAVEPOINT usage_shard"))
_RELEASE = Query(sa.text("RELEASE SAVEPOINT usage_shard"))
_ROLLBACK_TO = Query(sa.text("ROLLBACK TO SAVEPOINT usage_shard"))
_CREATE_SHARDS = Query(
    sa.text(
        f"INSERT INTO {usage.fullname} (tenant_id, shard, item_count) "
        f"SELECT :tenant, s, 0 FROM generate_series(0, {USAGE_SHARDS - 1}) AS s "
        "ON CONFLICT (tenant_id, shard) DO NOTHING"
    ).bindparams(_TENANT)
)
_UNCOUNT_ITEM_FAST = Query(  # the pick runs once, as in _COUNT_ITEM_FAST
    sa.text(
        f"WITH pick AS MATERIALIZED (SELECT shard FROM {usage.fullname} WHERE tenant_id = :tenant "
        "AND item_count > 0 ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED) "
        f"UPDATE {usage.fullname} AS u SET item_count = u.item_count - 1 FROM pick "
        "WHERE u.tenant_id = :tenant AND u.shard = pick.shard RETURNING u.shard"
    ).bindparams(_TENANT)
)
_UNCOUNT_ITEM_IN_SHARD = Query(
    sa.text(
        f"UPDATE {usage.fullname} SET item_count = item_count - 1 "
        "WHERE tenant_id = :tenant AND shard = :shard AND item_count > 0 RETURNING shard"
    ).bindparams(_TENANT, sa.bindparam("shard", type_=sa.SmallInteger))
)
# Each round of count_item / uncount_item waits for another transaction's commit; this many rounds
# without counting means the counter is changing faster than this transaction can follow.
MAX_COUNTER_ROUNDS = 100
_ITEM_COUNT = Query(sa.select(sa.func.coalesce(sa.func.sum(usage.c.item_count), 0)).where(usage.c.tenant_id == _TENANT))


def shard_share(shard: int, maximum: int) -> int:
    """How many live items one shard may count under `maximum` (the shares sum to `maximum`)."""
    return maximum // USAGE_SHARDS + (1 if shard < maximum % USAGE_SHARDS else 0)


class MemberRepository:
    """The workspace members read model in one unit of work."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    async def is_member(self, *, workspace_id: uuid.UUID, user_id: uuid.UUID) -> bool:
        """Whether the user currently belongs to the workspace."""
        return bool(await self.uow.fetchval(_IS_MEMBER, tenant=workspace_id, user=user_id))

    async def record(
        self, *, workspace_id: uuid.UUID, user_id: uuid.UUID, role: str | None, change_time: datetime
    ) -> bool:
        """Store the membership as of change_time unless a newer change is stored; whether it was stored."""
        row = await self.uow.fetchrow(
            _RECORD_MEMBERSHIP, tenant=workspace_id, user=user_id, role=role, change_time=change_time
        )
        return row is not None


class UsageRepository:
    """The workspace's live item counter in one unit of work."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    async def count_item(self, *, workspace_id: uuid.UUID, maximum: int) -> bool:
        """Count one more live item unless the workspace is at `maximum`; False at the limit."""
        for _ in range(MAX_COUNTER_ROUNDS):
            if await self.uow.fetchval(_COUNT_ITEM_FAST, tenant=workspace_id, max=maximum) is not None:
                return True
            seen = await self.uow.fetch(_READ_SHARDS, tenant=workspace_id)
            if not seen:  # the workspace's first item (or a concurrent first create's rows not committed yet)
                await self.uow.execute(_CREATE_SHARDS, tenant=workspace_id)
                continue
            with_room = [row["shard"] for row in seen if row["item_count"] < shard_share(row["shard"], maximum)]
            if not with_room:
                return False
            if await self._in_one_shard(_COUNT_ITEM_IN_SHARD, workspace_id, random.choice(with_room), max=maximum):
                return True
        raise Aborted("the workspace's item counter is contended; retry the request")

    async def uncount_item(self, *, workspace_id: uuid.UUID) -> None:
        """One live item fewer (taken from any shard: only the sum matters)."""
        for _ in range(MAX_COUNTER_ROUNDS):
            if await self.uow.fetchval(_UNCOUNT_ITEM_FAST, tenant=workspace_id) is not None:
                return
            seen = await self.uow.fetch(_READ_SHARDS, tenant=workspace_id)
            above_zero = [row["shard"] for row in seen if row["item_count"] > 0]
            if not above_zero:  # nothing counted (rows loaded around the service): nothing to take back
                return
            if await self._in_one_shard(_UNCOUNT_ITEM_IN_SHARD, workspace_id, random.choice(above_zero)):
                return
        raise Aborted("the workspace's item counter is contended; retry the request")

    async def _in_one_shard(self, statement: Query, workspace_id: uuid.UUID, shard: int, **params: Any) -> bool:
        """Run a conditional shard UPDATE that may wait for the row; release the row if it did not apply."""
        await self.uow.execute(_SAVEPOINT)
        applied = await self.uow.fetchval(statement, tenant=workspace_id, shard=shard, **params) is not None
        # Rolled back, the UPDATE lets go of the row it locked to re-check (READ COMMITTED locks the
        # newest version first, and keeps the lock when the condition then fails).
        await self.uow.execute(_RELEASE if applied else _ROLLBACK_TO)
        return applied

    async def item_count(self, *, workspace_id: uuid.UUID) -> int:
        """The workspace's live items as counted."""
        value = await self.uow.fetchval(_ITEM_COUNT, tenant=workspace_id)
        return int(value) if value is not None else 0
