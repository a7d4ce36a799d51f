"""Logs, metrics and traces: structlog JSON lines on stderr, Prometheus RED metrics, OpenTelemetry spans.

Every log line carries the ambient request data from `services.kit.context` (request id, tenant,
subject), the RPC being served, the current trace and span ids, and anything bound with
`structlog.contextvars.bind_contextvars`.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any, Literal

import structlog
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from prometheus_client import Counter, Histogram, start_http_server
from structlog.typing import EventDict, Processor, WrappedLogger

from services.kit.context import request_id_var, subject_var, tenant_id_var
from services.kit.settings import SettingsError

LogFormat = Literal["json", "console"]
TraceExporter = Literal["none", "console", "otlp"]

RPC_REQUESTS = Counter(
    "tessera_rpc_requests_total",
    "RPCs handled, by gRPC service, method and status code",
    ["service", "method", "code"],
)
RPC_DURATION = Histogram(
    "tessera_rpc_duration_seconds",
    "RPC handling time in the server, by gRPC service and method",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

# (process service name, full gRPC method) of the RPC being served; set once per RPC by the interceptor.
rpc_var: ContextVar[tuple[str, str] | None] = ContextVar("tessera_rpc", default=None)


_process_service: str | None = None


def set_service_name(name: str) -> None:
    """Name the service in every log line of this process (RPC lines name the serving one themselves)."""
    global _process_service
    _process_service = name


def _add_kit_context(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    """Copy the kit's ambient request data and the active trace into the event."""
    rpc = rpc_var.get()
    if rpc is not None:
        event.setdefault("service", rpc[0])
        event.setdefault("rpc_method", rpc[1])
    elif _process_service is not None:
        event.setdefault("service", _process_service)
    request_id = request_id_var.get()
    if request_id is not None:
        event.setdefault("request_id", request_id)
    tenant_id = tenant_id_var.get()
    if tenant_id is not None:
        event.setdefault("tenant_id", tenant_id)
    subject = subject_var.get()
    if subject is not None:
        event.setdefault("subject", subject)
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event.setdefault("trace_id", format(span_context.trace_id, "032x"))
        event.setdefault("span_id", format(span_context.span_id, "016x"))
    return event


def configure_logging(level: str = "INFO", fmt: LogFormat = "json", *, service: str | None = None) -> None:
    """Send structlog and stdlib logging to stderr as JSON lines (or console text) at the given level."""
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _add_kit_context,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if service is not None:
        set_service_name(service)
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        exceptions: list[Processor] = [structlog.processors.dict_tracebacks]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        exceptions = []
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *exceptions, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries (grpc, sqlalchemy, nats, asyncio) log through stdlib logging: render them the same way.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *exceptions, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric_level, logging.INFO))


def get_logger(name: str | None = None) -> Any:
    """A structlog logger (bound lazily, so configure_logging may run later)."""
    return structlog.get_logger(name) if name else structlog.get_logger()


def configure_tracing(service: str, exporter: TraceExporter) -> TracerProvider | None:
    """Install an OpenTelemetry TracerProvider exporting spans (none: keep the no-op provider, return None)."""
    if exporter == "none":
        return None
    span_exporter: SpanExporter
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]  # optional package
                OTLPSpanExporter,
            )
        except ImportError:
            raise SettingsError(
                "invalid configuration:\n  TESSERA_OTEL_EXPORTER: 'otlp' needs the package "
                "opentelemetry-exporter-otlp-proto-grpc, which is not installed"
            ) from None
        span_exporter = OTLPSpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": f"tessera-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    return provider


def start_metrics_server(port: int, *, host: str = "0.0.0.0") -> int:
    """Serve Prometheus /metrics from a daemon thread; returns the bound port (0 picks a free one)."""
    httpd, _thread = start_http_server(port, addr=host)
    return int(httpd.server_port)
