"""Who is calling: the frozen Principal every service method receives explicitly."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace

from services.kit.authz import permissions_for
from services.kit.errors import NotFound

# The development principal's user id. Only the disabled auth mode (TESSERA_AUTH=disabled, refused in
# production settings) ever produces it; enforced mode never does.
DEVELOPMENT_USER_ID = "00000000-0000-7000-8000-00000000d0e0"

# Metadata keys that select the caller in disabled auth mode: a user id (UUID), and optionally a
# workspace id (UUID) with a role in it. Enforced mode ignores them.
DEVELOPMENT_USER_HEADER = "x-tessera-dev-user"
DEVELOPMENT_WORKSPACE_HEADER = "x-tessera-dev-workspace"
DEVELOPMENT_ROLE_HEADER = "x-tessera-dev-role"


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller: a user (subject), optionally acting in one workspace with one role.

    `scopes` are the permissions of the role; `session_id` is the session (or API key) the token belongs
    to; `kind` is `user` or `api_key`.
    """

    subject: str
    tenant_id: str | None = None
    role: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)
    session_id: str | None = None
    kind: str = "user"

    def __post_init__(self) -> None:
        uuid.UUID(self.subject)
        if self.tenant_id is not None:
            uuid.UUID(self.tenant_id)

    def in_tenant(self, tenant_id: str, role: str | None = None) -> Principal:
        """The same caller acting in a given workspace (with the role's permissions when a role is given)."""
        if role is None:
            return replace(self, tenant_id=tenant_id)
        return replace(self, tenant_id=tenant_id, role=role, scopes=permissions_for(role))

    def has_permission(self, permission: str) -> bool:
        """Whether the caller's role in its workspace grants the permission."""
        return permission in self.scopes

    def require_tenant(self, workspace_id: str, *, resource: str) -> None:
        """NOT_FOUND for `resource` unless the caller acts in that workspace (another tenant's data is invisible)."""
        if self.tenant_id is None or not _same_uuid(self.tenant_id, workspace_id):
            raise NotFound.resource(resource)


def _same_uuid(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return uuid.UUID(a) == uuid.UUID(b)
    except ValueError:
        return False
