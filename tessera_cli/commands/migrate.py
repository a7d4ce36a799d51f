"""`tessera migrate`: bootstrap the roles and run the Alembic migrations (migrations/runner.py).

The database is `--database-url`, else TESSERA_DATABASE_URL, else the running local stack's
(TESSERA_HOME/stack.json). The URL must log in as an admin (superuser, or CREATEROLE and owner of the
database): the migrations themselves run as the `tessera_owner` role. `round-trip` works on a scratch
database of that server (or of a temporary embedded PostgreSQL) and never touches an existing one.
`lint` needs no database: it renders each revision's SQL offline and checks it with squawk.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from tessera_cli.commands._common import HomeOption, fail, settings_or_exit
from tessera_cli.embedded import EmbeddedPostgres, EmbeddedServerError
from tessera_cli.stack import Endpoint, StackError, redact_url, resolve_database_url, scratch_database

if TYPE_CHECKING:
    from migrations.runner import MigrationOptions, Progress

app = typer.Typer(
    name="migrate",
    help="Database migrations: up, down, current, round-trip, lint.",
    no_args_is_help=True,
)

console = Console(highlight=False)
T = TypeVar("T")

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="Admin URL of the database. Default: $TESSERA_DATABASE_URL, else the running local stack's.",
        show_default=False,
    ),
]
HomeArg = Annotated[Path | None, HomeOption]
BatchSizeOption = Annotated[
    int,
    typer.Option("--batch-size", min=1, help="Rows per batch of a backfill (each batch commits on its own)."),
]
LockTimeoutOption = Annotated[
    str,
    typer.Option("--lock-timeout", help="How long a statement may wait for a lock before the run fails, e.g. 5s."),
]
StatementTimeoutOption = Annotated[
    str, typer.Option("--statement-timeout", help="Longest statement of the run (backfill batches: 30s), e.g. 60s.")
]
# Backfill progress is printed at most this often (plus the final line).
PROGRESS_INTERVAL_SECONDS = 2.0


def _database(home: Path | None, database_url: str | None) -> Endpoint:
    settings = settings_or_exit(console, home=home)
    try:
        endpoint = resolve_database_url(settings, explicit=database_url)
    except StackError as exc:
        raise fail(console, str(exc)) from None
    console.print(f"database {escape(redact_url(endpoint.url))} (from {escape(endpoint.source)})", soft_wrap=True)
    return endpoint


def _run(label: str, action: Callable[[], T]) -> T:
    started = time.monotonic()
    try:
        result = action()
    except Exception as exc:  # the runner's and the driver's errors alike end the command with their message
        raise fail(console, f"{label} failed: {exc}") from None
    console.print(f"[green]✓[/green] {escape(label)} ({time.monotonic() - started:.1f}s)")
    return result


def _options(batch_size: int, lock_timeout: str, statement_timeout: str) -> MigrationOptions:
    """Run options from the command line, progress printed to the console (backfills: every few seconds)."""
    from migrations.online import BackfillProgress
    from migrations.runner import MigrationOptions

    last_printed = 0.0

    def progress(event: Progress) -> None:
        nonlocal last_printed
        now = time.monotonic()
        if isinstance(event, BackfillProgress) and not event.done and now - last_printed < PROGRESS_INTERVAL_SECONDS:
            return
        last_printed = now
        console.print(f"  {escape(str(event))}", soft_wrap=True)

    try:
        return MigrationOptions(
            batch_size=batch_size, lock_timeout=lock_timeout, statement_timeout=statement_timeout, progress=progress
        )
    except ValueError as exc:
        raise fail(console, str(exc), code=2) from None


def _current(url: str) -> str:
    from migrations import runner

    revision = runner.current(url)
    heads = runner.heads()
    at = revision or "(none: not migrated)"
    return f"{at}; head {', '.join(heads) or '(no migrations)'}" + (" [at head]" if revision in heads else "")


@app.command("up")
def up(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    database_url: DatabaseUrlOption = None,
    home: HomeArg = None,
    batch_size: BatchSizeOption = 1000,
    lock_timeout: LockTimeoutOption = "5s",
    statement_timeout: StatementTimeoutOption = "60s",
) -> None:
    """Create the roles if missing, then upgrade to REVISION (default head), one transaction per revision.

    Interrupted during a backfill? Run it again: it continues with the rows not done yet.
    """
    from migrations import runner

    options = _options(batch_size, lock_timeout, statement_timeout)
    url = _database(home, database_url).url
    _run("bootstrap roles", lambda: runner.bootstrap(url))
    _run(f"upgrade to {revision}", lambda: runner.upgrade(url, revision, options=options))
    console.print(f"current: {escape(_current(url))}")


@app.command("down")
def down(
    revision: Annotated[str, typer.Argument(help="Target revision: a revision id, -1, or base (drops everything).")],
    database_url: DatabaseUrlOption = None,
    home: HomeArg = None,
    lock_timeout: LockTimeoutOption = "5s",
    statement_timeout: StatementTimeoutOption = "60s",
) -> None:
    """Downgrade to REVISION (`base` removes every Tessera schema and its data)."""
    from migrations import runner

    options = _options(1000, lock_timeout, statement_timeout)
    url = _database(home, database_url).url
    _run(f"downgrade to {revision}", lambda: runner.downgrade(url, revision, options=options))
    console.print(f"current: {escape(_current(url))}")


@app.command("current")
def current(database_url: DatabaseUrlOption = None, home: HomeArg = None) -> None:
    """Show the database's revision and the head revision."""
    url = _database(home, database_url).url
    console.print(f"current: {escape(_run('read revision', lambda: _current(url)))}")


@app.command("round-trip")
def round_trip(database_url: DatabaseUrlOption = None, home: HomeArg = None) -> None:
    """upgrade head → downgrade base → upgrade head on a scratch database; fails if the schema differs.

    The scratch database is created on the configured server and dropped afterwards, so no existing
    database is touched; with no server configured, a temporary embedded PostgreSQL is used.
    """
    from migrations import runner

    settings = settings_or_exit(console, home=home)
    try:
        server: Endpoint | None = resolve_database_url(settings, explicit=database_url)
    except StackError as exc:
        console.print(f"[dim]{escape(str(exc))}[/dim]", soft_wrap=True)
        server = None

    def on_scratch(server_url: str) -> None:
        try:
            with scratch_database(server_url, prefix="tessera_round_trip") as url:
                console.print(f"scratch database {escape(redact_url(url))}", soft_wrap=True)
                report = _run("round trip (head → base → head)", lambda: runner.round_trip(url))
        except typer.Exit:
            raise
        except Exception as exc:
            raise fail(
                console, f"cannot create or drop a scratch database on {redact_url(server_url)}: {exc}"
            ) from None
        console.print(f"schema identical after the round trip; at {escape(report.head or '(none)')}")

    if server is not None:
        console.print(f"server {escape(redact_url(server.url))} (from {escape(server.source)})", soft_wrap=True)
        on_scratch(server.url)
        return
    console.print("no database configured: using a temporary embedded PostgreSQL")
    with tempfile.TemporaryDirectory(prefix="tessera-round-trip-") as tmp:
        postgres = EmbeddedPostgres(Path(tmp) / "postgres")
        try:
            try:
                postgres.start()
            except EmbeddedServerError as exc:
                raise fail(console, str(exc)) from None
            on_scratch(postgres.url())
        finally:
            postgres.stop()


@app.command("lint")
def lint(
    versions: Annotated[
        Path | None,
        typer.Option("--versions", help="Lint the revisions in this directory instead of migrations/versions."),
    ] = None,
    sql_dir: Annotated[
        Path | None,
        typer.Option("--sql-dir", help="Keep the rendered SQL files (one per revision and direction) here."),
    ] = None,
) -> None:
    """Lint every revision's upgrade and downgrade SQL with squawk; exits 1 on any finding.

    No database is needed: Alembic renders the SQL offline. Exceptions: `squawk_ignore` on a statement
    in the revision, the downgrade and grandfathered lists in migrations/lint.py, `.squawk.toml`.
    """
    from migrations import lint as migration_lint

    try:
        report = migration_lint.lint(versions=versions, sql_dir=sql_dir)
    except migration_lint.LintError as exc:
        raise fail(console, str(exc)) from None
    console.print(
        "[dim]downgrades are linted without the removal rules "
        f"({', '.join(sorted(migration_lint.DOWNGRADE_IGNORED_RULES))}): they remove what their upgrade added[/dim]",
        soft_wrap=True,
    )
    for result in report.results:
        label = f"{result.revision} {result.direction}"
        grandfathered = sorted(set(result.ignored) - set(migration_lint.DOWNGRADE_IGNORED_RULES))
        ignored = f" [dim](grandfathered: {', '.join(grandfathered)})[/dim]" if grandfathered else ""
        if result.ok:
            console.print(f"[green]✓[/green] {escape(label)}{ignored}", soft_wrap=True)
            continue
        console.print(f"[red]✗[/red] {escape(label)}: {len(result.findings)} finding(s){ignored}", soft_wrap=True)
        for finding in result.findings:
            console.print(f"    {escape(str(finding))}", soft_wrap=True)
    if not report.ok:
        raise fail(
            console,
            f"{len(report.failed)} of {len(report.results)} revision scripts have lock-unsafe statements "
            "(docs/runbooks/migrations.md: writing a revision)",
        )
    console.print(f"{len(report.results)} revision scripts are squawk-clean")
