"""The audit log: who changed what, before and after, with the request id; newest first, paged, per workspace."""

from __future__ import annotations

import itertools
import json
import uuid

import pytest

from services.kit.authz import ADMIN, MEMBER, OWNER, VIEWER
from services.kit.context import request_id_var
from services.kit.db import Database
from services.kit.errors import InvalidArgument
from services.kit.principal import Principal
from services.tenancy.models import AuditEvent
from services.tenancy.service import TenancyService
from tests.tenancy.conftest import TeamFactory, accept, acting, create_workspace, invite, new_user

pytestmark = pytest.mark.gate("S03")


async def audit_log(
    db: Database, service: TenancyService, caller: Principal, *, page_size: int = 1000
) -> list[AuditEvent]:
    assert caller.tenant_id is not None
    events: list[AuditEvent] = []
    token = ""
    while True:
        async with db.unit_of_work(caller) as uow:
            page = await service.list_audit_events(
                uow, caller, workspace_id=uuid.UUID(caller.tenant_id), requested_page_size=page_size, page_token=token
            )
        events.extend(page.audit_events)
        token = page.next_page_token
        if not token:
            return events


async def test_membership_changes_are_audited_with_actor_before_after_and_request_id(
    tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
) -> None:
    team = await make_team(ADMIN)
    admin = team.user(ADMIN)
    joiner = new_user()
    reset = request_id_var.set("req-invite-1")
    try:
        invitation_id, token = await invite(tenancy_db, tenancy_service, admin, email="new@example.com", role=VIEWER)
    finally:
        request_id_var.reset(reset)
    member = await accept(tenancy_db, tenancy_service, joiner, token)
    async with tenancy_db.unit_of_work(admin) as uow:
        await tenancy_service.update_member(
            uow, admin, workspace_id=team.workspace.id, user_id=member.user_id, role=MEMBER
        )
    async with tenancy_db.unit_of_work(admin) as uow:
        await tenancy_service.remove_member(uow, admin, workspace_id=team.workspace.id, user_id=member.user_id)

    events = await audit_log(tenancy_db, tenancy_service, team.owner)

    newest = [(e.action, e.actor, e.target) for e in events[:5]]
    invitation = f"{team.workspace.name}/invitations/{invitation_id}"
    assert newest == [
        ("member.removed", f"users/{admin.subject}", member.name),
        ("member.role_changed", f"users/{admin.subject}", member.name),
        ("member.added", f"users/{joiner.subject}", member.name),
        ("invitation.accepted", f"users/{joiner.subject}", invitation),
        ("invitation.created", f"users/{admin.subject}", invitation),
    ]
    removed, role_changed, added, accepted, created = events[:5]
    assert (json.loads(role_changed.before_json)["role"], json.loads(role_changed.after_json)["role"]) == (
        VIEWER,
        MEMBER,
    )
    assert (json.loads(removed.before_json)["role"], removed.after_json) == (MEMBER, "")
    assert (added.before_json, json.loads(added.after_json)["user"]) == ("", f"users/{joiner.subject}")
    assert (json.loads(accepted.before_json)["state"], json.loads(accepted.after_json)["state"]) == (
        "PENDING",
        "ACCEPTED",
    )
    assert created.request_id == "req-invite-1"
    assert all(token not in e.after_json + e.before_json for e in events)
    # The team's own history is underneath: creation, then the admin joining.
    assert [e.action for e in events[-2:]] == ["member.added", "workspace.created"]
    assert all((a.create_time, a.id) > (b.create_time, b.id) for a, b in itertools.pairwise(events))


async def test_pages_are_complete_and_each_workspace_sees_only_its_own_log(
    tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
) -> None:
    team = await make_team(ADMIN, MEMBER, VIEWER)
    other = await make_team(ADMIN)

    everything = await audit_log(tenancy_db, tenancy_service, team.owner)
    paged = await audit_log(tenancy_db, tenancy_service, team.owner, page_size=2)
    theirs = await audit_log(tenancy_db, tenancy_service, other.owner)

    assert [e.id for e in paged] == [e.id for e in everything]
    assert {e.workspace_id for e in everything} == {team.workspace.id}
    assert {e.workspace_id for e in theirs} == {other.workspace.id}
    assert not {e.id for e in everything} & {e.id for e in theirs}


async def test_a_page_token_of_another_workspace_is_refused(
    tenancy_db: Database, tenancy_service: TenancyService, make_team: TeamFactory
) -> None:
    team = await make_team(ADMIN)
    async with tenancy_db.unit_of_work(team.owner) as uow:
        token = (
            await tenancy_service.list_audit_events(
                uow, team.owner, workspace_id=team.workspace.id, requested_page_size=1
            )
        ).next_page_token
    # Same user, other workspace (the owner creates a second one): the token is bound to the first.
    second = await create_workspace(tenancy_db, tenancy_service, Principal(subject=team.owner.subject))
    in_second = acting(team.owner, second, OWNER)
    with pytest.raises(InvalidArgument) as caught:
        async with tenancy_db.unit_of_work(in_second) as uow:
            await tenancy_service.list_audit_events(uow, in_second, workspace_id=second.id, page_token=token)
    assert caught.value.reason == "INVALID_PAGE_TOKEN"
