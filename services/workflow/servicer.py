"""gRPC transport of WorkflowService: protobuf in, domain calls, protobuf out; nothing else.

Every RPC is workspace-level: it runs in the caller's workspace (the token's tenant) after
`require_tenant`, so a name in another workspace is NOT_FOUND before any SQL runs. Each RPC opens one
unit of work.
"""

from __future__ import annotations

import uuid
from datetime import UTC
from typing import Any

from services.kit.db import Database
from services.kit.ids import uuid7
from services.kit.interceptors import current_principal
from services.kit.principal import Principal
from services.kit.server import ServicerBinding
from services.workflow.errors import invalid_field
from services.workflow.models import (
    ItemFields,
    ItemUpdate,
    RenderedItems,
    activity_message,
    from_json_value,
    item_message,
    parse_name,
    project_message,
)
from services.workflow.service import WorkflowService
from services.workflow.settings import DEFAULT_RENDERED_ITEMS
from services.workflow.workflow import custom_field_from_message, workflow_from_message
from tessera.workflow.v1 import workflow_pb2, workflow_service_pb2_grpc
from tessera.workflow.v1 import workflow_service_pb2 as pb

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["WorkflowService"].full_name

_SHAPES = {
    (): "workspaces/{uuid}",
    ("projects",): "workspaces/{uuid}/projects/{uuid}",
    ("projects", "items"): "workspaces/{uuid}/projects/{uuid}/items/{uuid}",
}
_GROUPINGS = {
    pb.ITEM_GROUPING_UNSPECIFIED: "",
    pb.ITEM_GROUPING_STATUS: "status",
    pb.ITEM_GROUPING_ASSIGNEE: "assignee",
    pb.ITEM_GROUPING_LABEL: "label",
}


def _ids(name: str, collections: tuple[str, ...], *, field: str) -> tuple[uuid.UUID, ...]:
    ids = parse_name(name, collections)
    if ids is None:
        raise invalid_field(field, f"must be a name like {_SHAPES[collections]}")
    return ids


def _caller_in(name: str, collections: tuple[str, ...], *, field: str) -> tuple[Principal, tuple[uuid.UUID, ...]]:
    """The caller and the ids a name carries; NOT_FOUND if the name is not in the caller's workspace."""
    principal = current_principal()
    ids = _ids(name, collections, field=field)
    principal.require_tenant(str(ids[0]), resource=name)
    return principal, ids


def parse_request_id(value: str) -> uuid.UUID | None:
    """The optional idempotency key (a UUID); INVALID_ARGUMENT if present and malformed."""
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise invalid_field("request_id", "must be a UUID") from None


def item_fields(message: workflow_pb2.Item) -> ItemFields:
    """The settable fields of a contract item."""
    return ItemFields(
        title=message.title,
        description=message.description,
        priority=int(message.priority),
        assignee=message.assignee,
        labels=tuple(message.labels),
        due_time=message.due_time.ToDatetime(tzinfo=UTC) if message.HasField("due_time") else None,
        custom_fields={key: from_json_value(value) for key, value in message.custom_fields.items()},
        parent=message.parent,
    )


def _item_update(request: pb.UpdateItemRequest, *, field: str) -> ItemUpdate:
    workspace_id, project_id, item_id = _ids(request.item.name, ("projects", "items"), field=field)
    return ItemUpdate(
        workspace_id=workspace_id,
        project_id=project_id,
        item_id=item_id,
        fields=item_fields(request.item),
        update_mask=tuple(request.update_mask.paths),
        etag=request.etag or request.item.etag,
    )


class WorkflowServicer:
    """Implements tessera.workflow.v1.WorkflowService on top of WorkflowService."""

    def __init__(
        self, database: Database, service: WorkflowService, *, rendered_items: RenderedItems | None = None
    ) -> None:
        self.database = database
        self.service = service
        self.rendered_items = RenderedItems(DEFAULT_RENDERED_ITEMS) if rendered_items is None else rendered_items

    # --- projects ---------------------------------------------------------------------------------------

    async def CreateProject(self, request: pb.CreateProjectRequest, context: Any) -> pb.CreateProjectResponse:
        """Create a project in the caller's workspace."""
        principal, (workspace_id,) = _caller_in(request.parent, (), field="parent")
        request_id = parse_request_id(request.request_id)
        project = request.project
        async with self.database.unit_of_work(principal) as uow:
            created = await self.service.create_project(
                uow,
                principal,
                workspace_id=workspace_id,
                project_id=uuid7(),
                display_name=project.display_name,
                description=project.description,
                workflow=workflow_from_message(project.workflow) if project.HasField("workflow") else None,
                custom_fields=[custom_field_from_message(field) for field in project.custom_fields],
                request_id=request_id,
            )
        return pb.CreateProjectResponse(project=project_message(created))

    async def GetProject(self, request: pb.GetProjectRequest, context: Any) -> pb.GetProjectResponse:
        """Get a project."""
        principal, (workspace_id, project_id) = _caller_in(request.name, ("projects",), field="name")
        async with self.database.unit_of_work(principal) as uow:
            project = await self.service.get_project(uow, principal, workspace_id=workspace_id, project_id=project_id)
        return pb.GetProjectResponse(project=project_message(project))

    async def ListProjects(self, request: pb.ListProjectsRequest, context: Any) -> pb.ListProjectsResponse:
        """List the projects of the caller's workspace, oldest first."""
        principal, (workspace_id,) = _caller_in(request.parent, (), field="parent")
        async with self.database.unit_of_work(principal) as uow:
            page = await self.service.list_projects(
                uow,
                principal,
                workspace_id=workspace_id,
                requested_page_size=request.page_size,
                page_token=request.page_token,
            )
        return pb.ListProjectsResponse(
            projects=[project_message(project) for project in page.projects], next_page_token=page.next_page_token
        )

    async def UpdateProject(self, request: pb.UpdateProjectRequest, context: Any) -> pb.UpdateProjectResponse:
        """Update a project, honouring update_mask and etag."""
        project = request.project
        principal, (workspace_id, project_id) = _caller_in(project.name, ("projects",), field="project.name")
        async with self.database.unit_of_work(principal) as uow:
            updated = await self.service.update_project(
                uow,
                principal,
                workspace_id=workspace_id,
                project_id=project_id,
                display_name=project.display_name,
                description=project.description,
                workflow=workflow_from_message(project.workflow) if project.HasField("workflow") else None,
                custom_fields=[custom_field_from_message(field) for field in project.custom_fields],
                update_mask=list(request.update_mask.paths),
                etag=request.etag or project.etag,
            )
        return pb.UpdateProjectResponse(project=project_message(updated))

    # --- items ------------------------------------------------------------------------------------------

    async def CreateItem(self, request: pb.CreateItemRequest, context: Any) -> pb.CreateItemResponse:
        """Create an item in a project."""
        principal, (workspace_id, project_id) = _caller_in(request.parent, ("projects",), field="parent")
        request_id = parse_request_id(request.request_id)
        async with self.database.unit_of_work(principal) as uow:
            item = await self.service.create_item(
                uow,
                principal,
                workspace_id=workspace_id,
                project_id=project_id,
                item_id=uuid7(),
                fields=item_fields(request.item),
                request_id=request_id,
            )
        return pb.CreateItemResponse(item=item_message(item))

    async def GetItem(self, request: pb.GetItemRequest, context: Any) -> pb.GetItemResponse:
        """Get an item, soft-deleted ones too."""
        principal, (workspace_id, project_id, item_id) = _caller_in(request.name, ("projects", "items"), field="name")
        async with self.database.unit_of_work(principal) as uow:
            item = await self.service.get_item(
                uow, principal, workspace_id=workspace_id, project_id=project_id, item_id=item_id
            )
        return pb.GetItemResponse(item=item_message(item))

    async def UpdateItem(self, request: pb.UpdateItemRequest, context: Any) -> pb.UpdateItemResponse:
        """Update an item's fields, honouring update_mask and etag."""
        principal, _ = _caller_in(request.item.name, ("projects", "items"), field="item.name")
        update = _item_update(request, field="item.name")
        async with self.database.unit_of_work(principal) as uow:
            item = await self.service.update_item(uow, principal, update=update)
        return pb.UpdateItemResponse(item=item_message(item))

    async def TransitionItem(self, request: pb.TransitionItemRequest, context: Any) -> pb.TransitionItemResponse:
        """Move an item to another state."""
        principal, (workspace_id, project_id, item_id) = _caller_in(request.name, ("projects", "items"), field="name")
        async with self.database.unit_of_work(principal) as uow:
            item = await self.service.transition_item(
                uow,
                principal,
                workspace_id=workspace_id,
                project_id=project_id,
                item_id=item_id,
                status=request.status,
                etag=request.etag,
            )
        return pb.TransitionItemResponse(item=item_message(item))

    async def ArchiveItem(self, request: pb.ArchiveItemRequest, context: Any) -> pb.ArchiveItemResponse:
        """Archive an item."""
        principal, (workspace_id, project_id, item_id) = _caller_in(request.name, ("projects", "items"), field="name")
        async with self.database.unit_of_work(principal) as uow:
            item = await self.service.archive_item(
                uow, principal, workspace_id=workspace_id, project_id=project_id, item_id=item_id, etag=request.etag
            )
        return pb.ArchiveItemResponse(item=item_message(item))

    async def UnarchiveItem(self, request: pb.UnarchiveItemRequest, context: Any) -> pb.UnarchiveItemResponse:
        """Unarchive an item."""
        principal, (workspace_id, project_id, item_id) = _caller_in(request.name, ("projects", "items"), field="name")
        async with self.database.unit_of_work(principal) as uow:
            item = await self.service.unarchive_item(
                uow, principal, workspace_id=workspace_id, project_id=project_id, item_id=item_id, etag=request.etag
            )
        return pb.UnarchiveItemResponse(item=item_message(item))

    async def DeleteItem(self, request: pb.DeleteItemRequest, context: Any) -> pb.DeleteItemResponse:
        """Soft-delete an item."""
        principal, (workspace_id, project_id, item_id) = _caller_in(request.name, ("projects", "items"), field="name")
        async with self.database.unit_of_work(principal) as uow:
            item = await self.service.delete_item(
                uow, principal, workspace_id=workspace_id, project_id=project_id, item_id=item_id, etag=request.etag
            )
        return pb.DeleteItemResponse(item=item_message(item))

    async def UndeleteItem(self, request: pb.UndeleteItemRequest, context: Any) -> pb.UndeleteItemResponse:
        """Restore a soft-deleted item."""
        principal, (workspace_id, project_id, item_id) = _caller_in(request.name, ("projects", "items"), field="name")
        async with self.database.unit_of_work(principal) as uow:
            item = await self.service.undelete_item(
                uow, principal, workspace_id=workspace_id, project_id=project_id, item_id=item_id
            )
        return pb.UndeleteItemResponse(item=item_message(item))

    async def BatchUpdateItems(self, request: pb.BatchUpdateItemsRequest, context: Any) -> pb.BatchUpdateItemsResponse:
        """Update up to 100 items of a project in one transaction."""
        principal, (workspace_id, project_id) = _caller_in(request.parent, ("projects",), field="parent")
        updates = [
            _item_update(update, field=f"requests[{index}].item.name") for index, update in enumerate(request.requests)
        ]
        async with self.database.unit_of_work(principal) as uow:
            items = await self.service.batch_update_items(
                uow, principal, workspace_id=workspace_id, project_id=project_id, updates=updates
            )
        return pb.BatchUpdateItemsResponse(items=[item_message(item) for item in items])

    # --- queries ----------------------------------------------------------------------------------------

    async def ListItems(self, request: pb.ListItemsRequest, context: Any) -> pb.ListItemsResponse:
        """List a project's items with filter, search, order and keyset paging."""
        principal, (workspace_id, project_id) = _caller_in(request.parent, ("projects",), field="parent")
        async with self.database.unit_of_work(principal) as uow:
            page = await self.service.list_items(
                uow,
                principal,
                workspace_id=workspace_id,
                project_id=project_id,
                filter=request.filter,
                order_by=request.order_by,
                search=request.search,
                show_deleted=request.show_deleted,
                show_archived=request.show_archived,
                requested_page_size=request.page_size,
                page_token=request.page_token,
            )
        response = pb.ListItemsResponse(next_page_token=page.next_page_token)
        self.rendered_items.add_to(response, page.rows)
        return response

    async def CountItems(self, request: pb.CountItemsRequest, context: Any) -> pb.CountItemsResponse:
        """Count a project's matching items, grouped for board views."""
        principal, (workspace_id, project_id) = _caller_in(request.parent, ("projects",), field="parent")
        group_by = _GROUPINGS.get(request.group_by)
        if group_by is None:
            raise invalid_field("group_by", "must be a defined ItemGrouping")
        async with self.database.unit_of_work(principal) as uow:
            counts = await self.service.count_items(
                uow,
                principal,
                workspace_id=workspace_id,
                project_id=project_id,
                filter=request.filter,
                search=request.search,
                group_by=group_by,
                show_archived=request.show_archived,
            )
        return pb.CountItemsResponse(
            counts=[pb.ItemCount(key=key, count=count) for key, count in counts.counts], total=counts.total
        )

    async def ListItemActivities(
        self, request: pb.ListItemActivitiesRequest, context: Any
    ) -> pb.ListItemActivitiesResponse:
        """List an item's activity log, oldest first."""
        principal, (workspace_id, project_id, item_id) = _caller_in(
            request.parent, ("projects", "items"), field="parent"
        )
        async with self.database.unit_of_work(principal) as uow:
            page = await self.service.list_item_activities(
                uow,
                principal,
                workspace_id=workspace_id,
                project_id=project_id,
                item_id=item_id,
                requested_page_size=request.page_size,
                page_token=request.page_token,
            )
        return pb.ListItemActivitiesResponse(
            activities=[activity_message(activity) for activity in page.activities],
            next_page_token=page.next_page_token,
        )


def binding(servicer: WorkflowServicer) -> ServicerBinding:
    """The servicer as the kit runtime registers it."""
    return ServicerBinding(
        service_name=SERVICE_NAME,
        servicer=servicer,
        add_to_server=workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server,
    )
