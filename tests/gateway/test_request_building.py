"""build_request sets string path variables directly; the message equals the canonical JSON merge it replaces."""

from __future__ import annotations

import re
from typing import Any

import pytest
from google.protobuf import json_format

from gateway.routes import Route, contract_routes
from gateway.transcode import build_request

pytestmark = pytest.mark.gate("S01")


def _with_variables(route: Route, value: str) -> str:
    """A path of `route` whose every single-segment wildcard is `value`."""
    concrete = re.sub(r"\{[^}=]+\}", value, route.template.source)
    return re.sub(r"\{[^}]+=([^}]+)\}", r"\1", concrete).replace("**", f"{value}/{value}").replace("*", value)


def _merged_as_json(route: Route, variables: dict[str, str]) -> Any:
    """The request message as the JSON merge builds it: one ParseDict per path variable."""
    message = route.rpc.input_type()
    for path, raw in variables.items():
        tree: dict[str, Any] = {}
        node = tree
        *parents, leaf = path.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = raw
        json_format.ParseDict(tree, message)
    return message


@pytest.mark.parametrize("value", ["0190a7a4-1c2d-7e3f-8a9b-0c1d2e3f4a5b", "caf%C3%A9", "a%2Fb"])
def test_path_variables_equal_the_json_merge(value: str) -> None:
    routes = [route for route in contract_routes() if route.template.variables and route.body in ("", "*")]
    assert routes
    for route in routes:
        path = _with_variables(route, value)
        variables = route.template.match(path)
        assert variables is not None, path
        built = build_request(route, variables=variables, body=b"", query=(), http_method=route.http_method)
        assert built == _merged_as_json(route, variables), path


def test_nested_variable_beside_a_body_field() -> None:
    (route,) = [r for r in contract_routes() if r.rpc.name == "UpdateWorkspace"]
    variables = {"workspace.name": "workspaces/0190a7a4-1c2d-7e3f-8a9b-0c1d2e3f4a5b"}
    built = build_request(
        route, variables=variables, body=b'{"displayName": "x", "name": "ignored"}', query=(), http_method="PATCH"
    )
    assert built.workspace.name == variables["workspace.name"]  # the path wins over the body
    assert built.workspace.display_name == "x"
    assert sorted(built.update_mask.paths) == ["display_name", "name"]
