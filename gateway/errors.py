"""gRPC status → HTTP response: grpc-gateway's status table and a `{code, message, details}` JSON body."""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from starlette.responses import JSONResponse

STATUS_DETAILS_KEY = "grpc-status-details-bin"

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status grpc-gateway uses for a gRPC status code."""
    return HTTP_STATUS.get(code, 500)


def code_number(code: grpc.StatusCode) -> int:
    """The numeric gRPC status code."""
    number: int = code.value[0]
    return number


def detail_to_json(detail: any_pb2.Any) -> dict[str, Any]:
    """A google.protobuf.Any as JSON with `@type` (opaque base64 when its type is unknown here)."""
    try:
        rendered: dict[str, Any] = json_format.MessageToDict(detail, always_print_fields_with_no_presence=True)
    except (TypeError, KeyError, json_format.Error):
        return {"@type": detail.type_url, "value": base64.b64encode(detail.value).decode()}
    return rendered


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def status_details(metadata: Iterable[tuple[str, str | bytes]] | None) -> list[any_pb2.Any]:
    """The google.rpc.Status details carried in `grpc-status-details-bin` trailing metadata."""
    for key, value in metadata or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except DecodeError:
                return []
            return list(status.details)
    return []


def retry_after_seconds(details: Sequence[any_pb2.Any]) -> int | None:
    """Whole seconds from a RetryInfo detail, if any."""
    for detail in details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay: float = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            return max(1, math.ceil(delay))
    return None


def error_response(
    code: grpc.StatusCode,
    message: str,
    *,
    details: Sequence[any_pb2.Any] = (),
    request_id: str,
    status: int | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The JSON error response for a gRPC status (or a gateway-made one with an explicit HTTP status)."""
    all_headers = {"x-request-id": request_id, **(headers or {})}
    if code == grpc.StatusCode.UNAUTHENTICATED:
        all_headers.setdefault("www-authenticate", 'Bearer realm="tessera"')
    retry_after = retry_after_seconds(details)
    if retry_after is not None:
        all_headers["retry-after"] = str(retry_after)
    body = {"code": code_number(code), "message": message, "details": [detail_to_json(d) for d in details]}
    return JSONResponse(body, status_code=status or http_status(code), headers=all_headers)


def rpc_error_response(error: grpc.aio.AioRpcError, *, request_id: str) -> JSONResponse:
    """The JSON error response for a failed RPC."""
    details = status_details(error.trailing_metadata())
    code = error.code()
    message = error.details() or code.name.lower()
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS):
        # Never relay what an internal failure says about itself (SQL, tracebacks): keep ErrorInfo only.
        message = "internal error"
        details = [d for d in details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    if code == grpc.StatusCode.UNAVAILABLE and not details:
        message = "backend unavailable"
    if not any(d.Is(error_details_pb2.RequestInfo.DESCRIPTOR) for d in details):
        details = [*details, request_info(request_id)]
    return error_response(code, message, details=details, request_id=request_id)


def request_info(request_id: str) -> any_pb2.Any:
    """A google.rpc.RequestInfo detail naming the request id."""
    return _pack(error_details_pb2.RequestInfo(request_id=request_id))


def bad_request(message: str, *, field: str, request_id: str) -> JSONResponse:
    """400 INVALID_ARGUMENT with a BadRequest field violation (when a field is named)."""
    details = [request_info(request_id)]
    if field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        details.insert(0, _pack(error_details_pb2.BadRequest(field_violations=[violation])))
    return error_response(grpc.StatusCode.INVALID_ARGUMENT, message, details=details, request_id=request_id)


def internal_error(request_id: str) -> JSONResponse:
    """The generic 500 for an unexpected gateway failure: no stack trace, just the request id."""
    return error_response(
        grpc.StatusCode.INTERNAL, "internal error", details=[request_info(request_id)], request_id=request_id
    )
