"""gRPC status → HTTP error responses: grpc-gateway's table, `{code, message, details}`, no stack traces."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from starlette.requests import Request

from gateway import errors
from gateway.app import create_app
from gateway.settings import GatewaySettings
from tessera_cli.embedded import free_port
from tests.e2e.stack import Mesh
from tests.gateway.conftest import serve
from tests.helpers import eventually

pytestmark = pytest.mark.gate("S01")


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.OK, 200),
        (grpc.StatusCode.CANCELLED, 499),
        (grpc.StatusCode.UNKNOWN, 500),
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.ALREADY_EXISTS, 409),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.FAILED_PRECONDITION, 400),
        (grpc.StatusCode.ABORTED, 409),
        (grpc.StatusCode.OUT_OF_RANGE, 400),
        (grpc.StatusCode.UNIMPLEMENTED, 501),
        (grpc.StatusCode.INTERNAL, 500),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DATA_LOSS, 500),
    ],
)
def test_grpc_gateway_status_table(code: grpc.StatusCode, status: int) -> None:
    assert errors.http_status(code) == status


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _rpc_error(code: grpc.StatusCode, message: str, *details: Any) -> grpc.aio.AioRpcError:
    status = status_pb2.Status(code=code.value[0], message=message, details=[_packed(d) for d in details])
    trailing = grpc.aio.Metadata((errors.STATUS_DETAILS_KEY, status.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=message)


def _body(response: Any) -> Any:
    return json.loads(bytes(response.body))


def test_error_body_carries_code_message_and_typed_details() -> None:
    violation = error_details_pb2.BadRequest.FieldViolation(field="workspace.display_name", description="too short")
    info = error_details_pb2.ErrorInfo(reason="INVALID_FIELD", domain="tessera.dev", metadata={"field": "x"})
    error = _rpc_error(
        grpc.StatusCode.INVALID_ARGUMENT, "bad input", info, error_details_pb2.BadRequest(field_violations=[violation])
    )

    response = errors.rpc_error_response(error, request_id="req-1")

    assert response.status_code == 400
    body = _body(response)
    assert body["code"] == 3
    assert body["message"] == "bad input"
    types = [detail["@type"] for detail in body["details"]]
    assert types == [
        "type.googleapis.com/google.rpc.ErrorInfo",
        "type.googleapis.com/google.rpc.BadRequest",
        "type.googleapis.com/google.rpc.RequestInfo",
    ]
    assert body["details"][0]["reason"] == "INVALID_FIELD"
    assert body["details"][1]["fieldViolations"][0]["field"] == "workspace.display_name"
    assert body["details"][2]["requestId"] == "req-1"
    assert response.headers["x-request-id"] == "req-1"


def test_unauthenticated_asks_for_a_bearer_token() -> None:
    response = errors.rpc_error_response(_rpc_error(grpc.StatusCode.UNAUTHENTICATED, "no token"), request_id="r")

    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert _body(response)["code"] == 16


def test_resource_exhausted_turns_retry_info_into_retry_after() -> None:
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=7, nanos=200_000_000))

    response = errors.rpc_error_response(
        _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", retry), request_id="r"
    )

    assert response.status_code == 429
    assert response.headers["retry-after"] == "8"
    assert _body(response)["details"][0]["retryDelay"] == "7.200s"


def test_internal_errors_never_relay_what_the_backend_said() -> None:
    leaked = error_details_pb2.DebugInfo(stack_entries=["File services/x.py"], detail="SELECT * FROM secrets")
    error = _rpc_error(grpc.StatusCode.INTERNAL, 'relation "secrets" does not exist', leaked)

    response = errors.rpc_error_response(error, request_id="r")

    text = bytes(response.body).decode()
    assert response.status_code == 500
    assert "secrets" not in text
    assert "services/x.py" not in text
    assert _body(response)["message"] == "internal error"


def test_unknown_detail_types_stay_opaque() -> None:
    unknown = any_pb2.Any(type_url="type.googleapis.com/acme.Unknown", value=b"\x08\x01")

    assert errors.detail_to_json(unknown) == {"@type": "type.googleapis.com/acme.Unknown", "value": "CAE="}


async def test_unexpected_gateway_failure_is_a_generic_500_with_the_request_id(
    gateway_settings: GatewaySettings,
) -> None:
    app = create_app(gateway_settings)

    async def broken_credentials(request: Request, workspace_id: str | None) -> str | None:
        raise RuntimeError("boom: SELECT password_hash FROM identity.users")

    app.state.gateway.credentials = broken_credentials
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.get("/v1/users/me", headers={"x-request-id": "trace-me-1"})

    assert response.status_code == 500
    body = response.json()
    assert body["code"] == 13
    assert body["message"] == "internal error"
    assert "password_hash" not in response.text
    assert "Traceback" not in response.text
    assert response.headers["x-request-id"] == "trace-me-1"
    assert body["details"] == [
        {"@type": "type.googleapis.com/google.rpc.RequestInfo", "requestId": "trace-me-1", "servingData": ""}
    ]


# -- start-up: `python -m gateway.main` ------------------------------------------------------------


def _gateway_env(**variables: str) -> dict[str, str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("TESSERA_")}
    return {**clean, **variables}


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"TESSERA_IDENTITY_ADDRESS": "127.0.0.1:1"}, "TESSERA_TENANCY_ADDRESS"),
        (
            {"TESSERA_IDENTITY_ADDRESS": "a:1", "TESSERA_TENANCY_ADDRESS": "b:1", "TESSERA_GATEWAY_PORT": "http"},
            "TESSERA_GATEWAY_PORT",
        ),
        (
            {
                "TESSERA_IDENTITY_ADDRESS": "a:1",
                "TESSERA_TENANCY_ADDRESS": "b:1",
                "TESSERA_GATEWAY_MAX_BODY_BYTES": "0",
            },
            "TESSERA_GATEWAY_MAX_BODY_BYTES",
        ),
    ],
)
def test_bad_settings_fail_fast_naming_the_variable(variables: dict[str, str], named: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.main"],
        env=_gateway_env(**variables),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert proc.returncode == 2
    assert named in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_main_serves_the_gateway(gateway_mesh: Mesh) -> None:
    port = free_port()
    env = _gateway_env(
        TESSERA_IDENTITY_ADDRESS=gateway_mesh.addresses["tessera.identity.v1.IdentityService"],
        TESSERA_TENANCY_ADDRESS=gateway_mesh.addresses["tessera.tenancy.v1.TenancyService"],
        TESSERA_WORKFLOW_ADDRESS=gateway_mesh.addresses["tessera.workflow.v1.WorkflowService"],
        TESSERA_GATEWAY_PORT=str(port),
        TESSERA_GATEWAY_LOG_LEVEL="warning",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.main", env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

            async def ready() -> httpx.Response | None:
                try:
                    response = await http.get("/readyz")
                except httpx.TransportError:
                    return None
                return response if response.status_code == 200 else None

            await eventually(ready, timeout=30, interval=0.1, what="python -m gateway.main to become ready")
            unauthenticated = await http.get("/v1/users/me")
        assert unauthenticated.status_code == 401
    finally:
        process.terminate()
        # uvicorn shuts down gracefully, then re-raises the captured SIGTERM as its exit status.
        assert await asyncio.wait_for(process.wait(), timeout=20) in (0, -signal.SIGTERM)
