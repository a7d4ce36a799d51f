"""Helpers shared by the commands of the cli area (`up`, `migrate`, `doctor`, `events`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from tessera_cli.settings import CliSettings, SettingsError, load_cli_settings
from tessera_cli.stack import service_names

# Exit code for invalid configuration (the services use the same one).
EXIT_CONFIG = 2

HomeOption = typer.Option(
    "--home",
    help="Local stack directory (data, logs, stack.json). Default: $TESSERA_HOME or ./.tessera",
    show_default=False,
)


def settings_or_exit(
    console: Console, *, home: Path | None = None, ports: Mapping[str, int | str] | None = None
) -> CliSettings:
    """Load the CLI settings, or print which variables are wrong and exit with code 2."""
    try:
        return load_cli_settings(service_names(), ports=ports, home=home)
    except SettingsError as exc:
        console.print(f"[red]✗[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_CONFIG) from None


def fail(console: Console, message: str, *, code: int = 1) -> typer.Exit:
    """Print message as an error; the caller raises the returned Exit."""
    console.print(f"[red]✗[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)
