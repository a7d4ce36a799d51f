"""The `tessera` command line: local stack, migrations, contracts, events, diagnostics."""
