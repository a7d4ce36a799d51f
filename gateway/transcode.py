"""HTTP request → request message (path, body, query) and response message → canonical JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

from gateway import protojson
from gateway.routes import Route

FieldDescriptor = descriptor.FieldDescriptor
# Descriptors come from the upb or the pure-Python implementation; both expose the same attributes.
MessageDescriptor = Any
Field = Any
_WRAPPERS = {
    "google.protobuf.DoubleValue",
    "google.protobuf.FloatValue",
    "google.protobuf.Int64Value",
    "google.protobuf.UInt64Value",
    "google.protobuf.Int32Value",
    "google.protobuf.UInt32Value",
    "google.protobuf.BoolValue",
    "google.protobuf.StringValue",
    "google.protobuf.BytesValue",
}
_STRING_WKTS = {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"}
_WKT_LEAVES = _WRAPPERS | _STRING_WKTS | {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.Any"}


class TranscodeError(ValueError):
    """The HTTP request cannot become the RPC's request message; `field` names the culprit."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def _find_field(message_descriptor: MessageDescriptor, name: str) -> Field | None:
    """A field by proto name or lowerCamelCase JSON name."""
    found = message_descriptor.fields_by_name.get(name)
    if found is not None:
        return found
    return next((f for f in message_descriptor.fields if f.json_name == name), None)


def _is_repeated(field: Field) -> bool:
    return bool(field.is_repeated)


def _is_map(field: Field) -> bool:
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE and _is_repeated(field) and field.message_type.GetOptions().map_entry
    )


def _resolve(message_descriptor: MessageDescriptor, path: str) -> list[Field]:
    """Field descriptors along a dotted path (proto or JSON names), raising TranscodeError when unknown."""
    fields: list[Field] = []
    current = message_descriptor
    segments = path.split(".")
    for index, segment in enumerate(segments):
        found = _find_field(current, segment)
        if found is None:
            raise TranscodeError(f"unknown field {path!r}", field=path)
        fields.append(found)
        if index < len(segments) - 1:
            if (
                found.type != FieldDescriptor.TYPE_MESSAGE
                or _is_repeated(found)
                or found.message_type.full_name in _WKT_LEAVES
            ):
                raise TranscodeError(f"{path!r} does not name a nested field", field=path)
            current = found.message_type
    return fields


@cache
def _variable_fields(message_descriptor: MessageDescriptor, path: str) -> tuple[Field, ...]:
    """`_resolve` for a path variable: the paths come from the route templates, so the cache stays small."""
    return tuple(_resolve(message_descriptor, path))


def _is_string_leaf(field: Field) -> bool:
    return field.type == FieldDescriptor.TYPE_STRING and not _is_repeated(field)


def _scalar_value(raw: str, field: Field, *, name: str) -> Any:
    """A query/path string as the JSON value protobuf's parser expects for this field."""
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        full_name = field.message_type.full_name
        if full_name in _WRAPPERS:
            return _scalar_value(raw, field.message_type.fields_by_name["value"], name=name)
        if full_name in _STRING_WKTS:
            return raw
        raise TranscodeError(f"{name!r} names a message field; set its sub-fields instead", field=name)
    if field.type == FieldDescriptor.TYPE_BOOL:
        lowered = raw.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise TranscodeError(f"{name!r}: invalid boolean {raw!r}", field=name)
    if field.type == FieldDescriptor.TYPE_ENUM and raw.lstrip("-").isdigit():
        return int(raw)
    return raw


def _assign(tree: dict[str, Any], fields: Sequence[Field], value: Any) -> None:
    """Put `value` at the JSON-name path of `fields` inside a nested dict."""
    for parent in fields[:-1]:
        tree = tree.setdefault(parent.json_name, {})
    tree[fields[-1].json_name] = value


def _merge(message: Message, tree: dict[str, Any], *, culprit: str, field: str = "") -> None:
    try:
        json_format.ParseDict(tree, message)
    except json_format.ParseError as exc:
        raise TranscodeError(f"invalid value for {culprit}: {exc}", field=field) from exc


def parse_json_body(raw: bytes) -> Any:
    """The decoded JSON body (None when empty), raising TranscodeError with the parse error."""
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TranscodeError(f"malformed JSON body: {exc}") from exc


def build_request(
    route: Route,
    *,
    variables: Mapping[str, str],
    body: bytes,
    query: Sequence[tuple[str, str]],
    http_method: str,
) -> Message:
    """The request message of `route` from path variables, the body and query parameters."""
    message: Message = route.rpc.input_type()
    message_descriptor = message.DESCRIPTOR
    parsed = parse_json_body(body) if route.body else None
    if route.body and parsed is not None:
        if route.body == "*":
            if not isinstance(parsed, dict):
                raise TranscodeError("the request body must be a JSON object")
            _merge(message, parsed, culprit="the request body")
        else:
            body_field = _resolve(message_descriptor, route.body)
            tree: dict[str, Any] = {}
            _assign(tree, body_field, parsed)
            _merge(message, tree, culprit="the request body")
    elif not route.body and body.strip():
        raise TranscodeError("this route takes no request body")
    for path, raw in variables.items():
        fields = _variable_fields(message_descriptor, path)
        if raw.isascii() and _is_string_leaf(fields[-1]):
            # What ParseDict does with an ASCII string for a string field, without building and walking a dict.
            target = message
            for parent in fields[:-1]:
                target = getattr(target, parent.name)
            setattr(target, fields[-1].name, raw)
            continue
        tree = {}
        _assign(tree, fields, _scalar_value(raw, fields[-1], name=path))
        _merge(message, tree, culprit=path, field=path)
    if query:
        _apply_query(message, route, variables, query)
    if route.body and route.body != "*":
        _derive_update_mask(message, _resolve(message_descriptor, route.body), parsed, http_method=http_method)
    return message


def _apply_query(
    message: Message, route: Route, variables: Mapping[str, str], query: Sequence[tuple[str, str]]
) -> None:
    grouped: dict[str, list[str]] = {}
    for key, value in query:
        grouped.setdefault(key, []).append(value)
    seen: dict[str, str] = {}
    bound = {".".join(f.name for f in _resolve(message.DESCRIPTOR, name)) for name in variables}
    if route.body and route.body != "*":
        bound.add(route.body)
    for key, values in grouped.items():
        if route.body == "*":
            raise TranscodeError(f"unknown query parameter {key!r}", field=key)
        try:
            fields = _resolve(message.DESCRIPTOR, key)
        except TranscodeError:
            raise TranscodeError(f"unknown query parameter {key!r}", field=key) from None
        proto_path = ".".join(f.name for f in fields)
        if proto_path in seen:
            raise TranscodeError(f"query parameters {seen[proto_path]!r} and {key!r} name the same field", field=key)
        seen[proto_path] = key
        if any(proto_path == b or proto_path.startswith(f"{b}.") for b in bound):
            raise TranscodeError(f"query parameter {key!r} is already bound by the path or body", field=key)
        leaf = fields[-1]
        if _is_map(leaf):
            raise TranscodeError(f"query parameter {key!r} names a map field", field=key)
        if _is_repeated(leaf):
            converted: Any = [_scalar_value(v, leaf, name=key) for v in values]
        elif len(values) > 1:
            raise TranscodeError(f"query parameter {key!r} is not repeated", field=key)
        else:
            converted = _scalar_value(values[0], leaf, name=key)
        tree: dict[str, Any] = {}
        _assign(tree, fields, converted)
        _merge(message, tree, culprit=f"query parameter {key!r}", field=key)


def _derive_update_mask(message: Any, body_field: Sequence[Field], parsed: Any, *, http_method: str) -> None:
    """PATCH with a body field and no update_mask: the mask lists the fields present in the body (grpc-gateway)."""
    if http_method != "PATCH" or len(body_field) != 1 or not isinstance(parsed, dict):
        return
    mask_field = message.DESCRIPTOR.fields_by_name.get("update_mask")
    if mask_field is None or mask_field.message_type is None:
        return
    if mask_field.message_type.full_name != "google.protobuf.FieldMask" or message.HasField("update_mask"):
        return
    target = body_field[0]
    if target.type != FieldDescriptor.TYPE_MESSAGE:
        return
    paths = _body_paths(target.message_type, parsed, prefix="")
    message.update_mask.paths.extend(paths)


def _body_paths(message_descriptor: MessageDescriptor, body: Mapping[str, Any], *, prefix: str) -> list[str]:
    paths: list[str] = []
    for key, value in body.items():
        found = _find_field(message_descriptor, key)
        if found is None:
            continue
        path = f"{prefix}{found.name}"
        nested = (
            isinstance(value, dict)
            and found.type == FieldDescriptor.TYPE_MESSAGE
            and not _is_repeated(found)
            and found.message_type.full_name not in _WKT_LEAVES
        )
        if nested and value:
            paths.extend(_body_paths(found.message_type, value, prefix=f"{path}."))
        else:
            paths.append(path)
    return sorted(paths)


def message_to_json(message: Message) -> dict[str, Any]:
    """Canonical protobuf JSON: lowerCamelCase, enums as names, int64 as strings, unpopulated fields emitted."""
    rendered: dict[str, Any] = protojson.to_json(message)
    return rendered


def render_response(route: Route, message: Message) -> Any:
    """The JSON value of the response (the `response_body` field when the rule names one)."""
    rendered = message_to_json(message)
    if route.response_body:
        found = _find_field(message.DESCRIPTOR, route.response_body)
        if found is None:
            raise TranscodeError(f"unknown response_body field {route.response_body!r}")
        return rendered.get(found.json_name)
    return rendered
