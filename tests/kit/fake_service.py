"""A proto-free test servicer for the kit runtime, served under the tenancy service name.

It uses the generated tenancy request/response messages (so protovalidate rules and reflection are
real) but none of the tenancy implementation: handlers are registered with a generic handler. The
display name of a CreateWorkspace request selects the behaviour:

- `boom`        an unexpected exception whose text must never leave the process;
- `missing`     NotFound; `busy`: ResourceExhausted with retry_after; `internal`: kit Internal;
- `slow`        waits until the test releases it (drain tests); `trace`: returns the current trace id as name;
- anything else echoes the workspace with `creator` = the current principal's subject.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from opentelemetry import trace

from services.kit.errors import Internal, NotFound, ResourceExhausted
from services.kit.interceptors import current_principal
from services.kit.server import ServicerBinding
from services.kit.settings import KitSettings, load_settings
from tessera.tenancy.v1 import tenancy_pb2, tenancy_service_pb2

SERVICE = "tessera.tenancy.v1.TenancyService"
SECRET_DETAIL = "secret-internal-detail-7f3a"
WATCH_METHOD = f"/{SERVICE}/WatchWorkspaces"  # a streaming method that exists only in this fake


class FakeTenancy:
    """Echo handlers with failure modes selected by the request."""

    def __init__(self) -> None:
        self.slow_started = asyncio.Event()
        self.release = asyncio.Event()

    async def create_workspace(
        self, request: tenancy_service_pb2.CreateWorkspaceRequest, context: Any
    ) -> tenancy_service_pb2.CreateWorkspaceResponse:
        name = request.workspace.display_name
        if name == "boom":
            raise RuntimeError(f"database password is {SECRET_DETAIL}")
        if name == "missing":
            raise NotFound.resource("workspaces/0190a0a0-0000-7000-8000-000000000001")
        if name == "busy":
            raise ResourceExhausted("too many workspaces", retry_after=1.5, metadata={"limit": "3"})
        if name == "internal":
            raise Internal(f"invariant broken: {SECRET_DETAIL}")
        if name == "trace":  # report the trace the handler runs in
            span_context = trace.get_current_span().get_span_context()
            return tenancy_service_pb2.CreateWorkspaceResponse(
                workspace=tenancy_pb2.Workspace(display_name=name, name=format(span_context.trace_id, "032x"))
            )
        if name == "slow":
            self.slow_started.set()
            await self.release.wait()
        principal = current_principal()
        return tenancy_service_pb2.CreateWorkspaceResponse(
            workspace=tenancy_pb2.Workspace(display_name=name, creator=principal.subject)
        )

    async def get_workspace(
        self, request: tenancy_service_pb2.GetWorkspaceRequest, context: Any
    ) -> tenancy_service_pb2.GetWorkspaceResponse:
        return tenancy_service_pb2.GetWorkspaceResponse(workspace=tenancy_pb2.Workspace(name=request.name))

    async def watch_workspaces(self, request: tenancy_service_pb2.GetWorkspaceRequest, context: Any) -> Any:
        for i in range(3):
            if i == 2 and request.name.endswith("0000000000ff"):
                raise RuntimeError(SECRET_DETAIL)
            yield tenancy_pb2.Workspace(name=request.name, display_name=f"event {i}")


def add_fake_to_server(servicer: Any, server: Any) -> None:
    """Register the fake handlers on a grpc.aio server (the shape of a generated add_*_to_server)."""
    handlers = {
        "CreateWorkspace": grpc.unary_unary_rpc_method_handler(
            servicer.create_workspace,
            request_deserializer=tenancy_service_pb2.CreateWorkspaceRequest.FromString,
            response_serializer=tenancy_service_pb2.CreateWorkspaceResponse.SerializeToString,
        ),
        "GetWorkspace": grpc.unary_unary_rpc_method_handler(
            servicer.get_workspace,
            request_deserializer=tenancy_service_pb2.GetWorkspaceRequest.FromString,
            response_serializer=tenancy_service_pb2.GetWorkspaceResponse.SerializeToString,
        ),
        "WatchWorkspaces": grpc.unary_stream_rpc_method_handler(
            servicer.watch_workspaces,
            request_deserializer=tenancy_service_pb2.GetWorkspaceRequest.FromString,
            response_serializer=tenancy_pb2.Workspace.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def fake_binding(servicer: FakeTenancy) -> ServicerBinding:
    return ServicerBinding(service_name=SERVICE, servicer=servicer, add_to_server=add_fake_to_server)


def kit_settings(**overrides: Any) -> KitSettings:
    """Settings for an in-process runtime that needs neither database nor broker."""
    values: dict[str, Any] = {
        "database_url": "postgresql://tessera@127.0.0.1:1/unused",
        "nats_url": "nats://127.0.0.1:1",
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": None,
        "auth": "development",
        "environment": "test",
        "otel_exporter": "none",
        "shutdown_grace_seconds": 5.0,
    }
    values.update(overrides)
    return load_settings(KitSettings, **values)
