"""The revocation list over the session NATS: real envelopes on the real subjects reach a running server.

Events are published by a separate connection, as identity and tenancy would publish them, on
`tessera.identity.sessions_revoked`, `tessera.identity.api_key_revoked` and
`tessera.tenancy.membership_changed`; the server under test only consumes them. Propagation is
asynchronous, so the tests poll with `eventually`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.kit.broker import Broker
from services.kit.errors import Unavailable
from services.kit.events import build_envelope, subject_for
from services.kit.interceptors import TOKEN_REVOKED
from services.kit.revocation import MEMBERSHIP_CHANGED, SESSION_REVOKED, WORKSPACE_DELETED, RevocationList
from services.kit.server import ServiceRuntime
from services.kit.tokens import AccessClaims
from tessera.identity.v1 import identity_pb2
from tessera.identity.v1.identity_events_pb2 import ApiKeyRevokedEvent, SessionsRevokedEvent
from tessera.tenancy.v1 import tenancy_pb2, tenancy_service_pb2, tenancy_service_pb2_grpc
from tessera.tenancy.v1.tenancy_events_pb2 import MembershipChangedEvent, WorkspaceDeletedEvent
from tests.auth_helpers import TestKeys, bearer
from tests.helpers import eventually
from tests.kit.fake_service import FakeTenancy, fake_binding, kit_settings

pytestmark = pytest.mark.gate("S02")

OK = "OK"
REVOKED = f"UNAUTHENTICATED:{TOKEN_REVOKED}"


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def publish(broker: Broker, source: str, event: Message, *, tenant_id: str, subject: str) -> None:
    """Publish one event the way the outbox relay does (envelope, Nats-Msg-Id = event id)."""
    envelope = build_envelope(event, source=source, tenant_id=tenant_id, subject=subject)
    await broker.js.publish(
        subject_for(source, event), envelope.SerializeToString(), headers={"Nats-Msg-Id": envelope.id}
    )


def sessions_revoked(user: str, *sessions: str) -> SessionsRevokedEvent:
    return SessionsRevokedEvent(
        user=f"users/{user}", session_ids=list(sessions), reason="sign_out", revoke_time=timestamp(datetime.now(UTC))
    )


class Served:
    """A running enforced-auth server with a RevocationList on the session NATS, and a publisher."""

    def __init__(self, keys: TestKeys, revocations: RevocationList, publisher: Broker, port: int) -> None:
        self.keys = keys
        self.revocations = revocations
        self.publisher = publisher
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = tenancy_service_pb2_grpc.TenancyServiceStub(self.channel)

    async def status(self, token: str) -> str:
        """The outcome of a GetWorkspace with the token: `OK` or `<CODE>:<ErrorInfo reason>`."""
        request = tenancy_service_pb2.GetWorkspaceRequest(name=f"workspaces/{uuid.uuid4()}")
        try:
            await self.stub.GetWorkspace(request, metadata=bearer(token), timeout=10)
        except grpc.aio.AioRpcError as error:
            status = rpc_status.from_call(error)
            reasons = []
            for item in status.details if status is not None else ():
                info = error_details_pb2.ErrorInfo()
                if item.Unpack(info):
                    reasons.append(info.reason)
            return f"{error.code().name}:{','.join(reasons)}"
        return OK

    async def becomes_revoked(self, token: str, what: str) -> None:
        async def revoked() -> bool:
            return await self.status(token) == REVOKED

        await eventually(revoked, timeout=10, what=what)


@pytest.fixture
async def publisher(nats_url: str) -> AsyncIterator[Broker]:
    broker = Broker(nats_url, name="revocation-publisher")
    await broker.connect()
    for source in ("identity", "tenancy"):
        await broker.ensure_streams(source)
    try:
        yield broker
    finally:
        await broker.close()


@pytest.fixture
async def served(nats_url: str, publisher: Broker) -> AsyncIterator[Served]:
    keys = TestKeys()
    broker = Broker(nats_url, name="revocation-under-test")
    revocations = RevocationList(broker)
    rt = ServiceRuntime(
        name="fake-revocation",
        settings=kit_settings(auth="enforced"),
        bindings=[fake_binding(FakeTenancy())],
        background=[broker],
        verifier=keys.verifier,
        revocations=revocations,
    )
    port = await rt.start()
    assert revocations.ready
    serving = Served(keys, revocations, publisher, port)
    try:
        yield serving
    finally:
        await serving.channel.close()
        await rt.stop()


async def test_a_session_revoked_elsewhere_is_rejected_by_a_running_server(served: Served) -> None:
    user, workspace = str(uuid.uuid4()), str(uuid.uuid4())
    session, kept = str(uuid.uuid4()), str(uuid.uuid4())
    token = served.keys.workspace_token(user, workspace, "member", session_id=session)
    user_token = served.keys.user_token(user, session_id=session)
    other = served.keys.workspace_token(user, workspace, "member", session_id=kept)
    assert await served.status(token) == OK

    await publish(
        served.publisher, "identity", sessions_revoked(user, session), tenant_id=user, subject=f"users/{user}"
    )

    await served.becomes_revoked(token, "the revoked session's token to be rejected")
    assert served.revocations.revoked_reason(await served.keys.verifier.verify(user_token)) == SESSION_REVOKED
    assert await served.status(other) == OK


@pytest.mark.gate("S03")
async def test_a_workspace_token_predating_a_membership_change_is_rejected(served: Served) -> None:
    user, workspace = str(uuid.uuid4()), str(uuid.uuid4())
    session = str(uuid.uuid4())
    admin_token = served.keys.workspace_token(user, workspace, "admin", session_id=session)
    elsewhere = served.keys.workspace_token(user, str(uuid.uuid4()), "admin", session_id=session)
    assert await served.status(admin_token) == OK

    change = MembershipChangedEvent(
        member=f"workspaces/{workspace}/members/{user}",
        previous_role="admin",
        role="viewer",
        change_time=timestamp(datetime.now(UTC)),
    )
    await publish(served.publisher, "tenancy", change, tenant_id=workspace, subject=change.member)

    await served.becomes_revoked(admin_token, "the pre-change token to be rejected")
    claims = await served.keys.verifier.verify(admin_token)
    assert served.revocations.revoked_reason(claims) == MEMBERSHIP_CHANGED
    viewer_token = served.keys.workspace_token(user, workspace, "viewer", session_id=session)
    assert await served.status(viewer_token) == OK
    assert await served.status(elsewhere) == OK


@pytest.mark.gate("S03")
async def test_a_deleted_workspace_stops_its_tokens_everywhere(served: Served) -> None:
    owner, member, workspace = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    owner_token = served.keys.workspace_token(owner, workspace, "owner")
    member_token = served.keys.workspace_token(member, workspace, "member")
    elsewhere = served.keys.workspace_token(owner, str(uuid.uuid4()), "owner")
    assert await served.status(owner_token) == OK

    deleted = WorkspaceDeletedEvent(
        workspace=tenancy_pb2.Workspace(name=f"workspaces/{workspace}", delete_time=timestamp(datetime.now(UTC)))
    )
    await publish(served.publisher, "tenancy", deleted, tenant_id=workspace, subject=deleted.workspace.name)

    await served.becomes_revoked(owner_token, "the deleted workspace's tokens to be rejected")
    assert served.revocations.revoked_reason(await served.keys.verifier.verify(member_token)) == WORKSPACE_DELETED
    assert await served.status(elsewhere) == OK
    # An owner who restores the workspace gets a new token, issued after the deletion: it works.
    assert await served.status(served.keys.workspace_token(owner, workspace, "owner")) == OK


async def test_a_revoked_api_key_stops_its_tokens(served: Served) -> None:
    key_id, workspace = str(uuid.uuid4()), str(uuid.uuid4())
    token = served.keys.api_key_token(key_id, workspace, "member")
    assert await served.status(token) == OK
    event = ApiKeyRevokedEvent(
        api_key=identity_pb2.ApiKey(
            name=f"workspaces/{workspace}/apiKeys/{key_id}",
            display_name="ci",
            role="member",
            revoke_time=timestamp(datetime.now(UTC)),
        )
    )
    await publish(served.publisher, "identity", event, tenant_id=workspace, subject=event.api_key.name)
    await served.becomes_revoked(token, "the revoked API key's token to be rejected")


async def test_an_unusable_event_is_skipped_and_later_events_still_apply(served: Served) -> None:
    user = str(uuid.uuid4())
    session = str(uuid.uuid4())
    token = served.keys.user_token(user, session_id=session)
    subject = subject_for("identity", SessionsRevokedEvent())
    await served.publisher.js.publish(subject, b"\xff\x00 not an envelope", headers={"Nats-Msg-Id": str(uuid.uuid4())})
    wrong_payload = build_envelope(
        MembershipChangedEvent(member="workspaces/x/members/y"), source="identity", tenant_id=user, subject="x"
    )
    await served.publisher.js.publish(
        subject, wrong_payload.SerializeToString(), headers={"Nats-Msg-Id": wrong_payload.id}
    )
    await publish(
        served.publisher, "identity", sessions_revoked(user, session), tenant_id=user, subject=f"users/{user}"
    )
    await served.becomes_revoked(token, "the event after the bad ones to apply")


async def test_start_returns_after_the_backlog_of_the_window_is_applied(nats_url: str, publisher: Broker) -> None:
    user, workspace = str(uuid.uuid4()), str(uuid.uuid4())
    session = str(uuid.uuid4())
    keys = TestKeys()
    old = keys.token(
        user,
        session_id=str(uuid.uuid4()),
        workspace_id=workspace,
        role="owner",
        now=datetime.now(UTC) - timedelta(seconds=5),
    )
    await publish(publisher, "identity", sessions_revoked(user, session), tenant_id=user, subject=f"users/{user}")
    change = MembershipChangedEvent(
        member=f"workspaces/{workspace}/members/{user}", previous_role="owner", change_time=timestamp(datetime.now(UTC))
    )
    await publish(publisher, "tenancy", change, tenant_id=workspace, subject=change.member)

    broker = Broker(nats_url, name="revocation-late-starter")
    await broker.connect()
    revocations = RevocationList(broker)
    try:
        with pytest.raises(Unavailable):
            revocations.revoked_reason(await keys.verifier.verify(keys.user_token(user)))
        await revocations.start()
        # No polling: both events are in force as soon as start() returns.
        assert revocations.revoked_reason(await keys.verifier.verify(keys.user_token(user, session_id=session))) == (
            SESSION_REVOKED
        )
        assert revocations.revoked_reason(await keys.verifier.verify(old)) == MEMBERSHIP_CHANGED
        assert revocations.revoked_reason(await keys.verifier.verify(keys.user_token(user))) is None
    finally:
        await revocations.stop()
        await broker.close()


def claims_of(session: str, *, user: str, workspace: str | None, issued: datetime) -> AccessClaims:
    return AccessClaims(
        subject=user,
        session_id=session,
        kind="user",
        workspace_id=workspace,
        role="owner" if workspace else None,
        issued_at=issued,
        expires_at=issued + timedelta(minutes=10),
        token_id=str(uuid.uuid4()),
    )


def test_entries_expire_after_the_longest_token_lifetime() -> None:
    revocations = RevocationList(None, max_token_lifetime=timedelta(minutes=10), leeway=timedelta(seconds=30))
    now = datetime.now(UTC)
    user, workspace = str(uuid.uuid4()), str(uuid.uuid4())
    old_session, new_session = str(uuid.uuid4()), str(uuid.uuid4())
    revocations.revoke_session(old_session, at=now - timedelta(minutes=11))
    revocations.revoke_session(new_session, at=now - timedelta(minutes=9))
    revocations.membership_changed(user, workspace, at=now - timedelta(minutes=11))
    issued = now - timedelta(minutes=12)
    assert revocations.revoked_reason(claims_of(old_session, user=user, workspace=None, issued=issued)) == (
        SESSION_REVOKED
    )
    revocations.prune(now=now)
    assert revocations.revoked_reason(claims_of(old_session, user=user, workspace=None, issued=issued)) is None
    assert (
        revocations.revoked_reason(claims_of(str(uuid.uuid4()), user=user, workspace=workspace, issued=issued)) is None
    )
    assert revocations.revoked_reason(claims_of(new_session, user=user, workspace=None, issued=issued)) == (
        SESSION_REVOKED
    )
