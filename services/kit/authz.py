"""The role matrix, in one place, and the authorization rule each RPC declares in its contract.

Every RPC carries a `(tessera.common.v1.auth)` method option (`AuthRule`): PUBLIC (no token), USER (any
valid access token) or WORKSPACE with a permission. A workspace-scoped token carries a role; the role
grants the permissions listed here. Nothing else in the code base maps roles to permissions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.descriptor import MethodDescriptor

from tessera.common.v1 import auth_pb2
from tessera.common.v1.auth_pb2 import AuthRule

OWNER = "owner"
ADMIN = "admin"
MEMBER = "member"
VIEWER = "viewer"
BILLING_MANAGER = "billing_manager"

ROLES: tuple[str, ...] = (OWNER, ADMIN, MEMBER, VIEWER, BILLING_MANAGER)
# Roles that can be given by invitation or role change; ownership only moves by explicit transfer.
ASSIGNABLE_ROLES: tuple[str, ...] = tuple(role for role in ROLES if role != OWNER)

PERMISSIONS: tuple[str, ...] = (
    "workspace.read",
    "workspace.update",
    "workspace.delete",
    "workspace.transfer",
    "members.read",
    "members.manage",
    "apikeys.manage",
    "audit.read",
    "projects.manage",
    "items.read",
    "items.write",
    "billing.read",
    "billing.manage",
)

_ADMIN_EXCLUDED = frozenset({"workspace.delete", "workspace.transfer", "billing.manage"})

ROLE_PERMISSIONS: Mapping[str, frozenset[str]] = {
    OWNER: frozenset(PERMISSIONS),
    ADMIN: frozenset(PERMISSIONS) - _ADMIN_EXCLUDED,
    MEMBER: frozenset({"workspace.read", "members.read", "items.read", "items.write"}),
    VIEWER: frozenset({"workspace.read", "members.read", "items.read"}),
    BILLING_MANAGER: frozenset({"workspace.read", "members.read", "billing.read", "billing.manage"}),
}

PUBLIC = auth_pb2.AUTH_LEVEL_PUBLIC
USER = auth_pb2.AUTH_LEVEL_USER
WORKSPACE = auth_pb2.AUTH_LEVEL_WORKSPACE

_NO_PERMISSIONS: frozenset[str] = frozenset()


def permissions_for(role: str | None) -> frozenset[str]:
    """The permissions a role grants (none for an unknown or absent role)."""
    if role is None:
        return _NO_PERMISSIONS
    return ROLE_PERMISSIONS.get(role, _NO_PERMISSIONS)


def role_grants(role: str | None, permission: str) -> bool:
    """Whether the role grants the permission."""
    return permission in permissions_for(role)


def is_role(value: str) -> bool:
    """Whether the value names a role of the matrix."""
    return value in ROLE_PERMISSIONS


def auth_rule_for(method: MethodDescriptor) -> AuthRule | None:
    """The `(tessera.common.v1.auth)` rule a method declares, or None (callers must then fail closed)."""
    options = method.GetOptions()
    extension: Any = auth_pb2.auth  # the generated stub types it as a plain FieldDescriptor
    if not options.HasExtension(extension):
        return None
    rule = AuthRule()
    rule.CopyFrom(options.Extensions[extension])
    return rule


def rule_problem(rule: AuthRule | None) -> str | None:
    """Why a declared rule is unusable (undeclared, unspecified level, bad permission), or None if it is sound."""
    if rule is None:
        return "declares no (tessera.common.v1.auth) rule"
    if rule.level == WORKSPACE:
        if not rule.permission:
            return "is AUTH_LEVEL_WORKSPACE without a permission"
        if rule.permission not in PERMISSIONS:
            return f"names permission {rule.permission!r}, which is not in the role matrix"
        return None
    if rule.level in (PUBLIC, USER):
        if rule.permission:
            return f"is {auth_pb2.AuthLevel.Name(rule.level)} but names permission {rule.permission!r}"
        return None
    return "has AUTH_LEVEL_UNSPECIFIED"
