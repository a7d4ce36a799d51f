"""`tessera up`: run the whole stack on this machine (see docs/runbooks/local-stack.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tessera_cli.commands._common import HomeOption, fail, settings_or_exit
from tessera_cli.settings import GATEWAY
from tessera_cli.stack import Stack, service_names

console = Console(highlight=False)


def _parse_ports(values: list[str]) -> dict[str, int | str]:
    known = [*service_names(), GATEWAY]
    ports: dict[str, int | str] = {}
    for value in values:
        name, sep, port = value.partition("=")
        if not sep or name not in known:
            raise fail(console, f"--port {value}: expected SERVICE=PORT with SERVICE one of {', '.join(known)}", code=2)
        ports[name] = port
    return ports


def up(
    home: Annotated[Path | None, HomeOption] = None,
    port: Annotated[
        list[str] | None,
        typer.Option(
            "--port",
            metavar="SERVICE=PORT",
            help=(
                "gRPC port of a service, e.g. --port tenancy=50061 (same as TESSERA_TENANCY_PORT), or the REST "
                "gateway's HTTP port, --port gateway=8081 (same as TESSERA_GATEWAY_PORT); repeatable."
            ),
            show_default=False,
        ),
    ] = None,
    no_services: Annotated[
        bool,
        typer.Option("--no-services", help="Only PostgreSQL, NATS and migrations; start no service and no gateway."),
    ] = False,
    follow_logs: Annotated[
        bool, typer.Option("--follow-logs", help="Also stream every service's log here, prefixed with its name.")
    ] = False,
) -> None:
    """Run the local stack: PostgreSQL, NATS, migrations, every service and the gateway. Ctrl-C stops it all."""
    settings = settings_or_exit(console, home=home, ports=_parse_ports(port or []))
    code = Stack(settings, console=console, start_services=not no_services, follow_logs=follow_logs).run()
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add `tessera up` to the root app."""
    app.command("up")(up)
