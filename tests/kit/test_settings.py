"""Settings fail fast: a missing or malformed variable stops start-up with a message naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.kit.observability import configure_tracing
from services.kit.settings import KitSettings, SettingsError, load_settings

pytestmark = pytest.mark.gate("S01")

REPO = Path(__file__).resolve().parents[2]
VALID = {"TESSERA_DATABASE_URL": "postgresql://tessera@127.0.0.1/tessera", "TESSERA_NATS_URL": "nats://127.0.0.1:4222"}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No TESSERA_* variable from the outer environment leaks into a test."""
    for key in list(os.environ):
        if key.startswith("TESSERA_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_valid_environment_loads(clean_env: pytest.MonkeyPatch) -> None:
    for key, value in VALID.items():
        clean_env.setenv(key, value)
    clean_env.setenv("TESSERA_GRPC_PORT", "50123")
    settings = load_settings(KitSettings)
    assert settings.grpc_port == 50123
    assert settings.auth == "enforced"  # the safe default


def test_missing_variables_are_named(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError) as failure:
        load_settings(KitSettings)
    message = str(failure.value)
    assert "TESSERA_DATABASE_URL: is required but not set" in message
    assert "TESSERA_NATS_URL: is required but not set" in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TESSERA_DATABASE_URL", "mysql://x@y/z"),
        ("TESSERA_NATS_URL", "http://127.0.0.1:4222"),
        ("TESSERA_GRPC_PORT", "not-a-port"),
        ("TESSERA_GRPC_PORT", "70000"),
        ("TESSERA_AUTH", "none"),
        ("TESSERA_LOG_FORMAT", "xml"),
        ("TESSERA_SHUTDOWN_GRACE_SECONDS", "0"),
        ("TESSERA_OTEL_EXPORTER", "jaeger"),
    ],
)
def test_invalid_variable_is_named(clean_env: pytest.MonkeyPatch, variable: str, value: str) -> None:
    for key, good in VALID.items():
        clean_env.setenv(key, good)
    clean_env.setenv(variable, value)
    with pytest.raises(SettingsError) as failure:
        load_settings(KitSettings)
    lines = str(failure.value).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == [variable]


def test_disabled_auth_is_refused_in_production(clean_env: pytest.MonkeyPatch) -> None:
    for key, value in VALID.items():
        clean_env.setenv(key, value)
    clean_env.setenv("TESSERA_ENVIRONMENT", "production")
    clean_env.setenv("TESSERA_AUTH", "disabled")
    with pytest.raises(SettingsError, match="TESSERA_AUTH=disabled is refused when TESSERA_ENVIRONMENT=production"):
        load_settings(KitSettings)
    clean_env.setenv("TESSERA_AUTH", "enforced")
    assert load_settings(KitSettings).environment == "production"


@pytest.mark.gate("S02")
@pytest.mark.parametrize("environment", ["local", "test", "production"])
def test_the_old_development_auth_mode_is_rejected_naming_the_allowed_values(
    clean_env: pytest.MonkeyPatch, environment: str
) -> None:
    for key, value in VALID.items():
        clean_env.setenv(key, value)
    clean_env.setenv("TESSERA_ENVIRONMENT", environment)
    clean_env.setenv("TESSERA_AUTH", "development")
    with pytest.raises(SettingsError) as failure:
        load_settings(KitSettings)
    [line] = str(failure.value).splitlines()[1:]
    assert line.strip().startswith("TESSERA_AUTH:")
    assert "'enforced'" in line
    assert "'disabled'" in line


@pytest.mark.gate("S02")
def test_auth_settings_default_to_enforced_with_the_tessera_issuer(clean_env: pytest.MonkeyPatch) -> None:
    for key, value in VALID.items():
        clean_env.setenv(key, value)
    clean_env.setenv("TESSERA_IDENTITY_ADDRESS", "127.0.0.1:50052")
    settings = load_settings(KitSettings)
    assert (settings.auth, settings.identity_address) == ("enforced", "127.0.0.1:50052")
    assert (settings.token_issuer, settings.token_audience) == ("tessera", "tessera")


@pytest.mark.parametrize("address", ["localhost", "localhost:", ":50052", "localhost:99999", "host:port"])
def test_identity_address_must_be_host_and_port(clean_env: pytest.MonkeyPatch, address: str) -> None:
    for key, value in VALID.items():
        clean_env.setenv(key, value)
    clean_env.setenv("TESSERA_IDENTITY_ADDRESS", address)
    with pytest.raises(SettingsError, match="TESSERA_IDENTITY_ADDRESS: must be host:port"):
        load_settings(KitSettings)


def _run_service(env_overrides: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("TESSERA_")}
    env.update(env_overrides)
    return subprocess.run(
        [sys.executable, "-m", "tests.kit.tiny_service"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_run_service_with_missing_variable_exits_2_naming_it() -> None:
    result = _run_service({"TESSERA_NATS_URL": "nats://127.0.0.1:4222"})
    assert result.returncode == 2
    assert "TESSERA_DATABASE_URL: is required but not set" in result.stderr
    assert "TESSERA_NATS_URL" not in result.stderr
    assert "Traceback" not in result.stderr


def test_run_service_refuses_disabled_auth_in_production() -> None:
    result = _run_service({**VALID, "TESSERA_ENVIRONMENT": "production", "TESSERA_AUTH": "disabled"})
    assert result.returncode == 2
    assert "TESSERA_AUTH=disabled is refused" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.gate("S02")
def test_run_service_with_enforced_auth_needs_the_identity_address() -> None:
    result = _run_service(VALID)  # TESSERA_AUTH unset: enforced
    assert result.returncode == 2
    assert "TESSERA_IDENTITY_ADDRESS: is required when TESSERA_AUTH=enforced" in result.stderr
    assert "Traceback" not in result.stderr


def test_otlp_exporter_without_its_package_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)
    with pytest.raises(SettingsError) as failure:
        configure_tracing("tiny", "otlp")
    assert "TESSERA_OTEL_EXPORTER" in str(failure.value)
    assert "opentelemetry-exporter-otlp-proto-grpc" in str(failure.value)


def test_no_exporter_installs_no_tracer_provider() -> None:
    assert configure_tracing("tiny", "none") is None
