"""OpenAPI 3.1 document from the contracts, and `/openapi.json` + offline `/docs` over a real uvicorn."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import jsonschema
import pytest
import uvicorn
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, json_format
from openapi_spec_validator import validate
from starlette.applications import Starlette

from gateway.openapi import build_document, component_schemas, discover_services, routes
from tessera.tenancy.v1 import tenancy_pb2
from tessera_cli.embedded import free_port

pytestmark = pytest.mark.gate("S01")

OPERATIONS = ("get", "put", "post", "delete", "patch")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return build_document(title="Tessera", version="0.1.0")


def _operations(document: dict[str, Any]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    found: dict[str, tuple[str, str, dict[str, Any]]] = {}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert method in OPERATIONS
            assert operation["operationId"] not in found, operation["operationId"]
            found[operation["operationId"]] = (method, path, operation)
    return found


def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises on any violation of the 3.1 schema


def test_every_http_binding_of_every_rpc_is_an_operation(document: dict[str, Any]) -> None:
    expected: set[tuple[str, str]] = set()
    for service in discover_services():
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            rule = options.Extensions[annotations_pb2.http]
            bindings = [rule, *rule.additional_bindings]
            for index, binding in enumerate(bindings):
                verb = binding.WhichOneof("pattern")
                suffix = f"_{index}" if index else ""
                expected.add((f"{service.name}_{method.name}{suffix}", verb))
    operations = _operations(document)
    assert len(expected) >= 30  # identity + tenancy today
    assert {(op_id, method) for op_id, (method, _, _) in operations.items()} == expected
    assert operations["TenancyService_GetWorkspace"][:2] == ("get", "/v1/workspaces/{workspace}")
    revoke = operations["IdentityService_RevokeApiKey"][:2]
    assert revoke == ("post", "/v1/workspaces/{workspace}/apiKeys/{apiKey}:revoke")


def test_every_path_parameter_is_declared_and_required(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        in_path = set(re.findall(r"\{([^}]+)\}", path))
        for operation in item.values():
            declared = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "path"}
            assert set(declared) == in_path, (path, operation["operationId"])
            assert all(p["required"] is True for p in declared.values())


def test_query_parameters_for_non_path_fields(document: dict[str, Any]) -> None:
    operations = _operations(document)
    _, _, listing = operations["TenancyService_ListWorkspaces"]
    query = {p["name"]: p for p in listing["parameters"] if p["in"] == "query"}
    assert {"pageSize", "pageToken"} <= set(query)
    assert query["pageSize"]["schema"]["type"] == "integer"
    _, _, update = operations["TenancyService_UpdateWorkspace"]
    query = {p["name"]: p for p in update["parameters"] if p["in"] == "query"}
    assert "updateMask" in query  # FieldMask as one string parameter
    assert query["updateMask"]["schema"]["type"] == "string"
    body = update["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"] == "#/components/schemas/tessera.tenancy.v1.Workspace"


def test_proto_comments_are_descriptions(document: dict[str, Any]) -> None:
    workspace = document["components"]["schemas"]["tessera.tenancy.v1.Workspace"]
    assert workspace["description"].startswith("A workspace is Tessera's tenant")
    assert workspace["properties"]["displayName"]["description"] == "Human-readable name, 1 to 100 characters."
    _, _, get = _operations(document)["TenancyService_GetWorkspace"]
    assert get["description"].startswith("Gets a workspace visible to the caller.")


def test_field_behavior_required_and_output_only(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    workspace = schemas["tessera.tenancy.v1.Workspace"]
    assert workspace["required"] == ["displayName"]
    for output_only in ("name", "state", "createTime", "etag"):
        assert workspace["properties"][output_only]["readOnly"] is True, output_only
    assert "readOnly" not in workspace["properties"]["displayName"]


def test_types_enums_and_well_known_types(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    workspace = schemas["tessera.tenancy.v1.Workspace"]["properties"]
    assert workspace["createTime"]["type"] == "string"
    assert workspace["createTime"]["format"] == "date-time"
    state = schemas["tessera.tenancy.v1.WorkspaceState"]
    assert state["type"] == "string"
    assert state["enum"] == list(tenancy_pb2.WorkspaceState.keys())
    # Scalars that JSON cannot carry exactly, bytes, doubles and oneofs, on a message with all of them.
    option = component_schemas([descriptor_pb2.UninterpretedOption.DESCRIPTOR], comments={})
    props = option["google.protobuf.UninterpretedOption"]["properties"]
    assert props["positiveIntValue"] == {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"}
    assert props["negativeIntValue"]["format"] == "int64"
    assert props["doubleValue"]["type"] == "number"
    assert props["stringValue"]["format"] == "byte"
    assert props["name"]["type"] == "array"


def test_errors_and_security(document: dict[str, Any]) -> None:
    components = document["components"]
    error = components["schemas"]["Error"]
    assert set(error["properties"]) == {"code", "message", "details"}
    assert components["securitySchemes"]["bearerAuth"] == {
        **components["securitySchemes"]["bearerAuth"],
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }
    assert components["securitySchemes"]["cookieAuth"]["in"] == "cookie"
    operations = _operations(document)
    for _, _, operation in operations.values():
        responses = operation["responses"]
        assert "200" in responses
        assert responses["4XX"] == {"$ref": "#/components/responses/Error"}
        assert responses["5XX"] == {"$ref": "#/components/responses/Error"}
        if operation["x-tessera-auth"]["level"] == "AUTH_LEVEL_PUBLIC":
            assert operation["security"] == []
        else:
            assert operation["security"] == [{"bearerAuth": []}, {"cookieAuth": []}]
    assert operations["IdentityService_SignIn"][2]["security"] == []
    assert operations["TenancyService_GetWorkspace"][2]["x-tessera-auth"] == {
        "level": "AUTH_LEVEL_WORKSPACE",
        "permission": "workspace.read",
    }


@asynccontextmanager
async def _serve(app: Starlette) -> AsyncIterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while not server.started:
            assert asyncio.get_running_loop().time() < deadline, "uvicorn did not start"
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_openapi_json_and_offline_docs_are_served(document: dict[str, Any]) -> None:
    async with _serve(Starlette(routes=routes(document))) as base, httpx.AsyncClient(base_url=base) as client:
        served = await client.get("/openapi.json")
        assert served.status_code == 200
        assert served.headers["content-type"].startswith("application/json")
        assert served.json() == document

        docs = await client.get("/docs")
        assert docs.status_code == 200
        assert docs.headers["content-type"].startswith("text/html")
        html = docs.text
        assert "http://" not in html
        assert "https://" not in html
        assert '"validatorUrl": null' in html  # no call to the online validator either
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert any(a.endswith("swagger-ui-bundle.js") for a in assets)
        for asset in assets:
            assert asset.startswith("/"), asset  # same origin only
            response = await client.get(asset)
            assert response.status_code == 200, asset
            assert response.content, asset
        init = await client.get("/docs/assets/swagger-init.js")
        assert "SwaggerUIBundle(" in init.text
        assert "http" not in init.text
        assert (await client.get("/docs/assets/..%2F__init__.py")).status_code == 404
        assert (await client.get("/docs/assets/missing.js")).status_code == 404


def test_a_oneof_is_a_schema_constraint_of_at_most_one_member() -> None:
    """google.api.HttpRule's `pattern` oneof: get, put, post, delete, patch and custom."""
    schemas = component_schemas([http_pb2.HttpRule.DESCRIPTOR], comments={})
    rule = schemas["google.api.HttpRule"]
    assert len(rule["allOf"]) == 1
    members = {"get", "put", "post", "delete", "patch", "custom"}
    assert {entry["required"][0] for entry in rule["allOf"][0]["oneOf"] if "required" in entry} == members
    assert "Oneof `pattern`" in rule["description"]
    # Checked as JSON Schema, on the JSON the gateway writes for real HttpRules.
    checked = json.loads(json.dumps({**rule, "$defs": schemas}).replace("#/components/schemas/", "#/$defs/"))
    validator = jsonschema.Draft202012Validator(checked)
    for message in (
        http_pb2.HttpRule(get="/v1/x"),
        http_pb2.HttpRule(custom=http_pb2.CustomHttpPattern(kind="HEAD", path="/v1/x")),
        http_pb2.HttpRule(selector="only.a.selector"),
    ):
        validator.validate(json_format.MessageToDict(message))
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({"get": "/v1/x", "post": "/v1/x"})
