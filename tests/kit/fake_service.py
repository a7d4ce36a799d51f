"""A proto-free test servicer for the kit runtime, served under the tenancy service name.

It uses the generated tenancy request/response messages (so protovalidate rules, auth rules and
reflection are real) but none of the tenancy implementation: handlers are registered with a generic
handler. CreateWorkspace is a USER method, GetWorkspace a WORKSPACE method (`workspace.read`);
UpdateWorkspace echoes its workspace; the methods in `EMPTY_METHODS` answer an empty response (they
exist so that each permission of the contract can be exercised).
A test-only service, `tessera.kittest.v1.KitTestService`, whose descriptor is added to the descriptor
pool here, has WatchWorkspaces (server streaming, USER), Public (PUBLIC: answers with the caller, if
any) and Undeclared (no auth rule: refused).
The display name of a CreateWorkspace request selects the behaviour:

- `boom`        an unexpected exception whose text must never leave the process;
- `deadlock`    asyncpg's DeadlockDetectedError (a lost race: ABORTED, retryable);
- `missing`     NotFound; `busy`: ResourceExhausted with retry_after; `internal`: kit Internal;
- `slow`        waits until the test releases it (drain tests); `trace`: returns the current trace id as name;
- anything else echoes the workspace with `creator` = the current principal's subject.

GetWorkspace answers with the caller's principal (see `describe_caller`);
with a `downstream` address it instead calls GetWorkspace there on behalf of the caller
(`services.kit.client`) and returns that answer. Each FakeTenancy records the metadata and the
deadline of the GetWorkspace calls it served in `seen`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from opentelemetry import trace

from services.kit.client import outgoing_metadata, outgoing_timeout, service_channel
from services.kit.errors import Internal, NotFound, ResourceExhausted
from services.kit.interceptors import current_principal, current_principal_or_none
from services.kit.principal import Principal
from services.kit.server import ServicerBinding
from services.kit.settings import KitSettings, load_settings
from tessera.common.v1 import auth_pb2
from tessera.tenancy.v1 import tenancy_pb2, tenancy_service_pb2, tenancy_service_pb2_grpc

SERVICE = "tessera.tenancy.v1.TenancyService"
TEST_SERVICE = "tessera.kittest.v1.KitTestService"
SECRET_DETAIL = "secret-internal-detail-7f3a"
WATCH_METHOD = f"/{TEST_SERVICE}/WatchWorkspaces"  # a streaming method that exists only in this fake
UNDECLARED_METHOD = f"/{TEST_SERVICE}/Undeclared"  # a method whose contract declares no auth rule
PUBLIC_METHOD = f"/{TEST_SERVICE}/Public"  # a PUBLIC method: answers with the caller, if any


def _register_test_service() -> None:
    """Add the descriptor of the test-only service to the default pool (once per process)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(TEST_SERVICE)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto(
        name="tests/kit/kittest.proto",
        package="tessera.kittest.v1",
        syntax="proto3",
        dependency=["tessera/tenancy/v1/tenancy_service.proto", "tessera/common/v1/auth.proto"],
    )
    service = file.service.add(name="KitTestService")
    watch = service.method.add(
        name="WatchWorkspaces",
        input_type=".tessera.tenancy.v1.GetWorkspaceRequest",
        output_type=".tessera.tenancy.v1.Workspace",
        server_streaming=True,
    )
    watch.options.Extensions[auth_pb2.auth].level = auth_pb2.AUTH_LEVEL_USER
    public = service.method.add(
        name="Public",
        input_type=".tessera.tenancy.v1.GetWorkspaceRequest",
        output_type=".tessera.tenancy.v1.GetWorkspaceResponse",
    )
    public.options.Extensions[auth_pb2.auth].level = auth_pb2.AUTH_LEVEL_PUBLIC
    service.method.add(
        name="Undeclared",
        input_type=".tessera.tenancy.v1.GetWorkspaceRequest",
        output_type=".tessera.tenancy.v1.GetWorkspaceResponse",
    )
    pool.AddSerializedFile(file.SerializeToString())


_register_test_service()


def describe_caller(principal: Principal) -> tenancy_service_pb2.GetWorkspaceResponse:
    """The principal, packed into a workspace: name = its tenant, etag = role, creator = subject,
    display_name = `<kind>:<session id>`."""
    return tenancy_service_pb2.GetWorkspaceResponse(
        workspace=tenancy_pb2.Workspace(
            name=f"workspaces/{principal.tenant_id}" if principal.tenant_id else "",
            etag=principal.role or "",
            creator=principal.subject,
            display_name=f"{principal.kind}:{principal.session_id or ''}",
        )
    )


class FakeTenancy:
    """Echo handlers with failure modes selected by the request."""

    def __init__(self, *, downstream: str | None = None) -> None:
        self.slow_started = asyncio.Event()
        self.release = asyncio.Event()
        self.downstream = downstream
        # Per GetWorkspace served: its metadata and its deadline (time.monotonic() clock; None: no deadline).
        self.seen: list[tuple[dict[str, str], float | None]] = []

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
        if name == "deadlock":  # what asyncpg raises when PostgreSQL picks this transaction as deadlock victim
            raise asyncpg.exceptions.DeadlockDetectedError(f"deadlock detected: {SECRET_DETAIL}")
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
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        self.seen.append((dict(context.invocation_metadata() or ()), deadline))
        if self.downstream is not None:
            stub = tenancy_service_pb2_grpc.TenancyServiceStub(service_channel(self.downstream))
            response: tenancy_service_pb2.GetWorkspaceResponse = await stub.GetWorkspace(
                request, metadata=outgoing_metadata(), timeout=outgoing_timeout(30.0)
            )
            return response
        return describe_caller(current_principal())

    async def public(
        self, request: tenancy_service_pb2.GetWorkspaceRequest, context: Any
    ) -> tenancy_service_pb2.GetWorkspaceResponse:
        principal = current_principal_or_none()
        if principal is None:
            return tenancy_service_pb2.GetWorkspaceResponse()
        return describe_caller(principal)

    async def update_workspace(
        self, request: tenancy_service_pb2.UpdateWorkspaceRequest, context: Any
    ) -> tenancy_service_pb2.UpdateWorkspaceResponse:
        return tenancy_service_pb2.UpdateWorkspaceResponse(workspace=request.workspace)

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
    handlers["UpdateWorkspace"] = grpc.unary_unary_rpc_method_handler(
        servicer.update_workspace,
        request_deserializer=tenancy_service_pb2.UpdateWorkspaceRequest.FromString,
        response_serializer=tenancy_service_pb2.UpdateWorkspaceResponse.SerializeToString,
    )
    for name in EMPTY_METHODS:
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            _empty_response(getattr(tenancy_service_pb2, f"{name}Response")),
            request_deserializer=getattr(tenancy_service_pb2, f"{name}Request").FromString,
            response_serializer=getattr(tenancy_service_pb2, f"{name}Response").SerializeToString,
        )
    watch = handlers.pop("WatchWorkspaces")
    test_handlers = {
        "WatchWorkspaces": watch,
        "Public": grpc.unary_unary_rpc_method_handler(
            servicer.public,
            request_deserializer=tenancy_service_pb2.GetWorkspaceRequest.FromString,
            response_serializer=tenancy_service_pb2.GetWorkspaceResponse.SerializeToString,
        ),
        "Undeclared": grpc.unary_unary_rpc_method_handler(
            servicer.get_workspace,
            request_deserializer=tenancy_service_pb2.GetWorkspaceRequest.FromString,
            response_serializer=tenancy_service_pb2.GetWorkspaceResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(SERVICE, handlers),
            grpc.method_handlers_generic_handler(TEST_SERVICE, test_handlers),
        )
    )


# TenancyService methods answered with an empty response, with the permission their contract requires.
EMPTY_METHODS: dict[str, str] = {
    "DeleteWorkspace": "workspace.delete",
    "TransferOwnership": "workspace.transfer",
    "ListMembers": "members.read",
    "CreateInvitation": "members.manage",
    "ListAuditEvents": "audit.read",
}


def _empty_response(response_type: type[Any]) -> Any:
    async def handler(request: Any, context: Any) -> Any:
        return response_type()

    return handler


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
        "auth": "disabled",
        "environment": "test",
        "otel_exporter": "none",
        "shutdown_grace_seconds": 5.0,
    }
    values.update(overrides)
    return load_settings(KitSettings, **values)
