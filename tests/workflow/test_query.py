"""The query compiler without a database: filter → SQL text and bound values, errors, order_by, keyset SQL.

Execution against PostgreSQL is in test_query_db.py. SQL is compiled with the PostgreSQL dialect
(`%(name)s` placeholders); `workflow.items.` is stripped from the text for readability.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect

from services.kit.errors import InvalidArgument
from services.kit.paging import INVALID_PAGE_TOKEN
from services.workflow.query import (
    INVALID_FILTER,
    MAX_DEPTH,
    MAX_RESTRICTIONS,
    STORED_TIMESTAMP_PATTERN,
    ItemQuery,
    compile_count,
    compile_filter,
    compile_list,
)

pytestmark = pytest.mark.gate("S05")

TENANT = uuid.UUID("0193a1b2-0000-7000-8000-000000000001")
PROJECT = uuid.UUID("0193a1b2-0000-7000-8000-000000000002")
USER = uuid.UUID("0193a1b2-0000-7000-8000-0000000000aa")
ITEM = uuid.UUID("0193a1b2-0000-7000-8000-0000000000bb")
ITEM_NAME = f"workspaces/{TENANT}/projects/{PROJECT}/items/{ITEM}"
QUERY = ItemQuery(TENANT, PROJECT)
CUSTOM_FIELDS = {"estimate": "NUMBER", "team": "STRING", "size": "ENUM", "billable": "BOOLEAN", "start": "TIMESTAMP"}

PG = postgresql.dialect()  # type: ignore[no-untyped-call]  # SQLAlchemy's dialect constructors are untyped
ASYNCPG = asyncpg_dialect.dialect()  # type: ignore[no-untyped-call]  # (same)


def sql(clause: sa.ClauseElement, dialect: Any = PG) -> tuple[str, dict[str, Any]]:
    compiled = clause.compile(dialect=dialect)
    return " ".join(compiled.string.replace("workflow.items.", "").split()), dict(compiled.params)


def filter_sql(text: str, custom_fields: dict[str, str] = CUSTOM_FIELDS) -> tuple[str, dict[str, Any]]:
    clause = compile_filter(text, QUERY, custom_fields)
    assert clause is not None
    return sql(clause)


def jan(day: int, hour: int = 0, tz: timezone = UTC) -> datetime:
    return datetime(2026, 1, day, hour, tzinfo=tz)


NUMBER = "CASE WHEN (jsonb_typeof(custom_fields -> %(key_1)s::VARCHAR) = %(jsonb_typeof_1)s::VARCHAR) THEN CAST(custom_fields ->> %(key_1)s::VARCHAR AS NUMERIC) END"  # noqa: E501
STORED_TIME = "CASE WHEN ((custom_fields ->> %(key_1)s::VARCHAR) ~ %(rfc3339_1)s::VARCHAR) THEN CAST(custom_fields ->> %(key_1)s::VARCHAR AS TIMESTAMP WITH TIME ZONE) END"  # noqa: E501


def _number_values(number: str) -> dict[str, Any]:
    return {"key_1": "estimate", "jsonb_typeof_1": "number", "number_1": Decimal(number)}


def _time_values(key: str, value: datetime) -> dict[str, Any]:
    return {"key_1": key, "rfc3339_1": STORED_TIMESTAMP_PATTERN, "timestamp_1": value}


# (filter, SQL, bound values): every field kind and every operator it supports.
FILTER_TO_SQL: list[tuple[str, str, dict[str, Any]]] = [
    # title: exact, and case-insensitive substring with LIKE wildcards escaped
    ('title = "Fix login"', "title = %(title_1)s::VARCHAR", {"title_1": "Fix login"}),
    ('title != "x"', "title != %(title_1)s::VARCHAR", {"title_1": "x"}),
    ('title:"50%_off/"', "title ILIKE %(title_1)s::VARCHAR ESCAPE '/'", {"title_1": "%50/%/_off//%"}),
    ("title:*", "title != %(title_1)s::VARCHAR", {"title_1": ""}),
    # description: has only
    ('description:"crash"', "description ILIKE %(description_1)s::VARCHAR ESCAPE '/'", {"description_1": "%crash%"}),
    ("description:*", "description != %(description_1)s::VARCHAR", {"description_1": ""}),
    # status: a state id, quoted or bare; `:` is `=`
    ("status = in_progress", "status = %(status_1)s::VARCHAR", {"status_1": "in_progress"}),
    ('status != "done"', "status != %(status_1)s::VARCHAR", {"status_1": "done"}),
    ("status:todo", "status = %(status_1)s::VARCHAR", {"status_1": "todo"}),
    # category: short or full enum names
    ("category = DONE", "status_category = %(status_category_1)s::VARCHAR", {"status_category_1": "DONE"}),
    (
        "category != STATE_CATEGORY_CANCELLED",
        "NOT coalesce(status_category = %(status_category_1)s::VARCHAR, false)",
        {"status_category_1": "CANCELLED"},
    ),
    # priority: enum names (any case, with or without prefix) or numbers, every comparator
    ("priority = HIGH", "priority = %(priority_1)s::SMALLINT", {"priority_1": 3}),
    ("priority != urgent", "priority != %(priority_1)s::SMALLINT", {"priority_1": 4}),
    ("priority < 2", "priority < %(priority_1)s::SMALLINT", {"priority_1": 2}),
    ("priority <= LOW", "priority <= %(priority_1)s::SMALLINT", {"priority_1": 1}),
    ("priority > UNSPECIFIED", "priority > %(priority_1)s::SMALLINT", {"priority_1": 0}),
    ("priority >= PRIORITY_MEDIUM", "priority >= %(priority_1)s::SMALLINT", {"priority_1": 2}),
    # assignee: a user name, "" for unassigned, `:*` for assigned; != also matches unassigned items
    (f'assignee = "users/{USER}"', "assignee = %(assignee_1)s::UUID", {"assignee_1": USER}),
    (f'assignee != "users/{USER}"', "NOT coalesce(assignee = %(assignee_1)s::UUID, false)", {"assignee_1": USER}),
    ('assignee = ""', "assignee IS NULL", {}),
    ('assignee != ""', "assignee IS NOT NULL", {}),
    ("assignee:*", "assignee IS NOT NULL", {}),
    # labels: has a label, has any label
    ('labels:"bug"', "labels @> %(labels_1)s::TEXT[]", {"labels_1": ["bug"]}),
    ('labels:"*"', "labels @> %(labels_1)s::TEXT[]", {"labels_1": ["*"]}),  # quoted: the label "*"
    ("labels:*", "cardinality(labels) > %(cardinality_1)s::INTEGER", {"cardinality_1": 0}),
    # parent: an item name of this project, "" for top-level items, `:*` for sub-items
    (f'parent = "{ITEM_NAME}"', "parent_id = %(parent_id_1)s::UUID", {"parent_id_1": ITEM}),
    (f'parent != "{ITEM_NAME}"', "NOT coalesce(parent_id = %(parent_id_1)s::UUID, false)", {"parent_id_1": ITEM}),
    ('parent = ""', "parent_id IS NULL", {}),
    ("parent:*", "parent_id IS NOT NULL", {}),
    # times: RFC 3339 strings with any offset, every comparator; due_time may be missing
    (
        'due_time < "2026-01-01T00:00:00Z"',
        "due_time < %(due_time_1)s::TIMESTAMP WITH TIME ZONE",
        {"due_time_1": jan(1)},
    ),
    ("due_time:*", "due_time IS NOT NULL", {}),
    (
        'due_time != "2026-01-01T00:00:00Z"',
        "NOT coalesce(due_time = %(due_time_1)s::TIMESTAMP WITH TIME ZONE, false)",
        {"due_time_1": jan(1)},
    ),
    (
        'create_time >= "2026-01-02T01:00:00+01:00"',
        "create_time >= %(create_time_1)s::TIMESTAMP WITH TIME ZONE",
        {"create_time_1": jan(2, 1, timezone(timedelta(hours=1)))},
    ),
    (
        'create_time = "2026-01-02T00:00:00z"',
        "create_time = %(create_time_1)s::TIMESTAMP WITH TIME ZONE",
        {"create_time_1": jan(2)},
    ),
    (
        'update_time <= "2026-01-01T00:00:00.1234567Z"',
        "update_time <= %(update_time_1)s::TIMESTAMP WITH TIME ZONE",
        {"update_time_1": jan(1).replace(microsecond=123456)},
    ),
    (
        'update_time > "2026-01-01 00:00:00-02:30"',
        "update_time > %(update_time_1)s::TIMESTAMP WITH TIME ZONE",
        {"update_time_1": datetime(2026, 1, 1, tzinfo=timezone(-timedelta(hours=2, minutes=30)))},
    ),
    # archived
    ("archived = true", "archive_time IS NOT NULL", {}),
    ("archived = false", "archive_time IS NULL", {}),
    ("archived != true", "archive_time IS NULL", {}),
    # custom fields, typed by the project's definitions; a value of the wrong JSON type never matches
    ("custom_fields.estimate > 2.5", f"{NUMBER} > %(number_1)s", _number_values("2.5")),
    ("custom_fields.estimate = 3", f"{NUMBER} = %(number_1)s", _number_values("3")),
    ("custom_fields.estimate <= -1e3", f"{NUMBER} <= %(number_1)s", _number_values("-1e3")),
    ("custom_fields.estimate != 0", f"NOT coalesce({NUMBER} = %(number_1)s, false)", _number_values("0")),
    (
        'custom_fields.team = "core"',
        "custom_fields @> CAST(%(custom_fields_1)s::VARCHAR AS JSONB)",
        {"custom_fields_1": '{"team": "core"}'},
    ),
    (
        'custom_fields.team:"co"',
        "CASE WHEN (jsonb_typeof(custom_fields -> %(key_1)s::VARCHAR) = %(jsonb_typeof_1)s::VARCHAR) "
        "THEN custom_fields ->> %(key_1)s::VARCHAR END ILIKE %(pattern_1)s::VARCHAR ESCAPE '/'",
        {"key_1": "team", "jsonb_typeof_1": "string", "pattern_1": "%co%"},
    ),
    (
        "custom_fields.size != L",
        "NOT (custom_fields @> CAST(%(custom_fields_1)s::VARCHAR AS JSONB))",
        {"custom_fields_1": '{"size": "L"}'},
    ),
    (
        "custom_fields.billable = true",
        "custom_fields @> CAST(%(custom_fields_1)s::VARCHAR AS JSONB)",
        {"custom_fields_1": '{"billable": true}'},
    ),
    (
        'custom_fields.start >= "2026-01-01T00:00:00Z"',
        f"{STORED_TIME} >= %(timestamp_1)s::TIMESTAMP WITH TIME ZONE",
        _time_values("start", jan(1)),
    ),
    (
        'custom_fields.start < "2026-01-01T00:00:00Z"',
        f"{STORED_TIME} < %(timestamp_1)s::TIMESTAMP WITH TIME ZONE",
        _time_values("start", jan(1)),
    ),
    ("custom_fields.team:*", "custom_fields ? %(custom_fields_1)s::VARCHAR", {"custom_fields_1": "team"}),
    ("custom_fields.estimate:*", "custom_fields ? %(custom_fields_1)s::VARCHAR", {"custom_fields_1": "estimate"}),
    # logic: OR binds tighter than AND (AIP-160); juxtaposition is AND; NOT and - are the complement
    (
        "priority = HIGH AND status = todo OR status = doing",
        "priority = %(priority_1)s::SMALLINT AND (status = %(status_1)s::VARCHAR OR status = %(status_2)s::VARCHAR)",
        {"priority_1": 3, "status_1": "todo", "status_2": "doing"},
    ),
    (
        "(priority = HIGH AND status = todo) OR status = doing",
        "priority = %(priority_1)s::SMALLINT AND status = %(status_1)s::VARCHAR OR status = %(status_2)s::VARCHAR",
        {"priority_1": 3, "status_1": "todo", "status_2": "doing"},
    ),
    (
        "priority = HIGH status = todo",
        "priority = %(priority_1)s::SMALLINT AND status = %(status_1)s::VARCHAR",
        {"priority_1": 3, "status_1": "todo"},
    ),
    ("NOT priority = HIGH", "priority != %(priority_1)s::SMALLINT", {"priority_1": 3}),
    ("-priority >= HIGH", "priority < %(priority_1)s::SMALLINT", {"priority_1": 3}),
    (
        '-due_time < "2026-01-01T00:00:00Z"',
        "NOT coalesce(due_time < %(due_time_1)s::TIMESTAMP WITH TIME ZONE, false)",
        {"due_time_1": jan(1)},
    ),
    (
        'NOT (labels:"bug" OR assignee = "")',
        "NOT ((labels @> %(labels_1)s::TEXT[]) OR assignee IS NULL)",
        {"labels_1": ["bug"]},
    ),
    (
        f'NOT (labels:"bug" OR assignee = "users/{USER}")',
        "NOT coalesce((labels @> %(labels_1)s::TEXT[]) OR assignee = %(assignee_1)s::UUID, false)",
        {"labels_1": ["bug"], "assignee_1": USER},
    ),
    (
        'title = "a\\"b\\\\c"',  # escapes in string literals
        "title = %(title_1)s::VARCHAR",
        {"title_1": 'a"b\\c'},
    ),
]


@pytest.mark.parametrize(
    ("text", "expected_sql", "expected_values"), FILTER_TO_SQL, ids=[f for f, _, _ in FILTER_TO_SQL]
)
def test_filter_to_sql(text: str, expected_sql: str, expected_values: dict[str, Any]) -> None:
    assert filter_sql(text) == (expected_sql, expected_values)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_filter_compiles_to_nothing(text: str) -> None:
    assert compile_filter(text, QUERY, CUSTOM_FIELDS) is None


def test_custom_field_types_accept_the_enum_names() -> None:
    assert filter_sql("custom_fields.n > 1", {"n": "CUSTOM_FIELD_TYPE_NUMBER"})[0].startswith("CASE WHEN")
    with pytest.raises(ValueError, match="unknown custom field type"):
        compile_filter("custom_fields.n > 1", QUERY, {"n": "COLOR"})


# --- errors ---------------------------------------------------------------------------------------------------

# (filter, 1-based position, token, a fragment of the message)
FILTER_ERRORS: list[tuple[str, int, str, str]] = [
    # syntax
    ('title = "x" )', 13, ")", 'unexpected token ")" at position 13'),
    ('(title = "x"', 13, "", "unexpected end of filter at position 13"),
    ("title =", 8, "", "unexpected end of filter at position 8"),
    ('title = "x" AND', 16, "", "unexpected end of filter"),
    ('title = "x" AND OR status = a', 17, "OR", 'unexpected token "OR" at position 17'),
    ("title == 1", 8, "=", 'unexpected token "=" at position 8'),
    ("title = 'x'", 9, "'", 'unexpected character "\'" at position 9'),
    ('title = "x', 9, '"x', 'unterminated string "x at position 9'),
    ("priority = HIGH, status = a", 16, ",", 'unexpected character "," at position 16'),
    ("status = a.b", 11, ".", 'unexpected token "." at position 11'),
    ("title = !x", 9, "!", 'unexpected character "!" at position 9'),
    ("title = x\x00", 10, "\\u0000", "NUL character"),
    # bare text (a global restriction)
    ("urgent", 1, "urgent", '"urgent" at position 1: bare text is not supported here; use the `search` field'),
    ('status = a "login bug"', 12, '"login bug"', "bare text is not supported here; use the `search` field"),
    ("status = a and priority = 1", 12, "and", "AND, OR and NOT are upper case"),
    ("42", 1, "42", "bare text is not supported here"),
    # fields
    ("foo = 1", 1, "foo", 'unknown field "foo" at position 1'),
    ("Title = x", 1, "Title", 'unknown field "Title"'),
    ("title.length > 3", 1, "title.length", 'unknown field "title.length"'),
    ("custom_fields = 1", 1, "custom_fields", 'unknown field "custom_fields"'),
    ("custom_fields.nope = 1", 1, "custom_fields.nope", 'the project has no custom field "nope"'),
    ("custom_fields.team.x = 1", 1, "custom_fields.team.x", "unknown field"),
    ('"title" = "x"', 1, '"title"', 'expected a field name, got "title" at position 1'),
    # operators
    ('labels > "x"', 8, ">", 'operator ">" at position 8 is not supported for labels'),
    ('labels = "x"', 8, "=", "not supported for labels"),
    ('description = "x"', 13, "=", "not supported for description"),
    ("category > DONE", 10, ">", "not supported for category"),
    ("title < x", 7, "<", "not supported for title"),
    ("archived > false", 10, ">", "not supported for archived"),
    ('create_time:"x"', 12, ":", "not supported for create_time"),
    ('assignee:"users/x"', 10, '"users/x"', "assignee supports `:` only with `*`"),
    ('due_time:"2026-01-01T00:00:00Z"', 10, '"2026-01-01T00:00:00Z"', "due_time supports `:` only with `*`"),
    ("custom_fields.estimate:5", 23, ":", "not supported for custom_fields.estimate"),
    ("custom_fields.billable < true", 24, "<", "not supported for custom_fields.billable"),
    ("priority = *", 12, "*", "`*` only follows `:`"),
    # types
    (
        'priority = "abc"',
        12,
        '"abc"',
        'priority expects a priority (UNSPECIFIED, LOW, MEDIUM, HIGH, URGENT or 0-4), got "abc"',
    ),
    ("priority = 5", 12, "5", "priority expects a priority"),
    ("priority = 2.5", 12, "2.5", "priority expects a priority"),
    ("priority = -1", 12, "-1", "priority expects a priority"),
    ("due_time > 5", 12, "5", "due_time expects an RFC 3339 timestamp string"),
    ('due_time > "2026-01-01"', 12, '"2026-01-01"', "RFC 3339"),
    ('due_time > "2026-01-01T00:00:00"', 12, '"2026-01-01T00:00:00"', "RFC 3339"),  # no offset
    ('due_time > "2026-02-30T00:00:00Z"', 12, '"2026-02-30T00:00:00Z"', "RFC 3339"),
    ('create_time < "yesterday"', 15, '"yesterday"', "create_time expects an RFC 3339"),
    ("category = DOING", 12, "DOING", "category expects a state category"),
    ("archived = yes", 12, "yes", "archived expects true or false"),
    ('archived = "true"', 12, '"true"', "archived expects true or false"),
    ('assignee = "bob"', 12, '"bob"', 'assignee expects a user name ("users/{id}") or ""'),
    ('assignee = "users/not-a-uuid-not-a-uuid-not-a-uuid-xx"', 12, '"users/', "assignee expects a user name"),
    ('parent = "items/1"', 10, '"items/1"', "parent expects an item name"),
    ('custom_fields.estimate > "5"', 26, '"5"', "custom_fields.estimate expects a number"),
    ("custom_fields.estimate > 1e5000", 26, "1e5000", "expects a number"),
    ("custom_fields.billable = 1", 26, "1", "custom_fields.billable expects true or false"),
    ("custom_fields.start > 5", 23, "5", "custom_fields.start expects an RFC 3339"),
]


@pytest.mark.parametrize(
    ("text", "position", "token", "message"), FILTER_ERRORS, ids=[repr(case[0]) for case in FILTER_ERRORS]
)
def test_filter_errors_name_position_and_token(text: str, position: int, token: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        compile_list(ItemQuery(TENANT, PROJECT, filter=text), CUSTOM_FIELDS)
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == INVALID_FILTER
    assert error.metadata["position"] == str(position)
    assert error.metadata["token"].startswith(token)
    assert message in error.message
    assert f"at position {position}" in error.message
    assert error.message.startswith("invalid filter: ")
    [violation] = error.violations
    assert violation.field == "filter"
    assert f"at position {position}" in violation.description


def test_parent_of_another_project_is_an_error() -> None:
    other = f"workspaces/{TENANT}/projects/{uuid.uuid4()}/items/{ITEM}"
    with pytest.raises(InvalidArgument) as caught:
        compile_filter(f'parent = "{other}"', QUERY, {})
    assert caught.value.metadata == {"position": "10", "token": f'"{other}"'}
    assert "is not an item of this project" in caught.value.message


def test_braces_in_tokens_are_not_format_fields() -> None:
    with pytest.raises(InvalidArgument) as caught:
        compile_filter("custom_fields.{at.__class__} = 1", QUERY, CUSTOM_FIELDS)
    assert 'unknown field "custom_fields.{at.__class__}" at position 1' in caught.value.message
    with pytest.raises(InvalidArgument) as caught:
        compile_filter("custom_fields.{key}{0} = 1", QUERY, CUSTOM_FIELDS)
    assert 'the project has no custom field "{key}{0}"' in caught.value.message


# --- limits ---------------------------------------------------------------------------------------------------


def test_nesting_limit() -> None:
    inner = 'title = "x"'
    assert compile_filter("(" * MAX_DEPTH + inner + ")" * MAX_DEPTH, QUERY, {}) is not None
    too_deep = "(" * (MAX_DEPTH + 1) + inner + ")" * (MAX_DEPTH + 1)
    with pytest.raises(InvalidArgument) as caught:
        compile_filter(too_deep, QUERY, {})
    assert caught.value.metadata == {"position": str(MAX_DEPTH + 1), "token": "("}
    assert f"deeper than {MAX_DEPTH}" in caught.value.message


def test_nesting_far_beyond_the_limit_is_an_error_not_a_crash() -> None:
    depth = 2000
    with pytest.raises(InvalidArgument, match="deeper than"):
        compile_filter("(" * depth + "a = 1" + ")" * depth, QUERY, {})
    with pytest.raises(InvalidArgument, match="unexpected end of filter"):
        compile_filter("-(" * depth, QUERY, {})


def test_restriction_limit() -> None:
    allowed = " OR ".join(f"status = s{n}" for n in range(MAX_RESTRICTIONS))
    assert compile_filter(allowed, QUERY, {}) is not None
    too_many = allowed + " OR status = extra"
    with pytest.raises(InvalidArgument) as caught:
        compile_filter(too_many, QUERY, {})
    assert caught.value.metadata == {"position": str(len(allowed) + 5), "token": "status"}
    assert f"more than {MAX_RESTRICTIONS} restrictions" in caught.value.message


def test_filter_length_limit() -> None:
    with pytest.raises(InvalidArgument) as caught:
        compile_filter('title = "' + "x" * 5000 + '"', QUERY, {})
    assert caught.value.metadata["position"] == "4097"


# --- injection ------------------------------------------------------------------------------------------------

INJECTED = "x'; DROP TABLE items; --"


def list_sql(query: ItemQuery, after: list[str] | None = None) -> tuple[str, dict[str, Any]]:
    compiled = compile_list(query, CUSTOM_FIELDS)
    return sql(compiled.statement(after, 10), ASYNCPG)


@pytest.mark.parametrize(
    "text",
    [
        f'title = "{INJECTED}"',
        f'title:"{INJECTED}"',
        f'labels:"{INJECTED}"',
        f'custom_fields.team = "{INJECTED}"',
        f'custom_fields.team:"{INJECTED}"',
        f"status = {INJECTED.replace(' ', '').replace(chr(39), '')}",
    ],
)
def test_injection_through_filter_values_stays_in_bound_values(text: str) -> None:
    statement, values = list_sql(ItemQuery(TENANT, PROJECT, filter=text))
    assert "DROP" not in statement
    assert ";" not in statement
    assert any("DROP" in str(value) for value in values.values())


def test_injection_through_search_stays_in_a_bound_value() -> None:
    statement, values = list_sql(ItemQuery(TENANT, PROJECT, search=INJECTED))
    assert "DROP" not in statement
    assert values["search_1"] == INJECTED


@pytest.mark.parametrize(
    ("text", "token"),
    [
        ("title) OR 1=1 --", ")"),
        ("title = x) OR (1 = 1", ")"),
        ('title = "x" OR 1 = 1', "1"),
        ("title = x; DROP TABLE items", "DROP"),
        ("items.title = x", "items.title"),
        ("title = x --", "-"),
    ],
)
def test_injection_through_filter_structure_is_rejected(text: str, token: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        compile_list(ItemQuery(TENANT, PROJECT, filter=text), CUSTOM_FIELDS)
    assert caught.value.reason == INVALID_FILTER
    assert caught.value.metadata["token"] == token


@pytest.mark.parametrize(
    ("order_by", "position", "token"),
    [
        ("title; DROP", 1, "title;"),
        ("title desc, (select 1)", 13, "(select"),
        ("title desc; DROP TABLE items", 7, "desc;"),
        ("title desc --", 12, "--"),
        ("1", 1, "1"),
        ('title collate "C"', 7, "collate"),
        ("items.title", 1, "items.title"),
        ("id", 1, "id"),
        ("search", 1, "search"),
        ("custom_fields.estimate", 1, "custom_fields.estimate"),
    ],
)
def test_order_by_injection_and_unknown_fields_are_rejected(order_by: str, position: int, token: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        compile_list(ItemQuery(TENANT, PROJECT, order_by=order_by), CUSTOM_FIELDS)
    error = caught.value
    assert error.reason == INVALID_FILTER
    assert error.metadata == {"position": str(position), "token": token}
    assert f"at position {position}" in error.message
    assert error.message.startswith("invalid order_by: ")
    assert [violation.field for violation in error.violations] == ["order_by"]


# --- order_by -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order_by", "expected"),
    [
        ("", "create_time DESC, id DESC"),
        ("  ", "create_time DESC, id DESC"),
        ("title", "title ASC, id ASC"),
        ("priority desc, due_time", "priority DESC, due_time ASC NULLS LAST, id ASC"),
        ("due_time desc", "due_time DESC NULLS FIRST, id DESC"),
        ("assignee ASC , update_time DESC", "assignee ASC NULLS LAST, update_time DESC, id DESC"),
        ("status,title desc", "status ASC, title DESC, id DESC"),
    ],
)
def test_order_by_sql(order_by: str, expected: str) -> None:
    statement, _ = list_sql(ItemQuery(TENANT, PROJECT, order_by=order_by))
    assert statement.split(" ORDER BY ")[1].split(" LIMIT ")[0] == expected


@pytest.mark.parametrize(
    ("order_by", "position", "token", "message"),
    [
        ("title, title desc", 8, "title", "duplicate sort field"),
        ("title,", 7, "", "empty sort key"),
        (",title", 1, ",", "empty sort key"),
        ("title sideways", 7, "sideways", "expected asc or desc"),
        ("title desc priority", 12, "priority", "separate sort keys with commas"),
        ("name", 1, "name", "unknown sort field"),
    ],
)
def test_order_by_errors(order_by: str, position: int, token: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        compile_list(ItemQuery(TENANT, PROJECT, order_by=order_by), {})
    assert caught.value.metadata == {"position": str(position), "token": token}
    assert message in caught.value.message
    assert f"at position {position}" in caught.value.message


# --- the whole statement --------------------------------------------------------------------------------------


def where_sql(query: ItemQuery) -> str:
    statement, _ = list_sql(query)
    return statement.split(" WHERE ")[1].split(" ORDER BY ")[0]


def test_statement_scopes_to_tenant_project_and_live_items() -> None:
    statement, values = list_sql(QUERY)
    assert statement.startswith("SELECT tenant_id, id, project_id, title, ")
    assert "search" not in statement.split(" FROM ")[0]  # the tsvector is not selected
    assert where_sql(QUERY) == (
        "tenant_id = $1::UUID AND project_id = $2::UUID AND delete_time IS NULL AND archive_time IS NULL"
    )
    assert values["tenant_id_1"] == TENANT
    assert values["project_id_1"] == PROJECT
    assert statement.endswith("LIMIT $3::INTEGER")
    assert values["param_1"] == 10


def test_show_flags_drop_the_visibility_restrictions() -> None:
    assert "delete_time" not in where_sql(ItemQuery(TENANT, PROJECT, show_deleted=True))
    assert "archive_time" not in where_sql(ItemQuery(TENANT, PROJECT, show_archived=True))


@pytest.mark.parametrize("text", ["archived = true", "archived = false", "status = a OR NOT archived = true"])
def test_a_filter_on_archived_implies_show_archived(text: str) -> None:
    where = where_sql(ItemQuery(TENANT, PROJECT, filter=text))
    assert "archive_time IS NULL AND" not in where  # the default restriction is gone
    assert compile_list(ItemQuery(TENANT, PROJECT, filter=text), {}).key_parts[-1] == "show_archived=True"


def test_search_is_a_websearch_tsquery_on_the_generated_column() -> None:
    statement, values = list_sql(ItemQuery(TENANT, PROJECT, search="  login bug  "))
    assert "search @@ websearch_to_tsquery(CAST($3::VARCHAR AS REGCONFIG), $4::VARCHAR)" in statement
    assert values["search_config_1"] == "english"
    assert values["search_1"] == "login bug"
    assert statement.split(" ORDER BY ")[1].startswith("create_time DESC, id DESC")  # search keeps the order


@pytest.mark.parametrize(("search", "message"), [("x" * 501, "at most 500 characters"), ("a\x00b", "NUL")])
def test_search_errors(search: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as caught:
        compile_list(ItemQuery(TENANT, PROJECT, search=search), {})
    assert [violation.field for violation in caught.value.violations] == ["search"]


# --- key parts (the page token's query binding) ---------------------------------------------------------------


def key_parts(**fields: Any) -> tuple[str, ...]:
    return compile_list(ItemQuery(TENANT, PROJECT, **fields), CUSTOM_FIELDS).key_parts


def test_key_parts_are_canonical() -> None:
    assert key_parts(filter="status=a AND priority=1") == key_parts(filter=" status = a  AND\tpriority = 1 ")
    assert key_parts(filter="status = a priority = 1") == key_parts(filter="status = a AND priority = 1")
    assert key_parts(filter="-status = a") == key_parts(filter="NOT status = a")
    assert key_parts(filter='status = "a b"') == key_parts(filter='status  =  "a b"')
    assert key_parts(order_by="") == key_parts(order_by="create_time desc") == key_parts(order_by="create_time  DESC")
    assert key_parts(order_by="title") == key_parts(order_by="title asc")
    assert key_parts(search=" bug ") == key_parts(search="bug")


def test_key_parts_tell_queries_apart() -> None:
    variants = [
        key_parts(),
        key_parts(filter="status = a"),
        key_parts(filter="status = b"),
        key_parts(filter='status = "a b"'),
        key_parts(filter="status = a AND priority = 1 OR priority = 2"),
        key_parts(filter="(status = a AND priority = 1) OR priority = 2"),
        key_parts(order_by="title"),
        key_parts(order_by="title desc"),
        key_parts(search="bug"),
        key_parts(show_deleted=True),
        key_parts(show_archived=True),
        compile_list(ItemQuery(TENANT, uuid.uuid4()), {}).key_parts,
        compile_list(ItemQuery(uuid.uuid4(), PROJECT), {}).key_parts,
    ]
    assert len(set(variants)) == len(variants)


# --- keyset predicate SQL -------------------------------------------------------------------------------------


def after_sql(order_by: str, after: list[str]) -> tuple[str, dict[str, Any]]:
    statement, values = list_sql(ItemQuery(TENANT, PROJECT, order_by=order_by), after)
    where = statement.split(" WHERE ")[1].split(" ORDER BY ")[0]
    prefix = "tenant_id = $1::UUID AND project_id = $2::UUID AND delete_time IS NULL AND archive_time IS NULL AND "
    assert where.startswith(prefix)
    return where.removeprefix(prefix), values


T0 = "2026-01-05T10:00:00+00:00"
ID = "0193a1b2-0000-7000-8000-0000000000cc"


def test_keyset_of_one_direction_without_nulls_is_a_row_comparison() -> None:
    where, values = after_sql("", [T0, ID])
    assert where == "(create_time, id) < ($3::TIMESTAMP WITH TIME ZONE, $4::UUID)"
    assert values["after_create_time_1"] == datetime.fromisoformat(T0)
    assert values["after_id_1"] == uuid.UUID(ID)
    where, _ = after_sql("priority, title", ["2", "alpha", ID])
    assert where == "(priority, title, id) > ($3::SMALLINT, $4::VARCHAR, $5::UUID)"


def test_keyset_with_nullable_keys_spells_out_null_order() -> None:
    # ascending after a value: greater values, then the NULLs
    where, _ = after_sql("assignee", [str(USER), ID])
    assert where == "(assignee > $3::UUID OR assignee IS NULL OR assignee = $4::UUID AND id > $5::UUID)"
    # ascending after NULL: only more NULLs (with a greater id)
    where, _ = after_sql("assignee", ["", ID])
    assert where == "assignee IS NULL AND id > $3::UUID"
    # descending after a value: smaller values only (NULLs came first)
    where, _ = after_sql("due_time desc", [T0, ID])
    assert (
        where
        == "(due_time < $3::TIMESTAMP WITH TIME ZONE OR due_time = $4::TIMESTAMP WITH TIME ZONE AND id < $5::UUID)"
    )
    # descending after NULL: every value, and the NULLs with a smaller id
    where, _ = after_sql("due_time desc", ["", ID])
    assert where == "(due_time IS NOT NULL OR due_time IS NULL AND id < $3::UUID)"


def test_keyset_of_mixed_directions_bounds_the_first_key() -> None:
    where, values = after_sql("priority desc, due_time", ["3", "", ID])
    assert where == (
        "priority <= $3::SMALLINT AND (priority < $4::SMALLINT OR priority = $5::SMALLINT AND due_time IS NULL "
        "AND id > $6::UUID)"
    )
    assert [values[name] for name in ("after_priority_1", "after_priority_2", "after_priority_3")] == [3, 3, 3]


def test_cursor_round_trip() -> None:
    compiled = compile_list(ItemQuery(TENANT, PROJECT, order_by="due_time desc, assignee, priority"), {})
    row: dict[str, Any] = {"due_time": None, "assignee": USER, "priority": 2, "id": ITEM, "title": "ignored"}
    cursor = compiled.cursor(row)
    assert cursor == ["", str(USER), "2", str(ITEM)]
    compiled.statement(cursor, 5)  # decodes
    row = {"due_time": jan(3), "assignee": None, "priority": 0, "id": ITEM}
    assert compiled.cursor(row) == ["2026-01-03T00:00:00+00:00", "", "0", str(ITEM)]


@pytest.mark.parametrize(
    "after",
    [
        ["not a time", ID],
        [T0],
        [T0, ID, "extra"],
        [T0, "not-a-uuid"],
        ["2026-01-05T10:00:00", ID],  # no offset
        ["", ID],  # create_time is never NULL
    ],
)
def test_malformed_cursor_values_are_invalid_page_tokens(after: list[str]) -> None:
    compiled = compile_list(QUERY, {})
    with pytest.raises(InvalidArgument) as caught:
        compiled.statement(after, 10)
    assert caught.value.reason == INVALID_PAGE_TOKEN
    assert [violation.field for violation in caught.value.violations] == ["page_token"]


@pytest.mark.parametrize(
    ("order_by", "after"),
    [("priority", ["high", ID]), ("priority", ["5", ID]), ("priority", ["99999", ID]), ("assignee", ["users/x", ID])],
)
def test_malformed_typed_cursor_values(order_by: str, after: list[str]) -> None:
    compiled = compile_list(ItemQuery(TENANT, PROJECT, order_by=order_by), {})
    with pytest.raises(InvalidArgument) as caught:
        compiled.statement(after, 10)
    assert caught.value.reason == INVALID_PAGE_TOKEN


# --- CountItems -----------------------------------------------------------------------------------------------


def count_sql(group_by: str, **fields: Any) -> str:
    statement, _ = sql(compile_count(ItemQuery(TENANT, PROJECT, **fields), CUSTOM_FIELDS, group_by))
    return " ".join(statement.split())


def test_count_statements() -> None:
    assert count_sql("").startswith("SELECT %(param_1)s::VARCHAR AS key, count(*) AS count FROM workflow.items WHERE")
    assert count_sql("status").endswith("GROUP BY status ORDER BY count DESC, key ASC")
    assert count_sql("assignee").startswith(
        "SELECT coalesce(%(param_1)s::VARCHAR || CAST(assignee AS TEXT), %(param_2)s::VARCHAR) AS key"
    )
    label = count_sql("label", filter="priority > 1", search="x")
    assert "LEFT OUTER JOIN unnest(labels) AS item_label(label) ON true" in label
    assert "priority > %(priority_1)s::SMALLINT" in label
    assert "search @@ websearch_to_tsquery" in label
    assert label.endswith("GROUP BY item_label.label ORDER BY count DESC, key ASC")


def test_count_rejects_unknown_groupings_and_bad_filters() -> None:
    with pytest.raises(InvalidArgument):
        compile_count(QUERY, {}, "priority")
    with pytest.raises(InvalidArgument) as caught:
        compile_count(ItemQuery(TENANT, PROJECT, filter="nope = 1"), {}, "status")
    assert caught.value.reason == INVALID_FILTER
