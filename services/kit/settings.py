"""Process settings: one pydantic-settings class per process, validated once at start-up.

Every variable is read from the environment with the `TESSERA_` prefix. A missing or malformed
variable stops start-up with a message naming the variable (never a traceback), and nothing else
in the code base reads `os.environ`.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "TESSERA_"


class SettingsError(Exception):
    """Configuration is missing or invalid; str() names every offending variable."""


class KitSettings(BaseSettings):
    """Settings shared by every Tessera service process."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    database_url: str = Field(description="PostgreSQL URL this service logs in with (its own login role)")
    nats_url: str = Field(description="NATS server URL(s), comma separated")
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port")
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="Prometheus /metrics; unset: off")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    auth: Literal["enforced", "disabled"] = Field(
        default="enforced",
        description="'enforced' verifies bearer tokens; 'disabled' trusts x-tessera-dev-* metadata (not in production)",
    )
    identity_address: str | None = Field(
        default=None,
        description="host:port of the identity gRPC service (its JWKS); required when TESSERA_AUTH=enforced",
    )
    token_issuer: str = Field(default="tessera", min_length=1, description="the `iss` access tokens must carry")
    token_audience: str = Field(default="tessera", min_length=1, description="the `aud` access tokens must carry")
    environment: Literal["local", "test", "production"] = "local"
    shutdown_grace_seconds: float = Field(default=10.0, gt=0, description="in-flight RPCs get this long to finish")
    shutdown_drain_seconds: float = Field(
        default=0.0, ge=0, description="NOT_SERVING is reported this long before the server stops accepting calls"
    )
    grpc_reuse_port: bool = Field(
        default=False,
        description="let several processes serve TESSERA_GRPC_PORT (replicas on one machine: the kernel spreads "
        "connections over them); otherwise a port in use is an error",
    )
    db_pool_size: int = Field(default=10, ge=1, le=200)
    outbox_poll_seconds: float = Field(default=0.5, gt=0)
    otel_exporter: Literal["none", "console", "otlp"] = "none"

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        if not value.startswith(("postgresql://", "postgres://", "postgresql+asyncpg://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("nats_url")
    @classmethod
    def _nats_url(cls, value: str) -> str:
        for part in value.split(","):
            if not part.strip().startswith(("nats://", "tls://")):
                raise ValueError("must be nats:// or tls:// URLs, comma separated")
        return value

    @field_validator("auth", mode="before")
    @classmethod
    def _renamed_auth_mode(cls, value: Any) -> Any:
        if value == "development":
            raise ValueError("'development' is no longer an auth mode: use 'enforced' (the default) or 'disabled'")
        return value

    @field_validator("identity_address")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be host:port")
        return value

    @model_validator(mode="after")
    def _no_disabled_auth_in_production(self) -> KitSettings:
        if self.environment == "production" and self.auth == "disabled":
            raise ValueError("TESSERA_AUTH=disabled is refused when TESSERA_ENVIRONMENT=production")
        return self


S = TypeVar("S", bound=BaseSettings)


def _describe(settings_cls: type[BaseSettings], loc: tuple[int | str, ...], problem: str) -> str:
    problem = problem.removeprefix("Value error, ")
    if not loc:  # a cross-field rule: its message names the variables itself
        return f"  {problem}"
    prefix = str(settings_cls.model_config.get("env_prefix", ""))
    return f"  {(prefix + str(loc[0])).upper()}: {problem}"


def load_settings(settings_cls: type[S], **overrides: Any) -> S:
    """Build settings from the environment (and explicit overrides) or raise SettingsError naming each variable."""
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        lines = [
            _describe(
                settings_cls,
                tuple(err["loc"]),
                "is required but not set" if err["type"] == "missing" else err["msg"],
            )
            for err in exc.errors()
        ]
        raise SettingsError("invalid configuration:\n" + "\n".join(lines)) from None
