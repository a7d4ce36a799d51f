"""`tessera doctor`: what is reachable, what is misconfigured; exits non-zero unless the stack is ready.

Addresses come from the running local stack (TESSERA_HOME/stack.json) when there is one, else from
the environment (TESSERA_DATABASE_URL, TESSERA_NATS_URL, TESSERA_<SERVICE>_PORT and TESSERA_GATEWAY_PORT
on 127.0.0.1). The REST gateway is ready when its `/readyz` answers 200.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import grpc
import typer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tessera_cli.commands._common import HomeOption
from tessera_cli.settings import CliSettings, SettingsError, load_cli_settings
from tessera_cli.stack import (
    GATEWAY,
    SERVICE_HOST,
    SERVICES,
    GatewaySpec,
    NatsUnreachable,
    ServiceSpec,
    StackError,
    StackState,
    connect_nats,
    gateway_url,
    http_status,
    live_state,
    redact_url,
    service_names,
)

console = Console(highlight=False)
TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of the report."""

    component: str
    check: str
    ok: bool
    detail: str


async def _bounded(label: str, work: Awaitable[list[Finding]], component: str) -> list[Finding]:
    try:
        return await asyncio.wait_for(work, timeout=TIMEOUT * 3)
    except TimeoutError:
        return [Finding(component, label, False, f"no answer within {TIMEOUT * 3:g}s")]


async def check_database(url: str | None, source: str) -> list[Finding]:
    """Reachable, migrated to head, service login roles safe."""
    from migrations import runner

    if url is None:
        return [Finding("database", "configured", False, source)]
    shown = redact_url(url)
    try:
        conn = await asyncio.wait_for(asyncpg.connect(url), timeout=TIMEOUT)
    except Exception as exc:
        return [Finding("database", "reachable", False, f"{shown} ({source}): {exc}")]
    findings: list[Finding] = []
    try:
        version = await conn.fetchval("SHOW server_version")
        findings.append(Finding("database", "reachable", True, f"PostgreSQL {version} at {shown} ({source})"))
        try:
            revision = await asyncio.to_thread(runner.current, url)
            heads = runner.heads()
        except Exception as exc:
            findings.append(Finding("database", "migrations", False, f"cannot read the revision: {exc}"))
        else:
            if revision in heads:
                findings.append(Finding("database", "migrations", True, f"at head {revision}"))
            else:
                findings.append(
                    Finding(
                        "database",
                        "migrations",
                        False,
                        f"at {revision or '(none)'}, head is {', '.join(heads)}: run `tessera migrate up`",
                    )
                )
        for spec in SERVICES:
            findings.append(await _check_role(conn, spec.name))
    finally:
        await conn.close()
    return findings


async def _check_role(conn: Any, service: str) -> Finding:  # conn: asyncpg.Connection (untyped library)
    from migrations import runner

    try:
        role = runner.service_role(service)
    except ValueError as exc:
        return Finding("database", f"role of {service}", False, str(exc))
    row = await conn.fetchrow(
        """
        SELECT r.rolcanlogin, r.rolsuper, r.rolbypassrls,
               (SELECT count(*) FROM pg_class c WHERE c.relowner = r.oid)
             + (SELECT count(*) FROM pg_namespace n WHERE n.nspowner = r.oid) AS owned
        FROM pg_roles r WHERE r.rolname = $1
        """,
        role,
    )
    if row is None:
        return Finding("database", f"role {role}", False, "missing: run `tessera migrate up`")
    problems = [
        problem
        for problem, bad in (
            ("cannot log in", not row["rolcanlogin"]),
            ("is SUPERUSER", row["rolsuper"]),
            ("has BYPASSRLS", row["rolbypassrls"]),
            (f"owns {row['owned']} objects", row["owned"] > 0),
        )
        if bad
    ]
    if problems:
        return Finding("database", f"role {role}", False, ", ".join(problems) + ": run `tessera migrate up`")
    return Finding("database", f"role {role}", True, "login, no superuser, no BYPASSRLS, owns nothing")


async def check_nats(url: str | None, source: str) -> list[Finding]:
    """Reachable, JetStream enabled, the event and dead-letter streams exist."""
    from nats.js.errors import NotFoundError

    from services.kit.broker import DLQ_STREAM
    from services.kit.events import stream_name

    if url is None:
        return [Finding("nats", "configured", False, source)]
    shown = redact_url(url)
    try:
        nc = await connect_nats(url, name="tessera-doctor", timeout=TIMEOUT)
    except NatsUnreachable as exc:
        return [Finding("nats", "reachable", False, f"unreachable: {exc} ({source})")]
    findings = [Finding("nats", "reachable", True, f"{shown} ({source})")]
    try:
        js = nc.jetstream(timeout=TIMEOUT)
        try:
            await js.account_info()
        except Exception as exc:
            findings.append(Finding("nats", "JetStream", False, f"not enabled (nats-server -js): {exc}"))
            return findings
        findings.append(Finding("nats", "JetStream", True, "enabled"))
        expected = [stream_name(spec.name) for spec in SERVICES if spec.publishes_events] + [DLQ_STREAM]
        missing = []
        for stream in expected:
            try:
                await js.stream_info(stream)
            except NotFoundError:
                missing.append(stream)
        if missing:
            findings.append(
                Finding("nats", "streams", False, f"missing {', '.join(missing)} (each service creates its streams)")
            )
        else:
            findings.append(Finding("nats", "streams", True, ", ".join(expected)))
    finally:
        await nc.close()
    return findings


async def check_service(spec: ServiceSpec, address: str | None, source: str) -> list[Finding]:
    """The service reports SERVING over grpc.health.v1."""
    if address is None:
        return [Finding(spec.name, "health", False, source)]
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=spec.grpc_service), timeout=TIMEOUT
            )
    except grpc.aio.AioRpcError as exc:
        return [Finding(spec.name, "health", False, f"{address} ({source}): {exc.code().name} {exc.details() or ''}")]
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return [Finding(spec.name, "health", status == "SERVING", f"{status} at {address} ({source})")]


async def check_gateway(gateway: GatewaySpec, base_url: str | None, source: str) -> list[Finding]:
    """The gateway answers its readiness endpoint (`/readyz`: every backend SERVING) with 200."""
    if base_url is None:
        return [Finding(gateway.name, "health", False, source)]
    url = base_url + gateway.health_path
    status, detail = await asyncio.to_thread(http_status, url, timeout=TIMEOUT)
    if status is None:
        return [Finding(gateway.name, "health", False, f"{url} ({source}): {detail}")]
    shown = f"HTTP {status} at {url} ({source})"
    if status != 200:
        shown += f": {' '.join(detail.split())[:200]}"
    return [Finding(gateway.name, "health", status == 200, shown)]


async def diagnose(settings: CliSettings, state: StackState | None) -> list[Finding]:
    """Every check, run concurrently."""
    not_configured = "not configured: set {var} or start the local stack with `tessera up`"
    if state is not None:
        source = "stack.json"
        db_url = state.database.url if state.database else None
        nats_url = state.nats.url if state.nats else None
        running = {record.name: record.address for record in state.services}
        addresses = {spec.name: running.get(spec.name) for spec in SERVICES}
        missing_source = "not started by this `tessera up` (--no-services?)"
        gateway = state.gateway.url if state.gateway else None
    else:
        source = "environment"
        db_url, nats_url = settings.database_url, settings.nats_url
        addresses = {
            spec.name: f"{SERVICE_HOST}:{settings.port_for(spec.name, spec.default_port)}" for spec in SERVICES
        }
        missing_source = ""
        gateway = gateway_url(settings.gateway_port)
    checks: list[Awaitable[list[Finding]]] = [
        _bounded(
            "reachable",
            check_database(db_url, source if db_url else not_configured.format(var="TESSERA_DATABASE_URL")),
            "database",
        ),
        _bounded(
            "reachable",
            check_nats(nats_url, source if nats_url else not_configured.format(var="TESSERA_NATS_URL")),
            "nats",
        ),
        *(
            _bounded(
                "health",
                check_service(spec, addresses[spec.name], source if addresses[spec.name] else missing_source),
                spec.name,
            )
            for spec in SERVICES
        ),
    ]
    if GATEWAY is not None:
        checks.append(
            _bounded("health", check_gateway(GATEWAY, gateway, source if gateway else missing_source), GATEWAY.name)
        )
    results = await asyncio.gather(*checks)
    return [finding for group in results for finding in group]


def _render(findings: list[Finding]) -> None:
    table = Table(title="tessera doctor", title_justify="left")
    table.add_column("component", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for finding in findings:
        table.add_row(
            finding.component,
            finding.check,
            "[green]✓ ok[/green]" if finding.ok else "[red]✗ problem[/red]",
            escape(finding.detail),
        )
    console.print(table)


def doctor(home: Annotated[Path | None, HomeOption] = None) -> None:
    """Check settings, database, NATS, every service and the gateway; exit 1 unless the whole stack is ready."""
    findings: list[Finding] = []
    try:
        settings = load_cli_settings(service_names(), home=home)
    except SettingsError as exc:
        invalid = "; ".join(line.strip() for line in str(exc).splitlines()[1:])
        findings.append(Finding("settings", "environment", False, invalid or str(exc)))
        _render(findings)
        console.print("[red]✗ fix the settings above first; nothing else was checked[/red]")
        raise typer.Exit(1) from None
    findings.append(Finding("settings", "environment", True, "TESSERA_* variables are valid"))
    state: StackState | None = None
    try:
        state = live_state(settings.home)
    except StackError as exc:
        findings.append(Finding("stack", "stack.json", False, str(exc)))
    else:
        if state is None:
            findings.append(
                Finding("stack", "stack.json", True, f"no local stack in {settings.home}: using the environment")
            )
        elif state.status != "ready":
            findings.append(Finding("stack", "stack.json", False, f"tessera up pid {state.up.pid} is still starting"))
        else:
            findings.append(Finding("stack", "stack.json", True, f"tessera up pid {state.up.pid} is ready"))
    findings.extend(asyncio.run(diagnose(settings, state)))
    _render(findings)
    problems = [finding for finding in findings if not finding.ok]
    if problems:
        names = ", ".join(f"{finding.component} {finding.check}" for finding in problems)
        console.print(f"[red]✗ not ready: {len(problems)} problem(s): {escape(names)}[/red]", soft_wrap=True)
        raise typer.Exit(1)
    console.print("[green]✓ everything is ready[/green]")


def register(app: typer.Typer) -> None:
    """Add `tessera doctor` to the root app."""
    app.command("doctor")(doctor)
