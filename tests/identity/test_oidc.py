"""OidcClient against a real OpenID provider on loopback (oidc-provider-mock, PKCE enforced): gate S02.

Every ID token here was issued by the provider over HTTP; the negative cases change one thing each
(the verifier, the nonce, the clock, the audience, the issuer host, the signature) and assert the
distinct reason the identity service maps to UNAUTHENTICATED.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from services.identity.oidc import (
    ID_TOKEN_EXPIRED,
    ID_TOKEN_INVALID_SIGNATURE,
    ID_TOKEN_MALFORMED,
    ID_TOKEN_NOT_YET_VALID,
    ID_TOKEN_WRONG_AUDIENCE,
    ID_TOKEN_WRONG_ISSUER,
    ID_TOKEN_WRONG_NONCE,
    OIDC_CLIENT_REJECTED,
    OIDC_CODE_REJECTED,
    OIDC_DISCOVERY_FAILED,
    OIDC_PROVIDER_UNAVAILABLE,
    AuthorizationRequest,
    OidcClient,
    OidcProviderConfig,
    TokenResponse,
    code_challenge_s256,
    state_hash,
)
from services.kit.errors import InvalidArgument, Unauthenticated, Unavailable
from tessera_cli.embedded import free_port
from tests.identity.oidc_provider import (
    OidcProvider,
    RegisteredClient,
    register_client,
    running_provider,
    set_user,
    sign_in_at_provider,
)

pytestmark = pytest.mark.gate("S02")

REDIRECT_URI = "https://app.tessera.test/oidc/callback"
TOKEN_MAX_AGE = 300
LEEWAY = timedelta(seconds=30)


@pytest.fixture(scope="module")
def provider() -> Iterator[OidcProvider]:
    with running_provider(token_max_age=TOKEN_MAX_AGE) as running:
        yield running


class RequestLog:
    """Paths of the HTTP requests an OidcClient made (an httpx event hook on a real client)."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, request: httpx.Request) -> None:
        self.paths.append(request.url.path)

    def count(self, path: str) -> int:
        return self.paths.count(path)


@pytest.fixture
def requests_made() -> RequestLog:
    return RequestLog()


@pytest.fixture
async def http(requests_made: RequestLog) -> AsyncIterator[httpx.AsyncClient]:
    """The HTTP client of the relying party (requests are logged)."""
    async with httpx.AsyncClient(timeout=10, event_hooks={"request": [requests_made]}) as client:
        yield client


@pytest.fixture
async def browser() -> AsyncIterator[httpx.AsyncClient]:
    """The user's browser at the provider (and the test's own calls to the provider)."""
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


@pytest.fixture
async def registered(browser: httpx.AsyncClient, provider: OidcProvider) -> RegisteredClient:
    return await register_client(browser, provider, redirect_uris=[REDIRECT_URI])


def config_for(issuer: str, client: RegisteredClient, **overrides: Any) -> OidcProviderConfig:
    return OidcProviderConfig(
        issuer=issuer,
        client_id=client.client_id,
        client_secret=client.client_secret,
        redirect_uris=(REDIRECT_URI,),
        **overrides,
    )


@pytest.fixture
def oidc(provider: OidcProvider, registered: RegisteredClient, http: httpx.AsyncClient) -> OidcClient:
    return OidcClient(config_for(provider.issuer, registered), http=http)


@pytest.fixture
async def alice(browser: httpx.AsyncClient, provider: OidcProvider) -> str:
    """A provider user with a verified email and a name; returns the subject."""
    sub = f"alice-{uuid.uuid4().hex[:8]}"
    await set_user(browser, provider, sub, {"email": f"{sub}@example.com", "email_verified": True, "name": "Alice"})
    return sub


async def sign_in(client: OidcClient, browser: httpx.AsyncClient, sub: str) -> tuple[AuthorizationRequest, str]:
    """Start a sign-in, let the user approve it at the provider; the request and the callback's code."""
    request = await client.authorization_request(REDIRECT_URI)
    callback = await sign_in_at_provider(browser, request.url, sub=sub)
    assert callback.state == request.state
    assert callback.redirect_uri == REDIRECT_URI
    return request, callback.code


async def issued_tokens(client: OidcClient, browser: httpx.AsyncClient, sub: str) -> tuple[TokenResponse, str]:
    """A real token response for `client`, and the nonce of its sign-in."""
    request, code = await sign_in(client, browser, sub)
    tokens = await client.exchange_code(code=code, redirect_uri=REDIRECT_URI, code_verifier=request.code_verifier)
    return tokens, request.nonce


def clock(offset: timedelta) -> Any:
    return lambda: datetime.now(UTC) + offset


async def assert_rejected(reason: str, call: Any) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as info:
        await call
    assert info.value.reason == reason, info.value.message
    return info.value


class TestSignIn:
    async def test_happy_path_returns_the_verified_identity(
        self, oidc: OidcClient, browser: httpx.AsyncClient, provider: OidcProvider, alice: str
    ) -> None:
        request, code = await sign_in(oidc, browser, alice)

        identity = await oidc.complete(
            code=code, redirect_uri=REDIRECT_URI, code_verifier=request.code_verifier, expected_nonce=request.nonce
        )

        assert identity.issuer == provider.issuer
        assert identity.subject == alice
        assert identity.email == f"{alice}@example.com"
        assert identity.email_verified is True
        assert identity.name == "Alice"

    async def test_authorization_url_carries_pkce_s256_state_and_nonce(
        self, oidc: OidcClient, provider: OidcProvider, registered: RegisteredClient
    ) -> None:
        first = await oidc.authorization_request(REDIRECT_URI)
        second = await oidc.authorization_request(REDIRECT_URI)

        query = {key: values[0] for key, values in parse_qs(urlsplit(first.url).query).items()}
        assert first.url.startswith(f"{provider.issuer}/oauth2/authorize?")
        assert query["response_type"] == "code"
        assert query["client_id"] == registered.client_id
        assert query["redirect_uri"] == REDIRECT_URI
        assert set(query["scope"].split()) == {"openid", "email", "profile"}
        assert query["state"] == first.state
        assert query["nonce"] == first.nonce
        assert query["code_challenge_method"] == "S256"
        assert query["code_challenge"] == code_challenge_s256(first.code_verifier)
        assert first.code_verifier not in first.url
        assert 43 <= len(first.code_verifier) <= 128
        assert {first.state, first.nonce, first.code_verifier}.isdisjoint(
            {second.state, second.nonce, second.code_verifier}
        )

    async def test_unverified_email_is_reported_as_unverified(
        self, oidc: OidcClient, browser: httpx.AsyncClient, provider: OidcProvider
    ) -> None:
        sub = f"bob-{uuid.uuid4().hex[:8]}"
        await set_user(browser, provider, sub, {"email": f"{sub}@example.com", "email_verified": False})
        request, code = await sign_in(oidc, browser, sub)

        identity = await oidc.complete(
            code=code, redirect_uri=REDIRECT_URI, code_verifier=request.code_verifier, expected_nonce=request.nonce
        )

        assert identity.email == f"{sub}@example.com"
        assert identity.email_verified is False
        assert identity.name is None

    async def test_discovery_and_jwks_are_fetched_once(
        self, oidc: OidcClient, browser: httpx.AsyncClient, alice: str, requests_made: RequestLog
    ) -> None:
        for _ in range(2):
            request, code = await sign_in(oidc, browser, alice)
            await oidc.complete(
                code=code, redirect_uri=REDIRECT_URI, code_verifier=request.code_verifier, expected_nonce=request.nonce
            )

        assert requests_made.count("/.well-known/openid-configuration") == 1
        assert requests_made.count("/jwks") == 1
        assert requests_made.count("/oauth2/token") == 2

    def test_state_hash_is_a_stable_digest(self) -> None:
        assert state_hash("abc") == state_hash("abc")
        assert state_hash("abc") != state_hash("abd")
        assert len(state_hash("abc")) == 32
        assert b"abc" not in state_hash("abc")


class TestRejections:
    async def test_redirect_uri_not_allowed(self, oidc: OidcClient, requests_made: RequestLog) -> None:
        with pytest.raises(InvalidArgument) as info:
            await oidc.authorization_request("https://evil.example/callback")
        assert [violation.field for violation in info.value.violations] == ["redirect_uri"]
        assert requests_made.paths == []

        with pytest.raises(InvalidArgument) as info:
            await oidc.complete(
                code="x", redirect_uri="https://evil.example/callback", code_verifier="v", expected_nonce="n"
            )
        assert [violation.field for violation in info.value.violations] == ["redirect_uri"]

    async def test_wrong_code_verifier_is_rejected_by_the_provider(
        self, oidc: OidcClient, browser: httpx.AsyncClient, alice: str
    ) -> None:
        request, code = await sign_in(oidc, browser, alice)
        other_verifier = (await oidc.authorization_request(REDIRECT_URI)).code_verifier

        await assert_rejected(
            OIDC_CODE_REJECTED,
            oidc.complete(
                code=code, redirect_uri=REDIRECT_URI, code_verifier=other_verifier, expected_nonce=request.nonce
            ),
        )
        # The code itself was good: only the PKCE proof was wrong.
        identity = await oidc.complete(
            code=code, redirect_uri=REDIRECT_URI, code_verifier=request.code_verifier, expected_nonce=request.nonce
        )
        assert identity.subject == alice

    async def test_replayed_code_is_rejected(self, oidc: OidcClient, browser: httpx.AsyncClient, alice: str) -> None:
        request, code = await sign_in(oidc, browser, alice)
        await oidc.complete(
            code=code, redirect_uri=REDIRECT_URI, code_verifier=request.code_verifier, expected_nonce=request.nonce
        )

        error = await assert_rejected(
            OIDC_CODE_REJECTED,
            oidc.complete(
                code=code, redirect_uri=REDIRECT_URI, code_verifier=request.code_verifier, expected_nonce=request.nonce
            ),
        )
        assert error.metadata["error"] == "invalid_grant"

    async def test_wrong_nonce_is_rejected(self, oidc: OidcClient, browser: httpx.AsyncClient, alice: str) -> None:
        request, code = await sign_in(oidc, browser, alice)
        other_nonce = (await oidc.authorization_request(REDIRECT_URI)).nonce

        await assert_rejected(
            ID_TOKEN_WRONG_NONCE,
            oidc.complete(
                code=code, redirect_uri=REDIRECT_URI, code_verifier=request.code_verifier, expected_nonce=other_nonce
            ),
        )

    async def test_expired_id_token_is_rejected(
        self,
        oidc: OidcClient,
        browser: httpx.AsyncClient,
        http: httpx.AsyncClient,
        provider: OidcProvider,
        registered: RegisteredClient,
        alice: str,
    ) -> None:
        tokens, nonce = await issued_tokens(oidc, browser, alice)
        lifetime = timedelta(seconds=TOKEN_MAX_AGE)
        config = config_for(provider.issuer, registered)
        almost = OidcClient(config, http=http, now=clock(lifetime + LEEWAY - timedelta(seconds=10)))
        later = OidcClient(config, http=http, now=clock(lifetime + LEEWAY + timedelta(seconds=5)))

        assert (await almost.verify_id_token(tokens.id_token, expected_nonce=nonce)).subject == alice
        await assert_rejected(ID_TOKEN_EXPIRED, later.verify_id_token(tokens.id_token, expected_nonce=nonce))

    async def test_id_token_issued_in_the_future_is_rejected(
        self,
        oidc: OidcClient,
        browser: httpx.AsyncClient,
        http: httpx.AsyncClient,
        provider: OidcProvider,
        registered: RegisteredClient,
        alice: str,
    ) -> None:
        tokens, nonce = await issued_tokens(oidc, browser, alice)
        earlier = OidcClient(
            config_for(provider.issuer, registered), http=http, now=clock(-LEEWAY - timedelta(seconds=60))
        )

        await assert_rejected(ID_TOKEN_NOT_YET_VALID, earlier.verify_id_token(tokens.id_token, expected_nonce=nonce))

    async def test_id_token_of_another_client_is_rejected(
        self,
        oidc: OidcClient,
        browser: httpx.AsyncClient,
        http: httpx.AsyncClient,
        provider: OidcProvider,
        alice: str,
    ) -> None:
        other = await register_client(browser, provider, redirect_uris=[REDIRECT_URI])
        other_client = OidcClient(config_for(provider.issuer, other), http=http)
        tokens, nonce = await issued_tokens(other_client, browser, alice)

        await assert_rejected(ID_TOKEN_WRONG_AUDIENCE, oidc.verify_id_token(tokens.id_token, expected_nonce=nonce))

    async def test_id_token_of_another_issuer_is_rejected(
        self,
        oidc: OidcClient,
        browser: httpx.AsyncClient,
        http: httpx.AsyncClient,
        provider: OidcProvider,
        registered: RegisteredClient,
        alice: str,
    ) -> None:
        # The provider names itself after the host it is reached by: the same keys, another issuer.
        elsewhere = OidcClient(config_for(f"http://localhost:{provider.port}", registered), http=http)
        tokens, nonce = await issued_tokens(elsewhere, browser, alice)
        assert jwt.decode(tokens.id_token, options={"verify_signature": False})["iss"] != provider.issuer

        await assert_rejected(ID_TOKEN_WRONG_ISSUER, oidc.verify_id_token(tokens.id_token, expected_nonce=nonce))

    async def test_tampered_and_forged_signatures_are_rejected(
        self,
        oidc: OidcClient,
        browser: httpx.AsyncClient,
        provider: OidcProvider,
        alice: str,
        requests_made: RequestLog,
    ) -> None:
        tokens, nonce = await issued_tokens(oidc, browser, alice)
        claims = jwt.decode(tokens.id_token, options={"verify_signature": False})
        provider_kid = (await browser.get(f"{provider.issuer}/jwks")).json()["keys"][0]["kid"]
        attacker_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

        header, _, signature = tokens.id_token.split(".")
        changed = base64.urlsafe_b64encode(json.dumps({**claims, "sub": "mallory"}).encode()).rstrip(b"=").decode()
        tampered = f"{header}.{changed}.{signature}"
        forged = jwt.encode(claims, attacker_key, algorithm="RS256", headers={"kid": provider_kid})
        forged_no_kid = jwt.encode(claims, attacker_key, algorithm="RS256")
        unsigned = jwt.encode(claims, None, algorithm="none")
        hmac_signed = jwt.encode(claims, "a-shared-secret-of-enough-length-for-hs256", algorithm="HS256")

        for token in (tampered, forged, forged_no_kid, unsigned, hmac_signed):
            await assert_rejected(ID_TOKEN_INVALID_SIGNATURE, oidc.verify_id_token(token, expected_nonce=nonce))
        await assert_rejected(ID_TOKEN_MALFORMED, oidc.verify_id_token("not-a-jwt", expected_nonce=nonce))
        # The genuine token still verifies.
        assert (await oidc.verify_id_token(tokens.id_token, expected_nonce=nonce)).subject == alice
        assert requests_made.count("/jwks") == 1

    async def test_unknown_key_id_refreshes_the_jwks_once(
        self,
        provider: OidcProvider,
        registered: RegisteredClient,
        browser: httpx.AsyncClient,
        http: httpx.AsyncClient,
        alice: str,
        requests_made: RequestLog,
    ) -> None:
        client = OidcClient(
            config_for(provider.issuer, registered), http=http, jwks_refresh_interval=timedelta(seconds=0)
        )
        tokens, nonce = await issued_tokens(client, browser, alice)
        claims = jwt.decode(tokens.id_token, options={"verify_signature": False})
        attacker_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        rotated = jwt.encode(claims, attacker_key, algorithm="RS256", headers={"kid": "not-published"})
        assert (await client.verify_id_token(tokens.id_token, expected_nonce=nonce)).subject == alice
        assert requests_made.count("/jwks") == 1

        await assert_rejected(ID_TOKEN_INVALID_SIGNATURE, client.verify_id_token(rotated, expected_nonce=nonce))
        assert requests_made.count("/jwks") == 2

        throttled = OidcClient(config_for(provider.issuer, registered), http=http)
        await throttled.verify_id_token(tokens.id_token, expected_nonce=nonce)
        before = requests_made.count("/jwks")
        for _ in range(3):
            await assert_rejected(ID_TOKEN_INVALID_SIGNATURE, throttled.verify_id_token(rotated, expected_nonce=nonce))
        assert requests_made.count("/jwks") == before  # fetched just now: no refresh storm

    async def test_wrong_client_secret_is_a_configuration_error(
        self,
        provider: OidcProvider,
        registered: RegisteredClient,
        browser: httpx.AsyncClient,
        http: httpx.AsyncClient,
        alice: str,
    ) -> None:
        wrong = RegisteredClient(client_id=registered.client_id, client_secret="not-the-secret")
        client = OidcClient(config_for(provider.issuer, wrong), http=http)
        request, code = await sign_in(client, browser, alice)

        with pytest.raises(Unavailable) as info:
            await client.complete(
                code=code, redirect_uri=REDIRECT_URI, code_verifier=request.code_verifier, expected_nonce=request.nonce
            )
        assert info.value.reason == OIDC_CLIENT_REJECTED


class TestProviderProblems:
    async def test_unreachable_provider_is_unavailable(
        self, registered: RegisteredClient, http: httpx.AsyncClient
    ) -> None:
        client = OidcClient(config_for(f"http://127.0.0.1:{free_port()}", registered), http=http)
        with pytest.raises(Unavailable) as info:
            await client.authorization_request(REDIRECT_URI)
        assert info.value.reason == OIDC_PROVIDER_UNAVAILABLE

    async def test_discovery_naming_another_issuer_is_refused(
        self, provider: OidcProvider, registered: RegisteredClient, http: httpx.AsyncClient
    ) -> None:
        client = OidcClient(config_for(provider.issuer + "/", registered), http=http)
        with pytest.raises(Unavailable) as info:
            await client.authorization_request(REDIRECT_URI)
        assert info.value.reason == OIDC_DISCOVERY_FAILED

    async def test_client_owns_its_http_client_when_none_is_given(
        self, provider: OidcProvider, registered: RegisteredClient
    ) -> None:
        client = OidcClient(config_for(provider.issuer, registered))
        try:
            request = await client.authorization_request(REDIRECT_URI)
            assert request.url.startswith(provider.issuer)
        finally:
            await client.aclose()


class TestConfig:
    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("issuer", "http://accounts.example.com"),
            ("issuer", "ftp://accounts.example.com"),
            ("issuer", "https://accounts.example.com?x=1"),
            ("scopes", "email profile"),
            ("redirect_uris", ()),
            ("redirect_uris", ("/relative/callback",)),
        ],
    )
    def test_invalid_settings_are_refused(self, field: str, value: object) -> None:
        values: dict[str, Any] = {
            "issuer": "https://accounts.example.com",
            "client_id": "tessera",
            "redirect_uris": (REDIRECT_URI,),
        }
        values[field] = value
        with pytest.raises(ValidationError) as info:
            OidcProviderConfig(**values)
        assert info.value.errors()[0]["loc"][0] == field

    def test_loopback_http_issuer_and_defaults(self) -> None:
        config = OidcProviderConfig(issuer="http://127.0.0.1:9400", client_id="c", redirect_uris=(REDIRECT_URI,))
        assert config.scopes == "openid email profile"
        assert config.client_secret is None
