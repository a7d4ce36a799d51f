"""The Starlette application: contract routes transcoded to gRPC, health endpoints, CORS, limits, streaming."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc
import structlog
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import errors, openapi
from gateway.browser import BrowserAuth, BrowserHttpError
from gateway.descriptors import domain_of
from gateway.middleware import ContractDispatch, OriginOnlyCORSMiddleware
from gateway.ratelimit import RateLimitMiddleware
from gateway.routes import MethodNotAllowed, RouteMatch, RouteNotFound, RouteTable, contract_routes
from gateway.routes import Route as RpcRoute
from gateway.settings import GatewaySettings
from gateway.transcode import TranscodeError, build_request, render_response

logger = structlog.get_logger("gateway")

FORWARDED_HEADERS = ("x-request-id", "traceparent", "tracestate")
RESPONSE_METADATA = ("x-request-id",)  # forwarded under their own names; other response metadata is prefixed
METADATA_HEADER_PREFIX = "grpc-metadata-"
_TRANSPORT_METADATA = frozenset({"content-type", "user-agent", "te", "date", "server", "content-length"})
IDEMPOTENCY_HEADER = "idempotency-key"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_GRPC_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
SSE = "text/event-stream"
NDJSON = "application/x-ndjson"

CredentialsHook = Callable[[Request, str | None], Awaitable[str | None]]


class BodyTooLarge(Exception):
    """The request body exceeds the configured limit."""


def request_id_of(request: Request) -> str:
    """The client's x-request-id when well-formed, else a fresh one."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else os.urandom(16).hex()  # 32 hex digits, as uuid4().hex


def parse_grpc_timeout(value: str) -> float | None:
    """Seconds from a `Grpc-Timeout` header (`100m`, `5S`), None when malformed."""
    found = _GRPC_TIMEOUT.match(value.strip())
    if found is None:
        return None
    return int(found.group(1)) * _TIMEOUT_UNITS[found.group(2)]


def _workspace_of(match: RouteMatch) -> str | None:
    """The workspace a workspace-scoped RPC targets (user-level RPCs get None: no token exchange)."""
    if not match.route.rpc.workspace_scoped:
        return None
    for value in match.variables.values():
        if value.startswith("workspaces/"):
            return value.split("/")[1]
    return None


async def read_body(request: Request, *, limit: int) -> bytes:
    """The request body, raising BodyTooLarge as soon as it exceeds `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class Gateway:
    """Route table, one gRPC channel per backend, and the transcoding request handler."""

    def __init__(self, settings: GatewaySettings, routes: Sequence[RpcRoute]) -> None:
        self.settings = settings
        self.table = RouteTable(routes)
        self.services = sorted({route.rpc.service for route in routes})
        self.channels: dict[str, grpc.aio.Channel] = {
            domain: grpc.aio.insecure_channel(address) for domain, address in settings.addresses.items()
        }
        self.credentials: CredentialsHook | None = None
        # Drops a cached workspace token of the request's browser session; True if there was one.
        self.forget_token: Callable[[Request, str], bool] | None = None
        self._callables: dict[str, Any] = {}

    def channel_for(self, service: str) -> grpc.aio.Channel:
        """The channel of the backend serving `service`."""
        return self.channels[domain_of(service)]

    def _callable(self, route: RpcRoute) -> Any:
        """The (cached) multicallable of the route's RPC."""
        found = self._callables.get(route.rpc.path)
        if found is None:
            channel = self.channel_for(route.rpc.service)
            factory = channel.unary_stream if route.rpc.server_streaming else channel.unary_unary
            found = factory(
                route.rpc.path,
                request_serializer=_serialize,
                response_deserializer=route.rpc.output_type.FromString,
                _registered_method=True,  # as generated stubs do: the method path is interned once per channel
            )
            self._callables[route.rpc.path] = found
        return found

    async def close(self) -> None:
        """Close every channel."""
        await asyncio.gather(*(channel.close() for channel in self.channels.values()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry of the contract routes (ContractDispatch calls it without going through the router)."""
        request = Request(scope, receive, send)
        response = await self.handle(request)
        await response(scope, receive, send)

    async def handle(self, request: Request) -> Response:
        """Transcode one HTTP request into its RPC; never leaks a stack trace."""
        request_id = request_id_of(request)
        try:
            return await self._handle(request, request_id)
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception:
            logger.exception(
                "gateway request failed", request_id=request_id, method=request.method, path=request.url.path
            )
            return errors.internal_error(request_id)

    async def _handle(self, request: Request, request_id: str) -> Response:
        raw_path = request.scope.get("raw_path")
        path = raw_path.decode("latin-1").split("?", 1)[0] if isinstance(raw_path, bytes) else request.url.path
        try:
            match = self.table.lookup(request.method, path)
        except MethodNotAllowed as exc:
            return errors.error_response(
                grpc.StatusCode.UNIMPLEMENTED,
                f"method {request.method} not allowed for {path}",
                request_id=request_id,
                status=405,
                headers={"allow": ", ".join(exc.allowed)},
            )
        except RouteNotFound:
            return errors.error_response(grpc.StatusCode.NOT_FOUND, f"no route for {path}", request_id=request_id)
        route = match.route
        try:
            body = await read_body(request, limit=self.settings.max_body_bytes)
        except BodyTooLarge:
            return errors.error_response(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request body exceeds {self.settings.max_body_bytes} bytes",
                request_id=request_id,
                status=413,
            )
        try:
            message = build_request(
                route,
                variables=match.variables,
                body=body,
                query=request.query_params.multi_items() if request.scope.get("query_string") else (),
                http_method=request.method.upper(),
            )
        except TranscodeError as exc:
            return errors.bad_request(str(exc), field=exc.field, request_id=request_id)
        self._apply_idempotency_key(request, message)
        metadata = await self._metadata_or_error(request, request_id, match)
        if isinstance(metadata, Response):
            return metadata
        timeout = self._timeout(request, route)
        if route.rpc.server_streaming:
            return await self._stream(request, route, message, metadata, timeout, request_id)
        response = await self._unary(route, message, metadata, timeout, request_id)
        workspace_id = _workspace_of(match)
        # A cached workspace token stopped counting (e.g. a membership change revoked it): exchange the
        # session for a fresh one and retry once.
        if (
            response.status_code == 401
            and workspace_id
            and self.forget_token is not None
            and self.forget_token(request, workspace_id)
        ):
            metadata = await self._metadata_or_error(request, request_id, match)
            if isinstance(metadata, Response):
                return metadata
            response = await self._unary(route, message, metadata, timeout, request_id)
        return response

    async def _metadata_or_error(
        self, request: Request, request_id: str, match: RouteMatch
    ) -> list[tuple[str, str]] | Response:
        """The outgoing metadata, or the error response when the caller's credentials cannot be resolved."""
        try:
            return await self._metadata(request, request_id, match)
        except grpc.aio.AioRpcError as exc:  # the workspace-token exchange failed (e.g. not a member)
            return errors.rpc_error_response(exc, request_id=request_id)
        except BrowserHttpError as exc:  # CSRF, or a malformed Authorization header
            return exc.response(request_id)

    def _apply_idempotency_key(self, request: Request, message: Any) -> None:
        key = request.headers.get(IDEMPOTENCY_HEADER)
        field = message.DESCRIPTOR.fields_by_name.get("request_id")
        if key and field is not None and field.type == field.TYPE_STRING and not message.request_id:
            message.request_id = key

    async def _metadata(self, request: Request, request_id: str, match: RouteMatch) -> list[tuple[str, str]]:
        metadata = [("x-request-id", request_id)]
        metadata += [(name, request.headers[name]) for name in FORWARDED_HEADERS[1:] if name in request.headers]
        if self.credentials is not None:
            token = await self.credentials(request, _workspace_of(match))
            if token:
                metadata.append(("authorization", f"Bearer {token}"))
        elif "authorization" in request.headers:
            metadata.append(("authorization", request.headers["authorization"]))
        return metadata

    def _timeout(self, request: Request, route: RpcRoute) -> float | None:
        """The client's `Grpc-Timeout` (at most the maximum), else the route's default deadline, else the
        gateway's (none for streams)."""
        header = request.headers.get("grpc-timeout")
        requested = parse_grpc_timeout(header) if header else None
        if requested is not None:
            return min(requested, self.settings.max_deadline_seconds)
        rpc = route.rpc
        configured = self.settings.route_deadlines
        if configured:
            found = configured.get(f"{rpc.service}/{rpc.name}", configured.get(rpc.service))
            if found is not None:
                return found
        return None if rpc.server_streaming else self.settings.default_deadline_seconds

    async def _unary(
        self, route: RpcRoute, message: Message, metadata: list[tuple[str, str]], timeout: float | None, request_id: str
    ) -> Response:
        call = self._callable(route)(message, metadata=metadata, timeout=timeout)
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            logger.info("rpc failed", request_id=request_id, rpc=route.rpc.path, code=exc.code().name)
            return errors.rpc_error_response(exc, request_id=request_id)
        headers = _response_headers(
            [*(await call.initial_metadata() or ()), *(await call.trailing_metadata() or ())], request_id
        )
        return JSONResponse(render_response(route, response), headers=headers)

    async def _stream(
        self,
        request: Request,
        route: RpcRoute,
        message: Message,
        metadata: list[tuple[str, str]],
        timeout: float | None,
        request_id: str,
    ) -> Response:
        accept = request.headers.get("accept", "")
        media_type = NDJSON if NDJSON in accept and SSE not in accept else SSE
        call = self._callable(route)(message, metadata=metadata, timeout=timeout)
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as exc:
            return errors.rpc_error_response(exc, request_id=request_id)
        headers = _response_headers(await call.initial_metadata() or (), request_id)
        headers["cache-control"] = "no-cache"

        def encode(item: Any, *, event: str | None = None) -> bytes:
            text = json.dumps(item, separators=(",", ":"))
            if media_type == NDJSON:
                return (text + "\n").encode()
            prefix = f"event: {event}\n" if event else ""
            return f"{prefix}data: {text}\n\n".encode()

        async def events() -> AsyncIterator[bytes]:
            try:
                item = first
                while item is not grpc.aio.EOF:
                    yield encode(render_response(route, item))
                    item = await call.read()
            except grpc.aio.AioRpcError as exc:
                error = json.loads(bytes(errors.rpc_error_response(exc, request_id=request_id).body))
                yield encode({"error": error} if media_type == NDJSON else error, event="error")
            finally:
                call.cancel()

        return StreamingResponse(events(), media_type=media_type, headers=headers)

    async def readiness(self) -> dict[str, str]:
        """Health status of every backend service ("SERVING" when ready)."""

        async def check(service: str) -> tuple[str, str]:
            stub = health_pb2_grpc.HealthStub(self.channel_for(service))
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
            except grpc.aio.AioRpcError as exc:
                return service, exc.code().name
            return service, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

        return dict(await asyncio.gather(*(check(service) for service in self.services)))


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _response_headers(metadata: Iterable[tuple[str, str | bytes]], request_id: str) -> dict[str, str]:
    """HTTP headers from a call's response metadata, as grpc-gateway maps them by default.

    `x-request-id` keeps its name; other metadata, initial and trailing alike (browsers cannot read HTTP
    trailers), becomes `grpc-metadata-<key>`. Binary (`-bin`) values and gRPC's own keys are not forwarded.
    """
    headers = {"x-request-id": request_id}
    for key, value in metadata:
        if not isinstance(value, str) or key.startswith("grpc-") or key in _TRANSPORT_METADATA:
            continue
        headers[key if key in RESPONSE_METADATA else f"{METADATA_HEADER_PREFIX}{key}"] = value
    return headers


class _GatewayStarlette(Starlette):
    """Starlette under the gateway's own outer layers (`outer_layers`), which take contract requests past it."""

    outer_layers: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return self.outer_layers(stack) if self.outer_layers is not None else stack


def create_app(
    settings: GatewaySettings, *, extra_routes: Sequence[RpcRoute] = (), extra_http: Sequence[BaseRoute] = ()
) -> Starlette:
    """The gateway application; call it inside the event loop that will serve it (gRPC channels bind to it)."""
    gateway = Gateway(settings, [*contract_routes(), *extra_routes])
    auth = BrowserAuth(settings.browser, gateway.channel_for("tessera.identity.v1.IdentityService"))

    async def credentials(request: Request, workspace_id: str | None) -> str | None:
        return await auth.resolve_credentials(request, workspace_id=workspace_id)

    gateway.credentials = credentials
    gateway.forget_token = auth.forget_workspace_token
    document = openapi.build_document(
        title=settings.api_title, version=settings.api_version, access_cookie=settings.browser.access_cookie
    )

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        services = await gateway.readiness()
        ready = all(status == "SERVING" for status in services.values())
        return JSONResponse({"status": "ok" if ready else "unavailable", "services": services}, 200 if ready else 503)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await gateway.close()

    async def unexpected(request: Request, exc: Exception) -> Response:
        request_id = request_id_of(request)
        logger.error("unhandled gateway error", request_id=request_id, error=type(exc).__name__)
        return errors.internal_error(request_id)

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    local_routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        *openapi.routes(document),
        *auth.routes(),
        *extra_http,
    ]
    http_routes = [*local_routes, Route("/{path:path}", gateway.handle, methods=methods)]
    cors = {
        "allow_origins": settings.cors_origins,
        "allow_credentials": True,
        "allow_methods": methods,
        "allow_headers": [
            "authorization",
            "content-type",
            "x-request-id",
            "idempotency-key",
            "grpc-timeout",
            "traceparent",
            "tracestate",
            "x-csrf-token",
        ],
        "expose_headers": ["x-request-id", "retry-after", "www-authenticate"],
        "max_age": 600,
    }
    limiter = settings.rate_limit if settings.rate_limit.enabled else None

    def outer_layers(stack: ASGIApp) -> ASGIApp:
        """CORS, then rate limiting, then contract requests straight to the gateway; the rest to `stack`.

        Contract requests skip Starlette's error middleware, router and exception middleware: Gateway.handle
        answers every failure itself. Local routes keep them all.
        """
        app: ASGIApp = ContractDispatch(stack, gateway=gateway, local_routes=local_routes, methods=methods)
        if limiter is not None:  # disabled, the limiter is left out rather than asked on every request
            app = RateLimitMiddleware(app, settings=limiter, client_key=auth.client_key)
        return OriginOnlyCORSMiddleware(app, **cors)

    app = _GatewayStarlette(routes=http_routes, lifespan=lifespan, exception_handlers={Exception: unexpected})
    app.outer_layers = outer_layers
    app.state.gateway = gateway
    app.state.browser = auth
    return app
