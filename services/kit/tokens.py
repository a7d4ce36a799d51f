"""Access tokens: Ed25519-signed JWTs issued by identity and verified locally by every service.

A token's header names its signing key (`kid`); verifiers hold the public keys (the JWKS) in memory,
already decoded, and fetch them again only when a token names a key they do not know, at most once per
`refresh_interval_seconds`. A verified token is remembered (bounded, until it expires) so that the
signature of a token used for many calls is checked once; revocation is checked separately, per call.

Claims: `iss`, `aud`, `sub` (user, or API key), `sid` (session, or API key), `kind` (`user` |
`api_key`), `ws` and `role` (workspace-scoped tokens only), `iat` (with millisecond precision, so that a
membership change can be ordered against a token issued in the same second), `exp`, `jti`.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import grpc
import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from services.kit.authz import ROLES
from services.kit.errors import Unauthenticated, Unavailable
from tessera.identity.v1 import identity_pb2, identity_service_pb2, identity_service_pb2_grpc

ALGORITHM = "EdDSA"
DEFAULT_ISSUER = "tessera"
DEFAULT_AUDIENCE = "tessera"
DEFAULT_TTL = timedelta(minutes=10)
# The longest an access token may live; revocation entries are kept this long (services.kit.revocation).
MAX_TOKEN_LIFETIME = timedelta(hours=1)

KIND_USER = "user"
KIND_API_KEY = "api_key"
TOKEN_KINDS = (KIND_USER, KIND_API_KEY)

# ErrorInfo reasons of rejected tokens (S105: not secrets).
TOKEN_EXPIRED = "TOKEN_EXPIRED"  # noqa: S105  # an error reason, not a secret
TOKEN_INVALID = "TOKEN_INVALID"  # noqa: S105  # an error reason, not a secret

_REQUIRED_CLAIMS = ["exp", "iat", "sub", "sid", "iss", "aud", "jti"]
_ROLES = frozenset(ROLES)

_log = structlog.get_logger("tessera.tokens")


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """The verified content of an access token."""

    subject: str
    session_id: str
    kind: str
    workspace_id: str | None
    role: str | None
    issued_at: datetime
    expires_at: datetime
    token_id: str


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_key_to_jwk(kid: str, key: Ed25519PublicKey) -> dict[str, str]:
    """The JWK (RFC 8037, OKP/Ed25519) of a public key."""
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw), "kid": kid, "alg": ALGORITHM, "use": "sig"}


def jwk_to_public_key(jwk: Mapping[str, str] | identity_pb2.JsonWebKey) -> Ed25519PublicKey:
    """The Ed25519 public key of a JWK (a dict or the identity JsonWebKey message); ValueError if it is not one."""
    if isinstance(jwk, identity_pb2.JsonWebKey):
        kty, crv, x = jwk.kty, jwk.crv, jwk.x
    else:
        kty, crv, x = jwk.get("kty", ""), jwk.get("crv", ""), jwk.get("x", "")
    if kty != "OKP" or crv != "Ed25519":
        raise ValueError(f"not an Ed25519 JWK (kty={kty!r}, crv={crv!r})")
    try:
        raw = _b64url_decode(x)
    except ValueError as exc:
        raise ValueError(f"JWK x is not base64url: {exc}") from None
    if len(raw) != 32:
        raise ValueError("JWK x is not a 32-byte Ed25519 public key")
    return Ed25519PublicKey.from_public_bytes(raw)


def _numeric_date(moment: datetime) -> float:
    """Seconds since the epoch with millisecond precision (a valid JWT NumericDate)."""
    return round(moment.timestamp(), 3)


class TokenSigner:
    """Signs access tokens with one Ed25519 private key (identity's active signing key)."""

    def __init__(
        self,
        private_key: Ed25519PrivateKey,
        *,
        kid: str,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
    ) -> None:
        if not kid:
            raise ValueError("a signing key needs a kid")
        self.kid = kid
        self.issuer = issuer
        self.audience = audience
        self._private_key = private_key
        self._headers = {"kid": kid}

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The public half of the signing key."""
        return self._private_key.public_key()

    def public_jwk(self) -> dict[str, str]:
        """The JWK of the signing key, for the JWKS."""
        return public_key_to_jwk(self.kid, self.public_key)

    def sign(
        self,
        *,
        subject: str,
        session_id: str,
        kind: str = KIND_USER,
        workspace_id: str | None = None,
        role: str | None = None,
        ttl: timedelta = DEFAULT_TTL,
        now: datetime | None = None,
    ) -> tuple[str, datetime]:
        """A signed access token and its expiry; `workspace_id` and `role` come together or not at all."""
        if kind not in TOKEN_KINDS:
            raise ValueError(f"kind must be one of {TOKEN_KINDS}, not {kind!r}")
        if (workspace_id is None) != (role is None):
            raise ValueError("workspace_id and role come together")
        if role is not None and role not in _ROLES:
            raise ValueError(f"unknown role {role!r}")
        if ttl <= timedelta(0) or ttl > MAX_TOKEN_LIFETIME:
            raise ValueError(f"ttl must be positive and at most {MAX_TOKEN_LIFETIME}")
        issued = now or datetime.now(UTC)
        expires = issued + ttl
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "sid": session_id,
            "kind": kind,
            "iat": _numeric_date(issued),
            "exp": int(expires.timestamp()),
            "jti": str(uuid.uuid4()),
        }
        if workspace_id is not None:
            payload["ws"] = workspace_id
            payload["role"] = role
        token = jwt.encode(payload, self._private_key, algorithm=ALGORITHM, headers=self._headers)
        return token, datetime.fromtimestamp(payload["exp"], UTC)


class JwksProvider(Protocol):
    """Where a verifier gets the public keys (kid -> key)."""

    async def keys(self, *, refresh: bool = False) -> Mapping[str, Ed25519PublicKey]: ...


class StaticJwksProvider:
    """A fixed key set (tests, and the identity process verifying its own tokens); `set_keys` replaces it."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey]) -> None:
        self._keys = dict(keys)
        self.fetches = 0

    def set_keys(self, keys: Mapping[str, Ed25519PublicKey]) -> None:
        """Replace the key set (e.g. after a key rotation)."""
        self._keys = dict(keys)

    async def keys(self, *, refresh: bool = False) -> Mapping[str, Ed25519PublicKey]:
        """The current key set; `fetches` counts the calls."""
        self.fetches += 1
        return dict(self._keys)


class GrpcJwksProvider:
    """The key set of the identity service (IdentityService.GetJwks), cached until a refresh is asked for."""

    def __init__(self, address: str, *, timeout: float = 5.0) -> None:
        self.address = address
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._cached: dict[str, Ed25519PublicKey] | None = None

    async def keys(self, *, refresh: bool = False) -> Mapping[str, Ed25519PublicKey]:
        """The identity service's keys; fetched on first use and on refresh."""
        if self._cached is not None and not refresh:
            return self._cached
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address)
        stub = identity_service_pb2_grpc.IdentityServiceStub(self._channel)  # type: ignore[no-untyped-call]  # generated
        response = await stub.GetJwks(identity_service_pb2.GetJwksRequest(), timeout=self.timeout)
        keys: dict[str, Ed25519PublicKey] = {}
        for jwk in response.keys:
            try:
                keys[jwk.kid] = jwk_to_public_key(jwk)
            except ValueError as exc:
                _log.warning("ignoring unusable JWK", kid=jwk.kid, error=str(exc))
        self._cached = keys
        return keys

    async def close(self) -> None:
        """Close the channel to identity."""
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()


class TokenVerifier:
    """Verifies access tokens against a JWKS held in memory; raises Unauthenticated for any bad token."""

    def __init__(
        self,
        provider: JwksProvider,
        *,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        leeway_seconds: float = 5,
        refresh_interval_seconds: float = 5.0,
        cache_size: int = 10_000,
    ) -> None:
        self.provider = provider
        self.issuer = issuer
        self.audience = audience
        self.leeway_seconds = leeway_seconds
        self.refresh_interval_seconds = refresh_interval_seconds
        self._keys: Mapping[str, Ed25519PublicKey] | None = None
        self._last_refresh = float("-inf")
        self._lock = asyncio.Lock()
        self._cache: dict[str, AccessClaims] = {}
        self._cache_size = cache_size
        self._jwt = jwt.PyJWT()
        self._options: Any = {"require": _REQUIRED_CLAIMS}

    async def verify(self, token: str) -> AccessClaims:
        """The claims of a valid token; Unauthenticated (TOKEN_EXPIRED / TOKEN_INVALID) otherwise."""
        claims = self._cache.get(token)
        if claims is not None:
            if claims.expires_at.timestamp() + self.leeway_seconds > time.time():
                return claims
            del self._cache[token]
            raise Unauthenticated("access token expired", reason=TOKEN_EXPIRED)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthenticated("malformed access token", reason=TOKEN_INVALID) from None
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("access token names no signing key", reason=TOKEN_INVALID)
        if header.get("alg") != ALGORITHM:
            raise Unauthenticated("access token uses an unsupported algorithm", reason=TOKEN_INVALID)
        key = await self._key(kid)
        try:
            payload = self._jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_seconds,
                options=self._options,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("access token expired", reason=TOKEN_EXPIRED) from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid access token: {exc}", reason=TOKEN_INVALID) from None
        claims = _claims(payload)
        if len(self._cache) >= self._cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[token] = claims
        return claims

    async def _key(self, kid: str) -> Ed25519PublicKey:
        keys = self._keys
        just_loaded = keys is None
        if keys is None:
            keys = await self._load(refresh=False)
        key = keys.get(kid)
        if key is None and not just_loaded and time.monotonic() - self._last_refresh >= self.refresh_interval_seconds:
            keys = await self._load(refresh=True)
            key = keys.get(kid)
        if key is None:
            raise Unauthenticated("access token signed by an unknown key", reason=TOKEN_INVALID)
        return key

    async def _load(self, *, refresh: bool) -> Mapping[str, Ed25519PublicKey]:
        """Fetch the key set once for all concurrent callers; only refreshes count against the interval."""
        seen = self._last_refresh
        async with self._lock:
            if self._keys is not None and (not refresh or self._last_refresh != seen):
                return self._keys  # another caller loaded it while this one waited
            try:
                keys = await self.provider.keys(refresh=refresh)
            except Exception as exc:
                if refresh:
                    self._last_refresh = time.monotonic()
                _log.warning("cannot fetch signing keys", error=repr(exc))
                if self._keys is None:
                    raise Unavailable("signing keys are unavailable") from None
                return self._keys
            if refresh:
                self._last_refresh = time.monotonic()
            if self._keys is not None and dict(keys) != dict(self._keys):
                self._cache.clear()  # a retired key must stop verifying remembered tokens
            self._keys = dict(keys)
            return self._keys


def _uuid_claim(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str):
        raise Unauthenticated(f"access token claim {name} is not a string", reason=TOKEN_INVALID)
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise Unauthenticated(f"access token claim {name} is not a UUID", reason=TOKEN_INVALID) from None


def _claims(payload: Mapping[str, Any]) -> AccessClaims:
    kind = payload.get("kind", KIND_USER)
    if kind not in TOKEN_KINDS:
        raise Unauthenticated("access token has an unknown kind", reason=TOKEN_INVALID)
    workspace_id = _uuid_claim(payload, "ws") if "ws" in payload else None
    role = payload.get("role")
    if workspace_id is None:
        if role is not None:
            raise Unauthenticated("access token has a role without a workspace", reason=TOKEN_INVALID)
    elif role not in _ROLES:
        raise Unauthenticated("access token has an unknown role", reason=TOKEN_INVALID)
    jti = payload["jti"]
    if not isinstance(jti, str):
        raise Unauthenticated("access token claim jti is not a string", reason=TOKEN_INVALID)
    return AccessClaims(
        subject=_uuid_claim(payload, "sub"),
        session_id=_uuid_claim(payload, "sid"),
        kind=kind,
        workspace_id=workspace_id,
        role=role,
        issued_at=datetime.fromtimestamp(float(payload["iat"]), UTC),
        expires_at=datetime.fromtimestamp(float(payload["exp"]), UTC),
        token_id=jti,
    )
