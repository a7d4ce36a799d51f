"""Shared fixtures: real PostgreSQL and NATS (embedded unless TESSERA_DATABASE_URL / TESSERA_NATS_URL).

A test session creates its own database on the server, bootstraps the roles, migrates it to head
and drops it at the end, so it never touches data it did not create.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from tessera_cli.embedded import EmbeddedNats, EmbeddedPostgres


@pytest.fixture(scope="session")
def tmp_session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tessera")


@pytest.fixture(scope="session")
def pg_server_url(tmp_session_dir: Path) -> Iterator[str]:
    """Admin URL (a superuser) of a PostgreSQL server: external if configured, else embedded."""
    external = os.environ.get("TESSERA_DATABASE_URL")
    if external:
        yield external
        return
    server = EmbeddedPostgres(tmp_session_dir / "postgres").start()
    try:
        yield server.url()
    finally:
        server.stop()


def _database_url(server_url: str, database: str) -> str:
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{database}"


@pytest.fixture(scope="session")
def admin_url(pg_server_url: str) -> Iterator[str]:
    """Superuser URL of a fresh database for this session, migrated to head."""
    from migrations import runner

    name = f"tessera_test_{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        conn = await asyncpg.connect(pg_server_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(pg_server_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(create())
    url = _database_url(pg_server_url, name)
    runner.bootstrap(url)
    runner.upgrade(url, "head")
    try:
        yield url
    finally:
        asyncio.run(drop())


@pytest.fixture(scope="session")
def nats_server(tmp_session_dir: Path) -> Iterator[EmbeddedNats | None]:
    """The embedded NATS server of this session (None when TESSERA_NATS_URL names an external one)."""
    if os.environ.get("TESSERA_NATS_URL"):
        yield None
        return
    server = EmbeddedNats(tmp_session_dir / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: EmbeddedNats | None) -> str:
    if nats_server is None:
        return os.environ["TESSERA_NATS_URL"]
    return nats_server.url


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A NATS server of this test alone, which the test may stop and start again (same port and store)."""
    server = EmbeddedNats(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def admin_conn(admin_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection to the session database, for assertions on the catalog and raw rows."""
    conn = await asyncpg.connect(admin_url)
    try:
        yield conn
    finally:
        await conn.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.stash[_GATE_RESULTS] = {}


_GATE_RESULTS = pytest.StashKey[dict[str, dict[str, str]]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """Record each gate-tagged test's outcome for the readiness summary."""
    report: pytest.TestReport = yield
    gates = [mark.args[0] for mark in item.iter_markers("gate") if mark.args]
    if gates and (report.when == "call" or report.outcome != "passed"):
        results = item.config.stash[_GATE_RESULTS]
        for gate in gates:
            previous = results.setdefault(gate, {}).get(item.nodeid)
            if previous in (None, "passed"):
                results[gate][item.nodeid] = report.outcome
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Release-gate evidence (shared/GATES.md): per gate, how many tagged tests passed."""
    results = config.stash.get(_GATE_RESULTS, {})
    if not results:
        return
    terminalreporter.section("release gate evidence")
    for gate in sorted(results):
        outcomes = list(results[gate].values())
        passed = outcomes.count("passed")
        status = "ok" if passed == len(outcomes) else "FAILING"
        terminalreporter.write_line(f"{gate}: {passed}/{len(outcomes)} tagged tests passed ({status})")
