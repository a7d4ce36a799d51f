"""Transcoding rules, table-driven: unit cases on a probe message, then through a real uvicorn and real services."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any

import grpc
import httpx
import pytest
from google.api import http_pb2
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    field_mask_pb2,
    json_format,
    message_factory,
    timestamp_pb2,
    wrappers_pb2,
)

from gateway.app import NDJSON, SSE, create_app, parse_grpc_timeout
from gateway.routes import RouteTable, RpcMethod, routes_for_rule
from gateway.settings import GatewaySettings, GatewaySettingsError
from gateway.transcode import TranscodeError, build_request, message_to_json, render_response
from tessera.tenancy.v1 import tenancy_pb2
from tessera.tenancy.v1 import tenancy_service_pb2 as ts
from tests.e2e.stack import Mesh
from tests.gateway.conftest import (
    ALLOWED_ORIGIN,
    MAX_BODY_BYTES,
    PASSWORD,
    GatewayUser,
    create_workspace,
    expect,
    serve,
    settings_for,
    sign_up_and_in,
)
from tests.helpers import eventually

# -- a probe message with every kind of field the mapping rules cover -----------------------------

F = descriptor_pb2.FieldDescriptorProto


def _probe_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for module in (timestamp_pb2, duration_pb2, field_mask_pb2, wrappers_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    file = descriptor_pb2.FileDescriptorProto(
        name="gatewaytest/probe.proto",
        package="gatewaytest",
        syntax="proto3",
        dependency=[
            "google/protobuf/timestamp.proto",
            "google/protobuf/duration.proto",
            "google/protobuf/field_mask.proto",
            "google/protobuf/wrappers.proto",
        ],
    )
    color = file.enum_type.add(name="Color")
    for number, name in enumerate(("COLOR_UNSPECIFIED", "COLOR_RED", "COLOR_BLUE")):
        color.value.add(name=name, number=number)
    inner = file.message_type.add(name="Inner")
    inner.field.add(name="label", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    inner.field.add(name="count", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    inner.field.add(name="color", number=3, type=F.TYPE_ENUM, type_name=".gatewaytest.Color", label=F.LABEL_OPTIONAL)
    probe = file.message_type.add(name="Probe")
    fields = [
        ("name", F.TYPE_STRING, "", F.LABEL_OPTIONAL),
        ("inner", F.TYPE_MESSAGE, ".gatewaytest.Inner", F.LABEL_OPTIONAL),
        ("ids", F.TYPE_INT64, "", F.LABEL_REPEATED),
        ("color", F.TYPE_ENUM, ".gatewaytest.Color", F.LABEL_OPTIONAL),
        ("since", F.TYPE_MESSAGE, ".google.protobuf.Timestamp", F.LABEL_OPTIONAL),
        ("within", F.TYPE_MESSAGE, ".google.protobuf.Duration", F.LABEL_OPTIONAL),
        ("update_mask", F.TYPE_MESSAGE, ".google.protobuf.FieldMask", F.LABEL_OPTIONAL),
        ("limit", F.TYPE_MESSAGE, ".google.protobuf.Int32Value", F.LABEL_OPTIONAL),
        ("flag", F.TYPE_MESSAGE, ".google.protobuf.BoolValue", F.LABEL_OPTIONAL),
        ("colors", F.TYPE_ENUM, ".gatewaytest.Color", F.LABEL_REPEATED),
        ("active", F.TYPE_BOOL, "", F.LABEL_OPTIONAL),
        ("big", F.TYPE_INT64, "", F.LABEL_OPTIONAL),
        ("request_id", F.TYPE_STRING, "", F.LABEL_OPTIONAL),
    ]
    for number, (name, kind, type_name, label) in enumerate(fields, start=1):
        added = probe.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            added.type_name = type_name
    pool.Add(file)
    return pool


_POOL = _probe_pool()
Probe: Any = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("gatewaytest.Probe"))
PROBE_RPC = RpcMethod("gatewaytest.ProbeService", "Probe", Probe, Probe)


def _probe_table() -> RouteTable:
    rule = http_pb2.HttpRule(get="/v1/{name=probes/*}")
    rule.additional_bindings.add(patch="/v1/{name=probes/*}", body="inner")
    rule.additional_bindings.add(post="/v1/probes", body="*")
    rule.additional_bindings.add(post="/v1/{name=probes/*}:label", body="inner")
    return RouteTable(routes_for_rule(rule, PROBE_RPC))


TABLE = _probe_table()


def transcode(method: str, path: str, *, query: str = "", body: bytes = b"") -> Any:
    match = TABLE.lookup(method, path)
    pairs = [tuple(pair.split("=", 1)) for pair in query.split("&") if pair]
    return build_request(match.route, variables=match.variables, body=body, query=pairs, http_method=method)


def as_json(message: Any) -> dict[str, Any]:
    return dict(json_format.MessageToDict(message))


@pytest.mark.gate("S01")
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("inner.label=hello", {"inner": {"label": "hello"}}),
        ("inner.count=5&inner.color=COLOR_BLUE", {"inner": {"count": "5", "color": "COLOR_BLUE"}}),
        ("ids=1&ids=2&ids=3", {"ids": ["1", "2", "3"]}),
        ("color=COLOR_RED", {"color": "COLOR_RED"}),
        ("color=2", {"color": "COLOR_BLUE"}),
        ("colors=COLOR_RED&colors=COLOR_BLUE", {"colors": ["COLOR_RED", "COLOR_BLUE"]}),
        ("since=2026-01-02T03:04:05Z", {"since": "2026-01-02T03:04:05Z"}),
        ("within=1.5s", {"within": "1.500s"}),
        ("updateMask=name,inner.label", {"updateMask": "name,inner.label"}),
        ("update_mask=inner.count", {"updateMask": "inner.count"}),
        ("limit=7", {"limit": 7}),
        ("flag=false", {"flag": False}),
        ("active=true", {"active": True}),
        ("big=9007199254740993", {"big": "9007199254740993"}),
        ("request_id=abc&requestId=abc", None),
    ],
)
def test_query_parameters_fill_the_request(query: str, expected: dict[str, Any] | None) -> None:
    if expected is None:
        with pytest.raises(TranscodeError):
            transcode("GET", "/v1/probes/p1", query=query)
        return
    assert as_json(transcode("GET", "/v1/probes/p1", query=query)) == {"name": "probes/p1", **expected}


@pytest.mark.gate("S01")
@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("nope=1", "nope"),
        ("inner.nope=1", "inner.nope"),
        ("inner=x", "inner"),
        ("ids=one", "ids"),
        ("color=COLOR_PURPLE", "color"),
        ("active=maybe", "active"),
        ("big=1&big=2", "big"),
        ("name=probes/other", "name"),
        ("since=yesterday", "since"),
    ],
)
def test_bad_query_parameters_are_named(query: str, field: str) -> None:
    with pytest.raises(TranscodeError) as rejected:
        transcode("GET", "/v1/probes/p1", query=query)
    assert rejected.value.field == field
    assert field in str(rejected.value)


@pytest.mark.gate("S01")
@pytest.mark.parametrize(
    ("method", "path", "query", "body", "expected"),
    [
        pytest.param(
            "POST",
            "/v1/probes",
            "",
            b'{"name": "probes/x", "ids": ["4"]}',
            {"name": "probes/x", "ids": ["4"]},
            id="body-star",
        ),
        pytest.param(
            "POST",
            "/v1/probes",
            "",
            b'{"update_mask": "a.b", "request_id": "r"}',
            {"updateMask": "a.b", "requestId": "r"},
            id="proto-names",
        ),
        pytest.param("POST", "/v1/probes", "", b"", {}, id="empty-body"),
        pytest.param(
            "POST",
            "/v1/probes/p:label",
            "",
            b'{"label": "l"}',
            {"name": "probes/p", "inner": {"label": "l"}},
            id="body-field-no-mask-on-post",
        ),
        pytest.param(
            "PATCH",
            "/v1/probes/p",
            "",
            b'{"label": "l", "count": "3"}',
            {"name": "probes/p", "inner": {"label": "l", "count": "3"}, "updateMask": "count,label"},
            id="patch-derives-update-mask",
        ),
        pytest.param(
            "PATCH",
            "/v1/probes/p",
            "updateMask=label",
            b'{"label": "l", "count": "3"}',
            {"name": "probes/p", "inner": {"label": "l", "count": "3"}, "updateMask": "label"},
            id="patch-keeps-explicit-mask",
        ),
    ],
)
def test_bodies_fill_the_request(method: str, path: str, query: str, body: bytes, expected: dict[str, Any]) -> None:
    assert as_json(transcode(method, path, query=query, body=body)) == expected


@pytest.mark.gate("S01")
@pytest.mark.parametrize(
    ("method", "path", "query", "body", "message"),
    [
        ("POST", "/v1/probes", "", b'{"name": ', "malformed JSON body"),
        ("POST", "/v1/probes", "", b"[1, 2]", "must be a JSON object"),
        ("POST", "/v1/probes", "", b'{"unknownField": 1}', "unknownField"),
        ("POST", "/v1/probes", "color=COLOR_RED", b"{}", "unknown query parameter 'color'"),
        ("GET", "/v1/probes/p", "", b'{"name": "x"}', "takes no request body"),
        ("POST", "/v1/probes", "", b'{"big": "twelve"}', "big"),
    ],
)
def test_bad_bodies_are_rejected_with_the_reason(method: str, path: str, query: str, body: bytes, message: str) -> None:
    with pytest.raises(TranscodeError) as rejected:
        transcode(method, path, query=query, body=body)
    assert message in str(rejected.value)


@pytest.mark.gate("S01")
def test_responses_use_canonical_json() -> None:
    probe = Probe(big=2**40, color=1, ids=[1, 2])
    probe.since.FromJsonString("2026-03-04T05:06:07Z")

    rendered = message_to_json(probe)

    assert rendered["big"] == "1099511627776"
    assert rendered["ids"] == ["1", "2"]
    assert rendered["color"] == "COLOR_RED"
    assert rendered["since"] == "2026-03-04T05:06:07Z"
    assert rendered["name"] == ""  # unpopulated fields without presence are emitted
    assert rendered["colors"] == []
    assert "within" not in rendered  # message fields have presence
    rule = http_pb2.HttpRule(get="/v1/{name=probes/*}", response_body="inner")
    (route,) = routes_for_rule(rule, PROBE_RPC)
    assert render_response(route, Probe(inner={"label": "only"})) == {
        "label": "only",
        "count": "0",
        "color": "COLOR_UNSPECIFIED",
    }


@pytest.mark.gate("S01")
@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("5S", 5.0),
        ("100m", 0.1),
        ("2M", 120.0),
        ("1H", 3600.0),
        ("250u", 0.00025),
        ("7n", 7e-9),
        ("5", None),
        ("x1S", None),
    ],
)
def test_grpc_timeout_header(header: str, seconds: float | None) -> None:
    assert parse_grpc_timeout(header) == (pytest.approx(seconds) if seconds is not None else None)


# -- through a real uvicorn and the real identity and tenancy services ------------------------------


@dataclass
class World:
    owner: GatewayUser
    stranger: GatewayUser
    workspace: dict[str, Any]
    workspace_id: str
    foreign: dict[str, Any]
    foreign_id: str


@pytest.fixture(scope="module")
async def world(gateway_url: str) -> World:
    async with httpx.AsyncClient(base_url=gateway_url, timeout=20) as http:
        owner = await sign_up_and_in(http, "owner")
        stranger = await sign_up_and_in(http, "stranger")
        workspace = await create_workspace(http, owner, "Owner space")
        foreign = await create_workspace(http, stranger, f"foreign-{uuid.uuid4().hex[:8]}")
    return World(
        owner,
        stranger,
        workspace,
        workspace["name"].removeprefix("workspaces/"),
        foreign,
        foreign["name"].removeprefix("workspaces/"),
    )


@pytest.mark.gate("S01")
async def test_sign_up_and_sign_in_through_the_gateway(client: httpx.AsyncClient) -> None:
    user = await sign_up_and_in(client, "rest")

    me = expect(await client.get("/v1/users/me", headers=user.bearer()), 200)

    assert me["user"]["email"] == user.email
    assert me["user"]["displayName"] == user.display_name  # lowerCamelCase names


@pytest.mark.gate("S01")
async def test_create_renders_enums_timestamps_and_unpopulated_fields(client: httpx.AsyncClient, world: World) -> None:
    key = str(uuid.uuid4())
    headers = {**world.owner.bearer(), "idempotency-key": key}

    first = await client.post("/v1/workspaces", json={"displayName": "Rendered"}, headers=headers)
    again = await client.post("/v1/workspaces", json={"displayName": "Rendered"}, headers=headers)

    workspace = expect(first, 200)["workspace"]
    assert expect(again, 200)["workspace"]["name"] == workspace["name"]  # Idempotency-Key → request_id
    assert workspace["state"].startswith("WORKSPACE_STATE_")
    assert workspace["createTime"].endswith("Z")
    assert workspace["creator"].endswith(world.owner.user_id)
    assert "etag" in workspace
    assert "deleteTime" not in workspace


@pytest.mark.gate("S01")
async def test_get_workspace_by_path_variable(client: httpx.AsyncClient, world: World) -> None:
    response = await client.get(
        f"/v1/workspaces/{world.workspace_id}",
        headers={**world.owner.bearer(world.workspace_id), "x-request-id": "get-ws-1"},
    )

    assert expect(response, 200)["workspace"]["name"] == world.workspace["name"]
    assert response.headers["x-request-id"] == "get-ws-1"


@pytest.mark.gate("S01")
async def test_generated_request_id_is_returned(client: httpx.AsyncClient, world: World) -> None:
    response = await client.get("/v1/workspaces", headers=world.owner.bearer())

    assert response.status_code == 200
    assert len(response.headers["x-request-id"]) >= 16


@pytest.mark.gate("S01")
@pytest.mark.parametrize(
    ("query", "status", "check"),
    [
        ("pageSize=1", 200, lambda body: len(body["workspaces"]) == 1 and body["nextPageToken"] != ""),
        ("pageSize=100&showDeleted=false", 200, lambda body: len(body["workspaces"]) >= 2),
        ("page_size=100&show_deleted=true", 200, lambda body: len(body["workspaces"]) >= 2),
        ("pageSize=-1", 400, lambda body: body["code"] == 3),
        ("pageSize=ten", 400, lambda body: "pageSize" in body["message"]),
        (
            "colour=blue",
            400,
            lambda body: "colour" in body["message"] and body["details"][0]["fieldViolations"][0]["field"] == "colour",
        ),
    ],
)
async def test_list_workspaces_query_parameters(
    client: httpx.AsyncClient, world: World, query: str, status: int, check: Any
) -> None:
    body = expect(await client.get(f"/v1/workspaces?{query}", headers=world.owner.bearer()), status)

    assert check(body), body


@pytest.mark.gate("S01")
async def test_patch_derives_the_update_mask_and_honours_an_explicit_one(
    client: httpx.AsyncClient, world: World
) -> None:
    path = f"/v1/workspaces/{world.workspace_id}"
    headers = world.owner.bearer(world.workspace_id)

    derived = expect(await client.patch(path, json={"displayName": "Renamed"}, headers=headers), 200)
    explicit = expect(
        await client.patch(f"{path}?updateMask=displayName", json={"displayName": "Renamed again"}, headers=headers),
        200,
    )
    fetched = expect(await client.get(path, headers=headers), 200)

    assert derived["workspace"]["displayName"] == "Renamed"
    assert explicit["workspace"]["displayName"] == "Renamed again"
    assert fetched["workspace"]["displayName"] == "Renamed again"


@pytest.mark.gate("S01")
async def test_custom_verb_undelete(client: httpx.AsyncClient, gateway_url: str) -> None:
    owner = await sign_up_and_in(client, "undeleter")
    workspace = await create_workspace(client, owner, "Doomed")
    workspace_id = workspace["name"].removeprefix("workspaces/")
    headers = owner.bearer(workspace_id)

    deleted = expect(await client.delete(f"/v1/workspaces/{workspace_id}", headers=headers), 200)
    gone = await client.get(f"/v1/workspaces/{workspace_id}", headers=headers)

    async def undeleted() -> Any:
        # Deleting revokes the workspace tokens issued until then: undelete with a fresh one (next second).
        issued = await client.post(
            "/v1/sessions:issueWorkspaceToken", json={"workspace": workspace["name"]}, headers=owner.bearer()
        )
        fresh = {"authorization": f"Bearer {expect(issued, 200)['tokens']['accessToken']}"}
        response = await client.post(f"/v1/workspaces/{workspace_id}:undelete", json={}, headers=fresh)
        return response.json() if response.status_code == 200 else None

    restored = await eventually(undeleted, timeout=10, interval=0.2, what="undelete with a fresh workspace token")
    assert "deleteTime" in deleted["workspace"]
    assert gone.status_code in (401, 404)
    assert "deleteTime" not in restored["workspace"]


@pytest.mark.gate("S01")
@pytest.mark.parametrize(
    ("method", "path", "status", "code", "allow"),
    [
        ("GET", "/v1/no-such-thing", 404, 5, None),
        ("GET", "/v2/workspaces", 404, 5, None),
        ("PUT", "/v1/workspaces", 405, 12, "GET, POST"),
        ("DELETE", "/v1/users:signUp", 405, 12, "POST"),
    ],
)
async def test_unknown_routes_and_wrong_methods(
    client: httpx.AsyncClient, method: str, path: str, status: int, code: int, allow: str | None
) -> None:
    response = await client.request(method, path)

    assert expect(response, status)["code"] == code
    assert response.headers.get("allow") == allow


@pytest.mark.gate("S01")
@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"displayName": ""}', "display_name"),
        (b'{"displayName": ', "malformed JSON"),
        (b'{"displayName": "x", "colour": "blue"}', "colour"),
    ],
)
async def test_invalid_bodies_are_400_with_details(
    client: httpx.AsyncClient, world: World, body: bytes, fragment: str
) -> None:
    response = await client.post(
        "/v1/workspaces", content=body, headers={**world.owner.bearer(), "content-type": "application/json"}
    )

    error = expect(response, 400)
    assert error["code"] == 3
    assert fragment in json.dumps(error)


@pytest.mark.gate("S01")
async def test_field_violations_from_the_service_are_relayed(client: httpx.AsyncClient, world: World) -> None:
    error = expect(await client.post("/v1/workspaces", json={"displayName": ""}, headers=world.owner.bearer()), 400)

    violations = [
        v for d in error["details"] if d["@type"].endswith("google.rpc.BadRequest") for v in d["fieldViolations"]
    ]
    assert any(v["field"].endswith("display_name") for v in violations), error


@pytest.mark.gate("S02")
async def test_missing_token_is_401_with_www_authenticate(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/workspaces")

    assert expect(response, 401)["code"] == 16
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.gate("S03")
async def test_foreign_workspace_is_not_found_and_leaks_nothing(client: httpx.AsyncClient, world: World) -> None:
    path = f"/v1/workspaces/{world.foreign_id}"
    with_own_workspace_token = await client.get(path, headers=world.owner.bearer(world.workspace_id))
    patched = await client.patch(path, json={"displayName": "hijacked"}, headers=world.owner.bearer(world.workspace_id))
    listed = expect(await client.get("/v1/workspaces?pageSize=1000", headers=world.owner.bearer()), 200)

    assert expect(with_own_workspace_token, 404)["code"] == 5
    assert patched.status_code == 404
    for response_text in (with_own_workspace_token.text, patched.text, json.dumps(listed)):
        assert world.foreign["displayName"] not in response_text
        assert world.stranger.email not in response_text
    foreign_token = world.owner.bearer(world.workspace_id)
    issued = await client.post(
        "/v1/sessions:issueWorkspaceToken", json={"workspace": world.foreign["name"]}, headers=world.owner.bearer()
    )
    assert issued.status_code in (403, 404), issued.text
    assert foreign_token  # the owner's own token never opened the foreign workspace above


@pytest.mark.gate("S01")
async def test_oversized_body_is_413(client: httpx.AsyncClient, world: World) -> None:
    big = json.dumps({"displayName": "x" * (MAX_BODY_BYTES + 1)})

    response = await client.post(
        "/v1/workspaces", content=big, headers={**world.owner.bearer(), "content-type": "application/json"}
    )

    error = expect(response, 413)
    assert error["code"] == 8
    assert str(MAX_BODY_BYTES) in error["message"]


@pytest.mark.gate("S01")
async def test_grpc_timeout_header_sets_the_deadline(client: httpx.AsyncClient, world: World) -> None:
    response = await client.get("/v1/workspaces", headers={**world.owner.bearer(), "grpc-timeout": "1n"})

    assert expect(response, 504)["code"] == 4


@pytest.mark.gate("S01")
async def test_a_route_default_deadline_applies_unless_the_client_sets_one(gateway_mesh: Mesh, world: World) -> None:
    """TESSERA_GATEWAY_ROUTE_DEADLINES: a method's entry wins over its service's, which wins over the default."""
    settings = settings_for(
        gateway_mesh,
        route_deadlines=(
            "tessera.tenancy.v1.TenancyService/ListWorkspaces=0.000001, tessera.tenancy.v1.TenancyService=30"
        ),
    )
    async with serve(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as http:
        listed = await http.get("/v1/workspaces", headers=world.owner.bearer())
        # The client's own deadline replaces the route's (within the gateway's maximum).
        given = await http.get("/v1/workspaces", headers={**world.owner.bearer(), "grpc-timeout": "10S"})
        other = await http.get(f"/v1/workspaces/{world.workspace_id}", headers=world.owner.bearer(world.workspace_id))

    assert expect(listed, 504)["code"] == 4  # the method's microsecond
    assert expect(given, 200)["workspaces"]
    assert expect(other, 200)["workspace"]["name"] == world.workspace["name"]  # the service's 30 s


@pytest.mark.gate("S01")
async def test_route_deadlines_naming_no_rpc_are_refused_at_start(gateway_mesh: Mesh) -> None:
    with pytest.raises(GatewaySettingsError, match=r"TESSERA_GATEWAY_ROUTE_DEADLINES.*'tessera\.nope\.v1\.X/Y'"):
        settings_for(gateway_mesh, route_deadlines="tessera.nope.v1.X/Y=5")
    with pytest.raises(GatewaySettingsError, match="over TESSERA_GATEWAY_MAX_DEADLINE_SECONDS"):
        settings_for(gateway_mesh, route_deadlines="tessera.tenancy.v1.TenancyService=301")


@pytest.mark.gate("S01")
async def test_cors_preflight_admits_configured_origins_only(client: httpx.AsyncClient) -> None:
    def preflight(origin: str) -> Any:
        return client.options(
            "/v1/workspaces",
            headers={
                "origin": origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
            },
        )

    allowed = await preflight(ALLOWED_ORIGIN)
    refused = await preflight("https://evil.example")

    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers


@pytest.mark.gate("S01")
async def test_health_endpoints(client: httpx.AsyncClient) -> None:
    assert expect(await client.get("/healthz"), 200) == {"status": "ok"}
    ready = expect(await client.get("/readyz"), 200)
    assert ready["services"] == {
        "tessera.identity.v1.IdentityService": "SERVING",
        "tessera.tenancy.v1.TenancyService": "SERVING",
        "tessera.workflow.v1.WorkflowService": "SERVING",
    }


@pytest.mark.gate("S01")
async def test_readyz_fails_when_a_backend_is_down(gateway_mesh: Mesh) -> None:
    settings = settings_for(gateway_mesh, addresses={"tenancy": f"127.0.0.1:{_closed_port()}"})
    async with serve(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.get("/readyz")
        call = await http.get("/v1/workspaces", headers={"authorization": "Bearer not-checked-by-a-dead-backend"})

    unavailable = expect(call, 503)
    assert unavailable["code"] == 14
    assert unavailable["message"] == "backend unavailable"
    assert settings.addresses["tenancy"] not in call.text  # transport errors name no internal address
    body = expect(response, 503)
    assert body["services"]["tessera.tenancy.v1.TenancyService"] != "SERVING"
    assert body["services"]["tessera.identity.v1.IdentityService"] == "SERVING"


def _closed_port() -> int:
    from tessera_cli.embedded import free_port

    return free_port()


# -- server streaming: SSE and NDJSON, cancelled on disconnect --------------------------------------

FEED_SERVICE = "tessera.gatewaytest.v1.WorkspaceFeed"


class Feed:
    """A tiny real gRPC server with one server-streaming method built from existing message types."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.metadata: dict[str, str] = {}

    async def peek(self, request: ts.GetWorkspaceRequest, context: grpc.aio.ServicerContext) -> Any:
        """A unary call with response metadata: initial, trailing, binary and a gRPC-reserved key."""
        await context.send_initial_metadata((("x-feed-shard", "3"), ("x-feed-raw-bin", b"\x00\x01")))
        context.set_trailing_metadata((("x-feed-cursor", "abc"), ("x-request-id", "from-the-service")))
        return tenancy_pb2.Workspace(name=request.name, display_name="peeked")

    async def watch(self, request: ts.GetWorkspaceRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        self.metadata = {key: str(value) for key, value in context.invocation_metadata() or ()}
        await context.send_initial_metadata((("x-feed-shard", "7"),))
        if request.name.endswith("/missing"):
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such workspace")
        try:
            for tick in range(1000):
                yield tenancy_pb2.Workspace(name=request.name, display_name=f"tick {tick}")
                if request.name.endswith("/short") and tick == 2:
                    return
                if request.name.endswith("/flaky") and tick == 1:
                    await context.abort(grpc.StatusCode.ABORTED, "feed interrupted")
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@pytest.fixture(scope="module")
async def feed_gateway(gateway_settings: GatewaySettings) -> AsyncIterator[tuple[str, Feed]]:
    feed = Feed()
    handler = grpc.method_handlers_generic_handler(
        FEED_SERVICE,
        {
            "Watch": grpc.unary_stream_rpc_method_handler(
                feed.watch,
                request_deserializer=ts.GetWorkspaceRequest.FromString,
                response_serializer=tenancy_pb2.Workspace.SerializeToString,
            ),
            "Peek": grpc.unary_unary_rpc_method_handler(
                feed.peek,
                request_deserializer=ts.GetWorkspaceRequest.FromString,
                response_serializer=tenancy_pb2.Workspace.SerializeToString,
            ),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    rpc = RpcMethod(FEED_SERVICE, "Watch", ts.GetWorkspaceRequest, tenancy_pb2.Workspace, server_streaming=True)
    peek = RpcMethod(FEED_SERVICE, "Peek", ts.GetWorkspaceRequest, tenancy_pb2.Workspace)
    routes = [
        *routes_for_rule(http_pb2.HttpRule(get="/v1/{name=workspaces/*}:watch"), rpc),
        *routes_for_rule(http_pb2.HttpRule(get="/v1/{name=workspaces/*}:peek"), peek),
    ]
    settings = gateway_settings.model_copy(
        update={"addresses": {**gateway_settings.addresses, "gatewaytest": f"127.0.0.1:{port}"}}
    )
    try:
        async with serve(create_app(settings, extra_routes=routes)) as url:
            yield url, feed
    finally:
        await server.stop(None)


@pytest.mark.gate("S01")
async def test_server_streaming_as_sse(feed_gateway: tuple[str, Feed]) -> None:
    url, feed = feed_gateway
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        response = await http.get("/v1/workspaces/short:watch", headers={"x-request-id": "stream-1"})

    assert response.headers["content-type"].startswith("text/event-stream")
    events = [
        json.loads(line.removeprefix("data: ")) for line in response.text.splitlines() if line.startswith("data: ")
    ]
    assert [event["displayName"] for event in events] == ["tick 0", "tick 1", "tick 2"]
    assert events[0]["name"] == "workspaces/short"
    assert feed.metadata["x-request-id"] == "stream-1"


@pytest.mark.gate("S01")
async def test_response_metadata_comes_back_as_headers(feed_gateway: tuple[str, Feed]) -> None:
    url, _ = feed_gateway
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        unary = await http.get("/v1/workspaces/w1:peek", headers={"x-request-id": "peek-1"})
        stream = await http.get("/v1/workspaces/short:watch")

    assert expect(unary, 200)["displayName"] == "peeked"
    assert unary.headers["grpc-metadata-x-feed-shard"] == "3"  # initial metadata
    assert unary.headers["grpc-metadata-x-feed-cursor"] == "abc"  # trailing metadata
    assert unary.headers["x-request-id"] == "from-the-service"  # allow-listed: under its own name
    assert not [name for name in unary.headers if name.endswith("-bin") or name.startswith("grpc-metadata-grpc")]
    assert stream.headers["grpc-metadata-x-feed-shard"] == "7"


@pytest.mark.gate("S01")
async def test_server_streaming_as_ndjson(feed_gateway: tuple[str, Feed]) -> None:
    url, _ = feed_gateway
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        response = await http.get("/v1/workspaces/short:watch", headers={"accept": "application/x-ndjson"})

    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["displayName"] for line in lines] == ["tick 0", "tick 1", "tick 2"]


@pytest.mark.gate("S01")
@pytest.mark.parametrize("accept", [SSE, NDJSON])
async def test_error_in_the_middle_of_a_stream_is_its_last_event(feed_gateway: tuple[str, Feed], accept: str) -> None:
    url, _ = feed_gateway
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        response = await http.get("/v1/workspaces/flaky:watch", headers={"accept": accept})

    assert response.status_code == 200
    if accept == SSE:
        assert "event: error\n" in response.text
        last = json.loads(response.text.strip().splitlines()[-1].removeprefix("data: "))
    else:
        last = json.loads(response.text.strip().splitlines()[-1])["error"]
    assert last["code"] == 10
    assert last["message"] == "feed interrupted"
    assert response.text.count("tick ") == 2


@pytest.mark.gate("S01")
async def test_streaming_error_before_the_first_message_is_a_json_error(feed_gateway: tuple[str, Feed]) -> None:
    url, _ = feed_gateway
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        response = await http.get("/v1/workspaces/missing:watch")

    assert expect(response, 404)["message"] == "no such workspace"


@pytest.mark.gate("S01")
async def test_client_disconnect_cancels_the_rpc(feed_gateway: tuple[str, Feed]) -> None:
    url, feed = feed_gateway
    feed.cancelled.clear()
    received = 0
    async with (
        httpx.AsyncClient(base_url=url, timeout=10) as http,
        http.stream("GET", "/v1/workspaces/endless:watch") as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                received += 1
            if received == 2:
                break
    assert received == 2

    async def cancelled() -> bool:
        return feed.cancelled.is_set()

    await eventually(cancelled, timeout=10, what="the streaming RPC to be cancelled after the client left")


# -- the other parts mounted by create_app: OpenAPI, docs and browser sessions ------------------------


@pytest.mark.gate("S01")
async def test_openapi_and_docs_are_mounted(client: httpx.AsyncClient) -> None:
    document = expect(await client.get("/openapi.json"), 200)
    docs = await client.get("/docs")

    assert document["openapi"].startswith("3.1")
    assert "/v1/workspaces" in document["paths"]
    assert docs.status_code == 200
    assert "<html" in docs.text.lower()


def _cookies(response: httpx.Response) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    for header in response.headers.get_list("set-cookie"):
        jar.load(header)
    return {name: morsel.value for name, morsel in jar.items()}


@pytest.mark.gate("S02")
async def test_cookie_session_drives_transcoded_calls(client: httpx.AsyncClient) -> None:
    user = await sign_up_and_in(client, "cookie")
    signed_in = await client.post(
        "/auth/sign-in", json={"email": user.email, "password": PASSWORD}, headers={"origin": ALLOWED_ORIGIN}
    )
    assert signed_in.status_code == 200, signed_in.text
    cookies = _cookies(signed_in)
    client.cookies.clear()
    cookie = "; ".join(f"{name}={value}" for name, value in cookies.items())
    browser = {"cookie": cookie, "origin": ALLOWED_ORIGIN}

    without_csrf = await client.post("/v1/workspaces", json={"displayName": "By cookie"}, headers=browser)
    created = await client.post(
        "/v1/workspaces",
        json={"displayName": "By cookie"},
        headers={**browser, "x-csrf-token": cookies["tessera_csrf"]},
    )
    workspace = expect(created, 200)["workspace"]
    fetched = await client.get(f"/v1/{workspace['name']}", headers=browser)  # session → workspace token

    assert without_csrf.status_code == 403
    assert expect(fetched, 200)["workspace"]["displayName"] == "By cookie"
