"""Who is calling: the frozen Principal every service method receives explicitly."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

# The development principal's user id. Only the development auth mode (TESSERA_AUTH=development,
# refused in production settings) ever produces it; enforced mode never does.
DEVELOPMENT_USER_ID = "00000000-0000-7000-8000-00000000d0e0"

# Metadata key that selects the development user (a UUID) in development auth mode.
DEVELOPMENT_USER_HEADER = "x-tessera-dev-user"


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller: a user (subject), optionally acting in one workspace with one role."""

    subject: str
    tenant_id: str | None = None
    role: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        uuid.UUID(self.subject)
        if self.tenant_id is not None:
            uuid.UUID(self.tenant_id)

    def in_tenant(self, tenant_id: str, role: str | None = None) -> Principal:
        """The same caller acting in a given workspace."""
        return Principal(self.subject, tenant_id, role if role is not None else self.role, self.scopes)
