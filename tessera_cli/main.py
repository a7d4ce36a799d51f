"""Entry point of the `tessera` command line (`tessera = "tessera_cli.main:app"` in pyproject.toml).

Each command group lives in `tessera_cli/commands/<group>.py` and is registered here with one line:
a module exposing a Typer sub-app `app` is added with `app.add_typer(<module>.app, name="<group>")`
(`tessera proto lint`, `tessera migrate ...`, `tessera events dlq ...`); a module adding top-level
commands (`tessera up`, `tessera doctor`) exposes `register(app: typer.Typer)` and is called as
`<module>.register(app)`.
"""

from __future__ import annotations

import typer

from tessera_cli.commands import doctor, events, migrate, proto, stack

app = typer.Typer(
    name="tessera",
    help="Tessera: run the local stack, migrate databases, check contracts, inspect events.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# Sub-apps: tessera <group> <command>.
app.add_typer(proto.app, name="proto")
app.add_typer(migrate.app, name="migrate")
app.add_typer(events.app, name="events")

# Top-level commands: <module>.register(app).
stack.register(app)
doctor.register(app)


if __name__ == "__main__":
    app()
