"""Helpers for revisions that change tables while the services keep running (lock-safe migrations).

The runner applies each revision in its own transaction (ADR 0009). A revision that must not hold its
locks for long runs the slow part inside `op.get_context().autocommit_block()`, where every statement
commits on its own; these helpers make that part safe and observable:

- `backfill_in_batches` updates a table in batches of `batch_size` rows, walking its key in order
  (keyset ranges), each batch written by one short autocommitted statement: row locks last one batch,
  progress is committed batch by batch, and a re-run (after an interruption) continues where the rows
  say it stopped, because the update only touches rows still pending.
- `session_settings` sets session parameters (timeouts, custom settings) for a block and restores them.
- `squawk_ignore` prefixes a statement with a `squawk-ignore` comment, for a justified exception to the
  lint (`tessera migrate lint`).

Options (batch size, progress callback) come from the runner through `config.attributes`, or from the
alembic command line: `-x batch_size=500`. In offline mode (`--sql`) nothing is executed: the
statements of one batch are printed, so the lint sees what each batch runs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import sqlalchemy as sa
from alembic import context, op

OPTIONS_ATTRIBUTE = "tessera.online_options"
DEFAULT_BATCH_SIZE = 1000
DEFAULT_BATCH_TIMEOUT = "30s"
_DURATION = re.compile(r"^\d+\s*(ms|s|min|h)?$")
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_.]*$")


def check_duration(value: str, *, name: str) -> str:
    """A PostgreSQL duration such as `5s` or `500ms` (refused otherwise: it ends up in a SET statement)."""
    if not _DURATION.match(value):
        raise ValueError(f"{name} must be a duration like 500ms, 5s, 10min or 1h, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class BackfillProgress:
    """One committed batch of a backfill (`done` on the last report of a run)."""

    name: str
    batches: int
    scanned: int
    updated: int
    elapsed: float
    done: bool = False

    def __str__(self) -> str:
        rate = self.updated / self.elapsed if self.elapsed > 0 else 0.0
        state = "done" if self.done else "running"
        return (
            f"backfill {self.name}: {state}, {self.updated:,} rows updated, {self.scanned:,} scanned "
            f"in {self.batches:,} batches ({self.elapsed:.1f}s, {rate:,.0f} rows/s)"
        )


@dataclass(frozen=True, slots=True)
class OnlineOptions:
    """What the runner (or `-x key=value`) tells the revisions that run batched work."""

    batch_size: int = DEFAULT_BATCH_SIZE
    batch_timeout: str = DEFAULT_BATCH_TIMEOUT
    progress: Callable[[BackfillProgress], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {self.batch_size}")
        check_duration(self.batch_timeout, name="batch_timeout")


def options() -> OnlineOptions:
    """The options of the current run: the runner's, else the `-x` arguments, else the defaults."""
    configured = context.config.attributes.get(OPTIONS_ATTRIBUTE)
    if isinstance(configured, OnlineOptions):
        return configured
    arguments = context.get_x_argument(as_dictionary=True)
    return OnlineOptions(
        batch_size=int(arguments.get("batch_size", DEFAULT_BATCH_SIZE)),
        batch_timeout=arguments.get("batch_timeout", DEFAULT_BATCH_TIMEOUT),
    )


def squawk_ignore(rules: Sequence[str], reason: str, statement: str) -> str:
    """`statement` preceded by a comment that makes squawk skip `rules` for it (say why in `reason`)."""
    if ":" in reason or "\n" in reason:
        raise ValueError("the reason must be one line without ':' (SQLAlchemy reads ':name' as a parameter)")
    return f"-- squawk-ignore {','.join(rules)} -- {reason}\n{statement}"


@contextmanager
def session_settings(settings: Mapping[str, str]) -> Iterator[None]:
    """Set session parameters for the block (inside an autocommit block), then restore the previous values."""
    for name in settings:
        if not _IDENTIFIER.match(name):
            raise ValueError(f"not a parameter name: {name!r}")
    if context.is_offline_mode():
        for name, value in settings.items():
            op.execute(f"SET {name} = '{_literal(value)}'")
        yield
        for name in settings:
            op.execute(f"RESET {name}")  # online, the previous value comes back instead
        return
    bind = op.get_bind()
    previous = {
        name: bind.execute(sa.text("SELECT current_setting(:name, true)"), {"name": name}).scalar_one()
        for name in settings
    }
    for name, value in settings.items():
        bind.execute(sa.text("SELECT set_config(:name, :value, false)"), {"name": name, "value": value})
    try:
        yield
    finally:
        for name, value in previous.items():
            bind.execute(sa.text("SELECT set_config(:name, :value, false)"), {"name": name, "value": value or ""})


def _literal(value: str) -> str:
    return value.replace("'", "''")


@dataclass(frozen=True, slots=True)
class BackfillResult:
    """What a backfill run did."""

    batches: int
    scanned: int
    updated: int
    elapsed: float


class BackfillIncomplete(RuntimeError):
    """Rows are still pending after a full pass: the update found nothing to write for them."""


def backfill_in_batches(
    name: str,
    *,
    table: str,
    key: Sequence[str],
    pending: str,
    update: str,
) -> BackfillResult:
    """Run `update` over `table` batch by batch along `key` (keyset ranges), each step one autocommitted statement.

    Call it inside `op.get_context().autocommit_block()`. Per batch: find the key range of the next
    `batch_size` rows (an index range scan on the key), run `update` on it, count the rows of the range
    still `pending`. `pending` is an SQL condition on the table's columns (unqualified), true for rows
    that still need the backfill. `update` is an UPDATE statement in which `{in_batch:ALIAS}` expands
    to the current range on the key columns of ALIAS (each use names the alias it needs); it must
    write only pending rows (so a re-run skips finished ones) and return one row per row written.
    Ranges on the key keep every plan a bounded index range scan, whatever the table statistics say.

    After the last batch, if some rows were left pending, they are counted again (a concurrent writer
    may have fixed them); if some remain, `BackfillIncomplete` says how many (the rows written so far
    stay written).
    """
    settings = options()
    keys = ", ".join(key)
    upper = ", ".join(f":upto_{index}" for index in range(len(key)))
    lower = ", ".join(f":after_{index}" for index in range(len(key)))

    def in_batch(alias: str, *, first: bool) -> str:
        columns = ", ".join(f"{alias}.{column}" for column in key)
        below = f"({columns}) <= ({upper})"
        return below if first else f"({columns}) > ({lower}) AND {below}"

    def next_range(*, first: bool) -> sa.TextClause:
        where = "" if first else f"WHERE ({keys}) > ({lower})"
        last = ", ".join(f"last.{column} AS upto_{index}" for index, column in enumerate(key))
        descending = ", ".join(f"{column} DESC" for column in key)
        return sa.text(
            f"WITH batch AS MATERIALIZED (SELECT {keys} FROM {table} {where} ORDER BY {keys} LIMIT :batch_size) "
            f"SELECT (SELECT count(*) FROM batch) AS scanned, {last} FROM (SELECT 1) AS one "
            f"LEFT JOIN (SELECT {keys} FROM batch ORDER BY {descending} LIMIT 1) AS last ON true"
        )

    class _Range:
        """`{in_batch:ALIAS}` in `update`: the batch's key range on ALIAS."""

        def __init__(self, first: bool) -> None:
            self.first = first

        def __format__(self, alias: str) -> str:
            return in_batch(alias, first=self.first)

    def statements(*, first: bool) -> tuple[sa.TextClause, sa.TextClause, sa.TextClause]:
        return (
            next_range(first=first),
            sa.text(update.format(in_batch=_Range(first))),
            sa.text(f"SELECT count(*) FROM {table} AS t WHERE {in_batch('t', first=first)} AND ({pending})"),
        )

    started = time.monotonic()
    if context.is_offline_mode():
        # The statements of one batch, as every batch after the first runs them (bounds shown as NULL).
        values: dict[str, object] = {"batch_size": settings.batch_size}
        values |= {f"{bound}_{index}": None for bound in ("after", "upto") for index in range(len(key))}
        with session_settings({"statement_timeout": settings.batch_timeout}):
            for statement in statements(first=False):
                op.execute(statement.bindparams(**{name: values[name] for name in statement.compile().params}))
        return BackfillResult(0, 0, 0, 0.0)

    bind = op.get_bind()
    batches = scanned = updated = left_pending = 0
    after: dict[str, object] = {}
    with session_settings({"statement_timeout": settings.batch_timeout}):
        first_batch, next_batches = statements(first=True), statements(first=False)
        while True:
            find_range, write, count_pending = first_batch if not after else next_batches
            found = bind.execute(find_range, {"batch_size": settings.batch_size, **after}).one()._mapping
            if found["scanned"] == 0:
                break
            bounds = {**after, **{f"upto_{index}": found[f"upto_{index}"] for index in range(len(key))}}
            updated += len(bind.execute(write, bounds).all())
            left_pending += bind.execute(count_pending, bounds).scalar_one()
            batches += 1
            scanned += found["scanned"]
            after = {f"after_{index}": found[f"upto_{index}"] for index in range(len(key))}
            _report(settings, BackfillProgress(name, batches, scanned, updated, time.monotonic() - started))
    remaining = 0
    if left_pending:  # recount (one scan, under the run's statement_timeout): a concurrent writer may have fixed them
        remaining = bind.execute(sa.text(f"SELECT count(*) FROM {table} WHERE {pending}")).scalar_one()
    elapsed = time.monotonic() - started
    _report(settings, BackfillProgress(name, batches, scanned, updated, elapsed, done=True))
    if remaining:
        raise BackfillIncomplete(
            f"backfill {name}: {remaining:,} rows of {table} are still pending ({pending}) after a full pass; "
            "the update found no value for them (see the revision's runbook), fix them and run the upgrade again"
        )
    return BackfillResult(batches, scanned, updated, elapsed)


def _report(settings: OnlineOptions, progress: BackfillProgress) -> None:
    if settings.progress is not None:
        settings.progress(progress)
