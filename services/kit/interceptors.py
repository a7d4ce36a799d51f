"""The one server interceptor of the kit: request id, principal, validation, error mapping, logs, metrics.

OpenTelemetry's aio server interceptor runs before this one when tracing is on (trace context, server span);
`KitInterceptor` must be the last interceptor of the chain: it wraps each method's handler once,
caches the wrapped handler by method name, and from then on answers without calling further down
the chain. Per RPC, in order:

1. request id: the caller's `x-request-id` (if well formed) or a new one, echoed in the trailing metadata
   (a handler that sets trailing metadata itself should include it);
2. authentication and authorization, by the method's `(tessera.common.v1.auth)` rule (read from its
   descriptor once, when the method is first called; no rule or an unusable one fails closed with
   PERMISSION_DENIED `NO_AUTH_RULE`). PUBLIC methods need no token (a valid one still yields a
   principal); USER methods need a valid access token (`authorization: Bearer <jwt>`, verified
   locally, then checked against the revocation list); WORKSPACE methods need a workspace-scoped token
   whose role grants the declared permission. Missing, malformed, expired, forged or revoked tokens are
   UNAUTHENTICATED; a known caller without the permission is PERMISSION_DENIED (`WORKSPACE_TOKEN_REQUIRED`
   or `MISSING_PERMISSION` with the permission in the metadata). With `TESSERA_AUTH=disabled` the caller
   is taken from `x-tessera-dev-*` metadata instead of a token; permissions still apply. The health and
   reflection services are public and get no principal. The caller's token, request id and deadline are
   kept for outgoing calls (`services.kit.client`);
3. validation: `protovalidate` rules of the request message; violations become INVALID_ARGUMENT
   with one `BadRequest.FieldViolation` each;
4. the handler;
5. error mapping: an `AppError` becomes its status code with `google.rpc.Status` details (ErrorInfo,
   BadRequest, RetryInfo, RequestInfo); anything else becomes INTERNAL with a generic message, the
   traceback going only to the log;
6. one log line and the RED metrics.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Collection
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
import grpc
import protovalidate
import structlog
from google.protobuf import any_pb2, descriptor_pool, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.kit.authz import PUBLIC, ROLES, WORKSPACE, auth_rule_for, permissions_for, rule_problem
from services.kit.context import new_request_id, request_id_var, subject_var, tenant_id_var
from services.kit.errors import (
    ERROR_DOMAIN,
    Aborted,
    AppError,
    FieldViolation,
    Internal,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from services.kit.observability import RPC_DURATION, RPC_REQUESTS, rpc_var
from services.kit.principal import (
    DEVELOPMENT_ROLE_HEADER,
    DEVELOPMENT_USER_HEADER,
    DEVELOPMENT_USER_ID,
    DEVELOPMENT_WORKSPACE_HEADER,
    Principal,
)
from services.kit.settings import KitSettings
from services.kit.tokens import TOKEN_INVALID, AccessClaims, TokenVerifier

REQUEST_ID_HEADER = "x-request-id"
AUTHORIZATION_HEADER = "authorization"

# ErrorInfo reasons of the auth checks (UNAUTHENTICATED: TOKEN_EXPIRED / TOKEN_INVALID from the verifier).
# (S105: error reasons, not secrets.)
TOKEN_REQUIRED = "UNAUTHENTICATED"  # noqa: S105  # an error reason, not a secret
TOKEN_REVOKED = "TOKEN_REVOKED"  # noqa: S105  # an error reason, not a secret
NO_AUTH_RULE = "NO_AUTH_RULE"
WORKSPACE_TOKEN_REQUIRED = "WORKSPACE_TOKEN_REQUIRED"  # noqa: S105  # an error reason, not a secret
MISSING_PERMISSION = "MISSING_PERMISSION"

# Services that answer without a principal: probes and tooling must work before and without auth.
PUBLIC_SERVICES: frozenset[str] = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

_REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
_OK = grpc.StatusCode.OK
_CONCURRENCY_FAILURES = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
_log = structlog.get_logger("tessera.rpc")

_ROLES = frozenset(ROLES)
_MAX_CACHED_PRINCIPALS = 10_000

_principal_var: ContextVar[Principal | None] = ContextVar("tessera_principal", default=None)

Behavior = Callable[[Any, Any], Any]
# The caller's authorization header and x-tessera-dev-user / -workspace / -role metadata.
_Credentials = tuple[str | None, str | None, str | None, str | None]


class RevocationCheck(Protocol):
    """What the interceptor asks after a token verified (services.kit.revocation.RevocationList)."""

    def revoked_reason(self, claims: AccessClaims) -> str | None: ...


@dataclass(frozen=True, slots=True)
class IncomingCall:
    """What an outgoing call inherits from the RPC being served: credentials, request id and deadline."""

    authorization: str | None
    request_id: str
    deadline: float | None  # time.monotonic() by which the caller stops waiting; None: no deadline


_call_var: ContextVar[IncomingCall | None] = ContextVar("tessera_incoming_call", default=None)


def current_principal() -> Principal:
    """The caller of the RPC being served; raises Unauthenticated when there is none."""
    principal = _principal_var.get()
    if principal is None:
        raise Unauthenticated("no authenticated principal")
    return principal


def current_principal_or_none() -> Principal | None:
    """The caller of the RPC being served, or None (a PUBLIC method called without a valid token)."""
    return _principal_var.get()


def current_call() -> IncomingCall | None:
    """The RPC being served (None outside an RPC)."""
    return _call_var.get()


def violation_path(violation: protovalidate.Violation) -> str:
    """`workspace.display_name`, `items[2].title`, `labels["env"]` from a protovalidate field path."""
    parts: list[str] = []
    path = violation.proto.field
    for element in path.elements if path is not None else ():
        part = element.field_name
        subscript = element.subscript
        if subscript is not None:
            key = subscript.value
            part += f"[{json.dumps(key)}]"
        parts.append(part)
    return ".".join(parts)


def validate_request(message: Message) -> None:
    """Raise InvalidArgument listing every protovalidate violation of the message."""
    violations = protovalidate.collect_violations(message)
    if violations:
        fields = [FieldViolation(violation_path(v), v.proto.message, v.proto.rule_id) for v in violations]
        summary = "; ".join(f"{f.field}: {f.description}" if f.field else f.description for f in fields)
        raise InvalidArgument(f"invalid request: {summary}", violations=fields)


def status_for(error: AppError, *, request_id: str) -> grpc.Status:
    """The gRPC status (with google.rpc.Status details in the trailer) an AppError leaves the process as."""
    message = error.message
    metadata = error.metadata
    if isinstance(error, Internal):
        message = f"internal error (request id {request_id})"
        metadata = {}
    details = [error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata)]
    if error.violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description, reason=v.reason
                    )
                    for v in error.violations
                ]
            )
        )
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    details.append(error_details_pb2.RequestInfo(request_id=request_id))
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    return rpc_status.to_status(status_pb2.Status(code=error.code.value[0], message=message, details=packed))


class _Unimplemented(AppError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class _Method:
    """What the interceptor knows about one RPC method, computed once: its auth rule and its metrics."""

    __slots__ = ("counters", "duration", "full_name", "level", "method", "permission", "problem", "public", "service")

    def __init__(self, full_name: str, public_services: Collection[str]) -> None:
        self.full_name = full_name
        self.service, _, self.method = full_name.lstrip("/").rpartition("/")
        self.public = self.service in public_services
        self.duration = RPC_DURATION.labels(self.service, self.method)
        self.counters: dict[grpc.StatusCode, Any] = {}
        self.level = 0
        self.permission = ""
        self.problem: str | None = None
        if not self.public:
            try:
                descriptor = descriptor_pool.Default().FindMethodByName(f"{self.service}.{self.method}")
            except KeyError:
                rule = None
            else:
                rule = auth_rule_for(descriptor)
            self.problem = rule_problem(rule)
            if rule is not None and self.problem is None:
                self.level = rule.level
                self.permission = rule.permission

    def record(self, code: grpc.StatusCode, seconds: float) -> None:
        self.duration.observe(seconds)
        counter = self.counters.get(code)
        if counter is None:
            counter = self.counters[code] = RPC_REQUESTS.labels(self.service, self.method, code.name)
        counter.inc()


class KitInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type information
    """Request id, principal, validation, error mapping, logging and metrics for every RPC of one process."""

    def __init__(
        self,
        service: str,
        settings: KitSettings,
        *,
        verifier: TokenVerifier | None = None,
        revocations: RevocationCheck | None = None,
        public_services: Collection[str] = PUBLIC_SERVICES,
    ) -> None:
        self.service = service
        self.enforced = settings.auth != "disabled"
        if self.enforced and verifier is None:
            raise ValueError("enforced auth needs a token verifier")
        self.verifier = verifier
        self.revocations = revocations
        self.public_services = frozenset(public_services)
        self._handlers: dict[str, Any] = {}
        self._principals: dict[str, Principal] = {}  # token id -> principal of a verified token

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        method: str = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            handler = await continuation(handler_call_details)
            if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
                return None
            handler = self._wrap(_Method(method, self.public_services), handler)
            self._handlers[method] = handler
        return handler

    # -- wrapping (once per method) -------------------------------------------------------------

    def _wrap(self, method: _Method, handler: Any) -> Any:
        deserializer = handler.request_deserializer
        serializer = handler.response_serializer
        if not handler.request_streaming and not handler.response_streaming:
            return grpc.unary_unary_rpc_method_handler(
                self._unary_response(method, _as_coroutine(handler.unary_unary), streaming_request=False),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        if handler.request_streaming and not handler.response_streaming:
            return grpc.stream_unary_rpc_method_handler(
                self._unary_response(method, _as_coroutine(handler.stream_unary), streaming_request=True),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream
        wrapped: Behavior
        if inspect.isasyncgenfunction(behavior):
            wrapped = self._stream_response(method, behavior, streaming_request=handler.request_streaming)
        else:  # a coroutine that writes with context.write()
            wrapped = self._unary_response(method, _as_coroutine(behavior), streaming_request=handler.request_streaming)
        factory = (
            grpc.stream_stream_rpc_method_handler if handler.request_streaming else grpc.unary_stream_rpc_method_handler
        )
        return factory(wrapped, request_deserializer=deserializer, response_serializer=serializer)

    def _unary_response(
        self, method: _Method, behavior: Callable[[Any, Any], Awaitable[Any]], *, streaming_request: bool
    ) -> Callable[[Any, Any], Awaitable[Any]]:
        async def rpc(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            request_id, credentials = self._begin(method, context)
            code = _OK
            try:
                request = await self._admit(method, credentials, request, streaming_request)
                response = await behavior(request, context)
                code = context.code() or _OK
                return response
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                status = self._status_for_exception(exc, request_id)
                code = status.code
                # context.abort (not abort_with_status): the OpenTelemetry context wrapper records the code.
                await context.abort(
                    status.code, status.details, (*status.trailing_metadata, (REQUEST_ID_HEADER, request_id))
                )
            finally:
                self._finish(method, code, started)

        return rpc

    def _stream_response(
        self, method: _Method, behavior: Callable[[Any, Any], AsyncIterator[Any]], *, streaming_request: bool
    ) -> Callable[[Any, Any], AsyncIterator[Any]]:
        async def rpc(request: Any, context: Any) -> AsyncIterator[Any]:
            started = time.perf_counter()
            request_id, credentials = self._begin(method, context)
            code = _OK
            try:
                request = await self._admit(method, credentials, request, streaming_request)
                async for response in behavior(request, context):
                    yield response
                code = context.code() or _OK
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                status = self._status_for_exception(exc, request_id)
                code = status.code
                # context.abort (not abort_with_status): the OpenTelemetry context wrapper records the code.
                await context.abort(
                    status.code, status.details, (*status.trailing_metadata, (REQUEST_ID_HEADER, request_id))
                )
            finally:
                self._finish(method, code, started)

        return rpc

    # -- per RPC -----------------------------------------------------------------------------------

    def _begin(self, method: _Method, context: Any) -> tuple[str, _Credentials]:
        """Set the ambient request data and echo the request id; returns it and the caller's credentials."""
        request_id = authorization = dev_user = dev_workspace = dev_role = None
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID_HEADER:
                if _REQUEST_ID_PATTERN.fullmatch(value):
                    request_id = value
            elif key == AUTHORIZATION_HEADER:
                authorization = value
            elif key == DEVELOPMENT_USER_HEADER:
                dev_user = value
            elif key == DEVELOPMENT_WORKSPACE_HEADER:
                dev_workspace = value
            elif key == DEVELOPMENT_ROLE_HEADER:
                dev_role = value
        if request_id is None:
            request_id = new_request_id()
        request_id_var.set(request_id)
        rpc_var.set((self.service, method.full_name))
        # Echoed in the trailing metadata: sending initial metadata early costs a separate write per RPC.
        context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
        if not method.public:
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            _call_var.set(IncomingCall(authorization, request_id, deadline))
        return request_id, (authorization, dev_user, dev_workspace, dev_role)

    async def _admit(self, method: _Method, credentials: _Credentials, request: Any, streaming_request: bool) -> Any:
        """Authenticate and authorize the caller, then validate the request (a stream message by message)."""
        if method.public:
            return request
        principal = await self._authorize(method, credentials)
        _principal_var.set(principal)
        if principal is not None:
            subject_var.set(principal.subject)
            tenant_id_var.set(principal.tenant_id)
        if streaming_request:
            return _validated_stream(request)
        validate_request(request)
        return request

    async def _authorize(self, method: _Method, credentials: _Credentials) -> Principal | None:
        """The principal the method's rule admits; Unauthenticated or PermissionDenied otherwise."""
        if method.problem is not None:
            raise PermissionDenied(f"{method.full_name} {method.problem}: calls are refused", reason=NO_AUTH_RULE)
        if method.level == PUBLIC:
            try:
                return await self._principal(credentials, optional=True)
            except Unauthenticated:
                return None  # a public method does not need the caller; a bad token is ignored
        principal = await self._principal(credentials, optional=False)
        assert principal is not None
        if method.level == WORKSPACE:
            permission = method.permission
            if principal.tenant_id is None:
                raise PermissionDenied(
                    f"{method.method} needs a workspace token",
                    reason=WORKSPACE_TOKEN_REQUIRED,
                    metadata={"permission": permission},
                )
            if permission not in principal.scopes:
                raise PermissionDenied(
                    f"role {principal.role} lacks permission {permission}",
                    reason=MISSING_PERMISSION,
                    metadata={"permission": permission, "role": principal.role or ""},
                )
        return principal

    async def _principal(self, credentials: _Credentials, *, optional: bool) -> Principal | None:
        authorization, dev_user, dev_workspace, dev_role = credentials
        if not self.enforced:
            if optional and dev_user is None:
                return None
            return _development_principal(dev_user, dev_workspace, dev_role)
        if authorization is None:
            if optional:
                return None
            raise Unauthenticated("bearer token required", reason=TOKEN_REQUIRED)
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'", reason=TOKEN_INVALID)
        assert self.verifier is not None
        claims = await self.verifier.verify(token)
        if self.revocations is not None:
            revoked = self.revocations.revoked_reason(claims)
            if revoked is not None:
                raise Unauthenticated(f"access token revoked: {revoked}", reason=TOKEN_REVOKED)
        principal = self._principals.get(claims.token_id)
        if principal is None:
            if len(self._principals) >= _MAX_CACHED_PRINCIPALS:
                self._principals.clear()
            principal = self._principals[claims.token_id] = Principal(
                subject=claims.subject,
                tenant_id=claims.workspace_id,
                role=claims.role,
                scopes=permissions_for(claims.role),
                session_id=claims.session_id,
                kind=claims.kind,
            )
        return principal

    def _status_for_exception(self, exc: Exception, request_id: str) -> grpc.Status:
        """The status an exception leaves the process as; unexpected ones are logged with their traceback."""
        if isinstance(exc, AppError):
            if isinstance(exc, Internal):
                _log.error("internal error in RPC", exc_info=exc)
            return status_for(exc, request_id=request_id)
        if isinstance(exc, NotImplementedError):  # a generated servicer base method that was not overridden
            return status_for(_Unimplemented("method not implemented"), request_id=request_id)
        if isinstance(exc, _CONCURRENCY_FAILURES):
            # The transaction lost a race (deadlock victim, serialization failure) and was rolled back
            # whole: the caller may retry. ABORTED, as AIP-193 prescribes for concurrency conflicts.
            _log.warning("transaction aborted by a concurrent one", error=type(exc).__name__)
            return status_for(Aborted("concurrent change; retry the request"), request_id=request_id)
        _log.error("unhandled exception in RPC", exc_info=exc)
        return status_for(Internal("unexpected exception"), request_id=request_id)

    def _finish(self, method: _Method, code: grpc.StatusCode, started: float) -> None:
        elapsed = time.perf_counter() - started
        method.record(code, elapsed)
        if method.public:
            _log.debug("rpc", code=code.name, duration_ms=round(elapsed * 1000, 3))
        else:
            _log.info("rpc", code=code.name, duration_ms=round(elapsed * 1000, 3))


def _development_principal(user: str | None, workspace: str | None, role: str | None) -> Principal:
    """The caller named by x-tessera-dev-* metadata (disabled auth mode only)."""
    try:
        subject = str(uuid.UUID(user)) if user is not None else DEVELOPMENT_USER_ID
    except ValueError:
        raise Unauthenticated(f"{DEVELOPMENT_USER_HEADER} must be a user id (a UUID)") from None
    if workspace is None and role is None:
        return Principal(subject=subject)
    if workspace is None or role is None:
        raise Unauthenticated(f"{DEVELOPMENT_WORKSPACE_HEADER} and {DEVELOPMENT_ROLE_HEADER} come together")
    try:
        tenant_id = str(uuid.UUID(workspace))
    except ValueError:
        raise Unauthenticated(f"{DEVELOPMENT_WORKSPACE_HEADER} must be a workspace id (a UUID)") from None
    if role not in _ROLES:
        raise Unauthenticated(f"{DEVELOPMENT_ROLE_HEADER} must be one of {', '.join(ROLES)}")
    return Principal(subject=subject, tenant_id=tenant_id, role=role, scopes=permissions_for(role))


def _as_coroutine(behavior: Behavior) -> Callable[[Any, Any], Awaitable[Any]]:
    """Async handlers as they are; a plain function (e.g. an unimplemented generated stub) wrapped once."""
    if inspect.iscoroutinefunction(behavior):
        return behavior

    async def call(request: Any, context: Any) -> Any:
        result = behavior(request, context)
        if inspect.isawaitable(result):
            return await result
        return result

    return call


async def _validated_stream(requests: AsyncIterable[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        validate_request(request)
        yield request
