"""`tessera up` on a fresh machine: embedded PostgreSQL and NATS, migrations, every service, clean stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera.identity.v1 import identity_service_pb2, identity_service_pb2_grpc
from tessera.tenancy.v1 import tenancy_pb2, tenancy_service_pb2, tenancy_service_pb2_grpc
from tessera_cli.embedded import free_port
from tessera_cli.stack import SERVICES, STACK_FILE

pytestmark = pytest.mark.gate("S01")

TESSERA = str(Path(sys.executable).parent / "tessera")
START_DEADLINE = 120.0
STOP_DEADLINE = 60.0


def fresh_machine_env(home: Path, ports: dict[str, int]) -> dict[str, str]:
    """The environment of a machine without configured servers: every TESSERA_* variable is ours."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TESSERA_")}
    env["TESSERA_HOME"] = str(home)
    env["TESSERA_EMBEDDED_FAST"] = "1"  # fsync off: same code path, faster on CI disks
    for name, port in ports.items():
        env[f"TESSERA_{name.upper()}_PORT"] = str(port)
    return env


async def wait_for_ready_state(proc: subprocess.Popen[bytes], home: Path, output: Path) -> dict[str, Any]:
    deadline = time.monotonic() + START_DEADLINE
    state_path = home / STACK_FILE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"tessera up exited with {proc.returncode} before it was ready:\n{output.read_text()}")
        # Ready = the readiness line is printed and stack.json says so.
        if state_path.exists() and "Tessera is ready" in output.read_text():
            state: dict[str, Any] = json.loads(state_path.read_text())
            if state["status"] == "ready":
                return state
        await asyncio.sleep(0.2)
    pytest.fail(f"tessera up was not ready within {START_DEADLINE}s:\n{output.read_text()}")


def stop_if_running(proc: subprocess.Popen[bytes]) -> None:
    """After a failed assertion: let `tessera up` stop its children (SIGKILL would orphan them)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def assert_no_leftovers(family: list[psutil.Process], recorded_pids: list[int]) -> None:
    still_running = [child for child in family if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
    assert still_running == [], f"left behind: {still_running}"
    for pid in recorded_pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid


async def wait_for_exit(proc: subprocess.Popen[bytes]) -> float:
    started = time.monotonic()
    while proc.poll() is None:
        assert time.monotonic() - started < STOP_DEADLINE, f"tessera up did not exit within {STOP_DEADLINE}s"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def recorded_pids(state: dict[str, Any]) -> list[int]:
    """Every pid stack.json records: tessera up itself, PostgreSQL, NATS, each service."""
    pids = [state["up"]["pid"], state["database"]["process"]["pid"], state["nats"]["process"]["pid"]]
    return pids + [service["process"]["pid"] for service in state["services"]]


async def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [TESSERA, *args], env=env, capture_output=True, text=True, timeout=60
    )


async def test_up_serves_every_service_and_stops_without_leftovers(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ports = {spec.name: free_port() for spec in SERVICES}
    env = fresh_machine_env(home, ports)
    output = tmp_path / "up.out"
    started = time.monotonic()
    with output.open("wb") as out:
        proc = subprocess.Popen([TESSERA, "up"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        state = await wait_for_ready_state(proc, home, output)
        ready_after = time.monotonic() - started
        text = output.read_text()
        assert "Tessera is ready" in text
        assert state["database"]["embedded"] is True
        assert state["nats"]["embedded"] is True

        # Every registered service is up on its configured port and SERVING, checked by us over gRPC.
        recorded = {service["name"]: service for service in state["services"]}
        assert set(recorded) == {spec.name for spec in SERVICES}
        for spec in SERVICES:
            address = f"127.0.0.1:{ports[spec.name]}"
            assert recorded[spec.name]["address"] == address
            async with grpc.aio.insecure_channel(address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                for service_name in ("", spec.grpc_service):
                    response = await health.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=5)
                    assert response.status == health_pb2.HealthCheckResponse.SERVING, service_name

        doctor = await run_cli("doctor", env=env)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "everything is ready" in doctor.stdout

        # A real request through the whole path, with real auth: sign up and in at identity, create
        # a workspace, exchange the session for a workspace token (identity asks tenancy for the
        # membership), and read the workspace with it under RLS.
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{ports['identity']}") as identity_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{ports['tenancy']}") as tenancy_channel,
        ):
            identity = identity_service_pb2_grpc.IdentityServiceStub(identity_channel)
            tenancy = tenancy_service_pb2_grpc.TenancyServiceStub(tenancy_channel)
            email, password = "first.user@example.com", "smoke staple horse battery 7"  # test credentials
            await identity.SignUp(
                identity_service_pb2.SignUpRequest(email=email, password=password, display_name="Smoke"), timeout=10
            )
            signed_in = await identity.SignIn(
                identity_service_pb2.SignInRequest(email=email, password=password), timeout=10
            )
            user = (("authorization", f"Bearer {signed_in.tokens.access_token}"),)
            created = await tenancy.CreateWorkspace(
                tenancy_service_pb2.CreateWorkspaceRequest(workspace=tenancy_pb2.Workspace(display_name="Smoke test")),
                metadata=user,
                timeout=10,
            )
            exchanged = await identity.IssueWorkspaceToken(
                identity_service_pb2.IssueWorkspaceTokenRequest(workspace=created.workspace.name),
                metadata=user,
                timeout=10,
            )
            assert exchanged.role == "owner"
            fetched = await tenancy.GetWorkspace(
                tenancy_service_pb2.GetWorkspaceRequest(name=created.workspace.name),
                metadata=(("authorization", f"Bearer {exchanged.tokens.access_token}"),),
                timeout=10,
            )
            with pytest.raises(grpc.aio.AioRpcError) as anonymous:
                await tenancy.GetWorkspace(tenancy_service_pb2.GetWorkspaceRequest(name=created.workspace.name))
            assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert fetched.workspace.name == created.workspace.name
        assert fetched.workspace.display_name == "Smoke test"

        family = psutil.Process(proc.pid).children(recursive=True)
        pids = recorded_pids(state)
        assert pids[0] == proc.pid
        assert set(pids[1:]) <= {child.pid for child in family}

        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does
        stopped_after = await wait_for_exit(proc)
    finally:
        stop_if_running(proc)

    text = output.read_text()
    assert proc.returncode == 0, text
    assert "stack stopped" in text
    assert not (home / STACK_FILE).exists()
    assert_no_leftovers(family, pids)
    print(f"tessera up: ready after {ready_after:.1f}s, stopped {stopped_after:.1f}s after SIGINT")


async def test_up_stops_the_stack_and_fails_when_a_service_dies(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = fresh_machine_env(home, {spec.name: free_port() for spec in SERVICES})
    output = tmp_path / "up.out"
    with output.open("wb") as out:
        proc = subprocess.Popen([TESSERA, "up"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        state = await wait_for_ready_state(proc, home, output)
        family = psutil.Process(proc.pid).children(recursive=True)
        victim = state["services"][0]
        os.kill(victim["process"]["pid"], signal.SIGKILL)
        await wait_for_exit(proc)
    finally:
        stop_if_running(proc)
    text = output.read_text()
    assert proc.returncode == 1, text
    assert f"{victim['name']} was killed by SIGKILL; last lines of" in text
    assert "stopping the rest of the stack" in text
    assert "stack stopped" in text
    assert not (home / STACK_FILE).exists()
    assert_no_leftovers(family, recorded_pids(state)[1:])


def test_up_refuses_a_configured_port_that_is_taken(tmp_path: Path) -> None:
    home = tmp_path / "home"
    spec = SERVICES[0]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = {other.name: free_port() for other in SERVICES} | {spec.name: taken}
        result = subprocess.run(
            [TESSERA, "up"], env=fresh_machine_env(home, ports), capture_output=True, text=True, timeout=60
        )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"port {taken} for {spec.name} is already in use" in output
    assert spec.port_env in output
    # Nothing was started: no database or broker directory, no stack file.
    assert not (home / "postgres").exists()
    assert not (home / "nats").exists()
    assert not (home / STACK_FILE).exists()
