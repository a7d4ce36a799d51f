"""The ListItems / CountItems query compiler: AIP-160 filters and AIP-132 order_by into SQLAlchemy Core.

A filter is parsed with a real grammar (lark, LALR) into a small syntax tree, checked against the
fields of `items` and the project's custom field definitions, and compiled into a Core predicate in
which every value the caller wrote is a bound parameter: no text of the filter, order_by or search
ever reaches the SQL string. Errors are INVALID_ARGUMENT (reason INVALID_FILTER) naming the
1-based position and the token that failed.

Semantics worth knowing (docs/filtering.md is the user-facing version):
- Precedence is AIP-160's: OR binds tighter than AND, so `a AND b OR c` is `a AND (b OR c)`;
  juxtaposed terms (`a b`) are ANDed; `NOT x` and `-x` negate.
- Negation is the complement: `NOT f` matches exactly the items `f` does not match, also where a
  field has no value (an unassigned item matches `NOT assignee = "users/u"` and `assignee != "users/u"`).
  Plain comparisons never match a missing value (`due_time < "…"` skips items without a due time).
  SQL's NULL would break this, so every NOT wraps a possibly-NULL operand in `coalesce(…, false)`.
- A filter that mentions `archived` anywhere decides about archived items itself: the default
  `archive_time IS NULL` restriction (show_archived = false) is then dropped.
- `parent` takes an item name of the queried workspace and project; an item name of another
  project is an error, not an empty result.
- `search` adds `search @@ websearch_to_tsquery('english', :q)` and does not change the order:
  results stay in `order_by` order (default `create_time desc`), which keeps keyset paging cheap.

Ordering and keyset paging: sort keys are followed by `id` in the direction of the last key. NULLs
(assignee, due_time) sort as PostgreSQL does by default, after every value ascending and before
every value descending; the keyset predicate spells out that rule, so paging over NULLs and ties
returns every row exactly once. A cursor is the list of a row's sort-key values as strings.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import sqlalchemy as sa
from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from sqlalchemy.dialects import postgresql

from services.kit.errors import FieldViolation, InvalidArgument
from services.kit.paging import INVALID_PAGE_TOKEN
from services.workflow.models import ITEM_COLUMNS, SEARCH_CONFIG, items

INVALID_FILTER = "INVALID_FILTER"
MAX_FILTER_LENGTH = 4096
MAX_DEPTH = 20
MAX_RESTRICTIONS = 100
MAX_SEARCH_LENGTH = 500

# Custom field definitions of a project: key -> type name "STRING" | "NUMBER" | "BOOLEAN" | "TIMESTAMP" | "ENUM".
CustomFieldTypes = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ItemQuery:
    """The query parameters of ListItems / CountItems for one project."""

    tenant_id: uuid.UUID
    project_id: uuid.UUID
    filter: str = ""
    order_by: str = ""
    search: str = ""
    show_deleted: bool = False
    show_archived: bool = False


# --- grammar ----------------------------------------------------------------------------------------------
#
# AIP-160's EBNF with our literals. AND, OR and NOT are keywords only in upper case (a TEXT that
# spells one exactly becomes the keyword). A NUMBER must be a whole word (`5` but not `5d`), and TEXT
# cannot start with `-`, which negates.

_GRAMMAR = r"""
start: expression?
expression: sequence (AND sequence)*
sequence: factor+
factor: term (OR term)*
term: (NOT | MINUS)? simple
?simple: restriction | composite
composite: LPAR expression RPAR
restriction: comparable (COMPARATOR arg)?
comparable: (TEXT | STRING | NUMBER) (DOT TEXT)*
arg: STRING | NUMBER | TEXT

AND: "AND"
OR: "OR"
NOT: "NOT"
MINUS: "-"
LPAR: "("
RPAR: ")"
DOT: "."
COMPARATOR: "<=" | ">=" | "!=" | "=" | "<" | ">" | ":"
STRING: /"(?:[^"\\]|\\.)*"/s
NUMBER.2: /-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![^\s.,:()=<>!"'\\])/
TEXT: /[^\s.,:()=<>!"'\\\-][^\s.,:()=<>!"'\\]*/

%ignore /\s+/
"""

_PARSER = Lark(_GRAMMAR, parser="lalr", lexer="basic", maybe_placeholders=False)


# --- syntax tree ------------------------------------------------------------------------------------------

LiteralKind = Literal["string", "number", "text"]


@dataclass(frozen=True, slots=True)
class _Literal:
    kind: LiteralKind
    value: str  # unescaped for strings, as written otherwise
    token: str  # as written
    position: int  # 1-based


@dataclass(frozen=True, slots=True)
class _Restriction:
    path: tuple[str, ...]
    field_token: str
    field_position: int
    comparator: str
    comparator_position: int
    arg: _Literal


@dataclass(frozen=True, slots=True)
class _Not:
    operand: _Node


@dataclass(frozen=True, slots=True)
class _And:
    operands: tuple[_Node, ...]


@dataclass(frozen=True, slots=True)
class _Or:
    operands: tuple[_Node, ...]


_Node = _Restriction | _Not | _And | _Or


def _shown(token: str) -> str:
    """A token quoted for a message (string literals already are), cut to a readable length."""
    if len(token) > 60:
        token = token[:57] + "..."
    return token if token.startswith('"') and len(token) > 1 else f'"{token}"'


def _error(field: str, description: str, *, position: int, token: str) -> InvalidArgument:
    """INVALID_ARGUMENT (INVALID_FILTER) on `field` naming the position and the token."""
    return InvalidArgument(
        f"invalid {field}: {description}",
        reason=INVALID_FILTER,
        metadata={"position": str(position), "token": token[:200]},
        violations=[FieldViolation(field, description, INVALID_FILTER)],
    )


def _at(token: str, position: int) -> str:
    """`"token" at position N`, the part of every message that locates the problem."""
    return f"{_shown(token)} at position {position}" if token else f"at position {position}"


def _filter_error(template: str, *, position: int, token: str, **values: str) -> InvalidArgument:
    """A filter error; `{at}` in the template becomes `"token" at position N`.

    The template is ours; what the caller wrote only ever arrives through `values` and `token`.
    """
    description = template.format(at=_at(token, position), **values)
    return _error("filter", description, position=position, token=token)


def _unescape(token: str) -> str:
    return re.sub(r"\\(.)", r"\1", token[1:-1], flags=re.DOTALL)


class _TreeReader:
    """Turns lark's parse tree into the syntax tree, enforcing the depth and restriction limits."""

    def __init__(self) -> None:
        self.restrictions = 0

    def expression(self, tree: Tree[Token], depth: int) -> _Node:
        sequences = [self.sequence(child, depth) for child in tree.children if isinstance(child, Tree)]
        return sequences[0] if len(sequences) == 1 else _And(tuple(sequences))

    def sequence(self, tree: Tree[Token], depth: int) -> _Node:
        # A sequence (`a b`) means AND here: our fields have exact-match semantics.
        factors = [self.factor(child, depth) for child in tree.children if isinstance(child, Tree)]
        return factors[0] if len(factors) == 1 else _And(tuple(factors))

    def factor(self, tree: Tree[Token], depth: int) -> _Node:
        terms = [self.term(child, depth) for child in tree.children if isinstance(child, Tree)]
        return terms[0] if len(terms) == 1 else _Or(tuple(terms))

    def term(self, tree: Tree[Token], depth: int) -> _Node:
        negated = isinstance(tree.children[0], Token)
        simple = tree.children[-1]
        assert isinstance(simple, Tree)
        node = self.composite(simple, depth) if simple.data == "composite" else self.restriction(simple)
        return _Not(node) if negated else node

    def composite(self, tree: Tree[Token], depth: int) -> _Node:
        opening = tree.children[0]
        assert isinstance(opening, Token)
        if depth + 1 > MAX_DEPTH:
            raise _filter_error(
                f"{{at}}: filter nests deeper than {MAX_DEPTH} levels of parentheses",
                position=_position(opening),
                token=str(opening),
            )
        inner = tree.children[1]
        assert isinstance(inner, Tree)
        return self.expression(inner, depth + 1)

    def restriction(self, tree: Tree[Token]) -> _Restriction:
        comparable = tree.children[0]
        assert isinstance(comparable, Tree)
        parts = [child for child in comparable.children if isinstance(child, Token) and child.type != "DOT"]
        head = parts[0]
        start = _position(head)
        written = "".join(str(child) for child in comparable.children if isinstance(child, Token))
        if len(tree.children) == 1:
            hint = " (AND, OR and NOT are upper case)" if written.lower() in ("and", "or", "not") else ""
            raise _filter_error(
                "{at}: bare text is not supported here; use the `search` field" + hint,
                position=start,
                token=written,
            )
        if head.type != "TEXT":
            raise _filter_error("expected a field name, got {at}", position=start, token=written)
        self.restrictions += 1
        if self.restrictions > MAX_RESTRICTIONS:
            raise _filter_error(
                f"{{at}}: filter has more than {MAX_RESTRICTIONS} restrictions", position=start, token=written
            )
        comparator = tree.children[1]
        arg_tree = tree.children[2]
        assert isinstance(comparator, Token)
        assert isinstance(arg_tree, Tree)
        arg = arg_tree.children[0]
        assert isinstance(arg, Token)
        kind: LiteralKind = "string" if arg.type == "STRING" else "number" if arg.type == "NUMBER" else "text"
        return _Restriction(
            path=tuple(str(part) for part in parts),
            field_token=written,
            field_position=start,
            comparator=str(comparator),
            comparator_position=_position(comparator),
            arg=_Literal(
                kind=kind,
                value=_unescape(str(arg)) if kind == "string" else str(arg),
                token=str(arg),
                position=_position(arg),
            ),
        )


def _position(token: Token) -> int:
    return (token.start_pos or 0) + 1


def _parse(text: str) -> _Node | None:
    """The syntax tree of a filter (None when empty), or InvalidArgument naming position and token."""
    if len(text) > MAX_FILTER_LENGTH:
        raise _filter_error(
            f"{{at}}: filter is longer than {MAX_FILTER_LENGTH} characters",
            position=MAX_FILTER_LENGTH + 1,
            token=text[MAX_FILTER_LENGTH : MAX_FILTER_LENGTH + 1],
        )
    nul = text.find("\x00")
    if nul >= 0:
        raise _filter_error("NUL character {at}", position=nul + 1, token="\\u0000")  # noqa: S106  # not a secret
    try:
        tree = _PARSER.parse(text)
    except UnexpectedCharacters as exc:
        offset = exc.pos_in_stream or 0
        char, position = text[offset], offset + 1
        if char == '"':
            raise _filter_error("unterminated string {at}", position=position, token=text[offset:]) from None
        raise _filter_error("unexpected character {at}", position=position, token=char) from None
    except UnexpectedToken as exc:
        if exc.token.type == "$END":
            raise _end_of_filter(text) from None
        token = str(exc.token)
        raise _filter_error("unexpected token {at}", position=_position(exc.token), token=token) from None
    except UnexpectedEOF:
        raise _end_of_filter(text) from None
    except UnexpectedInput:  # pragma: no cover - lark raises one of the subclasses above
        raise _filter_error("cannot parse {at}", position=1, token=text[:1]) from None
    if not tree.children:
        return None
    expression = tree.children[0]
    assert isinstance(expression, Tree)
    return _TreeReader().expression(expression, 0)


def _end_of_filter(text: str) -> InvalidArgument:
    return _filter_error("unexpected end of filter {at}", position=len(text) + 1, token="")


# --- canonical rendering (the page token's query key) -----------------------------------------------------


def _render(node: _Node) -> str:
    if isinstance(node, _Restriction):
        arg = json.dumps(node.arg.value) if node.arg.kind == "string" else node.arg.value
        return f"{'.'.join(node.path)} {node.comparator} {arg}"
    if isinstance(node, _Not):
        return f"NOT {_render(node.operand)}"
    joiner = " AND " if isinstance(node, _And) else " OR "
    return "(" + joiner.join(_render(operand) for operand in node.operands) + ")"


# --- filter compilation -----------------------------------------------------------------------------------

_EQ, _NE, _LT, _LE, _GT, _GE, _HAS = "=", "!=", "<", "<=", ">", ">=", ":"
_COMPARISONS = (_EQ, _NE, _LT, _LE, _GT, _GE)

_PRIORITIES = {"UNSPECIFIED": 0, "LOW": 1, "MEDIUM": 2, "HIGH": 3, "URGENT": 4}
_CATEGORIES = ("BACKLOG", "ACTIVE", "DONE", "CANCELLED")
_CUSTOM_TYPES = ("STRING", "NUMBER", "BOOLEAN", "TIMESTAMP", "ENUM")

_USER_NAME = re.compile(r"users/([0-9a-fA-F-]{36})")
_ITEM_NAME = re.compile(r"workspaces/([0-9a-fA-F-]{36})/projects/([0-9a-fA-F-]{36})/items/([0-9a-fA-F-]{36})")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")

# A stored custom TIMESTAMP value is cast to timestamptz only when it is an RFC 3339 string with a
# valid calendar date (month lengths and leap years included), so no stored value can make the cast
# fail. Checked by PostgreSQL's regex engine (ARE) inside a CASE, which evaluates it first.
_YEAR = r"(?!0000)\d{4}"
_LEAP_YEAR = r"(\d\d(0[48]|[2468][048]|[13579][26])|([02468][048]|[13579][26])00)"
_MONTH_DAY = r"((0[13578]|1[02])-(0[1-9]|[12]\d|3[01])|(0[469]|11)-(0[1-9]|[12]\d|30)|02-(0[1-9]|1\d|2[0-8]))"
_CLOCK = r"([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d+)?([Zz]|[+-](0\d|1[0-5]):[0-5]\d)"
STORED_TIMESTAMP_PATTERN = rf"^({_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)[Tt ]{_CLOCK}$"

_LIKE_ESCAPE = "/"
_MAX_EXPONENT = 1000


def _bind(name: str, value: Any, type_: Any) -> sa.BindParameter[Any]:
    """A bound value with a readable name (`name_1`, `name_2`, ... in the compiled SQL)."""
    return sa.bindparam(name, value, type_=type_, unique=True)


def _like_pattern(text: str) -> str:
    """`%text%` for ILIKE with the wildcards and the escape character of `text` escaped."""
    escaped = text.replace(_LIKE_ESCAPE, _LIKE_ESCAPE * 2)
    escaped = escaped.replace("%", _LIKE_ESCAPE + "%").replace("_", _LIKE_ESCAPE + "_")
    return f"%{escaped}%"


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A compiled predicate; `nullable` when it can be NULL (a missing value), which NOT must absorb."""

    clause: sa.ColumnElement[bool]
    nullable: bool = False


_Handler = Callable[["_FilterCompiler", _Restriction], _Compiled]


def _negate(compiled: _Compiled) -> _Compiled:
    """The complement: NULL (a missing value) counts as not matching, so its negation matches."""
    clause = sa.func.coalesce(compiled.clause, sa.false()) if compiled.nullable else compiled.clause
    return _Compiled(sa.not_(clause))


def _compare(expression: sa.ColumnElement[Any], op: str, value: Any, *, nullable: bool) -> _Compiled:
    """`expression <op> :value`; `!=` is the complement of `=`, so it also matches a missing value."""
    if op == _NE:
        return _negate(_compare(expression, _EQ, value, nullable=nullable))
    clause = {
        _EQ: expression.__eq__,
        _LT: expression.__lt__,
        _LE: expression.__le__,
        _GT: expression.__gt__,
        _GE: expression.__ge__,
    }[op](value)
    return _Compiled(clause, nullable)


class _FilterCompiler:
    def __init__(self, query: ItemQuery, custom_fields: CustomFieldTypes) -> None:
        self.query = query
        self.custom_fields = {key: _custom_type(kind) for key, kind in custom_fields.items()}
        self.mentions_archived = False

    def compile(self, node: _Node) -> _Compiled:
        if isinstance(node, _Restriction):
            return self.restriction(node)
        if isinstance(node, _Not):
            return _negate(self.compile(node.operand))
        parts = [self.compile(operand) for operand in node.operands]
        combine = sa.and_ if isinstance(node, _And) else sa.or_
        return _Compiled(combine(*(part.clause for part in parts)), any(part.nullable for part in parts))

    def restriction(self, node: _Restriction) -> _Compiled:
        if node.arg.kind == "text" and node.arg.value == "*" and node.comparator != _HAS:
            raise _filter_error(
                "wildcard {at}: `*` only follows `:` (has any value)",
                position=node.arg.position,
                token=node.arg.token,
            )
        name = node.path[0]
        if name == "custom_fields" and len(node.path) == 2:
            return self.custom_field(node, node.path[1])
        handler = _FIELDS.get(name)
        if handler is None or len(node.path) != 1:
            raise _filter_error("unknown field {at}", position=node.field_position, token=node.field_token)
        return handler(self, node)

    # -- built-in fields --

    def title(self, node: _Restriction) -> _Compiled:
        _allow(node, _EQ, _NE, _HAS)
        value = _text(node)
        if _is_any(node):
            return _Compiled(items.c.title != "")
        if node.comparator == _HAS:
            return _Compiled(items.c.title.ilike(_like_pattern(value), escape=_LIKE_ESCAPE))
        return _compare(items.c.title, node.comparator, value, nullable=False)

    def description(self, node: _Restriction) -> _Compiled:
        _allow(node, _HAS)
        if _is_any(node):
            return _Compiled(items.c.description != "")
        return _Compiled(items.c.description.ilike(_like_pattern(_text(node)), escape=_LIKE_ESCAPE))

    def status(self, node: _Restriction) -> _Compiled:
        _allow(node, _EQ, _NE, _HAS)
        if _is_any(node):
            return _Compiled(items.c.status != "")
        op = _EQ if node.comparator == _HAS else node.comparator
        return _compare(items.c.status, op, _text(node), nullable=False)

    def category(self, node: _Restriction) -> _Compiled:
        _allow(node, _EQ, _NE)
        value = _enum_name(node, prefix="STATE_CATEGORY_")
        if value not in _CATEGORIES:
            raise _type_error(node, f"a state category ({', '.join(_CATEGORIES)})")
        return _compare(items.c.status_category, node.comparator, value, nullable=True)

    def priority(self, node: _Restriction) -> _Compiled:
        _allow(node, *_COMPARISONS)
        value: int | None
        if node.arg.kind == "number":
            value = int(node.arg.value) if node.arg.value.isdigit() else None
        else:
            value = _PRIORITIES.get(_enum_name(node, prefix="PRIORITY_"))
        if value is None or not 0 <= value <= 4:
            raise _type_error(node, "a priority (UNSPECIFIED, LOW, MEDIUM, HIGH, URGENT or 0-4)")
        return _compare(items.c.priority, node.comparator, value, nullable=False)

    def assignee(self, node: _Restriction) -> _Compiled:
        _allow(node, _EQ, _NE, _HAS)
        if node.comparator == _HAS:
            return self.present(node, items.c.assignee.is_not(None))
        value = _text(node)
        if value == "":
            clause = items.c.assignee.is_(None)
            return _Compiled(clause if node.comparator == _EQ else sa.not_(clause))
        match = _USER_NAME.fullmatch(value)
        user = _uuid(match.group(1)) if match else None
        if user is None:
            raise _type_error(node, 'a user name ("users/{id}") or ""')
        return _compare(items.c.assignee, node.comparator, user, nullable=True)

    def labels(self, node: _Restriction) -> _Compiled:
        _allow(node, _HAS)
        if _is_any(node):
            return _Compiled(sa.func.cardinality(items.c.labels) > 0)
        return _Compiled(items.c.labels.contains([_text(node)]))

    def parent(self, node: _Restriction) -> _Compiled:
        _allow(node, _EQ, _NE, _HAS)
        if node.comparator == _HAS:
            return self.present(node, items.c.parent_id.is_not(None))
        value = _text(node)
        if value == "":
            clause = items.c.parent_id.is_(None)
            return _Compiled(clause if node.comparator == _EQ else sa.not_(clause))
        match = _ITEM_NAME.fullmatch(value)
        ids = [_uuid(part) for part in match.groups()] if match else []
        if not ids or None in ids:
            raise _type_error(node, 'an item name ("workspaces/{w}/projects/{p}/items/{i}") or ""')
        workspace, project, item = ids
        if workspace != self.query.tenant_id or project != self.query.project_id:
            raise _filter_error(
                "parent {at} is not an item of this project",
                position=node.arg.position,
                token=node.arg.token,
            )
        return _compare(items.c.parent_id, node.comparator, item, nullable=True)

    def due_time(self, node: _Restriction) -> _Compiled:
        if node.comparator == _HAS:
            return self.present(node, items.c.due_time.is_not(None))
        return self.time(node, items.c.due_time, nullable=True)

    def create_time(self, node: _Restriction) -> _Compiled:
        return self.time(node, items.c.create_time, nullable=False)

    def update_time(self, node: _Restriction) -> _Compiled:
        return self.time(node, items.c.update_time, nullable=False)

    def time(self, node: _Restriction, column: sa.Column[Any], *, nullable: bool) -> _Compiled:
        _allow(node, *_COMPARISONS)
        return _compare(column, node.comparator, _timestamp(node), nullable=nullable)

    def archived(self, node: _Restriction) -> _Compiled:
        _allow(node, _EQ, _NE)
        self.mentions_archived = True
        archived = _boolean(node) == (node.comparator == _EQ)
        return _Compiled(items.c.archive_time.is_not(None) if archived else items.c.archive_time.is_(None))

    def present(self, node: _Restriction, clause: sa.ColumnElement[bool]) -> _Compiled:
        if not _is_any(node):
            raise _filter_error(
                "{at}: {field} supports `:` only with `*` (has a value)",
                field=node.field_token,
                position=node.arg.position,
                token=node.arg.token,
            )
        return _Compiled(clause)

    # -- custom fields --

    def custom_field(self, node: _Restriction, key: str) -> _Compiled:
        kind = self.custom_fields.get(key)
        if kind is None:
            raise _filter_error(
                "unknown field {at} (the project has no custom field {key})",
                key=_shown(key),
                position=node.field_position,
                token=node.field_token,
            )
        if node.comparator == _HAS and _is_any(node):
            return _Compiled(items.c.custom_fields.has_key(key))
        field_key = _bind("key", key, sa.Text)
        value_json = items.c.custom_fields.op("->", return_type=postgresql.JSONB)(field_key)
        value_text = items.c.custom_fields.op("->>", return_type=sa.Text)(field_key)
        json_type = sa.func.jsonb_typeof(value_json)
        if kind in ("STRING", "ENUM"):
            _allow(node, _EQ, _NE, _HAS)
            text = _text(node)
            if node.comparator == _HAS:
                string = sa.case((json_type == "string", value_text))
                pattern = _bind("pattern", _like_pattern(text), sa.Text)
                return _Compiled(string.ilike(pattern, escape=_LIKE_ESCAPE), nullable=True)
            return _json_equal(node, key, text)
        if kind == "BOOLEAN":
            _allow(node, _EQ, _NE)
            return _json_equal(node, key, _boolean(node))
        if kind == "NUMBER":
            _allow(node, *_COMPARISONS)
            number = sa.case((json_type == "number", sa.cast(value_text, sa.Numeric)))
            return _compare(number, node.comparator, _bind("number", _number(node), sa.Numeric), nullable=True)
        # TIMESTAMP: stored as RFC 3339 strings, compared as instants.
        _allow(node, *_COMPARISONS)
        stored = sa.case(
            (
                value_text.regexp_match(_bind("rfc3339", STORED_TIMESTAMP_PATTERN, sa.Text)),
                sa.cast(value_text, sa.DateTime(timezone=True)),
            )
        )
        instant = _bind("timestamp", _timestamp(node), sa.DateTime(timezone=True))
        return _compare(stored, node.comparator, instant, nullable=True)


def _json_equal(node: _Restriction, key: str, value: str | bool) -> _Compiled:
    """`custom_fields @> {"key": value}`: equality of the JSON value, type included."""
    document = _bind("custom_fields", json.dumps({key: value}), sa.Text)
    contains = items.c.custom_fields.contains(sa.cast(document, postgresql.JSONB))
    compiled = _Compiled(contains)
    return _negate(compiled) if node.comparator == _NE else compiled


_FIELDS: dict[str, _Handler] = {
    "title": _FilterCompiler.title,
    "description": _FilterCompiler.description,
    "status": _FilterCompiler.status,
    "category": _FilterCompiler.category,
    "priority": _FilterCompiler.priority,
    "assignee": _FilterCompiler.assignee,
    "labels": _FilterCompiler.labels,
    "parent": _FilterCompiler.parent,
    "due_time": _FilterCompiler.due_time,
    "create_time": _FilterCompiler.create_time,
    "update_time": _FilterCompiler.update_time,
    "archived": _FilterCompiler.archived,
}


def _custom_type(kind: str) -> str:
    name = kind.upper().removeprefix("CUSTOM_FIELD_TYPE_")
    if name not in _CUSTOM_TYPES:
        raise ValueError(f"unknown custom field type {kind!r}")
    return name


def _allow(node: _Restriction, *operators: str) -> None:
    if node.comparator not in operators:
        supported = " ".join(operators)
        raise _filter_error(
            "operator {at} is not supported for {field} (use {supported})",
            field=node.field_token,
            supported=supported,
            position=node.comparator_position,
            token=node.comparator,
        )


def _is_any(node: _Restriction) -> bool:
    return node.arg.kind == "text" and node.arg.value == "*"


def _type_error(node: _Restriction, expected: str) -> InvalidArgument:
    return _filter_error(
        "{field} expects {expected}, got {at}",
        field=node.field_token,
        expected=expected,
        position=node.arg.position,
        token=node.arg.token,
    )


def _text(node: _Restriction) -> str:
    """A string value: quoted, or a bare word or number taken as written."""
    return node.arg.value


def _enum_name(node: _Restriction, *, prefix: str) -> str:
    if node.arg.kind == "number":
        return ""
    return node.arg.value.upper().removeprefix(prefix)


def _boolean(node: _Restriction) -> bool:
    if node.arg.kind == "text" and node.arg.value.lower() in ("true", "false"):
        return node.arg.value.lower() == "true"
    raise _type_error(node, "true or false")


def _number(node: _Restriction) -> Decimal:
    if node.arg.kind == "number":
        try:
            number = Decimal(node.arg.value)
        except InvalidOperation:  # pragma: no cover - the grammar only lexes valid numbers
            pass
        else:
            if abs(number.adjusted()) <= _MAX_EXPONENT:  # beyond, PostgreSQL's numeric overflows
                return number
    raise _type_error(node, "a number")


def _timestamp(node: _Restriction) -> datetime:
    if node.arg.kind == "string" and _RFC3339.fullmatch(node.arg.value):
        text = node.arg.value
        fraction = re.search(r"\.(\d+)", text)
        if fraction and len(fraction.group(1)) > 6:  # Python keeps microseconds, like PostgreSQL
            text = text.replace(fraction.group(0), "." + fraction.group(1)[:6])
        try:
            return datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
        except ValueError:
            pass
    raise _type_error(node, 'an RFC 3339 timestamp string (e.g. "2026-01-31T09:00:00Z")')


def _uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


# --- order_by and cursors --------------------------------------------------------------------------------


def _cursor_error(description: str) -> InvalidArgument:
    return InvalidArgument.for_field("page_token", description, reason=INVALID_PAGE_TOKEN)


def _decode_text(value: str) -> str:
    return value


def _decode_priority(value: str) -> int:
    if not re.fullmatch(r"[0-4]", value):
        raise _cursor_error("page token holds a malformed priority")
    return int(value)


def _decode_uuid(value: str) -> uuid.UUID:
    parsed = _uuid(value)
    if parsed is None:
        raise _cursor_error("page token holds a malformed id")
    return parsed


def _decode_time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _cursor_error("page token holds a malformed time") from None
    if parsed.tzinfo is None:
        raise _cursor_error("page token holds a time without offset")
    return parsed


def _encode(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


@dataclass(frozen=True, slots=True)
class _SortColumn:
    column: sa.Column[Any]
    nullable: bool  # NULL is encoded as "" (never a valid value of these columns)
    decode: Callable[[str], Any]


_SORT_COLUMNS: dict[str, _SortColumn] = {
    "title": _SortColumn(items.c.title, False, _decode_text),
    "status": _SortColumn(items.c.status, False, _decode_text),
    "priority": _SortColumn(items.c.priority, False, _decode_priority),
    "assignee": _SortColumn(items.c.assignee, True, _decode_uuid),
    "due_time": _SortColumn(items.c.due_time, True, _decode_time),
    "create_time": _SortColumn(items.c.create_time, False, _decode_time),
    "update_time": _SortColumn(items.c.update_time, False, _decode_time),
}
_ID = _SortColumn(items.c.id, False, _decode_uuid)
DEFAULT_ORDER_BY = "create_time desc"


@dataclass(frozen=True, slots=True)
class _SortKey:
    name: str
    sort: _SortColumn
    descending: bool

    def order(self) -> sa.UnaryExpression[Any]:
        # PostgreSQL's defaults, spelled out for the nullable keys: NULLs after all values ascending,
        # before them descending (as if NULL were the largest value). The keyset predicate relies on it.
        column = self.sort.column
        if self.descending:
            return column.desc().nulls_first() if self.sort.nullable else column.desc()
        return column.asc().nulls_last() if self.sort.nullable else column.asc()

    def equal(self, value: Any) -> sa.ColumnElement[bool]:
        column = self.sort.column
        return column.is_(None) if value is None else column == _bind(f"after_{column.name}", value, column.type)

    def after(self, value: Any) -> sa.ColumnElement[bool] | None:
        """Rows strictly after `value` in this key's order; None when there are none."""
        column = self.sort.column
        if value is None:  # NULL is the largest value
            return column.is_not(None) if self.descending else None
        bound = _bind(f"after_{column.name}", value, column.type)
        if self.descending:
            return column < bound  # NULLs come first descending: never after a value
        return sa.or_(column > bound, column.is_(None)) if self.sort.nullable else column > bound


def _parse_order_by(text: str) -> list[_SortKey]:
    """The sort keys of an order_by string, or InvalidArgument naming the position and token."""
    if not text.strip():
        text = DEFAULT_ORDER_BY
    keys: list[_SortKey] = []
    offset = 0
    for segment in text.split(","):
        words = list(re.finditer(r"\S+", segment))
        if not words:
            position = offset + len(segment) + 1
            raise _error(
                "order_by", f"empty sort key at position {position}", position=position, token=text[position - 1 :][:1]
            )
        name = words[0].group()
        position = offset + words[0].start() + 1
        sort = _SORT_COLUMNS.get(name)
        if sort is None:
            known = ", ".join(_SORT_COLUMNS)
            raise _error(
                "order_by",
                f"unknown sort field {_shown(name)} at position {position} (use {known})",
                position=position,
                token=name,
            )
        if any(key.name == name for key in keys):
            raise _error(
                "order_by", f"duplicate sort field {_shown(name)} at position {position}", position=position, token=name
            )
        descending = False
        if len(words) > 1:
            direction = words[1].group()
            position = offset + words[1].start() + 1
            if direction.lower() not in ("asc", "desc"):
                raise _error(
                    "order_by",
                    f"unexpected token {_shown(direction)} at position {position} (expected asc or desc)",
                    position=position,
                    token=direction,
                )
            descending = direction.lower() == "desc"
        if len(words) > 2:
            extra = words[2].group()
            position = offset + words[2].start() + 1
            raise _error(
                "order_by",
                f"unexpected token {_shown(extra)} at position {position} (separate sort keys with commas)",
                position=position,
                token=extra,
            )
        keys.append(_SortKey(name, sort, descending))
        offset += len(segment) + 1
    return keys


def _render_order_by(keys: Sequence[_SortKey]) -> str:
    return ", ".join(f"{key.name} {'desc' if key.descending else 'asc'}" for key in keys)


# --- the query ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Where:
    clause: sa.ColumnElement[bool]
    canonical_filter: str
    search: str
    show_archived: bool


def _where(query: ItemQuery, custom_fields: CustomFieldTypes) -> _Where:
    """Tenant, project, visibility, filter and search predicates of a query."""
    tree = _parse(query.filter)
    compiler = _FilterCompiler(query, custom_fields)
    compiled = compiler.compile(tree) if tree is not None else None
    search = query.search.strip()
    if len(search) > MAX_SEARCH_LENGTH:
        raise InvalidArgument.for_field("search", f"must be at most {MAX_SEARCH_LENGTH} characters")
    if "\x00" in search:
        raise InvalidArgument.for_field("search", "must not contain NUL characters")
    show_archived = query.show_archived or compiler.mentions_archived
    clauses: list[sa.ColumnElement[bool]] = [
        items.c.tenant_id == _bind("tenant_id", query.tenant_id, sa.Uuid),
        items.c.project_id == _bind("project_id", query.project_id, sa.Uuid),
    ]
    if not query.show_deleted:
        clauses.append(items.c.delete_time.is_(None))
    if not show_archived:
        clauses.append(items.c.archive_time.is_(None))
    if compiled is not None:
        clauses.append(compiled.clause)
    if search:
        config = sa.cast(_bind("search_config", SEARCH_CONFIG, sa.Text), postgresql.REGCONFIG)
        tsquery = sa.func.websearch_to_tsquery(config, _bind("search", search, sa.Text))
        clauses.append(items.c.search.bool_op("@@")(tsquery))
    return _Where(sa.and_(*clauses), _render(tree) if tree is not None else "", search, show_archived)


class CompiledList:
    """A compiled ListItems query: the statement of any page, and the cursor of a row."""

    def __init__(self, where: _Where, keys: Sequence[_SortKey], query: ItemQuery) -> None:
        self._where = where.clause
        # `id` breaks ties in the direction of the last key, so the order is total.
        self._keys = (*keys, _SortKey("id", _ID, keys[-1].descending))
        self._order = [key.order() for key in self._keys]
        self.key_parts: tuple[str, ...] = (
            str(query.tenant_id),
            str(query.project_id),
            where.canonical_filter,
            _render_order_by(keys),
            where.search,
            f"show_deleted={query.show_deleted}",
            f"show_archived={where.show_archived}",
        )

    def statement(self, after: Sequence[str] | None, limit: int) -> sa.Select[*tuple[Any, ...]]:
        """The page after the cursor `after` (the first page when None), at most `limit` rows."""
        statement = sa.select(*ITEM_COLUMNS).where(self._where)
        if after:
            statement = statement.where(self._after(self._decode(after)))
        return statement.order_by(*self._order).limit(limit)

    def cursor(self, row: Mapping[str, Any]) -> list[str]:
        """The cursor values of a row (strings; "" for NULL), for the next page's token."""
        return [_encode(row[key.sort.column.name]) for key in self._keys]

    def _decode(self, after: Sequence[str]) -> list[Any]:
        if len(after) != len(self._keys):
            raise _cursor_error("page token does not match the query's order")
        values: list[Any] = []
        for key, text in zip(self._keys, after, strict=True):
            if not isinstance(text, str):
                raise _cursor_error("page token is malformed")
            values.append(None if key.sort.nullable and text == "" else key.sort.decode(text))
        return values

    def _after(self, values: Sequence[Any]) -> sa.ColumnElement[bool]:
        """Rows strictly after the cursor in the (total) sort order."""
        directions = {key.descending for key in self._keys}
        if len(directions) == 1 and not any(key.sort.nullable for key in self._keys):
            # One direction, no NULLs: a row comparison, which an index in that order serves directly.
            columns = sa.tuple_(*(key.sort.column for key in self._keys))
            bounds = sa.tuple_(
                *(
                    _bind(f"after_{key.name}", value, key.sort.column.type)
                    for key, value in zip(self._keys, values, strict=True)
                )
            )
            return columns < bounds if self._keys[0].descending else columns > bounds
        # Mixed directions or NULLs: (k1 after v1) OR (k1 = v1 AND k2 after v2) OR ...
        alternatives: list[sa.ColumnElement[bool]] = []
        prefix: list[sa.ColumnElement[bool]] = []
        for key, value in zip(self._keys, values, strict=True):
            after = key.after(value)
            if after is not None:
                alternatives.append(sa.and_(*prefix, after))
            prefix.append(key.equal(value))
        predicate = sa.or_(*alternatives)
        first, first_value = self._keys[0], values[0]
        if not first.sort.nullable:
            # Implied by the predicate; lets the planner bound an index range on the first key.
            bound = _bind(f"after_{first.name}", first_value, first.sort.column.type)
            predicate = sa.and_(
                first.sort.column <= bound if first.descending else first.sort.column >= bound, predicate
            )
        return predicate


def compile_list(query: ItemQuery, custom_fields: CustomFieldTypes) -> CompiledList:
    """Compile ListItems' filter, order_by and search; InvalidArgument on the field at fault."""
    where = _where(query, custom_fields)
    return CompiledList(where, _parse_order_by(query.order_by), query)


def compile_filter(text: str, query: ItemQuery, custom_fields: CustomFieldTypes) -> sa.ColumnElement[bool] | None:
    """The predicate of a filter alone (None when empty): the SQL the filter-to-SQL tests read."""
    tree = _parse(text)
    return _FilterCompiler(query, custom_fields).compile(tree).clause if tree is not None else None


def compile_count(query: ItemQuery, custom_fields: CustomFieldTypes, group_by: str) -> sa.Select[*tuple[Any, ...]]:
    """CountItems: rows (`key` text, `count`), largest group first, then by key.

    group_by "" gives one row (key "") with the total; "status" groups by state id; "assignee" by
    `users/{id}` (key "" for unassigned); "label" by label, an item with n labels counting in n groups
    and an unlabelled item in the group "".
    """
    where = _where(query, custom_fields).clause
    count = sa.func.count().label("count")
    if group_by == "":
        return sa.select(sa.literal("", sa.Text).label("key"), count).where(where)
    if group_by == "status":
        key = items.c.status.label("key")
        return sa.select(key, count).where(where).group_by(items.c.status).order_by(count.desc(), key.asc())
    if group_by == "assignee":
        user = sa.literal("users/", sa.Text) + sa.cast(items.c.assignee, sa.Text)
        key = sa.func.coalesce(user, sa.literal("", sa.Text)).label("key")
        return sa.select(key, count).where(where).group_by(items.c.assignee).order_by(count.desc(), key.asc())
    if group_by == "label":
        label = sa.func.unnest(items.c.labels).table_valued("label").render_derived(name="item_label")
        key = sa.func.coalesce(label.c.label, sa.literal("", sa.Text)).label("key")
        return (
            sa.select(key, count)
            .select_from(items.outerjoin(label, sa.true()))
            .where(where)
            .group_by(label.c.label)
            .order_by(count.desc(), key.asc())
        )
    raise InvalidArgument.for_field("group_by", f"unknown grouping {group_by!r}")
