"""Every RPC of every contract declares its authorization rule, and every rule fits the role matrix.

The walk imports each generated `*_service_pb2` module under gen/tessera and checks every method of
every service in it: a missing `(tessera.common.v1.auth)` option, AUTH_LEVEL_UNSPECIFIED, a WORKSPACE
rule without a permission or with one missing from the matrix, or a PUBLIC/USER rule naming a
permission fails the test. The same check is shown to catch each kind of bad rule on a synthetic
contract, so it cannot pass by checking nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from services.kit.authz import PERMISSIONS, auth_rule_for, rule_problem
from tessera.common.v1 import auth_pb2

pytestmark = [pytest.mark.gate("S01"), pytest.mark.gate("S03")]

GEN = Path(__file__).resolve().parents[2] / "gen"


def service_modules() -> list[str]:
    """Dotted names of every generated service module (`tessera.<domain>.v1.<domain>_service_pb2`)."""
    return sorted(
        ".".join(path.relative_to(GEN).with_suffix("").parts) for path in (GEN / "tessera").rglob("*_service_pb2.py")
    )


def contract_services() -> list[ServiceDescriptor]:
    services: list[ServiceDescriptor] = []
    for name in service_modules():
        module = importlib.import_module(name)
        services.extend(module.DESCRIPTOR.services_by_name.values())
    return services


def methods(services: list[ServiceDescriptor]) -> Iterator[MethodDescriptor]:
    for service in services:
        yield from service.methods


def problems(services: list[ServiceDescriptor]) -> list[str]:
    """One line per RPC whose rule is missing or unusable."""
    found = []
    for method in methods(services):
        problem = rule_problem(auth_rule_for(method))
        if problem is not None:
            found.append(f"{method.full_name} {problem}")
    return found


def test_the_walk_finds_every_service_of_the_contracts() -> None:
    names = {service.full_name for service in contract_services()}
    assert {"tessera.tenancy.v1.TenancyService", "tessera.identity.v1.IdentityService"} <= names
    assert len(list(methods(contract_services()))) >= 30


def test_every_rpc_declares_a_sound_auth_rule() -> None:
    assert problems(contract_services()) == []


def test_every_permission_named_by_a_contract_is_in_the_matrix_and_used_rules_cover_all_levels() -> None:
    rules = [auth_rule_for(method) for method in methods(contract_services())]
    levels = {rule.level for rule in rules if rule is not None}
    assert levels == {auth_pb2.AUTH_LEVEL_PUBLIC, auth_pb2.AUTH_LEVEL_USER, auth_pb2.AUTH_LEVEL_WORKSPACE}
    named = {rule.permission for rule in rules if rule is not None and rule.permission}
    assert named <= set(PERMISSIONS)


# -- the check catches bad contracts -----------------------------------------------------------------

_BAD_PACKAGE = "tessera.authrulecheck.v1"
_AUTH: Any = auth_pb2.auth  # the generated stub types the extension as a plain FieldDescriptor


def _synthetic_service() -> ServiceDescriptor:
    """A contract (added to the default pool once) with one method per kind of bad rule, and one good one."""
    pool = descriptor_pool.Default()
    name = f"{_BAD_PACKAGE}.CheckedService"
    try:
        return pool.FindServiceByName(name)
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto(
        name="tests/contracts/authrulecheck.proto",
        package=_BAD_PACKAGE,
        syntax="proto3",
        dependency=["tessera/tenancy/v1/tenancy_service.proto", "tessera/common/v1/auth.proto"],
    )
    service = file.service.add(name="CheckedService")
    rules: dict[str, tuple[auth_pb2.AuthLevel, str] | None] = {
        "NoRule": None,
        "Unspecified": (auth_pb2.AUTH_LEVEL_UNSPECIFIED, ""),
        "WorkspaceWithoutPermission": (auth_pb2.AUTH_LEVEL_WORKSPACE, ""),
        "UnknownPermission": (auth_pb2.AUTH_LEVEL_WORKSPACE, "items.delete_everything"),
        "PublicWithPermission": (auth_pb2.AUTH_LEVEL_PUBLIC, "workspace.read"),
        "UserWithPermission": (auth_pb2.AUTH_LEVEL_USER, "members.manage"),
        "Sound": (auth_pb2.AUTH_LEVEL_WORKSPACE, "items.write"),
    }
    for method_name, rule in rules.items():
        method = service.method.add(
            name=method_name,
            input_type=".tessera.tenancy.v1.GetWorkspaceRequest",
            output_type=".tessera.tenancy.v1.GetWorkspaceResponse",
        )
        if rule is not None:
            level, permission = rule
            declared: auth_pb2.AuthRule = method.options.Extensions[_AUTH]
            declared.SetInParent()  # present even with only default values
            declared.level = level
            declared.permission = permission
    pool.AddSerializedFile(file.SerializeToString())
    return pool.FindServiceByName(name)


def test_the_check_reports_each_kind_of_bad_rule() -> None:
    service = _synthetic_service()
    reported = {line.split()[0].rsplit(".", 1)[1]: line for line in problems([service])}
    assert set(reported) == {
        "NoRule",
        "Unspecified",
        "WorkspaceWithoutPermission",
        "UnknownPermission",
        "PublicWithPermission",
        "UserWithPermission",
    }
    assert "declares no (tessera.common.v1.auth) rule" in reported["NoRule"]
    assert "AUTH_LEVEL_UNSPECIFIED" in reported["Unspecified"]
    assert "without a permission" in reported["WorkspaceWithoutPermission"]
    assert "items.delete_everything" in reported["UnknownPermission"]
    assert "AUTH_LEVEL_PUBLIC" in reported["PublicWithPermission"]
    assert "AUTH_LEVEL_USER" in reported["UserWithPermission"]
