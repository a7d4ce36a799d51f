"""Generated authorization regression suite (the tenant isolation gate, S03).

Nothing here is written per RPC: every method of every service in `gen/` is found through its
descriptor, its request is filled from its `google.api.http` path template, and its expected
outcome is derived from the `(tessera.common.v1.auth)` rule declared in the contract and the role
matrix in `services.kit.authz`. For every RPC, every role and each of {own workspace, foreign workspace,
no token, expired token, token of a revoked session, forged signature} it asserts the status, and
that nothing of the foreign workspace (its name marker, its owner's email) appears in any response
or error. A new RPC is covered the moment it is added to a contract.

Tokens are real: users sign up and sign in through the identity service, workspace tokens come from
IssueWorkspaceToken (which asks tenancy for the live membership); the expired token is signed with
the identity service's own active key; the forged one with another key under the same `kid`.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import protovalidate
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.api import annotations_pb2
from google.protobuf import descriptor, message_factory

import tessera
from services.kit.authz import ROLES, role_grants
from services.kit.tokens import TokenSigner
from tessera.common.v1 import auth_pb2
from tessera.identity.v1 import identity_service_pb2 as ids
from tessera.tenancy.v1 import tenancy_pb2
from tessera.tenancy.v1 import tenancy_service_pb2 as ts
from tests.e2e.stack import Mesh, running_mesh
from tests.helpers import eventually

PASSWORD = "matrix staple horse battery 42"  # test password
AUTH_FAILURES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
# "own" last: an admitted call may change things for this actor (leave the workspace, sign out).
SCENARIOS = ("foreign", "no_token", "expired", "revoked_session", "forged", "own")
_TEMPLATE_VARIABLE = re.compile(r"\{([a-z_.]+)(?:=([^}]+))?\}")


def all_methods() -> Iterator[descriptor.MethodDescriptor]:
    """Every RPC of every service whose generated module lives under gen/tessera."""
    for module_info in pkgutil.walk_packages(tessera.__path__, "tessera."):
        if module_info.name.endswith("_service_pb2"):
            module = importlib.import_module(module_info.name)
            for service in module.DESCRIPTOR.services_by_name.values():
                yield from service.methods


METHODS = sorted(all_methods(), key=lambda m: m.full_name)


def auth_rule(method: descriptor.MethodDescriptor) -> auth_pb2.AuthRule:
    return method.GetOptions().Extensions[auth_pb2.auth]


def path_templates(method: descriptor.MethodDescriptor) -> list[str]:
    rule = method.GetOptions().Extensions[annotations_pb2.http]
    paths = []
    for binding in [rule, *rule.additional_bindings]:
        pattern = binding.WhichOneof("pattern")
        if pattern and pattern != "custom":
            paths.append(getattr(binding, pattern))
    return paths


def build_request(method: descriptor.MethodDescriptor, workspace_id: str) -> Any:
    """The method's request with every path variable pointing into `workspace_id` (children: fresh ids)."""
    request = message_factory.GetMessageClass(method.input_type)()
    for template in path_templates(method):
        for field_path, pattern in _TEMPLATE_VARIABLE.findall(template):
            if not pattern or not pattern.startswith("workspaces/"):
                continue
            segments = pattern.split("/")
            values = []
            wildcard = 0
            for segment in segments:
                if segment == "*":
                    values.append(workspace_id if wildcard == 0 else str(uuid.uuid4()))
                    wildcard += 1
                else:
                    values.append(segment)
            target: Any = request
            *parents, leaf = field_path.split(".")
            for parent in parents:
                target = getattr(target, parent)
            setattr(target, leaf, "/".join(values))
    return request


@dataclass
class Actor:
    """A user with a user-level token and a workspace token per workspace."""

    email: str
    user_id: str
    user_token: str
    workspace_tokens: dict[str, str] = field(default_factory=dict)


@dataclass
class World:
    mesh: Mesh
    channels: dict[str, grpc.aio.Channel]
    actors: dict[str, Actor]  # by role
    foreign_owner: Actor
    foreign_workspace: str
    foreign_marker: str
    expired_token: str
    forged_token: str
    revoked_token: str
    admin: asyncpg.Connection

    def call(self, method: descriptor.MethodDescriptor) -> Any:
        channel = self.channels[method.containing_service.full_name]
        response_cls = message_factory.GetMessageClass(method.output_type)
        return channel.unary_unary(
            f"/{method.containing_service.full_name}/{method.name}",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


async def sign_up_and_in(world_channels: dict[str, grpc.aio.Channel], label: str) -> Actor:
    identity = world_channels["tessera.identity.v1.IdentityService"]
    sign_up = identity.unary_unary(
        "/tessera.identity.v1.IdentityService/SignUp",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=ids.SignUpResponse.FromString,
    )
    sign_in = identity.unary_unary(
        "/tessera.identity.v1.IdentityService/SignIn",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=ids.SignInResponse.FromString,
    )
    email = f"{label}.{uuid.uuid4().hex[:10]}@example.com"
    created = await sign_up(ids.SignUpRequest(email=email, password=PASSWORD, display_name=label))
    signed_in = await sign_in(ids.SignInRequest(email=email, password=PASSWORD))
    return Actor(email, created.user.name.removeprefix("users/"), signed_in.tokens.access_token)


async def workspace_token(channels: dict[str, grpc.aio.Channel], actor: Actor, workspace_id: str) -> str:
    issue = channels["tessera.identity.v1.IdentityService"].unary_unary(
        "/tessera.identity.v1.IdentityService/IssueWorkspaceToken",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=ids.IssueWorkspaceTokenResponse.FromString,
    )
    response = await issue(
        ids.IssueWorkspaceTokenRequest(workspace=f"workspaces/{workspace_id}"), metadata=bearer(actor.user_token)
    )
    return str(response.tokens.access_token)


async def create_workspace(channels: dict[str, grpc.aio.Channel], owner: Actor, display_name: str) -> str:
    create = channels["tessera.tenancy.v1.TenancyService"].unary_unary(
        "/tessera.tenancy.v1.TenancyService/CreateWorkspace",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=ts.CreateWorkspaceResponse.FromString,
    )
    response = await create(
        ts.CreateWorkspaceRequest(workspace=tenancy_pb2.Workspace(display_name=display_name)),
        metadata=bearer(owner.user_token),
    )
    return str(response.workspace.name.removeprefix("workspaces/"))


async def workspace_with_every_role(world: World, label: str) -> str:
    """A fresh workspace owned by the owner actor, with one member of every other role."""
    workspace_id = await create_workspace(world.channels, world.actors["owner"], label)
    for role, actor in world.actors.items():
        if role != "owner":
            await world.admin.execute(
                "INSERT INTO tenancy.members (tenant_id, user_id, role) VALUES ($1, $2, $3)",
                uuid.UUID(workspace_id),
                uuid.UUID(actor.user_id),
                role,
            )
    for actor in world.actors.values():
        actor.workspace_tokens[workspace_id] = await workspace_token(world.channels, actor, workspace_id)
    return workspace_id


@pytest.fixture(scope="module")
async def world(admin_url: str, nats_url: str) -> AsyncIterator[World]:
    admin = await asyncpg.connect(admin_url)
    async with running_mesh(admin_url, nats_url) as mesh:
        channels = {name: grpc.aio.insecure_channel(address) for name, address in mesh.addresses.items()}
        try:
            actors = {role: await sign_up_and_in(channels, role) for role in ROLES}
            foreign_owner = await sign_up_and_in(channels, "foreigner")
            marker = f"FOREIGN-{uuid.uuid4().hex}"
            foreign_workspace = await create_workspace(channels, foreign_owner, marker)

            # Expired: a real token signed by identity's active key, with exp in the past.
            kid, raw_private = await admin.fetchrow(
                "SELECT kid, private_key FROM identity.signing_keys ORDER BY create_time DESC LIMIT 1"
            )
            signer = TokenSigner(Ed25519PrivateKey.from_private_bytes(bytes(raw_private)), kid=kid)
            owner = actors["owner"]
            expired, _ = signer.sign(
                subject=owner.user_id,
                session_id=str(uuid.uuid4()),
                workspace_id=foreign_workspace,
                role="owner",
                ttl=timedelta(minutes=5),
                now=datetime.now(UTC) - timedelta(minutes=10),
            )
            # Forged: same kid, same claims, another key.
            forged, _ = TokenSigner(Ed25519PrivateKey.generate(), kid=kid).sign(
                subject=owner.user_id, session_id=str(uuid.uuid4()), workspace_id=foreign_workspace, role="owner"
            )
            world = World(mesh, channels, actors, foreign_owner, foreign_workspace, marker, expired, forged, "", admin)

            # Revoked: a second session of the owner, signed out; wait until every service rejects it.
            shared = await workspace_with_every_role(world, "shared")
            second = await sign_up_second_session(channels, owner)
            revoked = await workspace_token(channels, second, shared)
            sign_out = channels["tessera.identity.v1.IdentityService"].unary_unary(
                "/tessera.identity.v1.IdentityService/SignOut",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=ids.SignOutResponse.FromString,
            )
            await sign_out(ids.SignOutRequest(scope=ids.SIGN_OUT_SCOPE_CURRENT), metadata=bearer(second.user_token))
            world.revoked_token = revoked
            get_workspace = world.call(ts.DESCRIPTOR.services_by_name["TenancyService"].methods_by_name["GetWorkspace"])

            async def rejected() -> bool:
                try:
                    await get_workspace(ts.GetWorkspaceRequest(name=f"workspaces/{shared}"), metadata=bearer(revoked))
                except grpc.aio.AioRpcError as error:
                    return error.code() == grpc.StatusCode.UNAUTHENTICATED
                return False

            await eventually(rejected, timeout=10, what="the revoked session's token to be rejected by tenancy")
            yield world
        finally:
            for channel in channels.values():
                await channel.close()
            await admin.close()


async def sign_up_second_session(channels: dict[str, grpc.aio.Channel], actor: Actor) -> Actor:
    sign_in = channels["tessera.identity.v1.IdentityService"].unary_unary(
        "/tessera.identity.v1.IdentityService/SignIn",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=ids.SignInResponse.FromString,
    )
    signed_in = await sign_in(ids.SignInRequest(email=actor.email, password=PASSWORD))
    return Actor(actor.email, actor.user_id, signed_in.tokens.access_token)


def expected(rule: auth_pb2.AuthRule, role: str, scenario: str, *, invalid: bool) -> set[grpc.StatusCode] | None:
    """The codes allowed for a call; None means "anything but an authentication/authorization failure".

    `invalid`: the generated request breaks the contract's validation rules, so a caller who passes
    authentication and authorization may get INVALID_ARGUMENT before the resource is looked up.
    """
    if rule.level == auth_pb2.AUTH_LEVEL_PUBLIC:
        return None
    if scenario in ("no_token", "expired", "revoked_session", "forged"):
        return {grpc.StatusCode.UNAUTHENTICATED}
    if rule.level == auth_pb2.AUTH_LEVEL_USER:
        return None
    if not role_grants(role, rule.permission):
        return {grpc.StatusCode.PERMISSION_DENIED}
    if scenario == "foreign":
        return {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT} if invalid else {grpc.StatusCode.NOT_FOUND}
    return None


async def outcome(world: World, method: descriptor.MethodDescriptor, request: Any, token: str | None) -> Any:
    """(code, text of the response or error) of one call."""
    try:
        response = await world.call(method)(request, metadata=bearer(token), timeout=10)
    except grpc.aio.AioRpcError as error:
        trailers = "".join(f"{k}={v!r}" for k, v in (error.trailing_metadata() or ()))
        return error.code(), f"{error.details()} {trailers}"
    return grpc.StatusCode.OK, str(response)


# Least privileged first: a role's own-workspace call may change the workspace (leave it, delete
# it), so the owner, who can do everything, goes last on each method's fresh workspace.
ROLE_ORDER = sorted(ROLES, key=lambda role: (role == "owner", role == "admin", role))


@pytest.mark.gate("S03")
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.full_name)
async def test_every_rpc_every_role_every_token(world: World, method: descriptor.MethodDescriptor) -> None:
    rule = auth_rule(method)
    assert rule.level != auth_pb2.AUTH_LEVEL_UNSPECIFIED, f"{method.full_name} declares no auth rule"
    assert method.containing_service.full_name in world.channels, (
        f"{method.containing_service.full_name} is not running in tests/e2e/stack.py: add it to SERVICES"
    )
    # Fresh sessions and a fresh workspace per method: an admitted call may sign out or leave.
    for role, actor in world.actors.items():
        world.actors[role] = await sign_up_second_session(world.channels, actor)
    own = await workspace_with_every_role(world, f"own {method.name}")
    failures: list[str] = []
    for role in ROLE_ORDER:
        actor = world.actors[role]
        for scenario in SCENARIOS:
            target = world.foreign_workspace if scenario == "foreign" else own
            if scenario not in ("own", "foreign"):
                token = {
                    "no_token": None,
                    "expired": world.expired_token,
                    "revoked_session": world.revoked_token,
                    "forged": world.forged_token,
                }[scenario]
            elif rule.level == auth_pb2.AUTH_LEVEL_WORKSPACE:
                token = actor.workspace_tokens[own]
            else:  # a session of its own: an admitted user-level call may end it (SignOut)
                token = (await sign_up_second_session(world.channels, actor)).user_token
            request = build_request(method, target)
            code, text = await outcome(world, method, request, token)
            allowed = expected(rule, role, scenario, invalid=bool(protovalidate.collect_violations(request)))
            if allowed is None:
                if code in AUTH_FAILURES:
                    failures.append(f"{role}/{scenario}: got {code.name} ({text[:160]}), expected the call admitted")
            elif code not in allowed:
                failures.append(
                    f"{role}/{scenario}: got {code.name} ({text[:160]}), expected {sorted(c.name for c in allowed)}"
                )
            leaked = [v for v in (world.foreign_marker, world.foreign_owner.email) if v in text]
            if leaked:
                failures.append(f"{role}/{scenario}: response carries foreign data {leaked}: {text[:200]}")
    assert not failures, f"{method.full_name}:\n" + "\n".join(failures)


@pytest.mark.gate("S03")
async def test_the_suite_covers_every_rpc_of_every_running_service(world: World) -> None:
    covered = {m.containing_service.full_name for m in METHODS}
    assert covered == set(world.channels), "a service in gen/ is not started by tests/e2e/stack.py (or vice versa)"
    assert len(METHODS) >= 30
