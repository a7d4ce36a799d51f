"""The compiled JSON printer gives exactly MessageToDict's output (values and key order) for every message type."""

from __future__ import annotations

import importlib
import json
import math
import pkgutil
import random
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf import (
    any_pb2,
    api_pb2,
    descriptor_pb2,
    message_factory,
    struct_pb2,
    timestamp_pb2,
    type_pb2,
    wrappers_pb2,
)
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

import tessera
from gateway import protojson

pytestmark = pytest.mark.gate("S01")

# Besides the contracts: proto2 semantics (closed enums, defaults, presence), every well-known type, maps,
# floats, Any with details, as the gateway may meet them inside responses.
OTHER_TYPES = [
    descriptor_pb2.FileDescriptorProto,
    descriptor_pb2.FieldOptions,
    struct_pb2.Struct,
    struct_pb2.Value,
    type_pb2.Type,
    api_pb2.Api,
    any_pb2.Any,
    wrappers_pb2.Int64Value,
    timestamp_pb2.Timestamp,
    status_pb2.Status,
    error_details_pb2.BadRequest,
    error_details_pb2.ErrorInfo,
]


def contract_message_types() -> Iterator[type[Message]]:
    """Every message class (nested ones included) of every generated tessera module."""
    for module_info in pkgutil.walk_packages(tessera.__path__, "tessera."):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(module_info.name)
        pending = list(module.DESCRIPTOR.message_types_by_name.values())
        while pending:
            message_type = pending.pop()
            pending.extend(message_type.nested_types)
            if not message_type.GetOptions().map_entry:
                yield message_factory.GetMessageClass(message_type)


def _scalar(field: Any, rng: random.Random) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return rng.choice(["", "plain", "ünïcødé ✓", 'quote"and\\slash', "workspaces/0190a7a4"])
    if kind == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.randint(0, 9))
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice([0.0, 1.5, -2.25, 1e16, 0.1, math.inf, -math.inf, math.nan])
    if kind == FieldDescriptor.TYPE_ENUM:
        numbers = list(field.enum_type.values_by_number)
        if not field.enum_type.is_closed:
            numbers.append(99)  # an unknown value of an open enum stays a number
        return rng.choice(numbers)
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return rng.choice([0, 7, 2**32 - 1])
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return rng.choice([0, 7, 2**64 - 1])
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return rng.choice([0, -3, 2**63 - 1])
    return rng.choice([0, -3, 2**31 - 1])


def fill(message: Any, rng: random.Random, depth: int = 0) -> None:
    """Set a random subset of the fields of `message` (recursively, bounded)."""
    name = message.DESCRIPTOR.full_name
    if name == "google.protobuf.Timestamp":
        message.seconds, message.nanos = rng.choice([(0, 0), (1_700_000_000, 5_000_000), (86_399, 123)])
        return
    if name == "google.protobuf.Duration":
        message.seconds, message.nanos = rng.choice([(0, 0), (3, 500_000_000), (-1, -5)])
        return
    if name == "google.protobuf.FieldMask":
        message.paths.extend(rng.sample(["display_name", "state", "a.b_c"], rng.randint(0, 2)))
        return
    if name == "google.protobuf.Any":
        if rng.random() < 0.7:
            message.Pack(error_details_pb2.ErrorInfo(reason="R", domain="d", metadata={"k": "v"}))
        return
    if name == "google.protobuf.Value":
        kind = rng.choice(["null", "number", "string", "bool", "struct", "list"])
        if kind == "null":
            message.null_value = struct_pb2.NULL_VALUE
        elif kind == "number":
            message.number_value = rng.choice([0.0, 2.5])
        elif kind == "string":
            message.string_value = "s"
        elif kind == "bool":
            message.bool_value = True
        elif kind == "struct" and depth < 3:
            message.struct_value.update({"a": 1, "b": [True, None]})
        elif depth < 3:
            message.list_value.extend([1, "x"])
        return
    for field in message.DESCRIPTOR.fields:
        if rng.random() < 0.35:
            continue
        value = getattr(message, field.name)
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            key_field, value_field = field.message_type.fields
            for _ in range(rng.randint(0, 2)):
                key = _scalar(key_field, rng)
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    if depth < 3:
                        fill(value[key], rng, depth + 1)
                else:
                    value[key] = _scalar(value_field, rng)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3:
                continue
            if field.is_repeated:
                for _ in range(rng.randint(0, 2)):
                    fill(value.add(), rng, depth + 1)
            else:
                value.SetInParent()
                fill(value, rng, depth + 1)
        elif field.is_repeated:
            value.extend(_scalar(field, rng) for _ in range(rng.randint(0, 3)))
        else:
            setattr(message, field.name, _scalar(field, rng))


def printed(render: Any, message: Message) -> tuple[str, str | None]:
    """The JSON text (key order kept) of render(message), or the exception type it raised."""
    try:
        return json.dumps(render(message), ensure_ascii=False), None
    except Exception as exc:
        return "", type(exc).__name__


@pytest.mark.parametrize(
    "message_class", [*contract_message_types(), *OTHER_TYPES], ids=lambda c: c.DESCRIPTOR.full_name
)
def test_compiled_printer_equals_message_to_dict(message_class: type[Message]) -> None:
    rng = random.Random(message_class.DESCRIPTOR.full_name)
    for _ in range(40):
        message = message_class()
        fill(message, rng)
        assert printed(protojson.to_json, message) == printed(protojson.message_to_dict, message), message


def test_unset_and_default_fields_are_emitted_like_message_to_dict() -> None:
    from tessera.tenancy.v1 import tenancy_pb2

    empty = tenancy_pb2.Workspace()
    assert protojson.to_json(empty) == protojson.message_to_dict(empty)
    assert protojson.to_json(empty)["state"] == "WORKSPACE_STATE_UNSPECIFIED"
    # Fresh containers per call: a caller mutating one result never changes the next.
    first = protojson.to_json(descriptor_pb2.FileDescriptorProto())
    first["dependency"].append("x")
    assert protojson.to_json(descriptor_pb2.FileDescriptorProto())["dependency"] == []
