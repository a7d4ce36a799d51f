"""The one error hierarchy of Tessera.

Domain code raises these; a single interceptor (`services.kit.interceptors`) maps them to a gRPC
status with `google.rpc.Status` details: `ErrorInfo` (domain `tessera.dev`, an UPPER_SNAKE reason
from `tessera.common.v1.ErrorReason`), `BadRequest` field violations, `RetryInfo` and `RequestInfo`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc

ERROR_DOMAIN = "tessera.dev"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: its path in the request (`workspace.display_name`) and what is wrong with it."""

    field: str
    description: str
    reason: str = ""


class AppError(Exception):
    """Base of every expected error; never surfaces as INTERNAL."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason: str = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[FieldViolation] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.violations = tuple(violations)
        self.retry_after = retry_after


class InvalidArgument(AppError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    @classmethod
    def for_field(cls, field: str, description: str, *, reason: str | None = None) -> InvalidArgument:
        """An INVALID_ARGUMENT naming one bad field."""
        return cls(f"invalid {field}: {description}", reason=reason, violations=[FieldViolation(field, description)])


class NotFound(AppError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "RESOURCE_NOT_FOUND"

    @classmethod
    def resource(cls, name: str) -> NotFound:
        """NOT_FOUND for a resource name; also used for resources of another tenant."""
        return cls(f"{name} not found", metadata={"resource": name})


class AlreadyExists(AppError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "RESOURCE_ALREADY_EXISTS"


class FailedPrecondition(AppError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class PermissionDenied(AppError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(AppError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(AppError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Aborted(AppError):
    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class Unavailable(AppError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class Internal(AppError):
    """An unexpected failure; its message is replaced by a generic one before it leaves the process."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"
