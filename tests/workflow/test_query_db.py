"""The query compiler's statements executed on the migrated database, as the workflow login role (RLS on).

Rows are inserted directly as the superuser (no service layer needed); statements run through the
kit's unit of work exactly as the service runs them: compiled for asyncpg, tenant set, bound values.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa

from migrations import runner
from services.kit.db import Database
from services.kit.paging import PageTokenCodec, query_key
from services.kit.sql import Query
from services.workflow.query import CompiledList, ItemQuery, compile_count, compile_list

pytestmark = pytest.mark.gate("S05")

CUSTOM_FIELDS = {"estimate": "NUMBER", "team": "STRING", "billable": "BOOLEAN", "start": "TIMESTAMP"}
CATEGORIES = {"backlog": "BACKLOG", "todo": "ACTIVE", "doing": "ACTIVE", "done": "DONE"}
WORKFLOW = {
    "states": [{"id": state, "display_name": state, "category": category} for state, category in CATEGORIES.items()],
    "transitions": [],
    "initial": "todo",
}
BASE = datetime(2026, 1, 1, tzinfo=UTC)
U1, U2, U3 = (uuid.UUID(int=n) for n in (0xA1, 0xA2, 0xA3))
CODEC = PageTokenCodec(b"query-tests-page-token-secret-0123456789")


@pytest.fixture(scope="module")
async def query_db(admin_url: str) -> AsyncIterator[Database]:
    db = Database(runner.service_url(admin_url, "workflow"), service="workflow", schema="workflow", pool_size=2)
    try:
        yield db
    finally:
        await db.dispose()


@pytest.fixture(scope="module")
async def admin(admin_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(admin_url)
    try:
        yield conn
    finally:
        await conn.close()


async def create_project(admin: asyncpg.Connection, tenant: uuid.UUID, project: uuid.UUID | None = None) -> uuid.UUID:
    project = project or uuid.uuid4()
    await admin.execute(
        "INSERT INTO workflow.projects (tenant_id, id, display_name, workflow, creator) VALUES ($1, $2, $3, $4, $5)",
        tenant,
        project,
        "Query tests",
        json.dumps(WORKFLOW),
        "users/tester",
    )
    return project


async def insert_item(admin: asyncpg.Connection, tenant: uuid.UUID, project: uuid.UUID, **fields: Any) -> uuid.UUID:
    """Insert one item with defaults for what `fields` leaves out; its id."""
    row: dict[str, Any] = {
        "tenant_id": tenant,
        "id": uuid.uuid4(),
        "project_id": project,
        "title": "item",
        "status": "todo",
        "creator": "users/tester",
        "updater": "users/tester",
        **fields,
    }
    if "custom_fields" in row:
        row["custom_fields"] = json.dumps(row["custom_fields"])
    row.setdefault("status_category", CATEGORIES[row["status"]])
    names = list(row)
    placeholders = ", ".join(f"${n}" for n in range(1, len(names) + 1))
    await admin.execute(f"INSERT INTO workflow.items ({', '.join(names)}) VALUES ({placeholders})", *row.values())
    return row["id"]  # type: ignore[no-any-return]  # asyncpg records are untyped


async def fetch(db: Database, tenant: uuid.UUID, statement: sa.Select[Any]) -> list[asyncpg.Record]:
    async with db.unit_of_work(None, tenant_id=str(tenant)) as uow:
        return await uow.fetch(statement)


# --- every operator on real data ------------------------------------------------------------------------------


@dataclass
class Dataset:
    tenant: uuid.UUID
    project: uuid.UUID
    parent: uuid.UUID


@pytest.fixture(scope="module")
async def dataset(admin: asyncpg.Connection) -> Dataset:
    tenant, other_tenant = uuid.uuid4(), uuid.uuid4()
    project = await create_project(admin, tenant)

    async def add(**fields: Any) -> uuid.UUID:
        return await insert_item(admin, tenant, project, **fields)

    hour = timedelta(hours=1)
    parent = await add(
        title="Fix login crash",
        description="App crashes on login with 50% probability",
        status="todo",
        priority=3,
        assignee=U1,
        labels=["bug", "login"],
        due_time=BASE + timedelta(days=9),
        custom_fields={"estimate": 3, "team": "core", "billable": True, "start": "2026-01-05T09:00:00Z"},
        create_time=BASE + 1 * hour,
        update_time=BASE + 10 * hour,
    )
    await add(
        title="Write docs",
        description="user_guide and API",
        status="doing",
        priority=1,
        # 10:00+02:00 is 08:00Z: earlier than the item above although its text sorts later
        custom_fields={"estimate": 1.5, "team": "docs", "billable": False, "start": "2026-01-05T10:00:00+02:00"},
        create_time=BASE + 2 * hour,
        update_time=BASE + 11 * hour,
    )
    await add(
        title="Ship release",
        status="done",
        priority=4,
        assignee=U2,
        labels=["release"],
        due_time=BASE + timedelta(days=19),
        parent_id=parent,
        # values of the wrong type or not a valid instant: never match, never fail the query
        custom_fields={"estimate": "abc", "team": 5, "billable": "yes", "start": "2023-02-29T00:00:00Z"},
        create_time=BASE + 3 * hour,
        update_time=BASE + 12 * hour,
    )
    await add(
        title="Plan sprint",
        status="todo",
        priority=0,
        assignee=U1,
        labels=["bug", "planning"],
        due_time=BASE + timedelta(days=4),
        archive_time=BASE + 20 * hour,
        create_time=BASE + 4 * hour,
    )
    await add(title="Old idea", status="backlog", priority=2, labels=["bug"], delete_time=BASE + 20 * hour)
    await add(
        title="Refactor db layer",
        description="the databases are slow",
        status="doing",
        priority=2,
        assignee=U2,
        labels=["tech_debt"],
        parent_id=parent,
        custom_fields={"estimate": 8, "start": "not a time", "team": "core"},
        create_time=BASE + 5 * hour,
        update_time=BASE + 13 * hour,
    )
    # Another workspace with a project of the same id: never visible to this one.
    await create_project(admin, other_tenant, project)
    await insert_item(admin, other_tenant, project, title="Fix login crash", labels=["bug"])
    return Dataset(tenant, project, parent)


LIVE = {"Fix login crash", "Write docs", "Ship release", "Refactor db layer"}


def name_of(dataset: Dataset, item: uuid.UUID) -> str:
    return f"workspaces/{dataset.tenant}/projects/{dataset.project}/items/{item}"


FILTERS: list[tuple[str, set[str]]] = [
    ('title = "Write docs"', {"Write docs"}),
    ('title != "Write docs"', LIVE - {"Write docs"}),
    ('title:"LOGIN"', {"Fix login crash"}),
    ('title:"%"', set()),  # escaped: not a wildcard
    ('description:"50%"', {"Fix login crash"}),
    ('description:"n_l"', set()),  # escaped: "_" is not "any character" ("on login" has "n l")
    ('description:"user_guide"', {"Write docs"}),
    ("description:*", LIVE - {"Ship release"}),
    ("status = todo", {"Fix login crash"}),
    ('status != "todo"', LIVE - {"Fix login crash"}),
    ("status:doing", {"Write docs", "Refactor db layer"}),
    ("category = ACTIVE", {"Fix login crash", "Write docs", "Refactor db layer"}),
    ("category = STATE_CATEGORY_DONE", {"Ship release"}),
    ("category != active", {"Ship release"}),
    ("category = BACKLOG", set()),  # the backlog item is deleted
    ("priority >= HIGH", {"Fix login crash", "Ship release"}),
    ("priority > PRIORITY_HIGH", {"Ship release"}),
    ("priority < 2", {"Write docs"}),
    ("priority <= LOW", {"Write docs"}),
    ("priority = MEDIUM", {"Refactor db layer"}),
    ("priority != 2", LIVE - {"Refactor db layer"}),
    (f'assignee = "users/{U1}"', {"Fix login crash"}),
    (f'assignee != "users/{U1}"', LIVE - {"Fix login crash"}),  # includes the unassigned item
    ('assignee = ""', {"Write docs"}),
    ('assignee != ""', LIVE - {"Write docs"}),
    ("assignee:*", LIVE - {"Write docs"}),
    ("-assignee:*", {"Write docs"}),
    ('labels:"bug"', {"Fix login crash"}),
    ('labels:"bu"', set()),  # a label, not a substring
    ("labels:*", LIVE - {"Write docs"}),
    ("NOT labels:*", {"Write docs"}),
    ('parent = ""', {"Fix login crash", "Write docs"}),
    ("parent:*", {"Ship release", "Refactor db layer"}),
    ('due_time < "2026-01-15T00:00:00Z"', {"Fix login crash"}),
    ('due_time >= "2026-01-10T00:00:00Z"', {"Fix login crash", "Ship release"}),
    ('due_time = "2026-01-10T01:00:00+01:00"', {"Fix login crash"}),
    ("due_time:*", {"Fix login crash", "Ship release"}),
    ('NOT due_time < "2026-01-15T00:00:00Z"', LIVE - {"Fix login crash"}),  # the complement: no due time too
    ('due_time != "2026-01-10T00:00:00Z"', LIVE - {"Fix login crash"}),
    ('create_time > "2026-01-01T02:00:00Z"', {"Ship release", "Refactor db layer"}),
    ('create_time <= "2026-01-01T02:00:00Z"', {"Fix login crash", "Write docs"}),
    ('update_time >= "2026-01-01T12:00:00Z"', {"Ship release", "Refactor db layer"}),
    ('update_time < "2026-01-01T12:00:00+01:00"', {"Fix login crash"}),  # 11:00Z: "Write docs" is not before
    ("archived = true", {"Plan sprint"}),
    ("archived = false", LIVE),
    ("archived != false", {"Plan sprint"}),
    ("archived = true OR status = doing", {"Plan sprint", "Write docs", "Refactor db layer"}),
    ("custom_fields.estimate > 2", {"Fix login crash", "Refactor db layer"}),
    ("custom_fields.estimate <= 1.5", {"Write docs"}),
    ("custom_fields.estimate = 3.0", {"Fix login crash"}),
    ("custom_fields.estimate != 3", LIVE - {"Fix login crash"}),
    ("custom_fields.estimate:*", LIVE),
    ('custom_fields.team = "core"', {"Fix login crash", "Refactor db layer"}),
    ("custom_fields.team = 5", set()),  # the text "5", not the number 5
    ('custom_fields.team:"O"', {"Fix login crash", "Write docs", "Refactor db layer"}),
    ('custom_fields.team:"5"', set()),  # substring only of strings
    ('custom_fields.team != "core"', {"Write docs", "Ship release"}),
    ("custom_fields.billable = true", {"Fix login crash"}),
    ("custom_fields.billable = false", {"Write docs"}),
    ("custom_fields.billable != true", LIVE - {"Fix login crash"}),
    ("-custom_fields.billable:*", {"Refactor db layer"}),
    ('custom_fields.start < "2026-01-05T08:30:00Z"', {"Write docs"}),
    ('custom_fields.start >= "2026-01-05T08:30:00Z"', {"Fix login crash"}),
    ('custom_fields.start = "2026-01-05T10:00:00+01:00"', {"Fix login crash"}),
    ('NOT custom_fields.start >= "2026-01-05T08:30:00Z"', LIVE - {"Fix login crash"}),
    # AIP-160 precedence: OR binds tighter than AND
    ("status = todo OR status = doing AND priority = 2", {"Refactor db layer"}),
    ("status = todo OR (status = doing AND priority = 2)", {"Fix login crash", "Refactor db layer"}),
    ("priority = 2 status = doing", {"Refactor db layer"}),
    ("-(status = todo OR status = doing)", {"Ship release"}),
    (f'NOT (labels:"bug" OR assignee = "users/{U2}")', {"Write docs"}),
]


@pytest.mark.parametrize(("text", "expected"), FILTERS, ids=[case[0] for case in FILTERS])
async def test_filter_on_real_rows(query_db: Database, dataset: Dataset, text: str, expected: set[str]) -> None:
    compiled = compile_list(ItemQuery(dataset.tenant, dataset.project, filter=text), CUSTOM_FIELDS)
    rows = await fetch(query_db, dataset.tenant, compiled.statement(None, 100))
    assert {row["title"] for row in rows} == expected


async def test_parent_filter_on_real_rows(query_db: Database, dataset: Dataset) -> None:
    parent = name_of(dataset, dataset.parent)
    for text, expected in [
        (f'parent = "{parent}"', {"Ship release", "Refactor db layer"}),
        (f'parent != "{parent}"', {"Fix login crash", "Write docs"}),
    ]:
        compiled = compile_list(ItemQuery(dataset.tenant, dataset.project, filter=text), {})
        rows = await fetch(query_db, dataset.tenant, compiled.statement(None, 100))
        assert {row["title"] for row in rows} == expected, text


@pytest.mark.parametrize(
    ("show_deleted", "show_archived", "expected"),
    [
        (False, False, {"Fix login crash"}),
        (True, False, {"Fix login crash", "Old idea"}),
        (False, True, {"Fix login crash", "Plan sprint"}),
        (True, True, {"Fix login crash", "Old idea", "Plan sprint"}),
    ],
)
async def test_show_flags_on_real_rows(
    query_db: Database, dataset: Dataset, show_deleted: bool, show_archived: bool, expected: set[str]
) -> None:
    query = ItemQuery(
        dataset.tenant, dataset.project, filter='labels:"bug"', show_deleted=show_deleted, show_archived=show_archived
    )
    rows = await fetch(query_db, dataset.tenant, compile_list(query, {}).statement(None, 100))
    assert {row["title"] for row in rows} == expected


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ("crash", {"Fix login crash"}),  # title "crash", description "crashes": both stem to "crash"
        ("database", {"Refactor db layer"}),  # the description's "databases"
        ('"login crash"', {"Fix login crash"}),
        ("login -crash", set()),
        ("docs or release", {"Write docs", "Ship release"}),
        ("the", set()),  # only a stop word: an empty query matches nothing, and does not fail
        ("'; DROP TABLE items; --", set()),
    ],
)
async def test_search_on_real_rows(query_db: Database, dataset: Dataset, search: str, expected: set[str]) -> None:
    compiled = compile_list(ItemQuery(dataset.tenant, dataset.project, search=search), {})
    rows = await fetch(query_db, dataset.tenant, compiled.statement(None, 100))
    assert {row["title"] for row in rows} == expected


async def test_another_workspace_sees_nothing(query_db: Database, dataset: Dataset) -> None:
    compiled = compile_list(ItemQuery(dataset.tenant, dataset.project), {})
    statement = compiled.statement(None, 100)
    assert {row["title"] for row in await fetch(query_db, dataset.tenant, statement)} == LIVE
    # The same query in another tenant's transaction: row-level security hides every row.
    assert await fetch(query_db, uuid.uuid4(), statement) == []


@pytest.mark.parametrize(
    ("group_by", "text", "expected"),
    [
        ("", "", [("", 4)]),
        ("", "status = nope", [("", 0)]),
        ("status", "", [("doing", 2), ("done", 1), ("todo", 1)]),
        ("status", "priority >= 2", [("doing", 1), ("done", 1), ("todo", 1)]),  # ties by key
        ("assignee", "", [(f"users/{U2}", 2), ("", 1), (f"users/{U1}", 1)]),
        ("label", "", [("", 1), ("bug", 1), ("login", 1), ("release", 1), ("tech_debt", 1)]),
        ("label", "archived = true OR status = todo", [("bug", 2), ("login", 1), ("planning", 1)]),
    ],
)
async def test_count_on_real_rows(
    query_db: Database, dataset: Dataset, group_by: str, text: str, expected: list[tuple[str, int]]
) -> None:
    query = ItemQuery(dataset.tenant, dataset.project, filter=text)
    rows = await fetch(query_db, dataset.tenant, compile_count(query, CUSTOM_FIELDS, group_by))
    assert [(row["key"], row["count"]) for row in rows] == expected


async def test_count_with_search_and_show_deleted(query_db: Database, dataset: Dataset) -> None:
    query = ItemQuery(dataset.tenant, dataset.project, search="crash", show_deleted=True)
    rows = await fetch(query_db, dataset.tenant, compile_count(query, {}, "label"))
    assert [(row["key"], row["count"]) for row in rows] == [("bug", 1), ("login", 1)]


# --- keyset paging --------------------------------------------------------------------------------------------

SORT_FIELDS = {"title", "status", "priority", "assignee", "due_time", "create_time", "update_time"}


def expected_order(rows: Sequence[dict[str, Any]], order_by: str) -> list[uuid.UUID]:
    """The order PostgreSQL must produce: NULLs last ascending and first descending, ties by id."""
    keys = [part.split() for part in (order_by or "create_time desc").split(",")]
    spec = [(words[0], len(words) > 1 and words[1].lower() == "desc") for words in keys]
    spec.append(("id", spec[-1][1]))
    ordered = list(rows)
    for field, descending in reversed(spec):  # stable sorts, least significant key first
        ordered.sort(key=lambda row: (row[field] is None, row[field]), reverse=descending)
    return [row["id"] for row in ordered]


async def page_through(
    db: Database,
    compiled: CompiledList,
    tenant: uuid.UUID,
    page_size: int,
    between_pages: Any = None,
) -> list[uuid.UUID]:
    """All ids, page by page as the service does it (limit + 1, cursor through a signed page token)."""
    key = query_key(*compiled.key_parts)
    seen: list[uuid.UUID] = []
    token = ""
    while True:
        after = CODEC.decode(token, query_key=key, issued_to="tester") if token else None
        rows = await fetch(db, tenant, compiled.statement(after, page_size + 1))
        page = rows[:page_size]
        seen.extend(row["id"] for row in page)
        if len(rows) <= page_size:
            return seen
        token = CODEC.encode(compiled.cursor(page[-1]), query_key=key, issued_to="tester")
        if between_pages is not None:
            await between_pages()


@dataclass
class Paging:
    tenant: uuid.UUID
    project: uuid.UUID
    rows: list[dict[str, Any]]


def random_fields(rng: random.Random) -> dict[str, Any]:
    """Few distinct values per key, so that ties and NULLs are everywhere."""
    return {
        "title": rng.choice(["alpha", "bravo", "charlie"]),
        "status": rng.choice(["todo", "doing", "done"]),
        "priority": rng.randint(0, 4),
        "assignee": rng.choice([None, U1, U2, U3]),
        "due_time": rng.choice([None, BASE + timedelta(days=1), BASE + timedelta(days=2, microseconds=7)]),
        "create_time": BASE + timedelta(minutes=rng.randint(0, 4)),
        "update_time": BASE + timedelta(hours=rng.randint(0, 2)),
    }


@pytest.fixture(scope="module")
async def paging(admin: asyncpg.Connection) -> Paging:
    rng = random.Random(20260105)
    tenant = uuid.uuid4()
    project = await create_project(admin, tenant)
    rows = []
    for _ in range(45):
        fields = random_fields(rng)
        item = await insert_item(admin, tenant, project, **fields)
        rows.append({"id": item, **fields})
    # Not listed: deleted and archived items in the middle of the order.
    await insert_item(admin, tenant, project, delete_time=BASE, **random_fields(rng))
    await insert_item(admin, tenant, project, archive_time=BASE, **random_fields(rng))
    return Paging(tenant, project, rows)


ORDERS = [
    "",
    "create_time",
    "title, priority desc",
    "assignee",
    "assignee desc, title",
    "due_time",
    "due_time desc, priority",
    "priority desc, due_time, assignee desc",
    "status desc, update_time",
    "title desc, status, create_time desc",
    "update_time desc, due_time desc, assignee",
]


@pytest.mark.parametrize("order_by", ORDERS)
@pytest.mark.parametrize("page_size", [1, 4, 7])
async def test_paging_returns_every_row_once_in_order(
    query_db: Database, paging: Paging, order_by: str, page_size: int
) -> None:
    compiled = compile_list(ItemQuery(paging.tenant, paging.project, order_by=order_by), {})
    seen = await page_through(query_db, compiled, paging.tenant, page_size)
    assert seen == expected_order(paging.rows, order_by)


@pytest.mark.parametrize("order_by", ["due_time desc, priority", "assignee, title desc"])
async def test_paging_with_a_filter(query_db: Database, paging: Paging, order_by: str) -> None:
    query = ItemQuery(paging.tenant, paging.project, filter="priority >= 2 OR -assignee:*", order_by=order_by)
    seen = await page_through(query_db, compile_list(query, {}), paging.tenant, 3)
    matching = [row for row in paging.rows if row["priority"] >= 2 or row["assignee"] is None]
    assert seen == expected_order(matching, order_by)
    assert 0 < len(seen) < len(paging.rows)


@pytest.mark.parametrize("order_by", ["", "priority desc, due_time", "assignee, title desc", "due_time desc"])
async def test_paging_while_rows_are_inserted_between_pages(
    query_db: Database, admin: asyncpg.Connection, order_by: str
) -> None:
    rng = random.Random(order_by)
    tenant = uuid.uuid4()
    project = await create_project(admin, tenant)
    existing = [await insert_item(admin, tenant, project, **random_fields(rng)) for _ in range(30)]
    inserted: list[uuid.UUID] = []

    async def insert_more() -> None:
        # Rows landing before, at and after the cursor in every order (ties with existing rows included).
        for _ in range(3):
            fields = random_fields(rng)
            fields["create_time"] = rng.choice([fields["create_time"], BASE + timedelta(days=30)])
            inserted.append(await insert_item(admin, tenant, project, **fields))

    compiled = compile_list(ItemQuery(tenant, project, order_by=order_by), {})
    seen = await page_through(query_db, compiled, tenant, 4, between_pages=insert_more)
    assert len(inserted) >= 21  # rows really were inserted while paging
    assert len(seen) == len(set(seen)), "an item was served twice"
    assert set(existing) <= set(seen), "an item that existed before the first page was skipped"
    assert set(seen) <= set(existing) | set(inserted)


@pytest.mark.parametrize("after", [None, [(BASE + timedelta(minutes=2)).isoformat(), str(uuid.UUID(int=1))]])
async def test_default_order_is_served_by_the_index_without_a_sort(
    query_db: Database, paging: Paging, after: list[str] | None
) -> None:
    # Small tables make sequential scans cheapest, so they are switched off: the point is that the
    # keyset page can walk ix_items_project_create_time in order (no Sort node), as it must at scale.
    query = Query(compile_list(ItemQuery(paging.tenant, paging.project), {}).statement(after, 51))
    async with query_db.unit_of_work(None, tenant_id=str(paging.tenant)) as uow:
        await uow.driver.execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off")
        plan = await uow.driver.fetchval(f"EXPLAIN (FORMAT JSON) {query.sql}", *query.arguments({}))
    nodes = []
    document = json.loads(plan) if isinstance(plan, str) else plan  # the pool may already decode json
    pending = [document[0]["Plan"]]
    while pending:
        node = pending.pop()
        nodes.append(node)
        pending.extend(node.get("Plans", []))
    assert any(node.get("Index Name") == "ix_items_project_create_time" for node in nodes), plan
    assert not any(node["Node Type"] in ("Sort", "Incremental Sort") for node in nodes), plan
