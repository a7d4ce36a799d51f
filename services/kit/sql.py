"""SQLAlchemy Core statements compiled once for asyncpg, executed on the unit of work's connection.

Repositories build statements with SQLAlchemy Core (tables from `models.py`, `sa.bindparam` for
values) and wrap them in `Query` at import time. The statement is compiled for the asyncpg dialect
on first use (`$1`-style placeholders, casts included) and cached, so a call costs one asyncpg
round trip and no SQLAlchemy execution machinery (ADR 0006: about 450 µs of CPU per transaction
saved on our hot paths).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.sql.compiler import SQLCompiler

_DIALECT = asyncpg_dialect.dialect()  # type: ignore[no-untyped-call]  # SQLAlchemy's dialect ctor is untyped


class Query:
    """A Core statement compiled once; values are passed by bindparam name at execution."""

    __slots__ = ("_compiled", "statement")

    def __init__(self, statement: sa.ClauseElement) -> None:
        self.statement = statement
        self._compiled: _Compiled | None = None

    def _compile(self) -> _Compiled:
        if self._compiled is None:
            compiled = self.statement.compile(dialect=_DIALECT)
            assert isinstance(compiled, SQLCompiler)
            self._compiled = _Compiled(
                sql=compiled.string,
                names=tuple(compiled.positiontup or ()),
                literals=dict(compiled.params),
                required=frozenset(name for name, bind in compiled.binds.items() if bind.required),
            )
        return self._compiled

    @property
    def sql(self) -> str:
        return self._compile().sql

    def arguments(self, params: Mapping[str, Any]) -> list[Any]:
        """Positional arguments in placeholder order; literals compiled into the statement fill the rest."""
        compiled = self._compile()
        missing = compiled.required.difference(params)
        if missing:
            raise TypeError(f"query needs values for bind parameters {sorted(missing)}")
        return [params[name] if name in params else compiled.literals[name] for name in compiled.names]

    def __repr__(self) -> str:
        return f"Query({self.sql!r})"


@dataclass(frozen=True, slots=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]
    literals: dict[str, Any]
    required: frozenset[str]


def as_query(statement: Query | sa.ClauseElement) -> Query:
    """A Query for a statement; an ad-hoc Core statement is compiled on every call (avoid on hot paths)."""
    return statement if isinstance(statement, Query) else Query(statement)
