"""Settings of the tenancy service process (environment variables with the TESSERA_ prefix)."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from services.kit.settings import KitSettings

# Signs page tokens where no secret is configured (local and test only; production must set its own).
DEVELOPMENT_PAGE_TOKEN_SECRET = "tessera-development-page-token-secret-do-not-use-in-production"  # noqa: S105  # development default; production settings refuse it
MIN_PRODUCTION_SECRET_BYTES = 32


class TenancySettings(KitSettings):
    """KitSettings plus what the tenancy service needs."""

    service_name: Literal["tenancy"] = "tenancy"
    page_token_secret: SecretStr | None = Field(
        default=None,
        description="HMAC key signing ListWorkspaces page tokens; required (>= 32 bytes) in production",
    )

    invitation_ttl: timedelta = Field(
        default=timedelta(days=7),
        gt=timedelta(0),
        description="how long an invitation token stays valid (ISO 8601 duration like P7D, or seconds)",
    )
    workspace_restore_window: timedelta = Field(
        default=timedelta(days=30),
        ge=timedelta(0),
        description="how long a soft-deleted workspace can be restored (ISO 8601 duration like P30D, or seconds)",
    )

    @model_validator(mode="after")
    def _page_token_secret_in_production(self) -> TenancySettings:
        if self.environment != "production":
            return self
        if self.page_token_secret is None:
            raise ValueError("TESSERA_PAGE_TOKEN_SECRET is required when TESSERA_ENVIRONMENT=production")
        secret = self.page_token_secret.get_secret_value()
        if len(secret.encode()) < MIN_PRODUCTION_SECRET_BYTES or secret == DEVELOPMENT_PAGE_TOKEN_SECRET:
            raise ValueError(
                f"TESSERA_PAGE_TOKEN_SECRET must be a secret of at least {MIN_PRODUCTION_SECRET_BYTES} bytes"
                " in production (not the development default)"
            )
        return self

    def page_token_key(self) -> bytes:
        """The page token signing key (the development default unless configured)."""
        if self.page_token_secret is None:
            return DEVELOPMENT_PAGE_TOKEN_SECRET.encode()
        return self.page_token_secret.get_secret_value().encode()
