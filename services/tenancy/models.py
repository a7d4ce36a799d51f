"""Tenancy domain types, the Core tables they live in, and their mapping to the contract.

The tables mirror migrations/versions/0001_tenancy_workspaces.py; migrations own the schema, these
objects only describe it to SQLAlchemy Core (no ORM: the hot paths run a single Core statement).
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from google.protobuf import timestamp_pb2

from tessera.tenancy.v1 import tenancy_pb2

SERVICE = "tenancy"
SCHEMA = "tenancy"
WORKSPACE_NAME_PREFIX = "workspaces/"
DISPLAY_NAME_MAX_CHARS = 100

metadata = sa.MetaData(schema=SCHEMA)

workspaces = sa.Table(
    "workspaces",
    metadata,
    sa.Column("tenant_id", sa.Uuid, nullable=False),
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("creator", sa.Uuid, nullable=False),
    sa.Column("request_id", sa.Uuid),
    sa.Column("request_fingerprint", sa.Text),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)


class WorkspaceState(enum.StrEnum):
    """Lifecycle of a workspace: PROVISIONING until the provisioner handled its creation event."""

    PROVISIONING = "PROVISIONING"
    ACTIVE = "ACTIVE"


@dataclass(frozen=True, slots=True)
class Workspace:
    """A workspace, the tenant: every tenant-owned resource lives under `workspaces/{id}`."""

    id: uuid.UUID
    display_name: str
    state: WorkspaceState
    creator: uuid.UUID
    create_time: datetime
    update_time: datetime

    @property
    def name(self) -> str:
        return workspace_name(self.id)

    @property
    def tenant_id(self) -> uuid.UUID:
        return self.id


@dataclass(frozen=True, slots=True)
class WorkspacePage:
    """One page of a listing and the token of the next one ("" on the last page)."""

    workspaces: list[Workspace] = field(default_factory=list)
    next_page_token: str = ""


def workspace_name(workspace_id: uuid.UUID) -> str:
    """The resource name `workspaces/{id}`."""
    return f"{WORKSPACE_NAME_PREFIX}{workspace_id}"


_STATE_TO_PROTO = {
    WorkspaceState.PROVISIONING: tenancy_pb2.WORKSPACE_STATE_PROVISIONING,
    WorkspaceState.ACTIVE: tenancy_pb2.WORKSPACE_STATE_ACTIVE,
}


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def workspace_message(workspace: Workspace) -> tenancy_pb2.Workspace:
    """The contract form of a workspace (used for responses and event payloads alike)."""
    return tenancy_pb2.Workspace(
        name=workspace.name,
        display_name=workspace.display_name,
        state=_STATE_TO_PROTO[workspace.state],
        creator=str(workspace.creator),
        create_time=_timestamp(workspace.create_time),
        update_time=_timestamp(workspace.update_time),
    )
