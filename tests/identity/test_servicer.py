"""IdentityService over real gRPC, as deployed: auth enforced with its own keys, PostgreSQL, NATS, SMTP.

Every token here comes from the running service. The runtime trusts 127.0.0.1 as a proxy, so each test
sends its own `x-forwarded-for` address and the per-address rate limits of one test do not leak into
another's.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import grpc
import jwt
import pytest

from services.identity.main import build
from services.kit.server import ServiceRuntime
from tessera.identity.v1 import identity_pb2, identity_service_pb2, identity_service_pb2_grpc
from tests.auth_helpers import bearer
from tests.helpers import eventually
from tests.identity.conftest import GOOD_PASSWORD, unique_email
from tests.identity.helpers import (
    SIGN_IN_PER_ACCOUNT,
    SIGN_IN_PER_ADDRESS,
    details,
    new_address,
    rejected,
    runtime_settings,
    via,
)
from tests.identity.mail_server import SmtpServer, running_smtp_server

pytestmark = pytest.mark.gate("S02")

Stub = identity_service_pb2_grpc.IdentityServiceStub


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpServer]:
    with running_smtp_server() as server:
        yield server


@pytest.fixture(scope="module")
async def runtime(admin_url: str, nats_url: str, smtp: SmtpServer) -> AsyncIterator[ServiceRuntime]:
    service_runtime = await build(runtime_settings(admin_url, nats_url, smtp))
    await service_runtime.start()
    try:
        yield service_runtime
    finally:
        await service_runtime.stop()


@pytest.fixture(scope="module")
async def stub(runtime: ServiceRuntime) -> AsyncIterator[Stub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}")
    try:
        yield identity_service_pb2_grpc.IdentityServiceStub(channel)
    finally:
        await channel.close()


async def sign_up(stub: Stub, address: str, email: str | None = None) -> identity_pb2.User:
    response = await stub.SignUp(
        identity_service_pb2.SignUpRequest(email=email or unique_email(), password=GOOD_PASSWORD, display_name="Ada"),
        metadata=via(address),
    )
    return response.user


async def sign_in(stub: Stub, address: str, email: str, password: str = GOOD_PASSWORD) -> identity_pb2.TokenSet:
    response = await stub.SignIn(
        identity_service_pb2.SignInRequest(email=email, password=password), metadata=via(address)
    )
    return response.tokens


async def refresh(stub: Stub, address: str, refresh_token: str) -> identity_pb2.TokenSet:
    response = await stub.RefreshTokens(
        identity_service_pb2.RefreshTokensRequest(refresh_token=refresh_token), metadata=via(address)
    )
    return response.tokens


async def current_user(stub: Stub, access_token: str) -> identity_pb2.User:
    response = await stub.GetCurrentUser(identity_service_pb2.GetCurrentUserRequest(), metadata=bearer(access_token))
    return response.user


_TOKEN_IN_LINK = re.compile(r"[?&]token=([A-Za-z0-9_-]+)")


async def mailed_token(smtp: SmtpServer, email: str, subject_word: str) -> str:
    """The token in the latest mail to `email` whose subject mentions `subject_word`."""

    async def arrived() -> list[str]:
        mails = [mail for mail in smtp.to(email) if subject_word.lower() in mail.subject.lower()]
        return [match.group(1) for mail in mails if (match := _TOKEN_IN_LINK.search(mail.text))]

    tokens: list[str] = await eventually(arrived, timeout=20, what=f"{subject_word} mail to {email}")
    return tokens[-1]


# --- flows ------------------------------------------------------------------------------------------------


async def test_sign_up_sign_in_refresh_and_sign_out(stub: Stub) -> None:
    address = new_address()
    email = unique_email()
    user = await sign_up(stub, address, email)
    tokens = await sign_in(stub, address, email)

    assert tokens.token_type == "Bearer"
    assert (await current_user(stub, tokens.access_token)).name == user.name
    sessions = await stub.ListSessions(identity_service_pb2.ListSessionsRequest(), metadata=bearer(tokens.access_token))
    assert [(s.method, s.current) for s in sessions.sessions] == [("password", True)]

    rotated = await refresh(stub, address, tokens.refresh_token)
    assert rotated.refresh_token != tokens.refresh_token
    assert (await current_user(stub, rotated.access_token)).email == email

    signed_out = await stub.SignOut(
        identity_service_pb2.SignOutRequest(scope=identity_service_pb2.SIGN_OUT_SCOPE_CURRENT),
        metadata=bearer(rotated.access_token),
    )
    assert signed_out.revoked_sessions == 1
    # The identity process applies its own revocations at once.
    error = await rejected(current_user(stub, rotated.access_token))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    error = await rejected(refresh(stub, address, rotated.refresh_token))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_no_token_and_forged_tokens_are_unauthenticated(stub: Stub) -> None:
    error = await rejected(stub.GetCurrentUser(identity_service_pb2.GetCurrentUserRequest()))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    address = new_address()
    email = unique_email()
    await sign_up(stub, address, email)
    tokens = await sign_in(stub, address, email)
    header, payload, signature = tokens.access_token.split(".")
    forged = f"{header}.{payload}.{signature[:-4]}AAAA"
    error = await rejected(current_user(stub, forged))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_sign_up_errors_name_the_problem(stub: Stub) -> None:
    address = new_address()
    email = unique_email()
    await sign_up(stub, address, email)

    taken = await rejected(sign_up(stub, address, email.upper()))
    assert taken.code() == grpc.StatusCode.ALREADY_EXISTS
    for password, reason in (("tooshort", ""), ("password1234", "WEAK_PASSWORD")):
        weak = await rejected(
            stub.SignUp(
                identity_service_pb2.SignUpRequest(email=unique_email(), password=password, display_name="Ada"),
                metadata=via(address),
            )
        )
        info, fields, _ = details(weak)
        assert weak.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fields == ["password"]
        if reason:
            assert info.reason == reason


async def test_sign_in_does_not_reveal_which_accounts_exist(stub: Stub) -> None:
    address = new_address()
    email = unique_email()
    await sign_up(stub, address, email)

    wrong_password = await rejected(sign_in(stub, address, email, "this is not it 123"))
    unknown_email = await rejected(sign_in(stub, address, unique_email("nobody"), "this is not it 123"))

    assert wrong_password.code() == unknown_email.code() == grpc.StatusCode.UNAUTHENTICATED
    assert wrong_password.details() == unknown_email.details()
    wrong_info, _, _ = details(wrong_password)
    unknown_info, _, _ = details(unknown_email)
    assert (wrong_info.reason, dict(wrong_info.metadata)) == (unknown_info.reason, dict(unknown_info.metadata))


async def test_refresh_reuse_revokes_the_family_everywhere(
    stub: Stub, runtime: ServiceRuntime, admin_url: str, nats_url: str, smtp: SmtpServer, admin_conn: asyncpg.Connection
) -> None:
    """Reuse after the grace window ends the session: here at once, in another process once the event arrives."""
    other = await build(runtime_settings(admin_url, nats_url, smtp))
    await other.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{other.port}")
    other_stub = identity_service_pb2_grpc.IdentityServiceStub(channel)
    try:
        address = new_address()
        email = unique_email()
        await sign_up(stub, address, email)
        first = await sign_in(stub, address, email)
        second = await refresh(stub, address, first.refresh_token)
        assert (await current_user(other_stub, second.access_token)).email == email
        # Move the rotation out of the grace window instead of waiting for it.
        await admin_conn.execute(
            "UPDATE identity.refresh_tokens SET rotate_time = rotate_time - interval '1 minute' "
            "WHERE token_hash = sha256($1::bytea)",
            first.refresh_token.encode(),
        )

        reused = await rejected(refresh(stub, address, first.refresh_token))

        assert reused.code() == grpc.StatusCode.UNAUTHENTICATED
        assert details(reused)[0].reason == "REFRESH_TOKEN_REUSED"
        assert (await rejected(refresh(stub, address, second.refresh_token))).code() == grpc.StatusCode.UNAUTHENTICATED
        assert (await rejected(current_user(stub, second.access_token))).code() == grpc.StatusCode.UNAUTHENTICATED

        async def rejected_by_the_other_process() -> bool:
            try:
                await current_user(other_stub, second.access_token)
            except grpc.aio.AioRpcError as error:
                return error.code() == grpc.StatusCode.UNAUTHENTICATED
            return False

        await eventually(rejected_by_the_other_process, what="SessionsRevokedEvent applied by another process")
    finally:
        await channel.close()
        await other.stop()


async def test_two_tabs_refreshing_at_once_both_get_the_same_successor(stub: Stub) -> None:
    address = new_address()
    email = unique_email()
    await sign_up(stub, address, email)
    tokens = await sign_in(stub, address, email)

    tab_one, tab_two = await asyncio.gather(
        refresh(stub, address, tokens.refresh_token), refresh(stub, address, tokens.refresh_token)
    )

    assert tab_one.refresh_token == tab_two.refresh_token
    assert tab_one.access_token == tab_two.access_token
    assert (await current_user(stub, tab_two.access_token)).email == email
    following = await refresh(stub, address, tab_one.refresh_token)
    assert following.refresh_token != tab_one.refresh_token


async def test_password_change_ends_the_other_sessions(stub: Stub) -> None:
    address = new_address()
    email = unique_email()
    await sign_up(stub, address, email)
    here = await sign_in(stub, address, email)
    elsewhere = await sign_in(stub, address, email)

    wrong = await rejected(
        stub.ChangePassword(
            identity_service_pb2.ChangePasswordRequest(
                current_password="nope nope nope", new_password="whatever 1234 x"
            ),
            metadata=via(address, here.access_token),
        )
    )
    assert wrong.code() == grpc.StatusCode.PERMISSION_DENIED
    changed = await stub.ChangePassword(
        identity_service_pb2.ChangePasswordRequest(
            current_password=GOOD_PASSWORD, new_password="a different passphrase 77"
        ),
        metadata=via(address, here.access_token),
    )

    assert changed.revoked_sessions == 1
    assert (await current_user(stub, here.access_token)).email == email
    assert (await rejected(current_user(stub, elsewhere.access_token))).code() == grpc.StatusCode.UNAUTHENTICATED
    await sign_in(stub, address, email, "a different passphrase 77")


# --- mailed tokens -------------------------------------------------------------------------------------------


async def test_verification_mail_link_verifies_the_email_once(stub: Stub, smtp: SmtpServer) -> None:
    address = new_address()
    email = unique_email()
    user = await sign_up(stub, address, email)
    assert not user.email_verified

    token = await mailed_token(smtp, email, "verify")
    verified = await stub.VerifyEmail(identity_service_pb2.VerifyEmailRequest(token=token))
    assert verified.user.email_verified

    again = await rejected(stub.VerifyEmail(identity_service_pb2.VerifyEmailRequest(token=token)))
    assert again.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(again)[1] == ["token"]


async def test_password_reset_by_mail_works_once_and_ends_all_sessions(stub: Stub, smtp: SmtpServer) -> None:
    address = new_address()
    email = unique_email()
    await sign_up(stub, address, email)
    session = await sign_in(stub, address, email)
    await stub.RequestPasswordReset(
        identity_service_pb2.RequestPasswordResetRequest(email=email), metadata=via(address)
    )
    unknown = await stub.RequestPasswordReset(
        identity_service_pb2.RequestPasswordResetRequest(email=unique_email("ghost")), metadata=via(address)
    )
    assert unknown == identity_service_pb2.RequestPasswordResetResponse()

    token = await mailed_token(smtp, email, "reset")
    await stub.ResetPassword(
        identity_service_pb2.ResetPasswordRequest(token=token, new_password="reset passphrase 123")
    )

    assert (await rejected(current_user(stub, session.access_token))).code() == grpc.StatusCode.UNAUTHENTICATED
    await sign_in(stub, address, email, "reset passphrase 123")
    reused = await rejected(
        stub.ResetPassword(identity_service_pb2.ResetPasswordRequest(token=token, new_password="another one 12345"))
    )
    assert reused.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- keys ------------------------------------------------------------------------------------------------------


async def test_jwks_lists_old_and_new_keys_during_a_rotation(stub: Stub, runtime: ServiceRuntime) -> None:
    address = new_address()
    email = unique_email()
    await sign_up(stub, address, email)
    before = await sign_in(stub, address, email)
    old_kids = [key.kid for key in (await stub.GetJwks(identity_service_pb2.GetJwksRequest())).keys]

    keys = runtime_keys(runtime)
    new_kid = await keys.rotate()

    jwks = await stub.GetJwks(identity_service_pb2.GetJwksRequest())
    kids = [key.kid for key in jwks.keys]
    assert kids[0] == new_kid
    assert old_kids[0] in kids
    assert {(key.kty, key.crv, key.alg, key.use) for key in jwks.keys} == {("OKP", "Ed25519", "EdDSA", "sig")}
    # A token signed by the retired key still works during the overlap; new tokens use the new key.
    assert (await current_user(stub, before.access_token)).email == email
    after = await sign_in(stub, address, email)
    assert _kid(after.access_token) == new_kid
    assert (await current_user(stub, after.access_token)).email == email


def runtime_keys(runtime: ServiceRuntime) -> Any:
    """The key ring of the running identity service (its servicer's service holds it)."""
    [binding] = runtime.bindings
    return binding.servicer.service.keys  # type: ignore[attr-defined]


def _kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


# --- rate limits -----------------------------------------------------------------------------------------------


async def test_sign_in_is_rate_limited_per_account(stub: Stub) -> None:
    email = unique_email()
    await sign_up(stub, new_address(), email)
    for _ in range(SIGN_IN_PER_ACCOUNT):
        # Different addresses: only the account limit applies.
        await rejected(sign_in(stub, new_address(), email, "wrong password 123"))

    limited = await rejected(sign_in(stub, new_address(), email))

    assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info, _, retry = details(limited)
    assert info.reason == "RATE_LIMITED"
    assert retry is not None
    assert 0 < retry <= 86_400


async def test_sign_in_is_rate_limited_per_source_address(stub: Stub) -> None:
    address = new_address()
    for _ in range(SIGN_IN_PER_ADDRESS):
        await rejected(sign_in(stub, address, unique_email("spray"), "wrong password 123"))

    limited = await rejected(sign_in(stub, address, unique_email("spray")))
    other_address = await rejected(sign_in(stub, new_address(), unique_email("spray"), "wrong password 123"))

    assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details(limited)[2] is not None
    assert other_address.code() == grpc.StatusCode.UNAUTHENTICATED


# --- API keys ----------------------------------------------------------------------------------------------------


async def test_revoked_api_key_exchange_is_unauthenticated(stub: Stub) -> None:
    error = await rejected(stub.ExchangeApiKey(identity_service_pb2.ExchangeApiKeyRequest(secret="tsk_nonsense")))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    unknown = f"tsk_{uuid.uuid4().hex}_{'x' * 43}"
    error = await rejected(stub.ExchangeApiKey(identity_service_pb2.ExchangeApiKeyRequest(secret=unknown)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
