"""Workflow tables (SQLAlchemy Core descriptions of migrations/versions/0004_workflow.py).

The migration owns the schema; these objects only describe it to Core. Every table is keyed by
`tenant_id` first and is under forced row-level security.

Storage conventions the query compiler (`services.workflow.query`) relies on:
- `items.status` is the workflow state id (text), `items.status_category` its category name
  (BACKLOG, ACTIVE, DONE, CANCELLED); `items.priority` the `Priority` enum number
  (0 unspecified … 4 urgent), so ordering by priority orders by urgency.
- `items.assignee` is the assigned user's id (uuid, NULL when unassigned); the contract shows `users/{id}`.
- `items.labels` is a sorted, duplicate-free `text[]` (GIN-indexed for `labels:"x"`).
- `items.custom_fields` is a JSONB object `{key: JSON value}`; timestamps in it are RFC 3339 strings.
- `items.parent_id` is the parent item's id in the same project, NULL for a top-level item.
- `items.search` is a stored generated `tsvector` over title (weight A) and description (weight B),
  GIN-indexed, in the `english` configuration.
- `items.archive_time` / `delete_time` are NULL while the item is not archived / not deleted.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from prometheus_client import Counter
from sqlalchemy.dialects import postgresql

from services.workflow.workflow import (
    CustomFieldDefinition,
    Workflow,
    custom_field_message,
    workflow_message,
)
from tessera.workflow.v1 import workflow_pb2

SERVICE = "workflow"
SCHEMA = "workflow"
SEARCH_CONFIG = "english"

metadata = sa.MetaData(schema=SCHEMA)

_TIME = sa.DateTime(timezone=True)

projects = sa.Table(
    "projects",
    metadata,
    sa.Column("tenant_id", sa.Uuid, primary_key=True),
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    # {"states": [{"id", "display_name", "category"}], "transitions": [{"from", "to", "guards"}], "initial": id}
    sa.Column("workflow", postgresql.JSONB, nullable=False),
    # [{"key", "display_name", "type", "allowed_values"}]
    sa.Column("custom_fields", postgresql.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    sa.Column("creator", sa.Text, nullable=False),
    sa.Column("request_id", sa.Uuid),
    sa.Column("request_fingerprint", sa.Text),
    sa.Column("create_time", _TIME, nullable=False, server_default=sa.func.now()),
    sa.Column("update_time", _TIME, nullable=False, server_default=sa.func.now()),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
)

items = sa.Table(
    "items",
    metadata,
    sa.Column("tenant_id", sa.Uuid, primary_key=True),
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("project_id", sa.Uuid, nullable=False),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("status", sa.Text, nullable=False),
    # The category of `status` (BACKLOG, ACTIVE, DONE, CANCELLED), denormalised for board queries and the
    # sub-items guard; added by the expand/contract pair 0005/0006, written by the service on every status
    # or workflow change.
    sa.Column("status_category", sa.Text),
    sa.Column("priority", sa.SmallInteger, nullable=False, server_default="0"),
    sa.Column("assignee", sa.Uuid),
    sa.Column("labels", postgresql.ARRAY(sa.Text), nullable=False, server_default=sa.text("'{}'::text[]")),
    sa.Column("due_time", _TIME),
    sa.Column("custom_fields", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("parent_id", sa.Uuid),
    sa.Column("creator", sa.Text, nullable=False),
    sa.Column("updater", sa.Text, nullable=False),
    sa.Column("request_id", sa.Uuid),
    sa.Column("request_fingerprint", sa.Text),
    sa.Column("create_time", _TIME, nullable=False, server_default=sa.func.now()),
    sa.Column("update_time", _TIME, nullable=False, server_default=sa.func.now()),
    sa.Column("archive_time", _TIME),
    sa.Column("delete_time", _TIME),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    sa.Column(
        "search",
        postgresql.TSVECTOR,
        sa.Computed(
            f"setweight(to_tsvector('{SEARCH_CONFIG}', title), 'A') || "
            f"setweight(to_tsvector('{SEARCH_CONFIG}', description), 'B')",
            persisted=True,
        ),
    ),
)

# What reads of an item select: every column but the tsvector (only the search predicate reads it) and the
# idempotency columns. custom_fields comes back as its JSON text, parsed only where it is read
# (`custom_fields_from_text`): most items have none, and a list page that `RenderedItems` serves from
# bytes never reads it.
ITEM_COLUMNS: tuple[sa.ColumnElement[Any], ...] = tuple(
    sa.cast(column, sa.Text).label(column.name) if column.name == "custom_fields" else column
    for column in items.c
    if column.name not in ("search", "request_id", "request_fingerprint")
)

activities = sa.Table(
    "activities",
    metadata,
    sa.Column("tenant_id", sa.Uuid, primary_key=True),
    sa.Column("id", sa.Uuid, primary_key=True),  # uuid7: ordered by time
    sa.Column("item_id", sa.Uuid, nullable=False),
    sa.Column("project_id", sa.Uuid, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),  # ActivityKind name without prefix: CREATED, UPDATED, ...
    sa.Column("field", sa.Text, nullable=False, server_default=""),
    sa.Column("before", postgresql.JSONB),
    sa.Column("after", postgresql.JSONB),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("request_id", sa.Text, nullable=False, server_default=""),
    sa.Column("create_time", _TIME, nullable=False, server_default=sa.func.now()),
)

# Read model of tenancy's memberships, fed by MembershipChangedEvent: who can be an assignee.
members = sa.Table(
    "members",
    metadata,
    sa.Column("tenant_id", sa.Uuid, primary_key=True),
    sa.Column("user_id", sa.Uuid, primary_key=True),
    sa.Column("role", sa.Text),  # NULL once the membership ended (kept so an older event cannot revive it)
    sa.Column("change_time", _TIME, nullable=False),
)

# The entitlement hook's counter: live (not deleted) items per workspace, split over shards (their sum
# is the count) so concurrent creates do not queue on one row (repository.USAGE_SHARDS).
usage = sa.Table(
    "usage",
    metadata,
    sa.Column("tenant_id", sa.Uuid, primary_key=True),
    sa.Column("shard", sa.SmallInteger, primary_key=True, server_default="0"),
    sa.Column("item_count", sa.BigInteger, nullable=False, server_default="0"),
)


# --- domain types ------------------------------------------------------------------------------------------

WORKSPACE_NAME_PREFIX = "workspaces/"
USER_NAME_PREFIX = "users/"
API_KEY_NAME_PREFIX = "apiKeys/"
PROJECT_DISPLAY_NAME_MAX_CHARS = 100
PROJECT_DESCRIPTION_MAX_CHARS = 10_000
TITLE_MAX_CHARS = 300
DESCRIPTION_MAX_CHARS = 100_000
MAX_LABELS = 20
LABEL_MAX_CHARS = 50


class Priority(enum.IntEnum):
    """Item priority; stored as its number, so ordering by priority orders by urgency."""

    UNSPECIFIED = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    URGENT = 4


class ActivityKind(enum.StrEnum):
    """What an activity log entry records (stored by name)."""

    CREATED = "CREATED"
    UPDATED = "UPDATED"
    TRANSITIONED = "TRANSITIONED"
    ARCHIVED = "ARCHIVED"
    UNARCHIVED = "UNARCHIVED"
    DELETED = "DELETED"
    UNDELETED = "UNDELETED"


@dataclass(frozen=True, slots=True)
class Project:
    """A project of a workspace, with its workflow and custom field definitions."""

    workspace_id: uuid.UUID
    id: uuid.UUID
    display_name: str
    description: str
    workflow: Workflow
    custom_fields: tuple[CustomFieldDefinition, ...]
    creator: str
    create_time: datetime
    update_time: datetime
    version: int = 1

    @property
    def name(self) -> str:
        return project_name(self.workspace_id, self.id)

    @property
    def etag(self) -> str:
        return etag_for(self.version)

    def custom_field(self, key: str) -> CustomFieldDefinition | None:
        """The definition of a custom field key, or None."""
        for definition in self.custom_fields:
            if definition.key == key:
                return definition
        return None


@dataclass(frozen=True, slots=True)
class Item:
    """A work item; `custom_fields` holds JSON values by key, `assignee` a user id."""

    workspace_id: uuid.UUID
    id: uuid.UUID
    project_id: uuid.UUID
    title: str
    description: str
    status: str
    status_category: str
    priority: Priority
    assignee: uuid.UUID | None
    labels: tuple[str, ...]
    due_time: datetime | None
    custom_fields: Mapping[str, Any]
    parent_id: uuid.UUID | None
    creator: str
    updater: str
    create_time: datetime
    update_time: datetime
    archive_time: datetime | None = None
    delete_time: datetime | None = None
    version: int = 1

    @property
    def name(self) -> str:
        return item_name(self.workspace_id, self.project_id, self.id)

    @property
    def project_name(self) -> str:
        return project_name(self.workspace_id, self.project_id)

    @property
    def parent_name(self) -> str | None:
        return item_name(self.workspace_id, self.project_id, self.parent_id) if self.parent_id else None

    @property
    def etag(self) -> str:
        return etag_for(self.version)

    @property
    def archived(self) -> bool:
        return self.archive_time is not None

    @property
    def deleted(self) -> bool:
        return self.delete_time is not None

    def snapshot(self) -> dict[str, Any]:
        """The item's user-visible fields in their activity (JSON) form."""
        return {
            "title": self.title,
            "description": self.description,
            "status": self.status,
            **{path: field_value(self, path) for path in ITEM_FIELDS if path not in ("title", "description")},
        }


# The fields UpdateItem may change (update_mask paths; `custom_fields.<key>` addresses one custom field).
ITEM_FIELDS: tuple[str, ...] = (
    "title",
    "description",
    "priority",
    "assignee",
    "labels",
    "due_time",
    "custom_fields",
    "parent",
)
CUSTOM_FIELDS_PREFIX = "custom_fields."


def field_value(item: Item, path: str) -> Any:
    """The JSON form of one field of an item, as the activity log records it (None when unset)."""
    if path.startswith(CUSTOM_FIELDS_PREFIX):
        return item.custom_fields.get(path.removeprefix(CUSTOM_FIELDS_PREFIX))
    match path:
        case "title":
            return item.title
        case "description":
            return item.description
        case "status":
            return item.status
        case "priority":
            return f"PRIORITY_{item.priority.name}"
        case "assignee":
            return user_name(item.assignee) if item.assignee else None
        case "labels":
            return list(item.labels)
        case "due_time":
            return rfc3339(item.due_time) if item.due_time else None
        case "custom_fields":
            return dict(item.custom_fields)
        case "parent":
            return item.parent_name
    raise KeyError(path)


@dataclass(frozen=True, slots=True)
class ItemFields:
    """The user-settable fields of an item as a request carries them, before validation."""

    title: str = ""
    description: str = ""
    priority: int = 0
    assignee: str = ""  # `users/{id}`, or empty for unassigned
    labels: tuple[str, ...] = ()
    due_time: datetime | None = None
    custom_fields: Mapping[str, Any] = field(default_factory=dict)  # JSON values; None clears a key
    parent: str = ""  # an item name, or empty for a top-level item


@dataclass(frozen=True, slots=True)
class ItemUpdate:
    """One UpdateItem: the item named, the new values, the update_mask paths and the etag."""

    workspace_id: uuid.UUID
    project_id: uuid.UUID
    item_id: uuid.UUID
    fields: ItemFields
    update_mask: tuple[str, ...] = ()
    etag: str = ""

    @property
    def name(self) -> str:
        return item_name(self.workspace_id, self.project_id, self.item_id)


@dataclass(frozen=True, slots=True)
class Activity:
    """One entry of an item's activity log; before/after are JSON values (None when absent)."""

    workspace_id: uuid.UUID
    id: uuid.UUID
    item_id: uuid.UUID
    project_id: uuid.UUID
    kind: ActivityKind
    field: str
    before: Any
    after: Any
    actor: str
    request_id: str
    create_time: datetime

    @property
    def name(self) -> str:
        return f"{item_name(self.workspace_id, self.project_id, self.item_id)}/activities/{self.id}"


@dataclass(frozen=True, slots=True)
class ProjectPage:
    """One page of projects and the token of the next one ("" on the last page)."""

    projects: list[Project] = field(default_factory=list)
    next_page_token: str = ""


@dataclass(frozen=True, slots=True)
class ItemPage:
    """One page of items, as rows of `ITEM_COLUMNS`, and the token of the next one.

    Rows, not `Item`s: a page goes straight to its messages (`add_item_messages`).
    """

    rows: Sequence[Mapping[str, Any]] = ()
    next_page_token: str = ""

    @property
    def items(self) -> list[Item]:
        """The page's items."""
        return [item_from_row(row) for row in self.rows]


@dataclass(frozen=True, slots=True)
class ActivityPage:
    """One page of an item's activity log and the token of the next one."""

    activities: list[Activity] = field(default_factory=list)
    next_page_token: str = ""


@dataclass(frozen=True, slots=True)
class ItemCounts:
    """CountItems: (key, count) groups, largest first, and the number of matching items."""

    counts: list[tuple[str, int]] = field(default_factory=list)
    total: int = 0


# --- names ---------------------------------------------------------------------------------------------------


def etag_for(version: int) -> str:
    """The etag of a resource version (opaque to clients)."""
    return f'"v{version}"'


def workspace_name(workspace_id: uuid.UUID) -> str:
    """`workspaces/{id}`."""
    return f"{WORKSPACE_NAME_PREFIX}{workspace_id}"


def project_name(workspace_id: uuid.UUID, project_id: uuid.UUID) -> str:
    """`workspaces/{ws}/projects/{p}`."""
    return f"{WORKSPACE_NAME_PREFIX}{workspace_id}/projects/{project_id}"


def item_name(workspace_id: uuid.UUID, project_id: uuid.UUID, item_id: uuid.UUID) -> str:
    """`workspaces/{ws}/projects/{p}/items/{i}`."""
    return f"{project_name(workspace_id, project_id)}/items/{item_id}"


def user_name(user_id: uuid.UUID | str) -> str:
    """`users/{id}`."""
    return f"{USER_NAME_PREFIX}{user_id}"


def parse_name(name: str, collections: tuple[str, ...]) -> tuple[uuid.UUID, ...] | None:
    """The ids of `workspaces/{id}/<collections[0]>/{id}/...`, or None if the name has another shape."""
    parts = name.split("/")
    expected = ("workspaces", *collections)
    if len(parts) != 2 * len(expected) or tuple(parts[0::2]) != expected:
        return None
    try:
        return tuple(uuid.UUID(part) for part in parts[1::2])
    except ValueError:
        return None


def parse_user_name(name: str) -> uuid.UUID | None:
    """The id of `users/{uuid}`, or None."""
    if not name.startswith(USER_NAME_PREFIX):
        return None
    try:
        return uuid.UUID(name.removeprefix(USER_NAME_PREFIX))
    except ValueError:
        return None


def rfc3339(value: datetime) -> str:
    """A UTC RFC 3339 timestamp (`...Z`)."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- the contract's messages -------------------------------------------------------------------------------


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp of an aware datetime (naive ones are refused).

    The same value as `Timestamp.FromDatetime`, computed with one C-level subtraction: FromDatetime goes
    through `calendar.timegm` in Python and was 5% of the service's CPU when listing pages of items.
    """
    delta = value - _EPOCH
    return timestamp_pb2.Timestamp(seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000)


def json_value(value: Any) -> struct_pb2.Value:
    """A google.protobuf.Value of a JSON value (None → null)."""
    message = struct_pb2.Value()
    if value is None:
        message.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        message.bool_value = value
    elif isinstance(value, int | float):
        message.number_value = value
    elif isinstance(value, str):
        message.string_value = value
    elif isinstance(value, list | tuple):
        message.list_value.values.extend(json_value(element) for element in value)
    elif isinstance(value, Mapping):
        for key, element in value.items():
            message.struct_value.fields[str(key)].CopyFrom(json_value(element))
    else:
        raise TypeError(f"not a JSON value: {type(value).__name__}")
    return message


def from_json_value(message: struct_pb2.Value) -> Any:
    """The JSON value of a google.protobuf.Value (an unset Value is null)."""
    kind = message.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind == "list_value":
        return [from_json_value(element) for element in message.list_value.values]
    if kind == "struct_value":
        return {key: from_json_value(element) for key, element in message.struct_value.fields.items()}
    return getattr(message, kind)


def project_message(project: Project) -> workflow_pb2.Project:
    """The contract form of a project (responses and event payloads alike)."""
    return workflow_pb2.Project(
        name=project.name,
        display_name=project.display_name,
        description=project.description,
        workflow=workflow_message(project.workflow),
        custom_fields=[custom_field_message(definition) for definition in project.custom_fields],
        creator=project.creator,
        create_time=timestamp(project.create_time),
        update_time=timestamp(project.update_time),
        etag=project.etag,
    )


def item_message(item: Item) -> workflow_pb2.Item:
    """The contract form of an item."""
    message = workflow_pb2.Item(
        name=item.name,
        title=item.title,
        description=item.description,
        status=item.status,
        priority=f"PRIORITY_{item.priority.name}",
        assignee=user_name(item.assignee) if item.assignee else "",
        labels=list(item.labels),
        parent=item.parent_name or "",
        archived=item.archived,
        creator=item.creator,
        updater=item.updater,
        create_time=timestamp(item.create_time),
        update_time=timestamp(item.update_time),
        etag=item.etag,
    )
    for key, value in item.custom_fields.items():
        message.custom_fields[key].CopyFrom(json_value(value))
    if item.due_time is not None:
        message.due_time.CopyFrom(timestamp(item.due_time))
    if item.archive_time is not None:
        message.archive_time.CopyFrom(timestamp(item.archive_time))
    if item.delete_time is not None:
        message.delete_time.CopyFrom(timestamp(item.delete_time))
    return message


def custom_fields_from_text(text: str) -> dict[str, Any]:
    """An item's custom fields from the JSON text `ITEM_COLUMNS` selects."""
    return {} if text == "{}" else dict(json.loads(text))


def item_from_row(row: Mapping[str, Any]) -> Item:
    """An item from a row with (at least) the columns of `ITEM_COLUMNS`."""
    return Item(
        workspace_id=row["tenant_id"],
        id=row["id"],
        project_id=row["project_id"],
        title=row["title"],
        description=row["description"],
        status=row["status"],
        status_category=row["status_category"],
        priority=Priority(row["priority"]),
        assignee=row["assignee"],
        labels=tuple(row["labels"]),
        due_time=row["due_time"],
        custom_fields=custom_fields_from_text(row["custom_fields"]),
        parent_id=row["parent_id"],
        creator=row["creator"],
        updater=row["updater"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        archive_time=row["archive_time"],
        delete_time=row["delete_time"],
        version=row["version"],
    )


def add_item_messages(items: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append the contract form of item rows (the columns of `ITEM_COLUMNS`) to `items`.

    `items` is a repeated Item field (e.g. `ListItemsResponse.items`): each message is built in place,
    with no `Item` between, since a message built apart is copied when it joins a repeated field. The
    messages equal `item_message(item_from_row(row))`, which a test checks field by field; a page of 50
    is built here in about a third of the time. Query results are the hot path of the service.
    """
    add = items.add
    prefixes: dict[tuple[uuid.UUID, uuid.UUID], str] = {}
    epoch = _EPOCH
    for row in rows:
        scope = (row["tenant_id"], row["project_id"])
        prefix = prefixes.get(scope)
        if prefix is None:
            prefix = prefixes[scope] = f"{project_name(*scope)}/items/"
        assignee, parent, archived = row["assignee"], row["parent_id"], row["archive_time"]
        custom = row["custom_fields"]  # JSON text
        message = add(
            name=f"{prefix}{row['id']}",
            title=row["title"],
            description=row["description"],
            status=row["status"],
            priority=row["priority"],
            assignee=f"{USER_NAME_PREFIX}{assignee}" if assignee is not None else None,
            labels=row["labels"],
            parent=f"{prefix}{parent}" if parent is not None else None,
            archived=archived is not None,
            creator=row["creator"],
            updater=row["updater"],
            etag=f'"v{row["version"]}"',
            custom_fields=None
            if custom == "{}"
            else {key: json_value(value) for key, value in json.loads(custom).items()},
        )
        # Set in place: a Timestamp passed to the constructor is built, then copied.
        delta = row["create_time"] - epoch
        stamp = message.create_time
        stamp.seconds, stamp.nanos = delta.days * 86_400 + delta.seconds, delta.microseconds * 1000
        delta = row["update_time"] - epoch
        stamp = message.update_time
        stamp.seconds, stamp.nanos = delta.days * 86_400 + delta.seconds, delta.microseconds * 1000
        due, deleted = row["due_time"], row["delete_time"]
        if due is not None:
            message.due_time.CopyFrom(timestamp(due))
        if archived is not None:
            message.archive_time.CopyFrom(timestamp(archived))
        if deleted is not None:
            message.delete_time.CopyFrom(timestamp(deleted))


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint encoding of a non-negative integer."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


RENDER_CACHE_LOOKUPS = Counter(
    "tessera_workflow_rendered_items_total",
    "Items of list pages, by whether their serialized form came from the rendered-item cache",
    ["result"],
)
_HITS, _MISSES = RENDER_CACHE_LOOKUPS.labels("hit"), RENDER_CACHE_LOOKUPS.labels("miss")


class RenderedItems:
    """Serialized `Item` messages by (workspace, item id, version), so a page seen before is joined from bytes.

    An item's contract form is a function of its row alone, and every statement that changes a column of
    that form moves `version` on (it is the etag: `_CHANGED` in the repository; only `status_category`,
    which the form leaves out, changes without it), so one key names one form for good: an entry is
    never stale, only unused. Entries are the field's wire encoding (tag, length, message), and a page is
    one parse of their concatenation in C: about a tenth of building 50 messages field by field
    (`add_item_messages`), which is what a miss costs. The oldest entry goes when `capacity` is reached
    (0 turns the cache off); a hit does not refresh an entry, which keeps lookups to one dict read.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: dict[tuple[Any, Any, int], bytes] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def add_to(self, response: Message, rows: Sequence[Mapping[str, Any]], *, field: str = "items") -> None:
        """Append the contract form of `rows` (of `ITEM_COLUMNS`) to the repeated Item `field` of `response`."""
        if self.capacity <= 0:
            add_item_messages(getattr(response, field), rows)
            return
        entries = self._entries
        keys = [(row["tenant_id"], row["id"], row["version"]) for row in rows]
        parts = [entries.get(key, b"") for key in keys]  # an entry is never empty: it starts with the tag
        missing = [index for index, part in enumerate(parts) if not part]
        if missing:
            built = type(response)()
            add_item_messages(getattr(built, field), [rows[index] for index in missing])
            tag = _varint(response.DESCRIPTOR.fields_by_name[field].number << 3 | 2)  # length-delimited
            for index, message in zip(missing, getattr(built, field), strict=True):
                payload = message.SerializeToString()
                part = parts[index] = tag + _varint(len(payload)) + payload
                if len(entries) >= self.capacity:
                    del entries[next(iter(entries))]
                entries[keys[index]] = part
        response.MergeFromString(b"".join(parts))
        _HITS.inc(len(rows) - len(missing))
        _MISSES.inc(len(missing))


def activity_message(activity: Activity) -> workflow_pb2.Activity:
    """The contract form of an activity log entry."""
    return workflow_pb2.Activity(
        name=activity.name,
        kind=f"ACTIVITY_KIND_{activity.kind.value}",
        field=activity.field,
        before=json_value(activity.before),
        after=json_value(activity.after),
        actor=activity.actor,
        create_time=timestamp(activity.create_time),
    )
