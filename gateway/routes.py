"""`google.api.http` rules compiled into a route table: path templates, custom verbs, 404 versus 405."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, message_factory

from gateway.descriptors import auth_rule, method_descriptors
from tessera.common.v1 import auth_pb2

HTTP_METHODS = ("get", "put", "post", "delete", "patch")
_LITERAL = re.compile(r"^[A-Za-z0-9._~\-]+$")
_FIELD_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class TemplateError(ValueError):
    """A path template that does not follow the `google.api.http` grammar."""


class RouteNotFound(LookupError):
    """No route has this path."""


class MethodNotAllowed(LookupError):
    """Routes have this path, but none for this HTTP method."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = tuple(sorted(set(allowed)))
        super().__init__(f"method not allowed; allowed: {', '.join(self.allowed)}")


@dataclass(frozen=True)
class RpcMethod:
    """What the gateway needs to call one RPC."""

    service: str
    name: str
    input_type: type[Any]
    output_type: type[Any]
    server_streaming: bool = False
    # AUTH_LEVEL_WORKSPACE in the contract: the call needs a token scoped to the workspace in its path.
    workspace_scoped: bool = False

    @property
    def path(self) -> str:
        """The gRPC method path, `/package.Service/Method`."""
        return f"/{self.service}/{self.name}"

    @classmethod
    def from_descriptor(cls, method: descriptor.MethodDescriptor) -> RpcMethod:
        """The RpcMethod of a method descriptor."""
        return cls(
            service=method.containing_service.full_name,
            name=method.name,
            input_type=message_factory.GetMessageClass(method.input_type),
            output_type=message_factory.GetMessageClass(method.output_type),
            server_streaming=method.server_streaming,
            workspace_scoped=_is_workspace_scoped(method),
        )


def _is_workspace_scoped(method: descriptor.MethodDescriptor) -> bool:
    rule = auth_rule(method)
    return rule is not None and rule.level == auth_pb2.AUTH_LEVEL_WORKSPACE


@dataclass(frozen=True)
class PathTemplate:
    """A compiled path template: a regex with one group per variable, plus its custom verb."""

    source: str
    regex: re.Pattern[str]
    variables: tuple[str, ...]
    verb: str | None
    literal_segments: int

    def match(self, path: str) -> dict[str, str] | None:
        """Variable values (field path → value) when `path` matches, else None."""
        found = self.regex.fullmatch(path)
        if found is None:
            return None
        return {name: unquote(found.group(f"v{index}")) for index, name in enumerate(self.variables)}


def _segments_regex(segments: str, *, allow_variables: bool, variables: list[str]) -> tuple[str, int]:
    parts: list[str] = []
    literals = 0
    pieces = _split_segments(segments)
    for position, piece in enumerate(pieces):
        if piece == "*":
            parts.append("[^/]+")
        elif piece == "**":
            if position != len(pieces) - 1:
                raise TemplateError("`**` must be the last segment")
            parts.append(".+")
        elif piece.startswith("{"):
            if not allow_variables or not piece.endswith("}"):
                raise TemplateError(f"bad variable {piece!r}")
            name, _, pattern = piece[1:-1].partition("=")
            if not _FIELD_PATH.match(name):
                raise TemplateError(f"bad field path {name!r}")
            inner, inner_literals = _segments_regex(pattern or "*", allow_variables=False, variables=variables)
            literals += inner_literals
            parts.append(f"(?P<v{len(variables)}>{inner})")
            variables.append(name)
        elif _LITERAL.match(piece):
            parts.append(re.escape(piece))
            literals += 1
        else:
            raise TemplateError(f"bad segment {piece!r}")
    return "/".join(parts), literals


def _split_segments(segments: str) -> list[str]:
    """Split on `/` outside braces."""
    pieces: list[str] = []
    depth = 0
    current = ""
    for char in segments:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if char == "/" and depth == 0:
            pieces.append(current)
            current = ""
        else:
            current += char
    pieces.append(current)
    if depth != 0 or any(piece == "" for piece in pieces):
        raise TemplateError(f"bad segments {segments!r}")
    return pieces


def compile_template(template: str) -> PathTemplate:
    """Compile `/v1/{name=workspaces/*}:verb` into a PathTemplate."""
    if not template.startswith("/"):
        raise TemplateError(f"template must start with '/': {template!r}")
    body, verb = template[1:], None
    last_slash = body.rfind("/")
    last_brace = body.rfind("}")
    colon = body.rfind(":")
    if colon > max(last_slash, last_brace):
        body, verb = body[:colon], body[colon + 1 :]
        if not _LITERAL.match(verb):
            raise TemplateError(f"bad verb {verb!r}")
    variables: list[str] = []
    pattern, literals = _segments_regex(body, allow_variables=True, variables=variables)
    suffix = re.escape(f":{verb}") if verb else ""
    return PathTemplate(template, re.compile(f"/{pattern}{suffix}"), tuple(variables), verb, literals)


@dataclass(frozen=True)
class Route:
    """One HTTP binding of one RPC."""

    http_method: str
    template: PathTemplate
    rpc: RpcMethod
    body: str = ""
    response_body: str = ""

    @property
    def specificity(self) -> tuple[int, int]:
        """Sort key: routes with more literal segments and fewer variables win."""
        return (-self.template.literal_segments, len(self.template.variables))


def routes_for_rule(rule: http_pb2.HttpRule, rpc: RpcMethod) -> list[Route]:
    """Routes of one HttpRule and its additional_bindings."""
    routes: list[Route] = []
    for binding in [rule, *rule.additional_bindings]:
        kind = binding.WhichOneof("pattern")
        if kind is None:
            continue
        if kind == "custom":
            method, template = binding.custom.kind.upper(), binding.custom.path
        else:
            method, template = kind.upper(), getattr(binding, kind)
        routes.append(
            Route(method, compile_template(template), rpc, body=binding.body, response_body=binding.response_body)
        )
    return routes


def contract_routes() -> list[Route]:
    """Routes of every RPC with a `google.api.http` annotation."""
    routes: list[Route] = []
    for method in method_descriptors():
        options = method.GetOptions()
        if options.HasExtension(annotations_pb2.http):
            routes.extend(routes_for_rule(options.Extensions[annotations_pb2.http], RpcMethod.from_descriptor(method)))
    return routes


@dataclass(frozen=True)
class RouteMatch:
    """A route and the values of its path variables."""

    route: Route
    variables: dict[str, str]


class _Alternation:
    """Routes tried in order by one regex: the first route whose template matches wins, as a loop would."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        # `(?P<r3>...)` around route 3, its variables renamed `r3v0`, `r3v1`...: the outer group closes last, so
        # `lastgroup` names the route. Python's alternation takes the first alternative that fully matches.
        alternatives = [
            f"(?P<r{index}>" + re.sub(r"\(\?P<v(\d+)>", rf"(?P<r{index}v\1>", route.template.regex.pattern) + ")"
            for index, route in enumerate(self.routes)
        ]
        self.regex = re.compile("|".join(alternatives)) if alternatives else None

    def match(self, path: str) -> RouteMatch | None:
        """The first route matching `path`, with its variables."""
        found = self.regex.fullmatch(path) if self.regex is not None else None
        if found is None or found.lastgroup is None:
            return None
        index = int(found.lastgroup[1:])
        route = self.routes[index]
        variables = {
            name: unquote(found.group(f"r{index}v{position}")) for position, name in enumerate(route.template.variables)
        }
        return RouteMatch(route, variables)


@dataclass
class RouteTable:
    """Routes keyed by HTTP method; lookup distinguishes unknown paths (404) from wrong methods (405).

    Routes with a custom verb are tried first, across every method, then the plain ones. A verb route's
    template ends in `:verb`, so a path without a colon skips them; the routes of one method and kind are
    tried by one regex rather than one per route.
    """

    routes: Sequence[Route]
    by_method: dict[str, list[Route]] = field(init=False)
    _verb_routes: dict[str, list[Route]] = field(init=False, repr=False)
    _plain_routes: dict[str, list[Route]] = field(init=False, repr=False)
    _verb_alternations: dict[str, _Alternation] = field(init=False, repr=False)
    _plain_alternations: dict[str, _Alternation] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.by_method = {}
        for route in sorted(self.routes, key=lambda r: r.specificity):
            self.by_method.setdefault(route.http_method, []).append(route)
        self._verb_routes = {m: [r for r in rs if r.template.verb is not None] for m, rs in self.by_method.items()}
        self._plain_routes = {m: [r for r in rs if r.template.verb is None] for m, rs in self.by_method.items()}
        self._verb_alternations = {m: _Alternation(rs) for m, rs in self._verb_routes.items()}
        self._plain_alternations = {m: _Alternation(rs) for m, rs in self._plain_routes.items()}

    def lookup(self, method: str, path: str) -> RouteMatch:
        """The matching route, raising RouteNotFound or MethodNotAllowed."""
        method = method.upper()
        if method == "HEAD":
            method = "GET"
        kinds = [(self._plain_alternations, self._plain_routes)]
        if ":" in path:
            kinds.insert(0, (self._verb_alternations, self._verb_routes))
        for alternations, routes_by_method in kinds:
            alternation = alternations.get(method)
            found = alternation.match(path) if alternation is not None else None
            if found is not None:
                return found
            allowed = {
                other
                for other, routes in routes_by_method.items()
                if any(route.template.match(path) is not None for route in routes)
            }
            if allowed:
                raise MethodNotAllowed(allowed)
        raise RouteNotFound(path)
