"""OpenID Connect sign-in as a relying party: authorization code flow with PKCE (S256), state and nonce.

Interface (used by the identity service; one `OidcClient` per configured provider, kept for the process).
Providers come from IdentitySettings.oidc_providers, i.e. TESSERA_OIDC_PROVIDERS as JSON:
`{"google": {"issuer": "https://accounts.google.com", "client_id": "...", "client_secret": "...",
"redirect_uris": ["https://app.example.com/oidc/callback"]}}` (`scopes` defaults to "openid email profile").

    config = OidcProviderConfig(issuer=..., client_id=..., client_secret=..., redirect_uris=(...,))
    client = OidcClient(config, http=shared_httpx_client)     # `now` is injectable for tests
    await client.aclose()                                     # closes the HTTP client only if it made it

  StartOidcSignIn:
    request = await client.authorization_request(redirect_uri)
        -> AuthorizationRequest(url, state, nonce, code_verifier)
        raises InvalidArgument (field `redirect_uri`) if not in the allow-list, Unavailable if discovery fails.
    Store `state_hash(request.state)` (32 bytes, never the state), `request.nonce`, `request.code_verifier`, the
    provider id and the redirect_uri with an expiry; return `request.url` and `request.state`.

  CompleteOidcSignIn:
    Look the login up by `state_hash(state)` and mark it used in one statement (unknown, used or expired
    -> InvalidArgument naming `state`); then, outside any transaction (it calls the provider):
    identity = await client.complete(code=..., redirect_uri=login.redirect_uri,
                                     code_verifier=login.code_verifier, expected_nonce=login.nonce)
        -> VerifiedIdentity(issuer, subject, email, email_verified, name)
        raises Unauthenticated with reason OIDC_CODE_REJECTED (the provider refused the code: replayed,
        expired, PKCE mismatch, wrong redirect_uri), ID_TOKEN_MALFORMED, ID_TOKEN_INVALID_SIGNATURE,
        ID_TOKEN_WRONG_ISSUER, ID_TOKEN_WRONG_AUDIENCE, ID_TOKEN_EXPIRED, ID_TOKEN_NOT_YET_VALID or
        ID_TOKEN_WRONG_NONCE; Unavailable (OIDC_PROVIDER_UNAVAILABLE, OIDC_DISCOVERY_FAILED,
        OIDC_CLIENT_REJECTED) when the provider cannot be reached, publishes unusable metadata or
        rejects our client credentials (a configuration problem, logged as an error).
    Link accounts by `(issuer, subject)`; link to an existing account by email only when
    `identity.email_verified` is true. `email` is as the provider sent it (compare lower-cased).

Discovery (`{issuer}/.well-known/openid-configuration`, whose `issuer` must equal the configured one)
and the provider's JWKS are cached; the JWKS is fetched again when an ID token names an unknown key
(at most once per `jwks_refresh_interval`). Client authentication at the token endpoint follows the
provider metadata: `client_secret_basic` (the default), else `client_secret_post`, or `none` for a
public client without a secret. Only asymmetric ID-token signatures are accepted (never `none` or HMAC).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import jwt
import structlog
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from services.kit.errors import InvalidArgument, Unauthenticated, Unavailable

# ErrorInfo reasons (S105: not secrets).
OIDC_CODE_REJECTED = "OIDC_CODE_REJECTED"
ID_TOKEN_MALFORMED = "ID_TOKEN_MALFORMED"  # noqa: S105  # a name, not a secret
ID_TOKEN_INVALID_SIGNATURE = "ID_TOKEN_INVALID_SIGNATURE"  # noqa: S105  # a name, not a secret
ID_TOKEN_WRONG_ISSUER = "ID_TOKEN_WRONG_ISSUER"  # noqa: S105  # a name, not a secret
ID_TOKEN_WRONG_AUDIENCE = "ID_TOKEN_WRONG_AUDIENCE"  # noqa: S105  # a name, not a secret
ID_TOKEN_EXPIRED = "ID_TOKEN_EXPIRED"  # noqa: S105  # a name, not a secret
ID_TOKEN_NOT_YET_VALID = "ID_TOKEN_NOT_YET_VALID"  # noqa: S105  # a name, not a secret
ID_TOKEN_WRONG_NONCE = "ID_TOKEN_WRONG_NONCE"  # noqa: S105  # a name, not a secret
OIDC_PROVIDER_UNAVAILABLE = "OIDC_PROVIDER_UNAVAILABLE"
OIDC_DISCOVERY_FAILED = "OIDC_DISCOVERY_FAILED"
OIDC_CLIENT_REJECTED = "OIDC_CLIENT_REJECTED"

DISCOVERY_PATH = "/.well-known/openid-configuration"
DEFAULT_SCOPES = "openid email profile"
# Asymmetric JWS algorithms and the JWK key type each needs; `none` and HMAC are never accepted.
ALGORITHM_KEY_TYPES: Mapping[str, str] = {
    **{alg: "RSA" for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    **{alg: "EC" for alg in ("ES256", "ES384", "ES512")},
    "EdDSA": "OKP",
}
# Token endpoint errors that mean "our client is misconfigured" rather than "this code is bad".
_CLIENT_ERRORS = frozenset({"invalid_client", "unauthorized_client", "unsupported_grant_type"})
_LOOPBACK_NAMES = frozenset({"localhost"})

log = structlog.get_logger("tessera.identity.oidc")


def state_hash(state: str) -> bytes:
    """The SHA-256 digest (32 bytes) of an OIDC `state`: the only form in which it is stored."""
    return hashlib.sha256(state.encode()).digest()


def code_challenge_s256(code_verifier: str) -> str:
    """The PKCE S256 challenge of a verifier (RFC 7636 section 4.2)."""
    digest = hashlib.sha256(code_verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OidcProviderConfig(BaseModel):
    """One OpenID provider this deployment trusts, and the client registered there."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    issuer: str = Field(description="issuer URL exactly as the provider publishes it (https, or http on loopback)")
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = Field(default=None, description="unset for a public client (PKCE only)")
    redirect_uris: tuple[str, ...] = Field(min_length=1, description="callback URLs a sign-in may return to")
    scopes: str = DEFAULT_SCOPES

    @field_validator("issuer")
    @classmethod
    def _issuer_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("must be an https:// URL")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError("must be https:// (http:// only on loopback, for local development and tests)")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return value

    @field_validator("redirect_uris")
    @classmethod
    def _absolute_uris(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for uri in value:
            parts = urlsplit(uri)
            if parts.scheme not in ("https", "http") or not parts.hostname or parts.fragment:
                raise ValueError(f"{uri!r} must be an absolute http(s) URL without a fragment")
        return value

    @field_validator("scopes")
    @classmethod
    def _openid_scope(cls, value: str) -> str:
        if "openid" not in value.split():
            raise ValueError("must include `openid`")
        return value


@dataclass(frozen=True)
class AuthorizationRequest:
    """Where to send the browser, and the secrets of this one sign-in (keep them server-side)."""

    url: str
    state: str
    nonce: str
    code_verifier: str


@dataclass(frozen=True)
class VerifiedIdentity:
    """The end user as asserted by a validated ID token."""

    issuer: str
    subject: str
    email: str | None
    email_verified: bool
    name: str | None


@dataclass(frozen=True)
class TokenResponse:
    """The token endpoint's answer to a code exchange."""

    id_token: str
    access_token: str | None
    raw: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True)
class ProviderMetadata:
    """The parts of the discovery document the client uses."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    token_endpoint_auth_methods: tuple[str, ...]
    signing_algorithms: tuple[str, ...]


@dataclass(frozen=True)
class _Key:
    kid: str | None
    kty: str
    alg: str | None
    key: Any  # a cryptography public key


def _utcnow() -> datetime:
    return datetime.now(UTC)


class OidcClient:
    """A relying party of one OpenID provider (discovery, authorization URL, code exchange, ID token checks)."""

    def __init__(
        self,
        config: OidcProviderConfig,
        *,
        http: httpx.AsyncClient | None = None,
        now: Callable[[], datetime] = _utcnow,
        leeway: timedelta = timedelta(seconds=30),
        metadata_ttl: timedelta = timedelta(hours=1),
        jwks_ttl: timedelta = timedelta(hours=1),
        jwks_refresh_interval: timedelta = timedelta(seconds=10),
        timeout: float = 10.0,
    ) -> None:
        self.config = config
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=timeout)
        self._now = now
        self._leeway = leeway.total_seconds()
        self._metadata_ttl = metadata_ttl.total_seconds()
        self._jwks_ttl = jwks_ttl.total_seconds()
        self._jwks_refresh_interval = jwks_refresh_interval.total_seconds()
        self._metadata: ProviderMetadata | None = None
        self._metadata_at = 0.0
        self._metadata_lock = asyncio.Lock()
        self._keys: tuple[_Key, ...] | None = None
        self._keys_at = 0.0
        self._keys_lock = asyncio.Lock()

    async def aclose(self) -> None:
        """Close the HTTP client if this OidcClient created it."""
        if self._owns_http:
            await self._http.aclose()

    def check_redirect_uri(self, redirect_uri: str) -> None:
        """InvalidArgument naming `redirect_uri` unless it is in the provider's allow-list (exact match)."""
        if redirect_uri not in self.config.redirect_uris:
            raise InvalidArgument.for_field("redirect_uri", "is not an allowed redirect URI for this provider")

    async def authorization_request(self, redirect_uri: str) -> AuthorizationRequest:
        """A fresh authorization URL with random state and nonce and a PKCE (S256) challenge."""
        self.check_redirect_uri(redirect_uri)
        metadata = await self.metadata()
        state = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(32)
        code_verifier = secrets.token_urlsafe(64)  # 86 characters of [A-Za-z0-9_-], within RFC 7636's 43..128
        params = {
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": redirect_uri,
            "scope": self.config.scopes,
            "state": state,
            "nonce": nonce,
            "code_challenge": code_challenge_s256(code_verifier),
            "code_challenge_method": "S256",
        }
        url = httpx.URL(metadata.authorization_endpoint).copy_merge_params(params)
        return AuthorizationRequest(url=str(url), state=state, nonce=nonce, code_verifier=code_verifier)

    async def complete(
        self, *, code: str, redirect_uri: str, code_verifier: str, expected_nonce: str
    ) -> VerifiedIdentity:
        """Exchange the callback's code and validate the ID token; the identity it asserts."""
        tokens = await self.exchange_code(code=code, redirect_uri=redirect_uri, code_verifier=code_verifier)
        return await self.verify_id_token(tokens.id_token, expected_nonce=expected_nonce)

    async def exchange_code(self, *, code: str, redirect_uri: str, code_verifier: str) -> TokenResponse:
        """Redeem an authorization code at the token endpoint (client authentication per the metadata)."""
        self.check_redirect_uri(redirect_uri)
        metadata = await self.metadata()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }
        headers = {"accept": "application/json"}
        method = self._auth_method(metadata)
        secret = self.config.client_secret.get_secret_value() if self.config.client_secret else ""
        if method == "client_secret_basic":
            # RFC 6749 section 2.3.1: both parts form-encoded before the Basic encoding.
            pair = f"{quote(self.config.client_id, safe='')}:{quote(secret, safe='')}"
            headers["authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        elif method == "client_secret_post":
            form |= {"client_id": self.config.client_id, "client_secret": secret}
        else:
            form["client_id"] = self.config.client_id
        try:
            response = await self._http.post(metadata.token_endpoint, data=form, headers=headers)
        except httpx.HTTPError as error:
            raise self._unreachable("token endpoint", error) from error
        body = _json_object(response)
        if response.status_code != 200:
            error_code = str(body.get("error", "")) if body else ""
            description = str(body.get("error_description", ""))[:200] if body else ""
            if response.status_code >= 500 or (not error_code and response.status_code not in (400, 401)):
                log.warning("oidc token endpoint failed", issuer=self.config.issuer, status=response.status_code)
                raise Unavailable(
                    "the OIDC provider failed to exchange the code",
                    reason=OIDC_PROVIDER_UNAVAILABLE,
                    metadata={"issuer": self.config.issuer},
                )
            if error_code in _CLIENT_ERRORS:
                log.error(
                    "oidc provider rejected our client credentials",
                    issuer=self.config.issuer,
                    error=error_code,
                    description=description,
                )
                raise Unavailable(
                    "the OIDC provider rejected this deployment's client credentials",
                    reason=OIDC_CLIENT_REJECTED,
                    metadata={"issuer": self.config.issuer},
                )
            log.info("oidc code rejected", issuer=self.config.issuer, error=error_code, description=description)
            raise Unauthenticated(
                "the OIDC provider rejected the authorization code",
                reason=OIDC_CODE_REJECTED,
                metadata={"issuer": self.config.issuer, "error": error_code or "unknown"},
            )
        id_token = body.get("id_token") if body else None
        if not isinstance(id_token, str) or not id_token:
            raise Unauthenticated("the OIDC provider returned no ID token", reason=ID_TOKEN_MALFORMED)
        access_token = body.get("access_token") if body else None
        return TokenResponse(
            id_token=id_token,
            access_token=access_token if isinstance(access_token, str) else None,
            raw=body or {},
        )

    async def verify_id_token(self, id_token: str, *, expected_nonce: str) -> VerifiedIdentity:
        """Validate signature (provider JWKS), issuer, audience/azp, expiry/issued-at and nonce of an ID token."""
        metadata = await self.metadata()
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError as error:
            raise _invalid("the ID token is not a JWS", ID_TOKEN_MALFORMED) from error
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHM_KEY_TYPES or alg not in metadata.signing_algorithms:
            raise _invalid(f"ID token algorithm {alg!r} is not accepted", ID_TOKEN_INVALID_SIGNATURE)
        kid = header.get("kid")
        key = await self._signing_key(kid if isinstance(kid, str) else None, alg)
        if key is None:
            raise _invalid("no provider key matches the ID token", ID_TOKEN_INVALID_SIGNATURE)
        try:
            claims = jwt.decode(
                id_token,
                key.key,
                algorithms=[alg],
                # Only the signature here: each claim is checked below with its own error reason and
                # against the injectable clock.
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.InvalidSignatureError as error:
            raise _invalid("the ID token signature is invalid", ID_TOKEN_INVALID_SIGNATURE) from error
        except jwt.PyJWTError as error:
            raise _invalid("the ID token cannot be decoded", ID_TOKEN_MALFORMED) from error
        return self._check_claims(claims, expected_nonce=expected_nonce)

    def _check_claims(self, claims: Mapping[str, Any], *, expected_nonce: str) -> VerifiedIdentity:
        config = self.config
        if claims.get("iss") != config.issuer:
            raise _invalid("the ID token was issued by another issuer", ID_TOKEN_WRONG_ISSUER)
        audience = claims.get("aud")
        audiences = [audience] if isinstance(audience, str) else audience
        if not isinstance(audiences, list) or config.client_id not in audiences:
            raise _invalid("the ID token is not meant for this client", ID_TOKEN_WRONG_AUDIENCE)
        azp = claims.get("azp")
        if (len(audiences) > 1 or azp is not None) and azp != config.client_id:
            raise _invalid("the ID token was issued to another party (azp)", ID_TOKEN_WRONG_AUDIENCE)
        now = self._now().timestamp()
        expires, issued, not_before = _number(claims, "exp"), _number(claims, "iat"), _number(claims, "nbf")
        if expires is None or issued is None:
            raise _invalid("the ID token lacks exp or iat", ID_TOKEN_MALFORMED)
        if now >= expires + self._leeway:
            raise _invalid("the ID token has expired", ID_TOKEN_EXPIRED)
        if issued > now + self._leeway or (not_before is not None and not_before > now + self._leeway):
            raise _invalid("the ID token is not valid yet", ID_TOKEN_NOT_YET_VALID)
        nonce = claims.get("nonce")
        if not isinstance(nonce, str) or not hmac.compare_digest(nonce.encode(), expected_nonce.encode()):
            raise _invalid("the ID token nonce does not match this sign-in", ID_TOKEN_WRONG_NONCE)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise _invalid("the ID token has no subject", ID_TOKEN_MALFORMED)
        email = claims.get("email")
        name = claims.get("name")
        verified = claims.get("email_verified")
        return VerifiedIdentity(
            issuer=config.issuer,
            subject=subject,
            email=email.strip() if isinstance(email, str) and email.strip() else None,
            # Some providers send the string "true"; anything else is unverified.
            email_verified=isinstance(email, str) and (verified is True or verified == "true"),
            name=name if isinstance(name, str) and name else None,
        )

    async def metadata(self, *, refresh: bool = False) -> ProviderMetadata:
        """The provider's discovery document (cached for `metadata_ttl`; a stale copy is kept if a refresh fails)."""
        cached = self._metadata
        if cached is not None and not refresh and time.monotonic() - self._metadata_at < self._metadata_ttl:
            return cached
        async with self._metadata_lock:
            if self._metadata is not cached and self._metadata is not None:
                return self._metadata  # another task refreshed it meanwhile
            try:
                metadata = await self._discover()
            except Unavailable:
                if cached is None:
                    raise
                log.warning("oidc discovery refresh failed; using the cached document", issuer=self.config.issuer)
                return cached
            self._metadata, self._metadata_at = metadata, time.monotonic()
            return metadata

    async def _discover(self) -> ProviderMetadata:
        url = self.config.issuer.rstrip("/") + DISCOVERY_PATH
        try:
            response = await self._http.get(url, headers={"accept": "application/json"})
        except httpx.HTTPError as error:
            raise self._unreachable("discovery", error) from error
        body = _json_object(response)
        if response.status_code != 200 or body is None:
            raise self._discovery_failed(f"discovery answered HTTP {response.status_code}")
        if body.get("issuer") != self.config.issuer:
            raise self._discovery_failed(f"discovery names issuer {body.get('issuer')!r}")
        endpoints = {}
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            value = body.get(name)
            if not isinstance(value, str) or urlsplit(value).scheme not in ("https", "http"):
                raise self._discovery_failed(f"discovery lacks {name}")
            endpoints[name] = value
        return ProviderMetadata(
            issuer=self.config.issuer,
            authorization_endpoint=endpoints["authorization_endpoint"],
            token_endpoint=endpoints["token_endpoint"],
            jwks_uri=endpoints["jwks_uri"],
            token_endpoint_auth_methods=_strings(
                body.get("token_endpoint_auth_methods_supported"), default=("client_secret_basic",)
            ),
            signing_algorithms=_strings(body.get("id_token_signing_alg_values_supported"), default=("RS256",)),
        )

    def _auth_method(self, metadata: ProviderMetadata) -> str:
        if self.config.client_secret is None:
            return "none"
        if "client_secret_basic" in metadata.token_endpoint_auth_methods:
            return "client_secret_basic"
        if "client_secret_post" in metadata.token_endpoint_auth_methods:
            return "client_secret_post"
        raise self._discovery_failed(
            "the provider supports neither client_secret_basic nor client_secret_post "
            f"({', '.join(metadata.token_endpoint_auth_methods)})"
        )

    async def _signing_key(self, kid: str | None, alg: str) -> _Key | None:
        keys = await self._jwks()
        key = _select_key(keys, kid, alg)
        if key is None and time.monotonic() - self._keys_at >= self._jwks_refresh_interval:
            # An unknown key: the provider may have rotated. Fetch again, at most once per interval.
            keys = await self._jwks(refresh=True)
            key = _select_key(keys, kid, alg)
        return key

    async def _jwks(self, *, refresh: bool = False) -> tuple[_Key, ...]:
        cached = self._keys
        if cached is not None and not refresh and time.monotonic() - self._keys_at < self._jwks_ttl:
            return cached
        async with self._keys_lock:
            if self._keys is not cached and self._keys is not None:
                return self._keys
            metadata = await self.metadata()
            try:
                response = await self._http.get(metadata.jwks_uri, headers={"accept": "application/json"})
            except httpx.HTTPError as error:
                raise self._unreachable("JWKS", error) from error
            body = _json_object(response)
            keys_data = body.get("keys") if body is not None and response.status_code == 200 else None
            if not isinstance(keys_data, list):
                raise self._discovery_failed(f"the JWKS could not be read (HTTP {response.status_code})")
            keys = tuple(key for data in keys_data if (key := _parse_jwk(data)) is not None)
            self._keys, self._keys_at = keys, time.monotonic()
            return keys

    def _unreachable(self, what: str, error: Exception) -> Unavailable:
        log.warning("oidc provider unreachable", issuer=self.config.issuer, what=what, error=repr(error))
        return Unavailable(
            f"the OIDC provider is unreachable ({what})",
            reason=OIDC_PROVIDER_UNAVAILABLE,
            metadata={"issuer": self.config.issuer},
        )

    def _discovery_failed(self, detail: str) -> Unavailable:
        log.error("oidc provider metadata unusable", issuer=self.config.issuer, detail=detail)
        return Unavailable(
            "the OIDC provider's metadata is unusable",
            reason=OIDC_DISCOVERY_FAILED,
            metadata={"issuer": self.config.issuer},
        )


def _invalid(message: str, reason: str) -> Unauthenticated:
    return Unauthenticated(message, reason=reason)


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _strings(value: object, *, default: Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return tuple(value)
    return tuple(default)


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _parse_jwk(data: object) -> _Key | None:
    """A signature verification key from one JWK, or None for keys we cannot or must not use."""
    if not isinstance(data, dict) or data.get("use", "sig") != "sig":
        return None
    try:
        jwk = jwt.PyJWK(data)
    except jwt.PyJWTError:
        return None  # unsupported key type or algorithm (e.g. an encryption key)
    alg = data.get("alg")
    if not jwk.key_type:
        return None
    return _Key(kid=jwk.key_id, kty=jwk.key_type, alg=alg if isinstance(alg, str) else None, key=jwk.key)


def _select_key(keys: Sequence[_Key], kid: str | None, alg: str) -> _Key | None:
    candidates = [key for key in keys if key.kty == ALGORITHM_KEY_TYPES[alg] and key.alg in (None, alg)]
    if kid is not None:
        return next((key for key in candidates if key.kid == kid), None)
    # OIDC Core 10.1: without a `kid`, the JWKS must hold a single key for the algorithm.
    return candidates[0] if len(candidates) == 1 else None
