"""Tenancy business rules: creating, reading and listing workspaces, and provisioning them.

Every method takes the unit of work and the caller explicitly, `(uow, principal, *, ...)`; none
commits (the kit's unit of work does), and events are emitted into the same transaction.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
import uuid
from datetime import datetime

import structlog

from services.kit.db import UnitOfWork
from services.kit.errors import Aborted, Internal, InvalidArgument
from services.kit.ids import uuid7
from services.kit.paging import INVALID_PAGE_TOKEN, PageTokenCodec, page_size, query_key
from services.kit.principal import Principal
from services.tenancy.errors import invalid_field, request_id_reused, workspace_not_found
from services.tenancy.models import (
    DISPLAY_NAME_MAX_CHARS,
    Workspace,
    WorkspacePage,
    workspace_message,
)
from services.tenancy.repository import WorkspaceRepository
from tessera.tenancy.v1 import tenancy_events_pb2

DISPLAY_NAME_FIELD = "workspace.display_name"
PAGE_TOKEN_FIELD = "page_token"  # noqa: S105  # a field name, not a secret
# Binds page tokens to this query (a ListWorkspaces token is refused by any other listing).
LIST_WORKSPACES_QUERY_KEY = query_key("tessera.tenancy.v1.TenancyService/ListWorkspaces", "create_time desc, id desc")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

log = structlog.get_logger("tessera.tenancy")


def validate_display_name(display_name: str) -> None:
    """1 to 100 characters, not only whitespace, no control characters."""
    if not display_name.strip():
        raise invalid_field(DISPLAY_NAME_FIELD, "must not be empty or only whitespace")
    if len(display_name) > DISPLAY_NAME_MAX_CHARS:
        raise invalid_field(DISPLAY_NAME_FIELD, f"must be at most {DISPLAY_NAME_MAX_CHARS} characters")
    if any(unicodedata.category(char) == "Cc" for char in display_name):
        raise invalid_field(DISPLAY_NAME_FIELD, "must not contain control characters")


def create_fingerprint(*, display_name: str) -> str:
    """A stable hash of the CreateWorkspace payload, to tell a retry from a reused request_id."""
    canonical = json.dumps({"display_name": display_name}, sort_keys=True, separators=(",", ":"))
    return "v1:" + hashlib.sha256(canonical.encode()).hexdigest()


class TenancyService:
    """Workspace rules; holds only the page token codec (no connections, no request state)."""

    def __init__(self, *, page_tokens: PageTokenCodec) -> None:
        self.page_tokens = page_tokens

    async def create_workspace(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        display_name: str,
        request_id: uuid.UUID | None = None,
    ) -> Workspace:
        """Create a PROVISIONING workspace owned by the caller; a retried request_id returns the first one."""
        validate_display_name(display_name)
        creator = uuid.UUID(principal.subject)
        fingerprint = create_fingerprint(display_name=display_name) if request_id is not None else None
        repository = WorkspaceRepository(uow)
        created = await repository.insert(
            workspace_id=uuid7(),
            display_name=display_name,
            creator=creator,
            request_id=request_id,
            request_fingerprint=fingerprint,
        )
        if created is None:
            # Only a request_id conflict skips the insert: this is a retry (or a reuse) of an earlier call.
            if request_id is None:
                raise Internal("workspace insert skipped without a request_id")
            earlier = await repository.find_by_request_id(creator=creator, request_id=request_id)
            if earlier is None:  # the conflicting row vanished between the two statements
                raise Aborted(
                    "concurrent change to the same request_id; retry", metadata={"request_id": str(request_id)}
                )
            if earlier.request_fingerprint != fingerprint:
                raise request_id_reused(request_id)
            return earlier.workspace
        uow.emit(
            tenancy_events_pb2.WorkspaceCreatedEvent(workspace=workspace_message(created)),
            subject=created.name,
            tenant_id=str(created.tenant_id),
        )
        log.info("workspace created", workspace=created.name, creator=str(creator))
        return created

    async def get_workspace(self, uow: UnitOfWork, principal: Principal, *, workspace_id: uuid.UUID) -> Workspace:
        """The workspace if the caller may see it; NOT_FOUND otherwise (absent and foreign look alike)."""
        workspace = await WorkspaceRepository(uow).get_visible(
            workspace_id=workspace_id,
            viewer=uuid.UUID(principal.subject),
            tenant_id=uuid.UUID(principal.tenant_id) if principal.tenant_id else None,
        )
        if workspace is None:
            raise workspace_not_found(workspace_id)
        return workspace

    async def list_workspaces(
        self,
        uow: UnitOfWork,
        principal: Principal,
        *,
        requested_page_size: int = 0,
        page_token: str = "",
    ) -> WorkspacePage:
        """The caller's workspaces, newest first, one keyset page at a time."""
        size = page_size(requested_page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        after = self._decode_cursor(page_token, issued_to=principal.subject) if page_token else None
        rows = await WorkspaceRepository(uow).list_created_by(
            creator=uuid.UUID(principal.subject), after=after, limit=size + 1
        )
        page = list(rows[:size])
        next_token = ""
        if len(rows) > size:
            last = page[-1]
            next_token = self.page_tokens.encode(
                [last.create_time.isoformat(), str(last.id)],
                query_key=LIST_WORKSPACES_QUERY_KEY,
                issued_to=principal.subject,
            )
        return WorkspacePage(page, next_token)

    def _decode_cursor(self, token: str, *, issued_to: str) -> tuple[datetime, uuid.UUID]:
        values = self.page_tokens.decode(token, query_key=LIST_WORKSPACES_QUERY_KEY, issued_to=issued_to)
        try:
            create_time_text, id_text = values
            create_time = datetime.fromisoformat(create_time_text)
            if create_time.tzinfo is None:
                raise ValueError("naive timestamp")
            return create_time, uuid.UUID(id_text)
        except ValueError as error:
            # Signed by us but not a cursor of this query: treat like any other bad token.
            raise InvalidArgument.for_field(
                PAGE_TOKEN_FIELD, "page token is not valid for this query", reason=INVALID_PAGE_TOKEN
            ) from error

    async def provision_workspace(self, uow: UnitOfWork, *, workspace_id: uuid.UUID) -> Workspace | None:
        """Mark a PROVISIONING workspace ACTIVE and emit WorkspaceProvisionedEvent; None if nothing to do."""
        if uow.tenant_id is None or uuid.UUID(uow.tenant_id) != workspace_id:
            raise ValueError(f"provisioning workspaces/{workspace_id} outside its own tenant ({uow.tenant_id})")
        activated = await WorkspaceRepository(uow).activate(workspace_id=workspace_id)
        if activated is None:
            log.info("workspace not provisioning; nothing to do", workspace=f"workspaces/{workspace_id}")
            return None
        uow.emit(
            tenancy_events_pb2.WorkspaceProvisionedEvent(workspace=workspace_message(activated)),
            subject=activated.name,
            tenant_id=str(activated.tenant_id),
        )
        log.info("workspace provisioned", workspace=activated.name)
        return activated
