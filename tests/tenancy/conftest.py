"""Tenancy fixtures: the service's Database logged in as `tessera_tenancy`, principals, a service instance."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from migrations import runner
from services.kit.db import Database
from services.kit.ids import uuid7
from services.kit.paging import PageTokenCodec
from services.kit.principal import Principal
from services.tenancy.models import SCHEMA, SERVICE
from services.tenancy.service import TenancyService

TEST_PAGE_TOKEN_SECRET = b"tenancy-tests-page-token-secret-0123456789"


@pytest.fixture(scope="session")
def tenancy_url(admin_url: str) -> str:
    """The session database as the tenancy login role (no superuser, no BYPASSRLS, owns nothing)."""
    return runner.service_url(admin_url, SERVICE)


@pytest.fixture(scope="session")
async def tenancy_db(tenancy_url: str) -> AsyncIterator[Database]:
    db = Database(tenancy_url, service=SERVICE, schema=SCHEMA, pool_size=4)
    try:
        yield db
    finally:
        await db.dispose()


@pytest.fixture
def tenancy_service() -> TenancyService:
    return TenancyService(page_tokens=PageTokenCodec(TEST_PAGE_TOKEN_SECRET))


def new_user() -> Principal:
    """A principal for a user nobody else in the session uses (tests share one database)."""
    return Principal(subject=str(uuid7()))


@pytest.fixture
def alice() -> Principal:
    return new_user()


@pytest.fixture
def bob() -> Principal:
    return new_user()
