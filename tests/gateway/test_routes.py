"""Route compiler and table: path templates, wildcards, custom verbs, additional_bindings, 404 versus 405."""

from __future__ import annotations

import re
from typing import Any

import pytest
from google.api import http_pb2

from gateway.routes import (
    MethodNotAllowed,
    Route,
    RouteNotFound,
    RouteTable,
    RpcMethod,
    TemplateError,
    compile_template,
    contract_routes,
    routes_for_rule,
)
from tessera.tenancy.v1 import tenancy_pb2
from tessera.tenancy.v1 import tenancy_service_pb2 as ts

pytestmark = pytest.mark.gate("S01")

WORKSPACE = "0190a7a4-1c2d-7e3f-8a9b-0c1d2e3f4a5b"


@pytest.mark.parametrize(
    ("template", "path", "expected"),
    [
        ("/v1/workspaces", "/v1/workspaces", {}),
        ("/v1/workspaces", "/v1/workspaces/x", None),
        ("/v1/{name=workspaces/*}", f"/v1/workspaces/{WORKSPACE}", {"name": f"workspaces/{WORKSPACE}"}),
        ("/v1/{name=workspaces/*}", "/v1/workspaces", None),
        ("/v1/{name=workspaces/*}", "/v1/projects/p", None),
        ("/v1/{name=workspaces/*/items/*}", "/v1/workspaces/w/items/i", {"name": "workspaces/w/items/i"}),
        ("/v1/{name=workspaces/*/items/*}", "/v1/workspaces/w/items", None),
        ("/v1/{item.name=workspaces/*/items/*}", "/v1/workspaces/w/items/i", {"item.name": "workspaces/w/items/i"}),
        ("/v1/{parent=workspaces/*}/items", "/v1/workspaces/w/items", {"parent": "workspaces/w"}),
        ("/v1/things/{id}", "/v1/things/42", {"id": "42"}),
        ("/v1/things/{id}", "/v1/things/a%20b", {"id": "a b"}),
        ("/v1/files/{path=**}", "/v1/files/a/b/c.txt", {"path": "a/b/c.txt"}),
        ("/v1/files/**", "/v1/files/a/b", {}),
        ("/v1/{name=workspaces/*}:archive", "/v1/workspaces/w:archive", {"name": "workspaces/w"}),
        ("/v1/{name=workspaces/*}:archive", "/v1/workspaces/w", None),
        ("/v1/{name=workspaces/*}:archive", "/v1/workspaces/w:restore", None),
        ("/v1/users:signUp", "/v1/users:signUp", {}),
        ("/v1/users/me", "/v1/users/me", {}),
        ("/v1/*/things", "/v1/any/things", {}),
    ],
)
def test_template_matches(template: str, path: str, expected: dict[str, str] | None) -> None:
    assert compile_template(template).match(path) == expected


@pytest.mark.parametrize(
    "template",
    ["v1/no-slash", "/v1/{name", "/v1/{bad-name}", "/v1/**/x", "/v1//x", "/v1/{a={b}}", "/v1/x:bad verb"],
)
def test_malformed_templates_are_rejected(template: str) -> None:
    with pytest.raises(TemplateError):
        compile_template(template)


def test_template_records_its_verb_and_variables() -> None:
    compiled = compile_template("/v1/{parent=workspaces/*}/{item.id}:move")
    assert compiled.verb == "move"
    assert compiled.variables == ("parent", "item.id")


def _rpc(name: str = "Get") -> RpcMethod:
    return RpcMethod("tessera.test.v1.TestService", name, ts.GetWorkspaceRequest, tenancy_pb2.Workspace)


def test_additional_bindings_and_custom_methods_become_routes() -> None:
    rule = http_pb2.HttpRule(get="/v1/{name=workspaces/*}", response_body="workspace")
    rule.additional_bindings.add(post="/v1/{name=workspaces/*}:get", body="*")
    rule.additional_bindings.add(custom=http_pb2.CustomHttpPattern(kind="HEAD", path="/v1/{name=workspaces/*}"))

    routes = routes_for_rule(rule, _rpc())

    assert [(r.http_method, r.template.source, r.body, r.response_body) for r in routes] == [
        ("GET", "/v1/{name=workspaces/*}", "", "workspace"),
        ("POST", "/v1/{name=workspaces/*}:get", "*", ""),
        ("HEAD", "/v1/{name=workspaces/*}", "", ""),
    ]
    table = RouteTable(routes)
    assert table.lookup("POST", "/v1/workspaces/w:get").variables == {"name": "workspaces/w"}
    assert table.lookup("GET", "/v1/workspaces/w").route.http_method == "GET"


def test_unknown_path_is_not_found_and_wrong_method_lists_allowed_ones() -> None:
    table = RouteTable(contract_routes())

    with pytest.raises(RouteNotFound):
        table.lookup("GET", "/v1/nothing-here")
    with pytest.raises(MethodNotAllowed) as wrong:
        table.lookup("PUT", "/v1/workspaces")
    assert wrong.value.allowed == ("GET", "POST")
    with pytest.raises(MethodNotAllowed) as verb:
        table.lookup("GET", f"/v1/workspaces/{WORKSPACE}:undelete")
    assert verb.value.allowed == ("POST",)


@pytest.mark.parametrize(
    ("method", "path", "rpc", "variables"),
    [
        ("POST", "/v1/workspaces", "CreateWorkspace", {}),
        ("GET", "/v1/workspaces", "ListWorkspaces", {}),
        ("GET", f"/v1/workspaces/{WORKSPACE}", "GetWorkspace", {"name": f"workspaces/{WORKSPACE}"}),
        ("PATCH", f"/v1/workspaces/{WORKSPACE}", "UpdateWorkspace", {"workspace.name": f"workspaces/{WORKSPACE}"}),
        ("POST", f"/v1/workspaces/{WORKSPACE}:undelete", "UndeleteWorkspace", {"name": f"workspaces/{WORKSPACE}"}),
        ("GET", f"/v1/workspaces/{WORKSPACE}/members", "ListMembers", {"parent": f"workspaces/{WORKSPACE}"}),
        (
            "DELETE",
            f"/v1/workspaces/{WORKSPACE}/members/u1",
            "RemoveMember",
            {"name": f"workspaces/{WORKSPACE}/members/u1"},
        ),
        ("POST", "/v1/users:signUp", "SignUp", {}),
        ("GET", "/v1/users/me", "GetCurrentUser", {}),
        ("POST", "/v1/users/me:changePassword", "ChangePassword", {}),
    ],
)
def test_contract_routes_resolve_to_their_rpc(method: str, path: str, rpc: str, variables: dict[str, str]) -> None:
    found = RouteTable(contract_routes()).lookup(method, path)

    assert found.route.rpc.name == rpc
    assert found.variables == variables


def test_every_annotated_rpc_has_a_route() -> None:
    routes = contract_routes()
    names = {route.rpc.path for route in routes}
    assert "/tessera.tenancy.v1.TenancyService/GetWorkspace" in names
    assert "/tessera.identity.v1.IdentityService/SignIn" in names
    assert all(route.rpc.input_type.DESCRIPTOR.full_name.endswith("Request") for route in routes)


def _lookup_one_route_at_a_time(routes: list[Route], method: str, path: str) -> tuple[str, Any]:
    """The table's rules spelled out route by route: verb routes first, 405 across methods, then plain routes."""
    ordered = sorted(routes, key=lambda r: r.specificity)
    wanted = "GET" if method == "HEAD" else method
    for verb_routes in (True, False):
        kind = [route for route in ordered if (route.template.verb is not None) == verb_routes]
        for route in kind:
            variables = route.template.match(path)
            if route.http_method == wanted and variables is not None:
                return "found", (route, variables)
        allowed = {route.http_method for route in kind if route.template.match(path) is not None}
        if allowed:
            return "405", tuple(sorted(allowed))
    return "404", None


def _sample_paths(routes: list[Route]) -> list[str]:
    """Paths each template matches, near misses of them, and escaped or odd variants."""
    paths = {"/", "/v1", "/v1/", "/v1/workspaces/w:", "/v1/workspaces/w%3Aundelete", "/v1/users:signUp/x"}
    for route in routes:
        concrete = re.sub(r"\{[^}=]+\}", "id-1", route.template.source)
        concrete = re.sub(r"\{[^}]+=([^}]+)\}", r"\1", concrete).replace("**", "a/b").replace("*", "x%20y")
        paths.update({concrete, concrete + "/extra", concrete.rsplit("/", 1)[0], concrete + ":unknownVerb"})
    return sorted(paths)


def _table_outcome(table: RouteTable, method: str, path: str) -> tuple[str, Any]:
    try:
        found = table.lookup(method, path)
    except MethodNotAllowed as exc:
        return "405", exc.allowed
    except RouteNotFound:
        return "404", None
    return "found", (found.route, found.variables)


def test_table_lookup_equals_trying_each_route_in_order() -> None:
    routes = contract_routes()
    table = RouteTable(routes)
    for path in _sample_paths(routes):
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            expected = _lookup_one_route_at_a_time(routes, method, path)
            assert _table_outcome(table, method, path) == expected, (method, path)
