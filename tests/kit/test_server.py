"""The service runtime: health per service, drain on shutdown, reflection, background order, the process entry."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from services.kit.server import ServiceRuntime
from tessera.tenancy.v1 import tenancy_pb2, tenancy_service_pb2, tenancy_service_pb2_grpc
from tests.helpers import eventually
from tests.kit.fake_service import SECRET_DETAIL, SERVICE, FakeTenancy, fake_binding, kit_settings

REPO = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_status(port: int, service: str = "") -> Any:
    """A Check over a fresh channel: the status, or the gRPC error code when the call fails."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return response.status


async def poll(check: Any, *, timeout: float = 5.0, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}; last value {last!r}")


@pytest.fixture
async def runtime() -> AsyncIterator[tuple[ServiceRuntime, FakeTenancy]]:
    fake = FakeTenancy()
    rt = ServiceRuntime(name="fake", settings=kit_settings(), bindings=[fake_binding(fake)], drain_seconds=0.3)
    await rt.start()
    try:
        yield rt, fake
    finally:
        fake.release.set()
        await rt.stop()


async def test_health_serving_for_process_and_each_service_after_start(
    runtime: tuple[ServiceRuntime, FakeTenancy],
) -> None:
    rt, _ = runtime
    assert rt.port > 0
    assert await health_status(rt.port) == SERVING
    assert await health_status(rt.port, SERVICE) == SERVING
    before = REGISTRY.get_sample_value(
        "tessera_rpc_requests_total", {"service": "grpc.health.v1.Health", "method": "Check", "code": "NOT_FOUND"}
    )
    assert await health_status(rt.port, "tessera.nope.v1.NopeService") == grpc.StatusCode.NOT_FOUND
    # A handler's own context.abort() is counted with its code too. The interceptor records the call after
    # the status has left, so the client can see it first: wait for the count.

    async def counted() -> bool:
        after = REGISTRY.get_sample_value(
            "tessera_rpc_requests_total",
            {"service": "grpc.health.v1.Health", "method": "Check", "code": "NOT_FOUND"},
        )
        return after == (before or 0) + 1

    await eventually(counted, timeout=5, what="the NOT_FOUND health check to be counted")


async def test_stop_reports_not_serving_then_lets_in_flight_rpc_finish(
    runtime: tuple[ServiceRuntime, FakeTenancy],
) -> None:
    rt, fake = runtime
    async with grpc.aio.insecure_channel(f"127.0.0.1:{rt.port}") as channel:
        stub = tenancy_service_pb2_grpc.TenancyServiceStub(channel)
        in_flight = asyncio.ensure_future(
            stub.CreateWorkspace(
                tenancy_service_pb2.CreateWorkspaceRequest(workspace=tenancy_pb2.Workspace(display_name="slow")),
                timeout=20,
            )
        )
        await asyncio.wait_for(fake.slow_started.wait(), 5)
        stopping = asyncio.ensure_future(rt.stop())

        async def not_serving() -> bool:
            return await health_status(rt.port, SERVICE) == NOT_SERVING and await health_status(rt.port) == NOT_SERVING

        await poll(not_serving, what="NOT_SERVING during drain")
        assert not in_flight.done()

        # After the drain pause the server refuses new RPCs, while the in-flight one still runs.
        async def refusing() -> bool:
            return await health_status(rt.port) == grpc.StatusCode.UNAVAILABLE

        await poll(refusing, what="new RPCs refused")
        assert not in_flight.done()
        assert not stopping.done()

        fake.release.set()
        response = await in_flight
        assert response.workspace.display_name == "slow"
        await asyncio.wait_for(stopping, 10)
    await rt.wait_closed()


async def test_reflection_lists_service_health_and_reflection(runtime: tuple[ServiceRuntime, FakeTenancy]) -> None:
    rt, _ = runtime
    async with grpc.aio.insecure_channel(f"127.0.0.1:{rt.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
                ]
            )
        )
        responses = [response async for response in call]
    listed = {service.name for service in responses[0].list_services_response.service}
    assert listed == {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    files = responses[1].file_descriptor_response.file_descriptor_proto
    assert files, "reflection returned no descriptor for the service"


async def test_port_in_use_is_refused_with_the_address() -> None:
    first = ServiceRuntime(name="a", settings=kit_settings(), bindings=[fake_binding(FakeTenancy())])
    port = await first.start()
    try:
        second = ServiceRuntime(name="b", settings=kit_settings(grpc_port=port), bindings=[fake_binding(FakeTenancy())])
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            await second.start()
    finally:
        await first.stop()


async def test_replicas_share_a_port_when_asked_and_each_serves_it() -> None:
    first = ServiceRuntime(
        name="a", settings=kit_settings(grpc_reuse_port=True), bindings=[fake_binding(FakeTenancy())]
    )
    port = await first.start()
    second = ServiceRuntime(
        name="b", settings=kit_settings(grpc_port=port, grpc_reuse_port=True), bindings=[fake_binding(FakeTenancy())]
    )
    try:
        assert await second.start() == port
        assert await health_status(port, SERVICE) == SERVING
        await first.stop()
        # The port stays served: new connections go to the replica left.
        assert await health_status(port, SERVICE) == SERVING
    finally:
        await first.stop()
        await second.stop()


class RecordingBackground:
    def __init__(self, name: str, log: list[str], runtime_ref: list[ServiceRuntime]) -> None:
        self.name = name
        self.log = log
        self.runtime_ref = runtime_ref

    async def start(self) -> None:
        rt = self.runtime_ref[0]
        self.log.append(f"start {self.name} health={await health_status(rt.port, SERVICE)}")

    async def stop(self) -> None:
        self.log.append(f"stop {self.name}")


async def test_background_services_start_after_bind_and_stop_in_reverse_after_the_server() -> None:
    log: list[str] = []
    ref: list[ServiceRuntime] = []
    rt = ServiceRuntime(
        name="bg",
        settings=kit_settings(),
        bindings=[fake_binding(FakeTenancy())],
        background=[RecordingBackground("relay", log, ref), RecordingBackground("consumer", log, ref)],
    )
    ref.append(rt)
    port = await rt.start()
    assert await health_status(port, SERVICE) == SERVING
    await rt.stop()
    assert log == [
        f"start relay health={NOT_SERVING}",
        f"start consumer health={NOT_SERVING}",
        "stop consumer",
        "stop relay",
    ]
    assert await health_status(port) == grpc.StatusCode.UNAVAILABLE


def _service_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("TESSERA_", "OTEL_"))}
    env.update(
        TESSERA_DATABASE_URL="postgresql://tessera@127.0.0.1:1/unused",
        TESSERA_NATS_URL="nats://127.0.0.1:1",
        TESSERA_AUTH="disabled",
        TESSERA_ENVIRONMENT="test",
        TESSERA_GRPC_PORT="0",
        TESSERA_LOG_LEVEL="INFO",
    )
    env.update(extra)
    return env


@pytest.mark.gate("S01")
async def test_run_service_logs_json_serves_and_stops_on_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.kit.tiny_service",
        cwd=REPO,
        env=_service_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    lines: list[dict[str, Any]] = []
    try:
        ready: dict[str, Any] = {}
        while not ready:
            raw = await asyncio.wait_for(process.stderr.readline(), 20)
            assert raw, f"service exited before ready: {lines}"
            entry = json.loads(raw)
            lines.append(entry)
            if entry["event"] == "service ready":
                ready = entry
        port = ready["port"]
        assert ready["level"] == "info"
        assert "timestamp" in ready
        assert ready["service"] == "tiny"

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = tenancy_service_pb2_grpc.TenancyServiceStub(channel)
            await stub.CreateWorkspace(
                tenancy_service_pb2.CreateWorkspaceRequest(workspace=tenancy_pb2.Workspace(display_name="Acme")),
                metadata=(("x-request-id", "req-ok-1"),),
            )
            call = stub.CreateWorkspace(
                tenancy_service_pb2.CreateWorkspaceRequest(workspace=tenancy_pb2.Workspace(display_name="boom")),
                metadata=(("x-request-id", "req-boom-1"),),
            )
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await call
            assert failure.value.code() == grpc.StatusCode.INTERNAL
            assert SECRET_DETAIL not in (failure.value.details() or "")
            status = await rpc_status.aio.from_call(call)
            assert status is not None
            assert SECRET_DETAIL not in str(status)

        process.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(process.stderr.read(), 20)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    lines.extend(json.loads(line) for line in rest.decode().splitlines() if line.strip())

    ok = [e for e in lines if e["event"] == "rpc" and e.get("request_id") == "req-ok-1"]
    assert len(ok) == 1
    assert ok[0]["code"] == "OK"
    assert ok[0]["rpc_method"] == f"/{SERVICE}/CreateWorkspace"
    assert ok[0]["subject"] == "00000000-0000-7000-8000-00000000d0e0"
    assert isinstance(ok[0]["duration_ms"], float)
    failed = [e for e in lines if e.get("request_id") == "req-boom-1"]
    assert [e["code"] for e in failed if e["event"] == "rpc"] == ["INTERNAL"]
    # The traceback goes to the log (and only there).
    assert any(SECRET_DETAIL in json.dumps(e.get("exception", "")) for e in failed if e["level"] == "error")
    events = [e["event"] for e in lines]
    assert events.index("service stopping") < events.index("service stopped")
