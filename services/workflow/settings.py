"""Settings of the workflow service process (environment variables with the TESSERA_ prefix)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from services.kit.settings import KitSettings

# Signs page tokens where no secret is configured (local and test only; production must set its own).
DEVELOPMENT_PAGE_TOKEN_SECRET = "tessera-development-workflow-page-token-secret-do-not-use"  # noqa: S105  # development default; production settings refuse it
MIN_PRODUCTION_SECRET_BYTES = 32
DEFAULT_MAX_ITEMS_PER_WORKSPACE = 1_000_000
DEFAULT_RENDERED_ITEMS = 20_000  # about 500 bytes each with its key: ~10 MB


class WorkflowSettings(KitSettings):
    """KitSettings plus what the workflow service needs."""

    service_name: Literal["workflow"] = "workflow"
    page_token_secret: SecretStr | None = Field(
        default=None,
        description="HMAC key signing ListProjects/ListItems/ListItemActivities page tokens; required in production",
    )
    max_items_per_workspace: int = Field(
        default=DEFAULT_MAX_ITEMS_PER_WORKSPACE,
        gt=0,
        description="live (not deleted) items a workspace may hold; creation beyond it is RESOURCE_EXHAUSTED",
    )

    rendered_items_cache_size: int = Field(
        default=DEFAULT_RENDERED_ITEMS,
        ge=0,
        description="serialized items ListItems keeps by (item, version) to build pages from bytes; 0 turns it off",
    )

    @model_validator(mode="after")
    def _page_token_secret_in_production(self) -> WorkflowSettings:
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
