"""Tenancy's expected errors, all from the kit's AppError hierarchy."""

from __future__ import annotations

import uuid

from services.kit.errors import AlreadyExists, InvalidArgument, NotFound
from services.tenancy.models import workspace_name

REQUEST_ID_REUSED = "REQUEST_ID_REUSED"


class RequestIdReused(AlreadyExists):
    """The request_id of a CreateWorkspace was already used with a different payload."""

    default_reason = REQUEST_ID_REUSED


def workspace_not_found(workspace_id: uuid.UUID) -> NotFound:
    """NOT_FOUND for a workspace that is absent or not visible to the caller (the two look the same)."""
    return NotFound.resource(workspace_name(workspace_id))


def request_id_reused(request_id: uuid.UUID) -> RequestIdReused:
    """ALREADY_EXISTS for a request_id already used with another payload."""
    return RequestIdReused(
        f"request_id {request_id} was already used with a different workspace",
        metadata={"request_id": str(request_id)},
    )


def invalid_field(field: str, description: str) -> InvalidArgument:
    """INVALID_ARGUMENT naming one request field."""
    return InvalidArgument.for_field(field, description)
