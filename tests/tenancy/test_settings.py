"""TenancySettings fail fast (gate S01): production needs a real page token secret."""

from __future__ import annotations

from datetime import timedelta

import pytest

from services.kit.settings import SettingsError, load_settings
from services.tenancy.settings import DEVELOPMENT_PAGE_TOKEN_SECRET, TenancySettings

pytestmark = pytest.mark.gate("S01")

BASE = {"database_url": "postgresql://tessera_tenancy@127.0.0.1:5432/tessera", "nats_url": "nats://127.0.0.1:4222"}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TESSERA_PAGE_TOKEN_SECRET", raising=False)
    monkeypatch.delenv("TESSERA_ENVIRONMENT", raising=False)
    monkeypatch.delenv("TESSERA_AUTH", raising=False)
    monkeypatch.delenv("TESSERA_INVITATION_TTL", raising=False)
    monkeypatch.delenv("TESSERA_WORKSPACE_RESTORE_WINDOW", raising=False)


def test_development_default_secret_outside_production() -> None:
    settings = load_settings(TenancySettings, **BASE, environment="local")
    assert settings.page_token_key() == DEVELOPMENT_PAGE_TOKEN_SECRET.encode()
    assert settings.service_name == "tenancy"


def test_production_without_secret_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="TESSERA_PAGE_TOKEN_SECRET is required"):
        load_settings(TenancySettings, **BASE, environment="production")


@pytest.mark.parametrize("secret", ["too-short", DEVELOPMENT_PAGE_TOKEN_SECRET])
def test_production_refuses_a_weak_or_development_secret(monkeypatch: pytest.MonkeyPatch, secret: str) -> None:
    monkeypatch.setenv("TESSERA_PAGE_TOKEN_SECRET", secret)
    with pytest.raises(SettingsError, match="TESSERA_PAGE_TOKEN_SECRET must be a secret of at least 32 bytes"):
        load_settings(TenancySettings, **BASE, environment="production")


def test_production_secret_from_the_environment_is_used_and_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "s3cr3t-" * 6
    monkeypatch.setenv("TESSERA_PAGE_TOKEN_SECRET", secret)
    settings = load_settings(TenancySettings, **BASE, environment="production")
    assert settings.page_token_key() == secret.encode()
    assert secret not in repr(settings)


def test_invitation_ttl_and_restore_window_defaults_and_iso_durations(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = load_settings(TenancySettings, **BASE)
    assert (defaults.invitation_ttl, defaults.workspace_restore_window) == (timedelta(days=7), timedelta(days=30))

    monkeypatch.setenv("TESSERA_INVITATION_TTL", "PT48H")
    monkeypatch.setenv("TESSERA_WORKSPACE_RESTORE_WINDOW", "P90D")
    configured = load_settings(TenancySettings, **BASE)
    assert (configured.invitation_ttl, configured.workspace_restore_window) == (timedelta(hours=48), timedelta(days=90))


@pytest.mark.parametrize(
    ("variable", "value"),
    [("TESSERA_INVITATION_TTL", "0"), ("TESSERA_INVITATION_TTL", "soon"), ("TESSERA_WORKSPACE_RESTORE_WINDOW", "-1")],
)
def test_bad_durations_name_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings(TenancySettings, **BASE)
