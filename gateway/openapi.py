"""OpenAPI 3.1 document built at start-up from the contracts in gen/, and offline `/docs`."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from google.api import annotations_pb2, field_behavior_pb2, http_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from gateway.descriptors import auth_rule, service_descriptors
from tessera.common.v1 import auth_pb2

JsonObject = dict[str, Any]

OPENAPI_VERSION = "3.1.0"
DESCRIPTOR_SET = "descriptor_set.binpb"
ERROR_SCHEMA = "Error"
BEARER_SCHEME = "bearerAuth"
COOKIE_SCHEME = "cookieAuth"
DEFAULT_ACCESS_COOKIE = "tessera_access"
DOCS_ASSETS_PREFIX = "/docs/assets"
_SCHEMA_PREFIX = "#/components/schemas/"
_HTTP_METHODS = ("get", "put", "post", "delete", "patch")
_BODYLESS_METHODS = frozenset({"get", "delete"})
_QUERY_DEPTH = 3
_ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".map": "application/json"}

_INT32_BOUNDS = {"minimum": -(2**31), "maximum": 2**31 - 1}
_SCALARS: dict[int, JsonObject] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"},
    FieldDescriptor.TYPE_SINT64: {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"},
    FieldDescriptor.TYPE_SFIXED64: {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"},
    FieldDescriptor.TYPE_FIXED64: {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32", **_INT32_BOUNDS},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32", **_INT32_BOUNDS},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32", **_INT32_BOUNDS},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "uint32", "minimum": 0, "maximum": 2**32 - 1},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "uint32", "minimum": 0, "maximum": 2**32 - 1},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte", "contentEncoding": "base64"},
}

_WRAPPERS: dict[str, JsonObject] = {
    "google.protobuf.DoubleValue": {"type": ["number", "null"], "format": "double"},
    "google.protobuf.FloatValue": {"type": ["number", "null"], "format": "float"},
    "google.protobuf.Int64Value": {"type": ["string", "null"], "format": "int64", "pattern": "^-?[0-9]+$"},
    "google.protobuf.UInt64Value": {"type": ["string", "null"], "format": "uint64", "pattern": "^[0-9]+$"},
    "google.protobuf.Int32Value": {"type": ["integer", "null"], "format": "int32", **_INT32_BOUNDS},
    "google.protobuf.UInt32Value": {"type": ["integer", "null"], "format": "uint32", "minimum": 0},
    "google.protobuf.BoolValue": {"type": ["boolean", "null"]},
    "google.protobuf.StringValue": {"type": ["string", "null"]},
    "google.protobuf.BytesValue": {"type": ["string", "null"], "format": "byte"},
}

_WELL_KNOWN: dict[str, JsonObject] = {
    **_WRAPPERS,
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "description": "Duration in seconds with an `s` suffix, e.g. `1.5s`.",
    },
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": "Comma-separated lowerCamelCase field paths, e.g. `displayName,labels`.",
    },
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {"description": "Any JSON value."},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.NullValue": {"type": "null"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string", "description": "Type URL of the embedded message."}},
        "required": ["@type"],
        "additionalProperties": True,
    },
}

# Wrapper and well-known types rendered as one query-string value (not as nested parameters).
_QUERY_SCALAR_WKT = frozenset(
    {*_WRAPPERS, "google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"}
)

# FileDescriptorProto / DescriptorProto field numbers used in SourceCodeInfo paths.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM, _MESSAGE_ONEOF = 2, 3, 4, 8
_ENUM_VALUE, _SERVICE_METHOD = 2, 2


@dataclass(frozen=True)
class PathParameter:
    """One OpenAPI path parameter and the request field (proto path) whose value it builds."""

    name: str
    field_path: str
    description: str


@dataclass(frozen=True)
class Binding:
    """One HTTP binding of an RPC: method, OpenAPI path, bound fields and body/response selectors."""

    method: str
    template: str
    path: str
    parameters: tuple[PathParameter, ...]
    body: str
    response_body: str


def _load_comments() -> dict[str, str]:
    data = resources.files("tessera").joinpath(DESCRIPTOR_SET).read_bytes()
    return comments_from_descriptor_set(descriptor_pb2.FileDescriptorSet.FromString(data))


def comments_from_descriptor_set(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, str]:
    """Leading (else trailing) comments of every element, keyed by full proto name."""
    comments: dict[str, str] = {}
    for file in fds.file:
        names = _element_names(file)
        for location in file.source_code_info.location:
            name = names.get(tuple(location.path))
            text = (location.leading_comments or location.trailing_comments).strip()
            if name and text:
                comments[name] = "\n".join(line.strip() for line in text.splitlines())
    return comments


def _element_names(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    prefix = f"{file.package}." if file.package else ""
    names: dict[tuple[int, ...], str] = {}

    def enum(path: tuple[int, ...], full: str, proto: descriptor_pb2.EnumDescriptorProto) -> None:
        names[path] = full
        parent = full.rsplit(".", 1)[0]
        for i, value in enumerate(proto.value):
            names[(*path, _ENUM_VALUE, i)] = f"{parent}.{value.name}"

    def message(path: tuple[int, ...], full: str, proto: descriptor_pb2.DescriptorProto) -> None:
        names[path] = full
        for i, field in enumerate(proto.field):
            names[(*path, _MESSAGE_FIELD, i)] = f"{full}.{field.name}"
        for i, oneof in enumerate(proto.oneof_decl):
            names[(*path, _MESSAGE_ONEOF, i)] = f"{full}.{oneof.name}"
        for i, nested in enumerate(proto.nested_type):
            message((*path, _MESSAGE_NESTED, i), f"{full}.{nested.name}", nested)
        for i, nested_enum in enumerate(proto.enum_type):
            enum((*path, _MESSAGE_ENUM, i), f"{full}.{nested_enum.name}", nested_enum)

    for i, msg in enumerate(file.message_type):
        message((_FILE_MESSAGE, i), prefix + msg.name, msg)
    for i, top_enum in enumerate(file.enum_type):
        enum((_FILE_ENUM, i), prefix + top_enum.name, top_enum)
    for i, service in enumerate(file.service):
        names[(_FILE_SERVICE, i)] = prefix + service.name
        for j, method in enumerate(service.method):
            names[(_FILE_SERVICE, i, _SERVICE_METHOD, j)] = f"{prefix}{service.name}.{method.name}"
    return names


def discover_services() -> list[ServiceDescriptor]:
    """Every service declared in a `tessera.*` `*_service_pb2` module of gen/, sorted by full name."""
    return list(service_descriptors())


def _http_rules(method: MethodDescriptor) -> list[http_pb2.HttpRule]:
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return []
    rule: http_pb2.HttpRule = options.Extensions[annotations_pb2.http]
    return [rule, *rule.additional_bindings]


def http_operation_count(services: list[ServiceDescriptor]) -> int:
    """How many operations the document has: one per http binding, additional bindings included."""
    return sum(len(_http_rules(m)) for s in services for m in s.methods)


def _singular(word: str) -> str:
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _json_path(message: Descriptor, field_path: str) -> str:
    """Proto field path (`workspace.name`) → JSON field path (`workspace.name`, lowerCamelCase)."""
    parts: list[str] = []
    current: Descriptor | None = message
    for name in field_path.split("."):
        if current is None or name not in current.fields_by_name:
            raise ValueError(f"{message.full_name} has no field {field_path!r}")
        field = current.fields_by_name[name]
        parts.append(field.json_name)
        current = field.message_type
    return ".".join(parts)


_VARIABLE = re.compile(r"\{([^}=]+)(?:=([^}]*))?\}")


def parse_binding(rule: http_pb2.HttpRule, request: Descriptor) -> Binding:
    """Turn an HttpRule into an OpenAPI path: `{name=workspaces/*}` → `/workspaces/{workspace}`."""
    method = rule.WhichOneof("pattern")
    if method not in _HTTP_METHODS:
        raise ValueError(f"unsupported http pattern {method!r} on {request.full_name}")
    template: str = getattr(rule, method)
    parameters: list[PathParameter] = []
    used: set[str] = set()

    def unique(name: str) -> str:
        candidate, n = name, 2
        while candidate in used:
            candidate, n = f"{name}{n}", n + 1
        used.add(candidate)
        return candidate

    def replace(match: re.Match[str]) -> str:
        field_path, pattern = match.group(1), match.group(2) or "*"
        json_path = _json_path(request, field_path)
        segments = pattern.split("/")
        if segments in (["*"], ["**"]):
            name = unique(json_path)
            parameters.append(PathParameter(name, field_path, f"The `{json_path}` field."))
            return "{" + name + "}"
        out: list[str] = []
        names: list[str] = []
        previous = json_path.rsplit(".", 1)[-1]
        for segment in segments:
            if segment in ("*", "**"):
                names.append(unique(_singular(previous) if segment == "*" else f"{previous}Path"))
                out.append("{" + names[-1] + "}")
            else:
                out.append(segment)
                previous = segment
        resource = "/".join(out)
        for name in names:
            parameters.append(
                PathParameter(name, field_path, f"The `{{{name}}}` segment of `{json_path}` (`{resource}`).")
            )
        return resource

    path = _VARIABLE.sub(replace, template)
    return Binding(method, template, path, tuple(parameters), rule.body, rule.response_body)


class _Builder:
    """Accumulates component schemas while operations are added."""

    def __init__(self, comments: dict[str, str]) -> None:
        self.comments = comments
        self.schemas: dict[str, JsonObject] = {}

    def ref(self, descriptor: Descriptor | EnumDescriptor) -> JsonObject:
        if isinstance(descriptor, EnumDescriptor):
            if descriptor.full_name not in self.schemas:
                self.schemas[descriptor.full_name] = self.enum_schema(descriptor)
        elif descriptor.full_name not in self.schemas:
            self.schemas[descriptor.full_name] = {}  # placeholder: breaks recursion
            self.schemas[descriptor.full_name] = self.message_schema(descriptor)
        return {"$ref": _SCHEMA_PREFIX + descriptor.full_name}

    def enum_schema(self, enum: EnumDescriptor) -> JsonObject:
        schema: JsonObject = {"type": "string", "enum": [v.name for v in enum.values]}
        lines = [self.comments.get(enum.full_name, "")]
        parent = enum.full_name.rsplit(".", 1)[0]
        for value in enum.values:
            comment = self.comments.get(f"{parent}.{value.name}")
            if comment:
                lines.append(f"- `{value.name}`: {' '.join(comment.splitlines())}")
        description = "\n".join(line for line in lines if line)
        if description:
            schema["description"] = description
        return schema

    def value_schema(self, field: FieldDescriptor) -> JsonObject:
        if field.message_type is not None:
            known = _WELL_KNOWN.get(field.message_type.full_name)
            return dict(known) if known is not None else self.ref(field.message_type)
        if field.enum_type is not None:
            return self.ref(field.enum_type)
        return dict(_SCALARS[field.type])

    def field_schema(self, field: FieldDescriptor) -> JsonObject:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            schema: JsonObject = {"type": "object", "additionalProperties": self.value_schema(value)}
        elif field.is_repeated:
            schema = {"type": "array", "items": self.value_schema(field)}
        else:
            schema = self.value_schema(field)
        behaviors = set(_behaviors(field))
        if behaviors & {field_behavior_pb2.OUTPUT_ONLY, field_behavior_pb2.IDENTIFIER}:
            schema["readOnly"] = True
        if field_behavior_pb2.INPUT_ONLY in behaviors:
            schema["writeOnly"] = True
        if field_behavior_pb2.IMMUTABLE in behaviors:
            schema["x-immutable"] = True
        description = self.comments.get(field.full_name, "")
        oneof = field.containing_oneof
        if oneof is not None and not _synthetic(oneof.name, field):
            members = ", ".join(f"`{f.json_name}`" for f in oneof.fields)
            description = f"{description}\n\nPart of oneof `{oneof.name}`: at most one of {members} is set.".strip()
        if description:
            schema["description"] = description
        return schema

    def message_schema(self, message: Descriptor) -> JsonObject:
        # The gateway rejects unknown JSON fields (400), so the contract is closed.
        schema: JsonObject = {"type": "object", "properties": {}, "additionalProperties": False}
        required: list[str] = []
        for field in message.fields:
            schema["properties"][field.json_name] = self.field_schema(field)
            if field_behavior_pb2.REQUIRED in _behaviors(field):
                required.append(field.json_name)
        if required:
            schema["required"] = required
        lines = [self.comments.get(message.full_name, "")]
        at_most_one: list[JsonObject] = []
        for oneof in message.oneofs:
            if _synthetic(oneof.name, oneof.fields[0]):
                continue
            members = ", ".join(f"`{f.json_name}`" for f in oneof.fields)
            comment = " ".join(self.comments.get(f"{message.full_name}.{oneof.name}", "").splitlines())
            lines.append(f"Oneof `{oneof.name}` (at most one of {members}). {comment}".strip())
            at_most_one.append(_at_most_one([f.json_name for f in oneof.fields]))
        if at_most_one:
            schema["allOf"] = at_most_one
        description = "\n\n".join(line for line in lines if line)
        if description:
            schema["description"] = description
        return schema


def component_schemas(messages: list[Descriptor], *, comments: dict[str, str] | None = None) -> dict[str, JsonObject]:
    """Component schemas of the given messages and of every message and enum they reference."""
    builder = _Builder(_cached_comments() if comments is None else comments)
    for message in messages:
        builder.ref(message)
    return dict(sorted(builder.schemas.items()))


def _at_most_one(names: list[str]) -> JsonObject:
    """A oneof in JSON Schema: exactly one of its members is present, or none of them.

    (The JSON mapping writes a oneof's member only when it is set, and the gateway refuses a request that
    sets two.) The proto names are accepted in requests too, but the schema names the JSON names.
    """
    present = [{"required": [name]} for name in names]
    return {"oneOf": [*present, {"not": {"anyOf": present}}]}


def _synthetic(oneof_name: str, field: FieldDescriptor) -> bool:
    """A proto3 `optional` field's synthetic oneof (`_name`)."""
    oneof = field.containing_oneof
    return oneof is not None and oneof_name == f"_{field.name}" and len(oneof.fields) == 1


def _behaviors(field: FieldDescriptor) -> list[int]:
    options = field.GetOptions()
    return list(options.Extensions[field_behavior_pb2.field_behavior])


def _query_parameters(
    builder: _Builder, message: Descriptor, excluded: set[str], prefix: str = "", depth: int = 0
) -> Iterator[JsonObject]:
    for field in message.fields:
        proto_path = f"{prefix}{field.name}"
        json_path = field.json_name
        if proto_path in excluded:
            continue
        behaviors = set(_behaviors(field))
        if field_behavior_pb2.OUTPUT_ONLY in behaviors:
            continue
        msg = field.message_type
        if msg is not None and msg.GetOptions().map_entry:
            continue
        if msg is not None and msg.full_name not in _QUERY_SCALAR_WKT:
            if field.is_repeated or depth >= _QUERY_DEPTH:
                continue
            if msg.full_name.startswith("google.protobuf."):
                continue
            nested_excluded = {p[len(proto_path) + 1 :] for p in excluded if p.startswith(proto_path + ".")}
            for nested in _query_parameters(builder, msg, nested_excluded, "", depth + 1):
                yield {**nested, "name": f"{json_path}.{nested['name']}"}
            continue
        value = builder.value_schema(field)
        if isinstance(value.get("type"), list):  # wrappers: absent means null in a query string
            value["type"] = next(t for t in value["type"] if t != "null")
        schema: JsonObject = {"type": "array", "items": value} if field.is_repeated else value
        parameter: JsonObject = {"name": json_path, "in": "query", "schema": schema}
        description = builder.comments.get(field.full_name)
        if description:
            parameter["description"] = description
        if field_behavior_pb2.REQUIRED in behaviors:
            parameter["required"] = True
        if field.is_repeated:
            parameter["style"], parameter["explode"] = "form", True
        yield parameter


def _body_schema(builder: _Builder, request: Descriptor, binding: Binding) -> JsonObject | None:
    if not binding.body:
        return None
    path_fields = {p.field_path for p in binding.parameters}
    if binding.body != "*":
        field = request.fields_by_name[binding.body]
        schema = builder.field_schema(field)
        schema.pop("readOnly", None)
        return schema
    top_level_bound = {f.split(".", 1)[0] for f in path_fields if "." not in f}
    if not top_level_bound:
        return builder.ref(request)
    full = builder.message_schema(request)
    bound_json = {request.fields_by_name[name].json_name for name in top_level_bound}
    full["properties"] = {k: v for k, v in full["properties"].items() if k not in bound_json}
    if "required" in full:
        full["required"] = [r for r in full["required"] if r not in bound_json]
        if not full["required"]:
            del full["required"]
    return full


def _response_schema(builder: _Builder, method: MethodDescriptor, binding: Binding) -> JsonObject:
    if binding.response_body:
        field = method.output_type.fields_by_name[binding.response_body]
        schema = builder.field_schema(field)
        schema.pop("readOnly", None)
        return schema
    return builder.ref(method.output_type)


def _error_responses() -> JsonObject:
    ref = {"$ref": "#/components/responses/Error"}
    return {
        "400": ref,
        "401": {"$ref": "#/components/responses/Unauthenticated"},
        "403": ref,
        "404": ref,
        "409": ref,
        "429": {"$ref": "#/components/responses/RateLimited"},
        "4XX": ref,
        "5XX": ref,
    }


def _operation(
    builder: _Builder, service: ServiceDescriptor, method: MethodDescriptor, binding: Binding, index: int
) -> JsonObject:
    request = method.input_type
    operation_id = f"{service.name}_{method.name}" + (f"_{index}" if index else "")
    excluded = {p.field_path for p in binding.parameters}
    operation: JsonObject = {
        "operationId": operation_id,
        "tags": [service.name],
        "summary": method.name,
    }
    description = builder.comments.get(method.full_name)
    if description:
        operation["description"] = description
    parameters: list[JsonObject] = [
        {
            "name": p.name,
            "in": "path",
            "required": True,
            "description": p.description,
            "schema": {"type": "string", "minLength": 1},
        }
        for p in binding.parameters
    ]
    body = _body_schema(builder, request, binding)
    if binding.body != "*":
        if binding.body:
            excluded.add(binding.body)
        parameters += list(_query_parameters(builder, request, excluded))
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    response = _response_schema(builder, method, binding)
    if method.server_streaming:
        content: JsonObject = {
            "text/event-stream": {"schema": {"type": "string"}, "x-item-schema": response},
            "application/x-ndjson": {"schema": {"type": "string"}, "x-item-schema": response},
        }
        ok_description = "A stream of messages (Server-Sent Events, or NDJSON by `Accept`)."
    else:
        content = {"application/json": {"schema": response}}
        ok_description = "OK"
    operation["responses"] = {"200": {"description": ok_description, "content": content}, **_error_responses()}
    rule = auth_rule(method)
    if rule is not None and rule.level == auth_pb2.AUTH_LEVEL_PUBLIC:
        operation["security"] = []
    else:
        operation["security"] = [{BEARER_SCHEME: []}, {COOKIE_SCHEME: []}]
    if rule is not None:
        auth: JsonObject = {"level": auth_pb2.AuthLevel.Name(rule.level)}
        if rule.permission:
            auth["permission"] = rule.permission
        operation["x-tessera-auth"] = auth
    operation["x-grpc-method"] = f"/{service.full_name}/{method.name}"
    return operation


def _error_components(builder: _Builder) -> tuple[JsonObject, JsonObject]:
    error_schema: JsonObject = {
        "type": "object",
        "description": "Error body: the gRPC status of the failed call (google.rpc.Status in JSON).",
        "properties": {
            "code": {"type": "integer", "description": "The gRPC status code (e.g. 5 for NOT_FOUND)."},
            "message": {"type": "string", "description": "A developer-facing message; never a stack trace."},
            "details": {
                "type": "array",
                "description": "google.rpc details: ErrorInfo (reason, domain `tessera.dev`, metadata), "
                "BadRequest (field violations), RetryInfo, RequestInfo.",
                "items": dict(_WELL_KNOWN["google.protobuf.Any"]),
            },
        },
        "required": ["code", "message", "details"],
    }
    content = {"application/json": {"schema": {"$ref": _SCHEMA_PREFIX + ERROR_SCHEMA}}}
    responses: JsonObject = {
        "Error": {"description": "The request failed; see the error body.", "content": content},
        "Unauthenticated": {
            "description": "Missing, expired or invalid credentials.",
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
            "content": content,
        },
        "RateLimited": {
            "description": "Too many requests or a quota was hit.",
            "headers": {
                "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}
            },
            "content": content,
        },
    }
    return error_schema, responses


def build_document(*, title: str, version: str, access_cookie: str = DEFAULT_ACCESS_COOKIE) -> JsonObject:
    """The OpenAPI 3.1 document of every `google.api.http` binding of the contracts in gen/."""
    builder = _Builder(_cached_comments())
    paths: dict[str, JsonObject] = {}
    tags: list[JsonObject] = []
    for service in discover_services():
        tag: JsonObject = {"name": service.name}
        if service.full_name in builder.comments:
            tag["description"] = builder.comments[service.full_name]
        tags.append(tag)
        for method in service.methods:
            for index, rule in enumerate(_http_rules(method)):
                binding = parse_binding(rule, method.input_type)
                operations = paths.setdefault(binding.path, {})
                if binding.method in operations:
                    raise ValueError(f"two RPCs bind {binding.method.upper()} {binding.path}")
                operations[binding.method] = _operation(builder, service, method, binding, index)
    error_schema, error_responses = _error_components(builder)
    schemas = {ERROR_SCHEMA: error_schema, **dict(sorted(builder.schemas.items()))}
    return {
        "openapi": OPENAPI_VERSION,
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {
            "title": title,
            "version": version,
            "description": "REST/JSON mapping of Tessera's gRPC contracts (google.api.http), generated at start-up.",
        },
        "tags": tags,
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": schemas,
            "responses": error_responses,
            "securitySchemes": {
                BEARER_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "An access token from SignIn/RefreshTokens (workspace-scoped tokens from "
                    "IssueWorkspaceToken for workspace resources).",
                },
                COOKIE_SCHEME: {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": access_cookie,
                    "description": "Browser session cookie set by `POST /auth/sign-in`; state-changing requests "
                    "also need the CSRF token header.",
                },
            },
        },
    }


@cache
def _cached_comments() -> dict[str, str]:
    return _load_comments()


def swagger_ui_directory() -> Path:
    """The static Swagger UI files shipped inside the installed `swagger_ui` (swagger-ui-py) package."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed: it ships the /docs assets")
    directory = Path(next(iter(spec.submodule_search_locations))) / "static"
    if not (directory / "swagger-ui-bundle.js").exists():
        raise RuntimeError(f"no swagger-ui-bundle.js under {directory}")
    return directory


def docs_html(*, title: str, openapi_url: str = "/openapi.json", assets: str = DOCS_ASSETS_PREFIX) -> str:
    """The `/docs` page: Swagger UI loading only same-origin assets."""
    # validatorUrl None: Swagger UI would otherwise send the document to an online validator.
    config = json.dumps({"url": openapi_url, "dom_id": "#swagger-ui", "deepLinking": True, "validatorUrl": None})
    safe_title = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{safe_title}</title>
<link rel="stylesheet" href="{assets}/swagger-ui.css">
<link rel="icon" type="image/png" href="{assets}/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script src="{assets}/swagger-ui-standalone-preset.js"></script>
<script src="{assets}/swagger-init.js"></script>
<script type="application/json" id="swagger-config">{config}</script>
</body>
</html>
"""


_INIT_JS = """window.onload = function () {
  var config = JSON.parse(document.getElementById("swagger-config").textContent);
  config.presets = [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset];
  config.plugins = [SwaggerUIBundle.plugins.DownloadUrl];
  config.layout = "StandaloneLayout";
  window.ui = SwaggerUIBundle(config);
};
"""


def routes(document: JsonObject) -> list[Route]:
    """`GET /openapi.json`, `GET /docs` and the docs assets, all served from this process (no CDN)."""
    body = json.dumps(document, separators=(",", ":")).encode()
    html = docs_html(title=str(document.get("info", {}).get("title", "API")) + " docs")
    directory = swagger_ui_directory()
    assets = {p.name: p for p in directory.iterdir() if p.is_file() and p.suffix in _ASSET_TYPES}

    async def openapi_json(request: Request) -> Response:
        return Response(body, media_type="application/json")

    async def docs(request: Request) -> Response:
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    async def init_js(request: Request) -> Response:
        return Response(_INIT_JS, media_type="text/javascript")

    async def asset(request: Request) -> Response:
        path = assets.get(request.path_params["filename"])
        if path is None:
            return PlainTextResponse("Not Found", status_code=404)
        return FileResponse(path, media_type=_ASSET_TYPES[path.suffix], headers={"Cache-Control": "max-age=86400"})

    return [
        Route("/openapi.json", openapi_json, methods=["GET"], name="openapi_json"),
        Route("/docs", docs, methods=["GET"], name="docs"),
        Route(f"{DOCS_ASSETS_PREFIX}/swagger-init.js", init_js, methods=["GET"], name="docs_init"),
        Route(DOCS_ASSETS_PREFIX + "/{filename}", asset, methods=["GET"], name="docs_assets"),
    ]
