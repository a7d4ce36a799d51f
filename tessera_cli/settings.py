"""Settings of the `tessera` CLI, read from `TESSERA_*` variables and validated once.

`TESSERA_DATABASE_URL` / `TESSERA_NATS_URL` name external servers (unset: `tessera up` runs embedded
ones under `TESSERA_HOME`). Each service's gRPC port is `TESSERA_<SERVICE>_PORT` (e.g.
`TESSERA_TENANCY_PORT`), defaulting to the port in the service registry (`tessera_cli.stack.SERVICES`),
so adding a service adds its variable without touching this file. The REST gateway's port is
`TESSERA_GATEWAY_PORT` (default 8080; `--port gateway=N`). A malformed variable raises `SettingsError`
naming it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.kit.settings import ENV_PREFIX, SettingsError

__all__ = ["GATEWAY", "GATEWAY_PORT_ENV", "CliSettings", "SettingsError", "load_cli_settings", "port_env_var"]

PortNumber = Annotated[int, Field(ge=1, le=65535)]

DEFAULT_HOME = Path(".tessera")
GATEWAY_DEFAULT_PORT = 8080
GATEWAY = "gateway"  # the name `--port gateway=N` uses
GATEWAY_PORT_ENV = f"{ENV_PREFIX}GATEWAY_PORT"


def port_env_var(service: str) -> str:
    """The variable that sets a service's gRPC port, e.g. `TESSERA_TENANCY_PORT`."""
    return f"{ENV_PREFIX}{service.upper()}_PORT"


class CliSettings(BaseSettings):
    """What `tessera up`, `migrate`, `doctor` and `events` read from the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True, env_ignore_empty=True)

    home: Path = Field(default=DEFAULT_HOME, description="local stack state: data, logs, stack.json")
    database_url: str | None = Field(default=None, description="admin (superuser) URL of an external PostgreSQL")
    nats_url: str | None = Field(default=None, description="URL of an external NATS server with JetStream")
    # Filled by load_cli_settings from TESSERA_<SERVICE>_PORT; services not listed use their default port.
    service_ports: dict[str, PortNumber] = Field(default_factory=dict, exclude=True)
    gateway_port: PortNumber = Field(default=GATEWAY_DEFAULT_PORT, description="port of the REST gateway")
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    startup_timeout_seconds: float = Field(default=90.0, gt=0)
    shutdown_grace_seconds: float = Field(default=10.0, gt=0)
    embedded_fast: bool = Field(
        default=False, description="TESSERA_EMBEDDED_FAST=1: embedded PostgreSQL without fsync (throwaway data only)"
    )

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("nats_url")
    @classmethod
    def _nats_url(cls, value: str | None) -> str | None:
        if value is not None:
            for part in value.split(","):
                if not part.strip().startswith(("nats://", "tls://")):
                    raise ValueError("must be nats:// or tls:// URLs, comma separated")
        return value

    def port_for(self, service: str, default: int) -> int:
        """The configured gRPC port of a service."""
        return self.service_ports.get(service, default)


def _variable(loc: tuple[int | str, ...]) -> str:
    if loc and loc[0] == "service_ports" and len(loc) > 1:
        return port_env_var(str(loc[1]))
    return (ENV_PREFIX + str(loc[0])).upper() if loc else "configuration"


def load_cli_settings(
    services: Iterable[str],
    *,
    ports: Mapping[str, int | str] | None = None,
    home: Path | None = None,
) -> CliSettings:
    """The CLI settings (ports from TESSERA_<SERVICE>_PORT, then `ports`), or SettingsError naming each variable.

    `ports` may name the gateway (`"gateway"`): it overrides TESSERA_GATEWAY_PORT.
    """
    raw_ports: dict[str, int | str] = {}
    for service in services:
        value = os.environ.get(port_env_var(service), "")
        if value.strip():
            raw_ports[service] = value.strip()
    raw_ports.update(ports or {})
    overrides: dict[str, Any] = {}
    if GATEWAY in raw_ports:
        overrides["gateway_port"] = raw_ports.pop(GATEWAY)
    if home is not None:
        overrides["home"] = home
    try:
        return CliSettings(service_ports=raw_ports, **overrides)
    except ValidationError as exc:
        lines = [
            f"  {_variable(tuple(err['loc']))}: "
            + ("is required but not set" if err["type"] == "missing" else err["msg"].removeprefix("Value error, "))
            for err in exc.errors()
        ]
        raise SettingsError("invalid configuration:\n" + "\n".join(lines)) from None
