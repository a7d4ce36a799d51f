"""Canonical protobuf JSON of response messages, with the per-field decisions made once per message type.

`json_format.MessageToDict` (pure Python) looks up how to print every field of every message on every call;
that was the largest part of the gateway's own CPU time on a small response. `to_json(message)` gives the
same dict, keys in the same order, for `always_print_fields_with_no_presence=True`:

- set fields come from `ListFields()` in its order, each through a converter chosen when the type is first
  seen; the fields without presence that are unset are then added with their defaults;
- defaults and enum names are taken from `MessageToDict` itself (probe messages), so JSON names, enum
  value options and default values cannot drift from protobuf's printer;
- anything with a subtle rule (floats, maps, extensions, closed enums, the well-known types with a JSON form
  of their own other than Timestamp, Duration and FieldMask) is handed to `MessageToDict` for that message
  or field.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

Converter = Callable[[Any], Any]

_WRAPPERS_FILE = "google/protobuf/wrappers.proto"
_WELL_KNOWN = frozenset(
    {
        "google.protobuf.Any",
        "google.protobuf.Duration",
        "google.protobuf.FieldMask",
        "google.protobuf.ListValue",
        "google.protobuf.Struct",
        "google.protobuf.Timestamp",
        "google.protobuf.Value",
    }
)
_TO_JSON_STRING = frozenset({"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"})
_INTS = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_FIXED32,
    }
)
_INT64S = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SFIXED64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_FIXED64,
    }
)


def message_to_dict(message: Message) -> Any:
    """protobuf's own canonical JSON (the reference `to_json` must equal)."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def to_json(message: Message) -> Any:
    """Canonical protobuf JSON: lowerCamelCase, enums as names, int64 as strings, unpopulated fields emitted."""
    return _printer(message.DESCRIPTOR)(message)


_PRINTERS: dict[Any, Converter] = {}


def _printer(message_descriptor: Any) -> Converter:
    """The (cached) printer of one message type."""
    found = _PRINTERS.get(message_descriptor)
    if found is None:
        found = _PRINTERS[message_descriptor] = _MessagePrinter(message_descriptor)
    return found


def _is_well_known(message_descriptor: Any) -> bool:
    """A type with its own JSON form (a wrapper, Any, Struct, Value, ListValue, Timestamp, Duration, FieldMask)."""
    return message_descriptor.full_name in _WELL_KNOWN or message_descriptor.file.name == _WRAPPERS_FILE


class _MessagePrinter:
    """Prints one message type; falls back to MessageToDict for what it was not built for."""

    def __init__(self, message_descriptor: Any) -> None:
        self.fallback = _is_well_known(message_descriptor)
        self.fields: dict[Any, tuple[str, Converter]] = {}
        self.defaults: list[tuple[str, Any]] = []
        if self.fallback:
            return
        for field in message_descriptor.fields:
            converter = _field_converter(field)
            if converter is None:
                continue  # a field of that kind, when set, sends the whole message to MessageToDict
            self.fields[field] = (field.json_name, converter)
        empty = message_factory.GetMessageClass(message_descriptor)()
        self.defaults = list(message_to_dict(empty).items())

    def __call__(self, message: Any) -> Any:
        if self.fallback:
            return message_to_dict(message)
        js: dict[str, Any] = {}
        fields = self.fields
        for field, value in message.ListFields():
            found = fields.get(field)
            if found is None:
                return message_to_dict(message)
            js[found[0]] = found[1](value)
        for name, default in self.defaults:
            if name not in js:
                # Repeated and map defaults are fresh containers, as MessageToDict makes them.
                js[name] = type(default)() if isinstance(default, list | dict) else default
        return js


def _field_converter(field: Any) -> Converter | None:
    """The converter of one field's value (a list for a repeated field), or None when not supported."""
    if field.is_extension:
        return None
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        return None
    single = _value_converter(field)
    if single is None:
        return None
    if field.is_repeated:
        return lambda values: [single(value) for value in values]
    return single


def _value_converter(field: Any) -> Converter | None:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return _same
    if kind == FieldDescriptor.TYPE_BOOL or kind in _INTS:
        return _same
    if kind in _INT64S:
        return str
    if kind == FieldDescriptor.TYPE_BYTES:
        return _base64
    if kind == FieldDescriptor.TYPE_ENUM:
        return _enum_converter(field)
    if kind == FieldDescriptor.TYPE_MESSAGE:
        message_type = field.message_type
        if message_type.full_name in _TO_JSON_STRING:
            return _to_json_string
        if _is_well_known(message_type):
            return message_to_dict
        return lambda value: _printer(message_type)(value)
    return None  # float and double: NaN, infinities and shortest float forms stay with MessageToDict


def _same(value: Any) -> Any:
    return value


def _base64(value: bytes) -> str:
    return base64.b64encode(value).decode("utf-8")


def _to_json_string(value: Any) -> Any:
    return value.ToJsonString()


def _enum_converter(field: Any) -> Converter | None:
    """Enum numbers to the names MessageToDict prints (probed once); unknown numbers of open enums stay ints."""
    enum_type = field.enum_type
    if enum_type.is_closed or enum_type.full_name == "google.protobuf.NullValue":
        return None
    names: dict[int, Any] = {}
    for number in enum_type.values_by_number:
        probe = message_factory.GetMessageClass(field.containing_type)()
        if field.is_repeated:
            getattr(probe, field.name).append(number)
            names[number] = message_to_dict(probe)[field.json_name][0]
        else:
            setattr(probe, field.name, number)
            printed = message_to_dict(probe)
            if field.json_name not in printed:
                return None  # the default of a field with presence that MessageToDict leaves out
            names[number] = printed[field.json_name]
    return lambda number: names.get(number, number)
