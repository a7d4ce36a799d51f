"""Browser sessions: sign-in/refresh/sign-out/OIDC endpoints keeping tokens in cookies, CSRF, workspace tokens.

Cookies: `tessera_access` (the user-level access token, Path=/), `tessera_refresh` (the refresh token,
Path=/auth, sent only to these endpoints), both `HttpOnly; SameSite=Lax` and `Secure` unless turned off
for http://localhost development; `tessera_csrf` (readable by scripts) holds a random token that
cookie-authenticated state-changing requests echo in `X-CSRF-Token` (double submit), on top of an
Origin (or Referer) check against the allowed origins. A bearer `Authorization` header wins over cookies
and needs no CSRF token (browsers never add it on their own).

When a cookie-authenticated request targets a workspace, the session's user-level token is exchanged
for a workspace-scoped one (IdentityService.IssueWorkspaceToken), cached per (session token, workspace)
until shortly before it (or the session token) expires.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import grpc
import jwt
import structlog
from google.protobuf import any_pb2, json_format, timestamp_pb2
from google.rpc import error_details_pb2
from pydantic import BaseModel, Field, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Scope

from gateway.errors import error_response, http_status, request_info, rpc_error_response
from tessera.identity.v1 import identity_service_pb2 as ids
from tessera.identity.v1 import identity_service_pb2_grpc as ids_grpc

log = structlog.get_logger("gateway.browser")

ERROR_DOMAIN = "tessera.dev"
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
_OIDC_STATE_COOKIE = "tessera_oidc_state"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class BrowserSettings(BaseModel):
    """Cookie, CSRF and token-exchange settings of the browser session endpoints (embed in the gateway settings)."""

    allowed_origins: tuple[str, ...] = Field(
        default=(), description="origins (scheme://host[:port]) whose pages may make cookie-authenticated calls"
    )
    cookie_secure: bool = Field(default=True, description="Secure cookies; false only for http://localhost")
    cookie_domain: str | None = Field(default=None, description="Domain attribute of the cookies (none: host only)")
    access_cookie: str = "tessera_access"
    refresh_cookie: str = "tessera_refresh"
    csrf_cookie: str = "tessera_csrf"
    csrf_header: str = "x-csrf-token"
    auth_path: str = Field(default="/auth", description="path prefix of these endpoints; the refresh cookie's Path")
    post_login_path: str = Field(default="/", description="where the OIDC callback sends the browser")
    token_issuer: str = "tessera"  # noqa: S105  # an issuer name, not a secret
    token_audience: str = "tessera"  # noqa: S105  # an audience name, not a secret
    identity_timeout_seconds: float = Field(default=10.0, gt=0)
    workspace_token_cache_size: int = Field(default=10_000, ge=1)
    workspace_token_margin_seconds: float = Field(default=30.0, ge=0, description="renew this long before expiry")
    jwks_refresh_seconds: float = Field(default=10.0, gt=0, description="minimum time between JWKS fetches")

    @model_validator(mode="after")
    def _secure_unless_local(self) -> BrowserSettings:
        if not self.cookie_secure:
            for origin in self.allowed_origins:
                parts = urlsplit(origin)
                if parts.scheme != "http" or parts.hostname not in _LOCAL_HOSTS:
                    raise ValueError(
                        f"cookie_secure may be false only for http://localhost development; {origin!r} is not local"
                    )
        for origin in self.allowed_origins:
            if _origin_of(origin) != origin.rstrip("/"):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port])")
        if not self.auth_path.startswith("/") or self.auth_path.endswith("/"):
            raise ValueError("auth_path must start with / and not end with /")
        if not self.post_login_path.startswith("/") or self.post_login_path.startswith("//"):
            raise ValueError("post_login_path must be a local path")
        return self


class BrowserHttpError(Exception):
    """An error answered by the browser layer: a gateway-made status, or a failed identity RPC, as error JSON."""

    def __init__(
        self,
        status: int,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str,
        headers: Mapping[str, str] | None = None,
        clear_cookies: bool = False,
        rpc_error: grpc.aio.AioRpcError | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason
        self.headers = dict(headers or {})
        self.clear_cookies = clear_cookies
        self.rpc_error = rpc_error

    @classmethod
    def from_rpc(cls, error: grpc.aio.AioRpcError, *, clear_cookies: bool = False) -> BrowserHttpError:
        """Wrap a failed identity call (rendered like any RPC error of the gateway)."""
        code = error.code()
        return cls(
            http_status(code),
            code,
            error.details() or code.name.lower(),
            reason=code.name,
            clear_cookies=clear_cookies,
            rpc_error=error,
        )

    def response(self, request_id: str) -> JSONResponse:
        """The error as the gateway's `{code, message, details}` JSON response."""
        if self.rpc_error is not None:
            return rpc_error_response(self.rpc_error, request_id=request_id)
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN))
        return error_response(
            self.code,
            self.message,
            details=[info, request_info(request_id)],
            request_id=request_id,
            status=self.status,
            headers=self.headers,
        )


def csrf_failed() -> BrowserHttpError:
    """The error of a failed CSRF check (403, PERMISSION_DENIED)."""
    return BrowserHttpError(403, grpc.StatusCode.PERMISSION_DENIED, "CSRF check failed", reason="CSRF_FAILED")


def _unauthenticated(message: str, *, reason: str, clear_cookies: bool = False) -> BrowserHttpError:
    return BrowserHttpError(401, grpc.StatusCode.UNAUTHENTICATED, message, reason=reason, clear_cookies=clear_cookies)


def request_id_of(request: Request) -> str:
    """The client's x-request-id when well-formed (the gateway's rule), else a fresh one."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def _origin_of(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def _bearer(header: str) -> str:
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthenticated("the authorization header must be `Bearer <token>`", reason="BAD_AUTHORIZATION")
    return token.strip()


def _token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _unverified_expiry(token: str) -> float | None:
    """The `exp` of a JWT without checking it (only ever used to shorten a cache lifetime)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) else None


def _seconds_until(moment: timestamp_pb2.Timestamp, *, now: datetime) -> int:
    return max(0, int((moment.ToDatetime(tzinfo=UTC) - now).total_seconds()))


@dataclass
class _CachedToken:
    token: str
    renew_at: float  # epoch seconds


class WorkspaceTokenCache:
    """Workspace-scoped tokens by (session token, workspace): bounded LRU, entries renewed before they expire."""

    def __init__(self, *, size: int, margin_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self.size = size
        self.margin_seconds = margin_seconds
        self.hits = 0
        self.misses = 0
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _CachedToken] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future[str]] = {}

    async def get(self, session_token: str, workspace_id: str, issue: Callable[[], Any]) -> str:
        """The cached token, or a new one from `issue()` (concurrent misses share one call)."""
        key = (_token_key(session_token), workspace_id)
        entry = self._entries.get(key)
        if entry is not None and self._clock() < entry.renew_at:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry.token
        pending = self._inflight.get(key)
        if pending is not None:
            self.hits += 1
            return await asyncio.shield(pending)
        self.misses += 1
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            token, expires_at = await issue()
            session_expiry = _unverified_expiry(session_token)
            if session_expiry is not None:
                expires_at = min(expires_at, session_expiry)
            self._entries[key] = _CachedToken(token, renew_at=expires_at - self.margin_seconds)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
            future.set_result(token)
            return str(token)
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            del self._inflight[key]

    def forget(self, session_token: str, workspace_id: str) -> bool:
        """Drop one cached token; True if it was cached."""
        return self._entries.pop((_token_key(session_token), workspace_id), None) is not None

    def forget_session(self, session_token: str) -> None:
        """Drop every cached token of a session (on sign-out)."""
        digest = _token_key(session_token)
        for key in [key for key in self._entries if key[0] == digest]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


class TokenSubjects:
    """The `sub` of access tokens whose signature verifies against identity's JWKS (for rate limiting)."""

    def __init__(self, stub: Any, settings: BrowserSettings, *, cache_size: int = 10_000) -> None:
        self._stub = stub
        self._settings = settings
        self._keys: dict[str, Any] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self._cache: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._cache_size = cache_size

    async def subject(self, token: str) -> str | None:
        """The verified subject of `token`, or None (malformed, forged, expired, or identity unreachable)."""
        digest = _token_key(token)
        cached = self._cache.get(digest)
        if cached is not None:
            if time.time() < cached[1]:
                return cached[0]
            del self._cache[digest]
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            return None
        if not isinstance(kid, str):
            return None
        key = self._keys.get(kid)
        if key is None:
            await self._refresh_keys()
            key = self._keys.get(kid)
            if key is None:
                return None
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=["EdDSA"],
                audience=self._settings.token_audience,
                issuer=self._settings.token_issuer,
            )
        except jwt.PyJWTError:
            return None
        subject = claims.get("sub")
        if not isinstance(subject, str):
            return None
        self._cache[digest] = (subject, float(claims["exp"]))
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return subject

    async def _refresh_keys(self) -> None:
        async with self._lock:
            if time.monotonic() - self._fetched_at < self._settings.jwks_refresh_seconds:
                return
            self._fetched_at = time.monotonic()
            try:
                # Short: a request waits on this only to pick its rate-limit bucket.
                response = await self._stub.GetJwks(
                    ids.GetJwksRequest(), timeout=min(self._settings.identity_timeout_seconds, 2.0)
                )
            except grpc.aio.AioRpcError as error:
                log.warning("jwks fetch failed", code=error.code().name)
                return
            keys: dict[str, Any] = {}
            for jwk in response.keys:
                data = json_format.MessageToDict(jwk, preserving_proto_field_name=True)
                try:
                    keys[jwk.kid] = jwt.PyJWK(data).key
                except jwt.PyJWTError:
                    log.warning("unusable jwk", kid=jwk.kid)
            self._keys = keys


class BrowserAuth:
    """Browser session endpoints plus the credentials hook the gateway calls before each RPC."""

    def __init__(self, settings: BrowserSettings, identity_channel: grpc.aio.Channel) -> None:
        self.settings = settings
        self._identity = ids_grpc.IdentityServiceStub(identity_channel)  # type: ignore[no-untyped-call]  # generated, untyped
        self._allowed_origins = frozenset(origin.rstrip("/").lower() for origin in settings.allowed_origins)
        self.workspace_tokens = WorkspaceTokenCache(
            size=settings.workspace_token_cache_size, margin_seconds=settings.workspace_token_margin_seconds
        )
        self.subjects = TokenSubjects(self._identity, settings)

    # -- the hook for the gateway -----------------------------------------------------------------

    async def resolve_credentials(self, request: Request, workspace_id: str | None = None) -> str | None:
        """The access token for the gRPC call, or None; raises BrowserHttpError (CSRF) or AioRpcError (exchange).

        `workspace_id` (a UUID or `workspaces/<uuid>`) is given for RPCs that need a workspace-scoped token.
        """
        header = request.headers.get("authorization")
        if header is not None:
            return _bearer(header)
        session_token = request.cookies.get(self.settings.access_cookie)
        if not session_token:
            return None
        if request.method in STATE_CHANGING_METHODS:
            self.check_csrf(request)
        if workspace_id is None:
            return session_token
        workspace_id = workspace_id.removeprefix("workspaces/")
        return await self.workspace_tokens.get(
            session_token, workspace_id, lambda: self._issue_workspace_token(request, session_token, workspace_id)
        )

    def forget_workspace_token(self, request: Request, workspace_id: str) -> bool:
        """Drop the cached workspace token of this request's session; True if there was one.

        Call it when an RPC made with that token answered UNAUTHENTICATED (e.g. the membership changed and
        the token was revoked), then resolve the credentials again and retry once.
        """
        if request.headers.get("authorization") is not None:
            return False
        session_token = request.cookies.get(self.settings.access_cookie)
        if not session_token:
            return False
        return self.workspace_tokens.forget(session_token, workspace_id.removeprefix("workspaces/"))

    async def client_key(self, scope: Scope) -> str | None:
        """The verified subject of the request's bearer or cookie token (rate-limit key), or None."""
        request = Request(scope)
        header = request.headers.get("authorization")
        token: str | None
        if header is not None:
            scheme, _, value = header.partition(" ")
            token = value.strip() if scheme.lower() == "bearer" else None
        else:
            token = request.cookies.get(self.settings.access_cookie)
        if not token:
            return None
        return await self.subjects.subject(token)

    def check_csrf(self, request: Request) -> None:
        """Raise a 403 unless the request comes from an allowed origin and echoes the CSRF cookie in the header."""
        if not self._origin_allowed(request, required=True):
            raise csrf_failed()
        cookie = request.cookies.get(self.settings.csrf_cookie, "")
        header = request.headers.get(self.settings.csrf_header, "")
        if not cookie or not header or not hmac.compare_digest(cookie.encode(), header.encode()):
            raise csrf_failed()

    def routes(self) -> list[Route]:
        """The session endpoints under `auth_path`."""
        prefix = self.settings.auth_path
        return [
            Route(f"{prefix}/sign-in", self._endpoint(self.sign_in), methods=["POST"]),
            Route(f"{prefix}/refresh", self._endpoint(self.refresh), methods=["POST"]),
            Route(f"{prefix}/sign-out", self._endpoint(self.sign_out), methods=["POST"]),
            Route(f"{prefix}/oidc/start", self._endpoint(self.oidc_start), methods=["POST"]),
            Route(f"{prefix}/oidc/callback", self.oidc_callback, methods=["GET"]),
        ]

    # -- endpoints --------------------------------------------------------------------------------

    async def sign_in(self, request: Request) -> Response:
        """Sign in with email and password; the tokens go into cookies, the user into the body."""
        self._check_login_origin(request)
        body = await _json_object(request)
        email, password = body.get("email"), body.get("password")
        if not isinstance(email, str) or not isinstance(password, str):
            raise _invalid("email and password are required strings")
        try:
            response = await self._identity.SignIn(
                ids.SignInRequest(email=email, password=password),
                metadata=self._metadata(request),
                timeout=self.settings.identity_timeout_seconds,
            )
        except grpc.aio.AioRpcError as error:
            raise BrowserHttpError.from_rpc(error) from None
        csrf = secrets.token_urlsafe(32)
        # The CSRF token is also in the body: a page on another allowed origin cannot read this host's cookie.
        result = JSONResponse({"user": _message_json(response.user), "csrfToken": csrf})
        self._set_session_cookies(result, response.tokens, csrf=csrf)
        return result

    async def refresh(self, request: Request) -> Response:
        """Rotate the refresh token; a spent (reused) one ends the session and clears the cookies."""
        self._check_cookie_csrf(request)
        refresh_token = request.cookies.get(self.settings.refresh_cookie)
        if not refresh_token:
            raise _unauthenticated("no session", reason="NO_SESSION", clear_cookies=True)
        try:
            response = await self._identity.RefreshTokens(
                ids.RefreshTokensRequest(refresh_token=refresh_token),
                metadata=self._metadata(request),
                timeout=self.settings.identity_timeout_seconds,
            )
        except grpc.aio.AioRpcError as error:
            raise BrowserHttpError.from_rpc(
                error, clear_cookies=error.code() == grpc.StatusCode.UNAUTHENTICATED
            ) from None
        tokens = response.tokens
        csrf = request.cookies.get(self.settings.csrf_cookie) or secrets.token_urlsafe(32)
        result = JSONResponse(
            {
                "accessTokenExpireTime": json_format.MessageToJson(tokens.access_token_expire_time).strip('"'),
                "refreshTokenExpireTime": json_format.MessageToJson(tokens.refresh_token_expire_time).strip('"'),
                "csrfToken": csrf,
            }
        )
        self._set_session_cookies(result, tokens, csrf=csrf)
        return result

    async def sign_out(self, request: Request) -> Response:
        """End the current session (refreshing first if the access cookie is gone) and clear the cookies."""
        self._check_cookie_csrf(request)
        access_token = request.cookies.get(self.settings.access_cookie)
        revoked = 0
        if access_token:
            self.workspace_tokens.forget_session(access_token)
            revoked = await self._sign_out_with(request, access_token)
        if revoked == 0 and (refresh_token := request.cookies.get(self.settings.refresh_cookie)):
            try:
                refreshed = await self._identity.RefreshTokens(
                    ids.RefreshTokensRequest(refresh_token=refresh_token),
                    metadata=self._metadata(request),
                    timeout=self.settings.identity_timeout_seconds,
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise BrowserHttpError.from_rpc(error) from None
            else:
                revoked = await self._sign_out_with(request, refreshed.tokens.access_token)
        result = JSONResponse({"revokedSessions": revoked})
        self._clear_session_cookies(result)
        return result

    async def oidc_start(self, request: Request) -> Response:
        """Start an OIDC sign-in: the provider's authorization URL, with the state bound to this browser."""
        self._check_login_origin(request)
        body = await _json_object(request)
        provider, redirect_uri = body.get("provider"), body.get("redirectUri", body.get("redirect_uri"))
        if not isinstance(provider, str) or not isinstance(redirect_uri, str):
            raise _invalid("provider and redirectUri are required strings")
        try:
            response = await self._identity.StartOidcSignIn(
                ids.StartOidcSignInRequest(provider=provider, redirect_uri=redirect_uri),
                metadata=self._metadata(request),
                timeout=self.settings.identity_timeout_seconds,
            )
        except grpc.aio.AioRpcError as error:
            raise BrowserHttpError.from_rpc(error) from None
        result = JSONResponse({"authorizationUrl": response.authorization_url})
        # Login CSRF: the callback must come back to the browser that started the sign-in.
        result.set_cookie(
            _OIDC_STATE_COOKIE,
            _token_key(response.state),
            max_age=600,
            path=self.settings.auth_path,
            domain=self.settings.cookie_domain,
            secure=self.settings.cookie_secure,
            httponly=True,
            samesite="lax",
        )
        _no_store(result)
        return result

    async def oidc_callback(self, request: Request) -> Response:
        """Complete an OIDC sign-in and send the browser to the post-login path (with `?error=` on failure)."""
        state, code = request.query_params.get("state", ""), request.query_params.get("code", "")
        bound = request.cookies.get(_OIDC_STATE_COOKIE, "")
        error_reason: str | None = None
        tokens: Any = None
        if request.query_params.get("error") or not state or not code:
            error_reason = "oidc_failed"
        elif not bound or not hmac.compare_digest(bound.encode(), _token_key(state).encode()):
            error_reason = "state_mismatch"
        else:
            try:
                response = await self._identity.CompleteOidcSignIn(
                    ids.CompleteOidcSignInRequest(state=state, code=code),
                    metadata=self._metadata(request),
                    timeout=self.settings.identity_timeout_seconds,
                )
                tokens = response.tokens
            except grpc.aio.AioRpcError as error:
                log.info("oidc sign-in failed", code=error.code().name)
                error_reason = "oidc_failed"
        target = self.settings.post_login_path
        if error_reason is not None:
            target = f"{target}?{urlencode({'error': error_reason})}"
        result = RedirectResponse(target, status_code=303)
        result.delete_cookie(
            _OIDC_STATE_COOKIE,
            path=self.settings.auth_path,
            domain=self.settings.cookie_domain,
            secure=self.settings.cookie_secure,
            httponly=True,
            samesite="lax",
        )
        if tokens is not None:
            self._set_session_cookies(result, tokens, csrf=secrets.token_urlsafe(32))
        _no_store(result)
        return result

    # -- helpers ----------------------------------------------------------------------------------

    def _endpoint(self, handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                response: Response = await handler(request)
            except BrowserHttpError as error:
                response = error.response(request_id_of(request))
                if error.clear_cookies:
                    self._clear_session_cookies(response)
            _no_store(response)
            return response

        endpoint.__name__ = getattr(handler, "__name__", "endpoint")
        endpoint.__doc__ = handler.__doc__
        return endpoint

    async def _issue_workspace_token(
        self, request: Request, session_token: str, workspace_id: str
    ) -> tuple[str, float]:
        response = await self._identity.IssueWorkspaceToken(
            ids.IssueWorkspaceTokenRequest(workspace=f"workspaces/{workspace_id}"),
            metadata=(*self._metadata(request), ("authorization", f"Bearer {session_token}")),
            timeout=self.settings.identity_timeout_seconds,
        )
        tokens = response.tokens
        return tokens.access_token, tokens.access_token_expire_time.ToDatetime(tzinfo=UTC).timestamp()

    async def _sign_out_with(self, request: Request, access_token: str) -> int:
        try:
            response = await self._identity.SignOut(
                ids.SignOutRequest(scope=ids.SIGN_OUT_SCOPE_CURRENT),
                metadata=(*self._metadata(request), ("authorization", f"Bearer {access_token}")),
                timeout=self.settings.identity_timeout_seconds,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                return 0
            raise BrowserHttpError.from_rpc(error) from None
        return int(response.revoked_sessions)

    def _metadata(self, request: Request) -> tuple[tuple[str, str], ...]:
        metadata: list[tuple[str, str]] = []
        if request.client is not None:
            metadata.append(("x-forwarded-for", request.client.host))
        request_id = request.headers.get("x-request-id")
        if request_id:
            metadata.append(("x-request-id", request_id))
        return tuple(metadata)

    def _origin_allowed(self, request: Request, *, required: bool) -> bool:
        origin = request.headers.get("origin")
        if origin is None or origin == "null":
            referer = request.headers.get("referer")
            origin = _origin_of(referer) if referer else None
            if origin is None:
                return not required and request.headers.get("origin") is None
        origin = origin.rstrip("/").lower()
        if origin in self._allowed_origins:
            return True
        # Same origin as the gateway itself (a browser always sets Host to the site it talks to).
        host = request.headers.get("host")
        return host is not None and origin == f"{request.url.scheme}://{host}".lower()

    def _check_login_origin(self, request: Request) -> None:
        # No session yet, so no token to compare: a browser's cross-site attempt still carries its Origin.
        if not self._origin_allowed(request, required=False):
            raise csrf_failed()

    def _check_cookie_csrf(self, request: Request) -> None:
        if any(request.cookies.get(name) for name in (self.settings.access_cookie, self.settings.refresh_cookie)):
            self.check_csrf(request)

    def _cookie_kwargs(self) -> dict[str, Any]:
        return {"domain": self.settings.cookie_domain, "secure": self.settings.cookie_secure, "samesite": "lax"}

    def _set_session_cookies(self, response: Response, tokens: Any, *, csrf: str) -> None:
        now = datetime.now(UTC)
        access_age = _seconds_until(tokens.access_token_expire_time, now=now)
        refresh_age = _seconds_until(tokens.refresh_token_expire_time, now=now)
        kwargs = self._cookie_kwargs()
        response.set_cookie(
            self.settings.access_cookie, tokens.access_token, max_age=access_age, path="/", httponly=True, **kwargs
        )
        response.set_cookie(
            self.settings.refresh_cookie,
            tokens.refresh_token,
            max_age=refresh_age,
            path=self.settings.auth_path,
            httponly=True,
            **kwargs,
        )
        response.set_cookie(self.settings.csrf_cookie, csrf, max_age=refresh_age, path="/", httponly=False, **kwargs)

    def _clear_session_cookies(self, response: Response) -> None:
        kwargs = self._cookie_kwargs()
        response.delete_cookie(self.settings.access_cookie, path="/", httponly=True, **kwargs)
        response.delete_cookie(self.settings.refresh_cookie, path=self.settings.auth_path, httponly=True, **kwargs)
        response.delete_cookie(self.settings.csrf_cookie, path="/", httponly=False, **kwargs)


def routes(auth: BrowserAuth) -> list[Route]:
    """The browser session routes of `auth` (same as `auth.routes()`)."""
    return auth.routes()


def _invalid(message: str) -> BrowserHttpError:
    return BrowserHttpError(400, grpc.StatusCode.INVALID_ARGUMENT, message, reason="INVALID_REQUEST")


async def _json_object(request: Request) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise BrowserHttpError(
            415, grpc.StatusCode.INVALID_ARGUMENT, "expected application/json", reason="UNSUPPORTED_MEDIA_TYPE"
        )
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise _invalid("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _invalid("the body must be a JSON object")
    return body


def _message_json(message: Any) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    return result


def _no_store(response: Response) -> None:
    response.headers["cache-control"] = "no-store"


__all__: Sequence[str] = (
    "STATE_CHANGING_METHODS",
    "BrowserAuth",
    "BrowserHttpError",
    "BrowserSettings",
    "TokenSubjects",
    "WorkspaceTokenCache",
    "csrf_failed",
    "request_id_of",
    "routes",
)
