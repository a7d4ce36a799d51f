"""`tessera migrate` finds its database and reports the revision."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import pytest

from migrations import runner
from tests.cli.conftest import RunCli

pytestmark = pytest.mark.gate("S04")


def test_migrate_up_is_idempotent_and_current_reports_head(run_cli: RunCli, admin_url: str) -> None:
    [head] = runner.heads()
    upgraded = run_cli("migrate", "up", TESSERA_DATABASE_URL=admin_url)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert "from TESSERA_DATABASE_URL" in upgraded.stdout
    current = run_cli("migrate", "current", TESSERA_DATABASE_URL=admin_url)
    assert current.returncode == 0, current.stdout + current.stderr
    assert f"current: {head}; head {head} [at head]" in " ".join(current.stdout.split())


def test_migrate_without_a_database_says_how_to_configure_one(run_cli: RunCli) -> None:
    result = run_cli("migrate", "current")
    assert result.returncode == 1
    assert "no database: set TESSERA_DATABASE_URL" in result.stdout


async def test_round_trip_runs_on_a_scratch_database_and_drops_it(
    run_cli: RunCli, admin_url: str, admin_conn: asyncpg.Connection
) -> None:
    before = {row["datname"] for row in await admin_conn.fetch("SELECT datname FROM pg_database")}
    result = await asyncio.to_thread(run_cli, "migrate", "round-trip", TESSERA_DATABASE_URL=admin_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "schema identical after the round trip" in result.stdout
    scratch = re.search(r"scratch database \S+/(tessera_round_trip_\w+)", result.stdout)
    assert scratch is not None, result.stdout
    after = {row["datname"] for row in await admin_conn.fetch("SELECT datname FROM pg_database")}
    assert after == before  # the scratch database is gone, nothing else was created or dropped
    assert scratch.group(1) not in after
    # The configured database itself was not touched: still migrated, its tables still there.
    assert runner.current(admin_url) in runner.heads()
    assert await admin_conn.fetchval("SELECT to_regclass('tenancy.workspaces') IS NOT NULL")
