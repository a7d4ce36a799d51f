"""Membership rules of TenancyService: the role matrix per operation, owner rules, last owner, transfer."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from services.kit.authz import ADMIN, BILLING_MANAGER, MEMBER, OWNER, ROLES, VIEWER
from services.kit.db import Database
from services.kit.errors import AppError, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.kit.ids import uuid7
from services.kit.principal import Principal
from services.tenancy.models import Member
from services.tenancy.service import TenancyService
from tessera.tenancy.v1 import tenancy_events_pb2
from tests.tenancy.conftest import Team, TeamFactory, acting, create_workspace, invite, outbox_envelopes

pytestmark = pytest.mark.gate("S03")

MEMBERSHIP_CHANGED = "tessera.tenancy.v1.MembershipChangedEvent"
EVERYONE = frozenset(ROLES)
MANAGERS = frozenset({OWNER, ADMIN})

# The expected authorization of each workspace-level operation, written out independently of the role
# matrix in services/kit/authz.py (which the service reads through the contract).
ALLOWED: dict[str, frozenset[str]] = {
    "get_workspace": EVERYONE,
    "update_workspace": MANAGERS,
    "delete_workspace": frozenset({OWNER}),
    "list_members": EVERYONE,
    "update_member": MANAGERS,
    "remove_member": MANAGERS,
    "leave_workspace": EVERYONE,
    "transfer_ownership": frozenset({OWNER}),
    "create_invitation": MANAGERS,
    "list_invitations": MANAGERS,
    "revoke_invitation": MANAGERS,
    "list_audit_events": MANAGERS,
}


async def _in_uow(db: Database, caller: Principal, work: Callable[..., Awaitable[object]], **kwargs: object) -> object:
    async with db.unit_of_work(caller) as uow:
        return await work(uow, caller, **kwargs)


def _operations(team: Team, pending_invitation: uuid.UUID) -> dict[str, dict[str, object]]:
    """Keyword arguments of each operation against `team` (targets chosen so that an allowed call succeeds)."""
    ws = team.workspace.id
    viewer = uuid.UUID(team.user(VIEWER).subject)
    member = uuid.UUID(team.user(MEMBER).subject)
    admin = uuid.UUID(team.user(ADMIN).subject)
    return {
        "get_workspace": {"workspace_id": ws},
        "update_workspace": {"workspace_id": ws, "display_name": "Renamed"},
        "delete_workspace": {"workspace_id": ws},
        "list_members": {"workspace_id": ws},
        "update_member": {"workspace_id": ws, "user_id": viewer, "role": MEMBER},
        "remove_member": {"workspace_id": ws, "user_id": member},
        "leave_workspace": {"workspace_id": ws},
        "transfer_ownership": {"workspace_id": ws, "new_owner": admin},
        "create_invitation": {"workspace_id": ws, "email": f"{uuid7()}@example.com", "role": VIEWER},
        "list_invitations": {"workspace_id": ws},
        "revoke_invitation": {"workspace_id": ws, "invitation_id": pending_invitation},
        "list_audit_events": {"workspace_id": ws},
    }


@pytest.mark.parametrize("operation", sorted(ALLOWED))
@pytest.mark.parametrize("role", ROLES)
async def test_role_matrix(
    tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory, role: str, operation: str
) -> None:
    team = await make_team(ADMIN, MEMBER, VIEWER, BILLING_MANAGER)
    pending, _ = await invite(tenancy_db, tenancy_service, team.owner, email=f"{uuid7()}@example.com", role=MEMBER)
    kwargs = _operations(team, pending)[operation]
    caller = team.user(role)

    outcome: AppError | None = None
    try:
        await _in_uow(tenancy_db, caller, getattr(tenancy_service, operation), **kwargs)
    except AppError as error:
        outcome = error

    if role not in ALLOWED[operation]:
        assert isinstance(outcome, PermissionDenied), f"{role} may not {operation}: got {outcome!r}"
        assert outcome.reason == "MISSING_PERMISSION"
    elif (role, operation) == (OWNER, "leave_workspace"):
        assert isinstance(outcome, FailedPrecondition)
        assert outcome.reason == "LAST_OWNER"
    else:
        assert outcome is None, f"{role} may {operation}: got {outcome!r}"


async def _members(admin: asyncpg.Connection, workspace_id: uuid.UUID) -> dict[str, str]:
    rows = await admin.fetch("SELECT user_id, role FROM tenancy.members WHERE tenant_id = $1", workspace_id)
    return {str(row["user_id"]): row["role"] for row in rows}


async def _changes(admin: asyncpg.Connection, workspace_id: uuid.UUID) -> list[tuple[str, str, str]]:
    """(member user id, previous role, role) of every MembershipChangedEvent of the workspace, in order."""
    changes = []
    for envelope in await outbox_envelopes(admin, tenant=workspace_id, event_type=MEMBERSHIP_CHANGED):
        event = tenancy_events_pb2.MembershipChangedEvent()
        assert envelope.payload.Unpack(event)
        assert envelope.subject == event.member
        changes.append((event.member.rsplit("/", 1)[1], event.previous_role, event.role))
    return changes


async def _update(
    db: Database, service: TenancyService, caller: Principal, team: Team, user: Principal, role: str
) -> Member:
    async with db.unit_of_work(caller) as uow:
        return await service.update_member(
            uow, caller, workspace_id=team.workspace.id, user_id=uuid.UUID(user.subject), role=role
        )


async def _remove(db: Database, service: TenancyService, caller: Principal, team: Team, user: Principal) -> Member:
    async with db.unit_of_work(caller) as uow:
        return await service.remove_member(uow, caller, workspace_id=team.workspace.id, user_id=uuid.UUID(user.subject))


class TestUpdateMember:
    async def test_admin_changes_roles_below_owner_and_each_change_emits_one_event(
        self,
        tenancy_db: Database,
        tenancy_service: TenancyService,
        make_team: TeamFactory,
        admin_conn: asyncpg.Connection,
    ) -> None:
        team = await make_team(ADMIN, VIEWER)
        viewer = team.user(VIEWER)
        before = await _changes(admin_conn, team.workspace.id)

        promoted = await _update(tenancy_db, tenancy_service, team.user(ADMIN), team, viewer, ADMIN)
        unchanged = await _update(tenancy_db, tenancy_service, team.user(ADMIN), team, viewer, ADMIN)

        assert promoted.role == unchanged.role == ADMIN
        assert (await _members(admin_conn, team.workspace.id))[viewer.subject] == ADMIN
        new = (await _changes(admin_conn, team.workspace.id))[len(before) :]
        assert new == [(viewer.subject, VIEWER, ADMIN)]  # the no-op update emitted nothing

    @pytest.mark.parametrize(("target_role", "new_role"), [(MEMBER, OWNER), (OWNER, MEMBER)])
    async def test_only_owners_grant_or_take_away_owner(
        self,
        tenancy_db: Database,
        tenancy_service: TenancyService,
        make_team: TeamFactory,
        target_role: str,
        new_role: str,
    ) -> None:
        team = await make_team(ADMIN, MEMBER)
        target = team.user(target_role)
        with pytest.raises(PermissionDenied) as caught:
            await _update(tenancy_db, tenancy_service, team.user(ADMIN), team, target, new_role)
        assert caught.value.reason == "OWNER_REQUIRED"

    async def test_owner_makes_a_second_owner_who_may_then_demote_the_first(
        self,
        tenancy_db: Database,
        tenancy_service: TenancyService,
        make_team: TeamFactory,
        admin_conn: asyncpg.Connection,
    ) -> None:
        team = await make_team(MEMBER)
        await _update(tenancy_db, tenancy_service, team.owner, team, team.user(MEMBER), OWNER)
        second_owner = acting(team.user(MEMBER), team.workspace, OWNER)

        await _update(tenancy_db, tenancy_service, second_owner, team, team.owner, VIEWER)

        roles = await _members(admin_conn, team.workspace.id)
        assert (roles[team.owner.subject], roles[second_owner.subject]) == (VIEWER, OWNER)

    async def test_a_demoted_owner_with_an_older_owner_token_cannot_grant_owner(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
    ) -> None:
        team = await make_team(MEMBER, VIEWER)
        await _update(tenancy_db, tenancy_service, team.owner, team, team.user(MEMBER), OWNER)
        second_owner = acting(team.user(MEMBER), team.workspace, OWNER)
        await _update(tenancy_db, tenancy_service, second_owner, team, team.owner, ADMIN)

        # team.owner's token still says owner (its revocation travels asynchronously); the row says admin.
        for attempt in (
            _update(tenancy_db, tenancy_service, team.owner, team, team.user(VIEWER), OWNER),
            _remove(tenancy_db, tenancy_service, team.owner, team, second_owner),
        ):
            with pytest.raises(PermissionDenied) as caught:
                await attempt
            assert caught.value.reason == "OWNER_REQUIRED"

    async def test_the_last_owner_cannot_be_demoted_and_the_error_names_the_rule(
        self,
        tenancy_db: Database,
        tenancy_service: TenancyService,
        make_team: TeamFactory,
        admin_conn: asyncpg.Connection,
    ) -> None:
        team = await make_team()
        with pytest.raises(FailedPrecondition) as caught:
            await _update(tenancy_db, tenancy_service, team.owner, team, team.owner, ADMIN)

        assert caught.value.reason == "LAST_OWNER"
        assert caught.value.metadata["rule"] == "last_owner"
        assert "at least one owner" in caught.value.message
        assert (await _members(admin_conn, team.workspace.id))[team.owner.subject] == OWNER

    async def test_two_owners_demoting_each_other_concurrently_leave_one_owner(
        self,
        tenancy_db: Database,
        tenancy_service: TenancyService,
        make_team: TeamFactory,
        admin_conn: asyncpg.Connection,
    ) -> None:
        team = await make_team(MEMBER)
        await _update(tenancy_db, tenancy_service, team.owner, team, team.user(MEMBER), OWNER)
        other = acting(team.user(MEMBER), team.workspace, OWNER)

        results = await asyncio.gather(
            _update(tenancy_db, tenancy_service, team.owner, team, other, ADMIN),
            _update(tenancy_db, tenancy_service, other, team, team.owner, ADMIN),
            return_exceptions=True,
        )

        failures = [r for r in results if isinstance(r, BaseException)]
        assert len(failures) == 1
        # The loser waited for the workspace lock and then found itself demoted (or, had it not been, the
        # other one the last owner).
        assert isinstance(failures[0], AppError)
        assert failures[0].reason in ("OWNER_REQUIRED", "LAST_OWNER")
        assert sorted((await _members(admin_conn, team.workspace.id)).values()) == [ADMIN, OWNER]

    async def test_unknown_role_is_invalid_argument_and_unknown_member_not_found(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
    ) -> None:
        team = await make_team(MEMBER)
        with pytest.raises(InvalidArgument) as invalid:
            await _update(tenancy_db, tenancy_service, team.owner, team, team.user(MEMBER), "superuser")
        assert [v.field for v in invalid.value.violations] == ["member.role"]
        stranger = Principal(subject=str(uuid7()))
        with pytest.raises(NotFound) as missing:
            await _update(tenancy_db, tenancy_service, team.owner, team, stranger, VIEWER)
        assert missing.value.message == f"{team.workspace.name}/members/{stranger.subject} not found"

    async def test_member_of_another_workspace_is_not_found(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
    ) -> None:
        mine, theirs = await make_team(), await make_team(VIEWER)
        async with tenancy_db.unit_of_work(mine.owner) as uow:
            with pytest.raises(NotFound):
                await tenancy_service.update_member(
                    uow,
                    mine.owner,
                    workspace_id=theirs.workspace.id,
                    user_id=uuid.UUID(theirs.user(VIEWER).subject),
                    role=ADMIN,
                )


class TestRemoveAndLeave:
    async def test_admin_removes_a_member_once(
        self,
        tenancy_db: Database,
        tenancy_service: TenancyService,
        make_team: TeamFactory,
        admin_conn: asyncpg.Connection,
    ) -> None:
        team = await make_team(ADMIN, VIEWER)
        viewer = team.user(VIEWER)
        before = await _changes(admin_conn, team.workspace.id)

        removed = await _remove(tenancy_db, tenancy_service, team.user(ADMIN), team, viewer)
        with pytest.raises(NotFound):
            await _remove(tenancy_db, tenancy_service, team.user(ADMIN), team, viewer)

        assert removed.role == VIEWER
        assert viewer.subject not in await _members(admin_conn, team.workspace.id)
        assert (await _changes(admin_conn, team.workspace.id))[len(before) :] == [(viewer.subject, VIEWER, "")]

    async def test_admin_cannot_remove_an_owner(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
    ) -> None:
        team = await make_team(ADMIN)
        with pytest.raises(PermissionDenied) as caught:
            await _remove(tenancy_db, tenancy_service, team.user(ADMIN), team, team.owner)
        assert caught.value.reason == "OWNER_REQUIRED"

    async def test_the_last_owner_cannot_be_removed_but_one_of_two_can(
        self,
        tenancy_db: Database,
        tenancy_service: TenancyService,
        make_team: TeamFactory,
        admin_conn: asyncpg.Connection,
    ) -> None:
        team = await make_team(MEMBER)
        with pytest.raises(FailedPrecondition) as caught:
            await _remove(tenancy_db, tenancy_service, team.owner, team, team.owner)
        assert caught.value.reason == "LAST_OWNER"

        await _update(tenancy_db, tenancy_service, team.owner, team, team.user(MEMBER), OWNER)
        await _remove(tenancy_db, tenancy_service, team.owner, team, team.owner)
        assert await _members(admin_conn, team.workspace.id) == {team.user(MEMBER).subject: OWNER}

    async def test_a_member_leaves_and_no_longer_lists_the_workspace(
        self,
        tenancy_db: Database,
        tenancy_service: TenancyService,
        make_team: TeamFactory,
        admin_conn: asyncpg.Connection,
    ) -> None:
        team = await make_team(VIEWER)
        viewer = team.user(VIEWER)
        async with tenancy_db.unit_of_work(viewer) as uow:
            left = await tenancy_service.leave_workspace(uow, viewer, workspace_id=team.workspace.id)

        assert left.user_id == uuid.UUID(viewer.subject)
        user_level = Principal(subject=viewer.subject)
        async with tenancy_db.unit_of_work(user_level) as uow:
            assert (await tenancy_service.list_workspaces(uow, user_level)).workspaces == []
        actions = await admin_conn.fetch(
            "SELECT action, after FROM tenancy.audit_log WHERE tenant_id = $1 AND target LIKE $2"
            " ORDER BY create_time, id",
            team.workspace.id,
            f"%/members/{viewer.subject}",
        )
        assert [(row["action"], row["after"]) for row in actions][-1] == ("member.left", None)

    async def test_the_last_owner_cannot_leave(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal
    ) -> None:
        workspace = await create_workspace(tenancy_db, tenancy_service, alice)
        owner = acting(alice, workspace, OWNER)
        with pytest.raises(FailedPrecondition) as caught:
            async with tenancy_db.unit_of_work(owner) as uow:
                await tenancy_service.leave_workspace(uow, owner, workspace_id=workspace.id)
        assert caught.value.reason == "LAST_OWNER"
        assert "cannot leave" in caught.value.message

    async def test_an_api_key_cannot_leave(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
    ) -> None:
        team = await make_team()
        api_key = Principal(subject=str(uuid7()), kind="api_key").in_tenant(str(team.workspace.id), ADMIN)
        with pytest.raises(PermissionDenied) as caught:
            async with tenancy_db.unit_of_work(api_key) as uow:
                await tenancy_service.leave_workspace(uow, api_key, workspace_id=team.workspace.id)
        assert caught.value.reason == "USER_TOKEN_REQUIRED"


class TestTransferOwnership:
    async def test_new_owner_and_previous_owner_admin_in_one_change(
        self,
        tenancy_db: Database,
        tenancy_service: TenancyService,
        make_team: TeamFactory,
        admin_conn: asyncpg.Connection,
    ) -> None:
        team = await make_team(MEMBER)
        heir = team.user(MEMBER)
        before = await _changes(admin_conn, team.workspace.id)

        async with tenancy_db.unit_of_work(team.owner) as uow:
            transfer = await tenancy_service.transfer_ownership(
                uow, team.owner, workspace_id=team.workspace.id, new_owner=uuid.UUID(heir.subject)
            )

        assert (transfer.new_owner.role, transfer.previous_owner.role) == (OWNER, ADMIN)
        assert await _members(admin_conn, team.workspace.id) == {heir.subject: OWNER, team.owner.subject: ADMIN}
        assert (await _changes(admin_conn, team.workspace.id))[len(before) :] == [
            (heir.subject, MEMBER, OWNER),
            (team.owner.subject, OWNER, ADMIN),
        ]
        row = await admin_conn.fetchrow(
            "SELECT before, after FROM tenancy.audit_log WHERE tenant_id = $1 AND action = 'ownership.transferred'",
            team.workspace.id,
        )
        assert row is not None
        assert '"role": "member"' in row["before"]
        assert '"role": "admin"' in row["after"]

    async def test_a_stale_owner_token_cannot_transfer_again(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
    ) -> None:
        """The token still says owner, but the membership row says admin: the row decides."""
        team = await make_team(MEMBER, VIEWER)
        async with tenancy_db.unit_of_work(team.owner) as uow:
            await tenancy_service.transfer_ownership(
                uow, team.owner, workspace_id=team.workspace.id, new_owner=uuid.UUID(team.user(MEMBER).subject)
            )
        with pytest.raises(PermissionDenied) as caught:
            async with tenancy_db.unit_of_work(team.owner) as uow:
                await tenancy_service.transfer_ownership(
                    uow, team.owner, workspace_id=team.workspace.id, new_owner=uuid.UUID(team.user(VIEWER).subject)
                )
        assert caught.value.reason == "OWNER_REQUIRED"

    async def test_to_a_non_member_is_not_found_and_to_oneself_invalid(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
    ) -> None:
        team = await make_team()
        outcomes: list[type[AppError]] = []
        for target in (uuid7(), uuid.UUID(team.owner.subject)):
            try:
                async with tenancy_db.unit_of_work(team.owner) as uow:
                    await tenancy_service.transfer_ownership(
                        uow, team.owner, workspace_id=team.workspace.id, new_owner=target
                    )
            except AppError as error:
                outcomes.append(type(error))
        assert outcomes == [NotFound, InvalidArgument]
