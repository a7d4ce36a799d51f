"""TenancyService over real gRPC: the kit runtime with enforced auth, signed tokens, PostgreSQL and NATS.

Tokens come from `tests/auth_helpers.TestKeys` (the runtime verifies with `keys.verifier`); a workspace
token is issued the way the identity service issues it: LookupMembership with the user-level token,
then a token for that workspace and the role found. Invitation tokens are read from the
InvitationCreatedEvent on the JetStream stream, as the mail sender receives them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from migrations import runner
from services.kit.authz import ADMIN, BILLING_MANAGER, MEMBER, OWNER, ROLES, VIEWER, WORKSPACE, auth_rule_for
from services.kit.broker import Broker
from services.kit.events import stream_name
from services.kit.ids import uuid7
from services.kit.server import ServiceRuntime
from services.kit.settings import load_settings
from services.tenancy.main import build
from services.tenancy.settings import TenancySettings
from tessera.common.v1.event_pb2 import EventEnvelope
from tessera.tenancy.v1 import tenancy_events_pb2, tenancy_pb2, tenancy_service_pb2, tenancy_service_pb2_grpc
from tessera.tenancy.v1 import tenancy_service_pb2 as pb
from tests.auth_helpers import TestKeys, bearer
from tests.helpers import eventually
from tests.tenancy.conftest import TeamFactory

pytestmark = pytest.mark.gate("S03")

Metadata = tuple[tuple[str, str], ...]
Stub = tenancy_service_pb2_grpc.TenancyServiceStub
SERVICE = tenancy_service_pb2.DESCRIPTOR.services_by_name["TenancyService"]
WORKSPACE_METHODS = sorted(m.name for m in SERVICE.methods if (rule := auth_rule_for(m)) and rule.level == WORKSPACE)


@pytest.fixture(scope="module")
def keys() -> TestKeys:
    return TestKeys()


@pytest.fixture(scope="module")
async def runtime(admin_url: str, nats_url: str, keys: TestKeys) -> AsyncIterator[ServiceRuntime]:
    settings = load_settings(
        TenancySettings,
        database_url=runner.service_url(admin_url, "tenancy"),
        nats_url=nats_url,
        auth="enforced",
        environment="test",
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_port=None,
        outbox_poll_seconds=0.2,
        shutdown_grace_seconds=2.0,
    )
    service_runtime = await build(settings, verifier=keys.verifier)
    await service_runtime.start()
    try:
        yield service_runtime
    finally:
        await service_runtime.stop()


@pytest.fixture(scope="module")
async def stub(runtime: ServiceRuntime) -> AsyncIterator[Stub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{runtime.port}")
    try:
        yield tenancy_service_pb2_grpc.TenancyServiceStub(channel)
    finally:
        await channel.close()


@pytest.fixture(scope="module")
async def broker(nats_url: str) -> AsyncIterator[Broker]:
    reader = Broker(nats_url, name="tenancy-test-reader")
    await reader.connect()
    try:
        yield reader
    finally:
        await reader.close()


class Tap:
    """An ephemeral JetStream consumer on one tenancy subject, opened before the action it observes."""

    def __init__(self, subscription: JetStreamContext.PullSubscription) -> None:
        self.subscription = subscription

    @classmethod
    async def open(cls, broker: Broker, event: str) -> Tap:
        subscription = await broker.js.pull_subscribe(
            f"tessera.tenancy.{event}",
            stream=stream_name("tenancy"),
            config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, inactive_threshold=30.0),
        )
        return cls(subscription)

    async def take(
        self, match: Callable[[EventEnvelope], bool], *, count: int = 1, timeout: float = 15.0, settle: float = 0.0
    ) -> list[EventEnvelope]:
        """The first `count` matching envelopes; with `settle`, also any more that arrive within it."""
        found: list[EventEnvelope] = []
        deadline = time.monotonic() + timeout
        quiet_until: float | None = None
        while True:
            now = time.monotonic()
            if len(found) >= count:
                quiet_until = quiet_until or now + settle
                if now >= quiet_until:
                    return found
            elif now >= deadline:
                pytest.fail(f"saw {len(found)} of {count} events before the timeout")
            try:
                messages = await self.subscription.fetch(50, timeout=0.2)
            except TimeoutError:
                continue
            for message in messages:
                await message.ack()
                envelope = EventEnvelope.FromString(message.data)
                if match(envelope):
                    found.append(envelope)

    async def close(self) -> None:
        await self.subscription.unsubscribe()


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status details"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo")


async def call(stub: Stub, method: str, request: Message, metadata: Metadata) -> Any:
    """The response, or the AioRpcError."""
    try:
        return await getattr(stub, method)(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error


def outcome(result: Any) -> tuple[str, str]:
    """(status code name, ErrorInfo reason) of a call result; ("OK", "") for a response."""
    if isinstance(result, grpc.aio.AioRpcError):
        return result.code().name, error_info(result).reason
    return "OK", ""


def user(keys: TestKeys, user_id: uuid.UUID | str) -> Metadata:
    return bearer(keys.user_token(str(user_id)))


async def in_workspace(stub: Stub, keys: TestKeys, user_id: uuid.UUID | str, workspace: str) -> Metadata:
    """A workspace token as identity issues it: the role comes from LookupMembership."""
    member = (
        await stub.LookupMembership(pb.LookupMembershipRequest(workspace=workspace), metadata=user(keys, user_id))
    ).member
    return bearer(keys.workspace_token(str(user_id), workspace.removeprefix("workspaces/"), member.role))


async def create(
    stub: Stub, keys: TestKeys, owner: uuid.UUID, display_name: str = "Acme", **fields: str
) -> tenancy_pb2.Workspace:
    response = await stub.CreateWorkspace(
        pb.CreateWorkspaceRequest(workspace=tenancy_pb2.Workspace(display_name=display_name), **fields),
        metadata=user(keys, owner),
    )
    return response.workspace


def about(workspace: str) -> Callable[[EventEnvelope], bool]:
    return lambda envelope: envelope.subject.startswith(workspace)


# --- workspaces ------------------------------------------------------------------------------------------


async def test_create_get_update_and_list(stub: Stub, keys: TestKeys) -> None:
    owner = uuid7()
    created = await create(stub, keys, owner, "Acme")
    assert (created.display_name, created.creator) == ("Acme", str(owner))
    assert created.etag

    owner_token = await in_workspace(stub, keys, owner, created.name)

    async def active() -> tenancy_pb2.Workspace | None:
        # Provisioning changes the workspace (and its etag) asynchronously: read it once it is done.
        found = (await stub.GetWorkspace(pb.GetWorkspaceRequest(name=created.name), metadata=owner_token)).workspace
        return found if found.state == tenancy_pb2.WORKSPACE_STATE_ACTIVE else None

    fetched = await eventually(active, what="the workspace to be provisioned")
    assert (fetched.name, fetched.display_name) == (created.name, "Acme")
    assert fetched.etag != created.etag

    updated = (
        await stub.UpdateWorkspace(
            pb.UpdateWorkspaceRequest(
                workspace=tenancy_pb2.Workspace(name=created.name, display_name="Acme 2", etag=fetched.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=owner_token,
        )
    ).workspace
    assert updated.display_name == "Acme 2"
    stale = await call(
        stub,
        "UpdateWorkspace",
        pb.UpdateWorkspaceRequest(
            workspace=tenancy_pb2.Workspace(name=created.name, display_name="x", etag=fetched.etag)
        ),
        owner_token,
    )
    assert outcome(stale) == ("ABORTED", "ETAG_MISMATCH")

    second = await create(stub, keys, owner, "Beta")
    first_page = await stub.ListWorkspaces(pb.ListWorkspacesRequest(page_size=1), metadata=user(keys, owner))
    assert [w.name for w in first_page.workspaces] == [second.name]
    last_page = await stub.ListWorkspaces(
        pb.ListWorkspacesRequest(page_size=1, page_token=first_page.next_page_token), metadata=user(keys, owner)
    )
    assert [w.name for w in last_page.workspaces] == [created.name]
    assert last_page.next_page_token == ""


async def test_idempotent_create_still_works(stub: Stub, keys: TestKeys) -> None:
    owner = uuid7()
    request_id = str(uuid.uuid4())
    first = await create(stub, keys, owner, "Acme", request_id=request_id)
    again = await create(stub, keys, owner, "Acme", request_id=request_id)
    assert again.name == first.name

    reused = await call(
        stub,
        "CreateWorkspace",
        pb.CreateWorkspaceRequest(workspace=tenancy_pb2.Workspace(display_name="Other"), request_id=request_id),
        user(keys, owner),
    )
    assert outcome(reused) == ("ALREADY_EXISTS", "REQUEST_ID_REUSED")
    listed = await stub.ListWorkspaces(pb.ListWorkspacesRequest(), metadata=user(keys, owner))
    assert [w.name for w in listed.workspaces] == [first.name]


async def test_soft_delete_and_restore_window(stub: Stub, keys: TestKeys) -> None:
    owner = uuid7()
    workspace = await create(stub, keys, owner)
    token = await in_workspace(stub, keys, owner, workspace.name)

    deleted = (await stub.DeleteWorkspace(pb.DeleteWorkspaceRequest(name=workspace.name), metadata=token)).workspace
    assert deleted.purge_time.seconds - deleted.delete_time.seconds == 30 * 24 * 3600

    # Deleting revokes the workspace tokens issued until then, in every service (WorkspaceDeletedEvent).
    async def revoked() -> bool:
        old = await call(stub, "GetWorkspace", pb.GetWorkspaceRequest(name=workspace.name), token)
        return outcome(old) == ("UNAUTHENTICATED", "TOKEN_REVOKED")

    await eventually(revoked, timeout=10, what="the deleting token to be revoked")
    # The owner's membership stays usable inside the restore window, so identity can issue a fresh
    # workspace token for UndeleteWorkspace; the deleted workspace itself is NOT_FOUND.
    fresh = await in_workspace(stub, keys, owner, workspace.name)
    gone = await call(stub, "GetWorkspace", pb.GetWorkspaceRequest(name=workspace.name), fresh)
    assert outcome(gone) == ("NOT_FOUND", "RESOURCE_NOT_FOUND")
    default = await stub.ListWorkspaces(pb.ListWorkspacesRequest(), metadata=user(keys, owner))
    with_deleted = await stub.ListWorkspaces(pb.ListWorkspacesRequest(show_deleted=True), metadata=user(keys, owner))
    assert list(default.workspaces) == []
    assert [(w.name, w.HasField("delete_time")) for w in with_deleted.workspaces] == [(workspace.name, True)]

    restored = (
        await stub.UndeleteWorkspace(pb.UndeleteWorkspaceRequest(name=workspace.name), metadata=fresh)
    ).workspace
    assert not restored.HasField("delete_time")
    again = await call(stub, "UndeleteWorkspace", pb.UndeleteWorkspaceRequest(name=workspace.name), fresh)
    assert outcome(again) == ("FAILED_PRECONDITION", "WORKSPACE_NOT_DELETED")
    assert (await stub.GetWorkspace(pb.GetWorkspaceRequest(name=workspace.name), metadata=fresh)).workspace.name


# --- invitations and memberships ---------------------------------------------------------------------------


async def test_invitation_end_to_end_with_the_token_from_the_event_stream(
    stub: Stub, keys: TestKeys, broker: Broker
) -> None:
    owner, invitee = uuid7(), uuid7()
    workspace = await create(stub, keys, owner, "Invitational")
    owner_token = await in_workspace(stub, keys, owner, workspace.name)
    invitations = await Tap.open(broker, "invitation_created")
    try:
        response = await stub.CreateInvitation(
            pb.CreateInvitationRequest(
                parent=workspace.name, invitation=tenancy_pb2.Invitation(email="Invitee@Example.com", role=MEMBER)
            ),
            metadata=owner_token,
        )
        [envelope] = await invitations.take(lambda e: e.subject == response.invitation.name)
    finally:
        await invitations.close()
    event = tenancy_events_pb2.InvitationCreatedEvent()
    assert envelope.payload.Unpack(event)
    assert (event.invitation.email, event.workspace_display_name) == ("invitee@example.com", "Invitational")
    assert event.token
    assert event.token not in response.SerializeToString().decode(errors="ignore")

    duplicate = await call(
        stub,
        "CreateInvitation",
        pb.CreateInvitationRequest(
            parent=workspace.name, invitation=tenancy_pb2.Invitation(email="invitee@example.com", role=VIEWER)
        ),
        owner_token,
    )
    assert outcome(duplicate) == ("ALREADY_EXISTS", "INVITATION_PENDING")

    accepted = await stub.AcceptInvitation(pb.AcceptInvitationRequest(token=event.token), metadata=user(keys, invitee))
    assert accepted.member.name == f"{workspace.name}/members/{invitee}"
    assert accepted.member.role == MEMBER
    reused = await call(stub, "AcceptInvitation", pb.AcceptInvitationRequest(token=event.token), user(keys, uuid7()))
    assert outcome(reused) == ("INVALID_ARGUMENT", "INVITATION_USED")
    again = await call(stub, "AcceptInvitation", pb.AcceptInvitationRequest(token=event.token), user(keys, invitee))
    assert outcome(again)[0] == "INVALID_ARGUMENT"

    member_token = await in_workspace(stub, keys, invitee, workspace.name)
    members = await stub.ListMembers(pb.ListMembersRequest(parent=workspace.name), metadata=member_token)
    assert [(m.user, m.role) for m in members.members] == [(f"users/{owner}", OWNER), (f"users/{invitee}", MEMBER)]
    listed = await stub.ListInvitations(pb.ListInvitationsRequest(parent=workspace.name), metadata=owner_token)
    assert [i.state for i in listed.invitations] == [tenancy_pb2.INVITATION_STATE_ACCEPTED]
    assert (await stub.ListWorkspaces(pb.ListWorkspacesRequest(), metadata=user(keys, invitee))).workspaces[
        0
    ].name == workspace.name


@pytest.mark.gate("S08")
async def test_every_membership_change_emits_exactly_one_event(stub: Stub, keys: TestKeys, broker: Broker) -> None:
    owner, second = uuid7(), uuid7()
    changes = await Tap.open(broker, "membership_changed")
    invitations = await Tap.open(broker, "invitation_created")
    try:
        workspace = await create(stub, keys, owner)
        owner_token = await in_workspace(stub, keys, owner, workspace.name)
        created = await stub.CreateInvitation(
            pb.CreateInvitationRequest(
                parent=workspace.name, invitation=tenancy_pb2.Invitation(email="second@example.com", role=VIEWER)
            ),
            metadata=owner_token,
        )
        [invitation] = await invitations.take(lambda e: e.subject == created.invitation.name)
        event = tenancy_events_pb2.InvitationCreatedEvent()
        assert invitation.payload.Unpack(event)
        await stub.AcceptInvitation(pb.AcceptInvitationRequest(token=event.token), metadata=user(keys, second))
        member = f"{workspace.name}/members/{second}"
        for role in (ADMIN, ADMIN):  # the second update changes nothing and emits nothing
            await stub.UpdateMember(
                pb.UpdateMemberRequest(member=tenancy_pb2.Member(name=member, role=role)), metadata=owner_token
            )
        await stub.TransferOwnership(
            pb.TransferOwnershipRequest(name=workspace.name, new_owner=member), metadata=owner_token
        )
        new_owner_token = await in_workspace(stub, keys, second, workspace.name)
        await stub.RemoveMember(
            pb.RemoveMemberRequest(name=f"{workspace.name}/members/{owner}"), metadata=new_owner_token
        )

        seen = await changes.take(about(workspace.name), count=6, settle=0.5)
    finally:
        await changes.close()
        await invitations.close()

    observed = []
    for envelope in seen:
        change = tenancy_events_pb2.MembershipChangedEvent()
        assert envelope.payload.Unpack(change)
        assert envelope.tenant_id == workspace.name.removeprefix("workspaces/")
        observed.append((change.member.rsplit("/", 1)[1], change.previous_role, change.role))
    assert observed == [
        (str(owner), "", OWNER),
        (str(second), "", VIEWER),
        (str(second), VIEWER, ADMIN),
        (str(second), ADMIN, OWNER),
        (str(owner), OWNER, ADMIN),
        (str(owner), ADMIN, ""),
    ]
    assert len({envelope.id for envelope in seen}) == 6


async def test_a_role_change_revokes_the_members_older_workspace_tokens(
    stub: Stub, keys: TestKeys, make_team: TeamFactory
) -> None:
    team = await make_team(ADMIN)
    admin = team.user(ADMIN)
    workspace = team.workspace.name
    admin_token = await in_workspace(stub, keys, admin.subject, workspace)
    owner_token = await in_workspace(stub, keys, team.owner.subject, workspace)
    assert outcome(await call(stub, "ListAuditEvents", pb.ListAuditEventsRequest(parent=workspace), admin_token)) == (
        "OK",
        "",
    )

    await stub.UpdateMember(
        pb.UpdateMemberRequest(member=tenancy_pb2.Member(name=f"{workspace}/members/{admin.subject}", role=VIEWER)),
        metadata=owner_token,
    )

    async def old_token_refused() -> bool:
        result = await call(stub, "ListMembers", pb.ListMembersRequest(parent=workspace), admin_token)
        return outcome(result) == ("UNAUTHENTICATED", "TOKEN_REVOKED")

    await eventually(old_token_refused, timeout=10.0, what="the admin token to be revoked")
    viewer_token = await in_workspace(stub, keys, admin.subject, workspace)
    denied = await call(stub, "ListAuditEvents", pb.ListAuditEventsRequest(parent=workspace), viewer_token)
    assert outcome(denied) == ("PERMISSION_DENIED", "MISSING_PERMISSION")


async def test_audit_events_carry_the_request_id(stub: Stub, keys: TestKeys) -> None:
    owner = uuid7()
    workspace = await create(stub, keys, owner)
    token = await in_workspace(stub, keys, owner, workspace.name)
    request_id = f"req-{uuid.uuid4().hex}"
    await stub.UpdateWorkspace(
        pb.UpdateWorkspaceRequest(workspace=tenancy_pb2.Workspace(name=workspace.name, display_name="Renamed")),
        metadata=(*token, ("x-request-id", request_id)),
    )

    events = (await stub.ListAuditEvents(pb.ListAuditEventsRequest(parent=workspace.name), metadata=token)).audit_events
    assert [(e.action, e.actor, e.request_id) for e in events[:1]] == [
        ("workspace.updated", f"users/{owner}", request_id)
    ]
    assert '"display_name": "Renamed"' in events[0].after_json
    assert [e.action for e in events[1:]] == ["member.added", "workspace.created"]


async def test_an_api_key_acts_in_its_workspace_but_is_nobodys_member(
    stub: Stub, keys: TestKeys, make_team: TeamFactory
) -> None:
    team = await make_team(VIEWER)
    api_key = str(uuid7())
    token = bearer(keys.api_key_token(api_key, str(team.workspace.id), ADMIN))

    members = await stub.ListMembers(pb.ListMembersRequest(parent=team.workspace.name), metadata=token)
    assert len(members.members) == 2
    leave = await call(stub, "LeaveWorkspace", pb.LeaveWorkspaceRequest(name=team.workspace.name), token)
    assert outcome(leave) == ("PERMISSION_DENIED", "USER_TOKEN_REQUIRED")
    invited = await stub.CreateInvitation(
        pb.CreateInvitationRequest(
            parent=team.workspace.name, invitation=tenancy_pb2.Invitation(email="bot-made@example.com", role=VIEWER)
        ),
        metadata=token,
    )
    assert invited.invitation.inviter == f"apiKeys/{api_key}"


# --- authorization, generated from the contract --------------------------------------------------------


def _workspace_requests(workspace: str) -> dict[str, Message]:
    """One request per WORKSPACE-level RPC naming `workspace`, built so that an authorized call changes nothing."""
    stranger = f"{workspace}/members/{uuid7()}"
    return {
        "GetWorkspace": pb.GetWorkspaceRequest(name=workspace),
        "UpdateWorkspace": pb.UpdateWorkspaceRequest(
            workspace=tenancy_pb2.Workspace(name=workspace, display_name="Hijacked", etag='"v0"')
        ),
        "DeleteWorkspace": pb.DeleteWorkspaceRequest(name=workspace, etag='"v0"'),
        "UndeleteWorkspace": pb.UndeleteWorkspaceRequest(name=workspace),
        "ListMembers": pb.ListMembersRequest(parent=workspace),
        "UpdateMember": pb.UpdateMemberRequest(member=tenancy_pb2.Member(name=stranger, role=ADMIN)),
        "RemoveMember": pb.RemoveMemberRequest(name=stranger),
        "TransferOwnership": pb.TransferOwnershipRequest(name=workspace, new_owner=stranger),
        "CreateInvitation": pb.CreateInvitationRequest(
            parent=workspace, invitation=tenancy_pb2.Invitation(email="x@example.com", role=OWNER)
        ),
        "ListInvitations": pb.ListInvitationsRequest(parent=workspace),
        "RevokeInvitation": pb.RevokeInvitationRequest(name=f"{workspace}/invitations/{uuid7()}"),
        "ListAuditEvents": pb.ListAuditEventsRequest(parent=workspace),
        "LeaveWorkspace": pb.LeaveWorkspaceRequest(name=workspace),
    }


def test_the_request_table_covers_every_workspace_rpc() -> None:
    assert sorted(_workspace_requests("workspaces/x")) == WORKSPACE_METHODS


# What each authorized (harmless) request above returns; an unauthorized role gets MISSING_PERMISSION.
AUTHORIZED = {
    "GetWorkspace": ("OK", ""),
    "UpdateWorkspace": ("ABORTED", "ETAG_MISMATCH"),
    "DeleteWorkspace": ("ABORTED", "ETAG_MISMATCH"),
    "UndeleteWorkspace": ("FAILED_PRECONDITION", "WORKSPACE_NOT_DELETED"),
    "ListMembers": ("OK", ""),
    "UpdateMember": ("NOT_FOUND", "RESOURCE_NOT_FOUND"),
    "RemoveMember": ("NOT_FOUND", "RESOURCE_NOT_FOUND"),
    "TransferOwnership": ("NOT_FOUND", "RESOURCE_NOT_FOUND"),
    "CreateInvitation": ("INVALID_ARGUMENT", "INVALID_ARGUMENT"),
    "ListInvitations": ("OK", ""),
    "RevokeInvitation": ("NOT_FOUND", "RESOURCE_NOT_FOUND"),
    "ListAuditEvents": ("OK", ""),
    "LeaveWorkspace": ("OK", ""),
}
# The role matrix for these RPCs, written out (services/kit/authz.py is what the interceptor reads).
ALLOWED_ROLES = {
    "GetWorkspace": set(ROLES),
    "UpdateWorkspace": {OWNER, ADMIN},
    "DeleteWorkspace": {OWNER},
    "UndeleteWorkspace": {OWNER},
    "ListMembers": set(ROLES),
    "UpdateMember": {OWNER, ADMIN},
    "RemoveMember": {OWNER, ADMIN},
    "TransferOwnership": {OWNER},
    "CreateInvitation": {OWNER, ADMIN},
    "ListInvitations": {OWNER, ADMIN},
    "RevokeInvitation": {OWNER, ADMIN},
    "ListAuditEvents": {OWNER, ADMIN},
    "LeaveWorkspace": set(ROLES),
}


@pytest.mark.parametrize("role", ROLES)
async def test_every_workspace_rpc_for_every_role(
    stub: Stub, keys: TestKeys, make_team: TeamFactory, role: str
) -> None:
    team = await make_team(ADMIN, MEMBER, VIEWER, BILLING_MANAGER)
    caller = team.user(role)
    token = await in_workspace(stub, keys, caller.subject, team.workspace.name)
    requests = _workspace_requests(team.workspace.name)

    observed, expected = {}, {}
    for method in [*sorted(set(requests) - {"LeaveWorkspace"}), "LeaveWorkspace"]:  # leaving last
        observed[method] = outcome(await call(stub, method, requests[method], token))
        expected[method] = (
            AUTHORIZED[method] if role in ALLOWED_ROLES[method] else ("PERMISSION_DENIED", "MISSING_PERMISSION")
        )
    if role == OWNER:
        expected["LeaveWorkspace"] = ("FAILED_PRECONDITION", "LAST_OWNER")
    assert observed == expected

    fetched = (
        await stub.GetWorkspace(
            pb.GetWorkspaceRequest(name=team.workspace.name),
            metadata=await in_workspace(stub, keys, team.owner.subject, team.workspace.name),
        )
    ).workspace
    assert fetched.display_name == team.workspace.display_name  # nothing was changed


async def test_every_workspace_rpc_naming_another_workspace_is_not_found(
    stub: Stub, keys: TestKeys, make_team: TeamFactory
) -> None:
    mine, theirs = await make_team(), await make_team(VIEWER)
    token = await in_workspace(stub, keys, mine.owner.subject, mine.workspace.name)  # an owner, of another workspace
    foreign = theirs.workspace.name

    for method, request in sorted(_workspace_requests(foreign).items()):
        result = await call(stub, method, request, token)
        assert outcome(result) == ("NOT_FOUND", "RESOURCE_NOT_FOUND"), method
        assert str(theirs.owner.subject) not in result.details()
        assert theirs.workspace.display_name not in result.details()

    theirs_token = await in_workspace(stub, keys, theirs.owner.subject, foreign)
    after = await stub.ListMembers(pb.ListMembersRequest(parent=foreign), metadata=theirs_token)
    assert len(after.members) == 2  # nobody left or was removed


@pytest.mark.gate("S02")
@pytest.mark.parametrize("method", sorted(m.name for m in SERVICE.methods))
async def test_every_rpc_without_a_valid_token_is_unauthenticated(stub: Stub, keys: TestKeys, method: str) -> None:
    workspace = f"workspaces/{uuid7()}"
    request_type = getattr(pb, f"{method}Request")
    request = _workspace_requests(workspace).get(method) or request_type()
    caller = str(uuid7())
    results = [
        await call(stub, method, request, ()),
        await call(stub, method, request, bearer(keys.expired_token(caller))),
        await call(stub, method, request, bearer(keys.forged_token(caller))),
        await call(stub, method, request, (("authorization", "Bearer not-a-jwt"),)),
    ]
    assert [outcome(r)[0] for r in results] == ["UNAUTHENTICATED"] * 4


@pytest.mark.gate("S02")
@pytest.mark.parametrize("method", WORKSPACE_METHODS)
async def test_a_user_level_token_cannot_call_workspace_rpcs(stub: Stub, keys: TestKeys, method: str) -> None:
    request = _workspace_requests(f"workspaces/{uuid7()}")[method]
    result = await call(stub, method, request, user(keys, uuid7()))
    assert outcome(result) == ("PERMISSION_DENIED", "WORKSPACE_TOKEN_REQUIRED")


@pytest.mark.gate("S08")
async def test_created_event_reaches_the_provisioner_and_the_workspace_becomes_active(
    stub: Stub, keys: TestKeys, broker: Broker
) -> None:
    owner = uuid7()
    provisioned = await Tap.open(broker, "workspace_provisioned")
    try:
        created = await create(stub, keys, owner, "Eventful")
        token = await in_workspace(stub, keys, owner, created.name)

        async def active() -> bool:
            response = await stub.GetWorkspace(pb.GetWorkspaceRequest(name=created.name), metadata=token)
            return response.workspace.state == tenancy_pb2.WORKSPACE_STATE_ACTIVE

        await eventually(active, timeout=20.0, what=f"{created.name} to become ACTIVE")
        [envelope] = await provisioned.take(lambda e: e.subject == created.name, settle=0.3)
    finally:
        await provisioned.close()
    event = tenancy_events_pb2.WorkspaceProvisionedEvent()
    assert envelope.payload.Unpack(event)
    assert event.workspace.state == tenancy_pb2.WORKSPACE_STATE_ACTIVE
