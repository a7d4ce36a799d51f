"""OIDC sign-in through the identity service's RPCs, against a real provider on loopback. Gate S02.

The identity process is built by `services.identity.main.build` with the provider configured as `mock`
and its mails going to a real SMTP server on loopback; the browser's part (the provider's authorization
form) is driven over HTTP. Covered: a new user created and linked, the next sign-in reusing it, wrong
or spent state, replayed code, wrong nonce, expired ID token, and linking to an existing password
account only when the provider verified the email.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import asyncpg
import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from migrations import runner
from services.identity.main import build
from services.identity.oidc import OidcClient, OidcProviderConfig
from services.identity.servicer import IdentityServicer
from services.identity.settings import IdentitySettings
from services.kit.server import ServiceRuntime
from services.kit.settings import load_settings
from tessera.identity.v1 import identity_service_pb2, identity_service_pb2_grpc
from tessera_cli.embedded import EmbeddedNats
from tests.auth_helpers import bearer
from tests.helpers import eventually
from tests.identity.mail_server import SmtpServer, running_smtp_server
from tests.identity.oidc_provider import (
    OidcProvider,
    RegisteredClient,
    register_client,
    running_provider,
    set_user,
    sign_in_at_provider,
)

pytestmark = pytest.mark.gate("S02")

PROVIDER = "mock"
REDIRECT_URI = "https://app.tessera.test/oidc/callback"
BASE_URL = "https://app.tessera.test"
PASSWORD = "correct horse battery staple 42"


@pytest.fixture(scope="module")
def provider() -> Iterator[OidcProvider]:
    with running_provider() as running:
        yield running


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpServer]:
    with running_smtp_server() as server:
        yield server


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
async def oidc_client(browser: httpx.AsyncClient, provider: OidcProvider) -> RegisteredClient:
    return await register_client(browser, provider, redirect_uris=[REDIRECT_URI])


@pytest.fixture(scope="module")
def provider_config(provider: OidcProvider, oidc_client: RegisteredClient) -> OidcProviderConfig:
    return OidcProviderConfig(
        issuer=provider.issuer,
        client_id=oidc_client.client_id,
        client_secret=oidc_client.client_secret,
        redirect_uris=(REDIRECT_URI,),
    )


@pytest.fixture(scope="module")
def module_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A NATS server of this module: the mail consumer must not start behind the backlog of mails
    requested by every other identity process of the session on the shared server."""
    server = EmbeddedNats(tmp_path_factory.mktemp("oidc-rpc-nats")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
async def runtime(
    admin_url: str, module_nats: str, smtp: SmtpServer, provider_config: OidcProviderConfig
) -> AsyncIterator[ServiceRuntime]:
    settings = load_settings(
        IdentitySettings,
        database_url=runner.service_url(admin_url, "identity"),
        nats_url=module_nats,
        environment="test",
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_port=None,
        outbox_poll_seconds=0.2,
        shutdown_grace_seconds=2.0,
        public_base_url=BASE_URL,
        smtp_url=f"smtp://{smtp.host}:{smtp.port}",
        mail_from="Tessera <no-reply@tessera.test>",
        oidc_providers={PROVIDER: provider_config},
        argon2_time_cost=1,
        argon2_memory_kib=1024,
        argon2_parallelism=1,
        # Rate-limit windows live in the shared database per source address: other modules of the
        # session sign up many users from 127.0.0.1 within the same minute.
        sign_up_limit_per_address=10_000,
        sign_in_limit_per_address=10_000,
    )
    service_runtime = await build(settings)
    await service_runtime.start()
    try:
        yield service_runtime
    finally:
        await service_runtime.stop()


@pytest.fixture(scope="module")
async def stub(runtime: ServiceRuntime) -> AsyncIterator[identity_service_pb2_grpc.IdentityServiceStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}")
    try:
        yield identity_service_pb2_grpc.IdentityServiceStub(channel)
    finally:
        await channel.close()


def details(error: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    """The ErrorInfo reason and the BadRequest field paths of a failed call."""
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status details"
    reason, fields = "", list[str]()
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields.extend(violation.field for violation in bad_request.field_violations)
    return reason, fields


async def fails(call: Any, code: grpc.StatusCode) -> tuple[str, list[str]]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return details(info.value)


async def provider_user(
    browser: httpx.AsyncClient, provider: OidcProvider, *, email: str, verified: bool, name: str | None = None
) -> str:
    """A user at the provider with these claims; its subject."""
    sub = f"sub-{uuid.uuid4().hex[:10]}"
    claims: dict[str, object] = {"email": email, "email_verified": verified}
    if name:
        claims["name"] = name
    await set_user(browser, provider, sub, claims)
    return sub


async def start(stub: identity_service_pb2_grpc.IdentityServiceStub) -> identity_service_pb2.StartOidcSignInResponse:
    return await stub.StartOidcSignIn(
        identity_service_pb2.StartOidcSignInRequest(provider=PROVIDER, redirect_uri=REDIRECT_URI)
    )


async def callback(
    stub: identity_service_pb2_grpc.IdentityServiceStub, browser: httpx.AsyncClient, sub: str
) -> tuple[str, str]:
    """StartOidcSignIn, then the user approves at the provider: the callback's state and code."""
    started = await start(stub)
    returned = await sign_in_at_provider(browser, started.authorization_url, sub=sub)
    assert returned.state == started.state
    return returned.state, returned.code


async def complete(
    stub: identity_service_pb2_grpc.IdentityServiceStub, state: str, code: str
) -> identity_service_pb2.CompleteOidcSignInResponse:
    return await stub.CompleteOidcSignIn(identity_service_pb2.CompleteOidcSignInRequest(state=state, code=code))


async def sign_in_with_provider(
    stub: identity_service_pb2_grpc.IdentityServiceStub, browser: httpx.AsyncClient, sub: str
) -> identity_service_pb2.CompleteOidcSignInResponse:
    state, code = await callback(stub, browser, sub)
    return await complete(stub, state, code)


def unique_email() -> str:
    return f"person-{uuid.uuid4().hex[:10]}@example.com"


async def linked_subjects(admin: asyncpg.Connection, user_name: str) -> list[str]:
    user_id = uuid.UUID(user_name.removeprefix("users/"))
    rows = await admin.fetch("SELECT subject FROM identity.oidc_identities WHERE user_id = $1", user_id)
    return sorted(row["subject"] for row in rows)


class TestSignIn:
    async def test_first_sign_in_creates_and_links_a_user_and_the_next_reuses_it(
        self,
        stub: identity_service_pb2_grpc.IdentityServiceStub,
        browser: httpx.AsyncClient,
        provider: OidcProvider,
        admin_conn: asyncpg.Connection,
    ) -> None:
        email = unique_email()
        sub = await provider_user(browser, provider, email=email.upper(), verified=True, name="Grace Hopper")

        first = await sign_in_with_provider(stub, browser, sub)

        assert first.user.email == email
        assert first.user.email_verified is True
        assert first.user.display_name == "Grace Hopper"
        assert first.tokens.access_token
        assert first.tokens.refresh_token
        me = await stub.GetCurrentUser(
            identity_service_pb2.GetCurrentUserRequest(), metadata=bearer(first.tokens.access_token)
        )
        assert me.user.name == first.user.name
        assert await linked_subjects(admin_conn, first.user.name) == [sub]

        second = await sign_in_with_provider(stub, browser, sub)

        assert second.user.name == first.user.name
        assert second.tokens.refresh_token != first.tokens.refresh_token
        sessions = await stub.ListSessions(
            identity_service_pb2.ListSessionsRequest(), metadata=bearer(second.tokens.access_token)
        )
        assert [session.method for session in sessions.sessions] == [f"oidc:{PROVIDER}"] * 2
        assert await linked_subjects(admin_conn, first.user.name) == [sub]

    async def test_start_refuses_an_unknown_provider_and_a_foreign_redirect_uri(
        self, stub: identity_service_pb2_grpc.IdentityServiceStub
    ) -> None:
        _, fields = await fails(
            stub.StartOidcSignIn(
                identity_service_pb2.StartOidcSignInRequest(provider=PROVIDER, redirect_uri="https://evil.example/cb")
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert fields == ["redirect_uri"]
        _, fields = await fails(
            stub.StartOidcSignIn(
                identity_service_pb2.StartOidcSignInRequest(provider="nobody", redirect_uri=REDIRECT_URI)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert fields == ["provider"]


class TestRejections:
    async def test_unknown_state_is_invalid_argument(
        self, stub: identity_service_pb2_grpc.IdentityServiceStub, browser: httpx.AsyncClient, provider: OidcProvider
    ) -> None:
        sub = await provider_user(browser, provider, email=unique_email(), verified=True)
        _, code = await callback(stub, browser, sub)

        _, fields = await fails(complete(stub, "a-state-we-never-issued", code), grpc.StatusCode.INVALID_ARGUMENT)
        assert fields == ["state"]

    async def test_replayed_callback_is_refused(
        self, stub: identity_service_pb2_grpc.IdentityServiceStub, browser: httpx.AsyncClient, provider: OidcProvider
    ) -> None:
        sub = await provider_user(browser, provider, email=unique_email(), verified=True)
        state, code = await callback(stub, browser, sub)
        await complete(stub, state, code)

        # The same callback again: its state is spent.
        _, fields = await fails(complete(stub, state, code), grpc.StatusCode.INVALID_ARGUMENT)
        assert fields == ["state"]
        # The spent code with a fresh state: the provider refuses to redeem it twice.
        fresh = await start(stub)
        reason, _ = await fails(complete(stub, fresh.state, code), grpc.StatusCode.UNAUTHENTICATED)
        assert reason == "OIDC_CODE_REJECTED"

    async def test_wrong_nonce_is_unauthenticated(
        self, stub: identity_service_pb2_grpc.IdentityServiceStub, browser: httpx.AsyncClient, provider: OidcProvider
    ) -> None:
        sub = await provider_user(browser, provider, email=unique_email(), verified=True)
        started = await start(stub)
        # An attacker's authorization request: our state, but a nonce of their own.
        parts = urlsplit(started.authorization_url)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        query["nonce"] = "attacker-chosen-nonce"
        tampered = urlunsplit(parts._replace(query=urlencode(query)))
        returned = await sign_in_at_provider(browser, tampered, sub=sub)

        reason, _ = await fails(complete(stub, returned.state, returned.code), grpc.StatusCode.UNAUTHENTICATED)
        assert reason == "ID_TOKEN_WRONG_NONCE"

    async def test_expired_id_token_is_unauthenticated(
        self,
        stub: identity_service_pb2_grpc.IdentityServiceStub,
        runtime: ServiceRuntime,
        browser: httpx.AsyncClient,
        provider: OidcProvider,
        provider_config: OidcProviderConfig,
    ) -> None:
        sub = await provider_user(browser, provider, email=unique_email(), verified=True)
        state, code = await callback(stub, browser, sub)

        # The provider cannot mint an expired token on demand, so the service's client for this provider
        # reads a clock an hour ahead: the fresh ID token is then long expired.
        async with clock_ahead(runtime, provider_config, timedelta(hours=1)):
            reason, _ = await fails(complete(stub, state, code), grpc.StatusCode.UNAUTHENTICATED)
        assert reason == "ID_TOKEN_EXPIRED"


class TestLinkingByEmail:
    async def test_an_existing_account_is_linked_only_when_the_provider_verified_the_email(
        self,
        stub: identity_service_pb2_grpc.IdentityServiceStub,
        browser: httpx.AsyncClient,
        provider: OidcProvider,
        smtp: SmtpServer,
        admin_conn: asyncpg.Connection,
    ) -> None:
        email = unique_email()
        signed_up = await stub.SignUp(
            identity_service_pb2.SignUpRequest(email=email, password=PASSWORD, display_name="Owner")
        )
        # The account owner proves the address with the mailed link.
        token = await mailed_token(smtp, email, "verify-email")
        await stub.VerifyEmail(identity_service_pb2.VerifyEmailRequest(token=token))

        unverified = await provider_user(browser, provider, email=email, verified=False)
        reason, _ = await fails(sign_in_with_provider(stub, browser, unverified), grpc.StatusCode.FAILED_PRECONDITION)
        assert reason == "OIDC_EMAIL_NOT_VERIFIED"
        assert await linked_subjects(admin_conn, signed_up.user.name) == []

        verified = await provider_user(browser, provider, email=email, verified=True)
        linked = await sign_in_with_provider(stub, browser, verified)

        assert linked.user.name == signed_up.user.name
        assert await linked_subjects(admin_conn, signed_up.user.name) == [verified]
        # The verified owner keeps the password too.
        password_sign_in = await stub.SignIn(identity_service_pb2.SignInRequest(email=email, password=PASSWORD))
        assert password_sign_in.user.name == signed_up.user.name
        again = await sign_in_with_provider(stub, browser, verified)
        assert again.user.name == signed_up.user.name

    async def test_an_unverified_password_account_goes_to_the_verified_email_owner(
        self,
        stub: identity_service_pb2_grpc.IdentityServiceStub,
        browser: httpx.AsyncClient,
        provider: OidcProvider,
    ) -> None:
        email = unique_email()
        squatter = await stub.SignUp(
            identity_service_pb2.SignUpRequest(email=email, password=PASSWORD, display_name="Squatter")
        )
        owner = await provider_user(browser, provider, email=email, verified=True)

        linked = await sign_in_with_provider(stub, browser, owner)

        assert linked.user.name == squatter.user.name
        assert linked.user.email_verified is True
        # Whoever set the password without controlling the address can no longer use it.
        await fails(
            stub.SignIn(identity_service_pb2.SignInRequest(email=email, password=PASSWORD)),
            grpc.StatusCode.UNAUTHENTICATED,
        )


async def mailed_token(smtp: SmtpServer, email: str, path: str) -> str:
    """The token of the link in the mail the service sent to `email` (waits for it)."""
    await eventually(lambda: _value(smtp.to(email)), what=f"a mail to {email}")
    [mail] = smtp.to(email)
    match = re.search(rf"{re.escape(BASE_URL)}/{path}\?\S+", mail.text)
    assert match, mail.text
    return parse_qs(urlsplit(match.group(0)).query)["token"][0]


@contextlib.asynccontextmanager
async def clock_ahead(runtime: ServiceRuntime, config: OidcProviderConfig, offset: timedelta) -> AsyncIterator[None]:
    """Let the service's client of PROVIDER read a clock `offset` ahead, for the duration of the block."""
    servicer = runtime.bindings[0].servicer
    assert isinstance(servicer, IdentityServicer)
    service = servicer.service
    original = service.oidc_clients
    skewed = OidcClient(config, now=lambda: datetime.now(UTC) + offset)
    service.oidc_clients = {**original, PROVIDER: skewed}
    try:
        yield
    finally:
        service.oidc_clients = original
        await skewed.aclose()


async def _value(value: Any) -> Any:
    return value
