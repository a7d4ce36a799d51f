"""Workspace rules of TenancyService against the real database, as the tenancy login role (RLS on)."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta

import asyncpg
import grpc
import pytest

from services.kit.authz import ADMIN, BILLING_MANAGER, MEMBER, OWNER, VIEWER
from services.kit.db import Database
from services.kit.errors import (
    Aborted,
    AppError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.kit.ids import uuid7
from services.kit.paging import PageTokenCodec
from services.kit.principal import Principal
from services.tenancy.errors import REQUEST_ID_REUSED, RequestIdReused
from services.tenancy.models import Workspace, WorkspaceState
from services.tenancy.service import TenancyService
from tessera.tenancy.v1 import tenancy_events_pb2, tenancy_pb2
from tests.tenancy.conftest import (
    TeamFactory,
    acting,
    create_workspace,
    make_service,
    new_user,
    outbox_envelopes,
)

pytestmark = pytest.mark.gate("S03")

CREATED = "tessera.tenancy.v1.WorkspaceCreatedEvent"
MEMBERSHIP_CHANGED = "tessera.tenancy.v1.MembershipChangedEvent"
DELETED = "tessera.tenancy.v1.WorkspaceDeletedEvent"
UNDELETED = "tessera.tenancy.v1.WorkspaceUndeletedEvent"


async def get(db: Database, service: TenancyService, principal: Principal, workspace_id: uuid.UUID) -> Workspace:
    async with db.unit_of_work(principal) as uow:
        return await service.get_workspace(uow, principal, workspace_id=workspace_id)


async def list_all(
    db: Database, service: TenancyService, user: Principal, *, show_deleted: bool = False
) -> list[uuid.UUID]:
    async with db.unit_of_work(user) as uow:
        page = await service.list_workspaces(uow, user, show_deleted=show_deleted, requested_page_size=1000)
    return [workspace.id for workspace in page.workspaces]


async def audit_actions(admin: asyncpg.Connection, workspace_id: uuid.UUID) -> list[str]:
    rows = await admin.fetch("SELECT action FROM tenancy.audit_log WHERE tenant_id = $1 ORDER BY id", workspace_id)
    return [row["action"] for row in rows]


class TestCreateWorkspace:
    async def test_creator_becomes_owner_with_events_and_audit(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, admin_conn: asyncpg.Connection
    ) -> None:
        workspace = await create_workspace(tenancy_db, tenancy_service, alice, "Acme")

        assert (workspace.display_name, workspace.state) == ("Acme", WorkspaceState.PROVISIONING)
        assert workspace.creator == uuid.UUID(alice.subject)
        assert workspace.id.version == 7
        assert workspace.etag
        assert not workspace.deleted
        member = await admin_conn.fetchrow("SELECT * FROM tenancy.members WHERE tenant_id = $1", workspace.id)
        assert member is not None
        assert (member["user_id"], member["role"]) == (uuid.UUID(alice.subject), OWNER)

        [created] = await outbox_envelopes(admin_conn, tenant=workspace.id, event_type=CREATED)
        event = tenancy_events_pb2.WorkspaceCreatedEvent()
        assert created.payload.Unpack(event)
        assert event.workspace.name == workspace.name
        assert event.workspace.state == tenancy_pb2.WORKSPACE_STATE_PROVISIONING
        [changed] = await outbox_envelopes(admin_conn, tenant=workspace.id, event_type=MEMBERSHIP_CHANGED)
        membership = tenancy_events_pb2.MembershipChangedEvent()
        assert changed.payload.Unpack(membership)
        assert membership.member == f"{workspace.name}/members/{alice.subject}"
        assert (membership.previous_role, membership.role) == ("", OWNER)
        assert membership.change_time.seconds > 0
        assert await audit_actions(admin_conn, workspace.id) == ["workspace.created", "member.added"]

    async def test_rolled_back_unit_of_work_leaves_no_row_member_or_event(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, admin_conn: asyncpg.Connection
    ) -> None:
        workspace_id = uuid7()

        async def create_then_fail() -> None:
            async with tenancy_db.unit_of_work(alice, tenant_id=str(workspace_id)) as uow:
                await tenancy_service.create_workspace(
                    uow, alice, workspace_id=workspace_id, display_name="Doomed", request_id=None
                )
                raise RuntimeError("failure after the insert")

        with pytest.raises(RuntimeError, match="after the insert"):
            await create_then_fail()

        for table in ("workspaces", "members", "audit_log"):
            query = f"SELECT count(*) FROM tenancy.{table} WHERE tenant_id = $1"
            assert await admin_conn.fetchval(query, workspace_id) == 0, table
        assert await outbox_envelopes(admin_conn, tenant=workspace_id, event_type=CREATED) == []

    async def test_same_request_id_and_payload_returns_the_first_workspace_once(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, admin_conn: asyncpg.Connection
    ) -> None:
        request_id = uuid.uuid4()
        first = await create_workspace(tenancy_db, tenancy_service, alice, "Acme", request_id)
        again = await create_workspace(tenancy_db, tenancy_service, alice, "Acme", request_id)

        assert again == first
        count = await admin_conn.fetchval(
            "SELECT count(*) FROM tenancy.workspaces WHERE creator = $1", uuid.UUID(alice.subject)
        )
        assert count == 1
        assert len(await outbox_envelopes(admin_conn, tenant=first.id, event_type=CREATED)) == 1
        assert len(await outbox_envelopes(admin_conn, tenant=first.id, event_type=MEMBERSHIP_CHANGED)) == 1

    async def test_concurrent_retries_create_one_workspace(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, admin_conn: asyncpg.Connection
    ) -> None:
        request_id = uuid.uuid4()
        results = await asyncio.gather(
            *(create_workspace(tenancy_db, tenancy_service, alice, "Racing", request_id) for _ in range(3))
        )

        assert len({workspace.id for workspace in results}) == 1
        user = uuid.UUID(alice.subject)
        assert await admin_conn.fetchval("SELECT count(*) FROM tenancy.workspaces WHERE creator = $1", user) == 1
        assert await admin_conn.fetchval("SELECT count(*) FROM tenancy.members WHERE user_id = $1", user) == 1

    async def test_request_id_reused_with_other_payload_is_already_exists(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal
    ) -> None:
        request_id = uuid.uuid4()
        await create_workspace(tenancy_db, tenancy_service, alice, "Acme", request_id)

        with pytest.raises(RequestIdReused) as caught:
            await create_workspace(tenancy_db, tenancy_service, alice, "Other name", request_id)

        assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert caught.value.reason == REQUEST_ID_REUSED
        assert caught.value.metadata == {"request_id": str(request_id)}

    async def test_request_id_is_scoped_to_the_caller(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, bob: Principal
    ) -> None:
        request_id = uuid.uuid4()
        mine = await create_workspace(tenancy_db, tenancy_service, alice, "Acme", request_id)
        theirs = await create_workspace(tenancy_db, tenancy_service, bob, "Acme", request_id)

        assert mine.id != theirs.id
        assert theirs.creator == uuid.UUID(bob.subject)

    @pytest.mark.parametrize(
        "display_name",
        ["", "   ", "x" * 101, "tab\tinside", "bell\x07"],
        ids=["empty", "blank", "too-long", "tab", "control"],
    )
    async def test_bad_display_name_is_invalid_argument(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, display_name: str
    ) -> None:
        with pytest.raises(InvalidArgument) as caught:
            await create_workspace(tenancy_db, tenancy_service, alice, display_name)

        assert [violation.field for violation in caught.value.violations] == ["workspace.display_name"]

    async def test_display_name_of_exactly_100_characters_is_accepted(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal
    ) -> None:
        workspace = await create_workspace(tenancy_db, tenancy_service, alice, "é" * 100)
        assert workspace.display_name == "é" * 100

    async def test_an_api_key_cannot_create_a_workspace(
        self, tenancy_db: Database, tenancy_service: TenancyService
    ) -> None:
        api_key = Principal(subject=str(uuid7()), kind="api_key")
        with pytest.raises(PermissionDenied) as caught:
            await create_workspace(tenancy_db, tenancy_service, api_key)
        assert caught.value.reason == "USER_TOKEN_REQUIRED"

    async def test_unit_of_work_of_another_tenant_is_refused(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal
    ) -> None:
        with pytest.raises(Internal):
            async with tenancy_db.unit_of_work(alice, tenant_id=str(uuid7())) as uow:
                await tenancy_service.create_workspace(uow, alice, workspace_id=uuid7(), display_name="Acme")


class TestGetWorkspace:
    @pytest.mark.parametrize("role", [OWNER, ADMIN, MEMBER, VIEWER, BILLING_MANAGER])
    async def test_every_role_reads_its_workspace(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory, role: str
    ) -> None:
        team = await make_team(*([role] if role != OWNER else []))
        fetched = await get(tenancy_db, tenancy_service, team.user(role), team.workspace.id)
        assert (fetched.id, fetched.display_name) == (team.workspace.id, team.workspace.display_name)

    async def test_token_of_another_workspace_gets_not_found_like_an_absent_one(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, bob: Principal
    ) -> None:
        theirs = await create_workspace(tenancy_db, tenancy_service, alice, "Private")
        mine = await create_workspace(tenancy_db, tenancy_service, bob, "Mine")
        absent = uuid7()
        bob_in_mine = acting(bob, mine, OWNER)

        errors: list[NotFound] = []
        for target in (theirs.id, absent):
            with pytest.raises(NotFound) as caught:
                await get(tenancy_db, tenancy_service, bob_in_mine, target)
            errors.append(caught.value)
        with pytest.raises(NotFound):
            await get(tenancy_db, tenancy_service, bob, theirs.id)  # a user-level principal reads no workspace

        assert [e.reason for e in errors] == ["RESOURCE_NOT_FOUND"] * 2
        assert [e.message for e in errors] == [f"workspaces/{theirs.id} not found", f"workspaces/{absent} not found"]


class TestListWorkspaces:
    async def test_lists_memberships_only(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory, alice: Principal
    ) -> None:
        own = await create_workspace(tenancy_db, tenancy_service, alice, "own")
        team = await make_team(VIEWER)
        await make_team()  # a stranger's workspace
        viewer = Principal(subject=team.user(VIEWER).subject)

        assert await list_all(tenancy_db, tenancy_service, alice) == [own.id]
        assert await list_all(tenancy_db, tenancy_service, viewer) == [team.workspace.id]

    async def test_pages_cover_all_workspaces_newest_first_without_skips_or_duplicates(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, bob: Principal
    ) -> None:
        created = [await create_workspace(tenancy_db, tenancy_service, alice, f"ws {i}") for i in range(7)]
        await create_workspace(tenancy_db, tenancy_service, bob, "not alice's")

        seen: list[Workspace] = []
        sizes: list[int] = []
        token = ""
        for _ in range(10):
            async with tenancy_db.unit_of_work(alice) as uow:
                page = await tenancy_service.list_workspaces(uow, alice, requested_page_size=3, page_token=token)
            seen.extend(page.workspaces)
            sizes.append(len(page.workspaces))
            token = page.next_page_token
            if not token:
                break

        assert sizes == [3, 3, 1]
        expected = sorted(created, key=lambda w: (w.create_time, w.id), reverse=True)
        assert [w.id for w in seen] == [w.id for w in expected]

    async def test_workspaces_created_between_pages_do_not_shift_the_listing(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal
    ) -> None:
        created = [await create_workspace(tenancy_db, tenancy_service, alice, f"ws {i}") for i in range(4)]
        async with tenancy_db.unit_of_work(alice) as uow:
            first = await tenancy_service.list_workspaces(uow, alice, requested_page_size=2)
        newer = await create_workspace(tenancy_db, tenancy_service, alice, "newer")
        async with tenancy_db.unit_of_work(alice) as uow:
            second = await tenancy_service.list_workspaces(
                uow, alice, requested_page_size=2, page_token=first.next_page_token
            )

        listed = [w.id for w in first.workspaces + second.workspaces]
        assert listed == [w.id for w in reversed(created)]
        assert newer.id not in listed

    async def test_deleted_workspaces_only_with_show_deleted_and_tokens_are_bound_to_it(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal
    ) -> None:
        kept = [await create_workspace(tenancy_db, tenancy_service, alice, f"kept {i}") for i in range(2)]
        gone = await create_workspace(tenancy_db, tenancy_service, alice, "gone")
        owner = acting(alice, gone, OWNER)
        async with tenancy_db.unit_of_work(owner) as uow:
            await tenancy_service.delete_workspace(uow, owner, workspace_id=gone.id)

        assert await list_all(tenancy_db, tenancy_service, alice) == [w.id for w in reversed(kept)]
        assert await list_all(tenancy_db, tenancy_service, alice, show_deleted=True) == [
            gone.id,
            *[w.id for w in reversed(kept)],
        ]
        async with tenancy_db.unit_of_work(alice) as uow:
            token = (await tenancy_service.list_workspaces(uow, alice, requested_page_size=1)).next_page_token
        with pytest.raises(InvalidArgument) as caught:
            async with tenancy_db.unit_of_work(alice) as uow:
                await tenancy_service.list_workspaces(uow, alice, page_token=token, show_deleted=True)
        assert caught.value.reason == "INVALID_PAGE_TOKEN"

    async def test_empty_listing_has_no_next_page(self, tenancy_db: Database, tenancy_service: TenancyService) -> None:
        nobody = new_user()
        async with tenancy_db.unit_of_work(nobody) as uow:
            page = await tenancy_service.list_workspaces(uow, nobody)
        assert (page.workspaces, page.next_page_token) == ([], "")

    async def test_tampered_stolen_or_foreign_secret_tokens_are_invalid_argument(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, bob: Principal
    ) -> None:
        for i in range(3):
            await create_workspace(tenancy_db, tenancy_service, alice, f"ws {i}")
        async with tenancy_db.unit_of_work(alice) as uow:
            token = (await tenancy_service.list_workspaces(uow, alice, requested_page_size=1)).next_page_token
        tampered = token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")
        other_secret = TenancyService(page_tokens=PageTokenCodec(b"another-secret-of-enough-length!"))

        reasons = []
        for service, caller, candidate in (
            (tenancy_service, alice, tampered),
            (tenancy_service, bob, token),
            (other_secret, alice, token),
        ):
            with pytest.raises(InvalidArgument) as caught:
                async with tenancy_db.unit_of_work(caller) as uow:
                    await service.list_workspaces(uow, caller, requested_page_size=1, page_token=candidate)
            reasons.append((caught.value.reason, [v.field for v in caught.value.violations]))
        assert reasons == [("INVALID_PAGE_TOKEN", ["page_token"])] * 3

    async def test_negative_page_size_is_invalid_argument(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal
    ) -> None:
        async with tenancy_db.unit_of_work(alice) as uow:
            with pytest.raises(InvalidArgument) as caught:
                await tenancy_service.list_workspaces(uow, alice, requested_page_size=-1)
        assert [violation.field for violation in caught.value.violations] == ["page_size"]


class TestUpdateWorkspace:
    async def test_rename_bumps_the_etag_and_audits_before_and_after(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, admin_conn: asyncpg.Connection
    ) -> None:
        workspace = await create_workspace(tenancy_db, tenancy_service, alice, "Old")
        owner = acting(alice, workspace, OWNER)

        async with tenancy_db.unit_of_work(owner) as uow:
            renamed = await tenancy_service.update_workspace(
                uow, owner, workspace_id=workspace.id, display_name="New", etag=workspace.etag
            )

        assert renamed.display_name == "New"
        assert renamed.etag != workspace.etag
        assert (await get(tenancy_db, tenancy_service, owner, workspace.id)).display_name == "New"
        row = await admin_conn.fetchrow(
            "SELECT actor, target, before, after FROM tenancy.audit_log WHERE tenant_id = $1 AND action = $2",
            workspace.id,
            "workspace.updated",
        )
        assert row is not None
        assert (row["actor"], row["target"]) == (f"users/{alice.subject}", workspace.name)
        assert json.loads(row["before"])["display_name"] == "Old"
        assert json.loads(row["after"])["display_name"] == "New"

    @pytest.mark.parametrize("mask", [["display_name"], ["*"], []])
    async def test_accepted_masks(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, mask: list[str]
    ) -> None:
        workspace = await create_workspace(tenancy_db, tenancy_service, alice, "Old")
        owner = acting(alice, workspace, OWNER)
        async with tenancy_db.unit_of_work(owner) as uow:
            renamed = await tenancy_service.update_workspace(
                uow, owner, workspace_id=workspace.id, display_name="New", update_mask=mask
            )
        assert renamed.display_name == "New"

    @pytest.mark.parametrize("mask", [["state"], ["display_name", "creator"], ["name"]])
    async def test_masks_naming_other_fields_are_invalid_argument(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, mask: list[str]
    ) -> None:
        workspace = await create_workspace(tenancy_db, tenancy_service, alice, "Old")
        owner = acting(alice, workspace, OWNER)
        with pytest.raises(InvalidArgument) as caught:
            async with tenancy_db.unit_of_work(owner) as uow:
                await tenancy_service.update_workspace(
                    uow, owner, workspace_id=workspace.id, display_name="New", update_mask=mask
                )
        assert [v.field for v in caught.value.violations] == ["update_mask"]

    async def test_stale_etag_is_aborted_and_changes_nothing(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal
    ) -> None:
        workspace = await create_workspace(tenancy_db, tenancy_service, alice, "Old")
        owner = acting(alice, workspace, OWNER)
        async with tenancy_db.unit_of_work(owner) as uow:
            first = await tenancy_service.update_workspace(
                uow, owner, workspace_id=workspace.id, display_name="First", etag=workspace.etag
            )

        with pytest.raises(Aborted) as caught:
            async with tenancy_db.unit_of_work(owner) as uow:
                await tenancy_service.update_workspace(
                    uow, owner, workspace_id=workspace.id, display_name="Second", etag=workspace.etag
                )

        assert caught.value.reason == "ETAG_MISMATCH"
        assert caught.value.metadata == {"etag": first.etag}
        assert (await get(tenancy_db, tenancy_service, owner, workspace.id)).display_name == "First"

    async def test_deleted_workspace_is_not_found(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal
    ) -> None:
        workspace = await create_workspace(tenancy_db, tenancy_service, alice, "Old")
        owner = acting(alice, workspace, OWNER)
        async with tenancy_db.unit_of_work(owner) as uow:
            await tenancy_service.delete_workspace(uow, owner, workspace_id=workspace.id)
        with pytest.raises(NotFound):
            async with tenancy_db.unit_of_work(owner) as uow:
                await tenancy_service.update_workspace(uow, owner, workspace_id=workspace.id, display_name="New")


class TestSoftDelete:
    async def test_delete_hides_the_workspace_until_undelete_restores_it(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, admin_conn: asyncpg.Connection
    ) -> None:
        workspace = await create_workspace(tenancy_db, tenancy_service, alice, "Acme")
        owner = acting(alice, workspace, OWNER)

        async with tenancy_db.unit_of_work(owner) as uow:
            deleted = await tenancy_service.delete_workspace(uow, owner, workspace_id=workspace.id)
        assert deleted.delete_time is not None
        assert deleted.purge_time is not None
        assert deleted.purge_time - deleted.delete_time == timedelta(days=30)
        with pytest.raises(NotFound):
            await get(tenancy_db, tenancy_service, owner, workspace.id)
        # The owner keeps a usable membership inside the restore window: identity can still issue the
        # workspace token that UndeleteWorkspace needs once the token used to delete has expired.
        async with tenancy_db.unit_of_work(alice) as uow:
            kept = await tenancy_service.lookup_membership(uow, alice, workspace_id=workspace.id)
        assert kept.role == OWNER
        with pytest.raises(NotFound):  # deleting twice
            async with tenancy_db.unit_of_work(owner) as uow:
                await tenancy_service.delete_workspace(uow, owner, workspace_id=workspace.id)

        async with tenancy_db.unit_of_work(owner) as uow:
            restored = await tenancy_service.undelete_workspace(uow, owner, workspace_id=workspace.id)
        assert (restored.delete_time, restored.purge_time) == (None, None)
        assert (await get(tenancy_db, tenancy_service, owner, workspace.id)).id == workspace.id

        [deleted_event] = await outbox_envelopes(admin_conn, tenant=workspace.id, event_type=DELETED)
        payload = tenancy_events_pb2.WorkspaceDeletedEvent()
        assert deleted_event.payload.Unpack(payload)
        assert payload.workspace.purge_time.ToDatetime(tzinfo=deleted.purge_time.tzinfo) == deleted.purge_time
        assert len(await outbox_envelopes(admin_conn, tenant=workspace.id, event_type=UNDELETED)) == 1
        assert (await audit_actions(admin_conn, workspace.id))[-2:] == ["workspace.deleted", "workspace.undeleted"]

    async def test_a_deleted_workspace_is_not_found_for_members_who_are_not_owners(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
    ) -> None:
        team = await make_team(ADMIN, MEMBER)
        async with tenancy_db.unit_of_work(team.owner) as uow:
            await tenancy_service.delete_workspace(uow, team.owner, workspace_id=team.workspace.id)
        for role in (ADMIN, MEMBER):
            user = Principal(subject=team.user(role).subject)  # user-level, as identity calls it
            with pytest.raises(NotFound):
                async with tenancy_db.unit_of_work(user) as uow:
                    await tenancy_service.lookup_membership(uow, user, workspace_id=team.workspace.id)

    async def test_undelete_of_a_live_workspace_is_failed_precondition(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal
    ) -> None:
        workspace = await create_workspace(tenancy_db, tenancy_service, alice, "Acme")
        owner = acting(alice, workspace, OWNER)
        with pytest.raises(FailedPrecondition) as caught:
            async with tenancy_db.unit_of_work(owner) as uow:
                await tenancy_service.undelete_workspace(uow, owner, workspace_id=workspace.id)
        assert caught.value.reason == "WORKSPACE_NOT_DELETED"

    async def test_undelete_after_the_restore_window_is_failed_precondition(
        self, tenancy_db: Database, alice: Principal
    ) -> None:
        service = make_service(restore_window=timedelta(0))  # purge_time = delete_time: past in the next transaction
        workspace = await create_workspace(tenancy_db, service, alice, "Acme")
        owner = acting(alice, workspace, OWNER)
        async with tenancy_db.unit_of_work(owner) as uow:
            await service.delete_workspace(uow, owner, workspace_id=workspace.id)

        with pytest.raises(FailedPrecondition) as caught:
            async with tenancy_db.unit_of_work(owner) as uow:
                await service.undelete_workspace(uow, owner, workspace_id=workspace.id)

        assert caught.value.reason == "RESTORE_WINDOW_EXPIRED"
        assert "restore window" in caught.value.message
        assert await list_all(tenancy_db, service, alice, show_deleted=True) == []  # no longer restorable

    async def test_delete_with_a_stale_etag_is_aborted(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal
    ) -> None:
        workspace = await create_workspace(tenancy_db, tenancy_service, alice, "Acme")
        owner = acting(alice, workspace, OWNER)
        with pytest.raises(Aborted):
            async with tenancy_db.unit_of_work(owner) as uow:
                await tenancy_service.delete_workspace(uow, owner, workspace_id=workspace.id, etag='"v999"')
        assert (await get(tenancy_db, tenancy_service, owner, workspace.id)).id == workspace.id

    @pytest.mark.parametrize("role", [ADMIN, MEMBER, VIEWER, BILLING_MANAGER])
    async def test_only_owners_delete_or_undelete(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory, role: str
    ) -> None:
        team = await make_team(role)
        caller = team.user(role)
        for operation in (tenancy_service.delete_workspace, tenancy_service.undelete_workspace):
            with pytest.raises(PermissionDenied) as caught:
                async with tenancy_db.unit_of_work(caller) as uow:
                    await operation(uow, caller, workspace_id=team.workspace.id)
            assert (caught.value.reason, caught.value.metadata) == (
                "MISSING_PERMISSION",
                {"permission": "workspace.delete"},
            )


class TestLookupMembership:
    async def test_own_membership_of_a_live_workspace_only(
        self, tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory, alice: Principal
    ) -> None:
        team = await make_team(MEMBER)
        member = Principal(subject=team.user(MEMBER).subject)  # user-level, as identity calls it

        async with tenancy_db.unit_of_work(member) as uow:
            found = await tenancy_service.lookup_membership(uow, member, workspace_id=team.workspace.id)
        assert (found.role, found.user_id) == (MEMBER, uuid.UUID(member.subject))

        outcomes: list[type[AppError]] = []
        for caller in (alice, Principal(subject=str(uuid7()), kind="api_key")):
            try:
                async with tenancy_db.unit_of_work(caller) as uow:
                    await tenancy_service.lookup_membership(uow, caller, workspace_id=team.workspace.id)
            except AppError as error:
                outcomes.append(type(error))
        assert outcomes == [NotFound, NotFound]


@pytest.mark.gate("S08")
class TestProvisionWorkspace:
    async def test_provisioning_activates_once_and_emits_provisioned_event(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, admin_conn: asyncpg.Connection
    ) -> None:
        created = await create_workspace(tenancy_db, tenancy_service, alice, "Acme")

        async with tenancy_db.unit_of_work(None, tenant_id=str(created.id)) as uow:
            activated = await tenancy_service.provision_workspace(uow, workspace_id=created.id)
        async with tenancy_db.unit_of_work(None, tenant_id=str(created.id)) as uow:
            again = await tenancy_service.provision_workspace(uow, workspace_id=created.id)

        assert activated is not None
        assert activated.state is WorkspaceState.ACTIVE
        assert activated.update_time >= created.update_time
        assert again is None
        provisioned = await outbox_envelopes(
            admin_conn, tenant=created.id, event_type="tessera.tenancy.v1.WorkspaceProvisionedEvent"
        )
        assert len(provisioned) == 1

    async def test_provisioning_outside_the_workspace_tenant_is_refused(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal
    ) -> None:
        created = await create_workspace(tenancy_db, tenancy_service, alice, "Acme")

        with pytest.raises(ValueError, match="outside its own tenant"):
            async with tenancy_db.unit_of_work(None, tenant_id=str(uuid.uuid4())) as uow:
                await tenancy_service.provision_workspace(uow, workspace_id=created.id)
