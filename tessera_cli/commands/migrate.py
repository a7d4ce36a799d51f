"""`tessera migrate`: bootstrap the roles and run the Alembic migrations (migrations/runner.py).

The database is `--database-url`, else TESSERA_DATABASE_URL, else the running local stack's
(TESSERA_HOME/stack.json). The URL must log in as an admin (superuser, or CREATEROLE and owner of the
database): the migrations themselves run as the `tessera_owner` role. `round-trip` works on a scratch
database of that server (or of a temporary embedded PostgreSQL) and never touches an existing one.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from tessera_cli.commands._common import HomeOption, fail, settings_or_exit
from tessera_cli.embedded import EmbeddedPostgres, EmbeddedServerError
from tessera_cli.stack import Endpoint, StackError, redact_url, resolve_database_url, scratch_database

app = typer.Typer(
    name="migrate",
    help="Database migrations: up, down, current, round-trip.",
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
) -> None:
    """Create the roles if missing, then upgrade to REVISION (default head)."""
    from migrations import runner

    url = _database(home, database_url).url
    _run("bootstrap roles", lambda: runner.bootstrap(url))
    _run(f"upgrade to {revision}", lambda: runner.upgrade(url, revision))
    console.print(f"current: {escape(_current(url))}")


@app.command("down")
def down(
    revision: Annotated[str, typer.Argument(help="Target revision: a revision id, -1, or base (drops everything).")],
    database_url: DatabaseUrlOption = None,
    home: HomeArg = None,
) -> None:
    """Downgrade to REVISION (`base` removes every Tessera schema and its data)."""
    from migrations import runner

    url = _database(home, database_url).url
    _run(f"downgrade to {revision}", lambda: runner.downgrade(url, revision))
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
