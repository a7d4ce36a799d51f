"""Command groups of the `tessera` CLI, one module per group, registered in `tessera_cli.main`.

A module exposes either `app`, a Typer sub-app added with `app.add_typer(module.app, name=...)`
(for `tessera <group> <command>`), or `register(app)`, which adds top-level commands such as
`tessera up` to the root app.
"""
