"""Access tokens: signing, local verification against a JWKS, and every way a token can be bad.

`GrpcJwksProvider` is exercised against a stand-in IdentityService that serves only GetJwks over a real
gRPC server (the identity service proper is tested in tests/identity).
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from services.kit.errors import Unauthenticated, Unavailable
from services.kit.server import ServicerBinding, ServiceRuntime
from services.kit.tokens import (
    MAX_TOKEN_LIFETIME,
    TOKEN_EXPIRED,
    TOKEN_INVALID,
    AccessClaims,
    GrpcJwksProvider,
    TokenSigner,
    TokenVerifier,
    jwk_to_public_key,
    public_key_to_jwk,
)
from tessera.identity.v1 import identity_pb2, identity_service_pb2, identity_service_pb2_grpc
from tests.auth_helpers import TestKeys
from tests.kit.fake_service import kit_settings

pytestmark = pytest.mark.gate("S02")

USER = str(uuid.uuid4())
WORKSPACE = str(uuid.uuid4())


async def rejected(verifier: TokenVerifier, token: str) -> str:
    """Verify a token expected to be refused; the ErrorInfo reason."""
    with pytest.raises(Unauthenticated) as failure:
        await verifier.verify(token)
    return failure.value.reason


# -- signing and verifying ----------------------------------------------------------------------------


async def test_signed_tokens_verify_with_all_their_claims() -> None:
    keys = TestKeys()
    session = str(uuid.uuid4())
    issued = datetime.now(UTC).replace(microsecond=123_000)
    token, expires = keys.signer.sign(
        subject=USER, session_id=session, workspace_id=WORKSPACE, role="member", now=issued
    )
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "kid": keys.kid, "typ": "JWT"}
    claims = await keys.verifier.verify(token)
    assert claims == AccessClaims(
        subject=USER,
        session_id=session,
        kind="user",
        workspace_id=WORKSPACE,
        role="member",
        issued_at=issued,  # millisecond precision survives
        expires_at=expires,
        token_id=claims.token_id,
    )
    assert expires == datetime.fromtimestamp(int((issued + timedelta(minutes=10)).timestamp()), UTC)
    uuid.UUID(claims.token_id)

    user_level = await keys.verifier.verify(keys.user_token(USER))
    assert (user_level.workspace_id, user_level.role, user_level.kind) == (None, None, "user")
    key_id = str(uuid.uuid4())
    api_key = await keys.verifier.verify(keys.api_key_token(key_id, WORKSPACE, "viewer"))
    assert (api_key.subject, api_key.session_id, api_key.kind, api_key.role) == (key_id, key_id, "api_key", "viewer")


def test_signer_refuses_inconsistent_tokens() -> None:
    signer = TestKeys().signer
    session = str(uuid.uuid4())
    with pytest.raises(ValueError, match="together"):
        signer.sign(subject=USER, session_id=session, workspace_id=WORKSPACE)
    with pytest.raises(ValueError, match="together"):
        signer.sign(subject=USER, session_id=session, role="owner")
    with pytest.raises(ValueError, match="unknown role"):
        signer.sign(subject=USER, session_id=session, workspace_id=WORKSPACE, role="root")
    with pytest.raises(ValueError, match="kind"):
        signer.sign(subject=USER, session_id=session, kind="robot")
    with pytest.raises(ValueError, match="ttl"):
        signer.sign(subject=USER, session_id=session, ttl=MAX_TOKEN_LIFETIME + timedelta(seconds=1))


async def test_expired_tokens_are_refused_beyond_the_leeway_only() -> None:
    keys = TestKeys()
    assert await rejected(keys.verifier, keys.expired_token(USER)) == TOKEN_EXPIRED
    now = datetime.now(UTC)
    just_expired = keys.token(USER, ttl=timedelta(minutes=1), now=now - timedelta(minutes=1, seconds=2))
    assert (await keys.verifier.verify(just_expired)).subject == USER  # within the 5 s leeway
    strict = TokenVerifier(keys.provider, leeway_seconds=0)
    assert await rejected(strict, just_expired) == TOKEN_EXPIRED


async def test_a_remembered_token_still_expires() -> None:
    keys = TestKeys()
    verifier = TokenVerifier(keys.provider, leeway_seconds=0)
    token = keys.token(USER, ttl=timedelta(seconds=2))
    await verifier.verify(token)  # verified once, then remembered
    reason = None
    deadline = time.monotonic() + 5
    while reason is None and time.monotonic() < deadline:
        try:
            await verifier.verify(token)
        except Unauthenticated as error:
            reason = error.reason
        await asyncio.sleep(0.05)
    assert reason == TOKEN_EXPIRED, "a remembered token outlived its expiry"


async def test_forged_and_malformed_tokens_are_invalid() -> None:
    keys = TestKeys()
    good = keys.user_token(USER)
    header, payload, signature = good.split(".")
    other_user = base64.urlsafe_b64encode(
        base64.urlsafe_b64decode(payload + "==").replace(USER.encode(), str(uuid.uuid4()).encode())
    )
    tampered = f"{header}.{other_user.rstrip(b'=').decode()}.{signature}"
    for token in (keys.forged_token(USER), tampered, "", "garbage", "a.b.c", f"{header}.{payload}.", good + "x"):
        assert await rejected(keys.verifier, token) == TOKEN_INVALID, token


async def test_other_algorithms_are_refused_even_with_a_known_kid() -> None:
    keys = TestKeys()
    claims = {
        "iss": "tessera",
        "aud": "tessera",
        "sub": USER,
        "sid": str(uuid.uuid4()),
        "iat": int(time.time()),
        "exp": int(time.time()) + 600,
        "jti": "x",
    }
    public_bytes = keys.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    hs256 = jwt.encode(claims, public_bytes, algorithm="HS256", headers={"kid": keys.kid})
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": keys.kid})
    for token in (hs256, unsigned):
        assert await rejected(keys.verifier, token) == TOKEN_INVALID


@pytest.mark.parametrize(
    ("change", "value"),
    [
        ("aud", "another-audience"),
        ("iss", "another-issuer"),
        ("sub", "not-a-uuid"),
        ("sid", None),
        ("exp", None),
        ("iat", None),
        ("jti", None),
        ("kind", "robot"),
        ("role", "owner"),  # a role without a workspace
        ("ws", "not-a-uuid"),
    ],
)
async def test_tokens_with_wrong_or_missing_claims_are_invalid(change: str, value: Any) -> None:
    keys = TestKeys()
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": "tessera",
        "aud": "tessera",
        "sub": USER,
        "sid": str(uuid.uuid4()),
        "kind": "user",
        "iat": now,
        "exp": now + 600,
        "jti": str(uuid.uuid4()),
    }
    if value is None:
        del payload[change]
    else:
        payload[change] = value
    if change == "ws":
        payload["role"] = "viewer"
    token = jwt.encode(payload, keys.private_key, algorithm="EdDSA", headers={"kid": keys.kid})
    assert await rejected(keys.verifier, token) == TOKEN_INVALID


async def test_workspace_tokens_need_a_known_role() -> None:
    keys = TestKeys()
    now = int(time.time())
    payload = {
        "iss": "tessera",
        "aud": "tessera",
        "sub": USER,
        "sid": str(uuid.uuid4()),
        "ws": WORKSPACE,
        "role": "superuser",
        "iat": now,
        "exp": now + 600,
        "jti": str(uuid.uuid4()),
    }
    token = jwt.encode(payload, keys.private_key, algorithm="EdDSA", headers={"kid": keys.kid})
    assert await rejected(keys.verifier, token) == TOKEN_INVALID


async def test_issuer_and_audience_are_configurable() -> None:
    keys = TestKeys(issuer="https://id.example", audience="api")
    token = keys.user_token(USER)
    assert (await keys.verifier.verify(token)).subject == USER
    default = TokenVerifier(keys.provider)
    assert await rejected(default, token) == TOKEN_INVALID


# -- the key set ---------------------------------------------------------------------------------------


async def test_unknown_kid_refreshes_once_then_is_refused_until_the_interval_passes() -> None:
    keys = TestKeys()
    await keys.verifier.verify(keys.user_token(USER))
    assert keys.provider.fetches == 1
    stranger = TestKeys()
    assert await rejected(keys.verifier, stranger.user_token(USER)) == TOKEN_INVALID
    assert keys.provider.fetches == 2
    for _ in range(3):
        assert await rejected(keys.verifier, stranger.user_token(USER)) == TOKEN_INVALID
    assert keys.provider.fetches == 2, "an unknown kid must not refetch the JWKS on every call"


async def test_a_rotated_in_key_is_picked_up_by_one_refresh_shared_by_concurrent_calls() -> None:
    keys = TestKeys()
    await keys.verifier.verify(keys.user_token(USER))
    new_key = Ed25519PrivateKey.generate()
    new_signer = TokenSigner(new_key, kid="rotated")
    keys.provider.set_keys({keys.kid: keys.private_key.public_key(), "rotated": new_key.public_key()})
    tokens = [new_signer.sign(subject=USER, session_id=str(uuid.uuid4()))[0] for _ in range(20)]
    claims = await asyncio.gather(*(keys.verifier.verify(token) for token in tokens))
    assert {c.subject for c in claims} == {USER}
    assert keys.provider.fetches == 2


async def test_a_retired_key_stops_verifying_remembered_tokens_after_a_refresh() -> None:
    keys = TestKeys()
    verifier = TokenVerifier(keys.provider, refresh_interval_seconds=0)
    old = keys.user_token(USER)
    await verifier.verify(old)
    new_key = Ed25519PrivateKey.generate()
    keys.provider.set_keys({"next": new_key.public_key()})
    fresh = TokenSigner(new_key, kid="next").sign(subject=USER, session_id=str(uuid.uuid4()))[0]
    await verifier.verify(fresh)  # unknown kid: refresh
    assert await rejected(verifier, old) == TOKEN_INVALID


class FailingProvider:
    async def keys(self, *, refresh: bool = False) -> Mapping[str, Ed25519PublicKey]:
        raise ConnectionError("identity is down")


async def test_no_key_set_at_all_is_unavailable_not_unauthenticated() -> None:
    verifier = TokenVerifier(FailingProvider())
    with pytest.raises(Unavailable):
        await verifier.verify(TestKeys().user_token(USER))


def test_jwk_round_trip_and_refusals() -> None:
    key = Ed25519PrivateKey.generate().public_key()
    jwk = public_key_to_jwk("k1", key)
    assert jwk["kty"] == "OKP"
    assert (jwk["crv"], jwk["alg"], jwk["use"], jwk["kid"]) == ("Ed25519", "EdDSA", "sig", "k1")
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert jwk_to_public_key(jwk).public_bytes(Encoding.Raw, PublicFormat.Raw) == raw
    message = identity_pb2.JsonWebKey(**jwk)
    assert jwk_to_public_key(message).public_bytes(Encoding.Raw, PublicFormat.Raw) == raw
    for bad in ({**jwk, "kty": "RSA"}, {**jwk, "crv": "X25519"}, {**jwk, "x": jwk["x"][:-4]}, {**jwk, "x": "!!"}):
        with pytest.raises(ValueError):
            jwk_to_public_key(bad)


class JwksOnly(identity_service_pb2_grpc.IdentityServiceServicer):  # type: ignore[misc]  # untyped generated base
    """A stand-in IdentityService serving only GetJwks, with a key set the test changes."""

    def __init__(self, jwks: list[dict[str, str]]) -> None:
        self.jwks = jwks
        self.calls = 0

    async def GetJwks(  # generated method name
        self, request: identity_service_pb2.GetJwksRequest, context: Any
    ) -> identity_service_pb2.GetJwksResponse:
        self.calls += 1
        return identity_service_pb2.GetJwksResponse(keys=[identity_pb2.JsonWebKey(**jwk) for jwk in self.jwks])


async def test_grpc_jwks_provider_fetches_from_identity_and_refreshes_on_a_new_kid() -> None:
    keys = TestKeys()
    identity = JwksOnly([keys.signer.public_jwk(), {"kty": "RSA", "kid": "ignored"}])
    runtime = ServiceRuntime(
        name="identity-jwks",
        settings=kit_settings(auth="disabled"),
        bindings=[
            ServicerBinding(
                "tessera.identity.v1.IdentityService",
                identity,
                identity_service_pb2_grpc.add_IdentityServiceServicer_to_server,
            )
        ],
    )
    port = await runtime.start()
    provider = GrpcJwksProvider(f"127.0.0.1:{port}")
    try:
        verifier = TokenVerifier(provider, refresh_interval_seconds=0)
        assert (await verifier.verify(keys.user_token(USER))).subject == USER
        await verifier.verify(keys.user_token(USER))
        assert identity.calls == 1
        assert set(await provider.keys()) == {keys.kid}

        rotated = TestKeys()
        identity.jwks = [keys.signer.public_jwk(), rotated.signer.public_jwk()]
        assert (await verifier.verify(rotated.user_token(USER))).subject == USER
        assert identity.calls == 2
    finally:
        await provider.close()
        await runtime.stop()


async def test_grpc_jwks_provider_reports_an_unreachable_identity() -> None:
    provider = GrpcJwksProvider("127.0.0.1:1", timeout=0.5)
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await provider.keys()
        with pytest.raises(Unavailable):
            await TokenVerifier(provider).verify(TestKeys().user_token(USER))
    finally:
        await provider.close()
