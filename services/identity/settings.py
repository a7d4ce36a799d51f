"""Settings of the identity service process (environment variables with the TESSERA_ prefix)."""

from __future__ import annotations

import ipaddress
import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from services.identity.mail import parse_smtp_url
from services.identity.oidc import OidcProviderConfig
from services.kit.settings import KitSettings
from services.kit.tokens import MAX_TOKEN_LIFETIME

# argon2id cost floors (OWASP: m >= 19 MiB with t >= 2); tests may go lower outside production.
PRODUCTION_MIN_MEMORY_KIB = 19_456
PRODUCTION_MIN_TIME_COST = 2
# The provider ids StartOidcSignIn accepts (its `provider` field has the same pattern).
PROVIDER_ID = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class IdentitySettings(KitSettings):
    """KitSettings plus what the identity service needs."""

    service_name: Literal["identity"] = "identity"
    tenancy_address: str | None = Field(
        default=None, description="host:port of the tenancy gRPC service (membership lookups for workspace tokens)"
    )
    public_base_url: str = Field(
        default="http://localhost:8080",
        description="base URL of the web app; mailed links point to {base}/verify-email and {base}/reset-password",
    )

    smtp_url: SecretStr | None = Field(
        default=None,
        description="smtp[s]://[user:pass@]host[:port][?starttls=1]; unset: mails go to the log (not in production)",
    )
    mail_from: str = Field(default="Tessera <no-reply@localhost>", min_length=3, description="the From of mails")
    oidc_providers: dict[str, OidcProviderConfig] = Field(
        default_factory=dict,
        description='JSON: {"google": {"issuer": ..., "client_id": ..., "client_secret": ..., "redirect_uris": [...]}}',
    )
    housekeeping_interval_seconds: float = Field(
        default=300.0, gt=0, description="how often expired tokens, counters and sessions are deleted"
    )

    access_token_ttl_seconds: int = Field(default=600, ge=30, le=int(MAX_TOKEN_LIFETIME.total_seconds()))
    refresh_token_ttl_seconds: int = Field(default=14 * 86_400, ge=60, description="idle lifetime of a session")
    session_max_seconds: int = Field(default=30 * 86_400, ge=60, description="absolute lifetime of a session")
    refresh_grace_seconds: float = Field(
        default=10.0,
        ge=0,
        le=60,
        description="a just-rotated refresh token presented again this soon gets the same successor",
    )
    signing_key_overlap_seconds: int = Field(
        default=1800,
        description="a retired signing key stays in the JWKS this long (>= token lifetime + key cache)",
    )
    signing_key_cache_seconds: float = Field(
        default=30.0, gt=0, le=600, description="how long a process keeps its view of the signing keys"
    )
    email_verification_ttl_seconds: int = Field(default=48 * 3600, ge=60)
    password_reset_ttl_seconds: int = Field(default=3600, ge=60)
    oidc_login_ttl_seconds: int = Field(default=600, ge=30, description="how long an OIDC sign-in may take")

    trusted_proxies: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="comma-separated IPs/CIDRs whose x-forwarded-for is honoured (e.g. the gateway)",
    )
    rate_limit_window_seconds: int = Field(default=60, ge=1, le=86_400)
    sign_in_limit_per_account: int = Field(default=10, ge=1)
    sign_in_limit_per_address: int = Field(default=30, ge=1)
    refresh_limit_per_session: int = Field(default=30, ge=1)
    refresh_limit_per_address: int = Field(default=300, ge=1)
    sign_up_limit_per_address: int = Field(default=10, ge=1)
    mail_limit_per_account: int = Field(default=5, ge=1, description="reset mails per account and window")
    api_key_exchange_limit_per_address: int = Field(default=300, ge=1)

    argon2_time_cost: int = Field(default=3, ge=1, le=20)
    argon2_memory_kib: int = Field(default=65_536, ge=64, le=4_194_304)
    argon2_parallelism: int = Field(default=4, ge=1, le=64)

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR network") from None
        return value

    @field_validator("smtp_url")
    @classmethod
    def _smtp_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_smtp_url(value.get_secret_value())
        return value

    @field_validator("oidc_providers")
    @classmethod
    def _provider_ids(cls, value: dict[str, OidcProviderConfig]) -> dict[str, OidcProviderConfig]:
        for provider in value:
            if not PROVIDER_ID.match(provider):
                raise ValueError(f"provider id {provider!r} must match {PROVIDER_ID.pattern}")
        return value

    @field_validator("tenancy_address")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be host:port")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> IdentitySettings:
        minimum = self.access_token_ttl_seconds + self.signing_key_cache_seconds
        if self.signing_key_overlap_seconds < minimum:
            raise ValueError(
                "TESSERA_SIGNING_KEY_OVERLAP_SECONDS must be at least TESSERA_ACCESS_TOKEN_TTL_SECONDS + "
                f"TESSERA_SIGNING_KEY_CACHE_SECONDS ({minimum:g}): tokens signed by a retired key must still verify"
            )
        if self.refresh_token_ttl_seconds > self.session_max_seconds:
            raise ValueError("TESSERA_REFRESH_TOKEN_TTL_SECONDS must not exceed TESSERA_SESSION_MAX_SECONDS")
        if self.environment == "production" and (
            self.argon2_memory_kib < PRODUCTION_MIN_MEMORY_KIB or self.argon2_time_cost < PRODUCTION_MIN_TIME_COST
        ):
            raise ValueError(
                f"TESSERA_ARGON2_MEMORY_KIB >= {PRODUCTION_MIN_MEMORY_KIB} and TESSERA_ARGON2_TIME_COST >= "
                f"{PRODUCTION_MIN_TIME_COST} are required in production"
            )
        if self.environment == "production" and self.smtp_url is None:
            raise ValueError(
                "TESSERA_SMTP_URL is required when TESSERA_ENVIRONMENT=production (the log would hold mailed tokens)"
            )
        if self.argon2_memory_kib < 8 * self.argon2_parallelism:
            raise ValueError("TESSERA_ARGON2_MEMORY_KIB must be at least 8 x TESSERA_ARGON2_PARALLELISM")
        return self

    @property
    def access_token_ttl(self) -> timedelta:
        return timedelta(seconds=self.access_token_ttl_seconds)

    @property
    def refresh_token_ttl(self) -> timedelta:
        return timedelta(seconds=self.refresh_token_ttl_seconds)

    @property
    def session_max(self) -> timedelta:
        return timedelta(seconds=self.session_max_seconds)

    @property
    def signing_key_overlap(self) -> timedelta:
        return timedelta(seconds=self.signing_key_overlap_seconds)
