"""The role matrix, the rules read from method descriptors, and the principal's tenant check."""

from __future__ import annotations

import uuid

import pytest

from services.kit.authz import (
    ASSIGNABLE_ROLES,
    PERMISSIONS,
    ROLES,
    auth_rule_for,
    is_role,
    permissions_for,
    role_grants,
)
from services.kit.errors import NotFound
from services.kit.principal import Principal
from tessera.common.v1 import auth_pb2
from tessera.tenancy.v1 import tenancy_service_pb2

pytestmark = pytest.mark.gate("S03")

# The matrix as the issue and the brief state it, written out independently of services.kit.authz.
EVERYTHING = {
    "workspace.read",
    "workspace.update",
    "workspace.delete",
    "workspace.transfer",
    "members.read",
    "members.manage",
    "apikeys.manage",
    "audit.read",
    "projects.manage",  # create and reconfigure projects (workflows, custom fields): owners and admins
    "items.read",
    "items.write",
    "billing.read",
    "billing.manage",
}
EXPECTED = {
    "owner": EVERYTHING,
    "admin": EVERYTHING - {"workspace.delete", "workspace.transfer", "billing.manage"},
    "member": {"workspace.read", "members.read", "items.read", "items.write"},
    "viewer": {"workspace.read", "members.read", "items.read"},
    "billing_manager": {"workspace.read", "members.read", "billing.read", "billing.manage"},
}

TENANCY = tenancy_service_pb2.DESCRIPTOR.services_by_name["TenancyService"]


def test_roles_and_permissions_are_exactly_the_documented_ones() -> None:
    assert ROLES == ("owner", "admin", "member", "viewer", "billing_manager")
    assert set(PERMISSIONS) == EVERYTHING
    assert ASSIGNABLE_ROLES == ("admin", "member", "viewer", "billing_manager")
    assert all(is_role(role) for role in ROLES)
    assert not is_role("root")


@pytest.mark.parametrize("role", list(EXPECTED))
def test_each_role_grants_exactly_its_permissions(role: str) -> None:
    assert permissions_for(role) == EXPECTED[role]
    for permission in EVERYTHING:
        assert role_grants(role, permission) is (permission in EXPECTED[role])


def test_unknown_or_absent_roles_grant_nothing() -> None:
    for role in (None, "", "root", "Owner"):
        assert permissions_for(role) == frozenset()
        assert not role_grants(role, "workspace.read")
    assert not role_grants("owner", "workspace.nuke")


def test_rules_are_read_from_the_method_descriptors() -> None:
    get = auth_rule_for(TENANCY.methods_by_name["GetWorkspace"])
    assert get is not None
    assert (get.level, get.permission) == (auth_pb2.AUTH_LEVEL_WORKSPACE, "workspace.read")
    create = auth_rule_for(TENANCY.methods_by_name["CreateWorkspace"])
    assert create is not None
    assert (create.level, create.permission) == (auth_pb2.AUTH_LEVEL_USER, "")


def test_require_tenant_hides_other_workspaces_as_not_found() -> None:
    workspace = str(uuid.uuid4())
    principal = Principal(subject=str(uuid.uuid4()), tenant_id=workspace, role="viewer")
    principal.require_tenant(workspace, resource=f"workspaces/{workspace}")
    principal.require_tenant(workspace.upper(), resource=f"workspaces/{workspace}")
    other = str(uuid.uuid4())
    for caller, target in ((principal, other), (Principal(subject=principal.subject), workspace)):
        with pytest.raises(NotFound) as failure:
            caller.require_tenant(target, resource=f"workspaces/{target}")
        assert failure.value.metadata == {"resource": f"workspaces/{target}"}
    with pytest.raises(NotFound):
        principal.require_tenant("not-a-uuid", resource="workspaces/not-a-uuid")


def test_in_tenant_keeps_the_caller_and_takes_the_role_permissions() -> None:
    user = Principal(subject=str(uuid.uuid4()), session_id=str(uuid.uuid4()))
    workspace = str(uuid.uuid4())
    owner = user.in_tenant(workspace, "owner")
    assert (owner.subject, owner.tenant_id, owner.role, owner.session_id) == (
        user.subject,
        workspace,
        "owner",
        user.session_id,
    )
    assert owner.scopes == EVERYTHING
    assert owner.has_permission("workspace.delete")
    assert not user.has_permission("workspace.read")
