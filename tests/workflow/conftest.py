"""Workflow fixtures: the service's Database logged in as `tessera_workflow`, principals and a workspace scene.

The workflow service takes a workspace token as proof of membership, so a workspace here is just a fresh
id; its members are written into the `members` read model the way the members consumer writes them
(`WorkflowService.record_membership`). Principals are built as the auth interceptor builds them from a
token: `Principal(subject).in_tenant(workspace, role)`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from migrations import runner
from services.kit.authz import ADMIN, MEMBER, OWNER, VIEWER
from services.kit.db import Database
from services.kit.ids import uuid7
from services.kit.paging import PageTokenCodec
from services.kit.principal import Principal
from services.workflow.models import SCHEMA, SERVICE, Item, ItemFields, ItemUpdate, Project
from services.workflow.service import WorkflowService
from services.workflow.workflow import CustomFieldDefinition, CustomFieldType, Workflow
from tessera.common.v1.event_pb2 import EventEnvelope

TEST_PAGE_TOKEN_SECRET = b"workflow-tests-page-token-secret-0123456789"


@pytest.fixture(scope="session")
def workflow_url(admin_url: str) -> str:
    """The session database as the workflow login role (no superuser, no BYPASSRLS, owns nothing)."""
    return runner.service_url(admin_url, SERVICE)


@pytest.fixture(scope="session")
async def workflow_db(workflow_url: str) -> AsyncIterator[Database]:
    db = Database(workflow_url, service=SERVICE, schema=SCHEMA, pool_size=8)
    try:
        yield db
    finally:
        await db.dispose()


def make_service(*, max_items_per_workspace: int = 1_000_000) -> WorkflowService:
    """A WorkflowService with the test page token secret."""
    return WorkflowService(
        page_tokens=PageTokenCodec(TEST_PAGE_TOKEN_SECRET), max_items_per_workspace=max_items_per_workspace
    )


@pytest.fixture
def service() -> WorkflowService:
    return make_service()


def acting(workspace_id: uuid.UUID, role: str, *, subject: str | None = None, kind: str = "user") -> Principal:
    """A caller with a workspace token for `workspace_id` and `role`."""
    return Principal(subject=subject or str(uuid7()), kind=kind).in_tenant(str(workspace_id), role)


ESTIMATE = CustomFieldDefinition("estimate", "Estimate", CustomFieldType.NUMBER)
SEVERITY = CustomFieldDefinition("severity", "Severity", CustomFieldType.ENUM, ("low", "high"))
DUE_REVIEW = CustomFieldDefinition("review_at", "Review at", CustomFieldType.TIMESTAMP)
TEAM = CustomFieldDefinition("team", "Team", CustomFieldType.STRING)
BLOCKED = CustomFieldDefinition("blocked", "Blocked", CustomFieldType.BOOLEAN)
CUSTOM_FIELDS = (ESTIMATE, SEVERITY, DUE_REVIEW, TEAM, BLOCKED)


@dataclass
class Scene:
    """A workspace with an owner, an admin, a member and a viewer (all in the members read model)."""

    db: Database
    service: WorkflowService
    workspace_id: uuid.UUID
    by_role: dict[str, Principal] = field(default_factory=dict)

    @property
    def owner(self) -> Principal:
        return self.by_role[OWNER]

    @property
    def member(self) -> Principal:
        return self.by_role[MEMBER]

    @property
    def viewer(self) -> Principal:
        return self.by_role[VIEWER]

    def user_name(self, role: str) -> str:
        return f"users/{self.by_role[role].subject}"

    async def add_member(
        self, role: str | None, *, user_id: uuid.UUID | None = None, at: datetime | None = None
    ) -> str:
        """Record a membership in the read model as the consumer would; the user's name."""
        user = user_id or uuid7()
        async with self.db.unit_of_work(None, tenant_id=str(self.workspace_id)) as uow:
            await self.service.record_membership(
                uow, workspace_id=self.workspace_id, user_id=user, role=role, change_time=at or datetime.now(UTC)
            )
        return f"users/{user}"

    async def create_project(
        self,
        principal: Principal | None = None,
        *,
        display_name: str = "Project",
        workflow: Workflow | None = None,
        custom_fields: tuple[CustomFieldDefinition, ...] = CUSTOM_FIELDS,
        request_id: uuid.UUID | None = None,
    ) -> Project:
        caller = principal or self.owner
        async with self.db.unit_of_work(caller) as uow:
            return await self.service.create_project(
                uow,
                caller,
                workspace_id=self.workspace_id,
                project_id=uuid7(),
                display_name=display_name,
                workflow=workflow,
                custom_fields=custom_fields,
                request_id=request_id,
            )

    async def update_project(self, project: Project, *, principal: Principal | None = None, **options: Any) -> Project:
        caller = principal or self.owner
        async with self.db.unit_of_work(caller) as uow:
            return await self.service.update_project(
                uow, caller, workspace_id=project.workspace_id, project_id=project.id, **options
            )

    async def create_item(
        self,
        project: Project,
        principal: Principal | None = None,
        *,
        request_id: uuid.UUID | None = None,
        **values: Any,
    ) -> Item:
        caller = principal or self.member
        values.setdefault("title", "An item")
        async with self.db.unit_of_work(caller) as uow:
            return await self.service.create_item(
                uow,
                caller,
                workspace_id=self.workspace_id,
                project_id=project.id,
                item_id=uuid7(),
                fields=ItemFields(**values),
                request_id=request_id,
            )

    async def get_item(self, item: Item, principal: Principal | None = None) -> Item:
        caller = principal or self.viewer
        async with self.db.unit_of_work(caller) as uow:
            return await self.service.get_item(
                uow, caller, workspace_id=item.workspace_id, project_id=item.project_id, item_id=item.id
            )

    async def update_item(
        self,
        item: Item,
        *,
        mask: tuple[str, ...] = (),
        etag: str = "",
        principal: Principal | None = None,
        **values: Any,
    ) -> Item:
        caller = principal or self.member
        update = ItemUpdate(item.workspace_id, item.project_id, item.id, ItemFields(**values), mask, etag)
        async with self.db.unit_of_work(caller) as uow:
            return await self.service.update_item(uow, caller, update=update)

    async def transition(self, item: Item, status: str, *, etag: str = "", principal: Principal | None = None) -> Item:
        caller = principal or self.member
        async with self.db.unit_of_work(caller) as uow:
            return await self.service.transition_item(
                uow,
                caller,
                workspace_id=item.workspace_id,
                project_id=item.project_id,
                item_id=item.id,
                status=status,
                etag=etag,
            )

    async def mark(self, action: str, item: Item, *, principal: Principal | None = None, **options: Any) -> Item:
        """archive / unarchive / delete / undelete."""
        caller = principal or self.member
        async with self.db.unit_of_work(caller) as uow:
            method = getattr(self.service, f"{action}_item")
            result: Item = await method(
                uow, caller, workspace_id=item.workspace_id, project_id=item.project_id, item_id=item.id, **options
            )
            return result


@pytest.fixture
async def scene(workflow_db: Database, service: WorkflowService) -> Scene:
    """A fresh workspace with one principal per role, each a member in the read model."""
    workspace_id = uuid7()
    built = Scene(workflow_db, service, workspace_id)
    for role in (OWNER, ADMIN, MEMBER, VIEWER):
        principal = acting(workspace_id, role)
        built.by_role[role] = principal
        await built.add_member(role, user_id=uuid.UUID(principal.subject))
    return built


async def outbox_events(admin: asyncpg.Connection, *, tenant: uuid.UUID, event_type: str = "") -> list[EventEnvelope]:
    """Envelopes of the tenant (of one type, if given) in the workflow outbox, in commit order."""
    rows = await admin.fetch("SELECT envelope FROM workflow.outbox ORDER BY id")
    envelopes = [EventEnvelope.FromString(row["envelope"]) for row in rows]
    return [e for e in envelopes if e.tenant_id == str(tenant) and (not event_type or e.type == event_type)]


async def activity_rows(admin: asyncpg.Connection, item: Item) -> list[asyncpg.Record]:
    """The item's activity rows as stored, oldest first."""
    return await admin.fetch(  # type: ignore[no-any-return]  # asyncpg is untyped
        "SELECT kind, field, before::text AS before, after::text AS after, actor, request_id "
        "FROM workflow.activities WHERE tenant_id = $1 AND item_id = $2 ORDER BY id",
        item.workspace_id,
        item.id,
    )
