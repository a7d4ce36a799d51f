"""`tessera doctor` exits non-zero and names what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tessera_cli.embedded import free_port
from tests.cli.conftest import RunCli, table_rows

pytestmark = pytest.mark.gate("S01")


def findings(output: str) -> dict[tuple[str, str], tuple[str, str]]:
    """(component, check) -> (status, detail) from doctor's table."""
    return {(row[0], row[1]): (row[2], row[3]) for row in table_rows(output) if len(row) == 4}


def test_doctor_names_an_unreachable_nats_and_still_checks_the_database(run_cli: RunCli, admin_url: str) -> None:
    closed = free_port()
    gateway_port = free_port()
    result = run_cli(
        "doctor",
        TESSERA_DATABASE_URL=admin_url,
        TESSERA_NATS_URL=f"nats://127.0.0.1:{closed}",
        TESSERA_TENANCY_PORT=str(free_port()),
        TESSERA_IDENTITY_PORT=str(free_port()),
        TESSERA_WORKFLOW_PORT=str(free_port()),
        TESSERA_GATEWAY_PORT=str(gateway_port),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    report = findings(result.stdout)
    status, detail = report[("nats", "reachable")]
    assert status == "✗ problem"
    assert f"nats://127.0.0.1:{closed}" in detail
    assert "unreachable" in detail
    assert (
        "not ready: 5 problem(s): nats reachable, identity health, tenancy health, workflow health, gateway health"
        in result.stdout
    )
    # Each component is checked on its own: the database part is fine and reported as such.
    assert report[("database", "reachable")][0] == "✓ ok"
    assert report[("database", "migrations")][0] == "✓ ok"
    assert report[("database", "role tessera_tenancy")] == (
        "✓ ok",
        "login, no superuser, no BYPASSRLS, owns nothing",
    )
    assert report[("database", "role tessera_identity")][0] == "✓ ok"
    assert report[("database", "role tessera_workflow")][0] == "✓ ok"
    assert report[("tenancy", "health")][0] == "✗ problem"  # nothing listens on the tenancy port
    assert report[("identity", "health")][0] == "✗ problem"
    assert report[("workflow", "health")][0] == "✗ problem"
    # The gateway is part of "ready": nothing answers its readiness endpoint on the configured port.
    status, detail = report[("gateway", "health")]
    assert status == "✗ problem"
    assert f"http://127.0.0.1:{gateway_port}/readyz (environment): unreachable" in detail
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("TESSERA_TENANCY_PORT", "not-a-port", "TESSERA_TENANCY_PORT: Input should be a valid integer"),
        ("TESSERA_TENANCY_PORT", "70000", "TESSERA_TENANCY_PORT: Input should be less than or equal to 65535"),
        ("TESSERA_NATS_URL", "http://127.0.0.1:4222", "TESSERA_NATS_URL: must be nats:// or tls:// URLs"),
        ("TESSERA_DATABASE_URL", "mysql://root@localhost/db", "TESSERA_DATABASE_URL: must be a postgresql:// URL"),
    ],
)
def test_doctor_names_an_invalid_variable(run_cli: RunCli, variable: str, value: str, message: str) -> None:
    result = run_cli("doctor", **{variable: value})
    assert result.returncode == 1, result.stdout + result.stderr
    status, detail = findings(result.stdout)[("settings", "environment")]
    assert status == "✗ problem"
    assert message in detail
    assert "nothing else was checked" in result.stdout


def test_doctor_reports_a_stale_stack_file(run_cli: RunCli, cli_env: dict[str, str]) -> None:
    home = Path(cli_env["TESSERA_HOME"])
    home.mkdir(parents=True)
    gone = {"pid": 2**22 + 7, "create_time": 1.0, "kind": "up"}  # no such process: pid_max is at most 2**22
    stack = {"version": 1, "status": "ready", "home": str(home), "started_at": "2026-01-01T00:00:00+00:00", "up": gone}
    (home / "stack.json").write_text(json.dumps(stack))
    result = run_cli("doctor")
    assert result.returncode == 1, result.stdout + result.stderr
    report = findings(result.stdout)
    status, detail = report[("stack", "stack.json")]
    assert status == "✗ problem"
    assert "is stale" in detail
    assert f"pid {2**22 + 7}" in detail
    # With no live stack it falls back to the environment, which names no database here.
    assert "set TESSERA_DATABASE_URL" in report[("database", "configured")][1]
