"""Schemathesis against the served `/openapi.json`: a real gateway (uvicorn) over the real services."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.descriptors import domain_of
from gateway.openapi import build_document, routes
from gateway.settings import GatewaySettings
from tessera_cli.embedded import free_port
from tests.e2e.stack import running_mesh

pytestmark = pytest.mark.gate("S01")

PASSWORD = "schemathesis staple horse 42"  # test password
MAX_EXAMPLES = 6
# Run last: each of these may end the session or the workspace the other operations are fuzzed with.
DESTRUCTIVE = (
    "ArchiveItem",
    "DeleteItem",
    "ChangePassword",
    "TransferOwnership",
    "LeaveWorkspace",
    "DeleteWorkspace",
    "SignOut",
)


@dataclass(frozen=True)
class Caller:
    url: str
    token: str
    workspace_id: str
    project_id: str
    item_id: str


@asynccontextmanager
async def _serve(app: Starlette) -> AsyncIterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while not server.started:
            assert asyncio.get_running_loop().time() < deadline, "uvicorn did not start"
            assert not task.done(), "uvicorn stopped"
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def _post(client: httpx.AsyncClient, path: str, body: dict[str, Any], token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = await client.post(path, json=body, headers=headers)
    assert response.status_code == 200, (path, response.status_code, response.text)
    return response.json()


@pytest.fixture(scope="module")
async def caller(admin_url: str, nats_url: str) -> AsyncIterator[Caller]:
    document = build_document(title="Tessera", version="test")
    async with running_mesh(admin_url, nats_url) as mesh:
        addresses = {domain_of(service): address for service, address in mesh.addresses.items()}
        app = create_app(GatewaySettings(addresses=addresses), extra_http=routes(document))
        async with _serve(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            email = f"fuzz.{uuid.uuid4().hex[:10]}@example.com"
            await _post(client, "/v1/users:signUp", {"email": email, "password": PASSWORD, "displayName": "Fuzz"})
            signed_in = await _post(client, "/v1/sessions:signIn", {"email": email, "password": PASSWORD})
            user_token = signed_in["tokens"]["accessToken"]
            created = await _post(client, "/v1/workspaces", {"displayName": "Fuzzed"}, user_token)
            workspace = created["workspace"]["name"]
            issued = await _post(client, "/v1/sessions:issueWorkspaceToken", {"workspace": workspace}, user_token)
            token = issued["tokens"]["accessToken"]
            # A real project and item, so the workflow operations are fuzzed past the lookup (not only 404s).
            project = (await _post(client, f"/v1/{workspace}/projects", {"displayName": "Fuzzed"}, token))["project"]
            item = (await _post(client, f"/v1/{project['name']}/items", {"title": "Fuzzed item"}, token))["item"]
            yield Caller(
                url,
                token,
                workspace.removeprefix("workspaces/"),
                project["name"].rsplit("/", 1)[1],
                item["name"].rsplit("/", 1)[1],
            )


def _method_name(operation: Any) -> str:
    """`TenancyService_DeleteWorkspace` → `DeleteWorkspace`."""
    return str(operation.definition.raw["operationId"]).split("_")[1]


def _fuzz(caller: Caller) -> tuple[int, list[str]]:
    """Fuzz every operation of the served document; (cases run, failure descriptions)."""
    schema = schemathesis.openapi.from_url(f"{caller.url}/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # every operation of the document is usable
        operations.append(result.ok())
    operations.sort(key=lambda op: DESTRUCTIVE.index(name) if (name := _method_name(op)) in DESTRUCTIVE else -1)
    headers = {"Authorization": f"Bearer {caller.token}"}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    failures: list[str] = []
    cases = 0
    for operation in operations:
        known = {"workspace": caller.workspace_id, "project": caller.project_id, "item": caller.item_id}
        pinned = {name: value for name, value in known.items() if f"{{{name}}}" in operation.path} or None

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            print_blob=False,
        )
        @given(case=operation.as_strategy(path_parameters=pinned))
        def run(case: Any) -> None:
            nonlocal cases
            cases += 1
            response = case.call(base_url=caller.url, headers=headers, timeout=30)
            case.validate_response(response, checks=checks)

        try:
            run()
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup is a BaseExceptionGroup
            failures.append(f"{operation.label}: {type(exc).__name__}: {exc}"[:2000])
    return cases, failures


async def test_fuzzing_every_operation_finds_no_server_error_and_no_schema_violation(caller: Caller) -> None:
    cases, failures = await asyncio.wait_for(asyncio.to_thread(_fuzz, caller), timeout=150)
    assert not failures, "\n\n".join(failures)
    assert cases >= 30  # at least one case per operation really ran
