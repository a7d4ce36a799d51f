"""Tenancy's expected errors, all from the kit's AppError hierarchy, with their UPPER_SNAKE reasons."""

from __future__ import annotations

import uuid

from services.kit.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.tenancy.models import workspace_name

REQUEST_ID_REUSED = "REQUEST_ID_REUSED"
LAST_OWNER = "LAST_OWNER"
OWNER_REQUIRED = "OWNER_REQUIRED"
MISSING_PERMISSION = "MISSING_PERMISSION"
USER_REQUIRED = "USER_TOKEN_REQUIRED"
ETAG_MISMATCH = "ETAG_MISMATCH"
WORKSPACE_NOT_DELETED = "WORKSPACE_NOT_DELETED"
RESTORE_WINDOW_EXPIRED = "RESTORE_WINDOW_EXPIRED"
INVITATION_PENDING = "INVITATION_PENDING"
INVITATION_NOT_PENDING = "INVITATION_NOT_PENDING"
INVITATION_TOKEN_INVALID = "INVITATION_TOKEN_INVALID"  # noqa: S105  # an error reason, not a credential
INVITATION_EXPIRED = "INVITATION_EXPIRED"
INVITATION_REVOKED = "INVITATION_REVOKED"
INVITATION_USED = "INVITATION_USED"
ALREADY_A_MEMBER = "ALREADY_A_MEMBER"

# The rule behind LAST_OWNER, named in every such error.
LAST_OWNER_RULE = "a workspace keeps at least one owner: transfer ownership (or make another member owner) first"


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


def invalid_field(field: str, description: str, *, reason: str | None = None) -> InvalidArgument:
    """INVALID_ARGUMENT naming one request field."""
    return InvalidArgument.for_field(field, description, reason=reason)


def missing_permission(permission: str) -> PermissionDenied:
    """PERMISSION_DENIED: the caller's role does not grant the permission."""
    return PermissionDenied(
        f"the caller's role does not grant {permission}",
        reason=MISSING_PERMISSION,
        metadata={"permission": permission},
    )


def owner_required(action: str) -> PermissionDenied:
    """PERMISSION_DENIED: only owners may do this (grant, revoke or transfer ownership)."""
    return PermissionDenied(f"only an owner may {action}", reason=OWNER_REQUIRED, metadata={"rule": "owner_required"})


def user_required(action: str) -> PermissionDenied:
    """PERMISSION_DENIED: an API key (not a user) tried something only users do."""
    return PermissionDenied(f"only a user may {action}", reason=USER_REQUIRED)


def last_owner(member: str, refusal: str) -> FailedPrecondition:
    """FAILED_PRECONDITION: the change would leave the workspace without an owner (`refusal`: "cannot leave")."""
    return FailedPrecondition(
        f"{member} is the last owner and {refusal}: {LAST_OWNER_RULE}",
        reason=LAST_OWNER,
        metadata={"rule": "last_owner", "member": member},
    )


def invitation_token_invalid(description: str, *, reason: str = INVITATION_TOKEN_INVALID) -> InvalidArgument:
    """INVALID_ARGUMENT on the `token` field of AcceptInvitation."""
    return InvalidArgument.for_field("token", description, reason=reason)


def already_a_member(member: str) -> AlreadyExists:
    """ALREADY_EXISTS: the caller already belongs to the workspace."""
    return AlreadyExists(f"{member} already exists", reason=ALREADY_A_MEMBER, metadata={"resource": member})
