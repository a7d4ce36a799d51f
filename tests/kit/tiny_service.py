"""A service process for run_service tests: the fake servicer, no database, settings from the environment."""

from __future__ import annotations

from services.kit.server import ServiceRuntime, run_service
from services.kit.settings import KitSettings
from tests.kit.fake_service import FakeTenancy, fake_binding


async def build(settings: KitSettings) -> ServiceRuntime:
    return ServiceRuntime(name="tiny", settings=settings, bindings=[fake_binding(FakeTenancy())])


if __name__ == "__main__":
    run_service(build, KitSettings)
