"""The kit interceptor over a real gRPC server: validation, error mapping, request ids, auth modes, metrics."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from services.kit.errors import ERROR_DOMAIN, Unauthenticated
from services.kit.interceptors import current_principal, violation_path
from services.kit.observability import start_metrics_server
from services.kit.principal import (
    DEVELOPMENT_ROLE_HEADER,
    DEVELOPMENT_USER_HEADER,
    DEVELOPMENT_USER_ID,
    DEVELOPMENT_WORKSPACE_HEADER,
)
from services.kit.server import ServiceRuntime
from tessera.tenancy.v1 import tenancy_pb2, tenancy_service_pb2, tenancy_service_pb2_grpc
from tests.auth_helpers import TestKeys
from tests.kit.fake_service import SECRET_DETAIL, SERVICE, WATCH_METHOD, FakeTenancy, fake_binding, kit_settings

pytestmark = pytest.mark.gate("S01")

# Disabled auth mode: a caller acting as viewer in some workspace.
DEV_VIEWER = ((DEVELOPMENT_WORKSPACE_HEADER, str(uuid.uuid4())), (DEVELOPMENT_ROLE_HEADER, "viewer"))


@pytest.fixture(scope="module")
async def dev_channel() -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a runtime in disabled auth mode (the caller comes from x-tessera-dev-* metadata)."""
    rt = ServiceRuntime(name="fake", settings=kit_settings(auth="disabled"), bindings=[fake_binding(FakeTenancy())])
    port = await rt.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close()
        await rt.stop()


@pytest.fixture(scope="module")
async def enforced_channel() -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a runtime in enforced auth mode (verifying with a key no test signs with)."""
    rt = ServiceRuntime(
        name="fake",
        settings=kit_settings(auth="enforced"),
        bindings=[fake_binding(FakeTenancy())],
        verifier=TestKeys().verifier,
    )
    port = await rt.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close()
        await rt.stop()


@pytest.fixture(scope="module")
async def traced_channel() -> AsyncIterator[grpc.aio.Channel]:
    """A runtime with tracing on: the OpenTelemetry interceptor runs before the kit's."""
    rt = ServiceRuntime(
        name="fake", settings=kit_settings(otel_exporter="console"), bindings=[fake_binding(FakeTenancy())]
    )
    port = await rt.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close()
        await rt.stop()


def create_request(display_name: str, **fields: Any) -> tenancy_service_pb2.CreateWorkspaceRequest:
    return tenancy_service_pb2.CreateWorkspaceRequest(
        workspace=tenancy_pb2.Workspace(display_name=display_name), **fields
    )


async def failed_status(call: Any) -> tuple[grpc.aio.AioRpcError, status_pb2.Status]:
    """Await a call expected to fail; its error and the google.rpc.Status from the trailer."""
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    status = await rpc_status.aio.from_call(call)
    assert status is not None, "no grpc-status-details-bin trailer"
    return failure.value, status


def detail(status: status_pb2.Status, kind: type[Message]) -> Any:
    found = []
    for item in status.details:
        if item.Is(kind.DESCRIPTOR):
            message = kind()
            item.Unpack(message)
            found.append(message)
    assert len(found) <= 1, f"more than one {kind.__name__}"
    return found[0] if found else None


def requests_total(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "tessera_rpc_requests_total", {"service": SERVICE, "method": method, "code": code}
    )
    return value or 0.0


# -- validation -----------------------------------------------------------------------------------


async def test_invalid_request_is_invalid_argument_with_field_violations(dev_channel: grpc.aio.Channel) -> None:
    stub = tenancy_service_pb2_grpc.TenancyServiceStub(dev_channel)
    call = stub.CreateWorkspace(create_request("", request_id="not-a-uuid"), metadata=(("x-request-id", "bad-1"),))
    error, status = await failed_status(call)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = detail(status, error_details_pb2.BadRequest)
    violations = {v.field: v for v in bad_request.field_violations}
    assert set(violations) == {"workspace.display_name", "request_id"}
    assert violations["workspace.display_name"].reason == "string.min_len"
    assert violations["workspace.display_name"].description
    assert violations["request_id"].reason == "string.uuid"
    info = detail(status, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", ERROR_DOMAIN)
    assert detail(status, error_details_pb2.RequestInfo).request_id == "bad-1"
    assert "workspace.display_name" in (error.details() or "")


async def test_missing_required_message_names_the_field(dev_channel: grpc.aio.Channel) -> None:
    stub = tenancy_service_pb2_grpc.TenancyServiceStub(dev_channel)
    error, status = await failed_status(stub.CreateWorkspace(tenancy_service_pb2.CreateWorkspaceRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [(v.field, v.reason) for v in detail(status, error_details_pb2.BadRequest).field_violations]
    assert fields == [("workspace", "required")]


async def test_streaming_response_validates_request_and_maps_errors_mid_stream(
    dev_channel: grpc.aio.Channel,
) -> None:
    watch = dev_channel.unary_stream(
        WATCH_METHOD,
        request_serializer=tenancy_service_pb2.GetWorkspaceRequest.SerializeToString,
        response_deserializer=tenancy_pb2.Workspace.FromString,
    )
    name = f"workspaces/{uuid.uuid4()}"
    events = [ws.display_name async for ws in watch(tenancy_service_pb2.GetWorkspaceRequest(name=name))]
    assert events == ["event 0", "event 1", "event 2"]

    invalid = watch(tenancy_service_pb2.GetWorkspaceRequest(name="nope"))
    with pytest.raises(grpc.aio.AioRpcError) as rejected:
        await invalid.read()
    assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = await rpc_status.aio.from_call(invalid)
    assert status is not None
    assert [v.field for v in detail(status, error_details_pb2.BadRequest).field_violations] == ["name"]

    call = watch(tenancy_service_pb2.GetWorkspaceRequest(name="workspaces/00000000-0000-7000-8000-0000000000ff"))
    received = [(await call.read()).display_name, (await call.read()).display_name]
    assert received == ["event 0", "event 1"]
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call.read()
    assert failure.value.code() == grpc.StatusCode.INTERNAL
    assert SECRET_DETAIL not in (failure.value.details() or "")


def test_violation_path_renders_indexes_and_map_keys() -> None:
    from protobuf import Oneof
    from protovalidate import FieldPathElementPb, FieldPathPb, Violation

    violation = Violation(
        field=FieldPathPb(
            elements=[
                FieldPathElementPb(field_name="items", subscript=Oneof("index", 2)),
                FieldPathElementPb(field_name="labels", subscript=Oneof("string_key", "env")),
                FieldPathElementPb(field_name="title"),
            ]
        ),
        rule_id="string.min_len",
        message="too short",
    )
    assert violation_path(violation) == 'items[2].labels["env"].title'


# -- error mapping --------------------------------------------------------------------------------


async def test_app_error_maps_to_its_code_with_error_info(dev_channel: grpc.aio.Channel) -> None:
    stub = tenancy_service_pb2_grpc.TenancyServiceStub(dev_channel)
    error, status = await failed_status(stub.CreateWorkspace(create_request("missing")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    info = detail(status, error_details_pb2.ErrorInfo)
    assert info.reason == "RESOURCE_NOT_FOUND"
    assert info.domain == ERROR_DOMAIN
    assert info.metadata["resource"] == "workspaces/0190a0a0-0000-7000-8000-000000000001"
    assert detail(status, error_details_pb2.BadRequest) is None
    assert detail(status, error_details_pb2.RequestInfo).request_id


async def test_retry_after_becomes_retry_info(dev_channel: grpc.aio.Channel) -> None:
    stub = tenancy_service_pb2_grpc.TenancyServiceStub(dev_channel)
    error, status = await failed_status(stub.CreateWorkspace(create_request("busy")))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert detail(status, error_details_pb2.ErrorInfo).metadata["limit"] == "3"
    assert detail(status, error_details_pb2.RetryInfo).retry_delay.ToMilliseconds() == 1500


async def test_a_lost_database_race_is_aborted_without_detail(dev_channel: grpc.aio.Channel) -> None:
    stub = tenancy_service_pb2_grpc.TenancyServiceStub(dev_channel)
    error, status = await failed_status(stub.CreateWorkspace(create_request("deadlock")))
    assert error.code() == grpc.StatusCode.ABORTED
    assert SECRET_DETAIL not in (error.details() or "")
    assert detail(status, error_details_pb2.ErrorInfo).reason == "ABORTED"


@pytest.mark.parametrize("display_name", ["boom", "internal"])
async def test_unexpected_exception_is_internal_without_detail(
    dev_channel: grpc.aio.Channel, display_name: str
) -> None:
    stub = tenancy_service_pb2_grpc.TenancyServiceStub(dev_channel)
    call = stub.CreateWorkspace(create_request(display_name), metadata=(("x-request-id", "boom-req-1"),))
    error, status = await failed_status(call)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error (request id boom-req-1)"
    serialized = status.SerializeToString()
    for leak in (SECRET_DETAIL, "RuntimeError", "Traceback", "database password"):
        assert leak.encode() not in serialized
        assert leak not in (error.debug_error_string() or "")
    info = detail(status, error_details_pb2.ErrorInfo)
    assert (info.reason, dict(info.metadata)) == ("INTERNAL", {})


# -- request id -----------------------------------------------------------------------------------


async def test_request_id_is_echoed_or_generated(dev_channel: grpc.aio.Channel) -> None:
    stub = tenancy_service_pb2_grpc.TenancyServiceStub(dev_channel)
    call = stub.GetWorkspace(
        tenancy_service_pb2.GetWorkspaceRequest(name=f"workspaces/{uuid.uuid4()}"),
        metadata=(("x-request-id", "client-chosen-42"), *DEV_VIEWER),
    )
    await call
    assert dict(await call.trailing_metadata())["x-request-id"] == "client-chosen-42"

    generated = []
    for metadata in ((), (("x-request-id", "has spaces and $ymbols"),)):
        call = stub.GetWorkspace(
            tenancy_service_pb2.GetWorkspaceRequest(name=f"workspaces/{uuid.uuid4()}"),
            metadata=(*metadata, *DEV_VIEWER),
        )
        await call
        generated.append(dict(await call.trailing_metadata())["x-request-id"])
    assert all(len(rid) == 32 and int(rid, 16) >= 0 for rid in generated)
    assert generated[0] != generated[1]


async def test_request_id_is_echoed_on_errors(dev_channel: grpc.aio.Channel) -> None:
    stub = tenancy_service_pb2_grpc.TenancyServiceStub(dev_channel)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.CreateWorkspace(create_request("missing"), metadata=(("x-request-id", "err-echo-7"),))
    assert dict(failure.value.trailing_metadata())["x-request-id"] == "err-echo-7"


# -- metrics --------------------------------------------------------------------------------------


async def test_metrics_count_each_rpc_with_its_code(dev_channel: grpc.aio.Channel) -> None:
    stub = tenancy_service_pb2_grpc.TenancyServiceStub(dev_channel)
    ok_before = requests_total("CreateWorkspace", "OK")
    bad_before = requests_total("CreateWorkspace", "INVALID_ARGUMENT")
    await stub.CreateWorkspace(create_request("Acme"))
    await stub.CreateWorkspace(create_request("Acme"))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.CreateWorkspace(create_request(""))
    assert requests_total("CreateWorkspace", "OK") == ok_before + 2
    assert requests_total("CreateWorkspace", "INVALID_ARGUMENT") == bad_before + 1

    port = start_metrics_server(0, host="127.0.0.1")
    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    )
    assert f'tessera_rpc_requests_total{{code="INVALID_ARGUMENT",method="CreateWorkspace",service="{SERVICE}"}}' in body
    assert f'tessera_rpc_duration_seconds_bucket{{le="0.0005",method="CreateWorkspace",service="{SERVICE}"}}' in body


# -- principal ------------------------------------------------------------------------------------


async def test_disabled_mode_uses_the_header_uuid_or_the_development_user(dev_channel: grpc.aio.Channel) -> None:
    stub = tenancy_service_pb2_grpc.TenancyServiceStub(dev_channel)
    user = str(uuid.uuid4())
    response = await stub.CreateWorkspace(create_request("Acme"), metadata=((DEVELOPMENT_USER_HEADER, user.upper()),))
    assert response.workspace.creator == user
    response = await stub.CreateWorkspace(create_request("Acme"))
    assert response.workspace.creator == DEVELOPMENT_USER_ID
    # A malformed header is refused rather than silently mapped to the shared development user.
    error, _ = await failed_status(
        stub.CreateWorkspace(create_request("Acme"), metadata=((DEVELOPMENT_USER_HEADER, "root"),))
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert DEVELOPMENT_USER_HEADER in (error.details() or "")


def test_current_principal_outside_an_rpc_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated):
        current_principal()


@pytest.mark.gate("S02")
async def test_enforced_mode_rejects_business_rpcs_even_with_a_development_header(
    enforced_channel: grpc.aio.Channel,
) -> None:
    stub = tenancy_service_pb2_grpc.TenancyServiceStub(enforced_channel)
    for metadata in ((), ((DEVELOPMENT_USER_HEADER, str(uuid.uuid4())),)):
        error, status = await failed_status(stub.CreateWorkspace(create_request("Acme"), metadata=metadata))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert detail(status, error_details_pb2.ErrorInfo).reason == "UNAUTHENTICATED"
    # Invalid input is not even looked at before authentication.
    error, _ = await failed_status(stub.CreateWorkspace(tenancy_service_pb2.CreateWorkspaceRequest()))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.gate("S02")
async def test_enforced_mode_keeps_health_and_reflection_public(enforced_channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(enforced_channel)
    assert (await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    reflection = reflection_pb2_grpc.ServerReflectionStub(enforced_channel)
    responses = [
        r
        async for r in reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    ]
    assert SERVICE in {s.name for s in responses[0].list_services_response.service}


# -- tracing --------------------------------------------------------------------------------------


async def test_trace_context_reaches_the_handler_and_errors_still_map(traced_channel: grpc.aio.Channel) -> None:
    stub = tenancy_service_pb2_grpc.TenancyServiceStub(traced_channel)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = await stub.CreateWorkspace(
        create_request("trace"), metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
    )
    assert response.workspace.name == trace_id

    error, status = await failed_status(stub.CreateWorkspace(create_request("")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in detail(status, error_details_pb2.BadRequest).field_violations] == [
        "workspace.display_name"
    ]
    error, _ = await failed_status(stub.CreateWorkspace(create_request("boom")))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert SECRET_DETAIL not in (error.details() or "")
