"""Revision 0003 on its own (gate S04): it adds the identity schema and its downgrade removes only that."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from migrations import runner

pytestmark = pytest.mark.gate("S04")

IDENTITY_REVISION = "0003_identity"
PREVIOUS_REVISION = "0002_tenancy_memberships"


async def _admin(url: str, statement: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
def scratch_url(pg_server_url: str) -> Iterator[str]:
    name = f"tessera_identity_mig_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(pg_server_url, f'CREATE DATABASE "{name}"'))
    try:
        yield f"{pg_server_url.rpartition('/')[0]}/{name}"
    finally:
        asyncio.run(_admin(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _schemas(url: str) -> set[str]:
    return {row[0] for row in runner.schema_snapshot(url)["schemas"]}


def test_downgrade_of_0003_drops_identity_and_keeps_tenancy(scratch_url: str) -> None:
    runner.migrate(scratch_url, IDENTITY_REVISION)
    assert {"identity", "tenancy"} <= _schemas(scratch_url)
    relations = {(row[0], row[1]): row for row in runner.schema_snapshot(scratch_url)["relations"]}
    for table in ("api_keys", "audit_log"):
        assert relations[("identity", table)][3:6] == ("tessera_owner", "True", "True")
    assert relations[("identity", "users")][4:6] == ("False", "False")  # user-level: no tenant, no RLS

    runner.downgrade(scratch_url, PREVIOUS_REVISION)

    assert runner.current(scratch_url) == PREVIOUS_REVISION
    assert "identity" not in _schemas(scratch_url)
    assert "tenancy" in _schemas(scratch_url)
    runner.upgrade(scratch_url, IDENTITY_REVISION)
    assert "identity" in _schemas(scratch_url)
