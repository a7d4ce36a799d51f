"""The workflow service's expected errors, all from the kit's AppError hierarchy, with their UPPER_SNAKE reasons."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from services.kit.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)

REQUEST_ID_REUSED = "REQUEST_ID_REUSED"
ETAG_MISMATCH = "ETAG_MISMATCH"
MISSING_PERMISSION = "MISSING_PERMISSION"
TRANSITION_NOT_ALLOWED = "TRANSITION_NOT_ALLOWED"
TRANSITION_GUARD_FAILED = "TRANSITION_GUARD_FAILED"
LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
PARENT_CYCLE = "PARENT_CYCLE"
RESOURCE_ARCHIVED = "RESOURCE_ARCHIVED"

MAX_ITEMS_LIMIT = "max_items_per_workspace"


class RequestIdReused(AlreadyExists):
    """A create's request_id was already used with a different payload."""

    default_reason = REQUEST_ID_REUSED


def invalid_field(field: str, description: str, *, reason: str | None = None) -> InvalidArgument:
    """INVALID_ARGUMENT naming one request field."""
    return InvalidArgument.for_field(field, description, reason=reason)


def not_found(name: str) -> NotFound:
    """NOT_FOUND for a resource that is absent, of another workspace or (for changes) soft-deleted."""
    return NotFound.resource(name)


def request_id_reused(request_id: uuid.UUID, what: str) -> RequestIdReused:
    """ALREADY_EXISTS: the request_id created something else (`what`: "project", "item")."""
    return RequestIdReused(
        f"request_id {request_id} was already used to create a different {what}",
        metadata={"request_id": str(request_id)},
    )


def missing_permission(permission: str) -> PermissionDenied:
    """PERMISSION_DENIED: the caller's role does not grant the permission."""
    return PermissionDenied(
        f"the caller's role does not grant {permission}",
        reason=MISSING_PERMISSION,
        metadata={"permission": permission},
    )


def etag_mismatch(name: str, stale: str, current: str) -> Aborted:
    """ABORTED: the resource changed since the caller read it."""
    return Aborted(
        f"{name} changed since it was read (etag {stale} is stale); read it again and retry",
        reason=ETAG_MISMATCH,
        metadata={"etag": current},
    )


def transition_not_allowed(name: str, status: str, to_status: str, allowed: Sequence[str]) -> FailedPrecondition:
    """FAILED_PRECONDITION: the workflow has no transition `status` → `to_status`; lists the allowed ones."""
    listed = ", ".join(allowed) if allowed else "none"
    return FailedPrecondition(
        f"{name} cannot move from {status!r} to {to_status!r}; allowed next states: {listed}",
        reason=TRANSITION_NOT_ALLOWED,
        metadata={"status": status, "requested_status": to_status, "allowed_next_states": ",".join(allowed)},
    )


def guard_failed(name: str, guard: str, description: str) -> FailedPrecondition:
    """FAILED_PRECONDITION: a guard of the transition does not hold (`guard`: ASSIGNEE_REQUIRED, ...)."""
    return FailedPrecondition(
        f"{name}: transition guard {guard} failed: {description}",
        reason=TRANSITION_GUARD_FAILED,
        metadata={"guard": guard},
    )


def limit_exceeded(limit: str, maximum: int) -> ResourceExhausted:
    """RESOURCE_EXHAUSTED naming the limit reached and its value."""
    return ResourceExhausted(
        f"the workspace reached its limit {limit} = {maximum}; delete items or raise the limit",
        reason=LIMIT_EXCEEDED,
        metadata={"limit": limit, "max": str(maximum)},
    )


def parent_cycle(name: str, parent: str) -> FailedPrecondition:
    """FAILED_PRECONDITION: the new parent is the item itself or one of its descendants."""
    return FailedPrecondition(
        f"{parent} cannot be the parent of {name}: it is {name} itself or one of its sub-items",
        reason=PARENT_CYCLE,
        metadata={"item": name, "parent": parent},
    )


def archived(name: str, action: str) -> FailedPrecondition:
    """FAILED_PRECONDITION: the item is archived (`action`: what was refused, e.g. "update")."""
    return FailedPrecondition(
        f"{name} is archived and cannot {action}; unarchive it first",
        reason=RESOURCE_ARCHIVED,
        metadata={"resource": name},
    )


def precondition(name: str, description: str, **metadata: str) -> FailedPrecondition:
    """FAILED_PRECONDITION about a resource (e.g. a project change would orphan data items still use)."""
    return FailedPrecondition(f"{name}: {description}", metadata=metadata)
