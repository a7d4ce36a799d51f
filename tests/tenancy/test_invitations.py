"""Invitations: create (token only in the event), list, revoke, accept once, expiry, duplicates."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from datetime import timedelta

import asyncpg
import pytest

from services.kit.authz import ADMIN, MEMBER, OWNER, VIEWER
from services.kit.db import Database
from services.kit.errors import AlreadyExists, AppError, FailedPrecondition, InvalidArgument, NotFound
from services.kit.ids import uuid7
from services.kit.principal import Principal
from services.tenancy.models import InvitationState
from services.tenancy.service import TenancyService
from tessera.tenancy.v1 import tenancy_events_pb2, tenancy_pb2
from tests.tenancy.conftest import TeamFactory, accept, invite, make_service, new_user, outbox_envelopes

pytestmark = pytest.mark.gate("S03")

INVITATION_CREATED = "tessera.tenancy.v1.InvitationCreatedEvent"


def email() -> str:
    return f"invitee-{uuid7()}@example.com"


async def states(db: Database, service: TenancyService, caller: Principal) -> dict[uuid.UUID, InvitationState]:
    assert caller.tenant_id is not None
    async with db.unit_of_work(caller) as uow:
        page = await service.list_invitations(uow, caller, workspace_id=uuid.UUID(caller.tenant_id))
    return {invitation.id: invitation.state for invitation in page.invitations}


async def revoke(db: Database, service: TenancyService, caller: Principal, invitation_id: uuid.UUID) -> None:
    assert caller.tenant_id is not None
    async with db.unit_of_work(caller) as uow:
        await service.revoke_invitation(
            uow, caller, workspace_id=uuid.UUID(caller.tenant_id), invitation_id=invitation_id
        )


class TestCreateInvitation:
    async def test_token_travels_only_in_the_event_and_only_its_hash_is_stored(
        self,
        tenancy_db: Database,
        tenancy_service: TenancyService,
        make_team: TeamFactory,
        admin_conn: asyncpg.Connection,
    ) -> None:
        team = await make_team(ADMIN, display_name="Acme Corp")
        address = email()
        invitation_id, token = await invite(
            tenancy_db, tenancy_service, team.user(ADMIN), email=f"  {address.upper()} ", role=VIEWER
        )

        row = await admin_conn.fetchrow("SELECT * FROM tenancy.invitations WHERE id = $1", invitation_id)
        assert row is not None
        assert (row["email"], row["role"], row["state"]) == (address, VIEWER, "PENDING")
        assert row["inviter"] == f"users/{team.user(ADMIN).subject}"
        assert bytes(row["token_hash"]) == hashlib.sha256(token.encode()).digest()
        assert token not in json.dumps({k: str(v) for k, v in dict(row).items()})
        assert row["expire_time"] - row["create_time"] == timedelta(days=7)
        assert token.startswith(f"inv_{team.workspace.id.hex}_")

        [envelope] = [
            e
            for e in await outbox_envelopes(admin_conn, tenant=team.workspace.id, event_type=INVITATION_CREATED)
            if e.subject.endswith(str(invitation_id))
        ]
        event = tenancy_events_pb2.InvitationCreatedEvent()
        assert envelope.payload.Unpack(event)
        assert (event.token, event.workspace_display_name) == (token, "Acme Corp")
        assert (event.invitation.email, event.invitation.role) == (address, VIEWER)
        assert event.invitation.state == tenancy_pb2.INVITATION_STATE_PENDING
        audit = await admin_conn.fetchval(
            "SELECT after::text FROM tenancy.audit_log WHERE tenant_id = $1 AND target = $2",
            team.workspace.id,
            f"{team.workspace.name}/invitations/{invitation_id}",
        )
        assert address in audit
        assert token not in audit

    async def test_a_second_pending_invitation_for_the_address_is_already_exists_until_revoked(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
    ) -> None:
        team = await make_team()
        address = email()
        first, _ = await invite(tenancy_db, tenancy_service, team.owner, email=address, role=MEMBER)

        with pytest.raises(AlreadyExists) as caught:
            await invite(tenancy_db, tenancy_service, team.owner, email=address.upper(), role=VIEWER)
        assert caught.value.reason == "INVITATION_PENDING"

        await revoke(tenancy_db, tenancy_service, team.owner, first)
        second, _ = await invite(tenancy_db, tenancy_service, team.owner, email=address, role=VIEWER)
        assert (await states(tenancy_db, tenancy_service, team.owner)) == {
            second: InvitationState.PENDING,
            first: InvitationState.REVOKED,
        }

    async def test_an_expired_invitation_no_longer_blocks_a_new_one(
        self, tenancy_db: Database, make_team: TeamFactory
    ) -> None:
        short = make_service(invitation_ttl=timedelta(microseconds=1))
        team = await make_team()
        address = email()
        first, _ = await invite(tenancy_db, short, team.owner, email=address, role=MEMBER)
        second, _ = await invite(tenancy_db, short, team.owner, email=address, role=MEMBER)
        assert first != second
        assert (await states(tenancy_db, short, team.owner)) == {
            first: InvitationState.EXPIRED,
            second: InvitationState.EXPIRED,
        }

    @pytest.mark.parametrize(
        ("address", "role", "field"),
        [
            ("not-an-email", MEMBER, "invitation.email"),
            ("two@@example.com", MEMBER, "invitation.email"),
            ("spa ce@example.com", MEMBER, "invitation.email"),
            ("nodot@example", MEMBER, "invitation.email"),
            ("ok@example.com", OWNER, "invitation.role"),
            ("ok@example.com", "root", "invitation.role"),
        ],
    )
    async def test_bad_address_or_role_is_invalid_argument(
        self,
        tenancy_db: Database,
        tenancy_service: TenancyService,
        make_team: TeamFactory,
        address: str,
        role: str,
        field: str,
    ) -> None:
        team = await make_team()
        with pytest.raises(InvalidArgument) as caught:
            await invite(tenancy_db, tenancy_service, team.owner, email=address, role=role)
        assert [v.field for v in caught.value.violations] == [field]


class TestAcceptInvitation:
    async def test_accept_makes_a_member_once_with_event_and_audit(
        self,
        tenancy_db: Database,
        tenancy_service: TenancyService,
        make_team: TeamFactory,
        admin_conn: asyncpg.Connection,
    ) -> None:
        team = await make_team()
        invitation_id, token = await invite(tenancy_db, tenancy_service, team.owner, email=email(), role=VIEWER)
        joiner = new_user()

        member = await accept(tenancy_db, tenancy_service, joiner, token)

        assert (member.workspace_id, member.user_id, member.role) == (
            team.workspace.id,
            uuid.UUID(joiner.subject),
            VIEWER,
        )
        assert (await states(tenancy_db, tenancy_service, team.owner))[invitation_id] is InvitationState.ACCEPTED
        changes = [
            e
            for e in await outbox_envelopes(
                admin_conn, tenant=team.workspace.id, event_type="tessera.tenancy.v1.MembershipChangedEvent"
            )
            if e.subject == member.name
        ]
        assert len(changes) == 1
        rows = await admin_conn.fetch(
            "SELECT action, actor FROM tenancy.audit_log WHERE tenant_id = $1 ORDER BY id DESC LIMIT 2",
            team.workspace.id,
        )
        assert sorted(row["action"] for row in rows) == ["invitation.accepted", "member.added"]
        assert {row["actor"] for row in rows} == {f"users/{joiner.subject}"}

        with pytest.raises(InvalidArgument) as reused:
            await accept(tenancy_db, tenancy_service, new_user(), token)
        assert reused.value.reason == "INVITATION_USED"

    async def test_already_a_member_is_already_exists_and_leaves_the_token_usable(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
    ) -> None:
        team = await make_team(MEMBER)
        _, token = await invite(tenancy_db, tenancy_service, team.owner, email=email(), role=ADMIN)

        with pytest.raises(AlreadyExists) as caught:
            await accept(tenancy_db, tenancy_service, Principal(subject=team.user(MEMBER).subject), token)
        assert caught.value.reason == "ALREADY_A_MEMBER"

        member = await accept(tenancy_db, tenancy_service, new_user(), token)
        assert member.role == ADMIN

    async def test_revoked_and_expired_tokens_are_refused(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
    ) -> None:
        team = await make_team()
        revoked_id, revoked_token = await invite(tenancy_db, tenancy_service, team.owner, email=email(), role=MEMBER)
        await revoke(tenancy_db, tenancy_service, team.owner, revoked_id)
        _, expired_token = await invite(
            tenancy_db, make_service(invitation_ttl=timedelta(microseconds=1)), team.owner, email=email(), role=MEMBER
        )

        reasons = []
        for token in (revoked_token, expired_token):
            with pytest.raises(InvalidArgument) as caught:
                await accept(tenancy_db, tenancy_service, new_user(), token)
            reasons.append(caught.value.reason)
        assert reasons == ["INVITATION_REVOKED", "INVITATION_EXPIRED"]

    async def test_malformed_unknown_or_retargeted_tokens_are_invalid(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
    ) -> None:
        team, other = await make_team(), await make_team()
        _, token = await invite(tenancy_db, tenancy_service, team.owner, email=email(), role=MEMBER)
        secret = token.split("_", 2)[2]
        candidates = [
            "not-a-token",
            token[:-1],  # malformed: wrong length
            f"inv_{team.workspace.id.hex}_{'A' * 43}",  # well formed, unknown
            f"inv_{other.workspace.id.hex}_{secret}",  # the secret presented for another workspace
            f"inv_{uuid7().hex}_{secret}",  # a workspace that does not exist
        ]
        for candidate in candidates:
            with pytest.raises(InvalidArgument) as caught:
                await accept(tenancy_db, tenancy_service, new_user(), candidate)
            assert caught.value.reason == "INVITATION_TOKEN_INVALID", candidate
            assert [v.field for v in caught.value.violations] == ["token"]
        assert await accept(tenancy_db, tenancy_service, new_user(), token)  # the real one still works

    async def test_two_users_racing_for_one_token_make_one_member(
        self,
        tenancy_db: Database,
        tenancy_service: TenancyService,
        make_team: TeamFactory,
        admin_conn: asyncpg.Connection,
    ) -> None:
        team = await make_team()
        _, token = await invite(tenancy_db, tenancy_service, team.owner, email=email(), role=MEMBER)

        results = await asyncio.gather(
            *(accept(tenancy_db, tenancy_service, new_user(), token) for _ in range(3)), return_exceptions=True
        )

        failures = [r for r in results if isinstance(r, BaseException)]
        assert len(failures) == 2
        assert all(isinstance(f, InvalidArgument) and f.reason == "INVITATION_USED" for f in failures)
        count = await admin_conn.fetchval(
            "SELECT count(*) FROM tenancy.members WHERE tenant_id = $1", team.workspace.id
        )
        assert count == 2  # the owner and the one winner

    async def test_a_deleted_workspace_accepts_nobody(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
    ) -> None:
        team = await make_team()
        _, token = await invite(tenancy_db, tenancy_service, team.owner, email=email(), role=MEMBER)
        async with tenancy_db.unit_of_work(team.owner) as uow:
            await tenancy_service.delete_workspace(uow, team.owner, workspace_id=team.workspace.id)

        with pytest.raises(InvalidArgument) as caught:
            await accept(tenancy_db, tenancy_service, new_user(), token)
        assert caught.value.reason == "INVITATION_TOKEN_INVALID"

    async def test_an_api_key_cannot_accept(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
    ) -> None:
        team = await make_team()
        _, token = await invite(tenancy_db, tenancy_service, team.owner, email=email(), role=MEMBER)
        with pytest.raises(AppError) as caught:
            await accept(tenancy_db, tenancy_service, Principal(subject=str(uuid7()), kind="api_key"), token)
        assert caught.value.reason == "USER_TOKEN_REQUIRED"


class TestRevokeAndList:
    async def test_revoking_twice_is_failed_precondition_and_unknown_is_not_found(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
    ) -> None:
        team = await make_team()
        invitation_id, _ = await invite(tenancy_db, tenancy_service, team.owner, email=email(), role=MEMBER)
        await revoke(tenancy_db, tenancy_service, team.owner, invitation_id)

        with pytest.raises(FailedPrecondition) as twice:
            await revoke(tenancy_db, tenancy_service, team.owner, invitation_id)
        assert (twice.value.reason, twice.value.metadata) == ("INVITATION_NOT_PENDING", {"state": "REVOKED"})
        with pytest.raises(NotFound):
            await revoke(tenancy_db, tenancy_service, team.owner, uuid7())

    async def test_an_invitation_of_another_workspace_is_not_found(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
    ) -> None:
        mine, theirs = await make_team(), await make_team()
        foreign, _ = await invite(tenancy_db, tenancy_service, theirs.owner, email=email(), role=MEMBER)
        async with tenancy_db.unit_of_work(mine.owner) as uow:
            with pytest.raises(NotFound):
                await tenancy_service.revoke_invitation(
                    uow, mine.owner, workspace_id=theirs.workspace.id, invitation_id=foreign
                )
        # Presented under the caller's own workspace, the foreign id is simply unknown.
        with pytest.raises(NotFound):
            await revoke(tenancy_db, tenancy_service, mine.owner, foreign)
        assert (await states(tenancy_db, tenancy_service, theirs.owner))[foreign] is InvitationState.PENDING

    async def test_list_pages_newest_first(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
    ) -> None:
        team = await make_team()
        created = [
            (await invite(tenancy_db, tenancy_service, team.owner, email=email(), role=MEMBER))[0] for _ in range(5)
        ]

        seen: list[uuid.UUID] = []
        token = ""
        for _ in range(5):
            async with tenancy_db.unit_of_work(team.owner) as uow:
                page = await tenancy_service.list_invitations(
                    uow, team.owner, workspace_id=team.workspace.id, requested_page_size=2, page_token=token
                )
            seen.extend(invitation.id for invitation in page.invitations)
            token = page.next_page_token
            if not token:
                break
        assert seen == list(reversed(created))
