"""Service and method descriptors of every contract found under gen/tessera."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from functools import cache
from typing import Any

from google.protobuf import descriptor

import tessera
from tessera.common.v1 import auth_pb2


@cache
def service_descriptors() -> tuple[descriptor.ServiceDescriptor, ...]:
    """Every service declared in a `tessera.<domain>.v1.*_service_pb2` module, sorted by full name."""
    found: dict[str, descriptor.ServiceDescriptor] = {}
    for module_info in pkgutil.walk_packages(tessera.__path__, "tessera."):
        if module_info.name.endswith("_service_pb2"):
            module = importlib.import_module(module_info.name)
            for service in module.DESCRIPTOR.services_by_name.values():
                found[service.full_name] = service
    return tuple(found[name] for name in sorted(found))


def method_descriptors() -> Iterator[descriptor.MethodDescriptor]:
    """Every RPC of every contract service."""
    for service in service_descriptors():
        yield from service.methods


def domain_of(service_full_name: str) -> str:
    """The domain of `tessera.<domain>.v1.XService` (the backend that serves it)."""
    parts = service_full_name.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "tessera" else parts[0]


def domains() -> tuple[str, ...]:
    """Every domain with at least one service, sorted."""
    return tuple(sorted({domain_of(service.full_name) for service in service_descriptors()}))


def auth_rule(method: descriptor.MethodDescriptor) -> auth_pb2.AuthRule | None:
    """The method's `(tessera.common.v1.auth)` rule, or None if it declares none."""
    options = method.GetOptions()
    extension: Any = auth_pb2.auth  # the generated stub types it as a plain FieldDescriptor
    if not options.HasExtension(extension):
        return None
    rule = auth_pb2.AuthRule()
    rule.CopyFrom(options.Extensions[extension])
    return rule
