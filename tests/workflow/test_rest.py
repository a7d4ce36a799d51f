"""Workflow end to end: REST through the gateway over the whole mesh, with real auth and the real events.

The owner's membership reaches the workflow service's `members` read model the way it does in
production: tenancy emits MembershipChangedEvent when the workspace is created, its relay publishes it,
and the workflow `workflow-members` consumer stores it. Until then the owner cannot be an assignee.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.e2e.stack import Mesh, running_mesh
from tests.gateway.conftest import create_workspace, expect, serve, settings_for, sign_up_and_in
from tests.helpers import eventually

pytestmark = pytest.mark.gate("S04")


@pytest.fixture(scope="module")
async def mesh(admin_url: str, nats_url: str) -> AsyncIterator[Mesh]:
    async with running_mesh(admin_url, nats_url) as running:
        yield running


@pytest.fixture(scope="module")
async def gateway(mesh: Mesh) -> AsyncIterator[str]:
    from gateway.app import create_app

    async with serve(create_app(settings_for(mesh))) as url:
        yield url


@pytest.fixture
async def client(gateway: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway, timeout=20) as http:
        yield http


async def test_create_get_and_transition_an_item_over_rest(client: httpx.AsyncClient) -> None:
    owner = await sign_up_and_in(client, "rest-owner")
    workspace = await create_workspace(client, owner, "REST board")
    workspace_id = workspace["name"].removeprefix("workspaces/")
    auth = owner.bearer(workspace_id)

    project = expect(
        await client.post(f"/v1/{workspace['name']}/projects", json={"displayName": "Launch"}, headers=auth), 200
    )["project"]
    assert [state["id"] for state in project["workflow"]["states"]][:3] == ["backlog", "todo", "in_progress"]

    body = {"title": "Write the launch post", "priority": "PRIORITY_HIGH", "assignee": f"users/{owner.user_id}"}

    async def created() -> dict[str, Any] | None:
        # The owner is assignable once the members consumer has stored the membership event.
        response = await client.post(f"/v1/{project['name']}/items", json=body, headers=auth)
        if response.status_code == 400 and "not a member" in response.text:
            return None
        return dict(expect(response, 200)["item"])

    item = await eventually(created, what="the owner's membership to reach the workflow read model")
    assert (item["status"], item["priority"], item["assignee"]) == ("backlog", "PRIORITY_HIGH", body["assignee"])

    fetched = expect(await client.get(f"/v1/{item['name']}", headers=auth), 200)["item"]
    assert fetched == item

    illegal = await client.post(f"/v1/{item['name']}:transition", json={"status": "done"}, headers=auth)
    error = expect(illegal, 400)
    [info] = [d for d in error["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
    assert info["reason"] == "TRANSITION_NOT_ALLOWED"
    assert info["metadata"]["allowed_next_states"] == "todo,in_progress,cancelled"

    moved = expect(
        await client.post(
            f"/v1/{item['name']}:transition", json={"status": "in_progress", "etag": item["etag"]}, headers=auth
        ),
        200,
    )["item"]
    assert (moved["status"], moved["etag"]) == ("in_progress", '"v2"')

    log = expect(await client.get(f"/v1/{item['name']}/activities", headers=auth), 200)
    assert [entry["kind"] for entry in log["activities"]] == ["ACTIVITY_KIND_CREATED", "ACTIVITY_KIND_TRANSITIONED"]


async def test_another_workspace_is_not_found_over_rest(client: httpx.AsyncClient) -> None:
    owner = await sign_up_and_in(client, "rest-a")
    stranger = await sign_up_and_in(client, "rest-b")
    workspace = await create_workspace(client, owner, "Mine")
    theirs = await create_workspace(client, stranger, "Theirs")
    project = expect(
        await client.post(
            f"/v1/{workspace['name']}/projects",
            json={"displayName": "P"},
            headers=owner.bearer(workspace["name"].removeprefix("workspaces/")),
        ),
        200,
    )["project"]
    response = await client.get(
        f"/v1/{project['name']}", headers=stranger.bearer(theirs["name"].removeprefix("workspaces/"))
    )
    expect(response, 404)
