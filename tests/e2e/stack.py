"""The whole service mesh in this test process: every service built by its own `main.build()`.

Each service gets the same settings a deployment would give it (its own login role, the session
NATS, enforced auth, the other services' addresses); only ports are chosen here. Adding a service to
Tessera means adding one line to `SERVICES` below (the generated authorization suite fails for an RPC
whose service is not running).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from migrations import runner
from services.identity.main import build as build_identity
from services.identity.settings import IdentitySettings
from services.kit.server import ServiceRuntime
from services.kit.settings import KitSettings, load_settings
from services.tenancy.main import build as build_tenancy
from services.tenancy.settings import TenancySettings
from services.workflow.main import build as build_workflow
from services.workflow.settings import WorkflowSettings
from tessera_cli.embedded import free_port


@dataclass(frozen=True)
class ServiceEntry:
    name: str
    grpc_service: str
    settings_cls: type[KitSettings]
    build: Callable[[Any], Awaitable[ServiceRuntime]]


SERVICES = (
    ServiceEntry("identity", "tessera.identity.v1.IdentityService", IdentitySettings, build_identity),
    ServiceEntry("tenancy", "tessera.tenancy.v1.TenancyService", TenancySettings, build_tenancy),
    ServiceEntry("workflow", "tessera.workflow.v1.WorkflowService", WorkflowSettings, build_workflow),
)

# Limits generous enough for suites that sign in many users from 127.0.0.1 in seconds.
_TEST_OVERRIDES: dict[str, dict[str, Any]] = {
    "identity": {
        "sign_in_limit_per_address": 10_000,
        "sign_in_limit_per_account": 1_000,
        "sign_up_limit_per_address": 10_000,
        "refresh_limit_per_address": 10_000,
        "argon2_time_cost": 1,
        "argon2_memory_kib": 1024,
        "argon2_parallelism": 1,
    },
    "tenancy": {},
    "workflow": {},
}


@dataclass
class Mesh:
    """Running services: gRPC address by full service name."""

    addresses: dict[str, str]
    runtimes: dict[str, ServiceRuntime]

    def address_of(self, grpc_service: str) -> str:
        return self.addresses[grpc_service]


@asynccontextmanager
async def running_mesh(admin_url: str, nats_url: str, **extra: dict[str, Any]) -> AsyncIterator[Mesh]:
    """Start every service (enforced auth) on free ports; stop them all afterwards."""
    ports = {entry.name: free_port() for entry in SERVICES}
    addresses = {f"{name}_address": f"127.0.0.1:{port}" for name, port in ports.items()}
    runtimes: dict[str, ServiceRuntime] = {}
    try:
        for entry in SERVICES:
            overrides: dict[str, Any] = {
                "database_url": runner.service_url(admin_url, entry.name),
                "nats_url": nats_url,
                "grpc_host": "127.0.0.1",
                "grpc_port": ports[entry.name],
                "auth": "enforced",
                "environment": "test",
                "log_level": "WARNING",
                **{key: value for key, value in addresses.items() if key in entry.settings_cls.model_fields},
                **_TEST_OVERRIDES.get(entry.name, {}),
                **extra.get(entry.name, {}),
            }
            settings = load_settings(entry.settings_cls, **overrides)
            runtime = await entry.build(settings)
            await runtime.start()
            runtimes[entry.name] = runtime
        yield Mesh(
            addresses={entry.grpc_service: f"127.0.0.1:{ports[entry.name]}" for entry in SERVICES},
            runtimes=runtimes,
        )
    finally:
        for runtime in reversed(list(runtimes.values())):
            await runtime.stop()
