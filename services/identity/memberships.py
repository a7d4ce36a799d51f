"""The caller's role in a workspace, asked of the tenancy service (TenancyService.LookupMembership).

The call runs on behalf of the caller being served: it carries their bearer token and request id
(`outgoing_metadata`) and never outlives their deadline (`outgoing_timeout`).
"""

from __future__ import annotations

import uuid
from typing import Protocol

import grpc
import structlog

from services.identity.models import workspace_name
from services.kit.authz import ROLES
from services.kit.client import outgoing_metadata, outgoing_timeout, service_channel
from services.kit.errors import Internal, NotFound, Unauthenticated, Unavailable
from tessera.tenancy.v1 import tenancy_service_pb2, tenancy_service_pb2_grpc

DEFAULT_TIMEOUT_SECONDS = 5.0

log = structlog.get_logger("tessera.identity.memberships")


class MembershipLookup(Protocol):
    """Where IssueWorkspaceToken learns the caller's role in a workspace."""

    async def caller_role(self, *, workspace_id: uuid.UUID) -> str:
        """The calling user's role in the workspace; NotFound if they are not a member (or it is gone)."""
        ...


class TenancyMemberships:
    """MembershipLookup over gRPC to the tenancy service at `address` (host:port)."""

    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self.address = address
        self.timeout = timeout

    async def caller_role(self, *, workspace_id: uuid.UUID) -> str:
        """The calling user's role in the workspace, from TenancyService.LookupMembership."""
        stub = tenancy_service_pb2_grpc.TenancyServiceStub(service_channel(self.address))  # type: ignore[no-untyped-call]  # generated
        name = workspace_name(workspace_id)
        try:
            response = await stub.LookupMembership(
                tenancy_service_pb2.LookupMembershipRequest(workspace=name),
                metadata=outgoing_metadata(),
                timeout=outgoing_timeout(self.timeout),
            )
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                raise NotFound.resource(name) from None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated(error.details() or "the tenancy service rejected the token") from None
            log.warning("membership lookup failed", workspace=name, code=code.name, details=error.details())
            raise Unavailable("the tenancy service is unavailable; retry", metadata={"service": "tenancy"}) from None
        role = response.member.role
        if role not in ROLES:
            raise Internal(f"tenancy answered an unknown role {role!r}")
        return str(role)
