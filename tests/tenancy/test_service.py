"""TenancyService rules against the real database, as the tenancy login role (RLS on)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc
import pytest

from services.kit.db import Database
from services.kit.errors import InvalidArgument, NotFound
from services.kit.paging import PageTokenCodec
from services.kit.principal import Principal
from services.tenancy.errors import REQUEST_ID_REUSED, RequestIdReused
from services.tenancy.models import Workspace, WorkspaceState
from services.tenancy.service import TenancyService
from tessera.common.v1.event_pb2 import EventEnvelope
from tessera.tenancy.v1 import tenancy_events_pb2, tenancy_pb2
from tests.tenancy.conftest import new_user

pytestmark = pytest.mark.gate("S03")


async def create(
    db: Database, service: TenancyService, principal: Principal, name: str, request_id: uuid.UUID | None = None
) -> Workspace:
    async with db.unit_of_work(principal) as uow:
        return await service.create_workspace(uow, principal, display_name=name, request_id=request_id)


async def outbox_events(admin: asyncpg.Connection, workspace: Workspace) -> list[EventEnvelope]:
    """Envelopes in the tenancy outbox about one workspace (read as superuser; no relay runs here)."""
    envelopes = []
    for row in await admin.fetch("SELECT envelope FROM tenancy.outbox ORDER BY id"):
        envelope = EventEnvelope.FromString(row["envelope"])
        if envelope.subject == workspace.name:
            envelopes.append(envelope)
    return envelopes


class TestCreateWorkspace:
    async def test_creates_provisioning_workspace_and_queues_event(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, admin_conn: asyncpg.Connection
    ) -> None:
        workspace = await create(tenancy_db, tenancy_service, alice, "Acme")

        assert workspace.display_name == "Acme"
        assert workspace.state is WorkspaceState.PROVISIONING
        assert workspace.creator == uuid.UUID(alice.subject)
        assert workspace.id.version == 7
        row = await admin_conn.fetchrow("SELECT * FROM tenancy.workspaces WHERE id = $1", workspace.id)
        assert row is not None
        assert row["tenant_id"] == workspace.id
        assert row["request_id"] is None
        [envelope] = await outbox_events(admin_conn, workspace)
        assert envelope.type == "tessera.tenancy.v1.WorkspaceCreatedEvent"
        assert envelope.source == "tenancy"
        assert envelope.tenant_id == str(workspace.id)
        event = tenancy_events_pb2.WorkspaceCreatedEvent()
        assert envelope.payload.Unpack(event)
        assert event.workspace.name == workspace.name
        assert event.workspace.state == tenancy_pb2.WORKSPACE_STATE_PROVISIONING

    async def test_rolled_back_unit_of_work_leaves_neither_row_nor_event(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, admin_conn: asyncpg.Connection
    ) -> None:
        created: list[Workspace] = []

        async def create_then_fail() -> None:
            async with tenancy_db.unit_of_work(alice) as uow:
                created.append(await tenancy_service.create_workspace(uow, alice, display_name="Doomed"))
                raise RuntimeError("failure after the insert")

        with pytest.raises(RuntimeError, match="after the insert"):
            await create_then_fail()

        assert await admin_conn.fetchval("SELECT count(*) FROM tenancy.workspaces WHERE id = $1", created[0].id) == 0
        assert await outbox_events(admin_conn, created[0]) == []

    async def test_same_request_id_and_payload_returns_the_first_workspace(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, admin_conn: asyncpg.Connection
    ) -> None:
        request_id = uuid.uuid4()
        first = await create(tenancy_db, tenancy_service, alice, "Acme", request_id)
        again = await create(tenancy_db, tenancy_service, alice, "Acme", request_id)

        assert again == first
        count = await admin_conn.fetchval(
            "SELECT count(*) FROM tenancy.workspaces WHERE creator = $1 AND request_id = $2",
            uuid.UUID(alice.subject),
            request_id,
        )
        assert count == 1
        assert len(await outbox_events(admin_conn, first)) == 1

    async def test_concurrent_retries_create_one_workspace(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, admin_conn: asyncpg.Connection
    ) -> None:
        request_id = uuid.uuid4()
        results = await asyncio.gather(
            *(create(tenancy_db, tenancy_service, alice, "Racing", request_id) for _ in range(3))
        )

        assert len({workspace.id for workspace in results}) == 1
        count = await admin_conn.fetchval(
            "SELECT count(*) FROM tenancy.workspaces WHERE creator = $1", uuid.UUID(alice.subject)
        )
        assert count == 1
        assert len(await outbox_events(admin_conn, results[0])) == 1

    async def test_request_id_reused_with_other_payload_is_already_exists(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal
    ) -> None:
        request_id = uuid.uuid4()
        await create(tenancy_db, tenancy_service, alice, "Acme", request_id)

        with pytest.raises(RequestIdReused) as caught:
            await create(tenancy_db, tenancy_service, alice, "Other name", request_id)

        assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert caught.value.reason == REQUEST_ID_REUSED
        assert caught.value.metadata == {"request_id": str(request_id)}

    async def test_request_id_is_scoped_to_the_caller(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, bob: Principal
    ) -> None:
        request_id = uuid.uuid4()
        mine = await create(tenancy_db, tenancy_service, alice, "Acme", request_id)
        theirs = await create(tenancy_db, tenancy_service, bob, "Acme", request_id)

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
            await create(tenancy_db, tenancy_service, alice, display_name)

        assert [violation.field for violation in caught.value.violations] == ["workspace.display_name"]

    async def test_display_name_of_exactly_100_characters_is_accepted(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal
    ) -> None:
        workspace = await create(tenancy_db, tenancy_service, alice, "é" * 100)
        assert workspace.display_name == "é" * 100


class TestGetWorkspace:
    async def test_creator_gets_their_workspace(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal
    ) -> None:
        created = await create(tenancy_db, tenancy_service, alice, "Acme")
        async with tenancy_db.unit_of_work(alice) as uow:
            fetched = await tenancy_service.get_workspace(uow, alice, workspace_id=created.id)
        assert fetched == created

    async def test_other_users_workspace_is_not_found(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, bob: Principal
    ) -> None:
        created = await create(tenancy_db, tenancy_service, alice, "Acme")
        absent = uuid.uuid4()

        async with tenancy_db.unit_of_work(bob) as uow:
            with pytest.raises(NotFound) as foreign:
                await tenancy_service.get_workspace(uow, bob, workspace_id=created.id)
            with pytest.raises(NotFound) as missing:
                await tenancy_service.get_workspace(uow, bob, workspace_id=absent)

        # The foreign workspace looks exactly like one that does not exist.
        assert foreign.value.reason == missing.value.reason == "RESOURCE_NOT_FOUND"
        assert foreign.value.message == f"workspaces/{created.id} not found"
        assert missing.value.message == f"workspaces/{absent} not found"


class TestListWorkspaces:
    async def test_pages_cover_all_workspaces_newest_first_without_skips_or_duplicates(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, bob: Principal
    ) -> None:
        created = [await create(tenancy_db, tenancy_service, alice, f"ws {i}") for i in range(7)]
        await create(tenancy_db, tenancy_service, bob, "not alice's")

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
        assert len({w.id for w in seen}) == 7

    async def test_workspaces_created_between_pages_do_not_shift_the_listing(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal
    ) -> None:
        created = [await create(tenancy_db, tenancy_service, alice, f"ws {i}") for i in range(4)]
        async with tenancy_db.unit_of_work(alice) as uow:
            first = await tenancy_service.list_workspaces(uow, alice, requested_page_size=2)
        newer = await create(tenancy_db, tenancy_service, alice, "newer")
        async with tenancy_db.unit_of_work(alice) as uow:
            second = await tenancy_service.list_workspaces(
                uow, alice, requested_page_size=2, page_token=first.next_page_token
            )

        listed = [w.id for w in first.workspaces + second.workspaces]
        assert listed == [w.id for w in reversed(created)]
        assert newer.id not in listed

    async def test_empty_listing_has_no_next_page(self, tenancy_db: Database, tenancy_service: TenancyService) -> None:
        nobody = new_user()
        async with tenancy_db.unit_of_work(nobody) as uow:
            page = await tenancy_service.list_workspaces(uow, nobody)
        assert page.workspaces == []
        assert page.next_page_token == ""

    async def test_tampered_token_is_invalid_argument(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal
    ) -> None:
        for i in range(3):
            await create(tenancy_db, tenancy_service, alice, f"ws {i}")
        async with tenancy_db.unit_of_work(alice) as uow:
            page = await tenancy_service.list_workspaces(uow, alice, requested_page_size=1)
        token = page.next_page_token
        tampered = token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")

        async with tenancy_db.unit_of_work(alice) as uow:
            with pytest.raises(InvalidArgument) as caught:
                await tenancy_service.list_workspaces(uow, alice, requested_page_size=1, page_token=tampered)
        assert caught.value.reason == "INVALID_PAGE_TOKEN"
        assert [violation.field for violation in caught.value.violations] == ["page_token"]

    async def test_token_of_another_caller_or_another_secret_is_refused(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, bob: Principal
    ) -> None:
        for i in range(2):
            await create(tenancy_db, tenancy_service, alice, f"ws {i}")
        async with tenancy_db.unit_of_work(alice) as uow:
            token = (await tenancy_service.list_workspaces(uow, alice, requested_page_size=1)).next_page_token
        other_secret = TenancyService(page_tokens=PageTokenCodec(b"another-secret-of-enough-length!"))

        async with tenancy_db.unit_of_work(bob) as uow:
            with pytest.raises(InvalidArgument) as stolen:
                await tenancy_service.list_workspaces(uow, bob, page_token=token)
        async with tenancy_db.unit_of_work(alice) as uow:
            with pytest.raises(InvalidArgument) as forged:
                await other_secret.list_workspaces(uow, alice, page_token=token)
        assert stolen.value.reason == forged.value.reason == "INVALID_PAGE_TOKEN"

    async def test_negative_page_size_is_invalid_argument(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal
    ) -> None:
        async with tenancy_db.unit_of_work(alice) as uow:
            with pytest.raises(InvalidArgument) as caught:
                await tenancy_service.list_workspaces(uow, alice, requested_page_size=-1)
        assert [violation.field for violation in caught.value.violations] == ["page_size"]


@pytest.mark.gate("S08")
class TestProvisionWorkspace:
    async def test_provisioning_activates_once_and_emits_provisioned_event(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal, admin_conn: asyncpg.Connection
    ) -> None:
        created = await create(tenancy_db, tenancy_service, alice, "Acme")

        async with tenancy_db.unit_of_work(None, tenant_id=str(created.id)) as uow:
            activated = await tenancy_service.provision_workspace(uow, workspace_id=created.id)
        async with tenancy_db.unit_of_work(None, tenant_id=str(created.id)) as uow:
            again = await tenancy_service.provision_workspace(uow, workspace_id=created.id)

        assert activated is not None
        assert activated.state is WorkspaceState.ACTIVE
        assert activated.update_time >= created.update_time
        assert again is None
        types = [envelope.type for envelope in await outbox_events(admin_conn, created)]
        assert types.count("tessera.tenancy.v1.WorkspaceProvisionedEvent") == 1

    async def test_provisioning_outside_the_workspace_tenant_is_refused(
        self, tenancy_db: Database, tenancy_service: TenancyService, alice: Principal
    ) -> None:
        created = await create(tenancy_db, tenancy_service, alice, "Acme")
        other_tenant = str(uuid.uuid4())

        with pytest.raises(ValueError, match="outside its own tenant"):
            async with tenancy_db.unit_of_work(None, tenant_id=other_tenant) as uow:
                await tenancy_service.provision_workspace(uow, workspace_id=created.id)
