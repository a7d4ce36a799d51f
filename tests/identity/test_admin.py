"""Operator commands: rotate the signing key, end a user's sessions (docs/runbooks/identity.md)."""

from __future__ import annotations

import asyncpg
import pytest

from services.identity import admin
from services.identity.keys import KeyRing
from services.identity.service import IdentityService
from services.identity.settings import IdentitySettings
from services.kit.db import Database
from services.kit.errors import Unauthenticated
from services.kit.settings import load_settings
from tests.identity.test_service import outbox_events, refresh, sign_in, sign_up

pytestmark = pytest.mark.gate("S02")


@pytest.fixture
def settings(identity_url: str) -> IdentitySettings:
    return load_settings(IdentitySettings, database_url=identity_url, nats_url="nats://127.0.0.1:4222")


async def test_rotate_signing_key_publishes_the_new_key_next_to_the_old(
    settings: IdentitySettings, keyring: KeyRing
) -> None:
    old_kid = (await keyring.signer()).kid

    new_kid = await admin.rotate_signing_key(settings)

    await keyring.reload()
    kids = [jwk["kid"] for jwk in await keyring.jwks()]
    assert kids[:2] == [new_kid, old_kid]
    assert (await keyring.signer()).kid == new_kid


async def test_revoke_sessions_ends_them_and_announces_it(
    settings: IdentitySettings,
    identity_database: Database,
    identity_service: IdentityService,
    admin_conn: asyncpg.Connection,
) -> None:
    user = await sign_up(identity_database, identity_service)
    signed_in = await sign_in(identity_database, identity_service, user.email)

    assert await admin.revoke_sessions(settings, user.id) == 1

    with pytest.raises(Unauthenticated, match="session has ended"):
        await refresh(identity_database, identity_service, signed_in.tokens.refresh_token)
    types = [envelope.type for envelope in await outbox_events(admin_conn, user.name)]
    assert "tessera.identity.v1.SessionsRevokedEvent" in types
    assert await admin.revoke_sessions(settings, user.id) == 0


def test_missing_settings_exit_with_code_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("TESSERA_DATABASE_URL", raising=False)
    monkeypatch.delenv("TESSERA_NATS_URL", raising=False)
    assert admin.main(["rotate-signing-key"]) == 2
    assert "TESSERA_DATABASE_URL" in capsys.readouterr().err
