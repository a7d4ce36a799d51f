"""IdentityService against the real database as `tessera_identity` (no gRPC): the rules one by one."""

from __future__ import annotations

import hashlib
import statistics
import time
import uuid
from datetime import timedelta

import asyncpg
import pytest

from services.identity import errors
from services.identity.housekeeping import Housekeeper
from services.identity.keys import KeyRing
from services.identity.models import USER_LEVEL_TENANT, TokenSet, User
from services.identity.oidc import VerifiedIdentity
from services.identity.passwords import PasswordHasher, check_password_strength
from services.identity.ratelimit import Limit, RateLimiter
from services.identity.service import IdentityPolicy, IdentityService, SignedIn, api_key_workspace
from services.kit.db import Database
from services.kit.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from services.kit.principal import Principal
from services.kit.revocation import RevocationList
from services.kit.tokens import TokenVerifier
from tessera.common.v1.event_pb2 import EventEnvelope
from tessera.identity.v1 import identity_events_pb2
from tests.identity.conftest import GOOD_PASSWORD, Clock, unique_email, user_principal

pytestmark = pytest.mark.gate("S02")


# --- helpers ------------------------------------------------------------------------------------------


async def sign_up(
    db: Database, service: IdentityService, *, email: str | None = None, password: str = GOOD_PASSWORD
) -> User:
    async with db.unit_of_work(None) as uow:
        return await service.sign_up(uow, None, email=email or unique_email(), password=password, display_name="Ada")


async def sign_in(db: Database, service: IdentityService, email: str, password: str = GOOD_PASSWORD) -> SignedIn:
    async with db.unit_of_work(None) as uow:
        outcome = await service.sign_in(uow, None, email=email, password=password, source="192.0.2.1")
    return service.settle(outcome)


async def refresh(db: Database, service: IdentityService, refresh_token: str) -> TokenSet:
    async with db.unit_of_work(None) as uow:
        outcome = await service.refresh_tokens(uow, None, refresh_token=refresh_token, source="192.0.2.1")
    return service.settle(outcome)


async def outbox_events(admin: asyncpg.Connection, subject: str) -> list[EventEnvelope]:
    rows = await admin.fetch("SELECT envelope FROM identity.outbox ORDER BY id")
    envelopes = []
    for row in rows:
        envelope = EventEnvelope()
        envelope.ParseFromString(row["envelope"])
        if envelope.subject == subject:
            envelopes.append(envelope)
    return envelopes


async def mailed_token(admin: asyncpg.Connection, user: User, template: str) -> str:
    """The token of the latest mail of a template requested for the user (read from the outbox)."""
    for envelope in reversed(await outbox_events(admin, user.name)):
        mail = identity_events_pb2.MailRequestedEvent()
        if envelope.payload.Unpack(mail) and mail.template == template:
            assert mail.to == user.email
            assert mail.params["link"].endswith(f"?token={mail.params['token']}")
            return mail.params["token"]
    raise AssertionError(f"no {template} mail for {user.name}")


async def audit_actions(admin: asyncpg.Connection, actor: uuid.UUID) -> list[str]:
    rows = await admin.fetch("SELECT action FROM identity.audit_log WHERE actor = $1 ORDER BY id", actor)
    return [row["action"] for row in rows]


# --- sign-up and passwords ------------------------------------------------------------------------------


class TestSignUp:
    async def test_creates_a_user_mails_a_verification_link_and_announces_it(
        self, identity_database: Database, identity_service: IdentityService, admin_conn: asyncpg.Connection
    ) -> None:
        email = unique_email("Mixed.Case")
        user = await sign_up(identity_database, identity_service, email=f"  {email.upper()} ")

        assert user.email == email.lower()
        assert not user.email_verified
        envelopes = await outbox_events(admin_conn, user.name)
        assert [envelope.type for envelope in envelopes] == [
            "tessera.identity.v1.MailRequestedEvent",
            "tessera.identity.v1.UserSignedUpEvent",
        ]
        assert {envelope.tenant_id for envelope in envelopes} == {str(USER_LEVEL_TENANT)}
        token = await mailed_token(admin_conn, user, "verify_email")
        stored = await admin_conn.fetchval("SELECT count(*) FROM identity.email_tokens WHERE user_id = $1", user.id)
        assert stored == 1
        assert (
            await admin_conn.fetchval(
                "SELECT count(*) FROM identity.email_tokens WHERE token_hash = $1", token.encode()
            )
            == 0
        )
        password_hash = await admin_conn.fetchval(
            "SELECT password_hash FROM identity.password_credentials WHERE user_id = $1", user.id
        )
        assert password_hash.startswith("$argon2id$")
        assert await audit_actions(admin_conn, user.id) == ["user.signed_up"]

    async def test_taken_email_is_already_exists_whatever_its_case(
        self, identity_database: Database, identity_service: IdentityService
    ) -> None:
        email = unique_email()
        await sign_up(identity_database, identity_service, email=email)
        with pytest.raises(AlreadyExists, match="already exists"):
            await sign_up(identity_database, identity_service, email=email.upper())

    @pytest.mark.parametrize(
        ("password", "why"),
        [
            ("short pass", "too short"),
            ("x" * 129, "too long"),
            ("Password1234", "too common"),
            ("aaaaaaaaaaaaaaaa", "too common"),
            ("my-grace.hopper-2024!", "email"),
        ],
    )
    async def test_weak_password_is_invalid_argument_naming_the_field(
        self, identity_database: Database, identity_service: IdentityService, password: str, why: str
    ) -> None:
        email = f"grace.hopper@{uuid.uuid4().hex[:8]}.example.com"
        with pytest.raises(InvalidArgument) as caught:
            await sign_up(identity_database, identity_service, email=email, password=password)
        assert caught.value.reason == errors.WEAK_PASSWORD
        assert [v.field for v in caught.value.violations] == ["password"]
        assert why in caught.value.violations[0].description

    def test_strength_rules_accept_a_good_password(self) -> None:
        check_password_strength(GOOD_PASSWORD, email="someone@example.com", field="password")


# --- sign-in ---------------------------------------------------------------------------------------------


class TestSignIn:
    async def test_returns_a_session_with_verifiable_tokens(
        self, identity_database: Database, identity_service: IdentityService, keyring: KeyRing
    ) -> None:
        user = await sign_up(identity_database, identity_service)
        signed_in = await sign_in(identity_database, identity_service, user.email.upper())

        claims = await TokenVerifier(keyring).verify(signed_in.tokens.access_token)
        assert (claims.subject, claims.session_id, claims.kind) == (str(user.id), str(signed_in.session_id), "user")
        assert claims.workspace_id is None
        assert signed_in.tokens.refresh_token
        assert signed_in.tokens.refresh_token_expire_time is not None

    async def test_refresh_token_is_stored_only_as_a_hash(
        self, identity_database: Database, identity_service: IdentityService, admin_conn: asyncpg.Connection
    ) -> None:
        user = await sign_up(identity_database, identity_service)
        signed_in = await sign_in(identity_database, identity_service, user.email)
        rows = await admin_conn.fetch(
            "SELECT token_hash FROM identity.refresh_tokens WHERE session_id = $1", signed_in.session_id
        )
        assert [bytes(row["token_hash"]) for row in rows] == [
            hashlib.sha256(signed_in.tokens.refresh_token.encode()).digest()
        ]

    async def test_unknown_email_and_wrong_password_get_the_same_answer_and_are_audited(
        self, identity_database: Database, identity_service: IdentityService, admin_conn: asyncpg.Connection
    ) -> None:
        user = await sign_up(identity_database, identity_service)
        with pytest.raises(Unauthenticated) as wrong_password:
            await sign_in(identity_database, identity_service, user.email, "not the password at all")
        with pytest.raises(Unauthenticated) as unknown_email:
            await sign_in(identity_database, identity_service, unique_email("nobody"))

        assert (wrong_password.value.message, wrong_password.value.reason) == (
            unknown_email.value.message,
            unknown_email.value.reason,
        )
        assert wrong_password.value.metadata == unknown_email.value.metadata == {}
        assert await audit_actions(admin_conn, user.id) == ["user.signed_up", "sign_in.failed"]
        anonymous = await admin_conn.fetchval(
            "SELECT count(*) FROM identity.audit_log WHERE action = 'sign_in.failed' AND actor IS NULL"
        )
        assert anonymous >= 1

    async def test_unknown_email_costs_a_password_verification(self, identity_database: Database) -> None:
        """Timing does not tell unknown accounts apart: both paths run one argon2id verification."""
        hasher = PasswordHasher(time_cost=2, memory_kib=16_384, parallelism=1)
        service = IdentityService(
            keys=KeyRing(identity_database, overlap=timedelta(minutes=20)),
            hasher=hasher,
            limiter=RateLimiter(window=timedelta(minutes=1)),
        )
        user = await sign_up(identity_database, service)

        async def attempt(email: str) -> float:
            started = time.perf_counter()
            with pytest.raises(Unauthenticated):
                await sign_in(identity_database, service, email, "wrong password 123")
            return time.perf_counter() - started

        known = statistics.median([await attempt(user.email) for _ in range(5)])
        unknown = statistics.median([await attempt(unique_email("ghost")) for _ in range(5)])
        assert 0.5 < unknown / known < 2.0, (known, unknown)


# --- email verification and password reset ------------------------------------------------------------


class TestEmailTokens:
    async def test_verification_token_works_once(
        self, identity_database: Database, identity_service: IdentityService, admin_conn: asyncpg.Connection
    ) -> None:
        user = await sign_up(identity_database, identity_service)
        token = await mailed_token(admin_conn, user, "verify_email")

        async with identity_database.unit_of_work(None) as uow:
            verified = await identity_service.verify_email(uow, None, token=token)
        assert verified.email_verified
        with pytest.raises(InvalidArgument) as caught:
            async with identity_database.unit_of_work(None) as uow:
                await identity_service.verify_email(uow, None, token=token)
        assert [v.field for v in caught.value.violations] == ["token"]

    async def test_expired_verification_token_is_refused(
        self, identity_database: Database, identity_service: IdentityService, admin_conn: asyncpg.Connection
    ) -> None:
        user = await sign_up(identity_database, identity_service)
        token = await mailed_token(admin_conn, user, "verify_email")
        await admin_conn.execute(
            "UPDATE identity.email_tokens SET expire_time = now() - interval '1 second' WHERE user_id = $1", user.id
        )
        with pytest.raises(InvalidArgument):
            async with identity_database.unit_of_work(None) as uow:
                await identity_service.verify_email(uow, None, token=token)
        async with identity_database.unit_of_work(None) as uow:
            assert not (await identity_service.get_current_user(uow, user_principal(user.id, None))).email_verified

    async def test_reset_sets_the_password_once_and_ends_every_session(
        self,
        identity_database: Database,
        identity_service: IdentityService,
        revocations: RevocationList,
        admin_conn: asyncpg.Connection,
    ) -> None:
        user = await sign_up(identity_database, identity_service)
        first = await sign_in(identity_database, identity_service, user.email)
        second = await sign_in(identity_database, identity_service, user.email)
        async with identity_database.unit_of_work(None) as uow:
            await identity_service.request_password_reset(uow, None, email=user.email.upper())
        token = await mailed_token(admin_conn, user, "reset_password")

        new_password = "a brand new passphrase 7"
        # A weak password is refused and leaves the token usable.
        with pytest.raises(InvalidArgument) as weak:
            async with identity_database.unit_of_work(None) as uow:
                await identity_service.reset_password(uow, None, token=token, new_password="password1234")
        assert [v.field for v in weak.value.violations] == ["new_password"]
        async with identity_database.unit_of_work(None) as uow:
            outcome = await identity_service.reset_password(uow, None, token=token, new_password=new_password)
        identity_service.settle(outcome)

        assert set(outcome.revoked) == {first.session_id, second.session_id}
        with pytest.raises(Unauthenticated):
            await refresh(identity_database, identity_service, first.tokens.refresh_token)
        with pytest.raises(Unauthenticated):
            await sign_in(identity_database, identity_service, user.email)
        await sign_in(identity_database, identity_service, user.email, new_password)
        with pytest.raises(InvalidArgument):
            async with identity_database.unit_of_work(None) as uow:
                await identity_service.reset_password(uow, None, token=token, new_password="yet another passphrase 8")
        claims = await TokenVerifier(identity_service.keys).verify(first.tokens.access_token)
        assert revocations.revoked_reason(claims) == "session revoked"
        event = identity_events_pb2.SessionsRevokedEvent()
        revoked_events = [e for e in await outbox_events(admin_conn, user.name) if e.payload.Unpack(event)]
        assert event.reason == "password_reset"
        assert len(revoked_events) == 1

    async def test_expired_reset_token_is_refused(
        self, identity_database: Database, identity_service: IdentityService, admin_conn: asyncpg.Connection
    ) -> None:
        user = await sign_up(identity_database, identity_service)
        async with identity_database.unit_of_work(None) as uow:
            await identity_service.request_password_reset(uow, None, email=user.email)
        token = await mailed_token(admin_conn, user, "reset_password")
        await admin_conn.execute(
            "UPDATE identity.email_tokens SET expire_time = now() - interval '1 second' "
            "WHERE user_id = $1 AND purpose = 'reset_password'",
            user.id,
        )
        with pytest.raises(InvalidArgument):
            async with identity_database.unit_of_work(None) as uow:
                await identity_service.reset_password(uow, None, token=token, new_password="fresh passphrase 99")

    async def test_reset_request_for_an_unknown_email_answers_the_same_and_mails_nothing(
        self, identity_database: Database, identity_service: IdentityService, admin_conn: asyncpg.Connection
    ) -> None:
        before = await admin_conn.fetchval("SELECT count(*) FROM identity.email_tokens")
        async with identity_database.unit_of_work(None) as uow:
            result = await identity_service.request_password_reset(uow, None, email=unique_email("ghost"))
        assert result is None
        assert await admin_conn.fetchval("SELECT count(*) FROM identity.email_tokens") == before


# --- refresh rotation -------------------------------------------------------------------------------------


class TestRefresh:
    async def test_rotation_returns_new_tokens_and_spends_the_old_one(
        self, identity_database: Database, identity_service: IdentityService, keyring: KeyRing
    ) -> None:
        user = await sign_up(identity_database, identity_service)
        signed_in = await sign_in(identity_database, identity_service, user.email)

        rotated = await refresh(identity_database, identity_service, signed_in.tokens.refresh_token)

        assert rotated.refresh_token != signed_in.tokens.refresh_token
        claims = await TokenVerifier(keyring).verify(rotated.access_token)
        assert claims.session_id == str(signed_in.session_id)
        again = await refresh(identity_database, identity_service, rotated.refresh_token)
        assert again.refresh_token not in (rotated.refresh_token, signed_in.tokens.refresh_token)

    async def test_reuse_after_the_grace_window_revokes_the_whole_family(
        self,
        identity_database: Database,
        identity_service: IdentityService,
        revocations: RevocationList,
        clock: Clock,
        admin_conn: asyncpg.Connection,
    ) -> None:
        user = await sign_up(identity_database, identity_service)
        signed_in = await sign_in(identity_database, identity_service, user.email)
        successor = await refresh(identity_database, identity_service, signed_in.tokens.refresh_token)
        clock.advance(identity_service.policy.refresh_grace + timedelta(seconds=1))

        with pytest.raises(Unauthenticated) as reused:
            await refresh(identity_database, identity_service, signed_in.tokens.refresh_token)
        assert reused.value.reason == errors.REFRESH_TOKEN_REUSED
        # The successor belongs to the same family: it is dead too, and so are the access tokens.
        with pytest.raises(Unauthenticated) as family:
            await refresh(identity_database, identity_service, successor.refresh_token)
        assert family.value.reason == errors.TOKEN_REVOKED
        claims = await TokenVerifier(identity_service.keys).verify(successor.access_token)
        assert revocations.revoked_reason(claims) == "session revoked"
        reason = await admin_conn.fetchval(
            "SELECT revoke_reason FROM identity.sessions WHERE id = $1", signed_in.session_id
        )
        assert reason == "refresh_token_reuse"
        assert "refresh_token.reused" in await audit_actions(admin_conn, user.id)
        boxes = await admin_conn.fetchval(
            "SELECT count(*) FROM identity.refresh_tokens WHERE session_id = $1 AND successor_box IS NOT NULL",
            signed_in.session_id,
        )
        assert boxes == 0

    async def test_a_second_refresh_within_the_grace_window_gets_the_same_successor(
        self, identity_database: Database, identity_service: IdentityService, clock: Clock
    ) -> None:
        user = await sign_up(identity_database, identity_service)
        signed_in = await sign_in(identity_database, identity_service, user.email)
        first = await refresh(identity_database, identity_service, signed_in.tokens.refresh_token)
        clock.advance(identity_service.policy.refresh_grace - timedelta(seconds=1))

        second = await refresh(identity_database, identity_service, signed_in.tokens.refresh_token)

        assert second == first
        third = await refresh(identity_database, identity_service, first.refresh_token)  # the family lives on
        assert third.refresh_token != first.refresh_token

    async def test_successor_is_stored_encrypted_under_the_rotated_token(
        self, identity_database: Database, identity_service: IdentityService, admin_conn: asyncpg.Connection
    ) -> None:
        user = await sign_up(identity_database, identity_service)
        signed_in = await sign_in(identity_database, identity_service, user.email)
        successor = await refresh(identity_database, identity_service, signed_in.tokens.refresh_token)
        box = await admin_conn.fetchval(
            "SELECT successor_box FROM identity.refresh_tokens WHERE session_id = $1 AND generation = 0",
            signed_in.session_id,
        )
        assert box is not None
        assert successor.refresh_token.encode() not in bytes(box)
        assert successor.access_token.encode()[:40] not in bytes(box)

    async def test_unknown_and_expired_refresh_tokens_are_unauthenticated(
        self, identity_database: Database, identity_service: IdentityService, clock: Clock
    ) -> None:
        with pytest.raises(Unauthenticated) as unknown:
            await refresh(identity_database, identity_service, "not-a-refresh-token")
        assert unknown.value.reason == errors.TOKEN_INVALID
        user = await sign_up(identity_database, identity_service)
        signed_in = await sign_in(identity_database, identity_service, user.email)
        clock.advance(identity_service.policy.refresh_token_ttl + timedelta(seconds=1))
        with pytest.raises(Unauthenticated) as expired:
            await refresh(identity_database, identity_service, signed_in.tokens.refresh_token)
        assert expired.value.reason == errors.TOKEN_EXPIRED


# --- sign-out, password change, sessions -------------------------------------------------------------


class TestSessions:
    async def test_sign_out_current_others_and_all(
        self, identity_database: Database, identity_service: IdentityService, revocations: RevocationList
    ) -> None:
        user = await sign_up(identity_database, identity_service)
        sessions = [await sign_in(identity_database, identity_service, user.email) for _ in range(4)]
        me = user_principal(user.id, sessions[0].session_id)

        async def sign_out(principal: Principal, scope: str) -> int:
            async with identity_database.unit_of_work(principal) as uow:
                outcome = await identity_service.sign_out(uow, principal, scope=scope)
            return identity_service.settle(outcome)

        assert await sign_out(user_principal(user.id, sessions[3].session_id), "current") == 1
        assert await sign_out(me, "others") == 2
        async with identity_database.unit_of_work(me) as uow:
            live = await identity_service.list_sessions(uow, me)
        assert [session.id for session in live] == [sessions[0].session_id]
        assert await sign_out(me, "all") == 1
        async with identity_database.unit_of_work(me) as uow:
            assert await identity_service.list_sessions(uow, me) == []
        for signed_in in sessions:
            claims = await TokenVerifier(identity_service.keys).verify(signed_in.tokens.access_token)
            assert revocations.revoked_reason(claims) == "session revoked"

    async def test_sign_out_current_without_a_session_ends_nothing(
        self, identity_database: Database, identity_service: IdentityService
    ) -> None:
        user = await sign_up(identity_database, identity_service)
        signed_in = await sign_in(identity_database, identity_service, user.email)
        sessionless = user_principal(user.id, None)  # what auth=disabled produces
        async with identity_database.unit_of_work(sessionless) as uow:
            outcome = await identity_service.sign_out(uow, sessionless, scope="current")
        assert identity_service.settle(outcome) == 0
        await refresh(identity_database, identity_service, signed_in.tokens.refresh_token)

    async def test_change_password_keeps_this_session_and_ends_the_others(
        self, identity_database: Database, identity_service: IdentityService, admin_conn: asyncpg.Connection
    ) -> None:
        user = await sign_up(identity_database, identity_service)
        current = await sign_in(identity_database, identity_service, user.email)
        other = await sign_in(identity_database, identity_service, user.email)
        me = user_principal(user.id, current.session_id)
        new_password = "another long passphrase 5"

        async with identity_database.unit_of_work(me) as uow:
            wrong = await identity_service.change_password(
                uow, me, current_password="wrong password 1234", new_password=new_password
            )
        with pytest.raises(PermissionDenied):
            identity_service.settle(wrong)
        async with identity_database.unit_of_work(me) as uow:
            outcome = await identity_service.change_password(
                uow, me, current_password=GOOD_PASSWORD, new_password=new_password
            )
        assert identity_service.settle(outcome) == 1

        await refresh(identity_database, identity_service, current.tokens.refresh_token)
        with pytest.raises(Unauthenticated):
            await refresh(identity_database, identity_service, other.tokens.refresh_token)
        await sign_in(identity_database, identity_service, user.email, new_password)
        actions = await audit_actions(admin_conn, user.id)
        assert "password.change_failed" in actions
        assert "password.changed" in actions
        assert "sessions.revoked" in actions

    async def test_api_key_tokens_cannot_use_user_methods(
        self, identity_database: Database, identity_service: IdentityService
    ) -> None:
        key_id = str(uuid.uuid4())
        principal = Principal(
            subject=key_id, tenant_id=str(uuid.uuid4()), role="admin", session_id=key_id, kind="api_key"
        )
        with pytest.raises(PermissionDenied) as caught:
            async with identity_database.unit_of_work(principal) as uow:
                await identity_service.get_current_user(uow, principal)
        assert caught.value.reason == errors.USER_TOKEN_REQUIRED


# --- signing keys -----------------------------------------------------------------------------------------


class TestSigningKeys:
    async def test_rotation_keeps_the_old_key_verifying_for_the_overlap(
        self, identity_database: Database, identity_service: IdentityService, keyring: KeyRing, clock: Clock
    ) -> None:
        user = await sign_up(identity_database, identity_service)
        old = await sign_in(identity_database, identity_service, user.email)
        old_kid = (await keyring.signer()).kid
        verifier = TokenVerifier(keyring)
        await verifier.verify(old.tokens.access_token)

        new_kid = await keyring.rotate()

        assert new_kid != old_kid
        assert (await keyring.signer()).kid == new_kid
        assert [jwk["kid"] for jwk in await keyring.jwks()][:2] == [new_kid, old_kid]
        assert (await verifier.verify(old.tokens.access_token)).subject == str(user.id)
        new = await sign_in(identity_database, identity_service, user.email)
        assert (await verifier.verify(new.tokens.access_token)).subject == str(user.id)

        # Past the overlap the retired key leaves the JWKS and its tokens stop verifying.
        clock.advance(keyring.overlap + timedelta(seconds=1))
        await keyring.reload()
        assert old_kid not in [jwk["kid"] for jwk in await keyring.jwks()]
        with pytest.raises(Unauthenticated):
            await TokenVerifier(keyring).verify(old.tokens.access_token)

    async def test_a_second_process_picks_up_a_rotation_from_the_database(
        self, identity_database: Database, keyring: KeyRing
    ) -> None:
        other = KeyRing(identity_database, overlap=keyring.overlap, cache_seconds=0.0001)
        new_kid = await keyring.rotate()
        assert (await other.signer()).kid == new_kid


# --- API keys -----------------------------------------------------------------------------------------------


def workspace_admin(workspace_id: uuid.UUID, role: str = "admin") -> Principal:
    user = uuid.uuid4()
    return Principal(subject=str(user), session_id=str(uuid.uuid4())).in_tenant(str(workspace_id), role)


class TestApiKeys:
    async def test_lifecycle_create_list_exchange_revoke(
        self,
        identity_database: Database,
        identity_service: IdentityService,
        revocations: RevocationList,
        keyring: KeyRing,
        admin_conn: asyncpg.Connection,
    ) -> None:
        workspace_id = uuid.uuid4()
        caller = workspace_admin(workspace_id)
        async with identity_database.unit_of_work(caller) as uow:
            created = await identity_service.create_api_key(
                uow, caller, workspace_id=workspace_id, display_name="CI", role="member"
            )
        secret = created.secret
        assert secret.startswith(f"tsk_{workspace_id.hex}_")
        assert secret.startswith(created.api_key.prefix)
        assert len(created.api_key.prefix) < len(secret)
        assert api_key_workspace(secret) == workspace_id
        stored = await admin_conn.fetchrow("SELECT * FROM identity.api_keys WHERE id = $1", created.api_key.id)
        assert secret.encode() not in b"".join(str(value).encode() for value in stored.values())

        async with identity_database.unit_of_work(None, tenant_id=str(workspace_id)) as uow:
            tokens = await identity_service.exchange_api_key(uow, None, secret=secret)
        claims = await TokenVerifier(keyring).verify(tokens.access_token)
        key_id = str(created.api_key.id)
        assert (claims.subject, claims.session_id, claims.kind) == (key_id, key_id, "api_key")
        assert (claims.workspace_id, claims.role) == (str(workspace_id), "member")
        assert tokens.refresh_token == ""

        async with identity_database.unit_of_work(caller) as uow:
            [listed] = await identity_service.list_api_keys(uow, caller, workspace_id=workspace_id)
        assert listed.last_used_time is not None
        assert listed.revoke_time is None

        async with identity_database.unit_of_work(caller) as uow:
            outcome = await identity_service.revoke_api_key(
                uow, caller, workspace_id=workspace_id, key_id=created.api_key.id
            )
        revoked = identity_service.settle(outcome)
        assert revoked.revoke_time is not None
        assert revocations.revoked_reason(claims) == "session revoked"
        with pytest.raises(Unauthenticated) as refused:
            async with identity_database.unit_of_work(None, tenant_id=str(workspace_id)) as uow:
                await identity_service.exchange_api_key(uow, None, secret=secret)
        assert refused.value.reason == errors.TOKEN_INVALID
        event = identity_events_pb2.ApiKeyRevokedEvent()
        [envelope] = [e for e in await outbox_events(admin_conn, revoked.name) if e.payload.Unpack(event)]
        assert (envelope.tenant_id, event.api_key.name) == (str(workspace_id), revoked.name)
        actions = await admin_conn.fetch(
            "SELECT action FROM identity.audit_log WHERE tenant_id = $1 ORDER BY id", workspace_id
        )
        assert [row["action"] for row in actions] == ["api_key.created", "api_key.revoked"]

        # Revoking again is idempotent and announces nothing new.
        async with identity_database.unit_of_work(caller) as uow:
            again = await identity_service.revoke_api_key(
                uow, caller, workspace_id=workspace_id, key_id=created.api_key.id
            )
        assert identity_service.settle(again).revoke_time == revoked.revoke_time
        assert again.revoked == ()

    async def test_owner_role_and_bad_names_are_refused(
        self, identity_database: Database, identity_service: IdentityService
    ) -> None:
        workspace_id = uuid.uuid4()
        caller = workspace_admin(workspace_id)
        for display_name, role, field in (("CI", "owner", "api_key.role"), ("  ", "viewer", "api_key.display_name")):
            with pytest.raises(InvalidArgument) as caught:
                async with identity_database.unit_of_work(caller) as uow:
                    await identity_service.create_api_key(
                        uow, caller, workspace_id=workspace_id, display_name=display_name, role=role
                    )
            assert [v.field for v in caught.value.violations] == [field]

    async def test_another_workspace_is_not_found(
        self, identity_database: Database, identity_service: IdentityService
    ) -> None:
        mine, theirs = uuid.uuid4(), uuid.uuid4()
        owner_of_theirs = workspace_admin(theirs)
        async with identity_database.unit_of_work(owner_of_theirs) as uow:
            created = await identity_service.create_api_key(
                uow, owner_of_theirs, workspace_id=theirs, display_name="theirs", role="viewer"
            )
        caller = workspace_admin(mine)
        with pytest.raises(NotFound):
            async with identity_database.unit_of_work(caller) as uow:
                await identity_service.list_api_keys(uow, caller, workspace_id=theirs)
        with pytest.raises(NotFound):
            async with identity_database.unit_of_work(caller) as uow:
                await identity_service.revoke_api_key(uow, caller, workspace_id=theirs, key_id=created.api_key.id)
        # A key id of another workspace under my workspace's name: absent here.
        with pytest.raises(NotFound):
            async with identity_database.unit_of_work(caller) as uow:
                await identity_service.revoke_api_key(uow, caller, workspace_id=mine, key_id=created.api_key.id)
        # A secret presented in the wrong tenant finds nothing.
        with pytest.raises(Unauthenticated):
            async with identity_database.unit_of_work(None, tenant_id=str(mine)) as uow:
                await identity_service.exchange_api_key(uow, None, secret=created.secret)

    @pytest.mark.parametrize("secret", ["", "tsk_", "tsk_nothex_abc", f"xyz_{uuid.uuid4().hex}_abc", "tsk_" + "0" * 32])
    def test_malformed_secrets_name_no_workspace(self, secret: str) -> None:
        assert api_key_workspace(secret) is None


# --- rate limits ----------------------------------------------------------------------------------------


class TestRateLimits:
    async def test_limit_counts_per_key_and_window(
        self, identity_database: Database, identity_service: IdentityService, clock: Clock
    ) -> None:
        key = f"test:{uuid.uuid4()}"
        other = f"test:{uuid.uuid4()}"

        async def hit(*limits: Limit) -> None:
            async with identity_database.unit_of_work(None) as uow:
                await identity_service.enforce_limits(uow, limits, what="test")

        for _ in range(3):
            await hit(Limit(key, 3), Limit(other, 100))
        with pytest.raises(ResourceExhausted) as caught:
            await hit(Limit(other, 100), Limit(key, 3))
        window = identity_service.limiter.window.total_seconds()
        assert caught.value.retry_after is not None
        assert 0 < caught.value.retry_after <= window
        await hit(Limit(other, 100))  # another key is unaffected
        clock.advance(identity_service.limiter.window)
        await hit(Limit(key, 3))  # a new window starts from zero

    def test_sign_in_limits_do_not_store_the_email(self, identity_service: IdentityService) -> None:
        limits = identity_service.sign_in_limits(email="Ada@Example.com", source="192.0.2.7")
        assert [limit.key.split(":")[:2] for limit in limits] == [["sign_in", "account"], ["sign_in", "address"]]
        assert "example" not in limits[0].key
        assert limits[0] == identity_service.sign_in_limits(email="ada@example.com", source="x")[0]
        assert limits[1].key == "sign_in:address:192.0.2.7"


def test_policy_defaults_match_the_brief() -> None:
    policy = IdentityPolicy()
    assert policy.refresh_grace == timedelta(seconds=10)
    assert policy.access_token_ttl == timedelta(minutes=10)


# --- OIDC account linking -----------------------------------------------------------------------------------


class TestOidcLinking:
    async def oidc(self, db: Database, service: IdentityService, identity: VerifiedIdentity) -> SignedIn:
        async with db.unit_of_work(None) as uow:
            outcome = await service.oidc_sign_in(uow, None, provider="acme", identity=identity)
        return service.settle(outcome)

    async def test_a_verified_account_is_linked_and_keeps_its_password(
        self, identity_database: Database, identity_service: IdentityService, admin_conn: asyncpg.Connection
    ) -> None:
        user = await sign_up(identity_database, identity_service)
        token = await mailed_token(admin_conn, user, "verify_email")
        async with identity_database.unit_of_work(None) as uow:
            await identity_service.verify_email(uow, None, token=token)
        password_session = await sign_in(identity_database, identity_service, user.email)

        identity = VerifiedIdentity("https://idp.example", f"sub-{uuid.uuid4()}", user.email.upper(), True, None)
        linked = await self.oidc(identity_database, identity_service, identity)

        assert linked.user.id == user.id
        await sign_in(identity_database, identity_service, user.email)
        await refresh(identity_database, identity_service, password_session.tokens.refresh_token)
        # Later sign-ins find the link by (issuer, subject), whatever the email claim says then.
        moved = VerifiedIdentity(identity.issuer, identity.subject, unique_email("moved"), False, None)
        assert (await self.oidc(identity_database, identity_service, moved)).user.id == user.id
        rows = await admin_conn.fetch("SELECT provider FROM identity.oidc_identities WHERE user_id = $1", user.id)
        assert [row["provider"] for row in rows] == ["acme"]

    async def test_no_email_claim_and_no_link_is_failed_precondition(
        self, identity_database: Database, identity_service: IdentityService
    ) -> None:
        identity = VerifiedIdentity("https://idp.example", f"sub-{uuid.uuid4()}", None, False, None)
        with pytest.raises(FailedPrecondition):
            await self.oidc(identity_database, identity_service, identity)


# --- housekeeping -------------------------------------------------------------------------------------------


async def test_housekeeping_purges_what_can_no_longer_be_used(
    identity_database: Database, identity_service: IdentityService, admin_conn: asyncpg.Connection
) -> None:
    user = await sign_up(identity_database, identity_service)
    signed_in = await sign_in(identity_database, identity_service, user.email)
    await refresh(identity_database, identity_service, signed_in.tokens.refresh_token)
    await admin_conn.execute(
        "UPDATE identity.email_tokens SET expire_time = now() - interval '2 days' WHERE user_id = $1", user.id
    )
    await admin_conn.execute(
        "UPDATE identity.refresh_tokens SET rotate_time = rotate_time - interval '1 minute' WHERE session_id = $1",
        signed_in.session_id,
    )
    housekeeper = Housekeeper(
        identity_database, identity_service, interval_seconds=3600, key_overlap=timedelta(minutes=30)
    )

    counts = await housekeeper.purge()

    assert counts["email_tokens"] >= 1
    assert counts["successor_boxes"] >= 1
    assert await admin_conn.fetchval("SELECT count(*) FROM identity.email_tokens WHERE user_id = $1", user.id) == 0
    boxes = await admin_conn.fetchval(
        "SELECT count(*) FROM identity.refresh_tokens WHERE session_id = $1 AND successor_box IS NOT NULL",
        signed_in.session_id,
    )
    assert boxes == 0
    await admin_conn.execute(
        "UPDATE identity.sessions SET absolute_expire_time = now() - interval '2 days' WHERE id = $1",
        signed_in.session_id,
    )
    assert (await housekeeper.purge())["sessions"] >= 1
    assert (
        await admin_conn.fetchval(
            "SELECT count(*) FROM identity.refresh_tokens WHERE session_id = $1", signed_in.session_id
        )
        == 0
    )
