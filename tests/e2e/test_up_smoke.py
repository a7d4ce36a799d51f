"""`tessera up` on a fresh machine: embedded PostgreSQL and NATS, migrations, every service, the gateway, clean stop."""

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
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera.identity.v1 import identity_service_pb2, identity_service_pb2_grpc
from tessera.tenancy.v1 import tenancy_pb2, tenancy_service_pb2, tenancy_service_pb2_grpc
from tessera_cli.embedded import free_port
from tessera_cli.settings import GATEWAY_PORT_ENV
from tessera_cli.stack import GATEWAY, SERVICES, STACK_FILE

pytestmark = pytest.mark.gate("S01")

TESSERA = str(Path(sys.executable).parent / "tessera")
START_DEADLINE = 120.0
STOP_DEADLINE = 60.0


def fresh_machine_env(home: Path, ports: dict[str, int]) -> dict[str, str]:
    """The environment of a machine without configured servers: every TESSERA_* variable is ours.

    ports names every service and "gateway" (TESSERA_GATEWAY_PORT), each on a free port.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("TESSERA_")}
    env["TESSERA_HOME"] = str(home)
    env["TESSERA_EMBEDDED_FAST"] = "1"  # fsync off: same code path, faster on CI disks
    for name, port in ports.items():
        env[f"TESSERA_{name.upper()}_PORT"] = str(port)
    return env


def free_ports() -> dict[str, int]:
    """A free port for every service and for the gateway."""
    return {spec.name: free_port() for spec in SERVICES} | {"gateway": free_port()}


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
    """Every pid stack.json records: tessera up itself, PostgreSQL, NATS, each service, the gateway."""
    pids = [state["up"]["pid"], state["database"]["process"]["pid"], state["nats"]["process"]["pid"]]
    return pids + [service["process"]["pid"] for service in state["services"]] + [state["gateway"]["process"]["pid"]]


async def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [TESSERA, *args], env=env, capture_output=True, text=True, timeout=60
    )


async def test_up_serves_every_service_and_stops_without_leftovers(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ports = free_ports()
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

        # The gateway runs on its configured port, recorded in stack.json, and is ready.
        base = f"http://127.0.0.1:{ports['gateway']}"
        assert state["gateway"]["url"] == base
        assert state["gateway"]["address"] == f"127.0.0.1:{ports['gateway']}"
        assert Path(state["gateway"]["log"]) == home / "logs" / "gateway.log"
        assert f"{base}/docs" in text
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            healthz = await http.get("/healthz")
            assert healthz.status_code == 200, healthz.text
            readyz = await http.get("/readyz")
            assert readyz.status_code == 200, readyz.text
            assert set(readyz.json()["services"].values()) == {"SERVING"}
            document = await http.get("/openapi.json")
            assert document.status_code == 200
            assert document.headers["content-type"].startswith("application/json")
            assert document.json()["openapi"].startswith("3.1.")

        doctor = await run_cli("doctor", env=env | {"COLUMNS": "400"})  # one line per table row
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "everything is ready" in doctor.stdout
        assert f"HTTP 200 at {base}/readyz" in doctor.stdout

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

        # The same flow over HTTP/JSON through the gateway, as a frontend does it.
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            email, password = "rest.user@example.com", "rest staple horse battery 8"  # test credentials
            signed_up = await http.post(
                "/v1/users:signUp", json={"email": email, "password": password, "displayName": "Rest"}
            )
            assert signed_up.status_code == 200, signed_up.text
            rest_signed_in = await http.post("/v1/sessions:signIn", json={"email": email, "password": password})
            assert rest_signed_in.status_code == 200, rest_signed_in.text
            bearer = {"authorization": f"Bearer {rest_signed_in.json()['tokens']['accessToken']}"}
            anonymous_list = await http.get("/v1/workspaces")
            assert anonymous_list.status_code == 401, anonymous_list.text
            rest_created = await http.post("/v1/workspaces", json={"displayName": "Rest smoke"}, headers=bearer)
            assert rest_created.status_code == 200, rest_created.text
            workspace = rest_created.json()["workspace"]
            assert workspace["name"].startswith("workspaces/")
            assert workspace["displayName"] == "Rest smoke"
            listed = await http.get("/v1/workspaces", headers=bearer)
            assert listed.status_code == 200, listed.text
            names = [item["name"] for item in listed.json()["workspaces"]]
            assert workspace["name"] in names
            assert created.workspace.name not in names  # the gRPC user's workspace is not this user's

        family = psutil.Process(proc.pid).children(recursive=True)
        pids = recorded_pids(state)
        assert pids[0] == proc.pid
        assert set(pids[1:]) <= {child.pid for child in family}
        gateway_pid = state["gateway"]["process"]["pid"]

        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does
        stopped_after = await wait_for_exit(proc)
    finally:
        stop_if_running(proc)

    text = output.read_text()
    assert proc.returncode == 0, text
    assert "stack stopped" in text
    assert not (home / STACK_FILE).exists()
    assert_no_leftovers(family, pids)
    assert not psutil.pid_exists(gateway_pid) or psutil.Process(gateway_pid).status() == psutil.STATUS_ZOMBIE
    # The gateway stops first, before the services it forwards to.
    assert text.index("gateway stopped") < min(text.index(f"{spec.name} stopped") for spec in SERVICES)
    print(f"tessera up: ready after {ready_after:.1f}s, stopped {stopped_after:.1f}s after SIGINT")


@pytest.mark.parametrize("victim_kind", ["service", "gateway"])
async def test_up_stops_the_stack_and_fails_when_a_child_dies(tmp_path: Path, victim_kind: str) -> None:
    home = tmp_path / "home"
    env = fresh_machine_env(home, free_ports())
    output = tmp_path / "up.out"
    with output.open("wb") as out:
        proc = subprocess.Popen([TESSERA, "up"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        state = await wait_for_ready_state(proc, home, output)
        family = psutil.Process(proc.pid).children(recursive=True)
        victim = state["services"][0] if victim_kind == "service" else {"name": "gateway", **state["gateway"]}
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
        ports = free_ports() | {spec.name: taken}
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


def test_up_refuses_a_gateway_port_that_is_taken(tmp_path: Path) -> None:
    assert GATEWAY is not None
    home = tmp_path / "home"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        result = subprocess.run(
            [TESSERA, "up", "--port", f"gateway={taken}"],
            env=fresh_machine_env(home, free_ports()),  # TESSERA_GATEWAY_PORT is free: --port wins
            capture_output=True,
            text=True,
            timeout=60,
        )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"port {taken} for gateway is already in use" in output
    assert GATEWAY_PORT_ENV in output
    assert not (home / "postgres").exists()
    assert not (home / STACK_FILE).exists()
