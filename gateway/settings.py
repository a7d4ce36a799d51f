"""Gateway settings: `TESSERA_GATEWAY_*` plus one `TESSERA_<DOMAIN>_ADDRESS` per contract domain."""

from __future__ import annotations

import ipaddress
import os
from typing import Annotated, Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gateway.browser import BrowserSettings
from gateway.descriptors import domains, service_descriptors
from gateway.ratelimit import RateLimitSettings

ENV_PREFIX = "TESSERA_GATEWAY_"


def address_variable(domain: str) -> str:
    """The environment variable naming a domain's gRPC address."""
    return f"TESSERA_{domain.upper()}_ADDRESS"


class GatewaySettingsError(Exception):
    """Invalid gateway configuration; the message names every bad variable."""


class GatewaySettings(BaseSettings):
    """Configuration of one gateway process."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    addresses: dict[str, str] = Field(default_factory=dict)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_body_bytes: int = Field(default=1_048_576, gt=0)
    default_deadline_seconds: float = Field(default=30.0, gt=0)
    max_deadline_seconds: float = Field(default=300.0, gt=0)
    route_deadlines: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict,
        description="default deadlines per RPC, overriding default_deadline_seconds (and giving streams one): "
        "comma-separated `package.Service/Method=seconds` or `package.Service=seconds` (a method's entry wins)",
    )
    log_level: str = "INFO"
    access_log: bool = Field(default=False, description="uvicorn's access log line per request (costs CPU per request)")
    forwarded_allow_ips: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="comma-separated IPs/CIDRs of reverse proxies whose X-Forwarded-For/-Proto are honoured "
        "('*' for any); empty: those headers are ignored",
    )
    api_title: str = "Tessera"
    api_version: str = "v1"
    browser: BrowserSettings = Field(default_factory=BrowserSettings)
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("route_deadlines", mode="before")
    @classmethod
    def _parse_route_deadlines(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        parsed: dict[str, str] = {}
        for entry in (part.strip() for part in value.split(",")):
            if not entry:
                continue
            key, separator, seconds = entry.partition("=")
            if not separator:
                raise ValueError(f"{entry!r} is not `package.Service/Method=seconds`")
            parsed[key.strip()] = seconds.strip()
        return parsed

    @field_validator("route_deadlines")
    @classmethod
    def _route_deadlines_name_rpcs(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        maximum = info.data.get("max_deadline_seconds")
        known = set()
        for service in service_descriptors():
            known.add(service.full_name)
            known.update(f"{service.full_name}/{method.name}" for method in service.methods)
        for key, seconds in value.items():
            if key not in known:
                raise ValueError(f"{key!r} names no service or method of the contracts")
            if seconds <= 0:
                raise ValueError(f"{key}: the deadline must be more than 0 seconds")
            if maximum is not None and seconds > maximum:
                raise ValueError(f"{key}: {seconds}s is over TESSERA_GATEWAY_MAX_DEADLINE_SECONDS ({maximum}s)")
        return value

    @field_validator("forwarded_allow_ips", mode="before")
    @classmethod
    def _split_proxies(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _proxies_are_addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            if entry != "*":
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(f"{entry!r} is not an IP address or CIDR") from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _addresses_from_environment(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("addresses"):
            found = {
                domain: os.environ[address_variable(domain)]
                for domain in domains()
                if address_variable(domain) in os.environ
            }
            return {**data, "addresses": found}
        return data

    @field_validator("addresses")
    @classmethod
    def _every_domain_has_an_address(cls, value: dict[str, str]) -> dict[str, str]:
        missing = [address_variable(domain) for domain in domains() if not value.get(domain)]
        if missing:
            raise ValueError(f"missing backend address: set {', '.join(missing)} (host:port)")
        return value

    @model_validator(mode="after")
    def _browser_origins_default_to_cors(self) -> GatewaySettings:
        if not self.browser.allowed_origins and self.cors_origins:
            self.browser = BrowserSettings.model_validate(
                {**self.browser.model_dump(), "allowed_origins": tuple(self.cors_origins)}
            )
        return self


def load_settings(**overrides: Any) -> GatewaySettings:
    """Settings from the environment (and overrides), raising GatewaySettingsError naming each bad variable."""
    try:
        return GatewaySettings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = "__".join(str(part) for part in error["loc"]) if error["loc"] else "settings"
            variable = "TESSERA_<DOMAIN>_ADDRESS" if field == "addresses" else f"{ENV_PREFIX}{field.upper()}"
            problems.append(f"{variable}: {error['msg']}")
        raise GatewaySettingsError("invalid gateway settings: " + "; ".join(problems)) from exc
