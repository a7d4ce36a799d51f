"""The grpc.aio server of one service process: bootstrap, health, reflection, graceful shutdown.

`ServiceRuntime` owns the server, the health servicer, the background services (outbox relay,
consumers, the revocation list) and the database pool; with TESSERA_AUTH=enforced it verifies
tokens with the given verifier or, by default, with the identity service's JWKS
(TESSERA_IDENTITY_ADDRESS); `run_service` is the process entry point every
`services/<domain>/main.py` calls.

Shutdown order: every health status becomes NOT_SERVING (and stays so), an optional drain pause lets
load balancers and probes notice, then the server stops accepting RPCs and gives in-flight ones the
grace period, then background services stop in reverse start order, then the database pool closes.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from services.kit.client import close_channels
from services.kit.db import Database
from services.kit.interceptors import KitInterceptor
from services.kit.observability import configure_logging, configure_tracing, set_service_name, start_metrics_server
from services.kit.revocation import RevocationList
from services.kit.settings import KitSettings, SettingsError, load_settings
from services.kit.tokens import GrpcJwksProvider, TokenVerifier

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

_log = structlog.get_logger("tessera.server")

S = TypeVar("S", bound=KitSettings)


@dataclass(frozen=True, slots=True)
class ServicerBinding:
    """One gRPC service of the process: its full proto name, the servicer and the generated add function."""

    service_name: str
    servicer: object
    add_to_server: Callable[[Any, Any], None]


class BackgroundService(Protocol):
    """Work that runs beside the server (outbox relay, consumers): started after bind, stopped after drain."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ServiceRuntime:
    """The server of one service process with its health, reflection, background work and database."""

    def __init__(
        self,
        *,
        name: str,
        settings: KitSettings,
        bindings: Sequence[ServicerBinding],
        database: Database | None = None,
        background: Sequence[BackgroundService] = (),
        drain_seconds: float | None = None,
        verifier: TokenVerifier | None = None,
        revocations: RevocationList | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.bindings = tuple(bindings)
        self.database = database
        # The revocation list starts after the other background services (the broker it reads from).
        if revocations is not None and revocations not in background:
            background = (*background, revocations)
        self.background = tuple(background)
        # Pause between NOT_SERVING and refusing new RPCs (TESSERA_SHUTDOWN_DRAIN_SECONDS unless given).
        self.drain_seconds = drain_seconds if drain_seconds is not None else settings.shutdown_drain_seconds
        self.health = health.aio.HealthServicer()
        self._jwks: GrpcJwksProvider | None = None
        if settings.auth == "enforced" and verifier is None:
            if settings.identity_address is None:
                raise SettingsError(
                    "invalid configuration:\n  TESSERA_IDENTITY_ADDRESS: is required when TESSERA_AUTH=enforced"
                )
            self._jwks = GrpcJwksProvider(settings.identity_address)
            verifier = TokenVerifier(self._jwks, issuer=settings.token_issuer, audience=settings.token_audience)
        self.verifier = verifier
        self.revocations = revocations
        self.interceptor = KitInterceptor(name, settings, verifier=verifier, revocations=revocations)
        self._server: Any = None
        self._port: int | None = None
        self._started_background: list[BackgroundService] = []
        self._stopping = False
        self._closed = asyncio.Event()

    @property
    def port(self) -> int:
        """The bound port (after start)."""
        if self._port is None:
            raise RuntimeError(f"service {self.name} is not started")
        return self._port

    @property
    def service_names(self) -> list[str]:
        """The business services of this process (full proto names)."""
        return [binding.service_name for binding in self.bindings]

    async def start(self) -> int:
        """Bind, start serving, start background services, then report SERVING; returns the bound port."""
        if self._server is not None:
            raise RuntimeError(f"service {self.name} is already started")
        interceptors: list[Any] = [self.interceptor]
        if self.settings.otel_exporter != "none":
            # OpenTelemetry first (remote trace context, server span), the kit interceptor last. Without an
            # exporter it is left out: even with the no-op tracer it costs about 0.1 ms of CPU per RPC.
            interceptors.insert(0, aio_server_interceptor())  # type: ignore[no-untyped-call]  # untyped library
        # A port in use is an error, never a silently shared listener, unless sharing is asked for.
        reuse_port = ("grpc.so_reuseport", 1 if self.settings.grpc_reuse_port else 0)
        server = grpc.aio.server(interceptors=interceptors, options=[reuse_port, *SERVER_OPTIONS])
        for binding in self.bindings:
            binding.add_to_server(binding.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME],
            server,
        )
        for service in ("", *self.service_names):
            await self.health.set(service, _NOT_SERVING)
        address = _address(self.settings.grpc_host, self.settings.grpc_port)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        self._server = server
        self._port = port = int(port)
        await server.start()
        try:
            for background in self.background:
                await background.start()
                self._started_background.append(background)
        except BaseException:
            await self.stop()
            raise
        for service in ("", *self.service_names):
            await self.health.set(service, _SERVING)
        return port

    async def stop(self) -> None:
        """NOT_SERVING, drain pause, stop the server within the grace period, stop background work, close the DB."""
        if self._stopping:
            await self._closed.wait()
            return
        self._stopping = True
        try:
            await self.health.enter_graceful_shutdown()
            if self._server is not None:
                if self.drain_seconds > 0:
                    await asyncio.sleep(self.drain_seconds)
                await self._server.stop(self.settings.shutdown_grace_seconds)
            for background in reversed(self._started_background):
                try:
                    await background.stop()
                except Exception:
                    _log.exception("background service failed to stop", background=type(background).__name__)
            self._started_background.clear()
            if self.database is not None:
                await self.database.dispose()
            if self._jwks is not None:
                await self._jwks.close()
        finally:
            self._closed.set()

    async def wait_closed(self) -> None:
        """Return once stop() has finished."""
        await self._closed.wait()


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def run_service(build: Callable[[S], Awaitable[ServiceRuntime]], settings_cls: type[S]) -> None:
    """Process entry point: settings, logging, metrics, tracing, serve until SIGTERM/SIGINT, shut down cleanly."""
    try:
        settings = load_settings(settings_cls)
    except SettingsError as exc:
        print(f"{settings_cls.__name__}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    try:
        import uvloop
    except ImportError:  # uvloop is not built for Windows
        code = asyncio.run(_serve(build, settings))
    else:
        code = uvloop.run(_serve(build, settings))
    if code:
        raise SystemExit(code)


async def _serve(build: Callable[[S], Awaitable[ServiceRuntime]], settings: S) -> int:
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    try:
        runtime = await build(settings)
    except SettingsError as exc:
        print(f"{type(settings).__name__}: {exc}", file=sys.stderr)
        return 2
    except Exception:
        _log.exception("service failed to build")
        return 1
    set_service_name(runtime.name)
    try:
        tracer_provider = configure_tracing(runtime.name, settings.otel_exporter)
    except SettingsError as exc:
        print(f"{type(settings).__name__}: {exc}", file=sys.stderr)
        await runtime.stop()
        return 2
    try:
        metrics_port = None
        if settings.metrics_port is not None:
            metrics_port = start_metrics_server(settings.metrics_port, host=settings.grpc_host)
        port = await runtime.start()
    except Exception:
        _log.exception("service failed to start")
        await runtime.stop()
        return 1
    _log.info(
        "service ready",
        port=port,
        host=settings.grpc_host,
        metrics_port=metrics_port,
        services=runtime.service_names,
        auth=settings.auth,
    )
    closed = asyncio.ensure_future(runtime.wait_closed())
    requested = asyncio.ensure_future(stop_requested.wait())
    await asyncio.wait([closed, requested], return_when=asyncio.FIRST_COMPLETED)
    requested.cancel()
    _log.info("service stopping", grace_seconds=settings.shutdown_grace_seconds)
    await runtime.stop()
    await close_channels()
    closed.cancel()
    if tracer_provider is not None:
        tracer_provider.shutdown()
    _log.info("service stopped")
    return 0
