"""Tenancy fixtures: the service's Database logged in as `tessera_tenancy`, principals, workspaces with members.

Principals are built the way the auth interceptor builds them from a token: a user-level one
(`Principal(subject)`) and, for a workspace, `in_tenant(workspace, role)` (the role's permissions as scopes).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import asyncpg
import pytest

from migrations import runner
from services.kit.authz import OWNER
from services.kit.db import Database
from services.kit.ids import uuid7
from services.kit.paging import PageTokenCodec
from services.kit.principal import Principal
from services.tenancy.models import SCHEMA, SERVICE, Member, Workspace
from services.tenancy.service import TenancyService, invitation_token_workspace
from tessera.common.v1.event_pb2 import EventEnvelope

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


def make_service(
    *, invitation_ttl: timedelta = timedelta(days=7), restore_window: timedelta = timedelta(days=30)
) -> TenancyService:
    """A TenancyService with the test page token secret."""
    return TenancyService(
        page_tokens=PageTokenCodec(TEST_PAGE_TOKEN_SECRET), invitation_ttl=invitation_ttl, restore_window=restore_window
    )


@pytest.fixture
def tenancy_service() -> TenancyService:
    return make_service()


def new_user() -> Principal:
    """A user-level principal for a user nobody else in the session uses (tests share one database)."""
    return Principal(subject=str(uuid7()))


def acting(user: Principal, workspace: Workspace | uuid.UUID, role: str) -> Principal:
    """The user with a workspace-scoped token for `workspace` and `role`."""
    workspace_id = workspace.id if isinstance(workspace, Workspace) else workspace
    return Principal(subject=user.subject).in_tenant(str(workspace_id), role)


@pytest.fixture
def alice() -> Principal:
    return new_user()


@pytest.fixture
def bob() -> Principal:
    return new_user()


async def create_workspace(
    db: Database,
    service: TenancyService,
    user: Principal,
    display_name: str = "Acme",
    request_id: uuid.UUID | None = None,
) -> Workspace:
    """CreateWorkspace as the servicer runs it: a unit of work opened for the new workspace."""
    workspace_id = uuid7()
    async with db.unit_of_work(user, tenant_id=str(workspace_id)) as uow:
        return await service.create_workspace(
            uow, user, workspace_id=workspace_id, display_name=display_name, request_id=request_id
        )


async def invite(
    db: Database, service: TenancyService, inviter: Principal, *, email: str, role: str
) -> tuple[uuid.UUID, str]:
    """Invite an address; the invitation id and the token (as the InvitationCreatedEvent carries it)."""
    assert inviter.tenant_id is not None
    workspace_id = uuid.UUID(inviter.tenant_id)
    async with db.unit_of_work(inviter) as uow:
        created = await service.create_invitation(uow, inviter, workspace_id=workspace_id, email=email, role=role)
    return created.invitation.id, created.token


async def accept(db: Database, service: TenancyService, user: Principal, token: str) -> Member:
    """AcceptInvitation as the servicer runs it: a unit of work in the token's workspace."""
    async with db.unit_of_work(user, tenant_id=str(invitation_token_workspace(token))) as uow:
        return await service.accept_invitation(uow, user, token=token)


@dataclass
class Team:
    """A workspace with its owner and, per role, a member acting in it with that role."""

    workspace: Workspace
    owner: Principal
    by_role: dict[str, Principal] = field(default_factory=dict)

    def user(self, role: str) -> Principal:
        return self.owner if role == OWNER else self.by_role[role]


TeamFactory = Callable[..., Awaitable[Team]]


@pytest.fixture
def make_team(tenancy_db: Database, tenancy_service: TenancyService) -> TeamFactory:
    """Build a workspace whose owner invited one member per requested role (each accepted)."""

    async def build(*roles: str, display_name: str = "Team") -> Team:
        owner_user = new_user()
        workspace = await create_workspace(tenancy_db, tenancy_service, owner_user, display_name)
        team = Team(workspace, acting(owner_user, workspace, OWNER))
        for role in roles:
            user = new_user()
            _, token = await invite(
                tenancy_db, tenancy_service, team.owner, email=f"{user.subject}@example.com", role=role
            )
            await accept(tenancy_db, tenancy_service, user, token)
            team.by_role[role] = acting(user, workspace, role)
        return team

    return build


async def outbox_envelopes(admin: asyncpg.Connection, *, tenant: uuid.UUID, event_type: str) -> list[EventEnvelope]:
    """Envelopes of one type and tenant in the tenancy outbox (read as superuser; no relay runs here)."""
    rows = await admin.fetch("SELECT envelope FROM tenancy.outbox ORDER BY id")
    envelopes = [EventEnvelope.FromString(row["envelope"]) for row in rows]
    return [e for e in envelopes if e.tenant_id == str(tenant) and e.type == event_type]
