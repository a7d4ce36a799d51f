"""Identity's expected errors, all from the kit's AppError hierarchy."""

from __future__ import annotations

import uuid

from services.identity.models import api_key_name, user_name
from services.kit.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from services.kit.interceptors import TOKEN_REVOKED
from services.kit.tokens import TOKEN_EXPIRED, TOKEN_INVALID

# ErrorInfo reasons (UPPER_SNAKE, names of tessera.common.v1.ErrorReason). S105: reason codes, not secrets.
# TOKEN_EXPIRED, TOKEN_INVALID and TOKEN_REVOKED are the kit's (imported above): a refresh token or
# API key is a bearer credential like an access token.
RATE_LIMITED = "RATE_LIMITED"
# Identity's own.
INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
WEAK_PASSWORD = "WEAK_PASSWORD"  # noqa: S105  # a name, not a secret
REFRESH_TOKEN_REUSED = "REFRESH_TOKEN_REUSED"  # noqa: S105  # a name, not a secret
USER_TOKEN_REQUIRED = "USER_TOKEN_REQUIRED"  # noqa: S105  # a name, not a secret
OIDC_EMAIL_NOT_VERIFIED = "OIDC_EMAIL_NOT_VERIFIED"

# One message for an unknown email and a wrong password: sign-in must not reveal which accounts exist.
INVALID_CREDENTIALS_MESSAGE = "email or password is incorrect"


def invalid_field(field: str, description: str, *, reason: str | None = None) -> InvalidArgument:
    """INVALID_ARGUMENT naming one request field."""
    return InvalidArgument.for_field(field, description, reason=reason)


def weak_password(field: str, description: str) -> InvalidArgument:
    """INVALID_ARGUMENT for a password that fails the strength rules."""
    return InvalidArgument.for_field(field, description, reason=WEAK_PASSWORD)


def invalid_credentials() -> Unauthenticated:
    """The one answer to a failed sign-in, whatever failed."""
    return Unauthenticated(INVALID_CREDENTIALS_MESSAGE, reason=INVALID_CREDENTIALS)


def email_taken() -> AlreadyExists:
    """ALREADY_EXISTS for sign-up with an email that has an account (sign-up only)."""
    return AlreadyExists("an account with this email already exists")


def invalid_email_token(field: str = "token") -> InvalidArgument:
    """INVALID_ARGUMENT for an unknown, used or expired verification or reset token."""
    return InvalidArgument.for_field(field, "is unknown, used or expired")


def invalid_refresh_token() -> Unauthenticated:
    """UNAUTHENTICATED for an unknown or expired refresh token."""
    return Unauthenticated("refresh token is not valid", reason=TOKEN_INVALID)


def refresh_token_reused() -> Unauthenticated:
    """UNAUTHENTICATED for a reused refresh token (its whole session has just been revoked)."""
    return Unauthenticated("refresh token was already used; the session has been ended", reason=REFRESH_TOKEN_REUSED)


def session_ended(*, expired: bool = False) -> Unauthenticated:
    """UNAUTHENTICATED for a revoked (or, with `expired`, an expired) session or refresh token."""
    return Unauthenticated("the session has ended; sign in again", reason=TOKEN_EXPIRED if expired else TOKEN_REVOKED)


def invalid_api_key() -> Unauthenticated:
    """UNAUTHENTICATED for an unknown, malformed or revoked API key (indistinguishable)."""
    return Unauthenticated("API key is not valid", reason=TOKEN_INVALID)


def user_token_required() -> PermissionDenied:
    """PERMISSION_DENIED for an API-key token on an RPC that only a signed-in user may call."""
    return PermissionDenied("this method needs a user's token, not an API key's", reason=USER_TOKEN_REQUIRED)


def wrong_current_password() -> PermissionDenied:
    """PERMISSION_DENIED for ChangePassword with a wrong current password."""
    return PermissionDenied("the current password is incorrect")


def user_not_found(user_id: uuid.UUID) -> NotFound:
    """NOT_FOUND for a user."""
    return NotFound.resource(user_name(user_id))


def api_key_not_found(workspace_id: uuid.UUID, key_id: uuid.UUID) -> NotFound:
    """NOT_FOUND for an API key that is absent or in another workspace (the two look the same)."""
    return NotFound.resource(api_key_name(workspace_id, key_id))


def rate_limited(what: str, *, retry_after: float) -> ResourceExhausted:
    """RESOURCE_EXHAUSTED with the delay after which the caller may try again (RetryInfo)."""
    return ResourceExhausted(
        f"too many {what} attempts; retry in {max(1, round(retry_after))} s",
        reason=RATE_LIMITED,
        metadata={"limit": what},
        retry_after=retry_after,
    )
