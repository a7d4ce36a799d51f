"""WorkflowSettings fail fast (gate S01): production needs a real page token secret; the item limit is positive."""

from __future__ import annotations

import pytest

from services.kit.settings import SettingsError, load_settings
from services.workflow.settings import DEVELOPMENT_PAGE_TOKEN_SECRET, WorkflowSettings

pytestmark = pytest.mark.gate("S01")

BASE = {"database_url": "postgresql://tessera_workflow@127.0.0.1:5432/tessera", "nats_url": "nats://127.0.0.1:4222"}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("TESSERA_PAGE_TOKEN_SECRET", "TESSERA_ENVIRONMENT", "TESSERA_MAX_ITEMS_PER_WORKSPACE"):
        monkeypatch.delenv(variable, raising=False)


def test_defaults_outside_production() -> None:
    settings = load_settings(WorkflowSettings, **BASE, environment="local")
    assert settings.service_name == "workflow"
    assert settings.page_token_key() == DEVELOPMENT_PAGE_TOKEN_SECRET.encode()
    assert settings.max_items_per_workspace == 1_000_000


def test_production_without_secret_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="TESSERA_PAGE_TOKEN_SECRET is required"):
        load_settings(WorkflowSettings, **BASE, environment="production")


@pytest.mark.parametrize("secret", ["too-short", DEVELOPMENT_PAGE_TOKEN_SECRET])
def test_production_refuses_a_weak_or_development_secret(monkeypatch: pytest.MonkeyPatch, secret: str) -> None:
    monkeypatch.setenv("TESSERA_PAGE_TOKEN_SECRET", secret)
    with pytest.raises(SettingsError, match="TESSERA_PAGE_TOKEN_SECRET must be a secret of at least 32 bytes"):
        load_settings(WorkflowSettings, **BASE, environment="production")


def test_production_secret_is_used_and_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "w0rkfl0w-" * 5
    monkeypatch.setenv("TESSERA_PAGE_TOKEN_SECRET", secret)
    settings = load_settings(WorkflowSettings, **BASE, environment="production")
    assert settings.page_token_key() == secret.encode()
    assert secret not in repr(settings)


@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_a_bad_item_limit_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TESSERA_MAX_ITEMS_PER_WORKSPACE", value)
    with pytest.raises(SettingsError, match="TESSERA_MAX_ITEMS_PER_WORKSPACE"):
        load_settings(WorkflowSettings, **BASE)
