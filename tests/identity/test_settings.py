"""IdentitySettings: validated at start-up, errors name the variable."""

from __future__ import annotations

from typing import Any

import pytest

from services.identity.settings import IdentitySettings
from services.kit.settings import SettingsError, load_settings

pytestmark = pytest.mark.gate("S01")

BASE = {"database_url": "postgresql://localhost/tessera", "nats_url": "nats://localhost:4222"}


def settings(**overrides: Any) -> IdentitySettings:
    return load_settings(IdentitySettings, **{**BASE, **overrides})


def test_defaults() -> None:
    loaded = settings()
    assert loaded.refresh_grace_seconds == 10
    assert loaded.access_token_ttl_seconds == 600
    assert loaded.signing_key_overlap_seconds >= loaded.access_token_ttl_seconds
    assert loaded.trusted_proxies == ()
    assert loaded.smtp_url is None


def test_trusted_proxies_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8")
    monkeypatch.setenv("TESSERA_TENANCY_ADDRESS", "tenancy:7001")
    loaded = settings()
    assert loaded.trusted_proxies == ("127.0.0.1", "10.0.0.0/8")
    assert loaded.tenancy_address == "tenancy:7001"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"trusted_proxies": "gateway.local"}, "TESSERA_TRUSTED_PROXIES"),
        ({"tenancy_address": "no-port"}, "TESSERA_TENANCY_ADDRESS"),
        ({"signing_key_overlap_seconds": 60}, "TESSERA_SIGNING_KEY_OVERLAP_SECONDS"),
        ({"access_token_ttl_seconds": 7200}, "TESSERA_ACCESS_TOKEN_TTL_SECONDS"),
        (
            {"refresh_token_ttl_seconds": 10 * 86_400, "session_max_seconds": 86_400},
            "TESSERA_REFRESH_TOKEN_TTL_SECONDS",
        ),
        ({"smtp_url": "http://mail.example.com"}, "TESSERA_SMTP_URL"),
        (
            {
                "oidc_providers": {
                    "Bad Id": {
                        "issuer": "https://idp.example.com",
                        "client_id": "x",
                        "redirect_uris": ["https://app/cb"],
                    }
                }
            },
            "TESSERA_OIDC_PROVIDERS",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_variable(overrides: dict[str, Any], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        settings(**overrides)


def test_production_needs_smtp_and_real_argon2_costs() -> None:
    with pytest.raises(SettingsError, match="TESSERA_SMTP_URL"):
        settings(environment="production")
    with pytest.raises(SettingsError, match="TESSERA_ARGON2_MEMORY_KIB"):
        settings(environment="production", smtp_url="smtp://mail:25", argon2_memory_kib=1024)
    assert settings(environment="production", smtp_url="smtp://mail:25").environment == "production"
